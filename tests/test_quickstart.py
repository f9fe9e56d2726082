"""The README's main command, shortened: the shipped quickstart study on the shipped model, end to end via the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs_end_to_end_on_the_real_model(tmp_path, small_model_path):
    text = (ROOT / "studies" / "quickstart.toml").read_text()
    assert "limit = 12" in text and "max_tokens = 40" in text and 'output_dir = "runs"' in text
    short = (text.replace("limit = 12", "limit = 4").replace("max_tokens = 40", "max_tokens = 12")
             .replace('output_dir = "runs"', f'output_dir = "{tmp_path / "runs"}"'))
    study = tmp_path / "quickstart.toml"
    study.write_text(short)
    env = {**os.environ, "EVALHOST_SOLO_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(study)], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = Path(proc.stdout.split("report: ")[1].split()[0])
    run_dir = report.parent
    assert report.is_file() and (run_dir / "summary.json").is_file()
    assert "## Headline" in report.read_text()
    check = subprocess.run([sys.executable, "-m", "evalhost.cli", "validate", str(run_dir)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout
    assert "24 records (8 solo, 16 batch)" in check.stdout
