"""Analysis of records: solo/batch pairing, label flips and text changes, breakdowns, and the statistics of
Studies B (cross-model), C (composition arms) and D (paired backend comparison).

Reads record dicts only (see docs/architecture.md for the fields); imports no torch. Every rate is a
``{"k", "n", "rate", "lo", "hi"}`` dict with a Wilson 95% CI (:func:`evalhost.stats.proportion`).

Definitions
-----------
* A *pair* is a ``batch`` record plus the ``solo`` record of the same ``(model, backend, task, item_id)`` with
  ``repeat == 0``.  Every batch record (any repeat) forms one pair; a batch record without its solo is counted as
  ``unpaired_batch``.
* ``label_flip``: solo label != batch label.  ``text_change``: the output SHA-256 differs.
* ``first_divergent_token``: index of the first differing output token id (the shorter length when one output is
  a prefix of the other); None when the token ids are identical or missing.
* ``direction``: ``refuse_to_comply`` / ``comply_to_refuse`` when both labels are refusal/compliance labels,
  ``correct_to_incorrect`` / ``incorrect_to_correct`` when both are correctness labels, else
  ``"{solo}_to_{batch}"``; ``unchanged`` when the label did not flip.
* A pair is ``ok`` when neither record has ``finish_reason == "error"`` and both carry a label.
"""
from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Sequence

from . import stats as st

PAIR_KEY = ("model", "backend", "task", "item_id")
BREAKDOWN_FIELDS = ("model", "domain", "task", "dispatcher", "batch_size", "phase", "direction", "backend")

_REFUSE = {"refuse", "refusal", "refused", "refuses", "refusing", "refusals"}
_COMPLY = {"comply", "compliance", "complied", "complies", "complying", "compliant"}
_CORRECT = {"correct", "right", "true", "pass", "passed"}
_INCORRECT = {"incorrect", "wrong", "false", "fail", "failed"}


# -- small helpers ----------------------------------------------------------------------------------------------
def _sha(rec: Mapping[str, Any]) -> str:
    sha = rec.get("output_sha256")
    if sha:
        return str(sha)
    return hashlib.sha256(str(rec.get("output_text") or "").encode("utf-8")).hexdigest()


def _repeat(rec: Mapping[str, Any]) -> int:
    try:
        return int(rec.get("repeat") or 0)
    except (TypeError, ValueError):
        return 0


def _peers(rec: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(p) for p in (rec.get("peers") or ()))


def _ok(rec: Mapping[str, Any]) -> bool:
    return rec.get("finish_reason") != "error" and rec.get("label") is not None


def _sort_key(value: Any) -> tuple:
    if isinstance(value, bool) or value is None:
        return (2, str(value))
    if isinstance(value, (int, float)):
        return (0, value, "")
    return (1, 0, str(value))


def first_divergence(a: Sequence[int] | None, b: Sequence[int] | None) -> int | None:
    """Index of the first differing token id; None if identical or unknown."""
    if a is None or b is None:
        return None
    a, b = list(a), list(b)
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _canon(label: Any) -> str:
    return str(label).strip().lower().replace("-", "_").replace(" ", "_")


def direction(solo_label: Any, batch_label: Any, domain: str | None = None) -> str:
    """Direction of a label change (see the module docstring); ``unchanged`` if the labels are equal."""
    if solo_label == batch_label:
        return "unchanged"
    s, b = _canon(solo_label), _canon(batch_label)
    if s in _REFUSE and b in _COMPLY:
        return "refuse_to_comply"
    if s in _COMPLY and b in _REFUSE:
        return "comply_to_refuse"
    if s in _CORRECT and b in _INCORRECT:
        return "correct_to_incorrect"
    if s in _INCORRECT and b in _CORRECT:
        return "incorrect_to_correct"
    return f"{solo_label}_to_{batch_label}"


def _tokens_per_s(rec: Mapping[str, Any]) -> float | None:
    ids = rec.get("output_token_ids")
    t = rec.get("timings") or {}
    secs = t.get("latency_s")
    if secs is None and t.get("finished") is not None and t.get("sent") is not None:
        secs = float(t["finished"]) - float(t["sent"])
    if ids is None or not secs or secs <= 0:
        return None
    return len(ids) / float(secs)


