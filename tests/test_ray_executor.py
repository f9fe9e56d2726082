"""The ``ray`` executor on a real local Ray instance (2 CPUs, no dashboard, 127.0.0.1), with the toy backend
installed as a real entry-point distribution (Ray workers are separate processes: the executor hands them the
driver's sys.path). One actor per (model, backend); an actor killed mid-run is restarted and re-issued without
losing or duplicating a record; ray runs resume with ``local``; dry-run prints the resource plan; without Ray the
executor refuses with one sentence."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from evalhost import registry as reg_mod
from evalhost.records import read_records
from evalhost.run_worker import BackendStarted, GroupDone
from evalhost.runner import run_file
from evalhost.validate import validate_run
from toy import make_distribution, write_tasks

pytest.importorskip("ray")

import evalhost.plugins.executors.ray as rx  # noqa: E402

RAY_OPTS = {"num_cpus": 2, "object_store_memory": 80 * 1024 * 1024}
MODELS = ("toy-a", "toy-b", "toy-c")


@pytest.fixture
def toy_env(toy_env):
    """The shared toy plugin fixture, plus: the executor must not leave Ray running."""
    yield toy_env
    import ray

    assert not ray.is_initialized(), "the executor left its Ray instance running"


def _study(tmp_path: Path, n_items: int = 12, batch_sizes=(2, 4), backend: str = 'name = "toy"',
           models=None, max_tokens: int = 16) -> Path:
    tasks = write_tasks(tmp_path / "tasks.jsonl", n_items)
    models = models or [(m, "none") for m in MODELS]
    model_text = "".join(f'\n[[models]]\nname = "{name}"\npath = "{path}"\n' for name, path in models)
    path = tmp_path / "study.toml"
    path.write_text(f"""
[study]
name = "raytoy"
seed = 11
output_dir = "{tmp_path / 'runs'}"

[sampling]
max_tokens = {max_tokens}
{model_text}
[[backends]]
{backend}

[[dispatchers]]
name = "prompt_list"
batch_sizes = {list(batch_sizes)}

