"""Analysis of records: solo/batch pairing, label flips and text changes, breakdowns, and the statistics of
Studies B (cross-model), C (composition arms) and D (paired backend comparison).

Reads record dicts only (see docs/architecture.md for the fields); imports no torch. Every rate is a
``{"k", "n", "rate", "lo", "hi"}`` dict with a Wilson 95% CI (:func:`evalhost.stats.proportion`).
Pairing and record hygiene live in :mod:`evalhost.analysis_pairs`, Studies B and C in
:mod:`evalhost.analysis_studies`, Study D in :mod:`evalhost.analysis_study_d`; every public name is importable
from here.

Definitions
-----------
* Records are read defensively: not a JSON object -> skipped (``counts.malformed``); a label that is not a string
  or a number (dict, list, bool) -> its JSON text; non-scalar identity fields (a list as ``key``) -> JSON text.
* Duplicate keys: the FIRST record per ``key`` is kept; the rest are dropped, counted (``duplicates_dropped``,
  ``not_comparable.duplicate``) and never form a pair.
* A *pair* is a ``batch`` record plus the ``solo`` record of the same ``(model, backend, task, item_id)`` with
  ``repeat == 0``.  Every batch record (any repeat) forms one pair; a batch record without its solo is counted as
  ``unpaired_batch``.
* A pair is *comparable* when both sides have no error (``finish_reason != "error"``, no ``scorer_error``), both
  are labelled (and, with ``flip_on="score"``, both scored) and both have the same ``prompt_sha256``.  Otherwise
  ``not_comparable`` is the first of ``error`` / ``unlabelled`` / ``prompt_mismatch``.  **Every rate is over
  comparable pairs**; the rest are counted per reason in ``not_comparable`` (overall, per backend in the
  headline, per breakdown row, per cell).  ``ok`` (legacy) equals ``comparable``.
* ``label_flip``: solo label != batch label; ``score_flip``: solo score != batch score (both raw).  ``flip``: a
  comparable pair whose label (``flip_on="label"``, default) or score (``flip_on="score"``) changed.  Rates named
  ``label_flips`` count ``flip`` (so under ``flip_on="score"`` they are score flips; ``summary["flip_on"]`` says
  which).
* ``flip_kind``: ``parse_failure`` (either label ``unparsed`` or either output text empty/whitespace) or
  ``substantive``; ``truncated``: either side's ``finish_reason == "length"``; ``truncated_changes``: text
  changes with a truncated side.
* ``text_change``: the output SHA-256 differs.  ``first_divergent_token``: index of the first differing output
  token id (the shorter length when one output is a prefix of the other); None when identical or missing.
* ``direction``: ``refuse_to_comply`` / ``comply_to_refuse`` when both labels are refusal/compliance labels,
  ``correct_to_incorrect`` / ``incorrect_to_correct`` when both are correctness labels, else
  ``"{solo}_to_{batch}"``; ``unchanged`` when the label did not change; ``not_comparable`` for such pairs.
  ``original_direction``: the record's discovery-phase direction (Study D candidates), else None.

Summary keys (``summarize``): ``counts`` (records, solo, batch, pairs = pairs formed after dedupe,
comparable_pairs, duplicates_dropped, malformed, not_comparable {error, unlabelled, prompt_mismatch, duplicate},
unpaired_batch, ok_pairs, errors, scorer_errors, ...), ``flip_on``, ``headline`` (one row per backend: backend,
pairs, not_comparable, label_flips, substantive_flips, parse_failure_flips, text_changes, truncated_changes),
``overall``, ``breakdowns`` (rows with ``not_comparable``), ``directions``, ``label_pairs``, ``score_pairs``,
``first_divergence``, ``repeat_disagreement``, ``cells`` (rows with ``not_comparable``), ``invariance_grid``,
``adjudication`` (when given).  ``not_comparable.duplicate`` counts dropped duplicate records: all of them in
``counts`` and ``overall``, those of the backend in the headline, those of the cell in a cell row, and the
duplicate *batch* records with that value in a breakdown row (none for ``direction``, a pair property).
Rate rows (overall, breakdowns) hold ``pairs`` (comparable), ``pairs_formed``, ``label_flips``,
``substantive_flips``, ``parse_failure_flips``, ``text_changes``, ``truncated_changes`` and ``not_comparable``.

Pair keys: the old ones plus ``comparable``, ``not_comparable``, ``flip``, ``label_flip``, ``score_flip``,
``flip_kind``, ``flip_on``, ``truncated``, ``original_direction``, ``candidate_kind``, ``scorer``,
``scorer_error``.

``compare_backends``: ``a``, ``b``, ``flip_on``, ``rows`` (shared rows comparable under both modes; the
denominator), ``rows_shared``, ``not_comparable`` (shared rows left out, by reason), ``unmatched``,
``duplicates``, ``modes`` (per mode: ``mode``, ``records`` = shared rows, ``rows``, ``ok``, ``not_comparable``,
``label_flips``, ``substantive_flips``, ``parse_failure_flips``, ``text_changes``, ``truncated_changes``),
``label`` / ``text`` (discordance + exact McNemar ``p``; ``label`` uses the flip of ``flip_on``),
``breakdowns`` (model, domain, task, dispatcher, batch_size, phase, original_direction, direction; rows
``value``, ``rows``, ``rows_shared``, ``not_comparable``, ``a_flips``, ``b_flips``, ``a_substantive_flips``,
``b_substantive_flips``, ``a_text``, ``b_text``), ``score_pairs``, ``label_pairs``.

``study_b``: ``flip_on``, ``backends`` (one per backend: ``backend``, ``models``, ``pooled``,
``anova_alignment``, ``models_without_alignment_type``, ``pearson_text_vs_flip`` with ``method`` and
``ci_note``), ``legacy_backend`` and the first backend's keys repeated at top level.  ``composition``: the old
keys plus ``flip_on``, ``paired``, ``design``; when paired ``paired_targets``, ``cochran_q`` {q, df, p, n,
note}, ``pairwise`` [{a, b, n, a_only, b_only, both, neither, p, p_holm}], ``mde_paired`` [{arm, reference, n,
baseline, discordant, mde_pp}], ``mde_paired_method``.
"""
from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Sequence

