"""Study D for :mod:`evalhost.analysis`: the paired comparison of two backends (e.g. standard vs batch-invariant
kernels) on the rows both ran; see ``compare_backends`` and the key list in :mod:`evalhost.analysis`."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any, Mapping, Sequence

from . import stats as st
from .analysis_pairs import not_comparable, pair, pair_distribution as _pair_distribution, pairs_for, rates
from .analysis_pairs import sort_key as _sort_key

STUDY_D_FIELDS = ("model", "domain", "task", "dispatcher", "batch_size", "phase", "original_direction",
                  "direction")
_REASONS = ("error", "unlabelled", "prompt_mismatch")
SLIM_FIELDS = ("backend", "backend_config", "model", "task", "item_id", "dispatcher", "batch_size", "peers",
               "repeat", "domain", "phase", "original_direction", "direction", "flip", "flip_kind", "text_change",
               "truncated", "comparable", "not_comparable", "solo_label", "batch_label", "solo_score",
               "batch_score", "flip_on")


class Slim:
    """The part of a pair dict that Study D reads (``p["flip"]``, ``p.get("phase")``), in slots: what
    ``evalhost report`` keeps of each pair when the run has two or more backends."""

    __slots__ = SLIM_FIELDS

    def __init__(self, p: Mapping[str, Any]) -> None:
        for f in SLIM_FIELDS:
            setattr(self, f, p.get(f))

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)


def _row_key(p: Mapping[str, Any]) -> tuple:
    return (p.get("model"), p.get("task"), p.get("item_id"), p.get("dispatcher"), p.get("batch_size"),
            tuple(p.get("peers") or ()), p.get("repeat"))


def looks_invariant(label: Any, config: Any = None) -> bool:
    """True when a backend label or configuration names batch invariance (used only to order a comparison)."""
    text = (str(label) + " " + json.dumps(config, default=str, sort_keys=True)).lower()
    return "invariant" in text


def comparable_backends(records: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]] | None = None
                        ) -> list[tuple[str, str, int]]:
    """(a, b, shared rows) for each pair of backends that ran at least one common row; an invariant-looking
    backend is put second so that ``a`` reads as the standard path."""
    pairs = pair(records) if pairs is None else pairs
    rows: dict[str, set] = defaultdict(set)
    conf: dict[str, Any] = {}
    for p in pairs:
        rows[str(p["backend"])].add(_row_key(p))
        conf.setdefault(str(p["backend"]), p.get("backend_config"))
    names = sorted(rows, key=lambda n: (looks_invariant(n, conf.get(n)), n))
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = len(rows[a] & rows[b])
            if shared:
                out.append((a, b, shared))
    return out


def _discordance(xa: Sequence[bool], xb: Sequence[bool]) -> dict[str, Any]:
    both = sum(1 for x, y in zip(xa, xb) if x and y)
    a_only = sum(1 for x, y in zip(xa, xb) if x and not y)
    b_only = sum(1 for x, y in zip(xa, xb) if y and not x)
    neither = sum(1 for x, y in zip(xa, xb) if not x and not y)
    return {"both": both, "a_only": a_only, "b_only": b_only, "neither": neither,
            "p": st.mcnemar_exact(a_only, b_only)}


def _mode_row(name: str, shared: Sequence[Mapping[str, Any]], used: Sequence[Mapping[str, Any]],
              duplicates: int) -> dict[str, Any]:
    r = rates(used)
    return {"mode": name, "records": len(shared), "rows": len(used), "ok": sum(1 for p in shared if p["comparable"]),
            "not_comparable": not_comparable(shared, duplicates),
            **{k: r[k] for k in ("label_flips", "substantive_flips", "parse_failure_flips", "text_changes",
                                 "truncated_changes")}}


def compare_backends(records: Sequence[Mapping[str, Any]], a: str, b: str,
                     pairs: Sequence[Mapping[str, Any]] | None = None, flip_on: str | None = None
                     ) -> dict[str, Any]:
    """Paired comparison of backends ``a`` and ``b`` on the rows both ran (matched by model, task, item, dispatcher,
    batch size, peers and repeat) and where both sides are comparable: per-mode rates with Wilson CIs,
    discordance tables and exact McNemar p for flips and text changes, breakdowns (model, domain, task, dispatcher,
    batch size, phase, original direction, direction) with each mode's flips and text changes, and score/label
    pair distributions per mode.  Rows that either mode cannot compare are counted in ``not_comparable`` (the
    first reason, ``a``'s before ``b``'s).

    The ``direction`` of a row is its discovery direction (``original_direction``) when the records carry one;
    otherwise ``a``'s direction if ``a`` flipped, else ``b``'s, else unchanged.
    """
    pairs, mode = pairs_for(records, pairs, flip_on)
    idx: dict[str, dict[tuple, Mapping[str, Any]]] = {a: {}, b: {}}
    dup = Counter()
    for p in pairs:
        name = str(p["backend"])
        if name in idx:
            k = _row_key(p)
            if k in idx[name]:
                dup[name] += 1
            else:
                idx[name][k] = p
    shared = sorted(set(idx[a]) & set(idx[b]), key=lambda k: tuple(_sort_key(x) for x in k[:5]))
    sa = [idx[a][k] for k in shared]
    sb = [idx[b][k] for k in shared]
    rows = []
    for x, y in zip(sa, sb):
        od = x.get("original_direction") or y.get("original_direction")
        if od is not None:
            d = od
        else:
            d = x["direction"] if x["flip"] else (y["direction"] if y["flip"] else "unchanged")
        rows.append({"model": x.get("model"), "domain": x.get("domain"), "task": x.get("task"),
                     "dispatcher": x.get("dispatcher"), "phase": x.get("phase"), "batch_size": x.get("batch_size"),
                     "original_direction": od, "direction": d, "a": x, "b": y,
                     "reason": x["not_comparable"] or y["not_comparable"]})
    used = [r for r in rows if r["reason"] is None]
    pa = [r["a"] for r in used]
    pb = [r["b"] for r in used]
    excluded = {k: 0 for k in _REASONS}
    for r in rows:
        if r["reason"] is not None:  # a co-batching verdict (evalhost.cobatch) is a reason too
            excluded[r["reason"]] = excluded.get(r["reason"], 0) + 1
    reasons = tuple(excluded)
    breakdowns = {}
    for field in STUDY_D_FIELDS:
        groups: dict[Any, list] = defaultdict(list)
        for r in rows:
            groups[r[field]].append(r)
        out = []
        for v, g in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
            gu = [r for r in g if r["reason"] is None]
            n = len(gu)
            nc = {k: sum(1 for r in g if r["reason"] == k) for k in reasons}
            out.append({
                "value": v, "rows": n, "rows_shared": len(g), "not_comparable": nc,
                "a_flips": st.proportion(sum(r["a"]["flip"] for r in gu), n),
                "b_flips": st.proportion(sum(r["b"]["flip"] for r in gu), n),
                "a_substantive_flips": st.proportion(sum(r["a"]["flip_kind"] == "substantive" for r in gu), n),
                "b_substantive_flips": st.proportion(sum(r["b"]["flip_kind"] == "substantive" for r in gu), n),
                "a_text": st.proportion(sum(r["a"]["text_change"] for r in gu), n),
                "b_text": st.proportion(sum(r["b"]["text_change"] for r in gu), n),
            })
        breakdowns[field] = out
    return {
        "a": a, "b": b, "flip_on": mode, "rows": len(used), "rows_shared": len(shared),
        "not_comparable": excluded,
        "unmatched": {a: len(idx[a]) - len(shared), b: len(idx[b]) - len(shared)},
        "duplicates": dict(dup),
        "modes": [_mode_row(a, sa, pa, dup.get(a, 0)), _mode_row(b, sb, pb, dup.get(b, 0))],
        "label": _discordance([p["flip"] for p in pa], [p["flip"] for p in pb]),
        "text": _discordance([p["text_change"] for p in pa], [p["text_change"] for p in pb]),
        "breakdowns": breakdowns,
        "score_pairs": {a: _pair_distribution(pa, "solo_score", "batch_score"),
                        b: _pair_distribution(pb, "solo_score", "batch_score")},
        "label_pairs": {a: _pair_distribution(pa, "solo_label", "batch_label"),
                        b: _pair_distribution(pb, "solo_label", "batch_label")},
    }
