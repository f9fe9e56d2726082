"""Batch groups on an engine fleet (issue 20, goal 2) and the fleet spread over GPUs (issue 21, item 3).

The ``vllm`` backend with ``urls = [...]`` attaches to N running servers (here fake ones: ``evalhost.testing.
FakeServer`` with a fixed per-request latency, so that groups last long enough to overlap); ``replicas = N``
managed servers are the fake server too (the ``FakeFleet`` of test_solo_fleet.py) where a replica must die and be
restarted. What is asserted:

* batch groups (prompt_list, synchronized, continuous) are spread over the replicas, and no server ever had requests
  of two groups in flight at once (from the fake servers' own request logs: start, end and prompt digests);
* the records are those of a one-replica run (every field but the run's timings and evidence), in the same order;
* a group whose co-batching verdict is not ``verified`` is flagged (``fleet.cobatch_as_planned = false``), not
  counted;
* a replica that dies mid-run: a managed one is restarted and the run completes; an attached one fails the run
  clearly, and the resume (server back) leaves every record exactly once;
* option ``devices``: the managed servers' ``CUDA_VISIBLE_DEVICES`` and ``--gpu-memory-utilization`` (no vLLM).
"""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from evalhost.api import hookimpl
from evalhost.errors import RunError, UserError
from evalhost.group_fleet import GroupFleet
from evalhost.plugins.backends.vllm import VLLMBackend
from evalhost.records import read_records
from evalhost.testing import FakeServer, register_module, run_study_in
from evalhost.types import ModelSpec, RunContext
from evalhost.validate import validate_run

LATENCY = 0.4  # long enough for the /metrics sampler to see a group running on loaded cores
# may differ between runs: the run, its timings and evidence, the stack (urls, replicas) and the replica in extra
SAME = ("run_id", "timings", "dispatch_evidence", "fingerprint_id", "backend_extra", "backend_config")


def write_tasks(path: Path, n: int) -> Path:
    with path.open("w") as fh:
        for i in range(n):  # distinct first 12 characters: the fake server echoes them
            fh.write(json.dumps({"id": f"q{i:03d}", "prompt": f"Q{i:03d} please tell me something.",
                                 "domain": "safety"}) + "\n")
    return path


def study(tmp_path: Path, backend_options: str, n_items: int = 12, dispatchers: str | None = None,
          backend: str = "vllm") -> str:
    tasks = write_tasks(tmp_path / "tasks.jsonl", n_items)
    checkpoint = tmp_path / "model"  # a model directory (the fake servers never read it; chat_template = false)
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "config.json").write_text("{}")
    dispatchers = dispatchers or """
[[dispatchers]]
name = "prompt_list"
batch_sizes = [4]

[[dispatchers]]
name = "synchronized"
batch_sizes = [3]
options = { metrics_interval_s = 0.05 }

[[dispatchers]]
name = "continuous"
batch_sizes = [3]
options = { delay_s = 0.1, filler_max_tokens = 4 }
"""
    return f"""
[study]
name = "fleet"
seed = 7

[sampling]
max_tokens = 8

[[models]]
name = "fake"
path = "{checkpoint}"

[[backends]]
name = "{backend}"
[backends.options]
chat_template = false
backoff_s = 0.05
request_timeout_s = 10
{backend_options}
{dispatchers}
[[tasks]]
name = "t"
source = "jsonl:{tasks}"
scorer = "refusal"
"""


def urls_option(servers: list[FakeServer]) -> str:
    return "urls = [" + ", ".join(f'"{s.url}"' for s in servers) + "]"


def requests_of(server: FakeServer) -> list[dict]:
    """The completions requests in a fake server's log: number, start, end, prompt digests."""
    starts, ends = {}, {}
    for line in server.log.read_text().splitlines():
        m = re.match(r"completions request #(\d+) start ([\d.]+) prompts (\S+)", line)
        if m:
            starts[int(m[1])] = (float(m[2]), set(m[3].split(",")))
        m = re.match(r"completions request #(\d+) end ([\d.]+)", line)
        if m:
            ends[int(m[1])] = float(m[2])
    return [{"n": n, "start": s, "end": ends[n], "prompts": p} for n, (s, p) in starts.items() if n in ends]


def groups_of(records) -> list[set[str]]:
    """Each group's prompt digests (first 12 hex digits, as the fake server logs them); fillers are not recorded."""
    groups: dict[tuple[str, str], set[str]] = {}
    for r in records:
        groups.setdefault((r["cell"], r["group_id"]), set()).add(r["prompt_sha256"][:12])
    return list(groups.values())