from . import stats as st
from .analysis_pairs import (PAIR_KEY, check_flip_on, count_field, direction, first_divergence,  # noqa: F401
                             not_comparable, pair, pair_distribution as _pair_distribution, prepare, rates,
                             sha as _sha, peers as _peers, sort_key as _sort_key)
from .analysis_studies import REFERENCE_ARM_NAMES, composition, study_b  # noqa: F401
from .analysis_study_d import (STUDY_D_FIELDS, comparable_backends, compare_backends,  # noqa: F401
                               looks_invariant)

BREAKDOWN_FIELDS = ("model", "domain", "task", "dispatcher", "batch_size", "phase", "original_direction",
                    "direction", "backend")
_RECORD_FIELDS = {"model", "domain", "task", "dispatcher", "batch_size", "phase", "original_direction", "backend",
                  "cell", "arm"}


def _repeat(rec: Mapping[str, Any]) -> int:
    try:
        return int(rec.get("repeat") or 0)
    except (TypeError, ValueError):
        return 0


def _tokens_per_s(rec: Mapping[str, Any]) -> float | None:
    ids = rec.get("output_token_ids")
    t = rec.get("timings") or {}
    try:
        secs = t.get("latency_s")
        if secs is None and t.get("finished") is not None and t.get("sent") is not None:
            secs = float(t["finished"]) - float(t["sent"])
        secs = float(secs) if secs is not None else None
    except (TypeError, ValueError):
        return None
    if ids is None or not secs or secs <= 0:
        return None
    return len(ids) / secs