[[tasks]]
name = "toyset"
source = "jsonl:{tasks}"
scorer = "toy_refusal"
""")
    return path


def _quiet(_msg: str) -> None:
    pass


def _outputs(run_dir: Path) -> list[tuple[str, str]]:
    return sorted((r["key"], r["output_sha256"]) for r in read_records(run_dir / "records.jsonl"))


def test_ray_gives_the_local_record_set_and_resumes_with_local(tmp_path, toy_env):
    study = _study(tmp_path)
    local = run_file(study, progress=False, report=False, out=_quiet)
    ray_dir = run_file(study, executor="ray", executor_options=dict(RAY_OPTS), progress=False, report=False,
                       out=_quiet)
    expected = _outputs(local)
    assert len(expected) == 3 * 12 * 3  # 3 models x 12 items x (solo + bs2 + bs4)
    assert _outputs(ray_dir) == expected
    assert validate_run(ray_dir)["errors"] == []

    manifest = json.loads((ray_dir / "manifest.json").read_text())
    facts = manifest["executor"]
    assert manifest["status"] == "complete"
    assert facts["executor"] == "ray" and facts["ray_version"]
    assert set(facts["nodes"]) == {f"{m}/toy" for m in MODELS}  # one actor per (model, backend)
    assert {n["ip"] for n in facts["nodes"].values()} == {"127.0.0.1"}
    assert facts["resources"] == {f"{m}/toy": {"num_cpus": 1} for m in MODELS}
    assert "restarts" not in facts
    # nothing executor-specific in the records: the same fields as a local run
    assert set(read_records(ray_dir / "records.jsonl")[0]) == set(read_records(local / "records.jsonl")[0])

    # an interrupted ray run (lose the last third of its records) is finished by the local executor
    path = ray_dir / "records.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[: len(lines) * 2 // 3]))
    run_file(study, resume=ray_dir, progress=False, report=False, out=_quiet)
    resumed = read_records(path)
    assert len(resumed) == len(expected) and len({r["key"] for r in resumed}) == len(expected)
    assert _outputs(ray_dir) == expected
    assert json.loads((ray_dir / "manifest.json").read_text())["executor"]["executor"] == "local"


def _ray_listeners() -> list[tuple[str, bool]]:
    """Listening TCP sockets of this process's descendants (the Ray instance the executor started), each with
    whether its address is loopback (``::ffff:127.0.0.1``, IPv4 mapped into IPv6, counts)."""
    import ipaddress

    import psutil

    def loopback(host: str) -> bool:
        ip = ipaddress.ip_address(host.split("%")[0])
        return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)

    pids = {p.pid for p in psutil.Process().children(recursive=True)}
    return [(f"{c.laddr.ip}:{c.laddr.port} (pid {c.pid})", loopback(c.laddr.ip))
            for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]


def test_killed_actor_is_restarted_and_nothing_is_lost_or_duplicated(tmp_path, toy_env, monkeypatch):
    import ray

    monkeypatch.setenv("EVALHOST_TOY_DELAY", "0.1")  # inherited by the Ray workers: groups take a while
    study = _study(tmp_path)
    delivered: list = []
    killed: dict = {}
    listeners: list[str] = []
    logs: list[str] = []
    real_run = rx.RayExecutor.run

    def spying_run(self, works, sampling, context, skip, on_event):
        real_log = context.log

        def log(msg):
            logs.append(msg)
            real_log(msg)

        context.log = log

        def spy(event):
            delivered.append(event)
            groups = [e for e in delivered if isinstance(e, GroupDone)]
            if not killed and len(groups) == 5:
                listeners.extend(_ray_listeners())
                label = f"{event.job.model.name}/{event.job.backend.label}"
                actor = ray.get_actor(rx.actor_name(context.run_dir, label), namespace=rx.NAMESPACE)
                pid = ray.get(actor.info.remote(), timeout=60)["pid"]
                os.kill(pid, signal.SIGKILL)  # the actor's worker process dies mid-work
                killed.update(label=label, pid=pid, actor=actor)
            on_event(event)

        return real_run(self, works, sampling, context, skip, spy)

    monkeypatch.setattr(rx.RayExecutor, "run", spying_run)
    run_dir = run_file(study, executor="ray", executor_options=dict(RAY_OPTS), progress=False, report=False,
                       out=_quiet)
    monkeypatch.setattr(rx.RayExecutor, "run", real_run)
    local = run_file(study, progress=False, report=False, out=_quiet)

    assert killed, "the test never killed an actor"
    # the executor itself delivered every group exactly once (not relying on the driver's duplicate filter)
    keys = [k for e in delivered if isinstance(e, GroupDone) for k in e.job.keys()]
    dup = [k for k, n in Counter(keys).items() if n > 1]
    assert dup == []
    assert sorted(set(keys)) == sorted(k for k, _ in _outputs(local))
    # the killed actor came back (a second BackendStarted) and its unfinished groups were re-issued
    started = Counter(e.label for e in delivered if isinstance(e, BackendStarted))
    assert started[killed["label"]] == 2 and sum(started.values()) == 4
    reissued = [line for line in logs if "re-issued" in line]
    assert len(reissued) == 1 and killed["label"] in reissued[0], logs
    # the records: complete, no duplicate, identical outputs to the local run
    records = read_records(run_dir / "records.jsonl")
    assert len({r["key"] for r in records}) == len(records)
    assert _outputs(run_dir) == _outputs(local)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["executor"]["restarts"] == {killed["label"]: 1}
    assert validate_run(run_dir)["errors"] == []
    # the private Ray instance listened on loopback only
    assert listeners and all(ok for _, ok in listeners), [s for s, ok in listeners if not ok]


CLOSING_PLUGIN = """
import os
from pathlib import Path

from evalhost.hookspecs import hookimpl
from evalhost_toy import ToyBackend


class ClosingToy(ToyBackend):
    def close(self):
        Path(self.context.run_dir, "closed-" + self.model.name).write_text(str(os.getpid()))


