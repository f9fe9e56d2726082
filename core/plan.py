"""From a validated :class:`~evalhost.study.Study` to a plan: cells and deterministic dispatch groups.

A *cell* is model x backend configuration x task x dispatcher x batch size. Every (model, backend, task) also gets
the **solo** cell (dispatcher ``solo``, batch size 1) that batched cells are paired against. Groups depend only on
the study seed, the task and the batch size — never on the model or backend — so two backends run exactly the same
groups (the pairing Study D needs).

Items that carry an explicit group (``metadata["group_members"]`` and ``metadata["position"]``, as the
``candidates`` task source rebuilds them from ``evalhost candidates`` rows) are run in that group instead, under the
dispatcher named in ``metadata["dispatcher"]`` when the study lists it (every listed dispatcher otherwise).

A plan is bounded: :func:`check_size` counts its cells and prompts from the study (:func:`plan_size`) and refuses
more than :data:`MAX_CELLS` cells or :data:`MAX_PROMPTS` prompts before a single job is built.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import UserError, user_path
from .registry import Registry
from .scoring import scorer_for, task_scorers
from .study import BackendConfig, DispatcherConfig, Study, TaskSpec
from .types import DOMAINS, ModelSpec, TaskItem

SOLO = DispatcherConfig("solo", "solo", (1,), {})


@dataclass
class Job:
    """One dispatch group to run: the unit of work an executor hands to a dispatcher."""

    cell: str
    model: ModelSpec
    backend: BackendConfig
    task: TaskSpec
    dispatcher: DispatcherConfig
    batch_size: int
    condition: str  # solo | batch
    repeat: int
    group_id: str
    members: list[tuple[TaskItem, str]]  # (item, role) role: target | filler

    def keys(self) -> list[str]:
        return [record_key(self.cell, item.id, self.repeat) for item, role in self.members if role == "target"]


@dataclass
class BackendWork:
    """All jobs of one (model, backend configuration): one backend instance (one server) serves them."""

    model: ModelSpec
    backend: BackendConfig
    jobs: list[Job] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.model.name}/{self.backend.label}"


@dataclass
class Plan:
    study: Study
    works: list[BackendWork]
    tasks: dict[str, list[TaskItem]]

    @property
    def jobs(self) -> list[Job]:
        return [j for w in self.works for j in w.jobs]

    def n_generations(self) -> int:
        return sum(len(j.keys()) for j in self.jobs)

    def cells(self) -> Counter:
        return Counter(j.cell for j in self.jobs for _ in j.keys())


def record_key(cell: str, item_id: str, repeat: int) -> str:
    return f"{cell}#{item_id}#r{repeat}"


def cell_id(model: str, backend: str, task: str, dispatcher: str, batch_size: int) -> str:
    return f"{model}/{backend}/{task}/{dispatcher}/bs{batch_size}"


# ---------------------------------------------------------------------------------------------------- tasks
def split_source(source: str, registry: Registry) -> tuple[str, str]:
    """``"scheme:location"`` -> (scheme, location); a qualified ``"distribution:scheme:location"`` keeps
    ``distribution:scheme`` as the scheme (the collision rule of :mod:`evalhost.registry`)."""
    scheme, sep, location = source.partition(":")
    if sep and scheme not in registry.names("task_source") and registry.is_qualifier(scheme):
        inner, sep2, rest = location.partition(":")
        if sep2 and inner in registry.names("task_source"):
            return f"{scheme}:{inner}", rest
    if sep and scheme in registry.names("task_source"):
        return scheme, location
    lowered = source.lower()
    if lowered.endswith(".jsonl"):
        return "jsonl", source
    if lowered.endswith(".csv"):
        return "csv", source
    if sep:
        registry.get("task_source", scheme)  # unknown scheme -> did you mean
    raise UserError(f"task source '{source}' names no scheme; write e.g. 'builtin:benign', 'jsonl:path', 'hf:owner/name'")


def load_task(spec: TaskSpec, registry: Registry, base_dir: Path | None = None) -> list[TaskItem]:
    scheme, location = split_source(spec.source, registry)
    source_cls = registry.get("task_source", scheme)
    reads_path = scheme in ("jsonl", "csv", "candidates", "hf-disk") or getattr(source_cls, "location_is_path", False)
    if reads_path and base_dir is not None:
        p = user_path(location, f"task '{spec.name}' source path")
        if not p.is_absolute() and not p.exists() and user_path(str(base_dir / p), "task path").exists():
            location = str(base_dir / p)  # relative to the study file
    source = source_cls()
    options = {"task": spec.name, **spec.options}
    if spec.domain:
        options["domain"] = spec.domain
    if spec.scorer:  # task sources keep it as the items' default; which scorer scores is evalhost.scoring's rule
        options["scorer"] = spec.scorer
    items = source.load(location, options)
    if not items:
        raise UserError(f"task '{spec.name}' ({spec.source}) has no items; check the file or the split")
    ids = Counter(i.id for i in items)
    dup = [k for k, n in ids.items() if n > 1]
    if dup:
        raise UserError(f"task '{spec.name}' has duplicate item id '{dup[0]}'; item ids must be unique within a task")
    for item in items:
        if item.domain not in DOMAINS:
            raise UserError(f"task '{spec.name}' item '{item.id}' has domain '{item.domain}'; "
                            f"use one of {', '.join(DOMAINS)} (or set domain in the study's [[tasks]])")
        members = item.metadata.get("group_members")  # an explicit group: only the candidates source makes one
        if members and not (isinstance(members, tuple) and all(isinstance(m, TaskItem) for m in members)):
            raise UserError(f"task '{spec.name}' item '{str(item.id)[:60]}' has metadata 'group_members', which is "
                            f"reserved for the groups the candidates source rebuilds; rename that metadata key")
    if spec.limit:
        items = items[: spec.limit]
    return items


class ItemLoader:
    """``RunContext.load_items``: a task source spec (``"builtin:benign"``, ``"jsonl:fillers.jsonl"``) -> its items,
    through the registry of the process it runs in; a relative path is read from ``base_dir`` (the study file's
    folder). Picklable, so an executor can hand it to a worker process."""

    def __init__(self, base_dir: str | Path | None = None) -> None:
        self.base_dir = None if base_dir is None else str(base_dir)

    def __call__(self, spec: str) -> list[TaskItem]:
        from .registry import get_registry

        name = spec.split(":")[-1].split("/")[-1]
        return load_task(TaskSpec(name=name, source=spec), get_registry(),
                         Path(self.base_dir) if self.base_dir is not None else None)


def make_groups(items: list[TaskItem], batch_size: int, seed: int, task: str) -> list[list[tuple[TaskItem, str]]]:
    """Deterministic groups of ``batch_size``: shuffle by seed, chunk; a short last chunk is padded with fillers."""
    order = list(items)
    random.Random(f"{seed}|{task}|{batch_size}").shuffle(order)
    groups = []
    for start in range(0, len(order), batch_size):
        chunk = [(it, "target") for it in order[start:start + batch_size]]
        k = 0
        while len(chunk) < batch_size:
            chunk.append((order[k % len(order)], "filler"))
            k += 1
        groups.append(chunk)
    return groups


# ---------------------------------------------------------------------------------------------------- plan
def check_plugins(study: Study, registry: Registry, notes: list[str] | None = None) -> None:
    """Every plugin the study names exists, is not contested, and accepts its options: ``check_options`` of each
    backend, dispatcher, task source and scorer, before a task is loaded, a run directory made or a server started
    (``evalhost run --dry-run`` says the same). The executor's options are checked where it is built
    (:func:`evalhost.runner.run_study`). A model path that names nothing on this machine is refused too, unless
    ``notes`` is given (``--dry-run``: a study written for another machine still plans): then it is noted there."""
    from .models import ModelNotHere

    for b in study.backends:
        cls = registry.get("backend", b.plugin)
        cls.check_options(b.options)
        for m in study.models:  # a model path the backend can never load: refused before a run directory exists
            try:
                _prefixed(f"model '{m.name}' with backend '{b.label}'",
                          lambda _o, m=m: cls.check_model(m, b.options), b.options)
            except ModelNotHere as exc:
                if notes is None:
                    raise
                notes.append(f"{exc}: a run on this machine will refuse it")
    for d in study.dispatchers:
        cls = registry.get("dispatcher", d.plugin)
        cls.check_options(d.options)
        for b in study.backends:
            need = set(cls.requires) - set(registry.get("backend", b.plugin).capabilities)
            if need:
                raise UserError(
                    f"dispatcher '{d.label}' needs {', '.join(sorted(need))}, which backend '{b.label}' "
                    f"({b.plugin}) cannot do; use a serving backend (vllm, openai) or drop this dispatcher")
    for t in study.tasks:
        scheme, _ = split_source(t.source, registry)
        _prefixed(f"task '{t.name}' ({scheme})", registry.get("task_source", scheme).check_options, t.options)
        scorer, options = scorer_for(t)  # the task's own scorer, if it names one (evalhost.scoring)
        if scorer:
            _prefixed(f"task '{t.name}'", registry.get("scorer", scorer).check_options, options)


def _prefixed(where: str, check, options: dict[str, Any]) -> None:
    """Run a plugin's ``check_options``; its sentence gets ``where`` in front unless it already names a task."""
    try:
        check(dict(options))
    except UserError as exc:
        text = str(exc)
        raise type(exc)(text if text.startswith("task '") else f"{where}: {text}") from None


