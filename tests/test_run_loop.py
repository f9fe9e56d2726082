"""The run loop end to end on the toy backend (a real entry-point plugin): records, manifest, resume after kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evalhost.records import read_records
from evalhost.runner import run_file
from evalhost.validate import validate_run
from toy import make_distribution, study_text, write_tasks


def _study(tmp_path: Path, n_items=12, batch_sizes=(2, 4), name="study.toml") -> Path:
    tasks = write_tasks(tmp_path / "tasks.jsonl", n_items)
    path = tmp_path / name
    path.write_text(study_text(tasks, tmp_path / "runs", batch_sizes))
    return path


def _fingerprint(records):
    return sorted((r["key"], r["output_sha256"], r["label"]) for r in records)


def test_run_writes_paired_records_and_manifest(tmp_path, toy_env):
    from evalhost.testing import run_study_in

    records = run_study_in(tmp_path, _study(tmp_path).read_text(), solo_cache=False)
    run_dir = records.run_dir
    assert len(records) == 12 * 3  # solo + bs2 + bs4, every item a target once per cell
    solo = [r for r in records if r["condition"] == "solo"]
    assert {r["batch_size"] for r in solo} == {1} and {r["dispatcher"] for r in solo} == {"solo"}
    bs4 = [r for r in records if r["batch_size"] == 4]
    assert all(len(r["peers"]) == 3 for r in bs4)
    assert len({r["group_id"] for r in bs4}) == 3
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(manifest["fingerprints"]) == {records[0]["fingerprint_id"]}
    assert (run_dir / "study.toml").read_text() == (tmp_path / "study.toml").read_text()
    # the toy backend flips some labels in batches: the records show it
    assert any(r["label"] == "refuse" for r in records if r["condition"] == "batch")
    assert validate_run(run_dir)["errors"] == []


def test_groups_are_deterministic_from_the_seed(tmp_path, toy_env):
    a = run_file(_study(tmp_path), progress=False, report=False, out=lambda s: None)
    b = run_file(_study(tmp_path), progress=False, report=False, out=lambda s: None)
    assert a != b  # a new run directory every time, never overwritten
    ga = {(r["key"], r["group_id"], tuple(r["peers"])) for r in read_records(a / "records.jsonl")}
    gb = {(r["key"], r["group_id"], tuple(r["peers"])) for r in read_records(b / "records.jsonl")}
    assert ga == gb


def test_resume_refuses_a_different_study_file(tmp_path, toy_env):
    from evalhost.errors import UserError

    run_dir = run_file(_study(tmp_path), progress=False, report=False, out=lambda s: None)
    other = _study(tmp_path, batch_sizes=(3,), name="other.toml")
    with pytest.raises(UserError, match="different study file"):
        run_file(other, resume=run_dir, progress=False, report=False, out=lambda s: None)


def test_torn_last_line_is_ignored_and_repaired(tmp_path, toy_env):
    study = _study(tmp_path)
    run_dir = run_file(study, progress=False, report=False, out=lambda s: None)
    path = run_dir / "records.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-5]) + lines[-5][:40])  # lose 4 records and tear the 5th
    assert len(read_records(path)) == len(lines) - 5
    run_file(study, resume=run_dir, progress=False, report=False, out=lambda s: None)
    again = read_records(path)
    assert len(again) == len(lines) and len({r["key"] for r in again}) == len(lines)
    assert validate_run(run_dir)["errors"] == []


def _cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "evalhost.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    root = make_distribution(tmp_path / "site")
    study = _study(tmp_path, n_items=16)
    env = {**os.environ, "PYTHONPATH": str(root), "EVALHOST_TOY_DELAY": "0.05", "EVALHOST_SOLO_CACHE": "0"}
    reference = _cli(["run", str(study), "--quiet", "--no-report"], env)
    out, err = reference.communicate(timeout=120)
    assert reference.returncode == 0, err
    ref_dir = Path(out.split("run directory: ")[1].split()[0])

    proc = _cli(["run", str(study), "--quiet", "--no-report"], env)
    deadline = time.time() + 60
    run_dir = None
    while time.time() < deadline:
        dirs = [d for d in (tmp_path / "runs").iterdir() if d != ref_dir]
        if dirs and (dirs[0] / "records.jsonl").exists() and len(read_records(dirs[0] / "records.jsonl")) >= 10:
            run_dir = dirs[0]
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_dir is not None
    partial = read_records(run_dir / "records.jsonl")
    assert 10 <= len(partial) < 48
    resumed = _cli(["run", str(study), "--quiet", "--no-report", "--resume", str(run_dir)], env)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    final = read_records(run_dir / "records.jsonl")
    assert len(final) == len({r["key"] for r in final}) == 48
    assert _fingerprint(final) == _fingerprint(read_records(ref_dir / "records.jsonl"))
    check = subprocess.run([sys.executable, "-m", "evalhost.cli", "validate", str(run_dir)], env=env,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_solo_cache_reuses_baselines_only_on_the_same_stack(tmp_path, toy_env, monkeypatch):
    monkeypatch.setenv("EVALHOST_SOLO_CACHE_DIR", str(tmp_path / "solo-cache"))
    study = _study(tmp_path)
    first = read_records(run_file(study, progress=False, report=False, out=lambda s: None) / "records.jsonl")
    second = read_records(run_file(study, progress=False, report=False, out=lambda s: None) / "records.jsonl")
    solo1 = {r["key"]: r for r in first if r["condition"] == "solo"}
    solo2 = {r["key"]: r for r in second if r["condition"] == "solo"}
    assert all(r["dispatch_evidence"].get("solo_cache") != "hit" for r in solo1.values())
    assert all(r["dispatch_evidence"].get("solo_cache") == "hit" for r in solo2.values())
    assert {k: r["output_sha256"] for k, r in solo1.items()} == {k: r["output_sha256"] for k, r in solo2.items()}
    # another stack (here: another backend configuration) never sees those entries
    other = tmp_path / "other.toml"
    other.write_text(study.read_text().replace('name = "toy"\n\n[[dispatchers]]',
                                               'name = "toy"\noptions = { delay = 0.0 }\n\n[[dispatchers]]'))
    third = read_records(run_file(other, progress=False, report=False, out=lambda s: None) / "records.jsonl")
    assert all(r["dispatch_evidence"].get("solo_cache") != "hit" for r in third if r["condition"] == "solo")
    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    fourth = read_records(run_file(study, progress=False, report=False, out=lambda s: None) / "records.jsonl")
    assert all(r["dispatch_evidence"].get("solo_cache") != "hit" for r in fourth if r["condition"] == "solo")


def test_candidates_rerun_in_their_original_groups(tmp_path, toy_env, monkeypatch):
    """Study A -> `evalhost candidates` -> Study D: each flip row runs solo and in its reconstructed group."""
    from click.testing import CliRunner

    from evalhost.cli import cli

    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    study = _study(tmp_path, n_items=16)
    first = run_file(study, progress=False, report=False, out=lambda s: None)
    original = {r["key"]: r for r in read_records(first / "records.jsonl")}
    cand = tmp_path / "candidates.jsonl"
    result = CliRunner().invoke(cli, ["candidates", str(first), "-o", str(cand)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in cand.read_text().splitlines()]
    assert rows and all(r["kind"] == "label_flip" for r in rows)
    d = tmp_path / "study_d.toml"
    d.write_text(study.read_text()
                 .replace('name = "toy"\n', 'name = "toy_d"\n', 1)
                 .replace('[[backends]]\nname = "toy"', '[[backends]]\nname = "toy"\nlabel = "a"\n\n'
                                                        '[[backends]]\nname = "toy"\nlabel = "b"')
                 .replace(f'source = "jsonl:{tmp_path / "tasks.jsonl"}"', 'source = "candidates:candidates.jsonl"'))
    second = run_file(d, progress=False, report=False, out=lambda s: None)
    records = read_records(second / "records.jsonl")
    assert validate_run(second)["errors"] == []
    for backend in ("a", "b"):
        batch = [r for r in records if r["backend"] == backend and r["condition"] == "batch"]
        assert len(batch) == len(rows)
        for r, row in zip(sorted(batch, key=lambda r: r["item_id"]), sorted(rows, key=lambda r: r["item_id"] + "@")):
            orig = original[row["key"]]
            assert r["peers"] == orig["peers"] and r["position"] == orig["position"]
            assert r["batch_size"] == orig["batch_size"] and r["task"] == orig["task"]
            assert r["output_sha256"] == orig["output_sha256"]  # the toy backend is deterministic per group
            assert r["candidate_kind"] == "label_flip"
