"""Append-only JSONL records.

Each record is one line, written with a single ``write`` right away (into the kernel's page cache, which outlives the
process), so ``kill -9`` loses at most the line in flight. fsync guards against a crash of the machine (power loss,
kernel panic): the run loop calls :meth:`RecordWriter.group_done` after each dispatch group's records, which fsyncs
when the last fsync is :data:`SYNC_INTERVAL_S` old or more, and :meth:`RecordWriter.close` always fsyncs. So a
machine crash loses at most the records of the last :data:`SYNC_INTERVAL_S` seconds plus the group in flight, and a
solo cell (one group per record) pays one fsync a second, not one per record (4 ms each on the shared CPU VM's disk,
more than its HTTP round trip). The last line of the file may lack its newline:

* it parses as a JSON object: it is a complete record (the kill came between the record and its newline);
  :func:`iter_records` returns it and :class:`RecordWriter` adds the newline before appending;
* it does not: it is a torn write; :func:`iter_records` skips it and :class:`RecordWriter` cuts it off.

Earlier lines are never rewritten. Files are opened through :class:`evalhost.rundir.RunDir` (no links followed).

Reading is a stream (:func:`iter_records`) with bounds a hostile file cannot exceed: a line longer than
:data:`MAX_LINE_BYTES` is refused, and a ``records.jsonl.gz`` that inflates more than :data:`GZIP_MAX_RATIO` times
its compressed size (once past :data:`GZIP_RATIO_FLOOR`) is refused as a decompression bomb. The committed H100 runs
(docs/results) have lines of at most 47 KB and inflate 6-11 times.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .errors import UserError
from .rundir import ARCHIVED, RECORDS, RunDir, _shown

MAX_LINE_BYTES = 64 * 2**20  # one record; real ones are kilobytes (46 KB with 1,000-token outputs and token ids)
GZIP_MAX_RATIO = 100  # decompressed / compressed bytes; JSONL records compress 6-11x
GZIP_RATIO_FLOOR = 16 * 2**20  # below this many decompressed bytes the ratio is not checked
SYNC_INTERVAL_S = 1.0  # RecordWriter.group_done fsyncs when the last fsync is this old (a machine crash loses <= this)

# identity fields: hashed, compared and sorted by analysis, so a list or dict there is refused, not crashed on
STRING_FIELDS = ("key", "study", "phase", "run_id", "cell", "model", "alignment_type", "backend", "backend_plugin",
                 "dispatcher", "dispatcher_plugin", "condition", "task", "task_source", "item_id", "domain",
                 "group_id", "prompt_sha256", "output_text", "output_sha256", "finish_reason", "scorer", "label",
                 "fingerprint_id", "candidate_kind")
INT_FIELDS = ("batch_size", "repeat", "position", "attempts", "schema")
LIST_FIELDS = ("peers", "output_token_ids")
DICT_FIELDS = ("timings", "backend_config", "dispatch_evidence")


class CorruptRecord(UserError):
    """A line of a records file that is not a record (``evalhost validate`` lists it as an error, exit 1); reads
    refused for their size or a link raise plain UserError (exit 2)."""


def find_records(run_dir: str | Path) -> Path:
    """The records file of a run directory (``records.jsonl``, or ``records.jsonl.gz`` for an archived run)."""
    rd = RunDir(run_dir).require()
    for name in (RECORDS, ARCHIVED):
        if rd.exists(name):  # a link or special file there is refused with one sentence
            return rd.path / name
    raise UserError(f"{_shown(rd.path)} has no {RECORDS}; pass a run directory made by `evalhost run`")


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def shape_problem(record: Any) -> str | None:
    """Why ``record`` cannot be analysed (a non-object, a list as a key, a dict as a label, ...), or None."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    for f in STRING_FIELDS:
        v = record.get(f)
        if v is not None and not isinstance(v, str):
            return f"has a {type(v).__name__} as '{f}' (a string is expected)"
    if not isinstance(record.get("key"), str):
        return "has no string 'key'"
    for f in INT_FIELDS:
        v = record.get(f)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            return f"has a {type(v).__name__} as '{f}' (an integer is expected)"
    for fields, typ in ((LIST_FIELDS, list), (DICT_FIELDS, dict)):
        for f in fields:
            v = record.get(f)
            if v is not None and not isinstance(v, typ):
                return f"has a {type(v).__name__} as '{f}' (a {typ.__name__} is expected)"
    return None