def _check_scorers(task: TaskSpec, items: list[TaskItem], registry: Registry) -> None:
    """Every item of the task has a scorer (:func:`evalhost.scoring.scorer_for`), and each scorer exists and accepts
    its options; the task's own scorer was checked in :func:`check_plugins` already."""
    used = task_scorers(task, items)
    if None in used:
        raise UserError(f"task '{task.name}' has items without a scorer; set scorer = \"...\" in its [[tasks]] entry")
    checked = scorer_for(task)[0]
    for name in sorted(n for n in used if n != checked):
        _prefixed(f"task '{task.name}'", registry.get("scorer", name).check_options, used[name])


MAX_CELLS = 20_000
MAX_PROMPTS = 1_000_000  # prompts one plan sends: targets plus the fillers that pad a short last group


def plan_size(study: Study, tasks: dict[str, list[TaskItem]], registry: Registry) -> tuple[int, int]:
    """(cells, prompts) the plan will have, counted from the study without building a single job."""
    per_config_cells = per_config_prompts = 0
    for task in study.tasks:
        items = tasks[task.name]
        n = len(items)
        per_config_cells += 1
        per_config_prompts += study.solo_repeats * n
        explicit = [it for it in items if it.metadata.get("group_members")]
        for disp in study.dispatchers:
            if explicit:
                sizes = {len(it.metadata["group_members"]) for it in explicit}
                per_config_cells += len(sizes)
                per_config_prompts += study.repeats * sum(len(it.metadata["group_members"]) for it in explicit)
                continue
            sizer = getattr(registry.get("dispatcher", disp.plugin), "group_size_for", None)
            fixed = int(sizer(disp.options)) if sizer else None
            for bs in disp.batch_sizes:
                size = max(1, fixed or bs)
                per_config_cells += 1
                per_config_prompts += study.repeats * -(-n // size) * size
    configs = len(study.models) * len(study.backends)
    return configs * per_config_cells, configs * per_config_prompts


def check_size(study: Study, tasks: dict[str, list[TaskItem]], registry: Registry) -> None:
    """Refuse, before expanding it, a plan beyond :data:`MAX_CELLS` cells or :data:`MAX_PROMPTS` prompts."""
    cells, prompts = plan_size(study, tasks, registry)
    configs = len(study.models) * len(study.backends)
    if cells > MAX_CELLS:
        raise UserError(f"the study would make {cells:,} cells ({configs} model/backend configurations), more than "
                        f"the limit of {MAX_CELLS:,}; use fewer batch sizes, dispatchers, tasks or configurations, or "
                        f"split the study")
    if prompts > MAX_PROMPTS:
        raise UserError(f"the study would send {prompts:,} prompts ({configs} model/backend configurations), more "
                        f"than the limit of {MAX_PROMPTS:,} per run; lower repeats, limit the tasks or split the study")


def build_plan(study: Study, registry: Registry, notes: list[str] | None = None) -> Plan:
    check_plugins(study, registry, notes)
    base = study.path.parent if study.path else None
    tasks = {t.name: load_task(t, registry, base) for t in study.tasks}
    for t in study.tasks:
        _check_scorers(t, tasks[t.name], registry)
    check_size(study, tasks, registry)
    works = []
    for model in study.models:
        for backend in study.backends:
            work = BackendWork(model, backend)
            for task in study.tasks:
                items = tasks[task.name]
                cell = cell_id(model.name, backend.label, task.name, "solo", 1)
                for r in range(study.solo_repeats):
                    for it in items:
                        work.jobs.append(Job(cell, model, backend, task, SOLO, 1, "solo", r,
                                             f"{task.name}:solo:{it.id}", [(it, "target")]))
                explicit = [it for it in items if it.metadata.get("group_members")]
                for disp in study.dispatchers:
                    for r in range(study.repeats):
                        if explicit:
                            work.jobs += _explicit_jobs(explicit, model, backend, task, disp, r, study)
                            continue
                        # a dispatcher that sizes its own groups (continuous: a few targets joining a batch of
                        # fillers) gets groups of that size, and the cell's batch size as its `batch_size` option
                        sizer = getattr(registry.get("dispatcher", disp.plugin), "group_size_for", None)
                        fixed = int(sizer(disp.options)) if sizer else None
                        for bs in disp.batch_sizes:
                            cell = cell_id(model.name, backend.label, task.name, disp.label, bs)
                            d = replace(disp, options={**disp.options, "batch_size": bs}) if fixed else disp
                            size = fixed or bs
                            for g, members in enumerate(make_groups(items, size, study.seed, task.name)):
                                work.jobs.append(Job(cell, model, backend, task, d, bs, "batch", r,
                                                     f"{task.name}:bs{bs}:g{g:04d}", members))
            works.append(work)
    return Plan(study, works, tasks)


def _explicit_jobs(explicit, model, backend, task, disp, repeat, study) -> list[Job]:
    jobs = []
    listed = {d.plugin for d in study.dispatchers} | {d.label for d in study.dispatchers}
    for it in explicit:
        wanted = it.metadata.get("dispatcher")
        if wanted and wanted in listed and wanted not in (disp.plugin, disp.label):
            continue
        pos = int(it.metadata.get("position", 0))
        members = [(it, "target") if i == pos else (m, "filler")
                   for i, m in enumerate(it.metadata["group_members"])]
        bs = len(members)
        cell = cell_id(model.name, backend.label, task.name, disp.label, bs)
        jobs.append(Job(cell, model, backend, task, disp, bs, "batch", repeat,
                        it.metadata.get("group_id") or f"{task.name}:cand:{it.id}", members))
    return jobs


def describe(plan: Plan) -> str:
    """The expanded plan as text (``evalhost run --dry-run``)."""
    s = plan.study
    lines = [f"study '{s.name}' (seed {s.seed}): {len(plan.works)} backend instance(s), "
             f"{len(plan.cells())} cells, {plan.n_generations()} generations",
             f"sampling: temperature={s.sampling.temperature} top_p={s.sampling.top_p} "
             f"max_tokens={s.sampling.max_tokens} seed={s.sampling.seed}"]
    for name, items in plan.tasks.items():
        dom = Counter(i.domain for i in items)
        lines.append(f"task {name}: {len(items)} items ({', '.join(f'{k} {v}' for k, v in sorted(dom.items()))})")
    lines.append(f"{'cell':<70} {'groups':>7} {'generations':>12}")
    groups = Counter(j.cell for j in plan.jobs)
    for cell, n in plan.cells().items():
        lines.append(f"{cell:<70} {groups[cell]:>7} {n:>12}")
    return "\n".join(lines)


def summary_counts(plan: Plan) -> dict[str, Any]:
    return {"cells": len(plan.cells()), "generations": plan.n_generations(), "backends": len(plan.works)}
