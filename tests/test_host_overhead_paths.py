"""Host-side costs of the dispatch paths (issue 20, goal 1), as behavioural counts, never timings: how often the run
loop fsyncs its records, how many HTTP clients the engine-metrics sampler makes, how many requests share one
connection pool. The real ``openai`` backend talks to :class:`evalhost.testing.FakeServer`, which answers at once."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import httpcore
import pytest

from evalhost import records
from evalhost.testing import FakeServer, run_study_in


def study(tasks: Path, url: str, dispatcher: str = "") -> str:
    return f"""
[study]
name = "paths"
seed = 3

[sampling]
max_tokens = 8

[[models]]
name = "m"
path = "none"

[[backends]]
name = "openai"
[backends.options]
base_url = "{url}"
model = "m"
chat_template = false
{dispatcher}
[[tasks]]
name = "t"
source = "jsonl:{tasks}"
scorer = "refusal"
"""


def write_tasks(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i:03d}", "prompt": f"Question {i}: say something.",
                                        "domain": "safety"}) + "\n" for i in range(n)))
    return path


def count_record_fsyncs(monkeypatch) -> list[int]:
    """fsyncs of a file named records.jsonl, counted through os.fsync (the real call still runs)."""
    calls: list[int] = []
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/records.jsonl"):
            calls.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


@pytest.fixture()
def server(tmp_path):
    with FakeServer(tmp_path / "server") as srv:
        yield srv


def test_a_solo_cell_is_not_fsynced_once_per_record(tmp_path, server, monkeypatch):
    """A solo cell is one dispatch group per record: it used to pay one fsync per record (4 ms each on the shared
    CPU VM, more than the HTTP round trip). Now group_done fsyncs only when the last fsync is SYNC_INTERVAL_S old
    (here set far away), and close always does: one fsync for the whole run, every record on disk."""
    monkeypatch.setattr(records, "SYNC_INTERVAL_S", 3600.0, raising=False)
    fsyncs = count_record_fsyncs(monkeypatch)
    recs = run_study_in(tmp_path, study(write_tasks(tmp_path / "t.jsonl", 12), server.url), solo_cache=False)
    assert len(recs) == 12 and {r["condition"] for r in recs} == {"solo"}
    assert len(fsyncs) == 1, f"{len(fsyncs)} fsyncs of records.jsonl for 12 solo records"


def test_with_no_interval_every_group_is_fsynced_once(tmp_path, server, monkeypatch):
    """SYNC_INTERVAL_S = 0 gives the old contract back: one fsync per dispatch group (not per record), plus close."""
    monkeypatch.setattr(records, "SYNC_INTERVAL_S", 0.0, raising=False)
    fsyncs = count_record_fsyncs(monkeypatch)
    sync = '[[dispatchers]]\nname = "synchronized"\nbatch_sizes = [4]\n[dispatchers.options]\nmetrics = false\n'
    recs = run_study_in(tmp_path, study(write_tasks(tmp_path / "t.jsonl", 8), server.url, sync), solo_cache=False)
    groups = {r["group_id"] for r in recs}
    assert len(recs) == 16 and len(groups) == 8 + 2
    assert len(fsyncs) == len(groups) + 1


def test_records_reach_the_file_at_once_though_fsync_waits(tmp_path, server, monkeypatch):
    """What kill -9 keeps: each group's records are written (to the page cache, which outlives the process) before
    the next group is sent, fsynced or not. Read the file from another descriptor at every request."""
    monkeypatch.setattr(records, "SYNC_INTERVAL_S", 3600.0, raising=False)
    from evalhost.plugins.backends.openai import OpenAIBackend

    seen: list[int] = []
    real = OpenAIBackend.generate

    def generate(self, prompts, sampling):
        path = Path(self.context.run_dir) / "records.jsonl"
        seen.append(path.read_bytes().count(b"\n") if path.exists() else 0)
        return real(self, prompts, sampling)

    monkeypatch.setattr(OpenAIBackend, "generate", generate)
    run_study_in(tmp_path, study(write_tasks(tmp_path / "t.jsonl", 6), server.url), solo_cache=False)
    assert seen == [0, 1, 2, 3, 4, 5]


def count_async_clients(monkeypatch) -> list[int]:
    made: list[int] = []
    real = httpx.AsyncClient.__init__

    def init(self, *a, **k):
        made.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(httpx.AsyncClient, "__init__", init)
    return made


def test_metrics_scrapes_do_not_make_a_client_each(tmp_path, server, monkeypatch):
    """The synchronized dispatcher samples /metrics while each group runs. Each scrape used to build a new
    httpx.AsyncClient (and with it an SSL context: 57 ms of CPU on the shared VM, on the loop sending the group).
    Now the clients a run makes do not grow with its groups: a run of 8 groups makes as many as a run of 2."""
    sync = ('[[dispatchers]]\nname = "synchronized"\nbatch_sizes = [2]\n[dispatchers.options]\nmetrics = true\n'
            'metrics_interval_s = 0.01\n')
    made = count_async_clients(monkeypatch)
    small = run_study_in(tmp_path / "a", study(write_tasks(tmp_path / "a.jsonl", 4), server.url, sync),
                         solo_cache=False)
    n_small = len(made)
    made.clear()
    big = run_study_in(tmp_path / "b", study(write_tasks(tmp_path / "b.jsonl", 16), server.url, sync),
                       solo_cache=False)
    scrapes = {r["group_id"]: len(r["dispatch_evidence"]["running_samples"]) for r in big
               if r["condition"] == "batch"}
    assert len(scrapes) == 8 and all(n >= 1 for n in scrapes.values())  # every group was sampled
    assert len(small) == 8 and len(made) == n_small, (len(made), n_small)


def test_a_group_of_64_is_spread_over_connection_pools(tmp_path, server, monkeypatch):
    """httpcore's pool does work quadratic in the requests it holds each time one starts or ends (480 ms of CPU for
    a group of 64 in one pool on the shared VM). The async shell spreads concurrent requests over
    ASYNC_POOL_SHARDS pools in turn: no pool ever holds more than 64 / 16 of a group's requests."""
    from evalhost.plugins.backends.completions_client import CompletionsClient

    most: dict[int, int] = {}
    real = httpcore.AsyncConnectionPool.handle_async_request

    async def handle(self, request):
        if request.url.target == b"/v1/completions":
            most[id(self)] = max(most.get(id(self), 0), len(self._requests) + 1)
        return await real(self, request)

    monkeypatch.setattr(httpcore.AsyncConnectionPool, "handle_async_request", handle)
    client = CompletionsClient(server.url, log=lambda _m: None)

    async def group():
        payload = {"model": "m", "prompt": "hi", "max_tokens": 4, "return_token_ids": True}
        return await asyncio.gather(*(client.acomplete(dict(payload, prompt=f"p{i}")) for i in range(64)))

    outs = asyncio.run(group())
    client.close()
    assert [o.choices[0]["text"] for o in outs] == [f"echo:p{i}" for i in range(64)]
    assert len(most) > 1 and max(most.values()) <= 4, most


def test_a_solo_cache_write_copies_no_token_ids(tmp_path, monkeypatch):
    """Every solo generation of a first run is written to the solo cache. dataclasses.asdict deep-copied each of
    its token ids first (0.2 ms a request on the shared VM); the entry is now dumped from the fields as they are,
    and reads back equal."""
    import copy

    from evalhost.solo_cache import SoloCache
    from evalhost.types import Generation, Sampling

    copies: list[int] = []
    real = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: copies.append(1) or real(x, *a))
    cache = SoloCache(tmp_path, {"backend": "b"})
    gen = Generation("text", list(range(256)), "length", {"sent": 1.0, "finished": 2.0}, extra={"replica": 0})
    cache.key("prompt", Sampling())  # the key (asdict of the Sampling) copies its few fields
    for_key = len(copies)
    copies.clear()
    cache.put("prompt", Sampling(), gen)
    assert len(copies) == for_key, f"{len(copies) - for_key} copies beyond the key's"
    assert cache.get("prompt", Sampling()) == gen