def assert_one_group_at_a_time(server: FakeServer, groups: list[set[str]]) -> int:
    """No two requests from different groups were in flight together on ``server`` (a request whose prompts are
    all unrecorded, a continuous group's filler, may go with any group). Returns the overlapping pairs seen."""
    reqs = sorted(requests_of(server), key=lambda r: r["start"])
    known = set().union(*groups)
    pairs = 0
    for i, a in enumerate(reqs):
        for b in reqs[i + 1:]:
            if b["start"] >= a["end"]:
                continue
            both = (a["prompts"] | b["prompts"]) & known
            pairs += 1
            assert any(both <= g for g in groups), (
                f"server {server.port}: requests #{a['n']} and #{b['n']} of different groups were in flight together")
    return pairs


@pytest.fixture
def servers(tmp_path):
    started: list[FakeServer] = []

    def make(n: int, **faults) -> list[FakeServer]:
        for _ in range(n):
            started.append(FakeServer(tmp_path / "servers", latency=LATENCY, **faults).start())
        return started[-n:]

    yield make
    for s in started:
        s.stop()


def comparable(records) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in SAME} for r in records]


# -- spreading, isolation, identity ----------------------------------------------------------------------------
def test_batch_groups_spread_over_replicas_one_group_at_a_time(tmp_path, servers):
    fleet = servers(3)
    records = run_study_in(tmp_path / "fleet", study(tmp_path, urls_option(fleet)))
    batch = [r for r in records if r["condition"] == "batch"]
    assert {r["dispatcher"] for r in batch} == {"prompt_list", "synchronized", "continuous"}
    used = {r["dispatch_evidence"].get("fleet", {}).get("replica") for r in batch}  # None: no fleet
    assert used == {0, 1, 2}, f"batch groups ran on replicas {used} only"
    assert all(r["dispatch_evidence"]["fleet"]["replicas"] == 3 for r in batch)
    for r in batch:
        fleet_ev, verdict = r["dispatch_evidence"]["fleet"], r["dispatch_evidence"]["cobatch"]["verdict"]
        assert fleet_ev["cobatch_verdict"] == verdict and fleet_ev["cobatch_as_planned"] == (verdict == "verified")
    for dispatcher in ("synchronized", "continuous"):  # their samplers read the group's own server's /metrics
        assert any(r["dispatch_evidence"]["cobatch"]["verdict"] == "verified" for r in batch
                   if r["dispatcher"] == dispatcher and r["dispatch_evidence"]["fleet"]["replica"] != 0)
    groups = groups_of(records)
    overlapping = sum(assert_one_group_at_a_time(s, groups) for s in fleet)
    assert overlapping > 0  # the check had requests in flight together to judge (a group's own)
    assert validate_run(records.run_dir)["errors"] == []


def test_records_identical_to_a_one_replica_run(tmp_path, servers):
    one = servers(1)
    single = run_study_in(tmp_path / "one", study(tmp_path, urls_option(one)), solo_cache=False)
    many = run_study_in(tmp_path / "many", study(tmp_path, urls_option(servers(4))), solo_cache=False)
    assert len(many) == len(single) > 0
    assert comparable(many) == comparable(single)  # the same records, in the same order
    assert all("fleet" not in r["dispatch_evidence"] for r in single)
    assert {r["dispatch_evidence"].get("fleet", {}).get("replica") for r in many
            if r["condition"] == "batch"} == {0, 1, 2, 3}


def test_a_group_not_verified_as_planned_is_flagged_and_not_counted(tmp_path, servers):
    no_metrics = """
[[dispatchers]]
name = "synchronized"
batch_sizes = [3]
options = { metrics = false }
"""
    records = run_study_in(tmp_path / "run", study(tmp_path, urls_option(servers(2)), 6, no_metrics))
    batch = [r for r in records if r["condition"] == "batch"]
    assert batch
    for r in batch:
        fleet, cobatch = r["dispatch_evidence"]["fleet"], r["dispatch_evidence"]["cobatch"]
        assert fleet["cobatch_planned"] == "verified" and fleet["cobatch_verdict"] == cobatch["verdict"]
        assert cobatch["verdict"] != "verified" and fleet["cobatch_as_planned"] is False
        assert cobatch["counted"] is False