def _median(values: Iterable[float | int | None]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    return float(statistics.median(vals)) if vals else None


def _rates(pairs: Sequence[Mapping[str, Any]], duplicates: int = 0) -> dict[str, Any]:
    return rates(pairs, duplicates)


def breakdown(pairs: Sequence[Mapping[str, Any]], field: str,
              duplicates: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Rates (over comparable pairs) and not-comparable counts per value of ``field``."""
    groups: dict[Any, list] = defaultdict(list)
    for p in pairs:
        groups[p.get(field)].append(p)
    dups = [d for d in duplicates if d.get("condition") == "batch"] if field in _RECORD_FIELDS else []
    for d in dups:
        groups.setdefault(d.get(field), [])
    return [{"value": v, **_rates(groups[v], count_field(dups, field, v))} for v in sorted(groups, key=_sort_key)]


# -- repeats and cells ------------------------------------------------------------------------------------------
def _usable(r: Mapping[str, Any]) -> bool:
    return r.get("finish_reason") != "error" and r.get("scorer_error") is None


def repeat_disagreement(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How often the same request differs from itself: repeats > 0 against repeat 0 of the same request
    (solo: same model/backend/task/item; batch: same cell, item, position and peers).  Records with an error are
    left out; labels are compared only when both are labelled."""
    records, _, _ = prepare(records)

    def key_solo(r):
        return tuple(r.get(k) for k in PAIR_KEY)

    def key_batch(r):
        return (r.get("cell"), r.get("item_id"), r.get("position"), _peers(r))

    result: dict[str, Any] = {}
    by_backend: dict[str, list[bool]] = defaultdict(list)
    for cond, keyf in (("solo", key_solo), ("batch", key_batch)):
        base = {}
        for r in records:
            if r.get("condition") == cond and _repeat(r) == 0:
                base.setdefault(keyf(r), r)
        text, label = [], []
        for r in records:
            if r.get("condition") != cond or _repeat(r) == 0:
                continue
            b = base.get(keyf(r))
            if b is None or not (_usable(r) and _usable(b)):
                continue
            text.append(_sha(r) != _sha(b))
            if r.get("label") is not None and b.get("label") is not None:
                label.append(r.get("label") != b.get("label"))
            if cond == "solo":
                by_backend[str(r.get("backend"))].append(text[-1])
        result[cond] = {"text": st.proportion(sum(text), len(text)), "label": st.proportion(sum(label), len(label))}
    result["solo_by_backend"] = [{"backend": k, "text": st.proportion(sum(v), len(v))}
                                 for k, v in sorted(by_backend.items())]
    return result


def cells_table(records: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]] | None = None,
                duplicates: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per cell (issue 11): text-change / label-flip rate vs solo over comparable pairs, not-comparable counts,
    median first divergence, repeat disagreement within the cell, median tokens/s per request."""
    recs_all, dups, _ = prepare(records)
    dups = dups if duplicates is None else list(duplicates)
    pairs = pair(recs_all) if pairs is None else pairs
    by_cell_pairs: dict[Any, list] = defaultdict(list)
    for p in pairs:
        by_cell_pairs[p["cell"]].append(p)
    by_cell: dict[Any, list] = defaultdict(list)
    for r in recs_all:
        by_cell[r.get("cell")].append(r)
    rows = []
    for cell in sorted(by_cell, key=_sort_key):
        recs = by_cell[cell]
        r0 = recs[0]
        base = {}
        for r in recs:
            if _repeat(r) == 0:
                base.setdefault((r.get("item_id"), r.get("position"), _peers(r)), r)
        rep = [(_sha(r) != _sha(base[k]))
               for r in recs if _repeat(r) > 0 and _usable(r)
               and (k := (r.get("item_id"), r.get("position"), _peers(r))) in base and _usable(base[k])]
        cp_all = by_cell_pairs.get(cell, [])
        cp = [p for p in cp_all if p["comparable"]]
        flips = [p for p in cp if p["flip"]]
        rows.append({
            "cell": cell, "model": r0.get("model"), "backend": r0.get("backend"),
            "backend_plugin": r0.get("backend_plugin"), "backend_config": r0.get("backend_config"),
            "task": r0.get("task"),
            "dispatcher": r0.get("dispatcher"), "batch_size": r0.get("batch_size"),
            "condition": r0.get("condition"), "records": len(recs), "pairs": len(cp), "pairs_formed": len(cp_all),
            "not_comparable": not_comparable(cp_all, count_field(dups, "cell", cell)),
            "text_changes": st.proportion(sum(p["text_change"] for p in cp), len(cp)),
            "label_flips": st.proportion(len(flips), len(cp)),
            "substantive_flips": st.proportion(sum(p["flip_kind"] == "substantive" for p in flips), len(cp)),
            "parse_failure_flips": st.proportion(sum(p["flip_kind"] == "parse_failure" for p in flips), len(cp)),
            "truncated_changes": sum(1 for p in cp if p["text_change"] and p["truncated"]),
            "first_divergence_median": _median(p["first_divergent_token"] for p in cp),
            "repeat_disagreement": st.proportion(sum(rep), len(rep)),
            "tokens_per_s_median": _median(_tokens_per_s(r) for r in recs),
        })
    return rows


def invariance_grid(pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Text-change rate per (backend configuration, dispatcher/batch size), pooled over models and tasks, over
    comparable pairs."""
    groups: dict[tuple, list] = defaultdict(list)
    for p in pairs:
        if p["comparable"]:
            groups[(str(p.get("backend")), f"{p.get('dispatcher')}/bs{p.get('batch_size')}")].append(p)
    rows = sorted({k[0] for k in groups})

    def col_key(c):
        head, _, tail = c.rpartition("/bs")
        return (head, int(tail) if tail.isdigit() else 0, tail)

    cols = sorted({k[1] for k in groups}, key=col_key)
    cells = [{"backend": b, "column": c,
              "text_changes": st.proportion(sum(p["text_change"] for p in groups[(b, c)]), len(groups[(b, c)])),
              "label_flips": st.proportion(sum(p["flip"] for p in groups[(b, c)]), len(groups[(b, c)]))}
             for b in rows for c in cols if (b, c) in groups]
    return {"rows": rows, "cols": cols, "cells": cells}


# -- adjudication -----------------------------------------------------------------------------------------------
def adjudication_summary(pairs: Sequence[Mapping[str, Any]], adjudications: Mapping[str, str]) -> dict[str, Any]:
    """Raw flips, genuine / artifact / skipped / not yet adjudicated, and the corrected rate genuine / comparable
    pairs."""
    adjudications = {str(k): v for k, v in adjudications.items()}
    pairs = [p for p in pairs if p["comparable"]]
    flips = [p for p in pairs if p["flip"]]
    verdicts = Counter(adjudications.get(str(p["key"]), "unadjudicated") for p in flips)
    genuine = verdicts.get("genuine", 0)
    by_domain = []
    for dom in sorted({p.get("domain") for p in pairs}, key=_sort_key):
        dp = [p for p in pairs if p.get("domain") == dom]
        g = sum(1 for p in dp if p["flip"] and adjudications.get(str(p["key"])) == "genuine")
        by_domain.append({"value": dom, "pairs": len(dp), "raw_flips": sum(p["flip"] for p in dp),
                          "genuine": st.proportion(g, len(dp))})
    flip_keys = {str(p["key"]) for p in flips}
    return {"raw_flips": len(flips), "genuine": genuine, "artifact": verdicts.get("artifact", 0),
            "skipped": verdicts.get("skip", 0), "unadjudicated": verdicts.get("unadjudicated", 0),
            "not_flips_adjudicated": sum(1 for k in adjudications if k not in flip_keys),
            "raw_rate": st.proportion(len(flips), len(pairs)),
            "corrected_rate": st.proportion(genuine, len(pairs)),
            "by_domain": by_domain}


# -- the summary ------------------------------------------------------------------------------------------------
def headline(pairs: Sequence[Mapping[str, Any]], backends: Iterable[str],
             duplicates: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """One row per backend: comparable pairs, not-comparable counts, flips (substantive / parse failure), text
    changes and truncated text changes."""
    by: dict[str, list] = defaultdict(list)
    for p in pairs:
        by[str(p.get("backend"))].append(p)
    rows = []
    for b in sorted(set(backends) | set(by)):
        r = _rates(by[b], sum(1 for d in duplicates if str(d.get("backend")) == b))
        rows.append({"backend": b, "pairs": r["pairs"], "pairs_formed": r["pairs_formed"],
                     "not_comparable": r["not_comparable"], "label_flips": r["label_flips"],
                     "substantive_flips": r["substantive_flips"], "parse_failure_flips": r["parse_failure_flips"],
                     "text_changes": r["text_changes"], "truncated_changes": r["truncated_changes"]})
    return rows


def summarize(records: Sequence[Mapping[str, Any]], adjudications: Mapping[str, str] | None = None,
              flip_on: str = "label") -> dict[str, Any]:
    """Everything the report needs that does not depend on the study type (Studies B/C/D are separate); see the
    module docstring for the keys."""
    check_flip_on(flip_on)
    given = len(records)
    records, dups, malformed = prepare(records)
    pairs = pair(records, flip_on)
    cp = [p for p in pairs if p["comparable"]]
    n_batch = sum(1 for r in records if r.get("condition") == "batch")
    divs = [p["first_divergent_token"] for p in cp if p["first_divergent_token"] is not None]
    flips = [p for p in cp if p["flip"]]
    configs = {json.dumps(r.get("backend_config"), sort_keys=True, default=str) for r in records}
    nc = not_comparable(pairs, len(dups))
    backends = sorted({str(r.get("backend")) for r in records})
    summary: dict[str, Any] = {
        "counts": {
            "records": given, "unique_records": len(records), "malformed": malformed,
            "solo": sum(1 for r in records if r.get("condition") == "solo"),
            "batch": n_batch, "pairs": len(pairs), "unpaired_batch": n_batch - len(pairs),
            "comparable_pairs": len(cp), "ok_pairs": len(cp),
            "duplicates_dropped": len(dups), "not_comparable": nc,
            "errors": sum(1 for r in records if r.get("finish_reason") == "error"),
            "scorer_errors": sum(1 for r in records if r.get("scorer_error") is not None),
            "retried": sum(1 for r in records if (r.get("attempts") or 1) > 1),
            "restarted": sum(1 for r in records if r.get("restarted")),
            "models": sorted({str(r.get("model")) for r in records}),
            "backends": backends,
            "tasks": sorted({str(r.get("task")) for r in records}),
            "backend_configs": len(configs),
            "max_repeat": max((_repeat(r) for r in records), default=0),
        },
        "flip_on": flip_on,
        "headline": headline(pairs, backends, dups),
        "overall": _rates(pairs, len(dups)),
        "breakdowns": {f: breakdown(pairs, f, dups) for f in BREAKDOWN_FIELDS},
        "directions": [{"direction": d, "domain": dom, "count": c} for (d, dom), c in
                       sorted(Counter((p["direction"], p.get("domain")) for p in flips).items(),
                              key=lambda kv: (-kv[1], str(kv[0])))],
        "label_pairs": _pair_distribution(cp, "solo_label", "batch_label"),
        "score_pairs": _pair_distribution(cp, "solo_score", "batch_score"),
        "first_divergence": {"n": len(divs), "median": _median(divs), "positions": sorted(divs)},
        "repeat_disagreement": repeat_disagreement(records),
        "cells": cells_table(records, pairs, dups),
        "invariance_grid": invariance_grid(pairs),
    }
    if adjudications:
        summary["adjudication"] = adjudication_summary(pairs, adjudications)
    return summary


# -- candidate export -------------------------------------------------------------------------------------------
def export_candidates(records: Sequence[Mapping[str, Any]], flip_on: str = "label") -> list[dict[str, Any]]:
    """Rows to rerun in a Study D: every flip of a comparable pair (``kind="label_flip"``) and every text change
    without a flip (``kind="text_change"``), with the group's peers (and their tasks where the peers were
    recorded).  Pairs that are not comparable (errors, missing labels, prompt mismatch) are never candidates."""
    records, _, _ = prepare(records)
    task_of: dict[tuple, dict[str, Any]] = defaultdict(dict)
    for r in records:
        task_of[(r.get("model"), r.get("backend"), r.get("group_id"))][str(r.get("item_id"))] = r.get("task")
    by_key = {r.get("key"): r for r in records}
    out = []
    for p in pair(records, flip_on):
        if not p["comparable"] or not (p["flip"] or p["text_change"]):
            continue
        rec = by_key.get(p["key"], {})
        known = task_of.get((p["model"], p["backend"], p["group_id"]), {})
        peer_tasks = [known.get(str(i)) for i in p["peers"]]
        out.append({
            "kind": "label_flip" if p["flip"] else "text_change",
            "key": p["key"], "study": p.get("study"), "phase": p.get("phase"),
            "model": p["model"], "backend": p["backend"], "task": p["task"], "item_id": p["item_id"],
            "task_source": rec.get("task_source"), "scorer": rec.get("scorer"),
            "domain": p.get("domain"), "batch_size": p["batch_size"], "dispatcher": p["dispatcher"],
            "group_id": p["group_id"], "position": p.get("position"), "repeat": p["repeat"], "peers": p["peers"],
            "peer_tasks": peer_tasks if any(t is not None for t in peer_tasks) else None,
            "direction": p["direction"], "label_flip": p["label_flip"], "text_change": p["text_change"],
            "flip_kind": p["flip_kind"], "truncated": p["truncated"],
            "solo_label": p["solo_label"], "batch_label": p["batch_label"],
            "solo_score": p["solo_score"], "batch_score": p["batch_score"],
            "first_divergent_token": p["first_divergent_token"],
        })
    return out
