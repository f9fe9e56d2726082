"""The run loop: plan -> executor -> records + manifest (the driver is the only writer of a run directory).

:func:`execute_work` runs in a worker (this process for ``local``; a Ray actor for ``ray``): it owns one backend
instance and yields events. :func:`run_study` is the driver: it turns events into records, scores them, appends them,
and keeps ``manifest.json`` current. Resume: records already in ``records.jsonl`` are skipped by key.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__
from .errors import RunError, UserError
from .models import cache_dir
from .plan import BackendWork, Job, build_plan, describe, record_key
from .registry import Registry, get_registry, require_clean
from .solo_cache import SoloCache, enabled as solo_enabled
from .records import RECORDS, RecordWriter, recorded_keys, write_json_atomic
from .rundir import MANIFEST, STUDY, RunDir
from .study import Study, load_study
from .types import Group, GroupResult, Member, RunContext, Sampling, sha256_text

SCHEMA_VERSION = 1


# ------------------------------------------------------------------------------------------------ events
@dataclass
class BackendStarted:
    label: str
    fingerprint: dict[str, Any]
    evidence: dict[str, Any]


@dataclass
class GroupDone:
    job: Job
    prompts: list[str]
    result: GroupResult


def fingerprint_id(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]


def host_fingerprint() -> dict[str, Any]:
    """Facts of the driver's machine (the backend adds its own stack: versions, device, server args)."""
    return {"python": platform.python_version(), "platform": platform.platform(), "evalhost": __version__}


# ------------------------------------------------------------------------------------------------ worker side
def execute_work(work: BackendWork, sampling: Sampling, context: RunContext, skip: set[str],
                 registry: Registry | None = None) -> Iterator[BackendStarted | GroupDone]:
    """Start the work's backend, run every job that still has unrecorded targets, yield events; always close."""
    registry = registry or get_registry()
    todo = [j for j in work.jobs if not all(k in skip for k in j.keys())]
    if not todo:
        return
    context = replace(context, work_label=work.label)
    backend = registry.get("backend", work.backend.plugin)(work.model, work.backend.options, context)
    dispatchers: dict[str, Any] = {}
    try:
        gate = context.start_gate
        with gate if gate is not None and not backend.starts_alongside_others() else contextlib.nullcontext():
            backend.preflight()
            backend.start()
        fp = {"backend_plugin": work.backend.plugin, "backend_config": work.backend.options,
              "model": asdict(work.model), **backend.fingerprint()}
        yield BackendStarted(work.label, fp, backend.evidence())
        cache = SoloCache(context.cache_dir, fp) if solo_enabled() else None
        fleet = max(1, int(backend.solo_parallelism()))
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

        for job in todo:
            d = job.dispatcher
            dkey = (d.label, json.dumps(d.options, sort_keys=True, default=str))
            if dkey not in dispatchers:
                dispatchers[dkey] = registry.get("dispatcher", d.plugin)(d.options, context)
            members = []
            for item, role in job.members:
                key = (item.task, item.id)
                if key not in rendered:
                    rendered[key] = backend.render(item)
                members.append(Member(item, rendered[key], role))
            group = Group(job.group_id, tuple(members))
            solo = job.condition == "solo"
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
            if len(result.generations) != len(members):
                raise RunError(f"dispatcher '{d.label}' returned {len(result.generations)} generations for a group "
                               f"of {len(members)}; this is a bug in the dispatcher plugin")
            if solo and cache is not None and job.repeat == 0:
                cache.put(group.prompts[0], sampling, result.generations[0])
            yield GroupDone(job, group.prompts, result)
        if pending:
            yield from run_pending()
    finally:
        backend.close()


# ------------------------------------------------------------------------------------------------ driver side
class _Scorers:
    def __init__(self, registry: Registry) -> None:
        self.registry, self.cache = registry, {}

    def score(self, job: Job, item, text: str):
        name = job.task.scorer or item.scorer
        key = (name, json.dumps(job.task.scorer_options, sort_keys=True))
        if key not in self.cache:
            self.cache[key] = self.registry.get("scorer", name)(job.task.scorer_options)
        return name, self.cache[key].score(item, text)


