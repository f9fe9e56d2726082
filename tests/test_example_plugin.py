"""The third-party example distribution examples/evalhost-length-scorer: installed for real with pip into the
current interpreter's environment, discovered through its entry point, listed by `evalhost plugins --json`, used."""
from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "evalhost-length-scorer"
DIST = "evalhost-length-scorer"


@pytest.fixture(scope="module")
def installed():
    try:
        version = md.version(DIST)
    except md.PackageNotFoundError:
        version = None
    if version != "0.1.0":
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet", str(EXAMPLE)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        importlib_invalidate()
    assert md.version(DIST) == "0.1.0"
    return True


def importlib_invalidate():
    import importlib

    importlib.invalidate_caches()


def test_listed_by_evalhost_plugins(installed):
    proc = subprocess.run([sys.executable, "-m", "evalhost.cli", "plugins", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    rows = data["plugins"] if isinstance(data, dict) else data
    length = [r for r in rows if r["kind"] == "scorer" and r["name"] == "length"]
    assert len(length) == 1, rows
    assert length[0]["distribution"] == DIST and length[0]["version"] == "0.1.0"
    if isinstance(data, dict):
        assert not [p for p in data.get("problems", []) if DIST in p]


def test_scores_through_the_registry(installed):
    from evalhost.plugins import build_registry
    from evalhost.types import TaskItem

    registry = build_registry()
    entry = registry.entry("scorer", "length")
    assert (entry.distribution, entry.version) == (DIST, "0.1.0")
    scorer = registry.get("scorer", "length")({"short_below": 5, "long_above": 60})
    item = TaskItem(id="i", task="t", domain="capability", prompt="Tell me about bread.")
    assert scorer.score(item, "").label == "empty"
    assert scorer.score(item, "Yes.").label == "short"
    ok = scorer.score(item, "Bread is made from flour, water, salt and yeast, then baked until golden.")
    assert ok.label == "ok" and ok.value == 17.0
    cut = "Here is how to bake bread at home. First mix the flour and water, then add the salt and the yeast and"
    assert scorer.score(item, cut).label == "truncated_like"
    long = " ".join(["Bread is good."] * 30)
    assert scorer.score(item, long).label == "long"


def test_bad_option_is_a_user_error(installed):
    from evalhost.errors import UserError
    from evalhost.plugins import build_registry

    cls = build_registry().get("scorer", "length")
    with pytest.raises(UserError, match="scorer 'length' has no option 'shortest'"):
        cls({"shortest": 3})