# -- a replica that dies -----------------------------------------------------------------------------------------
def test_an_attached_replica_that_dies_fails_the_run_and_the_resume_completes_it(tmp_path, servers):
    reference = run_study_in(tmp_path / "ref", study(tmp_path, urls_option(servers(1))), solo_cache=False)
    # request 1 of each server is the token-id probe at start; replica 1 dies on a later one, mid-run
    fleet = [*servers(1), *servers(1, die_on=[6]), *servers(1)]
    toml = study(tmp_path, urls_option(fleet))
    with pytest.raises(RunError):
        run_study_in(tmp_path / "run", toml, solo_cache=False)
    run_dir = next((tmp_path / "run" / "runs").iterdir())
    first = read_records(run_dir / "records.jsonl")
    assert 0 < len(first) < len(reference)
    fleet[1].start()  # the user brings the server back (the request count, and so the fault, is past)
    resumed = run_study_in(tmp_path / "run", toml, solo_cache=False, resume=run_dir)
    keys = [r["key"] for r in resumed]
    assert len(keys) == len(set(keys)) == len(reference)  # nothing lost, nothing twice
    assert sorted(map(json.dumps, comparable(resumed))) == sorted(map(json.dumps, comparable(reference)))
    assert validate_run(run_dir)["errors"] == []


FAKE = Path(__file__).with_name("fake_server.py")


class FakeManagedFleet(VLLMBackend):
    """The vllm backend with managed replicas (start, restart, stop unchanged) whose server is the fake one."""

    die_on: dict[int, str] = {}

    def preflight(self) -> None:
        pass

    def server_args(self, port: int) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(port)]

    def server_argv(self, port: int) -> list[str]:
        index = int(self.label.rsplit("-r", 1)[1]) if "-r" in self.label else 0
        state = Path(self.context.run_dir) / f"requests-{self.label}.count"
        faults = ["--die-on", self.die_on[index]] if index in self.die_on else []
        return [sys.executable, str(FAKE), "--port", str(port), "--state", str(state), "--latency", str(LATENCY),
                *faults]


def test_a_managed_replica_that_dies_is_restarted_and_the_run_completes(tmp_path):
    cls = type("Dies", (FakeManagedFleet,), {"die_on": {1: "5"}})
    plugin = types.ModuleType("fake_managed_fleet")
    plugin.register_backends = hookimpl(lambda register: register("fakevllm", cls))
    options = 'replicas = 2\nstartup_timeout_s = 30\nstop_timeout_s = 5\nlabel = "fake"'
    with register_module(plugin):
        records = run_study_in(tmp_path / "run", study(tmp_path, options, backend="fakevllm"), solo_cache=False)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) and validate_run(records.run_dir)["errors"] == []
    restarted = [r for r in records if r["restarted"]]
    assert restarted and all(r["attempts"] >= 2 for r in restarted)
    assert records.manifest and (records.run_dir / "server-fake-r1.log").read_text().count("simulated crash") == 1
    assert {r["dispatch_evidence"]["fleet"]["replica"] for r in records if r["condition"] == "batch"} == {0, 1}
    assert all(r["output_text"] == f"echo:Q{r['item_id'][1:]} please " for r in records)


# -- GroupFleet's order and failure ------------------------------------------------------------------------------
def test_group_fleet_yields_in_submission_order_and_raises_a_failure_in_its_place():
    import threading
    import time

    running: dict[int, int] = {}
    lock = threading.Lock()

    def run(i, engine, payload):
        with lock:
            running[i] = running.get(i, 0) + 1
            assert running[i] == 1, "two payloads at once on one engine"
        time.sleep(0.02 * (payload % 3))
        with lock:
            running[i] -= 1
        if payload == 7:
            raise RuntimeError("group 7 failed")
        return payload * 10

    fleet = GroupFleet(["a", "b", "c"], run, window=4)
    got = []
    with pytest.raises(RuntimeError, match="group 7 failed"):
        for p in range(12):
            for _, r in fleet.submit(p):
                got.append(r)
        for _, r in fleet.drain():
            got.append(r)
    fleet.close()
    assert got == [p * 10 for p in range(7)]  # in order; everything before the failure, nothing after


# -- devices: replicas spread over GPUs (no vLLM started) --------------------------------------------------------
def ctx(tmp_path: Path) -> RunContext:
    return RunContext(run_dir=tmp_path, cache_dir=tmp_path / "cache", log=lambda _m: None)


def model(tmp_path: Path) -> ModelSpec:
    (tmp_path / "config.json").write_text("{}")
    return ModelSpec(name="m", path=str(tmp_path))


def util(args: list[str]) -> str:
    return args[args.index("--gpu-memory-utilization") + 1]