def build_records(study: Study, run_id: str, done: GroupDone, fid: str, scorers: _Scorers) -> list[dict[str, Any]]:
    job, result = done.job, done.result
    ids = [item.id for item, _ in job.members]
    out = []
    for pos, ((item, role), prompt, gen) in enumerate(zip(job.members, done.prompts, result.generations)):
        if role != "target":
            continue
        scorer, score = scorers.score(job, item, gen.text)
        t = dict(gen.timings)
        if "sent" in t and "finished" in t:
            t["latency_s"] = round(t["finished"] - t["sent"], 6)
        out.append({
            "schema": SCHEMA_VERSION,
            "key": record_key(job.cell, item.id, job.repeat),
            "study": study.name, "phase": study.phase, "run_id": run_id, "cell": job.cell,
            "model": job.model.name, "alignment_type": job.model.alignment_type,
            "backend": job.backend.label, "backend_plugin": job.backend.plugin, "backend_config": job.backend.options,
            "dispatcher": job.dispatcher.label, "dispatcher_plugin": job.dispatcher.plugin,
            "arm": job.dispatcher.options.get("arm"),
            "batch_size": job.batch_size, "condition": job.condition, "repeat": job.repeat,
            "task": item.task, "task_source": item.metadata.get("candidate", {}).get("task_source", job.task.source), "item_id": item.id, "domain": item.domain,
            "group_id": job.group_id, "position": pos, "peers": ids[:pos] + ids[pos + 1:],
            "prompt_sha256": sha256_text(prompt),
            "output_text": gen.text, "output_token_ids": list(gen.token_ids), "output_sha256": sha256_text(gen.text),
            "finish_reason": gen.finish_reason, "logprobs": gen.logprobs,
            "scorer": scorer, "label": score.label, "score": score.value, "rationale": score.rationale,
            "timings": t, "attempts": gen.attempts, "restarted": gen.restarted,
            "dispatch_evidence": result.evidence, "fingerprint_id": fid,
            "candidate_kind": item.metadata.get("candidate", {}).get("kind"),
        })
    return out


def _new_run_dir(study: Study) -> Path:
    """A new, empty run directory directly under ``output_dir`` (never reused, never outside it)."""
    out = study.output_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a directory; set study.output_dir to a directory (it is "
                        f"created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        base = out.resolve()
    except OSError as exc:
        raise UserError(f"output_dir {out} cannot be created ({exc.strerror}); set study.output_dir to a directory "
                        f"you can write") from None
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = out / (f"{study.name}-{stamp}" + (f"-{n}" if n else ""))
        if path.parent.resolve() != base or path.name in (".", ".."):
            raise UserError(f"study name {study.name!r} would put the run directory outside output_dir {out}; use "
                            f"one path component of letters, digits, '.', '_' and '-'")
        try:
            path.mkdir()  # never reuse or overwrite a run directory (nor follow a link someone put there)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot create a run directory under {out} ({exc.strerror}); check study.name and "
                            f"study.output_dir") from None
    raise UserError(f"could not create a new run directory under {study.output_dir}")


_MANIFEST_SHAPE = {"fingerprints": dict, "evidence": dict, "backend_fingerprints": dict, "resumes": list}


def _open_resume(study: Study, run_dir: Path) -> dict[str, Any]:
    rd = RunDir(run_dir).require()
    manifest = rd.read_json(MANIFEST, default=None)
    if manifest is None:
        raise UserError(f"{run_dir} is not an evalhost run directory (no {MANIFEST}); pass the directory "
                        f"printed by `evalhost run`")
    for field, typ in _MANIFEST_SHAPE.items():
        if not isinstance(manifest.setdefault(field, typ()), typ):
            raise UserError(f"{run_dir / MANIFEST} has a {type(manifest[field]).__name__} as '{field}', not a "
                            f"{typ.__name__}; the file was edited by hand - restore it from the run")
    if manifest.get("study_sha256") != sha256_text(study.text):
        raise UserError(f"{run_dir} was started from a different study file (its copy is {run_dir}/study.toml); "
                        f"resume with that file or start a new run without --resume")
    return manifest


