"""The fragility screen: does a solo output's smallest top-1/top-2 logprob margin predict that batching changes it?

**Fragility score** of one solo record (repeat 0, made with ``[sampling] top_logprobs = k``, k >= 2): the
smallest margin (top-1 minus top-2 logprob, :func:`evalhost.analysis_margins.margin_of`, in nats) over **every
generated token** of its output, the final eos included.  Why all of them and not the first N: a batched output
parts from its solo one at the first token where the batch's arithmetic ranks the top two the other way; up to that
token both share the solo prefix, so each solo token is a decision the batch remakes on the same context, and a
near-tie at any of them can be the one that flips (the divergences the margins module saw lie anywhere along the
output, not only at its start).  A longer output gets a smaller minimum, which is right: it has more chances to
flip.  ``first_n`` limits the score to the first N tokens (for comparison; docs/results/screen-cpu/ measures it).
Tokens with fewer than two usable candidates are skipped; a record with no usable token (the option was off, the
server gave none) has no score: it is counted as ``unscored`` and left out of the AUC.

**Against the observed text changes**: the unit is a solo item of one (model, backend, task); it *changed* when any
of its comparable batch pairs changed text.  Items with no comparable pair are left out.

* **ROC AUC** = U / (n1 * n0), with U the Mann-Whitney statistic of the changed items' scores against the unchanged
  ones' (``scipy.stats.mannwhitneyu``; a tie counts one half), scores oriented so that a smaller margin is more
  fragile: the probability that a changed item has a smaller margin than an unchanged one.  0.5 = no better than
  chance.  ``p_value``: one-sided (changed items have smaller margins), scipy's exact or tie-corrected normal test.
* **Cost saved at 90 % recall**: order the items from the most fragile; test the fewest from the top that catch at
  least 90 % of the changed items (``ceil(0.9 * changed)``); items tied on the score at that cut are all tested (a
  screen cannot split a tie), so this is the conservative figure.  ``saved`` = the share of items not tested, which
  is the share of batch generations saved when every item has the same batch cells (each item of a study does).

Summary key ``screen`` (only when some record has top-k logprobs): ``score``, ``first_n``, ``recall_target``,
``overall`` and ``by_backend`` (``items``, ``changed``, ``unscored``, ``unpaired``, ``auc``, ``u``, ``p_value``,
``needed``, ``tested``, ``saved``, ``median_margin_changed``, ``median_margin_unchanged``).
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from .analysis_margins import _entries, margin_of

RECALL = 0.9
SCORE = ("smallest top-1 minus top-2 logprob (nats) over every generated token of the solo output; smaller is "
         "more fragile")


def fragility(rec: Mapping[str, Any], first_n: int | None = None) -> float | None:
    """The record's fragility score (smallest margin over its tokens, the first ``first_n`` only when given), or
    None when it has no token with two usable candidates."""
    top = rec.get("top_logprobs")
    if not isinstance(top, list):
        return None
    best = None
    for i in range(len(top) if first_n is None else min(first_n, len(top))):
        m = margin_of(_entries(rec, i))
        if m is not None and (best is None or m < best):
            best = m
    return best


def auc(changed: Sequence[float], unchanged: Sequence[float]) -> dict[str, Any]:
    """ROC AUC of *margins* (smaller = more fragile = predicted change) through scipy's Mann-Whitney U:
    ``{"auc", "u", "p_value", "n1", "n0"}``; ``auc`` is None when either side is empty."""
    n1, n0 = len(changed), len(unchanged)
    if not n1 or not n0:
        return {"auc": None, "u": None, "p_value": None, "n1": n1, "n0": n0}
    from scipy.stats import mannwhitneyu

    # negated margins: U counts the (changed, unchanged) pairs where the changed item is more fragile (ties 1/2)
    res = mannwhitneyu([-m for m in changed], [-m for m in unchanged], alternative="greater")
    u = float(res.statistic)
    return {"auc": u / (n1 * n0), "u": u, "p_value": float(res.pvalue), "n1": n1, "n0": n0}


def saved_at_recall(units: Iterable[tuple[float, bool]], recall: float = RECALL) -> dict[str, Any]:
    """From ``(margin, changed)`` per item: the fewest items, taken from the most fragile, that catch
    ``ceil(recall * changed)`` of the changed ones, a tie on the margin at the cut taken whole:
    ``{"items", "changed", "needed", "tested", "caught", "saved"}`` (``saved`` = 1 - tested / items; None with no
    changed item)."""
    rows = sorted(units, key=lambda u: u[0])
    n, n_changed = len(rows), sum(1 for _, c in rows if c)
    out = {"items": n, "changed": n_changed, "needed": None, "tested": None, "caught": None, "saved": None}
    if not n_changed:
        return out
    needed = math.ceil(recall * n_changed - 1e-9)
    tested = caught = 0
    i = 0
    while i < n and caught < needed:
        j = i
        while j < n and rows[j][0] == rows[i][0]:  # one tie group
            j += 1
        caught += sum(1 for _, c in rows[i:j] if c)
        tested = j
        i = j
    out.update(needed=needed, tested=tested, caught=caught, saved=1.0 - tested / n)
    return out


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def aggregate(units: Sequence[tuple[float | None, bool]], recall: float = RECALL) -> dict[str, Any]:
    """The screen's numbers over ``(margin or None, changed)`` per paired item."""
    scored = [(m, c) for m, c in units if m is not None]
    ch = [m for m, c in scored if c]
    un = [m for m, c in scored if not c]
    a = auc(ch, un)
    s = saved_at_recall(scored, recall)
    return {"items": len(scored), "changed": len(ch), "unscored": len(units) - len(scored),
            "auc": a["auc"], "u": a["u"], "p_value": a["p_value"],
            "needed": s["needed"], "tested": s["tested"], "caught": s["caught"], "saved": s["saved"],
            "median_margin_changed": _median(ch), "median_margin_unchanged": _median(un)}


