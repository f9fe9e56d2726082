"""Every shipped study file plans cleanly (`evalhost run --dry-run`), with the plugins and task sets that ship."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "studies").glob("*.toml")) + sorted((ROOT / "docs" / "results").glob("*/*.toml"))


@pytest.mark.parametrize("path", [p for p in STUDIES if "/tmp/runs/candidates" not in p.read_text()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_study_dry_run(path):
    proc = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(path), "--dry-run"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert " cells, " in proc.stdout and "generations" in proc.stdout


def test_ray_dry_run_shows_the_resource_plan():
    pytest.importorskip("ray")
    proc = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(ROOT / "studies" / "study_b.toml"),
                           "--dry-run", "--executor", "ray"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "num_cpus" in proc.stdout or "CPU" in proc.stdout
