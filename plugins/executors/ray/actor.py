"""The worker side: the Ray actor that owns one backend, runs :func:`evalhost.api.execute_work` and streams each
event (with the log lines written meanwhile) back to the driver."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from evalhost.api import ItemLoader, execute_work, worker_context

_ACTOR_CLASS = None


class WorkActorImpl:
    """The body of the Ray actor (wrapped by :func:`actor_class`): owns one backend, streams its events."""

    def __init__(self, work, sampling, run_dir: str, study_file: str | None) -> None:
        self.work, self.sampling = work, sampling
        self.run_dir, self.study_file = run_dir, study_file
        self.lines: list[str] = []

    def _log(self, msg: str) -> None:
        self.lines.append(str(msg))
        print(f"[{self.work.label}] {msg}", file=sys.stderr, flush=True)  # stays in the node's Ray worker log

    def _drain(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    def info(self) -> dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "hostname": platform.node(), "pid": os.getpid()}

    def run(self, skip: list[str]):
        yield {"node": self.info()}
        run_dir = Path(self.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)  # on another node: backend logs (server-*.log) land here
        base = Path(self.study_file).parent if self.study_file else None
        context = worker_context(run_dir, log=self._log, load_items=ItemLoader(base))
        for event in execute_work(self.work, self.sampling, context, set(skip)):
            yield {"logs": self._drain(), "event": event}
        lines = self._drain()
        if lines:
            yield {"logs": lines}


def actor_class(ray):
    """The Ray actor class (built once, at run time, so this module never imports ray at import time)."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        @ray.remote(concurrency_groups={"control": 1})
        class EvalhostWork(WorkActorImpl):
            @ray.method(concurrency_group="control")
            def info(self):  # answers while run() is streaming (tests use the pid to kill the actor)
                return WorkActorImpl.info(self)

            def run(self, skip):
                yield from WorkActorImpl.run(self, skip)

        _ACTOR_CLASS = EvalhostWork
    return _ACTOR_CLASS


def actor_name(run_dir: Path | str, label: str) -> str:
    """The name of the actor that runs work ``label`` of ``run_dir`` (namespace ``evalhost``)."""
    return f"{Path(run_dir).name}:{label}"
