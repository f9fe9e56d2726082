"""``synchronized``: the group's prompts as N concurrent single-prompt requests released together.

Every request is created first and parked on one :class:`asyncio.Event`; the event is set once all N are ready,
so they leave within the same event-loop turn and a serving engine (vLLM) co-schedules them in one running batch.
Needs capability ``concurrent`` (``backend.agenerate``).

Evidence of co-batching, per group:

* ``intervals``: each request's ``sent`` / ``first_token`` / ``finished`` (epoch seconds, from the backend's
  :attr:`Generation.timings`, else measured around the call);
* ``overlap_all``: ``max(sent) < min(finished)`` - every request's lifetime overlapped every other's;
* ``max_running``: the largest ``vllm:num_requests_running`` seen on ``{base_url}/metrics`` while the group ran
  (sampled every ``metrics_interval_s``; ``None`` when the backend has no ``base_url`` or metrics failed).

Also home of the async helpers :mod:`.continuous` shares: the event-loop runner, timed requests, the sampler.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Awaitable, Callable, TypeVar

from evalhost.errors import UserError
from evalhost.hookspecs import hookimpl
from evalhost.types import CONCURRENT, Backend, Dispatcher, Generation, Group, GroupResult, Sampling

from .solo import check_known_options

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------------------------
# One event loop per process, in a daemon thread. Every group of every async dispatcher runs on it, so a backend
# that keeps an httpx.AsyncClient between calls always sees the same loop (asyncio.run per group would close it).
# ---------------------------------------------------------------------------------------------------------------
_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="evalhost-dispatch-loop", daemon=True)
            thread.start()
            _LOOP = loop
        return _LOOP


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run ``factory()`` on the shared dispatch loop and wait for its result (from any synchronous thread)."""
    loop = _loop()
    future = asyncio.run_coroutine_threadsafe(factory(), loop)  # type: ignore[arg-type]
    try:
        return future.result()
    except BaseException:
        future.cancel()  # Ctrl-C or an error: do not leave the group's requests running behind us
        raise


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
    }
    return gen, interval


def metrics_url(backend: Backend) -> str | None:
    """``{base_url}/metrics`` at the server root (a trailing ``/v1`` is dropped), or None without ``base_url``."""
    base = getattr(backend, "base_url", None)
    if not base or not isinstance(base, str):
        return None
    base = base.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + "/metrics"


def parse_running(text: str) -> int | None:
    """Sum of ``vllm:num_requests_running`` over its label sets in a Prometheus text page (None if absent)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith("vllm:num_requests_running"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name != "vllm:num_requests_running":
            continue
        try:
            total += float(line.rsplit(" ", 1)[1])
            seen = True
        except (IndexError, ValueError):
            continue
    return int(total) if seen else None


class RunningSampler:
    """Samples ``vllm:num_requests_running`` in a background task until :meth:`stop`."""

    def __init__(self, url: str | None, interval_s: float, enough: int | None = None) -> None:
        self.url = url
        self.interval_s = interval_s
        self.enough = enough  # stop sampling once this many requests were seen running (keeps host overhead low)
        self.samples: list[int] = []
        self.error: str | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.url is not None:
            self._task = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                while True:
                    resp = await client.get(self.url)
                    resp.raise_for_status()
                    value = parse_running(resp.text)
                    if value is None:
                        self.error = "vllm:num_requests_running not found on the metrics page"
                        return
                    self.samples.append(value)
                    if self.enough is not None and value >= self.enough:
                        return
                    try:
                        await asyncio.wait_for(self._stop.wait(), self.interval_s)
                        return
                    except asyncio.TimeoutError:
                        pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # evidence is best effort: a failed sample never fails the group
            self.error = f"{type(exc).__name__}: {exc}"

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 15.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    def evidence(self) -> dict[str, Any]:
        if self.url is None:
            return {"max_running": None, "metrics": "backend has no base_url"}
        out: dict[str, Any] = {
            "max_running": max(self.samples) if self.samples else None,
            "running_samples": self.samples[:64],
        }
        if self.error:
            out["metrics_error"] = self.error
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
        check_known_options("synchronized", options, cls.options_known)
        if "metrics" in options:
            check_bool("synchronized", "metrics", options["metrics"])
        if "metrics_interval_s" in options:
            check_float("synchronized", "metrics_interval_s", options["metrics_interval_s"], 0.01)

    def run_group(self, backend: Backend, group: Group, sampling: Sampling) -> GroupResult:
        return run_async(lambda: self._run(backend, group, sampling))

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

        url = metrics_url(backend) if self.options.get("metrics", True) else None
        sampler = RunningSampler(url, float(self.options.get("metrics_interval_s", 0.1)), enough=n)
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
        return GroupResult(generations, evidence)


@hookimpl
def register_dispatchers(register):
    register("synchronized", Synchronized)
