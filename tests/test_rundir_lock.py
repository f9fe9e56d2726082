"""One writer per run directory: the lock of evalhost.rundir, taken by `run`, `run --resume` and `adjudicate`.

Real `evalhost` processes on the toy entry-point backend (tests/toy): a resume while the run still runs is refused
with exit 2 and one sentence naming the holder's PID; two resumes started together end with one refused and no
duplicate record; a lock left by a SIGKILLed process is taken over; manifest.json temp files are unique.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evalhost.errors import UserError
from evalhost.records import read_records
from evalhost.rundir import RunDir
from toy import make_distribution, study_text, write_tasks


def _env(root: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evalhost.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _setup(tmp_path: Path, n: int = 24) -> tuple[Path, Path, Path]:
    root = make_distribution(tmp_path / "site")
    tasks = write_tasks(tmp_path / "tasks.jsonl", n)
    study = tmp_path / "study.toml"
    study.write_text(study_text(tasks, tmp_path / "runs", (2, 4)))
    return root, study, tmp_path / "runs"


def _wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _started_run(study: Path, runs: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """A slow run, once it has written its manifest and at least one record."""
    proc = _cli(["run", str(study), "--quiet", "--no-report"], env)
    holder: list[Path] = []

    def ready() -> bool:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        dirs = [d for d in runs.iterdir()] if runs.is_dir() else []
        if dirs and (dirs[0] / "manifest.json").is_file() and read_records(dirs[0] / "records.jsonl"):
            holder.append(dirs[0])
            return True
        return False

    _wait_for(ready)
    return proc, holder[0]


def test_resume_while_the_run_runs_is_refused_naming_the_holder(tmp_path):
    root, study, runs = _setup(tmp_path)
    env = _env(root, EVALHOST_TOY_DELAY="0.05")
    first, run_dir = _started_run(study, runs, env)
    try:
        second = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(study), "--quiet", "--no-report",
                                 "--resume", str(run_dir)], env=env, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second started; the test proved nothing"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert second.returncode == 2, second.stderr[-2000:]
    last = second.stderr.strip().splitlines()[-1]
    assert "Traceback" not in second.stderr
    assert f"pid {first.pid}" in last and "in use" in last, last
    assert len(last) < 300


def test_two_resumes_at_once_one_refused_no_duplicates_and_a_killed_holder_is_taken_over(tmp_path):
    root, study, runs = _setup(tmp_path)
    env = _env(root, EVALHOST_TOY_DELAY="0.05")
    first, run_dir = _started_run(study, runs, env)
    env["EVALHOST_TOY_DELAY"] = "0.1"  # the resume that wins still runs when the other one starts
    first.send_signal(signal.SIGKILL)  # it held the lock: the kernel releases it with the process
    first.communicate()
    assert RunDir(run_dir).holder().get("pid") == first.pid, "the lock file does not name its holder"
    args = ["run", str(study), "--quiet", "--no-report", "--resume", str(run_dir)]
    procs = [_cli(args, env) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        results.append((p.returncode, out, err))
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(c, e[-1500:]) for c, _, e in results]
    refused = next(err for code, _, err in results if code == 2)
    assert "in use by pid" in refused.strip().splitlines()[-1] and "Traceback" not in refused
    records = read_records(run_dir / "records.jsonl", strict=True)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == 24 * 3, "duplicate or missing records after two concurrent resumes"
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")], "a temp file was left behind"


def test_lock_is_refused_in_process_and_released_after(tmp_path):
    rd = RunDir(tmp_path)
    with rd.lock(purpose="run"):
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
            with RunDir(tmp_path).lock(purpose="rescore"):
                pass
        info = rd.holder()
        assert info["pid"] == os.getpid() and info["purpose"] == "run"
    with rd.lock(purpose="rescore"):  # released when the block ended
        assert rd.holder()["purpose"] == "rescore"


def test_manifest_writers_use_unique_temp_names(tmp_path, monkeypatch):
    """Two writers of manifest.json once shared manifest.json.tmp; one renamed it away under the other
    (FileNotFoundError). Every atomic write now has its own temp name in the same directory."""
    from evalhost.records import write_json_atomic

    seen: list[str] = []
    real = os.replace

    def spy(src, dst, *a, **kw):
        seen.append(os.fsdecode(src))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", spy)
    write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    write_json_atomic(tmp_path / "manifest.json", {"a": 2})
    assert len(seen) == 2 and seen[0] != seen[1], seen
    assert all(Path(s).name != "manifest.json.tmp" for s in seen)
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"a": 2}


def test_adjudicate_takes_the_lock(tmp_path):
    from click.testing import CliRunner

    from evalhost.adjudicate import adjudicate

    (tmp_path / "records.jsonl").write_text("")
    with RunDir(tmp_path).lock(purpose="run"):
        result = CliRunner().invoke(adjudicate, [str(tmp_path)])
    assert result.exit_code == 2
    assert "in use by pid" in result.output


def test_adjudicate_of_a_missing_directory_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "evalhost.cli", "adjudicate", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