class ScreenTally:
    """Fed by :func:`evalhost.analysis_run.summarize_records`: :meth:`solo` per first solo record of a key (pass
    1), :meth:`pair` per batch pair (pass 2); :meth:`result` is the ``screen`` summary.  Holds one float per solo
    item and one flag per paired item."""

    def __init__(self, first_n: int | None = None, recall: float = RECALL) -> None:
        self.first_n, self.recall = first_n, recall
        self.scores: dict[tuple, float | None] = {}
        self.changed: dict[tuple, bool] = {}

    @staticmethod
    def _unit(r: Mapping[str, Any]) -> tuple:
        return tuple(str(r.get(f)) for f in ("model", "backend", "task", "item_id"))

    def solo(self, r: Mapping[str, Any]) -> None:
        if r.get("condition") == "solo" and r.get("repeat") == 0:
            self.scores.setdefault(self._unit(r), fragility(r, self.first_n))

    def pair(self, p: Mapping[str, Any]) -> None:
        if p.get("comparable"):
            u = self._unit(p)
            self.changed[u] = self.changed.get(u, False) or bool(p.get("text_change"))

    def result(self) -> dict[str, Any]:
        per: dict[str, list] = defaultdict(list)
        everything = []
        for u, changed in self.changed.items():
            if u not in self.scores:
                continue
            row = (self.scores[u], changed)
            per[u[1]].append(row)
            everything.append(row)
        unpaired = defaultdict(int)
        for u in self.scores:
            if u not in self.changed:
                unpaired[u[1]] += 1
        return {"score": SCORE, "first_n": self.first_n, "recall_target": self.recall,
                "overall": {**aggregate(everything, self.recall), "unpaired": sum(unpaired.values())},
                "by_backend": [{"backend": b, **aggregate(per[b], self.recall), "unpaired": unpaired.get(b, 0)}
                               for b in sorted(set(per) | set(unpaired))]}


def screen_of(records: Iterable[Mapping[str, Any]], pairs: Iterable[Mapping[str, Any]],
              first_n: int | None = None, recall: float = RECALL) -> dict[str, Any]:
    """The ``screen`` summary of records held in memory and their pairs (:func:`evalhost.analysis.pair`)."""
    t = ScreenTally(first_n, recall)
    for r in records:
        t.solo(r)
    for p in pairs:
        t.pair(p)
    return t.result()


def _screened_line(info: Mapping[str, Any]) -> str:
    def part(name: str) -> Mapping[str, Any]:
        v = info.get(name)
        return v if isinstance(v, Mapping) else {}

    counts = ", ".join(f"{t} {len(v) if isinstance(v, list) else '?'} of {part('items').get(t, '?')}"
                       for t, v in part("selected").items())
    return (f"**This run was screened** (`--screen {info.get('k')}`): only the {info.get('k')} most fragile items "
            f"per task were batch-tested ({counts}), chosen by the solo-only screening run "
            f"`{info.get('screen_run_dir')}` (top_logprobs = {info.get('top_logprobs')}; solo cache: "
            f"{info.get('solo_cache', 'unknown')}). Rates below are over the screened items, not over the whole "
            f"task.")


def section(screen: Mapping[str, Any] | None, screened: Mapping[str, Any] | None = None) -> str | None:
    """The report.md section: the screen's AUC and saved cost per backend, and the line saying the run was
    screened (``screened`` is the manifest's ``screen`` entry).  None when neither applies."""
    screened = screened if isinstance(screened, Mapping) else None
    if not screen and not screened:
        return None
    from .report_format import table

    out = ["## Fragility screen", ""]
    if screened:
        out += [_screened_line(screened), ""]
    if not screen:
        return "\n".join(out).rstrip()
    pct = round(100 * screen.get("recall_target", RECALL))
    out += [f"Fragility of an item = the {screen['score']}. Does it predict the items whose batched output "
            f"changed its text? ROC AUC (Mann-Whitney U / (n1 n0); 0.5 = chance) and the share of items one could "
            f"skip by batch-testing only the most fragile ones while still catching {pct}% of the changed items "
            f"(ties at the cut tested whole).", ""]
    if not screen["overall"]["items"]:
        return "\n".join(out + ["No scored solo item has a comparable batch pair yet, so there is nothing to screen "
                                "against."])
    rows = []
    for b in screen["by_backend"] + ([{"backend": "all", **screen["overall"]}]
                                     if len(screen["by_backend"]) > 1 else []):
        def f(x, spec=".3f"):
            return "n/a" if x is None else format(x, spec)
        rows.append([b["backend"], b["items"], b["changed"], f(b["auc"]), f(b["p_value"], ".2g"),
                     "n/a" if b["tested"] is None else f"{b['tested']} of {b['items']}",
                     "n/a" if b["saved"] is None else f"{100 * b['saved']:.1f}%",
                     f(b["median_margin_changed"], ".4g"), f(b["median_margin_unchanged"], ".4g"),
                     b["unscored"]])
    out.append(table(["Backend", "Items", "Text changed", "AUC", "p (one-sided)", f"Tested for {pct}% recall",
                      "Batch cost saved", "Median margin (changed)", "Median margin (unchanged)", "Unscored"], rows))
    if not screen["overall"]["changed"]:
        out += ["", "No item changed its text, so the AUC and the saved cost are undefined."]
    return "\n".join(out)
