"""Logprob margins at the divergence: was the model on a knife's edge where a batched output parted from its solo one?

Records made with ``[sampling] top_logprobs = k`` (k >= 2) carry ``top_logprobs``: per output token its k most
likely ``[token, logprob]`` pairs, most likely first.  For every comparable pair whose text changed, at its
``first_divergent_token`` *d* (:mod:`evalhost.analysis_pairs`), the **margin** is the solo record's top-1 logprob
minus its top-2 logprob at token *d*: how far the solo run's choice was from its runner-up.  A log-softmax
difference is a logit difference (the normaliser cancels), so the margin is in logit units (nats).

* **tie flip**: margin <= ``threshold`` (default :data:`TIE_MARGIN` = 0.125 nats); **non-tie flip**: margin above
  it; **unknown**: no margin, with a reason: ``no_top_logprobs`` (the solo record has none: the option was off),
  ``no_token_ids`` (no first divergent token), ``solo_ended`` (the solo output is a prefix of the batched one, so it
  has no token at *d*), ``fewer_than_2`` (fewer than two candidates stored at *d*).
* **Why 0.125, inclusive.** ``torch.finfo(torch.bfloat16).eps`` is 2**-7 (bfloat16 keeps 7 stored fraction bits:
  Google Cloud TPU documentation, "The bfloat16 numerical format", https://cloud.google.com/tpu/docs/bfloat16), so
  adjacent bfloat16 numbers in [16, 32) are 2**4 * 2**-7 = 0.125 apart.  The top logits of the shipped
  SmolLM2-135M lie there: over 4 short chat prompts x 16 greedy tokens (hf, float32) we measured top logits from
  8.5 to 38.0, median 23.2.  Logits computed in bfloat16 are multiples of that step, so two candidates one step
  apart are as close as two different values can be; a rounding of either logit (its error is up to half a step)
  can make them equal, and the batch-dependent arithmetic before it (reduction order) can swap them.  Measured on
  the quickstart study (24 items, solo vs prompt_list 4 and 8, max_tokens 40) with the hf backend in bfloat16 on
  CPU: all 15 text changes had solo margins of 0, 0.125 or 0.25 nats (6, 7 and 2 of them), and in 10 the batch
  took the solo runner-up; the float32 run of the same study changed no text.  So the default calls a change a tie
  when the solo choice was at most one bfloat16 step ahead.  float16 steps in [16, 32) are 2**-6 = 0.0156 and
  float32 steps 2**-19: for those dtypes 0.125 is generous.  Pass ``threshold`` to use another.
* Each change also records ``batch_rank``: where the batched side's token at *d* stood in the solo side's top-k
  (2 = the solo run's runner-up won), and ``top1_is_chosen`` (whether the solo token has the best logprob in its top-k, as greedy
  decoding guarantees; on an exact tie the top-k may list the tied tokens in either order).

Summary key ``margins``: ``threshold``, ``threshold_basis``, ``recorded`` (whether any record has top-k),
``bins`` (histogram edges), ``overall`` and ``by_backend`` (``backend``, ``changes``, ``tie``, ``non_tie``,
``unknown``, ``unknown_reasons``, ``tie_share`` = tie / (tie + non_tie) with a Wilson CI, ``median_margin``,
``histogram`` = counts per bin, ``batch_rank_2``), and ``rows`` (one per text change: ``key``, ``backend``,
``margin``, ``class``, ``reason``, ``index``, ``batch_rank``, ``top1_is_chosen``, ``solo_top``, ``batch_top``).
The rows are shown in report.html; summary.json keeps the aggregates only (``rows_in: "report.html"``).
"""
from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from typing import Any, Mapping, Sequence

from . import stats as st

TIE_MARGIN = 0.125
THRESHOLD_BASIS = ("one bfloat16 step for logits in [16, 32), 2**4 x 2**-7, where SmolLM2-135M's top logits lie: "
                   "median 23.2")