def _median(values: Iterable[float | int | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else None


# -- pairing ----------------------------------------------------------------------------------------------------
def pair(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One pair dict per batch record that has its solo record (see the module docstring)."""
    solos: dict[tuple, Mapping[str, Any]] = {}
    for rec in records:
        if rec.get("condition") == "solo" and _repeat(rec) == 0:
            solos.setdefault(tuple(rec.get(k) for k in PAIR_KEY), rec)
    out = []
    for rec in records:
        if rec.get("condition") != "batch":
            continue
        solo = solos.get(tuple(rec.get(k) for k in PAIR_KEY))
        if solo is None:
            continue
        flip = solo.get("label") != rec.get("label")
        out.append({
            "key": rec.get("key"), "solo_key": solo.get("key"), "cell": rec.get("cell"),
            "study": rec.get("study"), "phase": rec.get("phase"),
            "model": rec.get("model"), "backend": rec.get("backend"), "backend_plugin": rec.get("backend_plugin"),
            "backend_config": rec.get("backend_config"), "task": rec.get("task"), "item_id": rec.get("item_id"),
            "domain": rec.get("domain"), "dispatcher": rec.get("dispatcher"), "batch_size": rec.get("batch_size"),
            "repeat": _repeat(rec), "group_id": rec.get("group_id"), "position": rec.get("position"),
            "peers": list(_peers(rec)), "arm": rec.get("arm"), "alignment_type": rec.get("alignment_type"),
            "solo_label": solo.get("label"), "batch_label": rec.get("label"),
            "solo_score": solo.get("score"), "batch_score": rec.get("score"),
            "label_flip": bool(flip), "text_change": _sha(solo) != _sha(rec),
            "first_divergent_token": first_divergence(solo.get("output_token_ids"), rec.get("output_token_ids")),
            "direction": direction(solo.get("label"), rec.get("label"), rec.get("domain")),
            "ok": _ok(rec) and _ok(solo),
        })
    return out


def _rates(pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(pairs)
    return {"pairs": n,
            "label_flips": st.proportion(sum(p["label_flip"] for p in pairs), n),
            "text_changes": st.proportion(sum(p["text_change"] for p in pairs), n)}


def breakdown(pairs: Sequence[Mapping[str, Any]], field: str) -> list[dict[str, Any]]:
    """Label-flip and text-change rates per value of ``field``."""
    groups: dict[Any, list] = defaultdict(list)
    for p in pairs:
        groups[p.get(field)].append(p)
    return [{"value": v, **_rates(groups[v])} for v in sorted(groups, key=_sort_key)]


def _pair_distribution(pairs: Sequence[Mapping[str, Any]], a: str, b: str) -> list[dict[str, Any]]:
    counts = Counter((p.get(a), p.get(b)) for p in pairs)
    return [{"solo": s, "batch": t, "count": c}
            for (s, t), c in sorted(counts.items(), key=lambda kv: (_sort_key(kv[0][0]), _sort_key(kv[0][1])))]


# -- repeats and cells ------------------------------------------------------------------------------------------
def repeat_disagreement(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How often the same request differs from itself: repeats > 0 against repeat 0 of the same request
    (solo: same model/backend/task/item; batch: same cell, item, position and peers)."""
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
            if b is None:
                continue
            text.append(_sha(r) != _sha(b))
            label.append(r.get("label") != b.get("label"))
            if cond == "solo":
                by_backend[str(r.get("backend"))].append(text[-1])
        result[cond] = {"text": st.proportion(sum(text), len(text)), "label": st.proportion(sum(label), len(label))}
    result["solo_by_backend"] = [{"backend": k, "text": st.proportion(sum(v), len(v))}
                                 for k, v in sorted(by_backend.items())]
    return result


def cells_table(records: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]] | None = None
                ) -> list[dict[str, Any]]:
    """Per cell (issue 11): text-change / label-flip rate vs solo, median first divergence, repeat
    disagreement within the cell, median tokens/s per request."""
    pairs = pair(records) if pairs is None else pairs
    by_cell_pairs: dict[Any, list] = defaultdict(list)
    for p in pairs:
        by_cell_pairs[p["cell"]].append(p)
    by_cell: dict[Any, list] = defaultdict(list)
    for r in records:
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
               for r in recs if _repeat(r) > 0 and (k := (r.get("item_id"), r.get("position"), _peers(r))) in base]
        cp = by_cell_pairs.get(cell, [])
        rows.append({
            "cell": cell, "model": r0.get("model"), "backend": r0.get("backend"),
            "backend_plugin": r0.get("backend_plugin"), "backend_config": r0.get("backend_config"),
            "task": r0.get("task"),
            "dispatcher": r0.get("dispatcher"), "batch_size": r0.get("batch_size"),
            "condition": r0.get("condition"), "records": len(recs), "pairs": len(cp),
            "text_changes": st.proportion(sum(p["text_change"] for p in cp), len(cp)),
            "label_flips": st.proportion(sum(p["label_flip"] for p in cp), len(cp)),
            "first_divergence_median": _median(p["first_divergent_token"] for p in cp),
            "repeat_disagreement": st.proportion(sum(rep), len(rep)),
            "tokens_per_s_median": _median(_tokens_per_s(r) for r in recs),
        })
    return rows