class _Counting:
    """A raw file that counts the bytes read from it (the compressed side of a gzip stream)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh, self.n = fh, 0

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.n += len(data)
        return data

    def close(self) -> None:
        self.fh.close()


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, ended by a newline) for each line of ``path`` (``.gz`` inflated), bounded."""
    try:
        raw = RunDir(path.parent).open_read(path.name)
    except FileNotFoundError:
        return
    counter = None
    fh: Any = raw
    if path.suffix == ".gz":
        import gzip

        counter = _Counting(raw)
        fh = gzip.GzipFile(fileobj=counter, mode="rb")  # type: ignore[arg-type]
    total = 0
    try:
        n = 0
        while True:
            try:
                line = fh.readline(MAX_LINE_BYTES + 1)
            except (OSError, EOFError, ValueError) as exc:  # gzip.BadGzipFile, zlib.error, truncated stream
                raise UserError(f"{_shown(path)} is not a readable gzip file ({exc}); restore it from the run") \
                    from None
            if not line:
                return
            n += 1
            if len(line) > MAX_LINE_BYTES:
                raise UserError(f"{_shown(path)}:{n} is longer than {MAX_LINE_BYTES // 2**20} MiB, far longer than "
                                f"any record evalhost writes; the file is corrupted or not a records file")
            if counter is not None:
                total += len(line)
                if total > GZIP_RATIO_FLOOR and total > GZIP_MAX_RATIO * max(counter.n, 1):
                    raise UserError(f"{_shown(path)} inflates more than {GZIP_MAX_RATIO} times its compressed size "
                                    f"(a decompression bomb, not evalhost records); refusing to read it")
            ended = line.endswith(b"\n")
            yield n, line, ended
    finally:
        fh.close()
        if fh is not raw:
            raw.close()


def iter_records(path: str | Path, strict: bool = False, checked: bool = False) -> Iterator[dict[str, Any]]:
    """Stream the complete records of a JSONL file (a run directory: its records file).

    The final line without a newline is skipped when it does not parse (a torn write). A bad line elsewhere raises
    UserError when ``strict`` (``evalhost validate``) and is skipped otherwise. With ``checked`` a record of the
    wrong shape (:func:`shape_problem`) raises UserError (report, resume); without it a non-object line is
    skipped (or raises when ``strict``)."""
    path = Path(path)
    if path.is_dir():
        path = find_records(path)
    for n, raw, ended in _lines(path):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, over-deep nesting
            if not ended:  # torn final write: the generation in flight when killed
                continue
            if strict or checked:
                raise CorruptRecord(f"{_shown(path)}:{n} is not a JSON record; the file was edited or corrupted by hand "
                                f"(run `evalhost validate`)") from None
            continue
        if checked:
            problem = shape_problem(rec)
            if problem:
                raise CorruptRecord(f"{_shown(path)}:{n} {problem}; the file was edited or corrupted by hand (run "
                                f"`evalhost validate`)")
        elif not isinstance(rec, dict):
            if strict:
                raise CorruptRecord(f"{_shown(path)}:{n} is a JSON {type(rec).__name__}, not a record object; the file "
                                f"was edited or corrupted by hand")
            continue
        yield rec


def read_records(path: str | Path, strict: bool = False, checked: bool = False) -> list[dict[str, Any]]:
    """All complete records of a JSONL file, as a list (see :func:`iter_records`)."""
    return list(iter_records(path, strict=strict, checked=checked))


def recorded_keys(path: str | Path) -> set[str]:
    """The keys already recorded (resume): records whose shape is wrong are refused with one sentence."""
    return {r["key"] for r in iter_records(path, checked=True)}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class RecordWriter:
    """Appends records to one JSONL file (``O_APPEND | O_NOFOLLOW``); repairs the tail a killed run left."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        rd = RunDir(self.path.parent)
        try:
            with rd.open_update(self.path.name) as fh:
                self._repair_tail(fh.fileno())
        except FileNotFoundError:
            pass
        self._fh = rd.open_append(self.path.name)
        self._synced_at = time.monotonic()
        self._unsynced = False

    @staticmethod
    def _repair_tail(fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        start, tail = size, b""
        while start > 0 and b"\n" not in tail and len(tail) <= MAX_LINE_BYTES:
            step = min(start, 1 << 16)
            start -= step
            tail = os.pread(fd, step, start) + tail
        cut = tail.rfind(b"\n") + 1
        keep = start + cut
        last = tail[cut:]
        try:
            whole = isinstance(json.loads(last), dict)
        except (ValueError, RecursionError):
            whole = False
        if whole:  # a complete record that lost only its newline: keep it (resume counted it as done)
            os.pwrite(fd, b"\n", size)
        else:  # the partial line never completed, so it was never a record
            os.ftruncate(fd, keep)
        os.fsync(fd)

    def write(self, record: dict[str, Any]) -> None:
        _write_all(self._fh.fileno(), (dumps(record) + "\n").encode("utf-8"))
        self._unsynced = True

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.write(r)
        self.sync()

    def group_done(self) -> None:
        """A dispatch group's records are written: fsync if the last fsync is :data:`SYNC_INTERVAL_S` old or more
        (the records are already in the page cache, safe from ``kill -9``; this bounds what a machine crash loses)."""
        if self._unsynced and time.monotonic() - self._synced_at >= SYNC_INTERVAL_S:
            self.sync()

    def sync(self) -> None:
        """fsync now (whatever was written since the last one)."""
        os.fsync(self._fh.fileno())
        self._synced_at = time.monotonic()
        self._unsynced = False

    def close(self) -> None:
        if not self._fh.closed:
            self.sync()
            self._fh.close()


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` via a uniquely named temp file + rename in the same directory, so a reader never sees
    half a file and two writers never share a temp file; a link at ``path`` is refused, not followed."""
    path = Path(path)
    RunDir(path.parent).write_json(path.name, data)