# histogram bins in nats: exactly 0 (an exact tie), then (a, b] between these powers of two (the tie threshold
# among them), then above 4
BIN_EDGES = (0.0, 2 ** -6, 2 ** -4, 2 ** -3, 2 ** -2, 2 ** -1, 1.0, 2.0, 4.0)
REASONS = ("no_top_logprobs", "no_token_ids", "solo_ended", "fewer_than_2")
CLASSES = ("tie", "non_tie", "unknown")


def _entries(rec: Mapping[str, Any], index: int) -> list[tuple[Any, float]] | None:
    """The stored top-k at output token ``index`` as (token, logprob), most likely first; None when the record has
    no top-k or none at that index. Malformed entries are skipped (records are untrusted)."""
    top = rec.get("top_logprobs")
    if not isinstance(top, list) or not 0 <= index < len(top) or not isinstance(top[index], list):
        return None
    out = []
    for e in top[index]:
        if (isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[1], (int, float))
                and not isinstance(e[1], bool) and math.isfinite(e[1])):
            tok = e[0] if isinstance(e[0], (int, str)) and not isinstance(e[0], bool) else str(e[0])
            out.append((tok, float(e[1])))
    out.sort(key=lambda e: -e[1])
    return out


def margin_of(entries: Sequence[tuple[Any, float]] | None) -> float | None:
    """Top-1 minus top-2 logprob (rounded to 1e-6, the precision records store), or None with fewer than two."""
    if not entries or len(entries) < 2:
        return None
    return round(entries[0][1] - entries[1][1], 6)


def classify(margin: float | None, threshold: float = TIE_MARGIN) -> str:
    if margin is None:
        return "unknown"
    return "tie" if margin <= threshold else "non_tie"


def _token_at(rec: Mapping[str, Any], index: int) -> Any:
    ids = rec.get("output_token_ids")
    return ids[index] if isinstance(ids, list) and 0 <= index < len(ids) else None


def change_row(solo: Mapping[str, Any], batch: Mapping[str, Any], p: Mapping[str, Any],
               threshold: float = TIE_MARGIN) -> dict[str, Any]:
    """The margin row of one text-changed pair ``p`` (its solo and batch records)."""
    d = p.get("first_divergent_token")
    row: dict[str, Any] = {"key": p.get("key"), "backend": p.get("backend"), "index": d, "margin": None,
                           "class": "unknown", "reason": None, "batch_rank": None, "top1_is_chosen": None,
                           "solo_top": None, "batch_top": None, "flip": bool(p.get("flip"))}
    if not isinstance(solo.get("top_logprobs"), list):
        row["reason"] = "no_top_logprobs"
        return row
    if not isinstance(d, int) or isinstance(d, bool):
        row["reason"] = "no_token_ids"
        return row
    entries = _entries(solo, d)
    if entries is None:
        row["reason"] = "solo_ended"
        return row
    row["solo_top"] = [[t, lp] for t, lp in entries]
    batch_entries = _entries(batch, d)
    row["batch_top"] = None if batch_entries is None else [[t, lp] for t, lp in batch_entries]
    margin = margin_of(entries)
    if margin is None:
        row["reason"] = "fewer_than_2"
        return row
    row["margin"], row["class"] = margin, classify(margin, threshold)
    chosen, other = _token_at(solo, d), _token_at(batch, d)
    if chosen is not None and isinstance(entries[0][0], int):
        # on an exact tie the backend may list the tied tokens in either order (hf: greedy takes the lower id, its
        # top-k need not): the chosen token is "top-1" when it shares the best logprob
        row["top1_is_chosen"] = any(t == chosen and lp == entries[0][1] for t, lp in entries)
    if other is not None:
        ranks = [i + 1 for i, (t, _) in enumerate(entries) if t == other]
        row["batch_rank"] = ranks[0] if ranks else None
    return row


def histogram(margins: Sequence[float]) -> list[int]:
    """Counts per bin: [exactly 0, (0, 2**-6], (2**-6, 2**-4], ..., (2, 4], above 4] (:func:`bin_labels`)."""
    counts = [0] * (len(BIN_EDGES) + 1)
    for m in margins:
        counts[next((j for j, e in enumerate(BIN_EDGES) if m <= e), len(BIN_EDGES))] += 1
    return counts


