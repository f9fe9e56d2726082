"""Append-only JSONL records.

Each record is one line, written with a single ``write`` and flushed at once, so ``kill -9`` loses at most the line in
flight; :meth:`RecordWriter.sync` fsyncs (the run loop calls it once per dispatch group, which keeps the guarantee for
power loss at group granularity). A torn last line (no newline, or not JSON) is ignored by :func:`read_records` and
cut off by :class:`RecordWriter` before it appends again; earlier lines are never rewritten.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import UserError

RECORDS = "records.jsonl"
ARCHIVED = "records.jsonl.gz"  # a finished run's records, compressed for committing (read-only)


def find_records(run_dir: str | Path) -> Path:
    """The records file of a run directory (``records.jsonl``, or ``records.jsonl.gz`` for an archived run)."""
    run_dir = Path(run_dir)
    for name in (RECORDS, ARCHIVED):
        if (run_dir / name).is_file():
            return run_dir / name
    raise UserError(f"{run_dir} has no {RECORDS}; pass a run directory made by `evalhost run`")


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def read_records(path: str | Path, strict: bool = False) -> list[dict[str, Any]]:
    """All complete records of a JSONL file. A torn *last* line is skipped; a bad line elsewhere raises UserError
    when ``strict`` (``evalhost validate``) and is skipped otherwise."""
    path = Path(path)
    if path.is_dir():
        path = find_records(path)
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    if path.suffix == ".gz":
        import gzip

        with gzip.open(path, "rb") as fh:
            lines = fh.read().split(b"\n")
    else:
        with path.open("rb") as fh:
            lines = fh.read().split(b"\n")
    last = len(lines) - 1
    for n, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            out.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if n == last:  # torn final write (no newline after it): the generation in flight when killed
                continue
            if strict:
                raise UserError(f"{path}:{n + 1} is not a JSON record; the file was edited or corrupted by hand")
    return out


class RecordWriter:
    """Appends records to one JSONL file; repairs a torn tail left by a killed run before appending."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._cut_torn_tail()
        self._fh = self.path.open("a", encoding="utf-8")

    def _cut_torn_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as fh:
            data = fh.read()
            if data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1  # drop the partial line (it never completed, so it was never a record)
            fh.truncate(keep)

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(dumps(record) + "\n")
        self._fh.flush()

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.write(r)
        self.sync()

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.sync()
            self._fh.close()


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` via a temp file + rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
