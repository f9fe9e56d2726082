"""``synchronized``: the group's prompts as N concurrent single-prompt requests released together.

Every request is created first and parked on one :class:`asyncio.Event`; the event is set once all N are ready,
so they leave within the same event-loop turn and a serving engine (vLLM) co-schedules them in one running batch.
Needs capability ``concurrent`` (``backend.agenerate``).

Evidence of co-batching, per group:

* ``intervals``: each request's ``sent`` / ``first_token`` / ``finished`` (epoch seconds, from the backend's
  :attr:`Generation.timings`, else measured around the call);
* ``overlap_all``: ``max(sent) < min(finished)`` - every request's lifetime overlapped every other's;
* ``max_running``: the largest number of requests the engine was running while the group ran, sampled every
  ``metrics_interval_s`` through the backend's :meth:`~evalhost.api.Backend.engine_metrics` (the vLLM and OpenAI
  backends read ``vllm:num_requests_running``); ``None`` when the backend reports no engine metrics or they failed;
* ``cobatch``: the verdict ``verified`` | ``serialized`` | ``unverified`` with its rule and why
  (:mod:`evalhost.cobatch`); each interval also records its output ``tokens``, which the rule reads.

Groups run on the process's shared event loop (``context.run_async``). Also home of the async helpers
:mod:`.continuous` shares: timed requests, the sampler, the option checks.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from evalhost.api import (CONCURRENT, Backend, Dispatcher, Generation, Group, GroupResult, Sampling, UserError,
                          check_keys, hookimpl)


async def timed_agenerate(backend: Backend, prompt: str, sampling: Sampling) -> tuple[Generation, dict[str, Any]]:
    """``backend.agenerate`` with ``sent``/``finished`` filled in when the backend did not stamp them."""
    sent = time.time()
    gen = await backend.agenerate(prompt, sampling)
    finished = time.time()
    if not isinstance(gen, Generation):
        raise RuntimeError(
            f"backend {type(backend).__name__}.agenerate returned {type(gen).__name__}, not a Generation"
        )
    gen.timings.setdefault("sent", sent)
    gen.timings.setdefault("finished", finished)
    interval = {
        "sent": gen.timings["sent"],
        "first_token": gen.timings.get("first_token"),
        "finished": gen.timings["finished"],
        "tokens": len(gen.token_ids),  # output tokens: the co-batching verdict's finish_queue rule reads them
    }
    return gen, interval


class RunningSampler:
    """Samples ``requests_running`` of ``backend.engine_metrics()`` in a background task until :meth:`stop`
    (``backend`` None: sampling is off).

    Sampling is best effort and survives a failed sample: a scrape that raises or times out is counted
    (``metrics_failures``, with the last error) and the next one is tried after ``interval_s``; only
    ``MAX_CONSECUTIVE_FAILURES`` failures in a row end it (``metrics_error``). One slow or refused scrape of a
    loaded server must not leave the group with a single early sample (taken before the engine admitted the
    requests) and so a ``max_running`` that understates what ran together."""

    MAX_CONSECUTIVE_FAILURES = 5
    SAMPLE_TIMEOUT_S = 10.0

    def __init__(self, backend: Backend | None, interval_s: float, enough: int | None = None) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self.enough = enough  # stop sampling once this many requests were seen running (keeps host overhead low)
        self.samples: list[int] = []
        self.failures = 0
        self.error: str | None = None
        self.gave_up = False
        self.unsupported = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.backend is not None:
            self._task = asyncio.ensure_future(self._poll())

    async def _sample(self) -> int | None:
        """One scrape: the running count, or None when the backend reports no engine metrics. Raises on failure."""
        metrics = await asyncio.wait_for(self.backend.engine_metrics(), self.SAMPLE_TIMEOUT_S)
        if metrics is None:
            return None
        value = metrics.get("requests_running")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"the backend's engine metrics give requests_running = {value!r}")
        return value

    async def _poll(self) -> None:
        consecutive = 0
        while True:
            try:
                value = await self._sample()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # evidence is best effort: a failed sample never fails the group
                self.failures += 1
                consecutive += 1
                self.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if consecutive >= self.MAX_CONSECUTIVE_FAILURES:
                    self.gave_up = True
                    return
            else:
                if value is None:
                    self.unsupported = True
                    return
                consecutive = 0
                self.samples.append(value)
                if self.enough is not None and value >= self.enough:
                    return
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
                return
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.SAMPLE_TIMEOUT_S + 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    def evidence(self) -> dict[str, Any]:
        if self.backend is None:
            return {"max_running": None, "metrics": "off"}
        if self.unsupported:
            return {"max_running": None, "metrics": "the backend reports no engine metrics"}
        out: dict[str, Any] = {
            "max_running": max(self.samples) if self.samples else None,
            "running_samples": self.samples[:64],
        }
        if self.failures:
            out["metrics_failures"] = self.failures
            if self.gave_up or not self.samples:
                out["metrics_error"] = self.error
            else:
                out["metrics_last_failure"] = self.error
        return out


def check_float(dispatcher: str, key: str, value: Any, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise UserError(f"dispatcher '{dispatcher}' option '{key}' must be a number >= {minimum}, got {value!r}")


def check_int(dispatcher: str, key: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"dispatcher '{dispatcher}' option '{key}' must be an integer >= {minimum}, got {value!r}")


def check_bool(dispatcher: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise UserError(f"dispatcher '{dispatcher}' option '{key}' must be true or false, got {value!r}")


class Synchronized(Dispatcher):
    """N concurrent single-prompt requests released together by one event."""

    requires = frozenset({CONCURRENT})
    options_known = ("metrics", "metrics_interval_s")

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        check_keys(options, cls.options_known, "dispatcher 'synchronized'")
        if "metrics" in options:
            check_bool("synchronized", "metrics", options["metrics"])
        if "metrics_interval_s" in options:
            check_float("synchronized", "metrics_interval_s", options["metrics_interval_s"], 0.01)

    def run_group(self, backend: Backend, group: Group, sampling: Sampling) -> GroupResult:
        return self.context.run_async(lambda: self._run(backend, group, sampling))

    async def _run(self, backend: Backend, group: Group, sampling: Sampling) -> GroupResult:
        prompts = group.prompts
        n = len(prompts)
        if n == 0:
            return GroupResult([], {"mode": "synchronized", "requests": 0})
        release = asyncio.Event()
        ready = 0

        async def one(prompt: str) -> tuple[Generation, dict[str, Any]]:
            nonlocal ready
            ready += 1
            if ready == n:
                release.set()
                await asyncio.sleep(0)  # the parked ones wake first: requests leave in member order
            await release.wait()
            return await timed_agenerate(backend, prompt, sampling)

        sampler = RunningSampler(backend if self.options.get("metrics", True) else None,
                                 float(self.options.get("metrics_interval_s", 0.1)), enough=n)
        tasks = [asyncio.ensure_future(one(p)) for p in prompts]
        sampler.start()
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            await sampler.stop()
        generations = [g for g, _ in results]
        intervals = [dict(iv, position=i) for i, (_, iv) in enumerate(results)]
        sent = [iv["sent"] for iv in intervals]
        finished = [iv["finished"] for iv in intervals]
        evidence: dict[str, Any] = {
            "mode": "synchronized",
            "requests": n,
            "overlap_all": max(sent) < min(finished),
            "release_spread_s": max(sent) - min(sent),
            "intervals": intervals,
        }
        evidence.update(sampler.evidence())
        from evalhost.api import synchronized_verdict  # verified | serialized | unverified, with its rule

        evidence["cobatch"] = synchronized_verdict(n, evidence.get("max_running"), intervals,
                                                   evidence.get("metrics_error") or evidence.get("metrics"))
        return GroupResult(generations, evidence)


@hookimpl
def register_dispatchers(register):
    register("synchronized", Synchronized)
