"""The engine-metrics sampler behind ``max_running`` (synchronized and continuous dispatchers): a failed scrape
is counted and sampling goes on; only repeated failures in a row end it."""
from __future__ import annotations

import asyncio

from evalhost.plugins.dispatchers.synchronized import RunningSampler
from evalhost.types import Backend, ModelSpec, RunContext


class ScriptedMetrics(Backend):
    """``engine_metrics`` answers from a script: an int is a running count, an exception is raised."""

    name = "scripted"

    def __init__(self, script):
        super().__init__(ModelSpec(name="m", path="m"), {}, RunContext(run_dir=None, cache_dir=None, log=print))
        self.script = list(script)
        self.calls = 0

    def generate(self, prompts, sampling):  # not used
        raise NotImplementedError

    async def engine_metrics(self):
        self.calls += 1
        step = self.script.pop(0) if self.script else self.last
        self.last = step if not isinstance(step, BaseException) else 0
        if isinstance(step, BaseException):
            raise step
        return {"requests_running": step}


def sample(backend, seconds=0.6, interval=0.01, enough=None):
    async def go():
        sampler = RunningSampler(backend, interval, enough)
        sampler.start()
        await asyncio.sleep(seconds)
        await sampler.stop()
        return sampler.evidence()

    return asyncio.run(go())


def test_a_failed_scrape_between_samples_does_not_end_sampling():
    # the first scrape sees the requests still queued (0), the second fails (a loaded server), then they run
    backend = ScriptedMetrics([0, TimeoutError("scrape timed out"), 3, 4, 4])
    ev = sample(backend)
    assert ev["max_running"] == 4, ev
    assert ev["metrics_failures"] == 1
    assert "metrics_error" not in ev  # sampling recovered: the evidence stands
    assert "TimeoutError" in ev["metrics_last_failure"]


def test_failures_in_a_row_end_sampling_with_the_error():
    backend = ScriptedMetrics([2] + [ConnectionError("refused")] * 10)
    ev = sample(backend)
    assert backend.calls == 1 + RunningSampler.MAX_CONSECUTIVE_FAILURES
    assert ev["max_running"] == 2
    assert ev["metrics_failures"] == RunningSampler.MAX_CONSECUTIVE_FAILURES
    assert ev["metrics_error"] == "ConnectionError: refused"


def test_a_bad_value_counts_as_a_failure_not_a_sample():
    class BadValue(ScriptedMetrics):
        async def engine_metrics(self):
            self.calls += 1
            return {"requests_running": "many"} if self.calls == 1 else {"requests_running": 3}

    ev = sample(BadValue([]))
    assert ev["max_running"] == 3 and ev["metrics_failures"] == 1
    assert "requests_running = 'many'" in ev["metrics_last_failure"]


def test_enough_stops_sampling_early():
    backend = ScriptedMetrics([1, 2, 4, 4, 4])
    ev = sample(backend, enough=4)
    assert ev["max_running"] == 4 and backend.calls == 3
