"""Host safety: no shell, servers on 127.0.0.1 only, API keys never written down, run directories never overwritten.

* ``shell=True`` (or another shell-spawning call) appears nowhere in ``core/`` and ``plugins/`` (checked on the AST).
* A managed server (the ``vllm`` backend's own :class:`ManagedServer` path, with ``tests/fake_server.py`` in place of
  the vLLM binary but the host and port taken from the backend's real argv builder) listens on 127.0.0.1 only,
  checked on the live process's sockets; ``--host`` cannot be overridden through ``extra_args``.
* A study on the ``openai`` backend against the fake server, which *requires* the key (so the run only completes if
  the key was sent), leaves no trace of the key in any file of the run directory (records, manifest, study copy,
  report, logs) or in the CLI's output — also when the key is wrong and the run fails.
* Two runs of one study get two directories (also within the same second, and next to a directory of the same name
  made by someone else); ``--resume`` of a directory that is not a run directory is refused with one clear line and
  writes nothing there.
"""
from __future__ import annotations

import ast
import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import psutil
import pytest

from evalhost.records import read_records
from toy import study_text, write_tasks

REPO = Path(__file__).resolve().parents[1]
FAKE_SERVER = Path(__file__).with_name("fake_server.py")
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("os", "spawnlp"), ("subprocess", "getoutput"),
               ("subprocess", "getstatusoutput"), ("pty", "spawn")}


# ------------------------------------------------------------------------------------------------ no shell
def shell_uses(source: str, filename: str) -> list[str]:
    """Every call with a ``shell=`` keyword that is not literally False, and every call of a shell-spawning helper."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{filename}:{node.lineno}: shell={ast.unparse(kw.value)}")
            if kw.arg is None:  # **kwargs could smuggle shell=True in; flag dict literals that do
                if isinstance(kw.value, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "shell"
                                                          for k in kw.value.keys):
                    found.append(f"{filename}:{node.lineno}: **{{'shell': ...}}")
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if (func.value.id, func.attr) in SHELL_CALLS:
                found.append(f"{filename}:{node.lineno}: {func.value.id}.{func.attr}()")
    return found


def test_the_shell_detector_finds_what_it_looks_for():
    bad = ("import subprocess, os\nsubprocess.run('ls', shell=True)\nsubprocess.Popen(x, shell=flag)\n"
           "os.system('ls')\nsubprocess.call(a, **{'shell': True})\n")
    assert len(shell_uses(bad, "bad.py")) == 4
    assert shell_uses("import subprocess\nsubprocess.run(['ls'], shell=False)\nsubprocess.run(['ls'])\n", "ok.py") == []


def test_no_shell_anywhere_in_core_and_plugins():
    files = sorted(p for d in ("core", "plugins") for p in (REPO / d).rglob("*.py"))
    assert len(files) > 20, "the scan found too few source files; is REPO right?"
    found = [hit for p in files for hit in shell_uses(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert found == [], "shell use in evalhost source:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------------------ 127.0.0.1 only
def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket in LISTEN state held by ``pid`` or its children."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    out = set()
    for proc in procs:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                out.add((conn.laddr.ip, conn.laddr.port))
    return out


def _wait_listening(pid: int, timeout: float = 30.0) -> set[tuple[str, int]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = listening_addresses(pid)
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"process {pid} never listened")


def test_the_socket_check_sees_a_server_on_all_interfaces(tmp_path):
    """Negative control: the same check reports 0.0.0.0 for a server that binds every interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(FAKE_SERVER), "--host", "0.0.0.0", "--port", str(port),
                             "--state", str(tmp_path / "state")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_listening(proc.pid) == {("0.0.0.0", port)}
    finally:
        proc.kill()
        proc.wait()


