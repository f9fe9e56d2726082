"""The driver side of the actors' event streams: deliver each event to ``on_event`` (each group once), bring a lost
actor back and re-issue only what it had not finished, and on an early stop let every actor close its backend.

Ray's errors become ours here: a :class:`UserError` or :class:`RunError` raised in an actor reaches the user as
itself; anything else is one :class:`RunError` sentence that names the work and says to resume with ``--resume``.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

from evalhost.api import GroupDone, RunError, UserError

CANCEL_GRACE_S = 60  # how long an interrupted run waits for its actors to close their backends
RESTART_WAIT_S = 900  # how long the driver waits for Ray to bring a lost actor back (it may wait for resources)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class ActorStream:
    """One actor, its work, and what the driver has received from it so far."""

    def __init__(self, work, actor, base: set[str], keys: set[str]) -> None:
        self.work, self.actor, self.base, self.keys = work, actor, base, keys
        self.received: set[str] = set()
        self.reissues = 0
        self.gen = None  # the actor's event stream (an ObjectRefGenerator)
        self.probe = None  # while the actor is being brought back: a pending info() call
        self.lost: Exception | None = None
        self.deadline = 0.0
        self.node: dict[str, Any] | None = None
        self.incarnations: list[tuple[str, int]] = []  # (node id, pid) of every process that ran the actor

    @property
    def restarts(self) -> int:
        return max(0, len(self.incarnations) - 1)

    @property
    def label(self) -> str:
        return self.work.label

    def skip(self) -> list[str]:
        return sorted(self.base | self.received)

    def issue(self) -> None:
        """(Re-)start the actor's stream, skipping every key already done or received."""
        self.gen = self.actor.run.options(num_returns="streaming").remote(self.skip())


class Relay:
    def __init__(self, ray, context, on_event: Callable[[Any], None], max_restarts: int) -> None:
        self.ray, self.context, self.on_event, self.max_restarts = ray, context, on_event, max_restarts
        self.live: list[ActorStream] = []  # streams not finished yet (what cancel() stops)

    def run(self, streams: list[ActorStream]) -> None:
        """Issue every stream and relay their events until each has finished."""
        ray = self.ray
        from ray.exceptions import (ObjectLostError, OutOfMemoryError, RayActorError, RayError, RayTaskError,
                                    WorkerCrashedError)

        lost = (RayActorError, WorkerCrashedError, ObjectLostError, OutOfMemoryError)  # the process is gone
        for st in streams:
            st.issue()
        live = self.live
        live[:] = streams
        while live:
            # a stream (st.gen) or, for an actor being brought back, a probe of its info() (st.probe)
            waiting = {id(st.probe if st.probe is not None else st.gen): st for st in live}
            refs = [st.probe if st.probe is not None else st.gen for st in live]
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            for ref in ready:
                st = waiting[id(ref)]
                if st.probe is not None:
                    self._probe_answered(st)
                    continue
                try:
                    item = ray.get(next(st.gen))
                except StopIteration:
                    live.remove(st)
                    missing = st.keys - st.base - st.received
                    if missing:  # execute_work skips nothing it was asked for; this would be a bug
                        raise RunError(f"the Ray actor of '{st.label}' finished without {len(missing)} "
                                       f"generations (e.g. {sorted(missing)[0]}); resume with --resume")
                    ray.kill(st.actor, no_restart=True)  # free its resources for the actors still waiting
                    continue
                except lost as exc:
                    self._lost(st, exc)
                    continue
                except RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, (UserError, RunError)):
                        raise cause from None
                    raise RunError(f"backend work '{st.label}' failed in its Ray actor: "
                                   f"{type(cause or exc).__name__}: {first_line(cause or exc)}") from None
                except RayError as exc:  # Ray itself failed (e.g. the cluster went away)
                    raise RunError(f"Ray failed while running '{st.label}': {type(exc).__name__}: "
                                   f"{first_line(exc)}") from None
                self._deliver(st, item)

    def _deliver(self, st: ActorStream, item: dict[str, Any]) -> None:
        """One item of a stream: where the actor runs, its log lines, then its event (a group already delivered by
        an earlier incarnation of the actor is dropped)."""
        if "node" in item:
            st.node = item["node"]
            who = (st.node.get("node_id"), st.node.get("pid"))
            if who not in st.incarnations:
                st.incarnations.append(who)
        for line in item.get("logs", ()):
            self.context.log(line)
        event = item.get("event")
        if event is None:
            return
        if isinstance(event, GroupDone):
            keys = event.job.keys()
            if all(k in st.received or k in st.base for k in keys):
                return  # already delivered by an earlier incarnation of the actor
            st.received.update(keys)
        self.on_event(event)

    def cancel(self) -> None:
        """Stopping early (an error, Ctrl-C, SIGTERM): cancel the streams so that each actor leaves execute_work
        through its ``finally`` (the backend closes: a managed server is stopped, not orphaned), then return;
        the caller kills the actors. Bounded by CANCEL_GRACE_S."""
        ray = self.ray
        streams = [st for st in self.live if st.gen is not None]
        if not streams:
            return
        self.context.log(f"ray: stopping {len(streams)} actor(s); their backends are closed first")
        for st in streams:
            with contextlib.suppress(Exception):
                ray.cancel(st.gen)
        deadline = time.monotonic() + CANCEL_GRACE_S
        for st in streams:
            while time.monotonic() < deadline:
                ready, _ = ray.wait([st.gen], num_returns=1, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                if not ready:
                    continue
                try:
                    ray.get(next(st.gen))
                except Exception:  # StopIteration, TaskCancelledError, a dead actor: this stream is over
                    break

    def _lost(self, st: ActorStream, exc: Exception) -> None:
        """The actor's stream broke (its process died, or it is unreachable): probe until Ray has it back.

        Never blocks: the other actors' streams keep flowing (and finished actors keep being released, which may
        be what frees the resources the restarted actor waits for)."""
        st.reissues += 1
        st.lost = exc
        if st.reissues > 2 * self.max_restarts + 1:  # bounded even when the stream fails with the actor alive
            raise RunError(f"the Ray actor of '{st.label}' failed {st.reissues} times (max_restarts="
                           f"{self.max_restarts}; last: {type(exc).__name__}: {first_line(exc)}); "
                           f"resume with --resume")
        st.deadline = time.monotonic() + RESTART_WAIT_S
        st.gen, st.probe = None, st.actor.info.remote()

    def _probe_answered(self, st: ActorStream) -> None:
        from ray.exceptions import ActorDiedError, RayError

        try:
            self.ray.get(st.probe)
        except ActorDiedError as died:  # no restart left (or its node is gone for good)
            raise RunError(f"the Ray actor of '{st.label}' died and Ray will not restart it (max_restarts="
                           f"{self.max_restarts}; {type(died).__name__}: {first_line(died)}); "
                           f"resume with --resume") from None
        except RayError:  # still restarting (ActorUnavailableError), or the probe itself was lost: ask again
            if time.monotonic() > st.deadline:
                raise RunError(f"the Ray actor of '{st.label}' did not come back within {RESTART_WAIT_S} s after "
                               f"{type(st.lost).__name__}; resume with --resume") from None
            time.sleep(0.05)
            st.probe = st.actor.info.remote()
            return
        remaining = len(st.keys - st.base - st.received)
        self.context.log(f"ray: the actor of {st.label} was lost ({type(st.lost).__name__}) and is back; its "
                         f"{remaining} unfinished generations are re-issued")
        st.probe = None
        st.issue()
