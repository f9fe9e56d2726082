"""`evalhost rescore RUN_DIR`: stored outputs scored again without generating, old labels kept in
rescore-history.jsonl, the report rewritten, archived runs too, the run lock held, and kill -9 at any step leaves the
old or the new state (a second rescore finishes)."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from evalhost.records import read_records
from test_runner_records import env_with, install_flaky, quiet, toy_study


@pytest.fixture
def flaky_run(tmp_path, toy_env, monkeypatch):
    """A finished toy run whose scorer raised on item q003 (3 records: solo, bs2, bs4)."""
    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    install_flaky(toy_env, tmp_path)
    run_dir = quiet(toy_study(tmp_path, scorer="flaky"))
    assert sum(r["scorer_error"] is not None for r in read_records(run_dir)) == 3
    return run_dir


def plugin_env(**extra) -> dict:
    """The environment for an `evalhost` subprocess that sees the toy and flaky plugins of this test."""
    root = next(Path(p) for p in sys.path if (Path(p) / "evalhost_flaky.py").exists())
    return env_with(root, **extra)


def _state(run_dir: Path) -> tuple[bytes, list]:
    from evalhost.rescore import read_history

    return (run_dir / "records.jsonl").read_bytes(), [(e["rescore"], e["changed"]) for e in read_history(run_dir)]


def test_rescore_labels_the_failed_records_and_keeps_the_old_values(flaky_run, monkeypatch):
    from evalhost.rescore import read_history, rescore_run

    before = (flaky_run / "records.jsonl").read_bytes().splitlines()
    monkeypatch.setenv("EVALHOST_FLAKY_FIXED", "1")
    result = rescore_run(flaky_run)
    assert (result["records"], result["changed"], result["scorer_errors_before"], result["scorer_errors"]) == \
        (36, 3, 3, 0)
    after = (flaky_run / "records.jsonl").read_bytes().splitlines()
    records = read_records(flaky_run)
    assert len(after) == len(before) == 36 and len({r["key"] for r in records}) == 36
    assert all(r["label"] in ("refuse", "comply") and r["scorer_error"] is None for r in records)
    assert sum(a != b for a, b in zip(before, after)) == 3  # the other lines are kept byte for byte
    for a, b in zip(before, after):
        if a != b:  # only the scoring fields changed; the generation is the one stored
            old, new = json.loads(a), json.loads(b)
            assert {k for k in old if old[k] != new[k]} <= {"label", "score", "rationale", "scorer_error"}
    (entry,) = read_history(flaky_run)
    assert entry["rescore"] == 1 and entry["scorer"] is None and len(entry["changed"]) == 3
    for c in entry["changed"]:
        assert c["old"]["label"] is None and c["old"]["scorer_error"] == "ValueError: cannot parse q003"
        assert c["new"]["label"] in ("refuse", "comply") and c["new"]["scorer_error"] is None
    summary = json.loads((flaky_run / "summary.json").read_text())
    assert summary["counts"]["records"] == 36
    assert "scorer_error" not in (flaky_run / "report.md").read_text() or summary["counts"].get("scorer_errors") == 0
    # nothing left to change: no new history entry
    assert rescore_run(flaky_run, report=False)["changed"] == 0 and len(read_history(flaky_run)) == 1


def test_rescore_with_another_scorer_from_the_command_line(flaky_run, monkeypatch):
    from evalhost.cli import cli
    from evalhost.rescore import read_history

    monkeypatch.setenv("EVALHOST_FLAKY_FIXED", "1")
    result = CliRunner().invoke(cli, ["rescore", str(flaky_run), "--scorer", "toy_refusal"])
    assert result.exit_code == 0, result.output
    assert "rescored 36 records: 36 changed (3 had a scorer error)" in result.output
    assert "report: " in result.output
    assert {r["scorer"] for r in read_records(flaky_run)} == {"toy_refusal"}
    (entry,) = read_history(flaky_run)
    assert entry["scorer"] == "toy_refusal" and {c["old"]["scorer"] for c in entry["changed"]} == {"flaky"}


def test_bad_input_is_one_sentence_and_changes_nothing(flaky_run):
    from evalhost.rundir import RunDir

    def files():
        return sorted((p.name, p.read_bytes()) for p in flaky_run.iterdir() if p.is_file() and p.name != "run.lock")

    def rescore(*args):
        return subprocess.run([sys.executable, "-m", "evalhost.cli", "rescore", str(flaky_run), *args],
                              env=plugin_env(EVALHOST_FLAKY_FIXED="1"), capture_output=True, text=True, timeout=120)

    before = files()
    proc = rescore("--scorer", "toy_refusl")
    assert proc.returncode == 2 and "did you mean" in proc.stderr, proc.stderr
    with RunDir(flaky_run).lock(purpose="test"):  # a run (or another rescore) holds the directory
        proc = rescore()
    assert proc.returncode == 2 and "is in use by pid" in proc.stderr, proc.stderr
    manifest = (flaky_run / "manifest.json").read_text()
    (flaky_run / "manifest.json").write_text(json.dumps({**json.loads(manifest), "status": "interrupted"}))
    proc = rescore()
    assert proc.returncode == 2 and "not a finished run (status 'interrupted')" in proc.stderr, proc.stderr
    (flaky_run / "manifest.json").write_text(manifest)
    assert files() == before
    plain = flaky_run.parent / "my-documents"
    plain.mkdir()
    proc = subprocess.run([sys.executable, "-m", "evalhost.cli", "rescore", str(plain)], env=plugin_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has no manifest.json" in proc.stderr and not list(plain.iterdir()), proc.stderr


def test_an_archived_run_is_rescored_in_place(flaky_run, monkeypatch):
    from evalhost.rescore import read_history, rescore_run

    data = (flaky_run / "records.jsonl").read_bytes()
    (flaky_run / "records.jsonl.gz").write_bytes(gzip.compress(data))
    (flaky_run / "records.jsonl").unlink()
    monkeypatch.setenv("EVALHOST_FLAKY_FIXED", "1")
    assert rescore_run(flaky_run, report=False)["changed"] == 3
    assert not (flaky_run / "records.jsonl").exists()
    records = read_records(flaky_run)
    assert len(records) == 36 and all(r["label"] is not None for r in records)
    assert len(read_history(flaky_run)) == 1


def test_kill_9_at_any_step_leaves_the_old_or_the_new_state(flaky_run, tmp_path, monkeypatch):
    """Killed after scoring, after the history write, after the records rename, after the report: each time the
    directory holds the old or the new records and history, and a second rescore ends in the uninterrupted state."""
    from evalhost.rescore import read_history, rescore_run

    pristine = tmp_path / "pristine"
    shutil.copytree(flaky_run, pristine)
    monkeypatch.setenv("EVALHOST_FLAKY_FIXED", "1")
    reference = tmp_path / "reference"
    shutil.copytree(pristine, reference)
    rescore_run(reference)
    old, new = _state(pristine), _state(reference)
    assert old[0] != new[0] and old[1] == [] and len(new[1]) == 1
    for point in ("scored", "history", "records", "report"):
        run_dir = tmp_path / point
        shutil.copytree(pristine, run_dir)
        killed = subprocess.run([sys.executable, "-m", "evalhost.cli", "rescore", str(run_dir)],
                                env=plugin_env(EVALHOST_FLAKY_FIXED="1", EVALHOST_TEST_KILL_AT=point),
                                capture_output=True, text=True, timeout=120)
        assert killed.returncode == -9, (point, killed.stderr)
        assert _state(run_dir) == (old if point in ("scored", "history") else new), point
        if point == "history":  # the entry that never took effect is on disk until the next rescore removes it
            assert len((run_dir / "rescore-history.jsonl").read_bytes().splitlines()) == 1
        rescore_run(run_dir)
        assert _state(run_dir) == new, point
        assert len((run_dir / "rescore-history.jsonl").read_bytes().splitlines()) == 1, point
        assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")], point
        assert json.loads((run_dir / "summary.json").read_text())["counts"] == \
            json.loads((reference / "summary.json").read_text())["counts"], point
        assert len(read_history(run_dir)) == 1