def test_devices_option_checked():
    VLLMBackend.check_options({"replicas": 4, "devices": [0, 1]})
    for bad in ([], [-1], [0, 0], ["0"], [True]):
        with pytest.raises(UserError, match="devices must be a non-empty list of distinct GPU indices"):
            VLLMBackend.check_options({"replicas": 2, "devices": bad})
    with pytest.raises(UserError, match="devices places the servers evalhost starts"):
        VLLMBackend.check_options({"urls": ["http://a:1", "http://b:2"], "devices": [0, 1]})


def test_devices_set_each_replicas_gpu_and_memory_share(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    b = VLLMBackend(model(tmp_path), {"replicas": 3, "devices": [0, 1], "gpu_memory_utilization": 0.8},
                    ctx(tmp_path))
    assert [b.replica_device(i) for i in range(3)] == ["0", "1", "0"]
    assert [b.util_share(i) for i in range(3)] == [0.4, 0.8, 0.4]  # replica 1 is alone on GPU 1
    assert b.server_env()["CUDA_VISIBLE_DEVICES"] == "0" and util(b.server_args(9000)) == "0.4"
    assert b._replica_options(1)["gpu_memory_utilization"] == 0.8 and "devices" not in b._replica_options(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # indices count the GPUs this process sees
    assert [b.replica_device(i) for i in range(3)] == ["4", "6", "4"]
    plain = VLLMBackend(model(tmp_path), {"replicas": 2, "gpu_memory_utilization": 0.8}, ctx(tmp_path))
    assert plain.device_list() is None and "CUDA_VISIBLE_DEVICES" not in plain.server_env()  # CPU: as before
    assert util(plain.server_args(9000)) == "0.4"


def test_devices_default_to_every_visible_gpu_on_cuda(tmp_path, monkeypatch):
    import evalhost.plugins.backends.vllm.options as options

    monkeypatch.setattr(options, "cuda_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    b = VLLMBackend(model(tmp_path), {"replicas": 4, "gpu_memory_utilization": 0.8}, ctx(tmp_path))
    assert b.device_list() == [0, 1] and [b.replica_device(i) for i in range(4)] == ["2", "3", "2", "3"]
    assert b.util_share(0) == 0.4
    assert VLLMBackend(model(tmp_path), {"replicas": 1}, ctx(tmp_path)).device_list() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # one GPU: nothing to spread, the environment is left alone
    assert b.device_list() is None and b.util_share(1) == 0.2
    with pytest.raises(UserError, match=r"devices = \[0, 1\] names GPU 1, but this process sees 1 GPU"):
        VLLMBackend(model(tmp_path), {"replicas": 2, "devices": [0, 1]}, ctx(tmp_path)).device_list()


def test_managed_replicas_start_with_their_gpu(tmp_path, monkeypatch):
    """The servers' processes really get their CUDA_VISIBLE_DEVICES (read back from /proc)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fleet = FakeManagedFleet(ModelSpec(name="fake", path=str(tmp_path)),
                             {"replicas": 3, "devices": [1, 0], "startup_timeout_s": 30, "stop_timeout_s": 5,
                              "label": "fake"}, ctx(tmp_path))
    try:
        fleet.start()
        seen = []
        for r in fleet.replicas():
            env = dict(kv.split("=", 1) for kv in
                       Path(f"/proc/{r.server.proc.pid}/environ").read_text().split("\0") if "=" in kv)
            seen.append(env.get("CUDA_VISIBLE_DEVICES"))
        assert seen == ["1", "0", "1"]
        assert fleet.evidence()["solo_fleet"]["cuda_visible_devices"] == ["1", "0", "1"]
        assert [len(fleet.fleet()), fleet.fleet()[0]] == [3, fleet]
    finally:
        fleet.close()


def test_a_ray_actor_asks_for_one_gpu_per_device_of_its_fleet(tmp_path, monkeypatch):
    """Under the ray executor a fleet spread over ``devices`` must own those GPUs: its actor asks Ray for one GPU
    per distinct device (Ray then sets the actor's CUDA_VISIBLE_DEVICES to them); one engine asks for one."""
    import evalhost.plugins.backends.vllm as vllm_pkg

    monkeypatch.setattr(vllm_pkg, "cuda_available", lambda: True)
    spread = VLLMBackend(model(tmp_path), {"replicas": 4, "devices": [0, 1]}, ctx(tmp_path))
    assert spread.resources() == {"num_cpus": 1, "num_gpus": 2}
    assert VLLMBackend(model(tmp_path), {"replicas": 4}, ctx(tmp_path)).resources() == {"num_cpus": 1, "num_gpus": 1}
    monkeypatch.setattr(vllm_pkg, "cuda_available", lambda: False)
    assert spread.resources() == {"num_cpus": 1}
