"""``evalhost import FILE -o RUN_DIR``: solo/batch results produced elsewhere become an evalhost run directory.

Input: JSONL (``.jsonl``/``.json``, one object a line) or CSV (``.csv``, a header line), one row per (row, mode)::

    row_id, mode, model, task, domain, dispatcher, batch_size, phase, original_direction,
    solo_label, batch_label, solo_score, batch_score, solo_text_sha256, batch_text_sha256

optionally ``solo_text``, ``batch_text`` (the outputs) and ``scorer`` (the scorer's name); any other column is kept
in the records' ``metadata``. ``phase``, ``original_direction`` and the scores may be empty (unknown);
``batch_size`` 0 means the source does not say; a text hash may be left empty when its text is given.

Each row becomes two records in evalhost's record schema (:func:`evalhost.runner.build_records`): a ``solo`` record
and a ``batch`` record whose backend is the row's ``mode``, so that rows run under several modes (e.g. a standard
and a batch-invariant kernel path) are compared by Study D's paired analysis, row by row. What the source does not
say is recorded as unknown rather than made up: ``output_text`` is null when no text was given, ``output_token_ids``
is ``[]``, ``finish_reason`` is ``"unknown"``, ``peers`` is ``[]`` and ``timings`` is ``{}``; ``prompt_sha256`` is
the hash of a placeholder per ``row_id`` (``evalhost-import:ROW_ID``), the same for the solo and batch record and
for every mode, since both sides of a row were given the same prompt. Each mode gets one stack fingerprint in the
manifest that says it was imported (``{"imported": true, ...}``); the manifest also records
``"imported": {"source", "sha256", "rows"}``, ``"status": "complete"`` and ``"flip_on"``.

A bad row stops the import with one sentence naming ``FILE:LINE`` and the fix (exit 2) before anything is written;
the run directory is built in a hidden temporary directory next to it and renamed into place at the end, and an
existing RUN_DIR is never touched.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from .errors import UserError

COLUMNS = ("row_id", "mode", "model", "task", "domain", "dispatcher", "batch_size", "phase", "original_direction",
           "solo_label", "batch_label", "solo_score", "batch_score", "solo_text_sha256", "batch_text_sha256")
OPTIONAL = ("solo_text", "batch_text", "scorer")
DOMAINS = ("safety", "capability")
DIRECTIONS = ("refuse_to_comply", "comply_to_refuse", "safety_weakened", "safety_strengthened",
              "incorrect_to_correct", "correct_to_incorrect")
FLIP_ON = ("label", "score")
# fields every row of one row_id must agree on across modes (they describe the row, not the mode's result)
ROW_FIELDS = ("model", "task", "domain", "dispatcher", "batch_size", "phase", "original_direction")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
MAX_BYTES = 256 * 2**20


def _shown(value: Any, n: int = 60) -> str:
    """``repr`` of a value from the input, cut to ``n`` characters (a message stays one short sentence)."""
    r = repr(value)
    return r if len(r) <= n else r[: n - 4] + "...'"


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- reading ----------------------------------------------------------------------------------------------------
def read_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """(line number, raw row) for each row of a JSONL or CSV file, and the file's sha256."""
    if not path.is_file():
        raise UserError(f"{path} is not a file; pass the JSONL or CSV file of results to import")
    kind = path.suffix.lower()
    if kind not in (".jsonl", ".json", ".csv"):
        raise UserError(f"{path.name} is neither .jsonl nor .csv; name the file after its format (JSONL: one JSON "
                        f"object a line; CSV: a header line naming the columns)")
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"{path.name} is larger than {MAX_BYTES // 2**20} MiB; split it into several imports")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path.name}:{line} is not UTF-8 text; re-save the file as UTF-8") from None
    rows = _read_csv(path, text) if kind == ".csv" else _read_jsonl(path, text)
    if not rows:
        raise UserError(f"{path.name} holds no rows; it needs one row per (row_id, mode) with the columns "
                        f"{', '.join(COLUMNS)}")
    return rows, hashlib.sha256(data).hexdigest()


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 and the like
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path.name}:{n} is not valid JSON ({exc.msg}); write one JSON object per line") \
                from None
        if not isinstance(obj, dict):
            raise UserError(f"{path.name}:{n} is a JSON {type(obj).__name__}, not an object; write one object "
                            f"per line with the columns as keys")
        rows.append((n, obj))
    return rows


