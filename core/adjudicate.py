"""Study A adjudication: walk the solo/batch label flips of a run and record a human verdict for each.

``evalhost adjudicate RUN_DIR`` pairs every ``batch`` record with the ``solo`` record of the same
``(model, backend, task, item_id)`` and repeat 0; a pair whose labels differ is a *flip*. Each flip is shown with the
solo and batch outputs side by side (the differing spans highlighted) and the two labels, then asks::

    [g]enuine  the outputs really differ in the way the labels say (a real behaviour change)
    [a]rtifact the labels differ but the behaviour does not (scorer noise, a cut-off, formatting)
    [s]kip     decide later (recorded; ``--redo-skipped`` asks again)
    [q]uit     stop; the answers so far are kept

Every answer is appended at once to ``RUN_DIR/adjudications.jsonl`` (flush + fsync) as
``{"key": <batch record key>, "verdict": ..., "note": "", "ts": <epoch seconds>}``; a rerun skips flips already
answered, so an interrupted session resumes where it stopped. ``--import FILE`` appends verdicts made elsewhere
(JSONL with the same fields, or CSV with columns ``key,verdict[,note]``), after checking each one.
:func:`load_adjudications` (last answer per key wins) is what the report reads.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import click

from .errors import UserError
from .options import did_you_mean

ADJUDICATIONS = "adjudications.jsonl"
VERDICTS = ("genuine", "artifact", "skip")
_KEYS = {"g": "genuine", "a": "artifact", "s": "skip", "q": "quit"}


# -- reading -----------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file of the run directory (adjudications), read without following links and with
    evalhost.records' line bound; an unparseable *last* line without its newline (torn write) is ignored."""
    from .records import _lines

    rows: list[dict[str, Any]] = []
    for number, raw, ended in _lines(path):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (ValueError, RecursionError):
            if not ended:
                break
            raise UserError(f"{path}:{number} is not valid JSON; repair or remove that line") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_records(run_dir: Path) -> list[dict[str, Any]]:
    from .records import find_records, read_records

    return read_records(find_records(run_dir), checked=True)  # a hand-edited record of the wrong shape: UserError