def _fake_vllm_backend_class():
    from evalhost.plugins.backends.vllm import VLLMBackend

    class FakeServedVLLM(VLLMBackend):
        """The real vllm backend (argv builder, ManagedServer, client); only the executable is the fake server."""

        def server_argv(self, port: int) -> list[str]:
            args = self.server_args(port)  # the real argv builder decides host and port
            host, chosen = args[args.index("--host") + 1], args[args.index("--port") + 1]
            return [sys.executable, str(FAKE_SERVER), "--host", host, "--port", chosen,
                    "--state", str(Path(self.context.run_dir) / "fake-state")]

    return FakeServedVLLM


def test_vllm_argv_binds_loopback_and_refuses_host_overrides(small_model):
    from evalhost.errors import UserError
    from evalhost.plugins.backends.vllm import VLLMBackend, VLLMInvariantBackend
    from evalhost.types import RunContext

    for cls in (VLLMBackend, VLLMInvariantBackend):
        backend = cls(small_model, {"extra_args": ["--enforce-eager"]}, RunContext(Path("."), Path(".")))
        args = backend.server_args(12345)
        assert args.count("--host") == 1 and args[args.index("--host") + 1] == "127.0.0.1"
        assert not any(a.startswith("--host=") for a in args)
        for bad in (["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--port", "80"]):
            with pytest.raises(UserError, match="must not contain"):
                cls.check_options({"extra_args": bad})


def test_managed_server_listens_on_127_0_0_1_only(tmp_path, small_model):
    from evalhost.plugins.backends.server import port_in_use
    from evalhost.types import RunContext, Sampling

    logs: list[str] = []
    context = RunContext(run_dir=tmp_path, cache_dir=tmp_path / "cache", log=logs.append)
    backend = _fake_vllm_backend_class()(small_model, {"chat_template": False, "startup_timeout_s": 60}, context)
    backend.start()
    try:
        server = backend.server
        assert server.host == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
        assert server.argv[server.argv.index("--host") + 1] == "127.0.0.1"
        listening = _wait_listening(server.proc.pid)
        assert listening == {("127.0.0.1", server.port)}, f"the managed server listens on {listening}"
        # and it really is the server the backend talks to
        assert backend.generate(["hello there"], Sampling(max_tokens=4))[0].text == "echo:" + "hello there"[:12]
    finally:
        backend.close()
    assert not port_in_use(server.port), "the server's port is still taken after close()"