def _read_csv(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise UserError(f"{path.name}:1 is not valid CSV ({exc}); fix the header line") from None
    if header is None:
        return []
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path.name}:1 (the header) has no column {', '.join(missing)}; add "
                        f"{'it' if len(missing) == 1 else 'them'} (the columns are {', '.join(COLUMNS)})")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise UserError(f"{path.name}:1 (the header) names {', '.join(dup)} more than once; keep one column each")
    rows = []
    try:
        for fields in reader:
            n = reader.line_num
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise UserError(f"{path.name}:{n} has {len(fields)} fields but the header has {len(header)}; "
                                f"quote values that contain commas and give every column a value (empty is fine)")
            rows.append((n, dict(zip(header, fields))))
    except csv.Error as exc:
        raise UserError(f"{path.name}:{reader.line_num} is not valid CSV ({exc}); fix the quoting on that line") \
            from None
    return rows


# -- checking ---------------------------------------------------------------------------------------------------
class _Row:
    def __init__(self, where: str, raw: dict[str, Any], from_csv: bool) -> None:
        self.where, self.raw, self.from_csv = where, raw, from_csv

    def fail(self, column: str, problem: str, fix: str) -> UserError:
        return UserError(f"{self.where}: {column} {problem}; {fix}")

    def blank(self, column: str) -> bool:
        v = self.raw.get(column)
        return v is None or (isinstance(v, str) and not v.strip())

    def text(self, column: str, optional: bool = False, pattern: re.Pattern | None = None,
             key_part: bool = True) -> str | None:
        v = self.raw.get(column)
        if self.blank(column):
            if optional:
                return None
            raise self.fail(column, "is empty", f"give every row a {column}")
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise self.fail(column, f"is a {type(v).__name__} ({json.dumps(v)[:40]})", "write it as a string")
        v = str(v).strip()
        if key_part and "#" in v:
            raise self.fail(column, f"{_shown(v)} contains '#'", "evalhost record keys use '#' as a separator; "
                            "rename it")
        if pattern is not None and not pattern.match(v):
            raise self.fail(column, f"{_shown(v)} is not a plain name", "use letters, digits and . _ + - only")
        return v

    def label(self, column: str) -> str:
        v = self.raw.get(column)
        if not isinstance(v, str):
            raise self.fail(column, f"is {json.dumps(v)[:40]}, not a string",
                            "write the scorer's label as a string (e.g. \"refuse\")")
        if not v.strip():
            raise self.fail(column, "is empty", "give the scorer's label of that output")
        return v.strip()

    def score(self, column: str) -> float | None:
        v = self.raw.get(column)
        if self.blank(column):
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise self.fail(column, f"is {json.dumps(v)[:40]}", "write a number (e.g. 0.5) or leave it empty")
        try:
            x = float(v)
        except ValueError:
            raise self.fail(column, f"is {_shown(str(v))}, not a number", "write a number (e.g. 0.5) or leave it "
                            "empty when the scorer gave none") from None
        if not math.isfinite(x):
            raise self.fail(column, f"is {_shown(v)}", "write a finite number or leave it empty")
        return x

    def batch_size(self) -> int:
        v = self.raw.get("batch_size")
        ok = (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.strip().isdigit())
        if not ok or int(v) < 0:
            raise self.fail("batch_size", f"is {json.dumps(v)[:40]}",
                            "write a whole number of prompts in the batch (0 when the source does not say)")
        return int(v)

    def output(self, side: str) -> tuple[str | None, str]:
        col, text = f"{side}_text_sha256", self.raw.get(f"{side}_text")
        if text is not None and not isinstance(text, str):
            raise self.fail(f"{side}_text", f"is a {type(text).__name__}", "write the output text as a string")
        if self.from_csv and text == "":
            text = None  # CSV cannot tell an empty output from a text not given: an empty cell is not given
        sha = self.raw.get(col)
        if self.blank(col):
            if text is None:
                raise self.fail(col, "is empty", f"give the SHA-256 of the {side} output or its text ({side}_text)")
            return text, _sha256_text(text)
        if not isinstance(sha, str) or not _SHA.match(sha.strip().lower()):
            raise self.fail(col, f"is {json.dumps(sha)[:40]}, not a SHA-256", "write 64 hexadecimal digits")
        sha = sha.strip().lower()
        if text is not None and _sha256_text(text) != sha:
            raise self.fail(col, f"does not match {side}_text", "fix the hash or the text (the hash is of the "
                            "UTF-8 text)")
        return text, sha