def invariance_grid(pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Text-change rate per (backend configuration, dispatcher/batch size), pooled over models and tasks."""
    groups: dict[tuple, list] = defaultdict(list)
    for p in pairs:
        groups[(str(p.get("backend")), f"{p.get('dispatcher')}/bs{p.get('batch_size')}")].append(p)
    rows = sorted({k[0] for k in groups})
    cols = sorted({k[1] for k in groups},
                  key=lambda c: (c.split("/bs")[0], int(c.split("/bs")[1]) if c.split("/bs")[1].isdigit() else 0))
    cells = [{"backend": b, "column": c,
              "text_changes": st.proportion(sum(p["text_change"] for p in groups[(b, c)]), len(groups[(b, c)])),
              "label_flips": st.proportion(sum(p["label_flip"] for p in groups[(b, c)]), len(groups[(b, c)]))}
             for b in rows for c in cols if (b, c) in groups]
    return {"rows": rows, "cols": cols, "cells": cells}


# -- adjudication -----------------------------------------------------------------------------------------------
def adjudication_summary(pairs: Sequence[Mapping[str, Any]], adjudications: Mapping[str, str]) -> dict[str, Any]:
    """Raw flips, genuine / artifact / skipped / not yet adjudicated, and the corrected rate genuine / pairs."""
    flips = [p for p in pairs if p["label_flip"]]
    verdicts = Counter(adjudications.get(p["key"], "unadjudicated") for p in flips)
    genuine = verdicts.get("genuine", 0)
    by_domain = []
    for dom in sorted({p.get("domain") for p in pairs}, key=_sort_key):
        dp = [p for p in pairs if p.get("domain") == dom]
        g = sum(1 for p in dp if p["label_flip"] and adjudications.get(p["key"]) == "genuine")
        by_domain.append({"value": dom, "pairs": len(dp), "raw_flips": sum(p["label_flip"] for p in dp),
                          "genuine": st.proportion(g, len(dp))})
    return {"raw_flips": len(flips), "genuine": genuine, "artifact": verdicts.get("artifact", 0),
            "skipped": verdicts.get("skip", 0), "unadjudicated": verdicts.get("unadjudicated", 0),
            "not_flips_adjudicated": sum(1 for k in adjudications if k not in {p["key"] for p in flips}),
            "raw_rate": st.proportion(len(flips), len(pairs)),
            "corrected_rate": st.proportion(genuine, len(pairs)),
            "by_domain": by_domain}


# -- the summary ------------------------------------------------------------------------------------------------
def summarize(records: Sequence[Mapping[str, Any]], adjudications: Mapping[str, str] | None = None
              ) -> dict[str, Any]:
    """Everything the report needs that does not depend on the study type (Studies B/C/D are separate)."""
    pairs = pair(records)
    n_batch = sum(1 for r in records if r.get("condition") == "batch")
    divs = [p["first_divergent_token"] for p in pairs if p["first_divergent_token"] is not None]
    flips = [p for p in pairs if p["label_flip"]]
    configs = {json.dumps(r.get("backend_config"), sort_keys=True, default=str) for r in records}
    summary: dict[str, Any] = {
        "counts": {
            "records": len(records),
            "solo": sum(1 for r in records if r.get("condition") == "solo"),
            "batch": n_batch, "pairs": len(pairs), "unpaired_batch": n_batch - len(pairs),
            "ok_pairs": sum(1 for p in pairs if p["ok"]),
            "errors": sum(1 for r in records if r.get("finish_reason") == "error"),
            "retried": sum(1 for r in records if (r.get("attempts") or 1) > 1),
            "restarted": sum(1 for r in records if r.get("restarted")),
            "models": sorted({str(r.get("model")) for r in records}),
            "backends": sorted({str(r.get("backend")) for r in records}),
            "tasks": sorted({str(r.get("task")) for r in records}),
            "backend_configs": len(configs),
            "max_repeat": max((_repeat(r) for r in records), default=0),
        },
        "overall": _rates(pairs),
        "breakdowns": {f: breakdown(pairs, f) for f in BREAKDOWN_FIELDS},
        "directions": [{"direction": d, "domain": dom, "count": c} for (d, dom), c in
                       sorted(Counter((p["direction"], p.get("domain")) for p in flips).items(),
                              key=lambda kv: (-kv[1], str(kv[0])))],
        "label_pairs": _pair_distribution(pairs, "solo_label", "batch_label"),
        "score_pairs": _pair_distribution(pairs, "solo_score", "batch_score"),
        "first_divergence": {"n": len(divs), "median": _median(divs), "positions": sorted(divs)},
        "repeat_disagreement": repeat_disagreement(records),
        "cells": cells_table(records, pairs),
        "invariance_grid": invariance_grid(pairs),
    }
    if adjudications:
        summary["adjudication"] = adjudication_summary(pairs, adjudications)
    return summary


# -- Study D: paired backend comparison -------------------------------------------------------------------------
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


def compare_backends(records: Sequence[Mapping[str, Any]], a: str, b: str,
                     pairs: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Paired comparison of backends ``a`` and ``b`` on the rows both ran (matched by model, task, item, dispatcher,
    batch size, peers and repeat): per-mode counts with Wilson CIs, discordance tables and exact McNemar p for
    label flips and text changes, breakdowns, and score-pair distributions per mode.

    In the ``direction`` breakdown a row's direction is ``a``'s if ``a`` flipped, else ``b``'s, else unchanged.
    """
    pairs = pair(records) if pairs is None else pairs
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
    pa = [idx[a][k] for k in shared]
    pb = [idx[b][k] for k in shared]
    modes = []
    for name, ps in ((a, pa), (b, pb)):
        modes.append({"mode": name, "records": len(ps), "ok": sum(1 for p in ps if p["ok"]),
                      "label_flips": st.proportion(sum(p["label_flip"] for p in ps), len(ps)),
                      "text_changes": st.proportion(sum(p["text_change"] for p in ps), len(ps))})
    rows = []
    for x, y in zip(pa, pb):
        d = x["direction"] if x["label_flip"] else (y["direction"] if y["label_flip"] else "unchanged")
        rows.append({"model": x.get("model"), "domain": x.get("domain"), "task": x.get("task"),
                     "dispatcher": x.get("dispatcher"), "phase": x.get("phase"), "batch_size": x.get("batch_size"),
                     "direction": d, "a": x, "b": y})
    breakdowns = {}
    for field in ("model", "domain", "task", "dispatcher", "phase", "direction"):
        groups: dict[Any, list] = defaultdict(list)
        for r in rows:
            groups[r[field]].append(r)
        breakdowns[field] = [{
            "value": v, "rows": len(g),
            "a_flips": st.proportion(sum(r["a"]["label_flip"] for r in g), len(g)),
            "b_flips": st.proportion(sum(r["b"]["label_flip"] for r in g), len(g)),
            "a_text": st.proportion(sum(r["a"]["text_change"] for r in g), len(g)),
            "b_text": st.proportion(sum(r["b"]["text_change"] for r in g), len(g)),
        } for v, g in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))]
    return {
        "a": a, "b": b, "rows": len(shared),
        "unmatched": {a: len(idx[a]) - len(shared), b: len(idx[b]) - len(shared)},
        "duplicates": dict(dup),
        "modes": modes,
        "label": _discordance([p["label_flip"] for p in pa], [p["label_flip"] for p in pb]),
        "text": _discordance([p["text_change"] for p in pa], [p["text_change"] for p in pb]),
        "breakdowns": breakdowns,
        "score_pairs": {a: _pair_distribution(pa, "solo_score", "batch_score"),
                        b: _pair_distribution(pb, "solo_score", "batch_score")},
        "label_pairs": {a: _pair_distribution(pa, "solo_label", "batch_label"),
                        b: _pair_distribution(pb, "solo_label", "batch_label")},
    }


