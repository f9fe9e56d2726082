"""Verdicts of ``evalhost preflight``: one per condition, from the records of its run directory.

A *condition* is a batched dispatcher (``prompt_list``, ``synchronized``, ``continuous``; all its batch sizes and
repeats pooled), plus ``solo repeats`` (every solo repeat after the first against the first). A pair *changed*
when the two outputs differ in text or in token ids; batched pairs are :func:`evalhost.analysis.pair`'s (a batch
record and the first solo record of the same item); pairs with an error on either side are left out and counted.

* **invariant held** when no pair changed: ``0 of N pairs changed (95 % upper bound U %)``, U being the upper end of
  the Wilson 95 % interval (:func:`evalhost.stats.proportion`); with 0 changes that is 3.84 / (N + 3.84), so a
  bound of 1 % needs at least 381 pairs.
* **broken** when ``k > 0`` pairs changed: the first divergent token (index into the output) and an example pair,
  the changed pair that diverged earliest.
* **not measured** when the condition has no pair (it did not run, or every pair errored).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from . import stats as st
from .analysis import pair
from .analysis_pairs import first_divergence, prepare, sha

SOLO_REPEATS = "solo repeats"


@dataclass
class Verdict:
    condition: str
    n: int
    k: int
    upper: float | None
    batch_sizes: list[int] = field(default_factory=list)
    errors: int = 0
    first_token: int | None = None
    example: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        if self.n == 0:
            return "not measured"
        return "broken" if self.k else "invariant held"

    def line(self) -> str:
        sizes = f" (batch sizes {', '.join(map(str, self.batch_sizes))})" if self.batch_sizes else ""
        head = f"{self.condition}{sizes}: "
        if self.n == 0:
            why = f"; {self.errors} pair(s) had an error" if self.errors else ""
            return head + f"not measured: no pair to compare{why}"
        if self.k == 0:
            return head + (f"invariant held: 0 of {self.n} pairs changed (95 % upper bound "
                           f"{100 * self.upper:.2g} %)")
        ex = self.example or {}
        token = "unknown" if self.first_token is None else str(self.first_token)
        return head + (f"broken: {self.k} of {self.n} changed, first divergent token {token}, example pair "
                       f"{ex.get('task')}/{ex.get('item_id')} ({ex.get('where')})")

    def as_dict(self) -> dict[str, Any]:
        return {"condition": self.condition, "status": self.status, "pairs": self.n, "changed": self.k,
                "upper_95": self.upper, "batch_sizes": self.batch_sizes, "errors": self.errors,
                "first_divergent_token": self.first_token, "example": self.example, "line": self.line()}


def _errored(rec: Mapping[str, Any]) -> bool:
    return rec.get("finish_reason") == "error"


def _changed(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[bool, int | None]:
    ta, tb = a.get("output_token_ids"), b.get("output_token_ids")
    div = first_divergence(ta, tb)
    text = sha(a) != sha(b)
    if div is None and text and ta is not None and tb is not None:
        div = min(len(ta), len(tb))  # same tokens but different text: the detokenised tail differs
    return (div is not None or text), div


def _verdict(condition: str, rows: list[tuple[bool, int | None, dict[str, Any]]], errors: int,
             sizes: list[int]) -> Verdict:
    n = len(rows)
    changed = [(div, ex) for ch, div, ex in rows if ch]
    upper = st.proportion(len(changed), n)["hi"] if n else None
    v = Verdict(condition, n, len(changed), upper, sizes, errors)
    if changed:
        changed.sort(key=lambda c: (c[0] is None, c[0] if c[0] is not None else 0))
        v.first_token, v.example = changed[0]
    return v


def solo_repeat_verdict(records: Sequence[Mapping[str, Any]]) -> Verdict:
    recs, _, _ = prepare(records)
    key = ("model", "backend", "task", "item_id")
    first = {tuple(r.get(k) for k in key): r for r in recs if r.get("condition") == "solo" and r["repeat"] == 0}
    rows, errors = [], 0
    for r in recs:
        if r.get("condition") != "solo" or r["repeat"] == 0:
            continue
        base = first.get(tuple(r.get(k) for k in key))
        if base is None:
            continue
        if _errored(r) or _errored(base):
            errors += 1
            continue
        ch, div = _changed(base, r)
        rows.append((ch, div, {"task": r.get("task"), "item_id": r.get("item_id"), "key": r.get("key"),
                               "where": f"solo run {r['repeat'] + 1} vs run 1"}))
    return _verdict(SOLO_REPEATS, rows, errors, [])


def batch_verdicts(records: Sequence[Mapping[str, Any]]) -> list[Verdict]:
    recs, _, _ = prepare(records)
    by_key = {r.get("key"): r for r in recs}
    groups: dict[str, list] = {}
    errors: dict[str, int] = {}
    sizes: dict[str, set] = {}
    for p in pair(recs):
        cond = str(p.get("dispatcher"))
        groups.setdefault(cond, [])
        sizes.setdefault(cond, set()).add(p.get("batch_size"))
        if p.get("not_comparable") == "error":
            errors[cond] = errors.get(cond, 0) + 1
            continue
        solo, batch = by_key.get(p.get("solo_key"), {}), by_key.get(p.get("key"), {})
        ch, div = _changed(solo, batch)
        groups[cond].append((ch, div, {
            "task": p.get("task"), "item_id": p.get("item_id"), "key": p.get("key"),
            "where": f"batch size {p.get('batch_size')}, group {p.get('group_id')}, position {p.get('position')}, "
                     f"run {int(p.get('repeat') or 0) + 1}"}))
    return [_verdict(c, groups[c], errors.get(c, 0), sorted(s for s in sizes[c] if isinstance(s, int)))
            for c in sorted(groups)]


def verdicts(records: Sequence[Mapping[str, Any]], expected: Sequence[str] = ()) -> list[Verdict]:
    """Solo repeats first, then each batched dispatcher; ``expected`` conditions with no pair are 'not measured'."""
    batched = {v.condition: v for v in batch_verdicts(records)}
    order = list(expected) + sorted(c for c in batched if c not in expected)
    return [solo_repeat_verdict(records)] + [batched.get(c) or Verdict(c, 0, 0, None) for c in order]


def exit_code(results: Sequence[Verdict]) -> int:
    """1 when any condition broke, else 0 (conditions not measured are said, not failed)."""
    return 1 if any(v.status == "broken" for v in results) else 0