@hookimpl
def register_backends(register):
    register("toyclose", ClosingToy)
"""


def test_an_interrupted_ray_run_closes_its_backends_and_resumes_with_local(tmp_path, toy_env, monkeypatch):
    plugin = tmp_path / "closing_src.py"
    plugin.write_text(CLOSING_PLUGIN)
    make_distribution(toy_env, name="evalhost-toyclose", module="evalhost_toyclose", source=plugin, entry="toyclose")
    reg_mod._REGISTRY = None
    monkeypatch.setenv("EVALHOST_TOY_DELAY", "0.1")
    study = _study(tmp_path, backend='name = "toyclose"')
    started: list[str] = []
    real_run = rx.RayExecutor.run

    def interrupting_run(self, works, sampling, context, skip, on_event):
        def spy(event):
            if isinstance(event, BackendStarted):
                started.append(event.label.split("/")[0])
            elif len(started) >= 2:
                raise KeyboardInterrupt("the user pressed Ctrl-C")
            on_event(event)

        return real_run(self, works, sampling, context, skip, spy)

    monkeypatch.setattr(rx.RayExecutor, "run", interrupting_run)
    with pytest.raises(KeyboardInterrupt):
        run_file(study, executor="ray", executor_options=dict(RAY_OPTS), progress=False, report=False, out=_quiet)
    monkeypatch.setattr(rx.RayExecutor, "run", real_run)
    run_dir = next((tmp_path / "runs").iterdir())
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"
    # every backend that had started was closed inside its actor before the actor was killed
    assert len(started) >= 2
    closed = {p.name.removeprefix("closed-") for p in run_dir.glob("closed-*")}
    assert set(started) <= closed, (started, closed)
    partial = read_records(run_dir / "records.jsonl")
    assert len(partial) < 3 * 12 * 3
    run_file(study, resume=run_dir, progress=False, report=False, out=_quiet)
    records = read_records(run_dir / "records.jsonl")
    assert len(records) == 3 * 12 * 3 and len({r["key"] for r in records}) == len(records)


def test_a_resource_no_node_has_is_refused_not_waited_for(tmp_path, toy_env, monkeypatch):
    from evalhost.errors import UserError
    from evalhost_toy import ToyBackend

    monkeypatch.setattr(ToyBackend, "resources", lambda self: {"num_cpus": 1, "num_gpus": 1}, raising=False)
    with pytest.raises(UserError, match=r"asks Ray for num_cpus=1, num_gpus=1, which no node"):
        run_file(_study(tmp_path, n_items=4), executor="ray", executor_options=dict(RAY_OPTS), progress=False,
                 report=False, out=_quiet)


@pytest.mark.cpu_only
def test_a_user_error_inside_an_actor_reaches_the_user_as_one_sentence(tmp_path, toy_env):
    from evalhost.errors import UserError

    # the plan accepts it; the backend's preflight, in the actor, refuses a CUDA device on a machine without one
    study = _study(tmp_path, n_items=2, backend='name = "hf"\noptions = { device = "cuda" }',
                   models=[("m", "builtin:smollm2-135m-instruct")])
    study.write_text(study.read_text().replace("toy_refusal", "refusal"))
    with pytest.raises(UserError, match=r"^backend 'hf' option device = 'cuda', but no CUDA GPU is available") as info:
        run_file(study, executor="ray", executor_options=dict(RAY_OPTS), progress=False, report=False, out=_quiet)
    assert type(info.value) is UserError  # the backend's own error, not Ray's wrapper


def test_actor_options_map_backend_resources():
    assert rx.actor_options({"num_gpus": 0.25}) == {"num_gpus": 0.25}
    assert rx.actor_options({"num_cpus": 2, "memory": 2**30, "a100": 1}) == {
        "num_cpus": 2, "memory": 2**30, "resources": {"a100": 1}}


def test_bad_executor_options_are_one_sentence():
    from evalhost.errors import UserError

    with pytest.raises(UserError, match="unknown ray executor option 'max_restart'"):
        rx.RayExecutor({"max_restart": 2})
    with pytest.raises(UserError, match="max_restarts must be 0 or more"):
        rx.RayExecutor({"max_restarts": -1})


def test_an_address_nobody_listens_on_fails_fast(tmp_path, toy_env):
    from evalhost.errors import UserError

    with pytest.raises(UserError, match=r"no Ray cluster answers at 127\.0\.0\.1:1 "):
        run_file(_study(tmp_path, n_items=2), executor="ray", executor_options={"address": "127.0.0.1:1"},
                 progress=False, report=False, out=_quiet)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_joins_a_cluster_started_with_ray_start(tmp_path, toy_env):
    """`ray start --head` as an operator would (here on loopback, with an auth token), then `evalhost run
    --executor ray --address` in another process; the run disconnects and leaves the cluster up."""
    import secrets
    import socket
    import time

    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PYTHONPATH": str(toy_env)}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--object-store-memory=83886080",
                             "--disable-usage-stats"], env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    study = _study(tmp_path, n_items=4)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and head.poll() is None, "ray start --head did not come up"
                time.sleep(0.5)
        proc = _cli(["run", str(study), "--executor", "ray", "--address", f"127.0.0.1:{port}", "--quiet",
                     "--no-report"], env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert head.poll() is None  # the cluster is the operator's: still up after the run
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        # `ray start` records its cluster for later `ray.init()` calls; `ray stop` would remove it
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip() == f"127.0.0.1:{port}":
            current.unlink()
    run_dir = Path(proc.stdout.split("run directory: ")[1].split()[0])
    facts = json.loads((run_dir / "manifest.json").read_text())["executor"]
    assert facts["address"] == f"127.0.0.1:{port}" and set(facts["nodes"]) == {f"{m}/toy" for m in MODELS}
    assert _outputs(run_dir) == _outputs(run_file(study, progress=False, report=False, out=_quiet))


def _cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "evalhost.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_dry_run_prints_the_resource_plan(tmp_path):
    root = make_distribution(tmp_path / "site")
    study = _study(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = _cli(["run", str(study), "--executor", "ray", "--dry-run"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    for m in MODELS:
        assert f"ray: actor {m}/toy: 21 groups, 36 generations, asks num_cpus=1" in proc.stdout
    assert "all actors at once would ask num_cpus=3" in proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing ran, no run directory


def test_without_ray_the_executor_says_so_in_one_sentence(tmp_path):
    root = make_distribution(tmp_path / "site")
    shadow = tmp_path / "shadow" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'ray' (shadowed by the test)\")\n")
    study = _study(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(root)])}
    proc = _cli(["run", str(study), "--executor", "ray"], env, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {rx.MISSING_RAY}"
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
    # the plugin itself loads without Ray (it imports ray only when used)
    plugins = _cli(["plugins", "--json"], env, tmp_path)
    listing = json.loads(plugins.stdout)
    assert {"kind": "executor", "name": "ray"}.items() <= next(
        p for p in listing["plugins"] if p["kind"] == "executor" and p["name"] == "ray").items()
    assert not [p for p in listing["problems"] if "ray" in p]


@pytest.mark.slow
def test_hf_backend_three_groups_under_ray_match_local(tmp_path, toy_env, small_model_path):
    models = [(f"smol-{c}", "builtin:smollm2-135m-instruct") for c in "abc"]
    study = _study(tmp_path, n_items=4, batch_sizes=(2,), backend='name = "hf"\noptions = { device = "cpu" }',
                   models=models, max_tokens=8)
    local = run_file(study, progress=False, report=False, out=_quiet)
    ray_dir = run_file(study, executor="ray", executor_options=dict(RAY_OPTS), progress=False, report=False,
                       out=_quiet)
    expected = _outputs(local)
    assert len(expected) == 3 * 4 * 2
    assert _outputs(ray_dir) == expected
    facts = json.loads((ray_dir / "manifest.json").read_text())["executor"]
    assert set(facts["nodes"]) == {f"smol-{c}/hf" for c in "abc"}
