"""The ``ray`` executor itself: its options, the ``--dry-run`` resource plan, and one run -- connect, one actor per
work, relay their events, stop them, and the facts the manifest records."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from evalhost.api import MANIFEST, Executor, RunDir, UserError

from .actor import actor_class, actor_name
from .connect import NAMESPACE, connect, import_ray
from .relay import ActorStream, Relay
from .resources import actor_options, check_fits, fmt, work_resources

OPTIONS: dict[str, tuple[type, ...]] = {
    "address": (str,),
    "max_restarts": (int,),
    "num_cpus": (int, float),
    "num_gpus": (int, float),
    "object_store_memory": (int,),
}


class RayExecutor(Executor):
    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        for key, value in self.options.items():
            if key not in OPTIONS:
                raise UserError(f"unknown ray executor option '{key}'; known: {', '.join(sorted(OPTIONS))}")
            if value is not None and (not isinstance(value, OPTIONS[key]) or isinstance(value, bool)):
                raise UserError(f"ray executor option '{key}' must be {OPTIONS[key][0].__name__}, not {value!r}")
        self.max_restarts = int(self.options.get("max_restarts") if self.options.get("max_restarts") is not None
                                else 3)
        if self.max_restarts < 0:
            raise UserError(f"ray executor option max_restarts must be 0 or more, not {self.max_restarts}")
        self.ray = import_ray()  # fail before a run directory is created, with one sentence

    # -- dry run --------------------------------------------------------------------------------
    def describe(self, plan) -> str:
        where = f"Ray cluster at {self.options['address']}" if self.options.get("address") else \
            "a local Ray instance started for this run (127.0.0.1 only)"
        lines = [f"ray: {len(plan.works)} actor(s) on {where}; max_restarts={self.max_restarts}"]
        total: dict[str, float] = {}
        for work in plan.works:
            res = work_resources(work)
            for k, v in res.items():
                total[k] = total.get(k, 0) + v
            n = sum(len(j.keys()) for j in work.jobs)
            lines.append(f"ray: actor {work.label}: {len(work.jobs)} groups, {n} generations, asks {fmt(res)}")
        lines.append(f"ray: all actors at once would ask {fmt(total)}; actors that do not fit wait for a "
                     f"finished actor's resources")
        return "\n".join(lines)

    # -- run ------------------------------------------------------------------------------------
    def run(self, works, sampling, context, skip, on_event):
        ray = self.ray
        study_file = self._study_file(context)
        todo = []
        for work in works:
            keys = {k for job in work.jobs for k in job.keys()}
            base = keys & set(skip)
            if keys - base:
                todo.append((work, keys, base))
        requests = {w.label: work_resources(w) for w, _, _ in todo}
        started = connect(ray, self.options)
        streams: list[ActorStream] = []
        relay = Relay(ray, context, on_event, self.max_restarts)
        finished = False
        try:
            check_fits(ray, requests)
            cls = actor_class(ray)
            for work, keys, base in todo:
                actor = cls.options(
                    name=actor_name(context.run_dir, work.label), namespace=NAMESPACE,
                    max_restarts=self.max_restarts,
                    max_task_retries=0,  # never replayed by Ray with a stale skip set: the relay re-issues it
                    **actor_options(requests[work.label]),
                ).remote(work, sampling, str(context.run_dir), study_file)
                streams.append(ActorStream(work, actor, base, keys))
            relay.run(streams)
            finished = True
        finally:
            if not finished:
                relay.cancel()
            for st in streams:
                with contextlib.suppress(Exception):
                    ray.kill(st.actor, no_restart=True)
            if started:
                ray.shutdown()
        return self._facts(streams, requests)

    def _facts(self, streams: list[ActorStream], requests: dict[str, dict[str, float]]) -> dict[str, Any]:
        """What the manifest records: Ray's version, where each actor ran, what it asked for, its restarts."""
        facts: dict[str, Any] = {
            "executor": "ray", "ray_version": self.ray.__version__,
            "address": self.options.get("address") or "local",
            "max_restarts": self.max_restarts,
            "nodes": {st.label: {k: v for k, v in (st.node or {}).items() if k != "pid"} for st in streams},
            "resources": requests,
        }
        restarts = {st.label: st.restarts for st in streams if st.restarts}
        if restarts:
            facts["restarts"] = restarts
        return facts

    @staticmethod
    def _study_file(context) -> str | None:
        """The study file's path (relative task paths resolve against it), from the run's manifest."""
        try:
            manifest = RunDir(Path(context.run_dir)).read_json(MANIFEST, default={})
        except (OSError, UserError):
            return None
        return manifest.get("study_file")