def bin_labels() -> list[str]:
    def f(x: float) -> str:
        return f"{x:g}"

    return ["0"] + [f"({f(a)}, {f(b)}]" for a, b in zip(BIN_EDGES, BIN_EDGES[1:])] + [f"> {f(BIN_EDGES[-1])}"]


def _aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    classes = Counter(r["class"] for r in rows)
    known = [r["margin"] for r in rows if r["margin"] is not None]
    return {"changes": len(rows), "tie": classes.get("tie", 0), "non_tie": classes.get("non_tie", 0),
            "unknown": classes.get("unknown", 0),
            "unknown_reasons": {k: v for k, v in sorted(Counter(r["reason"] for r in rows if r["reason"]).items())},
            "tie_share": st.proportion(classes.get("tie", 0), len(known)),
            "median_margin": float(statistics.median(known)) if known else None,
            "histogram": histogram(known),
            "batch_rank_2": sum(1 for r in rows if r["batch_rank"] == 2)}


def margins(records: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]],
            threshold: float = TIE_MARGIN) -> dict[str, Any]:
    """The ``margins`` summary (see the module docstring) of the comparable text-changed pairs."""
    from .analysis_pairs import prepare

    by_key: dict[Any, Mapping[str, Any]] = {}
    for r in prepare(records)[0]:  # cleaned: keys hashable, the first record per key
        by_key.setdefault(r.get("key"), r)
    rows = []
    for p in pairs:
        if not p.get("comparable") or not p.get("text_change"):
            continue
        solo, batch = by_key.get(p.get("solo_key")), by_key.get(p.get("key"))
        if solo is None or batch is None:
            continue
        rows.append(change_row(solo, batch, p, threshold))
    per: dict[str, list] = defaultdict(list)
    for r in rows:
        per[str(r["backend"])].append(r)
    return {"threshold": threshold, "threshold_basis": THRESHOLD_BASIS,
            "recorded": any(isinstance(r, Mapping) and isinstance(r.get("top_logprobs"), list) for r in records),
            "bins": list(BIN_EDGES), "bin_labels": bin_labels(),
            "overall": _aggregate(rows),
            "by_backend": [{"backend": b, **_aggregate(per[b])} for b in sorted(per)],
            "rows": rows}


def section(m: Mapping[str, Any] | None) -> str | None:
    """The report.md section (None when no record has top-k logprobs: nothing to say beyond the option's name)."""
    if not m or not m.get("recorded"):
        return None
    from .report_format import rate_ci, table

    thr = m["threshold"]
    out = ["## Logprob margins at the divergence", "",
           f"For each text change, the solo output's margin between its two most likely tokens at the first "
           f"divergent token (top-1 minus top-2 logprob, in nats). A **tie flip** has a margin of at most "
           f"{thr:g} nats ({m.get('threshold_basis', '')}): the two tokens were within one rounding step, so the "
           f"batch's different arithmetic could swap them; it says little about the model. A **non-tie flip** has "
           f"a larger margin. Unknown: no margin could be read (reasons in the last column).", ""]
    if not m["overall"]["changes"]:
        return "\n".join(out + ["No comparable pair changed its text, so there is no divergence to look at."])
    rows = []
    for b in m["by_backend"] + ([{"backend": "all", **m["overall"]}] if len(m["by_backend"]) > 1 else []):
        reasons = ", ".join(f"{k} {v}" for k, v in b["unknown_reasons"].items()) or "—"
        med = b["median_margin"]
        rows.append([b["backend"], b["changes"], b["tie"], b["non_tie"], rate_ci(b["tie_share"]),
                     "n/a" if med is None else f"{med:.4g}", b["batch_rank_2"], f"{b['unknown']} ({reasons})"])
    out.append(table(["Backend", "Text changes", f"Tie flips (<= {thr:g})", "Non-tie flips", "Tie share [95% CI]",
                      "Median margin", "Batch took the solo runner-up", "Unknown"], rows))
    labels = m.get("bin_labels") or bin_labels()
    out += ["", "Margins (nats) per backend:", "",
            table(["Backend"] + labels, [[b["backend"]] + b["histogram"] for b in m["by_backend"]])]
    return "\n".join(out)
