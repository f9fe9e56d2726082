"""``local`` executor: runs the backends' work in this process.

Option ``parallel`` (``evalhost run --parallel N``; default 1): how many backend configurations run at the same
time, each in its own thread with its own backend (for example the four server configurations of an invariance
study sharing one GPU). Backends start one at a time unless a backend says it may start alongside others
(:meth:`evalhost.types.Backend.starts_alongside_others`; vLLM with ``kv_cache_memory_bytes`` skips the memory
profiling that two starting engines would disturb). Records are still written by the driver alone, in the order
the groups finish. Backends that share a device also share its time: per-cell tokens/s then measure the shared
machine, not one configuration alone.
"""
from __future__ import annotations

import dataclasses
import platform
import queue
import threading

from evalhost.api import Executor, UserError, execute_work, hookimpl

_DONE = object()


class LocalExecutor(Executor):
    def __init__(self, options=None) -> None:
        super().__init__(options)
        unknown = sorted(set(self.options) - {"parallel"})
        if unknown:
            raise UserError(f"executor 'local' has no option {unknown[0]!r} (it takes: parallel)")
        parallel = self.options.get("parallel", 1)
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            raise UserError(f"executor 'local' option parallel must be an integer >= 1 (backend configurations run "
                            f"at the same time), not {parallel!r}")
        self.parallel = parallel

    def describe(self, plan):
        how = "in this process" if self.parallel == 1 else f"in this process, up to {self.parallel} at a time"
        return "\n".join(f"local: {w.label} ({len(w.jobs)} groups) {how}" for w in plan.works)

    def run(self, works, sampling, context, skip, on_event):
        facts = {"executor": "local", "nodes": {w.label: platform.node() for w in works}}
        if self.parallel == 1 or len(works) <= 1:
            for work in works:
                for event in execute_work(work, sampling, context, skip):
                    on_event(event)
            return facts
        self._run_threads(works, sampling, context, skip, on_event)
        return {**facts, "parallel": self.parallel}

    def _run_threads(self, works, sampling, context, skip, on_event) -> None:
        """Workers run :func:`execute_work` and queue its events; this (the driver's) thread calls ``on_event``.
        On an error or interrupt the workers stop after their current group (which is still recorded) and close
        their backends."""
        context = dataclasses.replace(context, start_gate=threading.Lock())
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        todo = list(works)
        todo_lock = threading.Lock()

        def worker() -> None:
            try:
                while not stop.is_set():
                    with todo_lock:
                        if not todo:
                            return
                        work = todo.pop(0)
                    gen = execute_work(work, sampling, context, skip)
                    try:
                        for event in gen:
                            events.put(event)
                            if stop.is_set():
                                return
                    finally:
                        gen.close()  # runs execute_work's finally: the backend is closed
            except BaseException as exc:  # handed to the driver, which stops the others
                events.put(exc)
            finally:
                events.put(_DONE)

        threads = [threading.Thread(target=worker, name=f"evalhost-local-{i}", daemon=True)
                   for i in range(min(self.parallel, len(works)))]
        for t in threads:
            t.start()
        running, error = len(threads), None
        try:
            while running:
                event = events.get()
                if event is _DONE:
                    running -= 1
                elif isinstance(event, BaseException):
                    if error is None:
                        error = event
                    stop.set()
                else:  # also after another worker failed: the groups finished meanwhile are kept
                    on_event(event)
        except BaseException:
            stop.set()
            for t in threads:
                t.join()
            raise
        if error is not None:
            raise error


@hookimpl
def register_executors(register):
    register("local", LocalExecutor)
