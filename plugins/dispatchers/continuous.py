"""``continuous``: the group's target joins a running continuous batch of filler requests.

Needs capabilities ``concurrent`` and ``continuous`` (single-prompt ``agenerate`` requests to a serving engine).

A group is ``targets`` target members (default ONE; the plan asks :meth:`Continuous.group_size_for`); the rest of
the batch is ``occupancy`` filler requests drawn from another task source (the composition arm). The targets of a
group are admitted together. Members with role ``filler`` are sent with the targets (and returned, as the contract
says; the core does not record them).

Options (all optional):

* ``targets`` - target prompts per group, admitted together (default 1). More than one makes a large study
  cheaper (the fillers' churn is shared) at the price of targets also sharing the batch with each other; the
  default occupancy keeps ``batch_size`` requests in flight either way.

* ``fillers`` - task source spec of the filler prompts, e.g. ``"builtin:benign"`` (default), resolved with the
  host's ``context.load_items`` and rendered with ``backend.render``; items equal to a target are skipped.
* ``occupancy`` - filler requests kept in flight until the target finishes (a finished filler is replaced at
  once). Default ``batch_size`` minus the group's targets, where ``batch_size`` is the option the core sets from
  the cell, else the group size; never below 1.
* ``phase`` - ``"decode"`` (default): fillers start first and the target is admitted ``delay_s`` later, while
  they decode; ``"prefill"``: the target is released in the same instant as a fresh wave of fillers (fillers
  first), so its prefill is scheduled with theirs.
* ``delay_s`` - decode phase: seconds between the fillers' start and the target's admission (default 1.0).
* ``filler_max_tokens`` - ``max_tokens`` of filler requests (default: the study's ``max_tokens``); long vs
  short fillers are two arms.
* ``arm`` - name of the composition arm (default: the ``fillers`` spec); copied into the evidence.
* ``metrics`` / ``metrics_interval_s`` - sample the engine's running requests as ``synchronized`` does.

Evidence: ``fillers_in_flight_at_admit`` = number of filler lifetimes with ``sent < target_sent < finished``
(the minimum over targets), ``fillers_decoding_at_admit`` (the same with ``first_token < target_sent``, when the
backend reports first-token times, else None), ``filler_intervals``, ``target_intervals``, ``arm``, ``phase``,
``occupancy``, ``max_running``, and ``cobatch``: whether the target joined a running batch (``verified`` |
``serialized`` | ``unverified``, rules in :mod:`evalhost.cobatch`). After the target finishes no new filler
starts; the group returns once the fillers in flight have finished, so nothing of this group is still running on
the server when the next group starts.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from typing import Any

from evalhost.api import (CONCURRENT, CONTINUOUS, Backend, Dispatcher, Generation, Group, GroupResult, Sampling,
                          UserError, check_choice, check_keys, hookimpl)

from .synchronized import (
    RunningSampler,
    check_bool,
    check_float,
    check_int,
    timed_agenerate,
)

PHASES = ("decode", "prefill")
MAX_FILLER_INTERVALS = 256  # evidence is copied into every record of the group: keep it bounded


class Continuous(Dispatcher):
    requires = frozenset({CONCURRENT, CONTINUOUS})
    options_known = (
        "targets", "fillers", "occupancy", "phase", "delay_s", "filler_max_tokens", "arm", "batch_size",
        "metrics", "metrics_interval_s",
    )

    def __init__(self, options: dict[str, Any], context) -> None:
        super().__init__(options, context)
        self._pools: dict[tuple[str, int], list[tuple[str, str, str]]] = {}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        name = "continuous"
        check_keys(options, cls.options_known, f"dispatcher '{name}'")
        for key in ("fillers", "arm"):
            if key in options and (not isinstance(options[key], str) or not options[key].strip()):
                raise UserError(f"dispatcher '{name}' option '{key}' must be a non-empty string, got {options[key]!r}")
        if "fillers" in options and ":" not in options["fillers"]:
            raise UserError(
                f"dispatcher '{name}' option 'fillers' must be a task source spec like \"builtin:benign\", "
                f"got {options['fillers']!r}"
            )
        for key in ("targets", "occupancy", "filler_max_tokens", "batch_size"):
            if key in options:
                check_int(name, key, options[key], 1)
        if "phase" in options:
            check_choice(options["phase"], PHASES, f"dispatcher '{name}'", "phase")
        if "delay_s" in options:
            check_float(name, "delay_s", options["delay_s"], 0.0)
        if "metrics" in options:
            check_bool(name, "metrics", options["metrics"])
        if "metrics_interval_s" in options:
            check_float(name, "metrics_interval_s", options["metrics_interval_s"], 0.01)

    @classmethod
    def group_size_for(cls, options: dict[str, Any]) -> int:
        """Target members per group the plan should build (option ``targets``); the rest of the batch is fillers."""
        return int(options.get("targets", 1))

    # -- fillers -----------------------------------------------------------------------------------------------
    @property
    def fillers_spec(self) -> str:
        return str(self.options.get("fillers", "builtin:benign"))

    def _pool(self, backend: Backend) -> list[tuple[str, str, str]]:
        """(task, item id, rendered prompt) of every filler item, loaded and rendered once per backend."""
        key = (self.fillers_spec, id(backend))
        if key not in self._pools:
            load = getattr(self.context, "load_items", None)
            if load is None:
                raise UserError(
                    "dispatcher 'continuous' needs the host to resolve its 'fillers' task source, but the run "
                    "context has no load_items; run it through `evalhost run`"
                )
            items = load(self.fillers_spec)
            self._pools[key] = [(it.task, it.id, backend.render(it)) for it in items]
        return self._pools[key]

    def _filler_order(self, backend: Backend, group: Group) -> list[tuple[str, str, str]]:
        """The group's filler sequence: the pool minus the targets, rotated by a hash of the group id."""
        exclude_ids = {(m.item.task, m.item.id) for m in group.members}
        exclude_prompts = set(group.prompts)
        pool = [f for f in self._pool(backend) if (f[0], f[1]) not in exclude_ids and f[2] not in exclude_prompts]
        if not pool:
            raise UserError(
                f"dispatcher 'continuous': the filler source {self.fillers_spec!r} has no item other than the "
                f"group's own prompts; point 'fillers' at a task with more items"
            )
        start = int(hashlib.sha256(group.id.encode("utf-8")).hexdigest()[:8], 16) % len(pool)
        return pool[start:] + pool[:start]

    def occupancy(self, group: Group) -> int:
        if "occupancy" in self.options:
            return int(self.options["occupancy"])
        batch_size = int(self.options.get("batch_size") or len(group.members))
        return max(1, batch_size - len(group.members))

    # -- dispatch ----------------------------------------------------------------------------------------------
    def run_group(self, backend: Backend, group: Group, sampling: Sampling) -> GroupResult:
        if not group.members:
            return GroupResult([], {"mode": "continuous", "arm": str(self.options.get("arm", self.fillers_spec))})
        order = self._filler_order(backend, group)  # load/render synchronously, before the clock starts
        return self.context.run_async(lambda: self._run(backend, group, sampling, order))

    async def _run(
        self, backend: Backend, group: Group, sampling: Sampling, order: list[tuple[str, str, str]]
    ) -> GroupResult:
        phase = str(self.options.get("phase", "decode"))
        delay_s = float(self.options.get("delay_s", 1.0))
        occupancy = self.occupancy(group)
        filler_sampling = dataclasses.replace(
            sampling, max_tokens=int(self.options.get("filler_max_tokens", sampling.max_tokens))
        )
        targets_done = asyncio.Event()
        release = asyncio.Event()  # prefill phase: first filler wave and targets leave together
        waiting = 0
        next_index = 0
        filler_intervals: list[dict[str, Any]] = []

        def take() -> tuple[str, str, str]:
            nonlocal next_index
            filler = order[next_index % len(order)]
            next_index += 1
            return filler

        async def slot(k: int) -> None:
            nonlocal waiting
            if phase == "prefill":
                waiting += 1
                await release.wait()
            while not targets_done.is_set():
                task, item_id, prompt = take()
                gen, iv = await timed_agenerate(backend, prompt, filler_sampling)
                filler_intervals.append(
                    dict(iv, slot=k, task=task, item_id=item_id, tokens=len(gen.token_ids),
                         finish_reason=gen.finish_reason)
                )

        async def targets() -> list[tuple[Generation, dict[str, Any]]]:
            if phase == "prefill":
                while waiting < occupancy:
                    await asyncio.sleep(0)
                release.set()
                await asyncio.sleep(0)  # let the woken fillers stamp and send first
            else:
                await asyncio.sleep(delay_s)
            remaining = len(group.prompts)

            async def one(prompt: str) -> tuple[Generation, dict[str, Any]]:
                nonlocal remaining
                try:
                    return await timed_agenerate(backend, prompt, sampling)
                finally:
                    remaining -= 1
                    if remaining == 0:
                        targets_done.set()  # at once: no filler starts after the last target finished

            try:
                return list(await asyncio.gather(*(one(p) for p in group.prompts)))
            finally:
                targets_done.set()

        sampler = RunningSampler(backend if self.options.get("metrics", True) else None,
                                 float(self.options.get("metrics_interval_s", 0.05)))
        slots = [asyncio.ensure_future(slot(k)) for k in range(occupancy)]
        target_task = asyncio.ensure_future(targets())
        sampler.start()
        try:
            results = await target_task
            await asyncio.gather(*slots)
        except BaseException:
            targets_done.set()
            for t in [target_task, *slots]:
                t.cancel()
            await asyncio.gather(target_task, *slots, return_exceptions=True)
            raise
        finally:
            await sampler.stop()

        generations = [g for g, _ in results]
        target_intervals = [dict(iv, position=i, role=m.role) for i, ((_, iv), m) in
                            enumerate(zip(results, group.members))]
        admitted = [iv["sent"] for iv in target_intervals if iv["role"] == "target"] or \
            [iv["sent"] for iv in target_intervals]
        in_flight = min(sum(1 for f in filler_intervals if f["sent"] < t < f["finished"]) for t in admitted)
        firsts_known = all(f.get("first_token") is not None for f in filler_intervals) and filler_intervals
        decoding = (
            min(sum(1 for f in filler_intervals if f["sent"] < t < f["finished"] and f["first_token"] < t)
                for t in admitted)
            if firsts_known else None
        )
        filler_intervals.sort(key=lambda f: f["sent"])
        evidence: dict[str, Any] = {
            "mode": "continuous",
            "arm": str(self.options.get("arm", self.fillers_spec)),
            "fillers": self.fillers_spec,
            "phase": phase,
            "delay_s": delay_s if phase == "decode" else None,
            "occupancy": occupancy,
            "filler_max_tokens": filler_sampling.max_tokens,
            "target_sent": min(admitted),
            "fillers_in_flight_at_admit": in_flight,
            "fillers_decoding_at_admit": decoding,
            "fillers_sent": len(filler_intervals),
            "filler_intervals": filler_intervals[:MAX_FILLER_INTERVALS],
            "target_intervals": target_intervals,
        }
        evidence.update(sampler.evidence())
        from evalhost.api import continuous_verdict  # did the target join a running batch? (with its rule)

        evidence["cobatch"] = continuous_verdict(evidence)
        return GroupResult(generations, evidence)


@hookimpl
def register_dispatchers(register):
    register("continuous", Continuous)
