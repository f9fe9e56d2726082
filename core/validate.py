"""``evalhost validate RUN_DIR``: schema, duplicates, solo/batch pairing completeness, fingerprint consistency.

The records are read as a stream, twice, and only fixed-size facts are kept per record (a 64-bit hash of its key;
for a repeat-0 solo record, hashes of its pairing key and prompt), so memory stays bounded on runs of millions of
records (bench/validate_memory.py). Messages are capped: at most :data:`MAX_MESSAGES` errors are listed, then a count.
"""
from __future__ import annotations

import json
from array import array
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import UserError
from .records import CorruptRecord, find_records, iter_records
from .rundir import MANIFEST, RunDir

REQUIRED: dict[str, type | tuple] = {
    "key": str, "study": str, "cell": str, "model": str, "backend": str, "dispatcher": str, "batch_size": int,
    "condition": str, "repeat": int, "task": str, "item_id": str, "domain": str, "group_id": str, "position": int,
    "peers": list, "prompt_sha256": str, "output_text": (str, type(None)), "output_token_ids": list, "output_sha256": str,
    "finish_reason": str, "label": str, "timings": dict, "attempts": int, "restarted": bool,
    "fingerprint_id": str,
}
MAX_MESSAGES = 200
SHOWN = 20  # unpaired / mismatched records named one by one before "... and N more"


def _h(*values: Any) -> int:
    """A 64-bit hash of ``values`` (any JSON values; lists and dicts from a hand-edited file included)."""
    try:
        return hash(values)
    except TypeError:
        return hash(json.dumps(values, sort_keys=True, default=str))


def _pair(r: dict[str, Any]) -> int:
    return _h(r.get("model"), r.get("backend"), r.get("task"), r.get("item_id"))


def _is_solo0(r: dict[str, Any]) -> bool:
    return r.get("condition") == "solo" and r.get("repeat") == 0


