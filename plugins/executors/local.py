"""``local`` executor: runs every backend's work in this process, one after another."""
from __future__ import annotations

import platform

from evalhost.executor import Executor
from evalhost.hookspecs import hookimpl
from evalhost.runner import execute_work


class LocalExecutor(Executor):
    def describe(self, plan):
        return "\n".join(f"local: {w.label} ({len(w.jobs)} groups) in this process" for w in plan.works)

    def run(self, works, sampling, context, skip, on_event):
        for work in works:
            for event in execute_work(work, sampling, context, skip):
                on_event(event)
        return {"executor": "local", "nodes": {w.label: platform.node() for w in works}}


@hookimpl
def register_executors(register):
    register("local", LocalExecutor)
