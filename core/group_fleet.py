"""Batch groups on a fleet of engines (:meth:`evalhost.api.Backend.fleet`): N replicas, ONE group at a time each.

A batch group must be alone in its engine (another group's requests in the same running batch would change its
composition), so groups run side by side only in separate engines. :class:`GroupFleet` gives every replica one
worker thread that takes the next group from a shared queue and runs it to the end before it takes another, so a
replica never has two groups in flight; whichever replica is free takes the next group. Results come back in the
order the groups were submitted (the order of a one-engine run), at most ``window`` groups ahead of the consumer.

Dispatchers' ``run_group`` is synchronous; the async ones hand their coroutine to the process's one shared event
loop (:func:`evalhost.loop.run_async`, which is ``asyncio.run_coroutine_threadsafe``: safe from any thread), so
N groups on N replicas share that loop, each with its own barrier and sampler.

A failure ends the fleet: no worker takes a new group; the groups submitted before the failed one are still
returned (they finished, or finish, on their replicas), then the failure is raised; the ones after it are dropped
unrecorded (a resume runs them).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator, Mapping

from .cobatch import VERIFIED, VERDICTS, generic_verdict

__all__ = ["GroupFleet", "fleet_evidence"]

_STOP = object()


def fleet_evidence(evidence: Mapping[str, Any], replica: int, replicas: int, label: str | None = None,
                   size: int | None = None) -> dict[str, Any]:
    """A batch group's evidence with ``fleet`` added: the replica that ran it, the fleet's size, and whether its
    co-batching verdict is the one every batch group is planned to have (``verified``). A group that is not
    (``cobatch_as_planned: false``, with ``cobatch_verdict``) keeps its own verdict, so it counts as the batch
    condition only as that verdict does (``serialized`` never, ``unverified`` only with ``count_unverified``)."""
    out = dict(evidence)
    cb = out.get("cobatch")
    kind = cb.get("verdict") if isinstance(cb, Mapping) and cb.get("verdict") in VERDICTS else \
        generic_verdict(out, size)["verdict"]
    out["fleet"] = {"replica": replica, "replicas": replicas, **({"engine": label} if label else {}),
                    "cobatch_planned": VERIFIED, "cobatch_verdict": kind, "cobatch_as_planned": kind == VERIFIED}
    return out


class GroupFleet:
    """Runs submitted payloads with ``run(replica_index, engine, payload)`` on ``engines``, one at a time per
    engine; :meth:`results` yields ``(payload, result)`` in submission order."""

    def __init__(self, engines: list[Any], run: Callable[[int, Any, Any], Any], window: int | None = None,
                 name: str = "fleet") -> None:
        self.engines = list(engines)
        self.window = max(1, window or 4 * len(self.engines))
        self._run = run
        self._todo: queue.Queue = queue.Queue()
        self._cv = threading.Condition()
        self._done: dict[int, tuple[bool, Any]] = {}
        self._payloads: dict[int, Any] = {}
        self._submitted = 0
        self._yielded = 0
        self._failed = False
        self._threads = [threading.Thread(target=self._worker, args=(i, e), name=f"{name}-r{i}", daemon=True)
                         for i, e in enumerate(self.engines)]
        for t in self._threads:
            t.start()

    @property
    def outstanding(self) -> int:
        return self._submitted - self._yielded

    def submit(self, payload: Any) -> Iterator[tuple[Any, Any]]:
        """Queue ``payload``; yields the results that are ready in order, waiting for the oldest while
        ``window`` groups are outstanding (so a slow group does not let finished ones pile up)."""
        with self._cv:
            seq = self._submitted
            self._submitted += 1
            self._payloads[seq] = payload
        self._todo.put((seq, payload))
        yield from self.results(wait=self.outstanding >= self.window)

    def results(self, wait: bool) -> Iterator[tuple[Any, Any]]:
        """The finished results in order; ``wait``: wait for the oldest outstanding one first."""
        while self._yielded < self._submitted:
            with self._cv:
                while wait and self._yielded not in self._done:
                    self._cv.wait()
                if self._yielded not in self._done:
                    return
                ok, value = self._done.pop(self._yielded)
                payload = self._payloads.pop(self._yielded)
                self._yielded += 1
            if not ok:
                raise value
            yield payload, value
            wait = wait and self.outstanding >= self.window

    def drain(self) -> Iterator[tuple[Any, Any]]:
        """Every outstanding result, in order (waits for them)."""
        while self._yielded < self._submitted:
            yield from self.results(wait=True)

    def _worker(self, index: int, engine: Any) -> None:
        while True:
            item = self._todo.get()
            if item is _STOP:
                return
            seq, payload = item
            with self._cv:
                skip = self._failed
            if skip:  # after a failure nothing new starts; mark it so that an in-order reader is not left waiting
                outcome: tuple[bool, Any] = (False, RuntimeError("not run: an earlier group failed"))
            else:
                try:
                    outcome = (True, self._run(index, engine, payload))
                except BaseException as exc:  # handed to the reader, raised there in order
                    outcome = (False, exc)
            with self._cv:
                if not outcome[0]:
                    self._failed = True
                self._done[seq] = outcome
                self._cv.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Start nothing more; wait up to ``timeout`` s in all for the groups in flight (stop their engines first to cut
        that short). Safe to call twice."""
        with self._cv:
            self._failed = True
        for _ in self._threads:
            self._todo.put(_STOP)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
