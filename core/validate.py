"""``evalhost validate RUN_DIR``: schema, duplicates, solo/batch pairing completeness, fingerprint consistency."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import UserError
from .records import find_records, read_records

REQUIRED: dict[str, type | tuple] = {
    "key": str, "study": str, "cell": str, "model": str, "backend": str, "dispatcher": str, "batch_size": int,
    "condition": str, "repeat": int, "task": str, "item_id": str, "domain": str, "group_id": str, "position": int,
    "peers": list, "prompt_sha256": str, "output_text": str, "output_token_ids": list, "output_sha256": str,
    "finish_reason": str, "label": str, "timings": dict, "attempts": int, "restarted": bool,
    "fingerprint_id": str,
}


def validate_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = find_records(run_dir)
    errors: list[str] = []
    try:
        records = read_records(path, strict=True)
    except UserError as exc:
        return {"records": 0, "errors": [str(exc)]}
    manifest = {}
    if (run_dir / "manifest.json").is_file():
        manifest = json.loads((run_dir / "manifest.json").read_text())
    else:
        errors.append("manifest.json is missing")
    for n, r in enumerate(records, 1):
        for field, typ in REQUIRED.items():
            if field not in r:
                errors.append(f"record {n} ({r.get('key', '?')}): missing field '{field}'")
            elif not isinstance(r[field], typ) or (typ is int and isinstance(r[field], bool)):
                errors.append(f"record {n} ({r.get('key', '?')}): '{field}' has type {type(r[field]).__name__}")
        if r.get("condition") not in ("solo", "batch"):
            errors.append(f"record {n}: condition '{r.get('condition')}' is not solo|batch")
        if r.get("domain") not in ("safety", "capability"):
            errors.append(f"record {n}: domain '{r.get('domain')}' is not safety|capability")
    keys = Counter(r.get("key") for r in records)
    errors += [f"duplicate key {k} ({c} records)" for k, c in keys.items() if c > 1]
    solo = {(r["model"], r["backend"], r["task"], r["item_id"]) for r in records
            if r.get("condition") == "solo" and r.get("repeat") == 0}
    unpaired = [r["key"] for r in records if r.get("condition") == "batch"
                and (r.get("model"), r.get("backend"), r.get("task"), r.get("item_id")) not in solo]
    errors += [f"batch record {k} has no solo record to pair with" for k in unpaired[:20]]
    if len(unpaired) > 20:
        errors.append(f"... and {len(unpaired) - 20} more unpaired batch records")
    known = manifest.get("fingerprints", {})
    per_backend: dict[str, set[str]] = {}
    for r in records:
        fid = r.get("fingerprint_id")
        per_backend.setdefault(f"{r.get('model')}/{r.get('backend')}", set()).add(fid)
        if manifest and fid not in known:
            errors.append(f"record {r.get('key')}: fingerprint {fid} is not in manifest.json")
            break
    for label, fids in per_backend.items():
        if len(fids) > 1:
            errors.append(f"backend {label} has records from {len(fids)} different stacks: {sorted(fids)}")
    errors += _prompt_mismatches(records)
    return {
        "records": len(records), "solo": sum(r.get("condition") == "solo" for r in records),
        "batch": sum(r.get("condition") == "batch" for r in records), "cells": len({r.get("cell") for r in records}),
        "status": manifest.get("status"), "errors": errors, "warnings": prompts_across_backends(records),
    }


def _prompt_mismatches(records: list[dict[str, Any]]) -> list[str]:
    """A batch record must carry the same prompt as the solo record it is paired with."""
    solo = {(r.get("model"), r.get("backend"), r.get("task"), r.get("item_id")): r.get("prompt_sha256")
            for r in records if r.get("condition") == "solo" and r.get("repeat") == 0}
    bad = [r.get("key") for r in records if r.get("condition") == "batch"
           and solo.get((r.get("model"), r.get("backend"), r.get("task"), r.get("item_id")), r.get("prompt_sha256"))
           != r.get("prompt_sha256")]
    out = [f"batch record {k} was sent a different prompt than its solo record" for k in bad[:20]]
    if len(bad) > 20:
        out.append(f"... and {len(bad) - 20} more batch records whose prompt differs from their solo record's")
    return out


def prompts_across_backends(records: list[dict[str, Any]]) -> list[str]:
    """Backends of one model that sent the same item as different prompts: comparisons between those backends
    compare different inputs (e.g. one rendered the chat template and the other did not)."""
    seen: dict[tuple, dict[str, str]] = {}
    for r in records:
        if r.get("condition") == "solo" and r.get("repeat") == 0:
            seen.setdefault((r.get("model"), r.get("task"), r.get("item_id")), {})[r.get("backend")] = \
                r.get("prompt_sha256")
    differ = [(k, v) for k, v in seen.items() if len(set(v.values())) > 1]
    if not differ:
        return []
    (model, task, item), by_backend = differ[0]
    groups: dict[str, list[str]] = {}
    for backend, sha in sorted(by_backend.items()):
        groups.setdefault(sha, []).append(backend)
    example = " vs ".join(", ".join(g) for g in groups.values())
    return [f"{len(differ)} of {len(seen)} items were sent as different prompts by different backends of the same "
            f"model (e.g. {model} {task}/{item}: {example}); comparisons between those backends compare different "
            f"inputs - check each backend's fingerprint (chat_template) and tokenizer"]
