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
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__
from .errors import RunError, UserError
from .models import cache_dir
from .plan import BackendWork, Job, build_plan, describe, record_key
from .registry import Registry, get_registry, require_clean
from .backend_extra import record_extra
from .cobatch import finalize
from .dispatch_needs import check_started
from .solo_cache import SoloCache, enabled as solo_enabled, plugins_in_use, solo_stack
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
        # what the endpoint turned out to lack (a probe at start) refuses the study before the first group
        check_started(backend, [j.dispatcher for j in todo], registry, work.backend.label)
        fp = {"backend_plugin": work.backend.plugin, "backend_config": work.backend.options,
              "model": asdict(work.model), **backend.fingerprint(),
              # every plugin this work uses, as "distribution==version" (the backend's keys the solo cache)
              "evalhost": __version__, "plugins": plugins_in_use(registry, work)}
        yield BackendStarted(work.label, fp, backend.evidence())
        cache = SoloCache(context.cache_dir, solo_stack(fp)) if solo_enabled() else None
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
    """Scorer instances by (name, options). A scorer that raises on one output does not stop the run: the record
    gets ``label = score = None`` and ``scorer_error = "ExcType: message"`` (fix the scorer, then ``evalhost
    rescore RUN_DIR``). ``override`` names one scorer for every item (``evalhost rescore --scorer NAME``)."""

    def __init__(self, registry: Registry, override: str | None = None) -> None:
        self.registry, self.cache, self.override, self.errors = registry, {}, override, 0

    def score_item(self, task, item, text: str) -> tuple[str, Any, str | None]:
        """(scorer name, Score or None, error or None) for one output of ``item`` under task spec ``task``."""
        name = self.override or task.scorer or item.scorer
        options = {} if self.override and self.override != task.scorer else task.scorer_options
        key = (name, json.dumps(options, sort_keys=True))
        if key not in self.cache:
            self.cache[key] = self.registry.get("scorer", name)(options)
        try:
            return name, self.cache[key].score(item, text), None
        except Exception as exc:  # noqa: BLE001 - any scorer failure is this record's, not the run's
            self.errors += 1
            return name, None, one_line_error(exc)

    def score(self, job: Job, item, text: str) -> tuple[str, Any, str | None]:
        return self.score_item(job.task, item, text)


def one_line_error(exc: BaseException) -> str:
    """``"ExcType: message"`` on one line, at most 500 characters (stored in a record's ``scorer_error``)."""
    text = f"{type(exc).__name__}: {exc}".replace("\r", " ").replace("\n", " ")
    return text if len(text) <= 500 else text[:497] + "..."