def check_rows(name: str, rows: list[tuple[int, dict[str, Any]]], from_csv: bool = False) -> list[dict[str, Any]]:
    """Every row checked and normalised; raises UserError naming ``name:line`` at the first bad one."""
    out: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], int] = {}
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    for line, raw in rows:
        r = _Row(f"{name}:{line}", raw, from_csv)
        missing = [c for c in COLUMNS if c not in raw]
        if missing:
            raise UserError(f"{name}:{line} has no column {', '.join(missing)}; every row needs "
                            f"{', '.join(COLUMNS)}")
        row = {"line": line, "row_id": r.text("row_id"), "mode": r.text("mode", pattern=_NAME),
               "model": r.text("model"), "task": r.text("task"), "dispatcher": r.text("dispatcher", pattern=_NAME),
               "phase": r.text("phase", optional=True, key_part=False),
               "scorer": r.text("scorer", optional=True, key_part=False) or "imported"}
        domain = r.text("domain")
        if domain not in DOMAINS:
            raise r.fail("domain", f"is {_shown(domain)}", "use safety or capability")
        direction = r.text("original_direction", optional=True)
        if direction is not None and direction not in DIRECTIONS:
            raise r.fail("original_direction", f"is {_shown(direction)}",
                         f"use one of {', '.join(DIRECTIONS)} or leave it empty")
        row.update(domain=domain, original_direction=direction, batch_size=r.batch_size())
        for side in ("solo", "batch"):
            row[f"{side}_label"] = r.label(f"{side}_label")
            row[f"{side}_score"] = r.score(f"{side}_score")
            row[f"{side}_text"], row[f"{side}_sha"] = r.output(side)
        row["metadata"] = {k: v for k, v in raw.items() if k not in COLUMNS and k not in OPTIONAL
                           and not (from_csv and v == "")}  # an empty CSV cell: not given for this row
        key = (row["row_id"], row["mode"])
        if key in seen:
            raise UserError(f"{name}:{line} repeats row_id {_shown(row['row_id'])} under mode {row['mode']!r} "
                            f"(first on line {seen[key]}); keep one row per (row_id, mode)")
        seen[key] = line
        if row["row_id"] in first:
            at, other = first[row["row_id"]]
            for f in ROW_FIELDS:
                if other[f] != row[f]:
                    raise UserError(f"{name}:{line}: row_id {_shown(row['row_id'])} has {f} {_shown(row[f])} here "
                                    f"but {_shown(other[f])} on line {at}; a row's {f} is the same under every "
                                    f"mode (give different rows different row_ids)")
        else:
            first[row["row_id"]] = (line, row)
        out.append(row)
    return out


# -- building ---------------------------------------------------------------------------------------------------
def _fingerprint(mode: str, source: str, sha: str) -> dict[str, Any]:
    return {"imported": True, "backend": mode, "backend_plugin": "imported", "source": source, "source_sha256": sha,
            "note": "produced outside evalhost; the stack (versions, device, server arguments) was not recorded "
                    "here - see the source"}


def build_records(rows: list[dict[str, Any]], study: str, run_id: str, source: str,
                  fids: dict[str, str]) -> list[dict[str, Any]]:
    """Two records (solo, batch) per checked row, in evalhost's record schema."""
    from .plan import cell_id, record_key
    from .record_schema import SCHEMA_VERSION

    out = []
    for row in rows:
        mode, rid = row["mode"], row["row_id"]
        for cond in ("solo", "batch"):
            disp, bs = ("solo", 1) if cond == "solo" else (row["dispatcher"], row["batch_size"])
            cell = cell_id(row["model"], mode, row["task"], disp, bs)
            text = row[f"{cond}_text"]
            out.append({
                "schema": SCHEMA_VERSION, "key": record_key(cell, rid, 0), "study": study, "phase": row["phase"],
                "run_id": run_id, "cell": cell, "model": row["model"], "alignment_type": None,
                "backend": mode, "backend_plugin": "imported", "backend_config": {},
                "dispatcher": disp, "dispatcher_plugin": "imported", "arm": None, "batch_size": bs,
                "condition": cond, "repeat": 0, "task": row["task"], "task_source": f"import:{source}",
                "item_id": rid, "domain": row["domain"], "group_id": f"{rid}/{mode}/{cond}", "position": 0,
                "peers": [], "prompt_sha256": _sha256_text(f"evalhost-import:{rid}"),
                "output_text": text, "output_token_ids": [], "output_sha256": row[f"{cond}_sha"],
                "finish_reason": "unknown", "logprobs": None, "scorer": row["scorer"],
                "label": row[f"{cond}_label"], "score": row[f"{cond}_score"], "rationale": "imported",
                "scorer_error": None, "timings": {}, "attempts": 1, "restarted": False,
                "dispatch_evidence": {"imported": True}, "fingerprint_id": fids[mode], "candidate_kind": None,
                "original_direction": row["original_direction"], "metadata": row["metadata"],
                "imported": {"source": source, "line": row["line"]},
            })
    return out