class _Progress:
    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.bar = None
        if enabled and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("generations", total=total, completed=done)
            self.bar.start()

    def log(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.console.print(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def advance(self, n: int, what: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=n, description=what or "generations")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _sigterm_as_interrupt():
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def run_study(study: Study, resume: Path | None = None, executor: str = "local",
              executor_options: dict[str, Any] | None = None, dry_run: bool = False, progress: bool = True,
              report: bool = True, out: Callable[[str], None] = print, limit: int | None = None,
              _held: contextlib.ExitStack | None = None) -> Path | None:
    """Run (or with ``dry_run`` only plan) a study. ``limit`` caps every task's items (a quick trial of a big study);
    it is recorded in the manifest and a resume keeps it. The run directory's lock is held until this returns."""
    if _held is None:  # the lock taken below is released when this call ends, however it ends
        with contextlib.ExitStack() as held:
            return run_study(study, resume, executor, executor_options, dry_run, progress, report, out, limit, held)
    registry = get_registry()
    if resume and limit is None:
        limit = RunDir(resume).read_json(MANIFEST, default={}).get("limit")
    if limit is not None:
        study.tasks = [replace(t, limit=min(t.limit or limit, limit)) for t in study.tasks]
    for problem in registry.problems:
        print(f"warning: {problem}", file=sys.stderr)
    used = {"backend": {b.plugin for b in study.backends}, "dispatcher": {d.plugin for d in study.dispatchers},
            "executor": {executor}}
    require_clean(registry, used)
    ex = registry.get("executor", executor)(executor_options or {})
    plan = build_plan(study, registry)
    if dry_run:
        out(describe(plan))
        text = ex.describe(plan)
        if text:
            out(text)
        return None

    if resume:
        run_dir = Path(resume)
        _held.enter_context(RunDir(run_dir).require().lock(purpose="resume"))
        manifest = _open_resume(study, run_dir)
    else:
        run_dir = _new_run_dir(study)
        _held.enter_context(RunDir(run_dir).lock(purpose="run"))
        RunDir(run_dir).write_atomic(STUDY, study.text)
        manifest = {
            "study": study.name, "study_file": str(study.path) if study.path else None,
            "study_sha256": sha256_text(study.text), "created": time.time(), "host": host_fingerprint(),
            "plugins": registry.plugins, "fingerprints": {}, "evidence": {}, "backend_fingerprints": {},
            "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_BATCH_INVARIANT", "CUBLAS_",
                                                                           "VLLM_ATTENTION", "EVALHOST_PLUGINS"))},
            "plan": {"generations": plan.n_generations(), "cells": len(plan.cells())}, "limit": limit,
        }
    if manifest.get("limit") != limit:
        raise UserError(f"{run_dir} was run with --limit {manifest.get('limit')}; resume it with the same limit")
    manifest["status"] = "running"
    manifest.setdefault("resumes", [])
    if resume:
        manifest["resumes"].append(time.time())
    write_json_atomic(run_dir / MANIFEST, manifest)

    done = recorded_keys(run_dir / RECORDS)
    total = plan.n_generations()
    bar = _Progress(total, len(done & {k for j in plan.jobs for k in j.keys()}), progress)
    out(f"run directory: {run_dir}  ({total} generations planned, {len(done)} already recorded)")
    context = RunContext(run_dir=run_dir, cache_dir=cache_dir(), log=bar.log,
                         load_items=lambda spec: _load_items(spec, registry, study))
    writer = RecordWriter(run_dir / RECORDS)
    scorers = _Scorers(registry)
    fids: dict[str, str] = {}
    run_id = run_dir.name

    def on_event(event) -> None:
        if isinstance(event, BackendStarted):
            fid = fingerprint_id(event.fingerprint)
            old = manifest["backend_fingerprints"].get(event.label)
            if old and old != fid:
                raise RunError(f"the stack of backend '{event.label}' changed since this run started (fingerprint "
                               f"{old} -> {fid}); start a new run instead of resuming this one")
            fids[event.label] = fid
            manifest["fingerprints"][fid] = event.fingerprint
            manifest["backend_fingerprints"][event.label] = fid
            if event.evidence:
                manifest["evidence"][event.label] = event.evidence
            write_json_atomic(run_dir / MANIFEST, manifest)
            bar.log(f"{event.label}: ready (fingerprint {fid})")
            return
        label = f"{event.job.model.name}/{event.job.backend.label}"
        records = [r for r in build_records(study, run_id, event, fids[label], scorers) if r["key"] not in done]
        for r in records:
            writer.write(r)
            done.add(r["key"])
        writer.sync()
        bar.advance(len(records), event.job.cell)

    old_handler = _sigterm_as_interrupt()
    status = "complete"
    try:
        facts = ex.run(plan.works, study.sampling, context, set(done), on_event)
        manifest["executor"] = facts or {"executor": executor}
    except KeyboardInterrupt:
        status = "interrupted"
        print(f"interrupted; {len(done)} records kept. Resume with: evalhost run {study.path} --resume {run_dir}",
              file=sys.stderr)
        raise
    except Exception as exc:
        status = f"stopped: {exc}"
        print(f"stopped; {len(done)} records kept. Resume with: evalhost run {study.path} --resume {run_dir}",
              file=sys.stderr)
        raise
    finally:
        bar.stop()
        writer.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        manifest["status"] = status  # written after the data, never before
        manifest["finished"] = time.time()
        write_json_atomic(run_dir / MANIFEST, manifest)
    if report:
        from .report import write_report

        path = write_report(run_dir)
        out(f"report: {path}")
    return run_dir


def _load_items(spec: str, registry: Registry, study: Study):
    from .plan import load_task
    from .study import TaskSpec

    return load_task(TaskSpec(name=spec.split(":")[-1].split("/")[-1], source=spec), registry,
                     study.path.parent if study.path else None)


def run_file(path: str | Path, **kwargs) -> Path | None:
    return run_study(load_study(path), **kwargs)