def build_records(study: Study, run_id: str, done: GroupDone, fid: str, scorers: _Scorers) -> list[dict[str, Any]]:
    job, result = done.job, done.result
    ids = [item.id for item, _ in job.members]
    out = []
    for pos, ((item, role), prompt, gen) in enumerate(zip(job.members, done.prompts, result.generations)):
        if role != "target":
            continue
        scorer, score, scorer_error = scorers.score(job, item, gen.text)
        cand = item.metadata.get("candidate") or {}
        t = dict(gen.timings)
        if "sent" in t and "finished" in t:
            t["latency_s"] = round(t["finished"] - t["sent"], 6)
        out.append({
            "schema": SCHEMA_VERSION,
            "key": record_key(job.cell, item.id, job.repeat),
            "study": study.name, "phase": cand.get("phase") or study.phase, "run_id": run_id, "cell": job.cell,
            "model": job.model.name, "alignment_type": job.model.alignment_type,
            "backend": job.backend.label, "backend_plugin": job.backend.plugin, "backend_config": job.backend.options,
            "dispatcher": job.dispatcher.label, "dispatcher_plugin": job.dispatcher.plugin,
            "arm": job.dispatcher.options.get("arm"),
            "batch_size": job.batch_size, "condition": job.condition, "repeat": job.repeat,
            "task": item.task, "task_source": cand.get("task_source", job.task.source), "item_id": item.id,
            "domain": item.domain,
            "group_id": job.group_id, "position": pos, "peers": ids[:pos] + ids[pos + 1:],
            "prompt_sha256": sha256_text(prompt),
            "output_text": gen.text, "output_token_ids": list(gen.token_ids), "output_sha256": sha256_text(gen.text),
            "finish_reason": gen.finish_reason, "logprobs": gen.logprobs,
            # [sampling] top_logprobs = k: per output token its k most likely [token, logprob], most likely first
            **({"top_logprobs": gen.top_logprobs} if gen.top_logprobs is not None else {}),
            "scorer": scorer, "label": None if score is None else score.label,
            "score": None if score is None else score.value,
            "rationale": None if score is None else score.rationale, "scorer_error": scorer_error,
            "timings": t, "attempts": gen.attempts, "restarted": gen.restarted,
            # batch groups get their co-batching verdict and whether it counts (evalhost.cobatch)
            "dispatch_evidence": finalize(result.evidence, job.condition, study.count_unverified, len(job.members)),
            "fingerprint_id": fid,
            # Generation.extra, JSON-safe and at most 64 KiB (evalhost.backend_extra)
            "backend_extra": record_extra(gen.extra),
            "candidate_kind": cand.get("kind"),
            # Study D: the discovery row's direction in the addendum's vocabulary (candidates task source)
            "original_direction": cand.get("original_direction"),
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
    manifest = RunDir(run_dir).read_json(MANIFEST, default=None) if run_dir.is_dir() else None
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


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Progress:
    """Progress on stderr: a bar on a terminal; otherwise (a log file, a pipe, CI) one line every
    ``EVALHOST_PROGRESS_S`` seconds (default 5), e.g. ``generations 120/480 (25%), 3 of 24 cells done, elapsed
    1:02, eta 3:05``, and a last line when the run stops. ``left_by_cell``: generations still to make per cell."""

    def __init__(self, total: int, done: int, enabled: bool, left_by_cell: dict[str, int] | None = None) -> None:
        self.bar = None
        self.total, self.done, self.done0 = total, done, done
        self.left = dict(left_by_cell or {})
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._lines = 0
        if not (enabled and total):
            return
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("generations", total=total, completed=done)
            self.bar.start()
            return
        try:
            self.interval = max(0.05, float(os.environ.get("EVALHOST_PROGRESS_S", "5")))
        except ValueError:
            self.interval = 5.0
        self._thread = threading.Thread(target=self._tick, name="evalhost-progress", daemon=True)
        self._thread.start()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        made = self.done - self.done0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = _clock((self.total - self.done) * elapsed / made) if made > 0 else "unknown"
        cells = f"{sum(1 for v in self.left.values() if v <= 0)} of {len(self.left)} cells done, " if self.left else ""
        return (f"generations {self.done}/{self.total} ({pct:.0f}%), {cells}elapsed {_clock(elapsed)}, "
                f"eta {eta}")

    def _print(self, msg: str) -> None:
        with self._lock:
            print(msg, file=sys.stderr, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._lines += 1
            self._print(self.line())

    def log(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.console.print(msg)
        else:
            self._print(msg)

    def advance(self, n: int, what: str = "") -> None:
        self.done += n
        if what in self.left:
            self.left[what] -= n
        if self.bar is not None:
            self.bar.update(self.task, advance=n, description=what or "generations")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if self._lines:
                self._print(self.line())


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
        limit = _open_resume(study, Path(resume)).get("limit")
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
        for b in study.backends:  # what a backend's preflight would refuse here, said before anyone waits for it
            check = getattr(registry.get("backend", b.plugin), "preflight_problem", None)
            problem = check(b.options) if check else None
            if problem:
                out(f"backend '{b.label}' will be refused on this machine: {problem}")
        text = ex.describe(plan)
        if text:
            out(text)
        return None

    if resume:
        run_dir = Path(resume)
        _open_resume(study, run_dir)  # a directory that is not this study's run is refused before a lock file is left
        _held.enter_context(RunDir(run_dir).lock(purpose="resume"))
        manifest = _open_resume(study, run_dir)  # read again under the lock
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
            "flip_on": study.flip_on,
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
    left_by_cell: dict[str, int] = {}
    for j in plan.jobs:
        left_by_cell[j.cell] = left_by_cell.get(j.cell, 0) + sum(k not in done for k in j.keys())
    bar = _Progress(total, len(done & {k for j in plan.jobs for k in j.keys()}), progress, left_by_cell)
    _held.callback(bar.stop)  # also when something below fails before the run starts (stop is idempotent)
    out(f"run directory: {run_dir}  ({total} generations planned, {len(done)} already recorded)")
    context = RunContext(run_dir=run_dir, cache_dir=cache_dir(), log=bar.log,
                         load_items=lambda spec: _load_items(spec, registry, study))
    writer = RecordWriter(run_dir / RECORDS)
    scorers = _Scorers(registry)
    scorer_failed: list[str] = []
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
            if r["scorer_error"]:
                scorer_failed.append(r["key"])
                if len(scorer_failed) <= 5:
                    bar.log(f"warning: scorer '{r['scorer']}' failed on {r['key']} ({r['scorer_error']}); the "
                            f"record keeps its output with no label")
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
    if scorer_failed:
        print(f"warning: the scorer failed on {len(scorer_failed)} record(s) (label null, field scorer_error); "
              f"fix the scorer, then run: evalhost rescore {run_dir}", file=sys.stderr)
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