def import_file(path: str | Path, run_dir: str | Path, flip_on: str = "label", study: str | None = None
                ) -> tuple[Path, int, int]:
    """Import ``path`` into the new directory ``run_dir``; returns (run_dir, rows, records). Nothing is written
    unless every row is good, and an existing ``run_dir`` is refused."""
    from .run_manifest import fingerprint_id, host_fingerprint

    path, run_dir = Path(path), Path(run_dir)
    if flip_on not in FLIP_ON:
        raise UserError(f"--flip-on is {flip_on!r}; use label (a label change is a flip) or score (a score change "
                        f"is a flip)")
    if os.path.lexists(run_dir):
        raise UserError(f"{run_dir} already exists; choose a new directory (an import never overwrites one)")
    raw, sha = read_rows(path)
    rows = check_rows(path.name, raw, from_csv=path.suffix.lower() == ".csv")
    study = study or path.stem
    modes = sorted({r["mode"] for r in rows})
    fps = {m: _fingerprint(m, path.name, sha) for m in modes}
    fids = {m: fingerprint_id(fp) for m, fp in fps.items()}
    records = build_records(rows, study, run_dir.name, path.name, fids)
    keys: dict[str, int] = {}
    for rec in records:
        line = rec["imported"]["line"]
        if keys.setdefault(rec["key"], line) != line:
            raise UserError(f"{path.name}:{line} makes the same record key as line {keys[rec['key']]} "
                            f"({rec['key']}); a '/' in model or task names makes them ambiguous - rename them")
    now = time.time()
    manifest = {
        "study": study, "study_file": None, "created": now, "finished": now, "status": "complete",
        "imported": {"source": path.name, "sha256": sha, "rows": len(rows)}, "flip_on": flip_on,
        "host": host_fingerprint(), "plugins": [], "fingerprints": {fids[m]: fps[m] for m in modes},
        "backend_fingerprints": {f"{mo}/{m}": fids[m] for mo, m in sorted({(r["model"], r["mode"]) for r in rows})},
        "evidence": {}, "env": {}, "limit": None,
        "plan": {"generations": len(records), "cells": len({r["cell"] for r in records})},
    }
    from .import_bridge import publish_run

    publish_run(run_dir, records, manifest)
    return run_dir, len(rows), len(records)


def study_d_section(report: str) -> str:
    """The Study D part of a report.md (from its "## Study D" heading to the next "## " heading, without image
    links), which ``evalhost import`` prints: the paired comparison of the imported modes."""
    start = report.find("\n## Study D")
    if start < 0:
        return ""
    end = report.find("\n## ", start + 1)
    body = report[start + 1:end if end >= 0 else len(report)]
    return "\n".join(line for line in body.splitlines() if not line.startswith("![")).strip()



# -- the lm-eval and inspect bridges (evalhost.import_lmeval, evalhost.import_inspect) --------------------------
BRIDGES = ("lm-eval", "inspect")


def import_pair(source: str, solo: str | Path, batch: str | Path, run_dir: str | Path, flip_on: str = "label",
                study: str | None = None, metric: str | None = None) -> dict[str, Any]:
    """``evalhost import --from lm-eval|inspect SOLO BATCH -o RUN_DIR``: two result files of one task, the first
    the solo side and the second the batch side, paired sample by sample (see :mod:`evalhost.import_bridge`)."""
    if source == "lm-eval":
        from .import_lmeval import import_lmeval as bridge
    elif source == "inspect":
        from .import_inspect import import_inspect as bridge
    else:
        raise UserError(f"--from {source!r} is not a format evalhost imports; use lm-eval or inspect")
    return bridge(Path(solo), Path(batch), Path(run_dir), flip_on=flip_on, study=study, metric=metric)

