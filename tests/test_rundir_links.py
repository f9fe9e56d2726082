"""A run directory received from someone else is not trusted: no file of it is opened through a symbolic link, and a
run directory never lands outside ``output_dir``.

Each case plants a link in a real toy run and runs the real command: it must end with exit 2, one sentence, no
traceback, and the link's target (outside the run directory) unchanged.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evalhost.errors import UserError
from evalhost.runner import run_file, run_study
from evalhost.study import load_study
from toy import study_text, write_tasks


@pytest.fixture
def toy_run(tmp_path, toy_env):
    tasks = write_tasks(tmp_path / "tasks.jsonl", 8)
    study = tmp_path / "study.toml"
    study.write_text(study_text(tasks, tmp_path / "runs", (2, 4)))
    run_dir = run_file(study, progress=False, report=True, out=lambda s: None)
    return study, run_dir


def _evalhost(args: list[str], root: Path, **kw) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "evalhost.cli", *args], env={**os.environ, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=120, **kw)


def _refused(proc: subprocess.CompletedProcess, word: str = "link") -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert word in last and len(last) < 400, last


def _victim(tmp_path: Path, name: str, content: str = "precious\n") -> Path:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    target = outside / name
    target.write_text(content)
    return target


@pytest.mark.parametrize("name", ["report.md", "summary.json"])
def test_report_does_not_write_through_a_linked_output(toy_run, tmp_path, toy_env, name):
    _, run_dir = toy_run
    target = _victim(tmp_path, name)
    (run_dir / name).unlink()
    (run_dir / name).symlink_to(target)
    _refused(_evalhost(["report", str(run_dir)], toy_env))
    assert target.read_text() == "precious\n"


def test_report_does_not_draw_through_a_linked_plots_dir(toy_run, tmp_path, toy_env):
    _, run_dir = toy_run
    outside = tmp_path / "outside-plots"
    outside.mkdir()
    for p in (run_dir / "plots").iterdir():
        p.unlink()
    (run_dir / "plots").rmdir()
    (run_dir / "plots").symlink_to(outside)
    _refused(_evalhost(["report", str(run_dir)], toy_env))
    assert list(outside.iterdir()) == []


def test_report_does_not_draw_through_a_linked_png(toy_run, tmp_path, toy_env):
    _, run_dir = toy_run
    pngs = sorted((run_dir / "plots").glob("*.png"))
    assert pngs, "the toy run drew no plots; the test cannot plant a link"
    target = _victim(tmp_path, "picture.png")
    pngs[0].unlink()
    pngs[0].symlink_to(target)
    proc = _evalhost(["report", str(run_dir)], toy_env)
    assert target.read_text() == "precious\n"
    _refused(proc)


def test_resume_does_not_truncate_or_append_through_a_linked_records_file(toy_run, tmp_path, toy_env):
    study, run_dir = toy_run
    records = run_dir / "records.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    content = "".join(lines[:3]) + '{"torn'  # a resume would cut the torn tail and append the missing records
    target = _victim(tmp_path, "records.jsonl", content)
    records.unlink()
    records.symlink_to(target)
    _refused(_evalhost(["run", str(study), "--quiet", "--no-report", "--resume", str(run_dir)], toy_env))
    assert target.read_text() == content


def test_adjudicate_does_not_append_through_a_linked_adjudications_file(toy_run, tmp_path, toy_env):
    from evalhost.adjudicate import find_flips
    from evalhost.records import read_records

    _, run_dir = toy_run
    flips = find_flips(read_records(run_dir))
    assert flips, "the toy run has no label flips to adjudicate"
    rows = tmp_path / "verdicts.jsonl"
    rows.write_text(f'{{"key": "{flips[0][1]["key"]}", "verdict": "genuine"}}\n')
    target = _victim(tmp_path, "adjudications.jsonl")
    (run_dir / "adjudications.jsonl").symlink_to(target)
    _refused(_evalhost(["adjudicate", str(run_dir), "--import", str(rows)], toy_env))
    assert target.read_text() == "precious\n"
    _refused(_evalhost(["adjudicate", str(run_dir)], toy_env, input="q\n"))
    assert target.read_text() == "precious\n"


@pytest.mark.parametrize("command", ["validate", "report", "resume"])
def test_manifest_linked_to_dev_zero_is_refused_at_once(toy_run, toy_env, command):
    study, run_dir = toy_run
    (run_dir / "manifest.json").unlink()
    (run_dir / "manifest.json").symlink_to("/dev/zero")
    args = {"validate": ["validate", str(run_dir)], "report": ["report", str(run_dir)],
            "resume": ["run", str(study), "--quiet", "--no-report", "--resume", str(run_dir)]}[command]
    _refused(_evalhost(args, toy_env))


def test_manifest_that_is_a_fifo_is_refused_not_waited_on(toy_run, toy_env):
    _, run_dir = toy_run
    (run_dir / "manifest.json").unlink()
    os.mkfifo(run_dir / "manifest.json")
    _refused(_evalhost(["validate", str(run_dir)], toy_env), "regular file")


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/evalhost-absolute-escape", "a/b"])
def test_run_directory_stays_directly_under_output_dir(tmp_path, toy_env, name):
    """The study loader refuses such names too (input hardening); the run loop checks again where it makes the
    directory, so no caller that builds a Study in code can place a run elsewhere."""
    tasks = write_tasks(tmp_path / "tasks.jsonl", 2)
    out = tmp_path / "deep" / "runs"
    path = tmp_path / "study.toml"
    path.write_text(study_text(tasks, out, (2,)))
    study = dataclasses.replace(load_study(path), name=name)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(UserError, match="outside output_dir|cannot create a run directory"):
        run_study(study, progress=False, report=False, out=lambda s: None)
    assert set(tmp_path.rglob("*")) - before <= {out, out.parent}, "something was created outside output_dir"
    assert not Path("/tmp/evalhost-absolute-escape").exists()


def test_output_dir_that_is_a_file_is_one_sentence(tmp_path, toy_env):
    tasks = write_tasks(tmp_path / "tasks.jsonl", 2)
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    path = tmp_path / "study.toml"
    path.write_text(study_text(tasks, afile, (2,)))
    proc = _evalhost(["run", str(path), "--quiet", "--no-report"], toy_env)
    _refused(proc, "output_dir")
    assert afile.read_text() == "not a directory\n"


def test_a_managed_server_never_appends_its_log_through_a_link(tmp_path):
    """A received run directory may hold `server-*.log` as a link; a resume starting the server must refuse it and
    leave the link's target untouched (issue 18: no file of a run directory is opened through a symlink)."""
    import sys

    from evalhost.errors import UserError
    from evalhost.plugins.backends.server import ManagedServer, free_port

    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    log = tmp_path / "server-vllm.log"
    log.symlink_to(target)
    server = ManagedServer([sys.executable, "-c", "import time; time.sleep(60)"], port=free_port(), log_path=log,
                           startup_timeout_s=5, log=lambda m: None)
    with pytest.raises(UserError, match="symbolic link"):
        server.start()
    assert target.read_text() == "precious\n"
    assert server.proc is None