# ------------------------------------------------------------------------------------------------ API keys
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_openai(tmp_path):
    """The fake server, requiring the key ``secret`` and failing its 5th completions request with HTTP 500 (so the
    client's retry/log path runs too: requests 1-3 are the backend's start-up probes of token ids, prompt lists and
    streaming, so the 5th is a generation)."""
    secret = f"sk-evalhost-sentinel-{uuid.uuid4().hex}"
    port = _free_port()
    log = (tmp_path / "fake-server.log").open("w")
    proc = subprocess.Popen([sys.executable, str(FAKE_SERVER), "--port", str(port), "--state",
                             str(tmp_path / "fake-state"), "--require-key", secret, "--fail-500-on", "5"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(proc.pid)
        yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}", secret=secret)
    finally:
        proc.kill()
        proc.wait()
        log.close()


def _openai_study(tmp_path: Path, url: str) -> Path:
    tasks = write_tasks(tmp_path / "tasks.jsonl", 6)
    study = tmp_path / "openai.toml"
    study.write_text(f"""
[study]
name = "keys"
seed = 1
output_dir = "{tmp_path / 'runs'}"

[sampling]
max_tokens = 8

[[models]]
name = "remote"
path = "none"

[[backends]]
name = "openai"
options = {{ base_url = "{url}/v1", model = "fake-model", api_key_env = "EVALHOST_TEST_API_KEY", chat_template = false, max_retries = 3, backoff_s = 0.05 }}

[[dispatchers]]
name = "prompt_list"
batch_sizes = [2]

[[dispatchers]]
name = "synchronized"
batch_sizes = [3]

[[tasks]]
name = "keyset"
source = "jsonl:{tasks}"
scorer = "refusal"
""")
    return study


def _files_containing(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_api_key_is_never_written_to_records_manifest_report_or_logs(tmp_path, fake_openai):
    study = _openai_study(tmp_path, fake_openai.url)
    env = {**os.environ, "EVALHOST_TEST_API_KEY": fake_openai.secret}
    done = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(study), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run_dir = Path(done.stdout.split("run directory: ")[1].split()[0])
    records = read_records(run_dir / "records.jsonl")
    assert len(records) == 6 * 3  # solo + prompt_list bs2 + synchronized bs3: the key was sent and accepted
    assert any(r["attempts"] > 1 for r in records), "the injected HTTP 500 did not exercise the retry path"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    fp = next(iter(manifest["fingerprints"].values()))
    assert fp["api_key_env"] == "EVALHOST_TEST_API_KEY"  # the variable's name is provenance; its value is not
    written = sorted(p.name for p in run_dir.rglob("*") if p.is_file())
    assert {"records.jsonl", "manifest.json", "study.toml", "report.md"} <= set(written), written
    assert _files_containing(run_dir, fake_openai.secret) == []
    assert _files_containing(run_dir, fake_openai.secret[-16:]) == []  # not even part of it
    assert fake_openai.secret not in done.stdout + done.stderr


def test_a_rejected_api_key_is_not_echoed_in_the_error_or_the_run_directory(tmp_path, fake_openai):
    study = _openai_study(tmp_path, fake_openai.url)
    wrong = f"sk-evalhost-wrong-{uuid.uuid4().hex}"
    env = {**os.environ, "EVALHOST_TEST_API_KEY": wrong}
    done = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(study), "--quiet", "--no-report"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "401" in done.stderr and "Traceback" not in done.stderr
    assert wrong not in done.stdout + done.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    assert json.loads((run_dir / "manifest.json").read_text())["status"].startswith("stopped")
    assert _files_containing(run_dir, wrong) == []


# ------------------------------------------------------------------------------------------------ run directories
def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_two_runs_in_the_same_second_get_two_directories(tmp_path, toy_env, monkeypatch):
    from evalhost import runner

    frozen = datetime.datetime(2031, 2, 3, 4, 5, 6)
    monkeypatch.setattr(runner, "dt", types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda: frozen)))
    tasks = write_tasks(tmp_path / "tasks.jsonl", 6)
    study = tmp_path / "study.toml"
    study.write_text(study_text(tasks, tmp_path / "runs", (2,)))
    # someone else's directory with the name the first run would take
    squatter = tmp_path / "runs" / "toy-20310203-040506"
    squatter.mkdir(parents=True)
    (squatter / "notes.txt").write_text("mine")

    first = runner.run_file(study, progress=False, report=False, out=lambda s: None)
    first_tree = _tree(first)
    second = runner.run_file(study, progress=False, report=False, out=lambda s: None)
    assert len({squatter, first, second}) == 3
    assert first.parent == second.parent == squatter.parent
    assert _tree(squatter) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    assert _tree(first) == first_tree, "the second run changed the first run's directory"
    assert len(read_records(second / "records.jsonl")) == 6 * 2


def test_resume_of_a_directory_that_is_not_a_run_is_refused_and_untouched(tmp_path, toy_env):
    tasks = write_tasks(tmp_path / "tasks.jsonl", 4)
    study = tmp_path / "study.toml"
    study.write_text(study_text(tasks, tmp_path / "runs", (2,)))
    plain = tmp_path / "my-documents"
    plain.mkdir()
    (plain / "thesis.txt").write_text("do not touch")
    missing = tmp_path / "no-such-run"
    env = {**os.environ, "PYTHONPATH": str(toy_env)}
    for target in (plain, missing):
        before = _tree(plain)
        done = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(study), "--quiet", "--no-report",
                               "--resume", str(target)], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if not line.startswith("warning: plugin")]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "not an evalhost run directory" in lines[0], \
            done.stderr
        assert _tree(plain) == before
        assert not missing.exists(), "--resume created the directory it was asked to resume"
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), \
            "a refused --resume started a new run directory instead"
