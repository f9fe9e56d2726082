"""Analysis of records: solo/batch pairing, label flips and text changes, breakdowns, and the statistics of
Studies B (cross-model), C (composition arms) and D (paired backend comparison).

Reads record dicts only (see docs/architecture.md for the fields); imports no torch.  The summary is computed one
record and one pair at a time (:mod:`evalhost.analysis_acc`) in streamed passes that hold a compact projection of
the records, never the records (:mod:`evalhost.analysis_run`: ``evalhost report`` on a records file, and the list
functions here on a list: the same code). Every rate is a
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
  ``not_comparable`` is the first of ``missing`` (a side is a placeholder, ``finish_reason == "missing"``, for a
  sample an imported file lacks; a key only where it occurs) / ``error`` / ``unlabelled`` / ``prompt_mismatch``.
  **Every rate is over comparable pairs**; the rest are counted per reason in ``not_comparable`` (overall, per
  backend in the headline, per breakdown row, per cell).  ``ok`` (legacy) equals ``comparable``.
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

from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from .analysis_acc import (BREAKDOWN_FIELDS, RECORD_FIELDS as _RECORD_FIELDS, Tally, breakdown_rows,  # noqa: F401
                           duplicate_view, headline_rows, median as _median, tokens_per_s as _tokens_per_s,
                           usable as _usable)
from .analysis_pairs import (PAIR_KEY, RateCounts, check_flip_on, count_field, direction,  # noqa: F401
                             first_divergence, not_comparable, pair, pair_distribution as _pair_distribution,
                             prepare, rates, sha as _sha, peers as _peers, sort_key as _sort_key)
from .analysis_run import (RunRecords, RunSummary, list_source, records_for_keys, summarize_records,  # noqa: F401
                           summarize_run)
from .analysis_studies import REFERENCE_ARM_NAMES, composition, study_b  # noqa: F401
from .analysis_study_d import (STUDY_D_FIELDS, comparable_backends, compare_backends,  # noqa: F401
                               looks_invariant)


def _repeat(rec: Mapping[str, Any]) -> int:
    try:
        return int(rec.get("repeat") or 0)
    except (TypeError, ValueError):
        return 0


def _rates(pairs: Sequence[Mapping[str, Any]], duplicates: int = 0) -> dict[str, Any]:
    return rates(pairs, duplicates)


def _flip_on_of(pairs: Sequence[Mapping[str, Any]] | None) -> str:
    return next((p.get("flip_on", "label") for p in pairs or ()), "label")


def breakdown(pairs: Iterable[Mapping[str, Any]], field: str,
              duplicates: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Rates (over comparable pairs) and not-comparable counts per value of ``field``."""
    groups: dict[Any, RateCounts] = defaultdict(RateCounts)
    for p in pairs:
        groups[p.get(field)].add(p)
    return breakdown_rows(groups, field, [duplicate_view(d) for d in duplicates])


def headline(pairs: Iterable[Mapping[str, Any]], backends: Iterable[str],
             duplicates: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """One row per backend: comparable pairs, not-comparable counts, flips (substantive / parse failure), text
    changes and truncated text changes."""
    by: dict[str, RateCounts] = defaultdict(RateCounts)
    for p in pairs:
        by[str(p.get("backend"))].add(p)
    return headline_rows(by, backends, [duplicate_view(d) for d in duplicates])


def invariance_grid(pairs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Text-change rate per (backend configuration, dispatcher/batch size), pooled over models and tasks, over
    comparable pairs."""
    t = Tally()
    for p in pairs:
        t.pair(p)
    return t.invariance_grid()


def adjudication_summary(pairs: Iterable[Mapping[str, Any]], adjudications: Mapping[str, str]) -> dict[str, Any]:
    """Raw flips, genuine / artifact / skipped / not yet adjudicated, and the corrected rate genuine / comparable
    pairs."""
    t = Tally(adjudications=adjudications)
    for p in pairs:
        t.pair(p)
    return t.adjudication()


def repeat_disagreement(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How often the same request differs from itself: repeats other than 0 against repeat 0 of the same request
    (solo: same model/backend/task/item; batch: same cell, item, position and peers).  Records with an error are
    left out; labels are compared only when both are labelled."""
    return summarize_records(list_source(records), full=False).summary["repeat_disagreement"]


def cells_table(records: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]] | None = None,
                duplicates: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per cell (issue 11): text-change / label-flip rate vs solo over comparable pairs, not-comparable counts,
    median first divergence, repeat disagreement within the cell (repeats > 0 against repeat 0 of the same item,
    position and peers), median tokens/s per request.  Computed from ``records`` (with the ``flip_on`` of
    ``pairs`` when given); ``duplicates`` is accepted for compatibility (the records' own duplicates are used)."""
    return summarize_records(list_source(records), flip_on=_flip_on_of(pairs), full=False).summary["cells"]


def summarize(records: Iterable[Mapping[str, Any]], adjudications: Mapping[str, str] | None = None,
              flip_on: str = "label") -> dict[str, Any]:
    """Everything the report needs that does not depend on the study type (Studies B/C/D are separate); see the
    module docstring for the keys.  The same passes as ``evalhost report`` (:mod:`evalhost.analysis_run`), over a
    list."""
    return summarize_records(list_source(records), adjudications, flip_on=flip_on, full=False).summary


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
