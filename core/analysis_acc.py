"""The summary of :mod:`evalhost.analysis`, built one record and one pair at a time.

Every table of the summary is a reduction over records or over pairs; :class:`Tally` holds only what those
reductions need (counts per row, and the few value lists a median needs), so the summary of a run costs memory in
proportion to its number of rows, cells and backends, not to its number of records.  The list functions of
:mod:`evalhost.analysis` (``summarize``, ``breakdown``, ``headline``, ``cells_table``, ``invariance_grid``,
``adjudication_summary``, ``repeat_disagreement``) are this class fed from a list; ``evalhost report`` feeds it
from the records file (:mod:`evalhost.analysis_run`).  The definitions are in :mod:`evalhost.analysis`.

Feeding order: every kept (cleaned, first-per-key) record to :meth:`Tally.record`, every dropped duplicate to
:meth:`Tally.duplicate`, every pair to :meth:`Tally.pair`, every repeat comparison to :meth:`Tally.repeat`; then
:meth:`Tally.result`.
"""
from __future__ import annotations

import json
import statistics
from array import array
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Sequence

from . import stats as st
from .analysis_pairs import RateCounts, pair_distribution_counts, sort_key

BREAKDOWN_FIELDS = ("model", "domain", "task", "dispatcher", "batch_size", "phase", "original_direction",
                    "direction", "backend")
RECORD_FIELDS = {"model", "domain", "task", "dispatcher", "batch_size", "phase", "original_direction", "backend",
                 "cell", "arm"}
DUPLICATE_FIELDS = tuple(sorted(RECORD_FIELDS)) + ("condition",)
CELL_FIELDS = ("model", "backend", "backend_plugin", "backend_config", "task", "dispatcher", "batch_size",
               "condition")