class _Errors(list):
    """A list of messages that stops growing at MAX_MESSAGES (the rest are counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.more = 0

    def add(self, msg: str) -> None:
        if len(self) < MAX_MESSAGES:
            self.append(msg)
        else:
            self.more += 1

    def done(self) -> list[str]:
        return list(self) + ([f"... and {self.more} more errors"] if self.more else [])


class _PromptsAcross:
    """Backends of one model that sent the same item as different prompts (two passes over the records)."""

    def __init__(self) -> None:
        self.first: dict[int, tuple[int, int]] = {}  # (model, task, item) -> (backend, prompt) of the first solo
        self.differ: set[int] = set()
        self.example: tuple[int, dict[str, Any]] | None = None

    def see(self, r: dict[str, Any]) -> None:
        if _is_solo0(r):
            k, v = _h(r.get("model"), r.get("task"), r.get("item_id")), (_h(r.get("backend")), _h(r.get("prompt_sha256")))
            seen = self.first.setdefault(k, v)
            if seen[1] != v[1] and seen[0] != v[0]:
                self.differ.add(k)

    def see_again(self, r: dict[str, Any]) -> None:
        if not self.differ or not _is_solo0(r):
            return
        k = _h(r.get("model"), r.get("task"), r.get("item_id"))
        if self.example is None and k in self.differ:
            self.example = (k, {"model": r.get("model"), "task": r.get("task"), "item": r.get("item_id"), "by": {}})
        if self.example is not None and self.example[0] == k:
            self.example[1]["by"][str(r.get("backend"))] = r.get("prompt_sha256")

    def messages(self) -> list[str]:
        if not self.differ or self.example is None:
            return []
        ex = self.example[1]
        groups: dict[str, list[str]] = {}
        for backend, sha in sorted(ex["by"].items()):
            groups.setdefault(str(sha), []).append(backend)
        example = " vs ".join(", ".join(g) for g in groups.values())
        return [f"{len(self.differ)} of {len(self.first)} items were sent as different prompts by different backends "
                f"of the same model (e.g. {ex['model']} {ex['task']}/{ex['item']}: {example}); comparisons between "
                f"those backends compare different inputs - check each backend's fingerprint (chat_template) and "
                f"tokenizer"]


def prompts_across_backends(records: Sequence[dict[str, Any]]) -> list[str]:
    """Backends of one model that sent the same item as different prompts: comparisons between those backends
    compare different inputs (e.g. one rendered the chat template and the other did not). ``records`` is read
    twice (a list, or anything iterable twice)."""
    acc = _PromptsAcross()
    for r in records:
        acc.see(r)
    for r in records:
        acc.see_again(r)
    return acc.messages()


def _duplicates(hashes: array) -> set[int]:
    import numpy as np

    a = np.frombuffer(hashes, dtype=np.int64) if len(hashes) else np.zeros(0, dtype=np.int64)
    a = np.sort(a)
    return set(a[1:][a[1:] == a[:-1]].tolist())


def validate_run(run_dir: str | Path) -> dict[str, Any]:
    rd = RunDir(run_dir)
    path = find_records(rd.path)
    manifest: dict[str, Any] | None = rd.read_json(MANIFEST, default=None)  # size-limited, no links, an object
    errors = _Errors()
    if manifest is None:
        errors.add("manifest.json is missing")
    known = (manifest or {}).get("fingerprints", {})
    if not isinstance(known, dict):
        raise UserError(f"{rd.path / MANIFEST} has a {type(known).__name__} as 'fingerprints', not an object; "
                        f"the file was edited by hand - restore it from the run")

    def records() -> Iterable[dict[str, Any]]:
        return iter_records(path, strict=True)

    keys = array("q")
    solo: dict[int, int] = {}  # pairing key -> prompt hash of the repeat-0 solo record
    counts = {"records": 0, "solo": 0, "batch": 0}
    cells: set[int] = set()
    per_backend: dict[str, set] = {}
    prompts = _PromptsAcross()
    unknown_fid = False
    try:
        for n, r in enumerate(records(), 1):
            counts["records"] += 1
            key = r.get("key")
            shown = key if isinstance(key, str) else "?"
            for field, typ in REQUIRED.items():
                if field not in r:
                    errors.add(f"record {n} ({shown}): missing field '{field}'")
                elif field == "label" and r[field] is None and isinstance(r.get("scorer_error"), str):
                    continue  # the scorer raised on this output (run on; `evalhost rescore` labels it later)
                elif not isinstance(r[field], typ) or (typ is int and isinstance(r[field], bool)):
                    errors.add(f"record {n} ({shown}): '{field}' has type {type(r[field]).__name__}")
            cond = r.get("condition")
            if cond in ("solo", "batch"):
                counts[cond] += 1
            else:
                errors.add(f"record {n}: condition '{cond}' is not solo|batch")
            if r.get("domain") not in ("safety", "capability"):
                errors.add(f"record {n}: domain '{r.get('domain')}' is not safety|capability")
            if isinstance(key, str):
                keys.append(hash(key))
            cells.add(_h(r.get("cell")))
            if _is_solo0(r):
                solo[_pair(r)] = _h(r.get("prompt_sha256"))
            prompts.see(r)
            fid = r.get("fingerprint_id")
            per_backend.setdefault(f"{r.get('model')}/{r.get('backend')}", set()).add(_h(fid))
            if manifest and not unknown_fid and not (isinstance(fid, str) and fid in known):
                errors.add(f"record {shown}: fingerprint {fid} is not in manifest.json")
                unknown_fid = True
    except CorruptRecord as exc:  # a line that is no record is a finding; a refused read (bomb, link) is exit 2
        return {"records": counts["records"], "errors": [str(exc)], "warnings": []}

    dups = _duplicates(keys)
    del keys
    dup_count: Counter = Counter()
    unpaired: list[str] = []
    mismatched: list[str] = []
    n_unpaired = n_mismatched = 0
    fids_by_backend: dict[str, set] = {}
    for r in records():
        key = r.get("key")
        if dups and isinstance(key, str) and hash(key) in dups:
            dup_count[key] += 1
        prompts.see_again(r)
        if len(per_backend.get(f"{r.get('model')}/{r.get('backend')}", ())) > 1:
            fids_by_backend.setdefault(f"{r.get('model')}/{r.get('backend')}", set()).add(str(r.get("fingerprint_id")))
        if r.get("condition") != "batch":
            continue
        partner = solo.get(_pair(r))
        if partner is None:
            n_unpaired += 1
            if len(unpaired) < SHOWN:
                unpaired.append(str(key))
        elif partner != _h(r.get("prompt_sha256")):
            n_mismatched += 1
            if len(mismatched) < SHOWN:
                mismatched.append(str(key))
    for k, c in dup_count.items():
        if c > 1:
            errors.add(f"duplicate key {k} ({c} records)")
    for k in unpaired:
        errors.add(f"batch record {k} has no solo record to pair with")
    if n_unpaired > SHOWN:
        errors.add(f"... and {n_unpaired - SHOWN} more unpaired batch records")
    for label, fids in fids_by_backend.items():
        errors.add(f"backend {label} has records from {len(fids)} different stacks: {sorted(fids)}")
    for k in mismatched:
        errors.add(f"batch record {k} was sent a different prompt than its solo record")
    if n_mismatched > SHOWN:
        errors.add(f"... and {n_mismatched - SHOWN} more batch records whose prompt differs from their solo record's")
    return {**counts, "cells": len(cells), "status": (manifest or {}).get("status"), "errors": errors.done(),
            "error_count": len(errors) + errors.more,
            "warnings": prompts.messages()}
