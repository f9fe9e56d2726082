"""``evalhost rescore RUN_DIR [--scorer NAME]``: score a finished run's stored outputs again (no generation, no
backend), keep the labels it replaces, rewrite the report.

Design (records stay append-only for runs; a rescore replaces the records file whole, never edits it in place):

1. take the run directory's lock (:meth:`evalhost.rundir.RunDir.lock`, the one ``run`` holds);
2. score every record's ``output_text`` with the scorer the run's rule picks (:func:`evalhost.scoring.scorer_for`:
   ``--scorer NAME``, else the task's scorer, else the item's own), using the task items of the run's own
   ``study.toml``; a scorer that raises gives that record ``label = score = None`` and ``scorer_error``;
3. when a label, score, rationale, scorer name or scorer error changed: append one entry to the sidecar
   ``rescore-history.jsonl`` (one JSON line per rescore: when, which scorer, the SHA-256 of the records before and
   after, and for each changed record its ``key`` with the ``old`` and ``new`` values) and write it atomically
   (temp file + rename); then write the new records file the same way (``records.jsonl``, or ``records.jsonl.gz``
   for an archived run; unchanged lines are kept byte for byte);
4. rewrite ``report.md`` / ``summary.json`` (:func:`evalhost.report.write_report`).

The rename of the records file is the commit. A ``kill -9`` before it leaves the old records; one between the two
renames leaves a last history entry whose ``before_sha256`` is still the records' hash: that entry never took
effect, :func:`read_history` ignores it and the next rescore removes it (with any temp file a kill left). So the
directory is always in the old or the new state, and a second ``rescore`` finishes the job.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import UserError
from .rundir import ARCHIVED, MANIFEST, RECORDS, STUDY, RunDir, _shown

HISTORY = "rescore-history.jsonl"
HISTORY_LIMIT = 1 << 30
SCORE_FIELDS = ("scorer", "label", "score", "rationale", "scorer_error")


def _maybe_die(point: str) -> None:
    """Fault injection for the crash-safety test: ``EVALHOST_TEST_KILL_AT=point`` kills this process there."""
    if os.environ.get("EVALHOST_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ history
def _history_lines(rd: RunDir) -> list[bytes]:
    try:
        data = rd.read_bytes(HISTORY, HISTORY_LIMIT)
    except FileNotFoundError:
        return []
    return [ln for ln in data.split(b"\n") if ln.strip()]


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return entry if isinstance(entry, dict) else None


def _records_name(rd: RunDir) -> str:
    for name in (RECORDS, ARCHIVED):
        if rd.exists(name):
            return name
    raise UserError(f"{_shown(rd.path)} has no {RECORDS}; pass a run directory made by `evalhost run`")


def _read_lines(rd: RunDir, name: str) -> list[bytes]:
    """The records file's lines (inflated when archived), each with its newline; read with the records module's
    bounds (line length, gzip ratio)."""
    from .records import _lines

    return [line for _, line, _ in _lines(rd.path / name)]


def _sha(lines: list[bytes]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line)
    return h.hexdigest()


def _uncommitted(entries: list[dict[str, Any]], records_sha: str) -> bool:
    """Whether the last history entry never took effect (killed after the history write, before the records')."""
    if not entries:
        return False
    last = entries[-1]
    return last.get("before_sha256") == records_sha and last.get("after_sha256") != records_sha


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rescores that took effect, oldest first (each: ``rescore``, ``at``, ``scorer``, ``before_sha256``,
    ``after_sha256``, ``changed`` = [{``key``, ``old``, ``new``}], ``records``)."""
    rd = RunDir(run_dir).require()
    entries = [e for e in (_parse(ln) for ln in _history_lines(rd)) if e is not None]
    if entries and _uncommitted(entries, _sha(_read_lines(rd, _records_name(rd)))):
        entries.pop()
    return entries


def _recover(rd: RunDir, records_sha: str) -> list[bytes]:
    """Drop an entry that never took effect and temp files a kill left; return the history's lines."""
    for path in rd.path.glob(".*.tmp"):
        if path.name.startswith((f".{RECORDS}.", f".{ARCHIVED}.", f".{HISTORY}.")) and path.is_file():
            path.unlink()
    lines = _history_lines(rd)
    entries = [_parse(ln) for ln in lines]
    if entries and entries[-1] is not None and _uncommitted([entries[-1]], records_sha):
        lines = lines[:-1]
        rd.write_atomic(HISTORY, b"".join(ln + b"\n" for ln in lines))
    return lines


# ------------------------------------------------------------------------------------------------ items
def _load_items(rd: RunDir, manifest: dict[str, Any], registry) -> tuple[Any, dict[tuple[str, str], Any]]:
    """The run's study (from its own study.toml) and its task items by (task, item id), every item (no limit)."""
    from .plan import load_task
    from .study import parse_study

    if manifest.get("imported") is not None or not rd.exists(STUDY):
        raise UserError(f"{_shown(rd.path)} has no {STUDY} (an imported run?); rescore needs the study and task "
                        f"files the run was made from")
    text = rd.read_bytes(STUDY, 16 * 2**20).decode("utf-8", "replace")
    origin = Path(str(manifest.get("study_file") or ""))
    base = origin.parent if manifest.get("study_file") and origin.parent.is_dir() else rd.path
    study = parse_study(text, base / (origin.name or STUDY))
    items: dict[tuple[str, str], Any] = {}
    for task in study.tasks:
        try:
            loaded = load_task(replace(task, limit=None), registry, base)
        except UserError as exc:
            raise UserError(f"rescore needs the task files the run used, and task '{task.name}' cannot be loaded: "
                            f"{exc}") from None
        for item in loaded:
            items[(task.name, item.id)] = item
    return study, items


# ------------------------------------------------------------------------------------------------ rescore
def rescore_run(run_dir: str | Path, scorer: str | None = None, report: bool = True) -> dict[str, Any]:
    """Rescore ``run_dir`` (see the module docstring); returns counts and the history entry (None: no change)."""
    from .registry import get_registry
    from .records import dumps
    from .scoring import Scorers

    rd = RunDir(run_dir).require()
    rd.read_json(MANIFEST)  # not a run directory: refused before the lock file is made in it
    with rd.lock(purpose="rescore"):
        manifest = rd.read_json(MANIFEST)
        if manifest.get("status") != "complete":
            raise UserError(f"{_shown(rd.path)} is not a finished run (status {manifest.get('status')!r}); finish it "
                            f"with `evalhost run STUDY --resume {_shown(rd.path)}` first, then rescore")
        registry = get_registry()
        if scorer is not None:
            registry.get("scorer", scorer)  # an unknown name: one sentence with "did you mean"
        name = _records_name(rd)
        lines = _read_lines(rd, name)
        before = _sha(lines)
        history = _recover(rd, before)
        study, items = _load_items(rd, manifest, registry)
        tasks = {t.name: t for t in study.tasks}
        scorers = Scorers(registry, override=scorer)

        new_lines: list[bytes] = []
        changed: list[dict[str, Any]] = []
        n = errors_before = 0
        for i, line in enumerate(lines):
            rec = _parse(line)
            if rec is None or not isinstance(rec.get("output_text"), str):
                if rec is None and not line.endswith(b"\n") and i == len(lines) - 1:
                    continue  # a torn final write is not a record
                new_lines.append(line if line.endswith(b"\n") else line + b"\n")
                continue
            task, item = tasks.get(rec.get("task")), items.get((rec.get("task"), rec.get("item_id")))
            if task is None or item is None:
                raise UserError(f"record {_shown(rec.get('key'), 120)} is item {_shown(rec.get('item_id'), 60)} of "
                                f"task {_shown(rec.get('task'), 40)}, which the run's task files no longer have; "
                                f"rescore needs the task files the run used (nothing was changed)")
            n += 1
            errors_before += rec.get("scorer_error") is not None
            sname, score, error = scorers.score_item(task, item, rec["output_text"])
            new = {"scorer": sname, "label": None if score is None else score.label,
                   "score": None if score is None else score.value,
                   "rationale": None if score is None else score.rationale, "scorer_error": error}
            old = {k: rec.get(k) for k in SCORE_FIELDS}
            if new == old:
                new_lines.append(line if line.endswith(b"\n") else line + b"\n")
                continue
            changed.append({"key": rec.get("key"), "old": old, "new": new})
            new_lines.append((dumps({**rec, **new}) + "\n").encode("utf-8"))
        _maybe_die("scored")

        entry = None
        if changed:
            after = _sha(new_lines)
            entry = {"rescore": len(history) + 1, "at": time.time(), "scorer": scorer, "records_file": name,
                     "before_sha256": before, "after_sha256": after, "records": n, "changed": changed}
            rd.write_atomic(HISTORY, b"".join(ln + b"\n" for ln in history)
                            + json.dumps(entry, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
            _maybe_die("history")
            data = b"".join(new_lines)
            rd.write_atomic(name, gzip.compress(data, mtime=0) if name == ARCHIVED else data)
            _maybe_die("records")
        result = {"records": n, "changed": len(changed), "scorer_errors_before": errors_before,
                  "scorer_errors": scorers.errors, "entry": entry, "report": None}
        if report:
            from .report import write_report

            result["report"] = write_report(rd.path)
            _maybe_die("report")
    return result