# -- candidate export -------------------------------------------------------------------------------------------
def export_candidates(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows to rerun in a Study D: every label flip (``kind="label_flip"``) and every text change without a label
    flip (``kind="text_change"``), with the group's peers (and their tasks where the peers were recorded)."""
    task_of: dict[tuple, dict[str, Any]] = defaultdict(dict)
    for r in records:
        task_of[(r.get("model"), r.get("backend"), r.get("group_id"))][str(r.get("item_id"))] = r.get("task")
    by_key = {r.get("key"): r for r in records}
    out = []
    for p in pair(records):
        if not (p["label_flip"] or p["text_change"]):
            continue
        rec = by_key.get(p["key"], {})
        known = task_of.get((p["model"], p["backend"], p["group_id"]), {})
        peer_tasks = [known.get(str(i)) for i in p["peers"]]
        out.append({
            "kind": "label_flip" if p["label_flip"] else "text_change",
            "key": p["key"], "study": p.get("study"), "phase": p.get("phase"),
            "model": p["model"], "backend": p["backend"], "task": p["task"], "item_id": p["item_id"],
            "task_source": rec.get("task_source"), "scorer": rec.get("scorer"),
            "domain": p.get("domain"), "batch_size": p["batch_size"], "dispatcher": p["dispatcher"],
            "group_id": p["group_id"], "position": p.get("position"), "repeat": p["repeat"], "peers": p["peers"],
            "peer_tasks": peer_tasks if any(t is not None for t in peer_tasks) else None,
            "direction": p["direction"], "label_flip": p["label_flip"], "text_change": p["text_change"],
            "solo_label": p["solo_label"], "batch_label": p["batch_label"],
            "first_divergent_token": p["first_divergent_token"],
        })
    return out


# -- Study B: cross-model ---------------------------------------------------------------------------------------
def study_b(records: Sequence[Mapping[str, Any]], seed: int = 0, n_resamples: int = 9999,
            pairs: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Per-model safety / capability flip rates, the pooled safety/capability ratio, a one-way ANOVA of per-model
    flip rate by alignment type (eta squared), and Pearson r between per-model text-change rate and label-flip
    rate with a seeded bootstrap CI."""
    pairs = pair(records) if pairs is None else pairs
    align: dict[str, Any] = {}
    for r in records:
        if r.get("alignment_type") is not None:
            align.setdefault(str(r.get("model")), r.get("alignment_type"))
    by_model: dict[str, list] = defaultdict(list)
    for p in pairs:
        by_model[str(p["model"])].append(p)
    models = []
    for m in sorted(by_model):
        ps = by_model[m]
        saf = [p for p in ps if p.get("domain") == "safety"]
        cap = [p for p in ps if p.get("domain") == "capability"]
        models.append({
            "model": m, "alignment_type": align.get(m), "pairs": len(ps),
            "safety": st.proportion(sum(p["label_flip"] for p in saf), len(saf)),
            "capability": st.proportion(sum(p["label_flip"] for p in cap), len(cap)),
            "label_flips": st.proportion(sum(p["label_flip"] for p in ps), len(ps)),
            "text_changes": st.proportion(sum(p["text_change"] for p in ps), len(ps)),
        })
    saf_all = [p for p in pairs if p.get("domain") == "safety"]
    cap_all = [p for p in pairs if p.get("domain") == "capability"]
    s = st.proportion(sum(p["label_flip"] for p in saf_all), len(saf_all))
    c = st.proportion(sum(p["label_flip"] for p in cap_all), len(cap_all))
    ratio = s["rate"] / c["rate"] if c["rate"] and c["rate"] == c["rate"] else float("nan")
    groups: dict[str, list[float]] = defaultdict(list)
    for row in models:
        if row["alignment_type"] is not None:
            groups[str(row["alignment_type"])].append(row["label_flips"]["rate"])
    return {
        "models": models,
        "pooled": {"safety": s, "capability": c, "safety_capability_ratio": ratio},
        "anova_alignment": st.anova_oneway(groups),
        "models_without_alignment_type": [r["model"] for r in models if r["alignment_type"] is None],
        "pearson_text_vs_flip": st.pearson_bootstrap([r["text_changes"]["rate"] for r in models],
                                                     [r["label_flips"]["rate"] for r in models],
                                                     seed=seed, n_resamples=n_resamples),
    }


# -- Study C: composition arms ----------------------------------------------------------------------------------
REFERENCE_ARM_NAMES = ("control", "baseline", "reference", "benign", "homogeneous", "neutral")


def composition(records: Sequence[Mapping[str, Any]], alpha: float = 0.05, power: float = 0.8,
                pairs: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Per-arm label-flip and text-change rates, an association test across arms (Fisher 2x2 / chi-square), a
    test of the batch label distribution across arms, and the minimum detectable effect (percentage points,
    power 0.8, two-sided alpha 0.05, Cohen's h) of each arm against the reference arm.

    The reference arm is the first arm whose name contains one of ``REFERENCE_ARM_NAMES`` (in that order of
    preference), else the first by name.
    """
    pairs = [p for p in (pair(records) if pairs is None else pairs) if p.get("arm") is not None]
    by_arm: dict[str, list] = defaultdict(list)
    for p in pairs:
        by_arm[str(p["arm"])].append(p)
    arms = sorted(by_arm)
    if not arms:
        return {"arms": [], "reference": None}
    ref = next((a for n in REFERENCE_ARM_NAMES for a in arms if n in a.lower()), arms[0])
    rows = [{"arm": a, **_rates(by_arm[a])} for a in arms]
    flip_table = [[r["label_flips"]["k"], r["pairs"] - r["label_flips"]["k"]] for r in rows]
    text_table = [[r["text_changes"]["k"], r["pairs"] - r["text_changes"]["k"]] for r in rows]
    labels = sorted({str(p["batch_label"]) for p in pairs})
    label_table = [[sum(1 for p in by_arm[a] if str(p["batch_label"]) == lab) for lab in labels] for a in arms]
    ref_row = next(r for r in rows if r["arm"] == ref)
    base = ref_row["label_flips"]["rate"]
    mdes = []
    for r in rows:
        if r["arm"] == ref:
            continue
        m = st.mde_two_proportions(ref_row["pairs"], r["pairs"], base, alpha, power)
        mdes.append({"arm": r["arm"], "n_reference": ref_row["pairs"], "n_arm": r["pairs"], "baseline": base,
                     "mde_pp": m * 100 if m == m else float("nan")})
    finite = [m["mde_pp"] for m in mdes if m["mde_pp"] == m["mde_pp"]]
    return {
        "reference": ref, "arms": rows,
        "flip_test": st.contingency_test(flip_table),
        "text_test": st.contingency_test(text_table),
        "batch_labels": {"labels": labels, "table": label_table, "test": st.contingency_test(label_table)},
        "mde": mdes, "sensitivity_pp": max(finite) if finite else float("nan"),
        "alpha": alpha, "power": power,
    }
