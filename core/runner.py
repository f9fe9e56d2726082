"""The run loop's driver: plan -> executor -> records + manifest (the driver is the only writer of a run directory).

:func:`run_study` plans a study, makes (or, with ``resume``, reopens and locks) the run directory, hands the plan's
works to the executor, and turns the events of :func:`evalhost.run_worker.execute_work` (which runs in a worker:
this process for ``local``, a Ray actor for ``ray``) into scored records (:mod:`evalhost.record_schema`,
:mod:`evalhost.scoring`), appended to ``records.jsonl``, while it keeps ``manifest.json`` current
(:mod:`evalhost.run_manifest`). Resume: records already in ``records.jsonl`` are skipped by key. Progress goes to
stderr (:mod:`evalhost.progress`); SIGTERM stops a run like Ctrl-C (:mod:`evalhost.signals`).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .models import cache_dir
from .plan import build_plan, describe
from .progress import Progress
from .record_schema import SCHEMA_VERSION, build_records
from .records import RECORDS, RecordWriter, recorded_keys, write_json_atomic
from .registry import Registry, get_registry, require_clean
from .run_manifest import fingerprint_id, host_fingerprint, new_manifest, note_backend, open_resume
from .run_worker import BackendStarted, GroupDone, execute_work
from .rundir import MANIFEST, STUDY, RunDir
from .scoring import Scorers
from .signals import sigterm_as_interrupt
from .study import Study, load_study
from .types import RunContext

# names that lived here before the run loop was split; evalhost.api and older callers import them from here
__all__ = ["run_study", "run_file", "execute_work", "BackendStarted", "GroupDone", "build_records", "SCHEMA_VERSION",
           "fingerprint_id", "host_fingerprint"]


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
        limit = open_resume(study, Path(resume)).get("limit")
    if limit is not None:
        study.tasks = [replace(t, limit=min(t.limit or limit, limit)) for t in study.tasks]
    for problem in registry.problems:
        print(f"warning: {problem}", file=sys.stderr)
    used = {"backend": {b.plugin for b in study.backends}, "dispatcher": {d.plugin for d in study.dispatchers},
            "executor": {executor}}
    require_clean(registry, used)
    ex = registry.get("executor", executor)(executor_options or {})
    notes: list[str] = []
    plan = build_plan(study, registry, notes if dry_run else None)
    if dry_run:
        out(describe(plan))
        for note in notes:  # e.g. a model path that exists only on the machine the study is written for
            out(note)
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
        open_resume(study, run_dir)  # a directory that is not this study's run is refused before a lock file is left
        _held.enter_context(RunDir(run_dir).lock(purpose="resume"))
        manifest = open_resume(study, run_dir)  # read again under the lock
    else:
        run_dir = _new_run_dir(study)
        _held.enter_context(RunDir(run_dir).lock(purpose="run"))
        RunDir(run_dir).write_atomic(STUDY, study.text)
        manifest = new_manifest(study, registry, plan, limit)
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
    bar = Progress(total, len(done & {k for j in plan.jobs for k in j.keys()}), progress, left_by_cell)
    _held.callback(bar.stop)  # also when something below fails before the run starts (stop is idempotent)
    out(f"run directory: {run_dir}  ({total} generations planned, {len(done)} already recorded)")
    context = RunContext(run_dir=run_dir, cache_dir=cache_dir(), log=bar.log,
                         load_items=lambda spec: _load_items(spec, registry, study))
    writer = RecordWriter(run_dir / RECORDS)
    scorers = Scorers(registry)
    scorer_failed: list[str] = []
    fids: dict[str, str] = {}
    run_id = run_dir.name

    def on_event(event) -> None:
        if isinstance(event, BackendStarted):
            fid = fids[event.label] = note_backend(manifest, event)
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
        writer.group_done()  # fsync at most once per records.SYNC_INTERVAL_S (close always fsyncs)
        bar.advance(len(records), event.job.cell)

    restore_signals = sigterm_as_interrupt()
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
        restore_signals()
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
