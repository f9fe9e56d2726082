"""The worker side of a run: :func:`execute_work` starts one backend and runs its dispatch groups, yielding events.

It runs wherever the executor puts it (this process for ``local``; a Ray actor for ``ray``) and writes nothing: the
driver (:func:`evalhost.runner.run_study`) turns the events into records. :class:`BackendStarted` carries the stack's
fingerprint (every plugin in use with its distribution and version) and evidence; :class:`GroupDone` one group's
generations. Plugins reach these names through :mod:`evalhost.api`.

Solo groups go through ``backend.generate_solo_many`` (a solo fleet runs several at a time, each alone on its
replica); batch groups, when ``backend.fleet()`` names more than one engine, through :class:`evalhost.group_fleet.
GroupFleet` (one group at a time per replica, results in plan order, the replica and the co-batching check in the
group's evidence). The two never overlap: before a solo group runs every batch group in flight has finished.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator

from . import __version__
from .dispatch_needs import check_started
from .errors import RunError
from .group_fleet import GroupFleet, fleet_evidence
from .plan import BackendWork, Job
from .registry import Registry, get_registry
from .solo_cache import SoloCache, enabled as solo_enabled, plugins_in_use, solo_stack
from .types import Group, GroupResult, Member, RunContext, Sampling

__all__ = ["BackendStarted", "GroupDone", "execute_work"]


@dataclass
class BackendStarted:
    """A work's backend is up: its label, the stack's fingerprint and the backend's evidence."""

    label: str
    fingerprint: dict[str, Any]
    evidence: dict[str, Any]


@dataclass
class GroupDone:
    """One dispatch group ran: the job, the prompts as rendered, and the dispatcher's result."""

    job: Job
    prompts: list[str]
    result: GroupResult


def execute_work(work: BackendWork, sampling: Sampling, context: RunContext, skip: set[str],
                 registry: Registry | None = None) -> Iterator[BackendStarted | GroupDone]:
    """Start the work's backend, run every job that still has unrecorded targets, yield events; always close."""
    registry = registry or get_registry()
    todo = [j for j in work.jobs if not all(k in skip for k in j.keys())]
    if not todo:
        return
    context = replace(context, work_label=work.label)
    backend = registry.get("backend", work.backend.plugin)(work.model, work.backend.options, context)
    dispatchers: dict[Any, Any] = {}
    batched: GroupFleet | None = None
    try:
        gate = context.start_gate
        with gate if gate is not None and not backend.starts_alongside_others() else contextlib.nullcontext():
            backend.preflight()
            backend.start()
        # what the endpoint turned out to lack (a probe at start) refuses the study before the first group
        check_started(backend, [j.dispatcher for j in todo], registry, work.backend.label)
        fp = {"backend_plugin": work.backend.plugin, "backend_config": work.backend.options,
              "model": asdict(work.model), **backend.fingerprint(),
              # every plugin this work uses, as "distribution==version" (the backend's keys the solo cache)
              "evalhost": __version__, "plugins": plugins_in_use(registry, work)}
        yield BackendStarted(work.label, fp, backend.evidence())
        cache = SoloCache(context.cache_dir, solo_stack(fp)) if solo_enabled() else None
        fleet = max(1, int(backend.solo_parallelism()))
        engines = list(backend.fleet())  # batched fleet: one group at a time per engine
        rendered: dict[tuple[str, str], str] = {}
        pending: list[tuple[Job, Group]] = []  # solo groups waiting for a free fleet slot

        def run_pending() -> list[GroupDone]:
            gens = backend.generate_solo_many([g.prompts[0] for _, g in pending], sampling)
            out = []
            for (job, group), gen in zip(pending, gens):
                if cache is not None and job.repeat == 0:
                    cache.put(group.prompts[0], sampling, gen)
                out.append(GroupDone(job, group.prompts, GroupResult([gen], {
                    "mode": "solo", "fleet": fleet, "replica": gen.extra.get("replica")})))
            pending.clear()
            return out

        def run_batched(i: int, engine: Any, item: tuple[Job, Group, Any]) -> GroupResult:
            job, group, dkey = item
            result = dispatchers[(i, dkey)].run_group(engine, group, sampling)
            check_count(job, result, group)
            result.evidence = fleet_evidence(result.evidence, i, len(engines), getattr(engine, "label", None),
                                             len(group.members))
            if not result.evidence["fleet"]["cobatch_as_planned"]:
                context.log(f"{work.label}: group {job.group_id} on replica {i}: co-batching verdict "
                            f"{result.evidence['fleet']['cobatch_verdict']}, not verified as planned; flagged in "
                            f"its evidence (fleet.cobatch_as_planned = false) and counted as that verdict is")
            return result

        def finish_batched() -> Iterator[GroupDone]:
            for (job, group, _), result in batched.drain() if batched is not None else ():
                yield GroupDone(job, group.prompts, result)

        for job in todo:
            d = job.dispatcher
            dkey = (d.label, json.dumps(d.options, sort_keys=True, default=str))
            if dkey not in dispatchers:
                dispatchers[dkey] = registry.get("dispatcher", d.plugin)(d.options, context)
                if len(engines) > 1:  # a dispatcher object per replica: run_group calls run side by side
                    for i in range(len(engines)):
                        dispatchers[(i, dkey)] = dispatchers[dkey] if i == 0 else \
                            registry.get("dispatcher", d.plugin)(d.options, context)
            members = []
            for item, role in job.members:
                key = (item.task, item.id)
                if key not in rendered:
                    rendered[key] = backend.render(item)
                members.append(Member(item, rendered[key], role))
            group = Group(job.group_id, tuple(members))
            solo = job.condition == "solo"
            if not solo and len(engines) > 1:
                if pending:
                    yield from run_pending()
                if batched is None:
                    batched = GroupFleet(engines, run_batched, name=f"fleet-{work.label}")
                for (bjob, bgroup, _), result in batched.submit((job, group, dkey)):
                    yield GroupDone(bjob, bgroup.prompts, result)
                continue
            yield from finish_batched()  # nothing else runs on an engine while a batch group is in flight there
            hit = cache.get(group.prompts[0], sampling) if cache is not None and solo and job.repeat == 0 else None
            if hit is not None:
                yield GroupDone(job, group.prompts, GroupResult([hit], {"mode": "solo", "solo_cache": "hit"}))
                continue
            if solo and fleet > 1:
                pending.append((job, group))
                if len(pending) >= fleet * 8:  # a few prompts per replica: slow prompts do not idle the others
                    yield from run_pending()
                continue
            if pending:
                yield from run_pending()
            result = dispatchers[dkey].run_group(backend, group, sampling)
            check_count(job, result, group)
            if solo and cache is not None and job.repeat == 0:
                cache.put(group.prompts[0], sampling, result.generations[0])
            yield GroupDone(job, group.prompts, result)
        yield from finish_batched()
        if pending:
            yield from run_pending()
    finally:
        if batched is not None:
            batched.close(timeout=0)  # nothing new starts; the groups in flight end when their engines stop
        try:
            backend.close()
        finally:
            if batched is not None:
                batched.close()


def check_count(job: Job, result: GroupResult, group: Group) -> None:
    if len(result.generations) != len(group.members):
        raise RunError(f"dispatcher '{job.dispatcher.label}' returned {len(result.generations)} generations for a "
                       f"group of {len(group.members)}; this is a bug in the dispatcher plugin")