def median(values: Iterable[float | int | None]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    return float(statistics.median(vals)) if vals else None


def tokens_per_s(rec: Mapping[str, Any]) -> float | None:
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


def usable(r: Mapping[str, Any]) -> bool:
    return r.get("finish_reason") != "error" and r.get("scorer_error") is None


def duplicate_view(r: Mapping[str, Any]) -> dict[str, Any]:
    """What the summary reads of a dropped duplicate record (its row values)."""
    return {f: r.get(f) for f in DUPLICATE_FIELDS if f in r}


def _dup_count(dups: Iterable[Mapping[str, Any]], field: str, value: Any, batch_only: bool = False) -> int:
    return sum(1 for d in dups if d.get(field) == value and (not batch_only or d.get("condition") == "batch"))


def breakdown_rows(groups: Mapping[Any, RateCounts], field: str, dups: Sequence[Mapping[str, Any]]
                   ) -> list[dict[str, Any]]:
    """Rate rows per value of ``field``; dropped duplicate *batch* records count in the row of their value when
    ``field`` is a record field."""
    counted = field in RECORD_FIELDS
    values = set(groups)
    if counted:
        values |= {d.get(field) for d in dups if d.get("condition") == "batch"}
    return [{"value": v, **(groups[v] if v in groups else RateCounts()).result(
        _dup_count(dups, field, v, batch_only=True) if counted else 0)} for v in sorted(values, key=sort_key)]


def headline_rows(by_backend: Mapping[str, RateCounts], backends: Iterable[str],
                  dups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for b in sorted(set(backends) | set(by_backend)):
        r = (by_backend[b] if b in by_backend else RateCounts()).result(
            sum(1 for d in dups if str(d.get("backend")) == b))
        rows.append({"backend": b, "pairs": r["pairs"], "pairs_formed": r["pairs_formed"],
                     "not_comparable": r["not_comparable"], "label_flips": r["label_flips"],
                     "substantive_flips": r["substantive_flips"], "parse_failure_flips": r["parse_failure_flips"],
                     "text_changes": r["text_changes"], "truncated_changes": r["truncated_changes"]})
    return rows


def add_scorer_pair(by_scorer: dict[str, Counter], p: Mapping[str, Any]) -> None:
    """Count a comparable pair's (solo label, batch label) under its scorer (the batch record's)."""
    if p.get("comparable", p.get("ok")):
        scorer = str(p.get("scorer") or "unknown scorer")
        by_scorer.setdefault(scorer, Counter())[(str(p["solo_label"]), str(p["batch_label"]))] += 1


def scorer_pair_rows(by_scorer: Mapping[str, Counter]) -> list[dict[str, Any]]:
    """``label_pairs_by_scorer``: one solo -> batch label distribution per scorer (never mixed)."""
    return [{"scorer": s, "pairs": [{"solo": a, "batch": b, "count": n} for (a, b), n in sorted(by_scorer[s].items())]}
            for s in sorted(by_scorer)]


class _Cell:
    __slots__ = ("first", "records", "tps", "rates", "divs", "rep_k", "rep_n")

    def __init__(self, rec: Mapping[str, Any]) -> None:
        self.first = {f: rec.get(f) for f in CELL_FIELDS}
        self.records, self.tps, self.rates, self.divs = 0, array("d"), RateCounts(), array("q")
        self.rep_k = self.rep_n = 0


class Tally:
    """The core summary (``summarize``'s keys) of records and pairs fed one at a time."""

    def __init__(self, flip_on: str = "label", adjudications: Mapping[str, str] | None = None) -> None:
        self.flip_on = flip_on
        self.adjudications = {str(k): v for k, v in (adjudications or {}).items()}
        self.given = self.kept = self.malformed = 0
        self.n = Counter()  # solo, batch, errors, scorer_errors, retried, restarted
        self.names = {"models": set(), "backends": set(), "tasks": set()}
        self.configs: set = set()
        self.max_repeat: int | None = None
        self.cells: dict[Any, _Cell] = {}
        self.dups: list[dict[str, Any]] = []
        self.overall = RateCounts()
        self.by_backend: dict[str, RateCounts] = defaultdict(RateCounts)
        self.by_field = {f: defaultdict(RateCounts) for f in BREAKDOWN_FIELDS}
        self.grid: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])  # n, text changes, flips
        self.directions: Counter = Counter()
        self.label_pairs: Counter = Counter()
        self.score_pairs: Counter = Counter()
        self.by_scorer: dict[str, Counter] = {}
        self.divs = array("q")
        self.repeats = {"solo": [0, 0, 0, 0], "batch": [0, 0, 0, 0]}  # text k, n, label k, n
        self.solo_rep_backend: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.adj = Counter()
        self.adj_domain: dict[Any, list[int]] = defaultdict(lambda: [0, 0, 0])  # pairs, raw flips, genuine
        self.adj_flip_keys: set = set()

    # -- records ---------------------------------------------------------------------------------------------
    def record(self, r: Mapping[str, Any]) -> None:
        """A kept record (cleaned, the first of its key)."""
        self.kept += 1
        cond = r.get("condition")
        self.n["solo"] += cond == "solo"
        self.n["batch"] += cond == "batch"
        self.n["errors"] += r.get("finish_reason") == "error"
        self.n["scorer_errors"] += r.get("scorer_error") is not None
        self.n["retried"] += (r.get("attempts") or 1) > 1
        self.n["restarted"] += bool(r.get("restarted"))
        for name, f in (("models", "model"), ("backends", "backend"), ("tasks", "task")):
            self.names[name].add(str(r.get(f)))
        cfg = r.get("backend_config")
        self.configs.add("{}" if cfg == {} and type(cfg) is dict else
                         json.dumps(cfg, sort_keys=True, default=str))
        rep = r.get("repeat") or 0
        self.max_repeat = rep if self.max_repeat is None else max(self.max_repeat, rep)
        cell = self.cells.get(r.get("cell"))
        if cell is None:
            cell = self.cells[r.get("cell")] = _Cell(r)
        cell.records += 1
        tps = tokens_per_s(r)
        if tps is not None:
            cell.tps.append(tps)

    def duplicate(self, r: Mapping[str, Any]) -> None:
        self.dups.append(duplicate_view(r))

    # -- pairs -----------------------------------------------------------------------------------------------
    def pair(self, p: Mapping[str, Any]) -> None:
        self.overall.add(p)
        self.by_backend[str(p.get("backend"))].add(p)
        for f, groups in self.by_field.items():
            groups[p.get(f)].add(p)
        cell = self.cells.get(p["cell"])
        if cell is None:  # a pair whose cell has no kept record (only when fed pairs without their records)
            cell = self.cells[p["cell"]] = _Cell({})
            cell.first = None
        cell.rates.add(p)
        if not p["comparable"]:
            return
        div = p["first_divergent_token"]
        if isinstance(div, (int, float)):
            cell.divs.append(div)
            self.divs.append(div)
        g = self.grid[(str(p.get("backend")), f"{p.get('dispatcher')}/bs{p.get('batch_size')}")]
        g[0] += 1
        g[1] += bool(p["text_change"])
        g[2] += bool(p["flip"])
        self.label_pairs[(p.get("solo_label"), p.get("batch_label"))] += 1
        self.score_pairs[(p.get("solo_score"), p.get("batch_score"))] += 1
        add_scorer_pair(self.by_scorer, p)
        if p["flip"]:
            self.directions[(p["direction"], p.get("domain"))] += 1
        if self.adjudications:
            key = str(p["key"])
            verdict = self.adjudications.get(key)
            d = self.adj_domain[p.get("domain")]
            d[0] += 1
            if p["flip"]:
                self.adj["unadjudicated" if key not in self.adjudications else verdict] += 1
                d[1] += 1
                d[2] += verdict == "genuine"
                if key in self.adjudications:
                    self.adj_flip_keys.add(key)

    def repeat(self, cond: Any, backend: Any, cell: Any, text: bool | None, label: bool | None,
               in_cell: bool | None) -> None:
        """One repeat > 0 against its repeat 0: ``text``/``label`` for the run-level comparison of ``cond``
        (None: not compared there), ``in_cell`` for the cell's own comparison (None: not compared)."""
        if text is not None and cond in self.repeats:
            acc = self.repeats[cond]
            acc[0] += text
            acc[1] += 1
            if label is not None:
                acc[2] += label
                acc[3] += 1
            if cond == "solo":
                b = self.solo_rep_backend[str(backend)]
                b[0] += text
                b[1] += 1
        if in_cell is not None and cell in self.cells:
            self.cells[cell].rep_k += in_cell
            self.cells[cell].rep_n += 1

    # -- results ---------------------------------------------------------------------------------------------
    def breakdown(self, field: str) -> list[dict[str, Any]]:
        return breakdown_rows(self.by_field[field], field, self.dups)

    def headline(self, backends: Iterable[str]) -> list[dict[str, Any]]:
        return headline_rows(self.by_backend, backends, self.dups)

    def cells_table(self) -> list[dict[str, Any]]:
        rows = []
        for name in sorted(self.cells, key=sort_key):
            c = self.cells[name]
            if c.first is None:
                continue
            r = c.rates.result(_dup_count(self.dups, "cell", name))
            rows.append({
                "cell": name, **{f: c.first[f] for f in CELL_FIELDS[:-1]}, "condition": c.first["condition"],
                "records": c.records, "pairs": r["pairs"], "pairs_formed": r["pairs_formed"],
                "not_comparable": r["not_comparable"], "text_changes": r["text_changes"],
                "label_flips": r["label_flips"], "substantive_flips": r["substantive_flips"],
                "parse_failure_flips": r["parse_failure_flips"], "truncated_changes": r["truncated_changes"],
                "first_divergence_median": median(c.divs),
                "repeat_disagreement": st.proportion(c.rep_k, c.rep_n),
                "tokens_per_s_median": median(c.tps),
            })
        return rows

    def invariance_grid(self) -> dict[str, Any]:
        rows = sorted({k[0] for k in self.grid})

        def col_key(c):
            head, _, tail = c.rpartition("/bs")
            return (head, int(tail) if tail.isdigit() else 0, tail)

        cols = sorted({k[1] for k in self.grid}, key=col_key)
        cells = [{"backend": b, "column": c, "text_changes": st.proportion(g[1], g[0]),
                  "label_flips": st.proportion(g[2], g[0])}
                 for b in rows for c in cols if (g := self.grid.get((b, c))) is not None]
        return {"rows": rows, "cols": cols, "cells": cells}

    def repeat_disagreement(self) -> dict[str, Any]:
        out: dict[str, Any] = {c: {"text": st.proportion(a[0], a[1]), "label": st.proportion(a[2], a[3])}
                               for c, a in self.repeats.items()}
        out["solo_by_backend"] = [{"backend": k, "text": st.proportion(v[0], v[1])}
                                  for k, v in sorted(self.solo_rep_backend.items())]
        return out

    def adjudication(self) -> dict[str, Any]:
        n, flips, genuine = self.overall.n, sum(d[1] for d in self.adj_domain.values()), self.adj.get("genuine", 0)
        return {"raw_flips": flips, "genuine": genuine, "artifact": self.adj.get("artifact", 0),
                "skipped": self.adj.get("skip", 0), "unadjudicated": self.adj.get("unadjudicated", 0),
                "not_flips_adjudicated": len(self.adjudications) - len(self.adj_flip_keys),
                "raw_rate": st.proportion(flips, n), "corrected_rate": st.proportion(genuine, n),
                "by_domain": [{"value": dom, "pairs": d[0], "raw_flips": d[1], "genuine": st.proportion(d[2], d[0])}
                              for dom, d in sorted(self.adj_domain.items(), key=lambda kv: sort_key(kv[0]))]}

    def scorer_pairs(self) -> list[dict[str, Any]]:
        return scorer_pair_rows(self.by_scorer)

    def result(self) -> dict[str, Any]:
        """The ``summarize`` dict (see :mod:`evalhost.analysis`)."""
        formed, n_batch = self.overall.formed, self.n["batch"]
        backends = sorted(self.names["backends"])
        summary: dict[str, Any] = {
            "counts": {
                "records": self.given, "unique_records": self.kept, "malformed": self.malformed,
                "solo": self.n["solo"], "batch": n_batch, "pairs": formed, "unpaired_batch": n_batch - formed,
                "comparable_pairs": self.overall.n, "ok_pairs": self.overall.n,
                "duplicates_dropped": len(self.dups), "not_comparable": self.overall.not_comparable(len(self.dups)),
                "errors": self.n["errors"], "scorer_errors": self.n["scorer_errors"],
                "retried": self.n["retried"], "restarted": self.n["restarted"],
                "models": sorted(self.names["models"]), "backends": backends,
                "tasks": sorted(self.names["tasks"]), "backend_configs": len(self.configs),
                "max_repeat": self.max_repeat or 0,
            },
            "flip_on": self.flip_on,
            "headline": self.headline(backends),
            "overall": self.overall.result(len(self.dups)),
            "breakdowns": {f: self.breakdown(f) for f in BREAKDOWN_FIELDS},
            "directions": [{"direction": d, "domain": dom, "count": c} for (d, dom), c in
                           sorted(self.directions.items(), key=lambda kv: (-kv[1], str(kv[0])))],
            "label_pairs": pair_distribution_counts(self.label_pairs),
            "score_pairs": pair_distribution_counts(self.score_pairs),
            "first_divergence": {"n": len(self.divs), "median": median(self.divs), "positions": sorted(self.divs)},
            "repeat_disagreement": self.repeat_disagreement(),
            "cells": self.cells_table(),
            "invariance_grid": self.invariance_grid(),
        }
        if self.adjudications:
            summary["adjudication"] = self.adjudication()
        return summary
