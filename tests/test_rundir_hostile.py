"""Hostile or damaged run directories: one sentence and exit 2 (never a traceback), bounded memory, and the resume
that lost a record when the file ended with a complete record but no newline.

Commands run as real `evalhost` processes; the ones that read a decompression bomb run under an address-space limit
(RLIMIT_AS), so reading it whole fails instead of taking the machine's memory.
"""
from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from evalhost.records import RecordWriter, read_records
from evalhost.runner import run_file
from toy import study_text, write_tasks

REPO = Path(__file__).resolve().parents[1]


def _evalhost(args: list[str], root: Path | None = None, memory: int | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(root) if root else "", os.environ.get("PYTHONPATH", "")) if p)

    def limit() -> None:
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "evalhost.cli", *args], env={**os.environ, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=180, preexec_fn=limit)


def _one_sentence(proc: subprocess.CompletedProcess, codes=(2,), word: str = "") -> str:
    assert proc.returncode in codes, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr + proc.stdout
    last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1]
    assert len(last) < 300 and word in last, last
    return last


@pytest.fixture
def toy_run(tmp_path, toy_env):
    tasks = write_tasks(tmp_path / "tasks.jsonl", 4)
    study = tmp_path / "study.toml"
    study.write_text(study_text(tasks, tmp_path / "runs", (2,)))  # 4 items x (solo, bs2) = 8 records
    run_dir = run_file(study, progress=False, report=False, out=lambda s: None)
    return study, run_dir


# -- issue 18 item 4: a final record without its newline -----------------------------------------------------------
def test_resume_keeps_a_final_record_that_lost_only_its_newline(toy_run, toy_env):
    study, run_dir = toy_run
    records = run_dir / "records.jsonl"
    data = records.read_bytes()
    assert data.count(b"\n") == 8
    records.write_bytes(data[:-1])  # killed between the last record and its newline
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["status"] = "interrupted"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    proc = _evalhost(["run", str(study), "--quiet", "--no-report", "--resume", str(run_dir)], toy_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys = [r["key"] for r in read_records(records, strict=True)]
    assert len(keys) == len(set(keys)) == 8, f"{len(keys)} of 8 records after the resume"
    assert records.read_bytes().endswith(b"\n")
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"


def test_writer_still_cuts_a_torn_final_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"key": "a"}\n{"key": "b", "out')
    RecordWriter(path).close()
    assert path.read_bytes() == b'{"key": "a"}\n'


# -- issue 18 item 6: hostile run directories --------------------------------------------------------------------
def _edit_first_record(run_dir: Path, change) -> None:
    lines = (run_dir / "records.jsonl").read_text().splitlines()
    lines[0] = change(json.loads(lines[0]))
    (run_dir / "records.jsonl").write_text("\n".join(lines) + "\n")


RECORD_EDITS = {
    "list_as_key": lambda r: json.dumps({**r, "key": ["a", "b"]}),
    "dict_as_label": lambda r: json.dumps({**r, "label": {"x": 1}}),
    "non_object_line": lambda r: json.dumps([1, 2, 3]),
    "number_line": lambda r: "42",
    "deep_nesting": lambda r: "[" * 100000 + "]" * 100000,
}
MANIFEST_EDITS = {"list_manifest": "[1, 2]", "invalid_manifest": "{not json", "fingerprints_list":
                  '{"fingerprints": [], "status": "complete"}'}


@pytest.mark.parametrize("case", sorted(RECORD_EDITS) + sorted(MANIFEST_EDITS))
@pytest.mark.parametrize("command", ["validate", "report", "resume"])
def test_hostile_run_directory_is_one_sentence(toy_run, toy_env, case, command):
    study, run_dir = toy_run
    if case in RECORD_EDITS:
        _edit_first_record(run_dir, RECORD_EDITS[case])
    else:
        (run_dir / "manifest.json").write_text(MANIFEST_EDITS[case])
    args = {"validate": ["validate", str(run_dir)], "report": ["report", str(run_dir)],
            "resume": ["run", str(study), "--quiet", "--no-report", "--resume", str(run_dir)]}[command]
    before = (run_dir / "records.jsonl").read_bytes()
    # validate reports damaged records as errors (exit 1); a manifest it cannot read is bad input (exit 2)
    codes = (1, 2) if command == "validate" and case in RECORD_EDITS else (2,)
    _one_sentence(_evalhost(args, toy_env), codes)
    assert (run_dir / "records.jsonl").read_bytes() == before, "a refused command changed the records"


def test_validate_escapes_control_characters_from_records(toy_run, toy_env):
    _, run_dir = toy_run
    _edit_first_record(run_dir, lambda r: json.dumps({**r, "key": "\x1b]0;pwned\x07\x1b[2J", "condition": "\x1b[31m"}))
    proc = _evalhost(["validate", str(run_dir)], toy_env)
    assert proc.returncode == 1
    assert "\x1b" not in proc.stdout + proc.stderr and "\x07" not in proc.stdout + proc.stderr
    assert "\\x1b" in proc.stdout


# -- issue 18 item 5: bounded reads ---------------------------------------------------------------------------------
def _bomb(path: Path, line: bytes, members: int) -> Path:
    """A multi-member gzip: ``members`` copies of one compressed 8 MiB block of ``line`` repeated."""
    block = gzip.compress(line * (8 * 2**20 // len(line)), compresslevel=9)
    with path.open("wb") as fh:
        for _ in range(members):
            fh.write(block)
    return path


@pytest.mark.parametrize("line", [b'{"key":"k"}\n', b"\0"], ids=["small-lines", "no-newline"])
@pytest.mark.parametrize("command", ["validate", "report"])
def test_gzip_bomb_is_refused_with_bounded_memory(tmp_path, line, command):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bomb = _bomb(run_dir / "records.jsonl.gz", line, 1024)  # 8 GiB inflated
    assert bomb.stat().st_size < 20 * 2**20
    last = _one_sentence(_evalhost([command, str(run_dir)], memory=3 * 2**30))
    assert "decompression bomb" in last or "longer than" in last, last


def test_committed_h100_runs_still_load():
    """The bounds are sized for real runs: the smallest and the largest committed H100 run read in full."""
    from evalhost.records import GZIP_RATIO_FLOOR, MAX_LINE_BYTES

    runs = sorted((REPO / "docs" / "results").rglob("records.jsonl.gz"), key=lambda p: p.stat().st_size)
    assert runs, "no committed runs found under docs/results"
    for path in (runs[0], runs[-1]):
        with gzip.open(path, "rb") as fh:
            lines = sum(1 for raw in fh if raw.strip())
        assert len(read_records(path, checked=True)) == lines, path
    assert MAX_LINE_BYTES >= 2**20 and GZIP_RATIO_FLOOR >= 2**20


def test_oversized_manifest_is_refused_not_loaded(toy_run, toy_env):
    _, run_dir = toy_run
    with (run_dir / "manifest.json").open("w") as fh:
        fh.write('{"pad": "' + "x" * (65 * 2**20) + '"}')
    _one_sentence(_evalhost(["validate", str(run_dir)], toy_env), word="larger than")
