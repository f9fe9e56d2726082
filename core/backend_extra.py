"""``Generation.extra`` as a record's ``backend_extra``: JSON-safe and at most :data:`LIMIT` bytes.

A backend may put anything in ``extra`` (retry failures, the replica that served a solo, engine facts); a record is
strict JSON (no NaN, string keys) and one line of ``records.jsonl``, so the value is made safe first:

* dict keys become strings; tuples and sets become lists (a set sorted by its items' text); floats that are NaN or
  infinite become their text (``"nan"``, ``"inf"``); bytes and any other object become their ``repr``, cut to 200
  characters; nesting deeper than 20 levels becomes the text ``"(nested too deep)"``;
* past :data:`LIMIT` bytes of compact JSON, the top-level keys are kept in order while they fit and the rest are
  dropped, and the key ``"_evalhost_note"`` says which and how big the whole was: the record is written, never
  refused, and never silently short.

An empty ``extra`` is recorded as ``{}``.
"""
from __future__ import annotations

import json
import math
from typing import Any

LIMIT = 64 * 1024
NOTE = "_evalhost_note"
_DEPTH = 20


def _size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8"))


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` as plain JSON types (see the module docstring)."""
    if depth > _DEPTH:
        return "(nested too deep)"
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return [json_safe(v, depth + 1) for v in sorted(value, key=repr)]
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def record_extra(extra: dict[str, Any] | None, limit: int = LIMIT) -> dict[str, Any]:
    """The ``backend_extra`` field of a record for a generation whose ``extra`` is ``extra``."""
    safe = json_safe(dict(extra or {}))
    total = _size(safe)
    if total <= limit:
        return safe
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    room = limit - 400  # the note itself
    for key, value in safe.items():
        trial = {**kept, key: value}
        if _size(trial) <= room:
            kept = trial
        else:
            dropped.append(key)
    names = ", ".join(repr(k)[:60] for k in dropped[:10])
    if len(dropped) > 10:
        names += f" and {len(dropped) - 10} more"
    kept[NOTE] = (f"backend extra was {total} bytes, over the {limit}-byte limit; dropped key(s) {names}"[:380])
    return kept