def find_flips(records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(solo, batch) record pairs whose labels differ, in record order of the batch records."""
    solo: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        if rec.get("condition") == "solo" and int(rec.get("repeat", 0) or 0) == 0:
            solo.setdefault((rec.get("model"), rec.get("backend"), rec.get("task"), rec.get("item_id")), rec)
    flips = []
    for rec in records:
        if rec.get("condition") != "batch":
            continue
        partner = solo.get((rec.get("model"), rec.get("backend"), rec.get("task"), rec.get("item_id")))
        if partner is not None and partner.get("label") != rec.get("label"):
            flips.append((partner, rec))
    return flips


def _read_adjudication_rows(run_dir: Path) -> list[dict[str, Any]]:
    from .rundir import RunDir

    if not RunDir(run_dir).exists(ADJUDICATIONS):  # a link there is refused with one sentence
        return []
    path = Path(run_dir) / ADJUDICATIONS
    return [r for r in _read_jsonl(path) if isinstance(r.get("key"), str) and r.get("verdict") in VERDICTS]


def load_adjudications(run_dir: str | os.PathLike[str]) -> dict[str, str]:
    """``{batch record key: verdict}`` from ``RUN_DIR/adjudications.jsonl``; the last answer for a key wins."""
    verdicts: dict[str, str] = {}
    for row in _read_adjudication_rows(Path(run_dir)):
        verdicts[row["key"]] = row["verdict"]
    return verdicts


def _append(run_dir: Path, key: str, verdict: str, note: str = "") -> None:
    from .rundir import RunDir

    row = {"key": key, "verdict": verdict, "note": note, "ts": time.time()}
    with RunDir(run_dir).open_append(ADJUDICATIONS) as fh:  # O_APPEND | O_NOFOLLOW: never through a link
        fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(fh.fileno())


# -- showing -----------------------------------------------------------------------------------------------------
def _highlighted(solo: str, batch: str):
    """Two rich Texts with the spans that differ between the outputs highlighted (word-level diff)."""
    from rich.text import Text

    split = re.compile(r"\s+|\w+|[^\w\s]")
    a, b = split.findall(solo), split.findall(batch)
    left, right = Text(), Text()
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            left.append("".join(a[i1:i2]))
            right.append("".join(b[j1:j2]))
        else:
            left.append("".join(a[i1:i2]), style="bold black on red")
            right.append("".join(b[j1:j2]), style="bold black on green")
    return left, right, matcher.ratio()


def _show(console, number: int, total: int, solo: dict[str, Any], batch: dict[str, Any]) -> None:
    from rich.panel import Panel
    from rich.table import Table

    solo_text = str(solo.get("output_text") or "")
    batch_text = str(batch.get("output_text") or "")
    left, right, ratio = _highlighted(solo_text, batch_text)
    prefix = 0
    for x, y in zip(solo_text, batch_text):
        if x != y:
            break
        prefix += 1
    table = Table(show_lines=True, expand=True)
    table.add_column(f"solo: {solo.get('label')}  ({solo.get('rationale') or ''})", ratio=1)
    table.add_column(f"batch: {batch.get('label')}  ({batch.get('rationale') or ''})", ratio=1)
    table.add_row(left, right)
    title = (
        f"flip {number}/{total}  {batch.get('model')} / {batch.get('backend')} / {batch.get('task')} / "
        f"item {batch.get('item_id')}  (batch {batch.get('dispatcher')} bs{batch.get('batch_size')}, "
        f"repeat {batch.get('repeat')}, position {batch.get('position')})"
    )
    console.print(Panel(table, title=title))
    console.print(
        f"key: {batch.get('key')}   first difference at character {prefix}   similarity {ratio:.2f}   "
        f"finish: solo {solo.get('finish_reason')} / batch {batch.get('finish_reason')}"
    )


# -- importing ---------------------------------------------------------------------------------------------------
def _import_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise UserError(f"the import file {path} does not exist; check the path given to --import")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; re-save it with UTF-8 encoding") from None
    rows: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"key", "verdict"} <= {f.strip() for f in reader.fieldnames}:
            raise UserError(f"{path}:1 needs a header with the columns key,verdict (and optionally note)")
        for row in reader:
            clean = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            rows.append((f"{path}:{reader.line_num}", clean))
        return rows
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number} is not valid JSON; write one {{\"key\", \"verdict\"}} object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number} is not a JSON object; write one {{\"key\", \"verdict\"}} object per line")
        rows.append((f"{path}:{number}", row))
    return rows


def import_verdicts(run_dir: Path, path: Path, flip_keys: set[str], batch_keys: set[str]) -> int:
    """Validate every row first, then append them all; returns how many were imported."""
    checked = []
    for where, row in _import_rows(path):
        key, verdict = row.get("key"), str(row.get("verdict", "")).strip().lower()
        verdict = _KEYS.get(verdict, verdict) if len(verdict) == 1 else verdict
        if not isinstance(key, str) or not key:
            raise UserError(f"{where} has no 'key'; give the batch record key of the flip")
        if verdict not in VERDICTS:
            raise UserError(f"{where} has verdict {row.get('verdict')!r}; use genuine, artifact or skip")
        if key not in batch_keys:
            did = did_you_mean(key, sorted(flip_keys))
            raise UserError(f"{where} names key '{key}', which is no batch record of this run{did}; check the key")
        if key not in flip_keys:
            raise UserError(f"{where} names key '{key}', whose labels do not flip; remove that row")
        note = row.get("note") or ""
        checked.append((key, verdict, str(note)))
    for key, verdict, note in checked:
        _append(run_dir, key, verdict, note)
    return len(checked)


# -- the command -------------------------------------------------------------------------------------------------
@click.command("adjudicate")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--import", "import_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append verdicts from a JSONL or CSV file (key, verdict[, note]) instead of asking.")
@click.option("--redo-skipped", is_flag=True, help="Ask again about flips answered with [s]kip.")
@click.pass_context
def adjudicate(ctx: click.Context, run_dir: Path, import_file: Path | None, redo_skipped: bool) -> None:
    """Walk the solo/batch label flips of RUN_DIR and record genuine / artifact verdicts (resumable)."""
    import sys

    from .rundir import RunDir

    try:
        from .records import find_records

        find_records(run_dir)  # a directory that is not a run is refused before a lock file is left in it
        with RunDir(run_dir).lock(purpose="adjudicate"):  # one writer per run directory
            _adjudicate(run_dir, import_file, redo_skipped)
    except UserError as exc:
        from .cli import one_line

        click.echo(f"Error: {one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)  # not ctx.exit: under evalhost.cli.main (standalone_mode=False) that exited 0


def _adjudicate(run_dir: Path, import_file: Path | None, redo_skipped: bool) -> None:
    from rich.console import Console

    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass the directory of a run")
    records = _read_records(run_dir)
    flips = find_flips(records)
    if import_file is not None:
        batch_keys = {str(r.get("key")) for r in records if r.get("condition") == "batch"}
        n = import_verdicts(run_dir, import_file, {str(b.get("key")) for _, b in flips}, batch_keys)
        click.echo(f"imported {n} verdict(s) into {run_dir / ADJUDICATIONS}")
        return
    if not flips:
        click.echo(f"no label flips in {run_dir}: every batch record has the same label as its solo partner")
        return
    done = load_adjudications(run_dir)
    todo = [
        (s, b) for s, b in flips
        if str(b.get("key")) not in done or (redo_skipped and done[str(b.get("key"))] == "skip")
    ]
    click.echo(f"{len(flips)} flip(s), {len(flips) - len(todo)} already answered, {len(todo)} to go")
    console = Console(highlight=False, soft_wrap=False)
    answered = 0
    for number, (solo, batch) in enumerate(todo, start=len(flips) - len(todo) + 1):
        _show(console, number, len(flips), solo, batch)
        choice = click.prompt(
            "[g]enuine / [a]rtifact / [s]kip / [q]uit",
            type=click.Choice(["g", "a", "s", "q", "genuine", "artifact", "skip", "quit"], case_sensitive=False),
            show_choices=False,
        ).lower()
        verdict = _KEYS.get(choice, choice)
        if verdict == "quit":
            click.echo(f"stopped; {answered} answered this session, {len(todo) - answered} left (run again to resume)")
            return
        _append(run_dir, str(batch.get("key")), verdict)
        answered += 1
    click.echo(f"done: {answered} answered this session; verdicts in {run_dir / ADJUDICATIONS}")
