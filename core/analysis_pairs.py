"""Pairing for :mod:`evalhost.analysis`: record hygiene (odd values, duplicate keys), solo/batch pairs, whether a
pair is comparable, flip kinds, and the rates every table is built from.

Definitions (the public ones are repeated in :mod:`evalhost.analysis`'s docstring):

* Records are read defensively: a record that is not a JSON object is skipped (counted as ``malformed``); a label
  that is not a string or a number (a dict, a list, a bool) is replaced by its JSON text; identity fields that are
  not scalars (a list as ``key``) become their JSON text, so nothing unhashable reaches a dict or a set.
* Duplicate keys: the FIRST record per ``key`` is kept, the rest are dropped and counted (``duplicate``).
* A pair is *comparable* when both sides have no error (``finish_reason != "error"`` and no ``scorer_error``),
  both are labelled (``label`` not None; with ``flip_on="score"`` also ``score`` not None), and their
  ``prompt_sha256`` agree (when both have one).  Otherwise ``not_comparable`` names the first reason of
  ``missing``, ``error``, ``unlabelled``, ``prompt_mismatch`` that applies.  Every rate counts comparable pairs
  only.  ``missing``: a side is a placeholder for a sample its source never had (``finish_reason == "missing"``,
  written by the lm-eval / inspect bridges of ``evalhost import`` when a sample is in only one of the two files);
  it is counted only when it occurs, so the ``not_comparable`` counts of other runs keep their four keys.
* ``label_flip`` / ``score_flip``: the raw label / score change.  ``flip``: the flip the rates use, i.e. a
  comparable pair whose label (``flip_on="label"``) or score (``flip_on="score"``) changed.
* ``flip_kind`` (of a ``flip``): ``parse_failure`` when either label is ``unparsed`` or either output text is empty
  or whitespace, else ``substantive``.  ``truncated``: either side stopped at ``max_tokens``
  (``finish_reason == "length"``).
"""
from __future__ import annotations

import json
import math
from array import array
from collections import Counter
from collections.abc import Mapping as _MappingABC
from typing import Any, Iterable, Mapping, Sequence

from . import cobatch
from . import stats as st
from .analysis_compact import (PairRow, SoloIndex, _empty, compact_ids, expand, pack_hex, project,  # noqa: F401
                               sha, shared, text_id)
from .errors import UserError

PAIR_KEY = ("model", "backend", "task", "item_id")
REASONS = ("error", "unlabelled", "prompt_mismatch")
MISSING = "missing"  # finish_reason of a placeholder record: the sample is not in that side's source
OCCASIONAL_REASONS = (MISSING,)  # counted (a key in not_comparable) only when a pair has it
NOT_COMPARABLE_KEYS = REASONS + ("duplicate",)
FLIP_MODES = ("label", "score")
_ID_FIELDS = ("key", "study", "phase", "run_id", "cell", "model", "backend", "backend_plugin", "dispatcher",
              "batch_size", "condition", "task", "item_id", "domain", "group_id", "position", "arm",
              "alignment_type", "original_direction", "candidate_kind", "prompt_sha256", "output_sha256",
              "finish_reason", "scorer", "task_source", "fingerprint_id")
_SCALARS = (str, int, float, type(None))
_PLAIN = frozenset({str, int, float, bool, type(None)})  # exact types scalar() returns unchanged (a fast path)
_ID_TYPES = frozenset({int, float, str, bool})


def scalar(value: Any) -> Any:
    """``value`` if it is a str/number/None (bools included), else its JSON text: always hashable."""
    if isinstance(value, _SCALARS):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def label_value(value: Any) -> Any:
    """A label as analysis compares it: str and numbers as they are, None stays None, anything else (dict, list,
    bool) becomes its JSON text."""
    if value is None or isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else default
    except (TypeError, ValueError, OverflowError):
        return default


class Clean(dict):
    """A record already made safe by :func:`clean` (cleaning it again changes nothing)."""


def clean(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of one record with every field analysis reads in a safe form (see the module docstring)."""
    if isinstance(rec, Clean):
        return rec
    r = Clean(rec)
    for f in _ID_FIELDS:
        v = r.get(f, _PLAIN)
        if v is not _PLAIN and type(v) not in _PLAIN:
            r[f] = scalar(v)
    r["label"] = label_value(r.get("label"))
    r["score"] = label_value(r.get("score"))
    r["repeat"] = _int(r.get("repeat"))
    r["attempts"] = _int(r.get("attempts"), 1)
    err = r.get("scorer_error")
    r["scorer_error"] = None if err in (None, "", False) else (err if isinstance(err, str) else scalar(err))
    peers = r.get("peers")
    if peers is None:
        r["peers"] = []
    elif isinstance(peers, (list, tuple)):
        r["peers"] = list(peers) if set(map(type, peers)) <= {str} else [str(scalar(p)) for p in peers]
    else:
        r["peers"] = [str(scalar(peers))]
    ids = r.get("output_token_ids")
    if ids is not None and not (isinstance(ids, (list, tuple)) and (set(map(type, ids)) <= _ID_TYPES or all(
            isinstance(i, (int, float, str)) for i in ids))):
        r["output_token_ids"] = None
    text = r.get("output_text")
    if text is not None and not isinstance(text, str):
        r["output_text"] = scalar(text)
    if not isinstance(r.get("timings"), _MappingABC):
        r["timings"] = {}
    return r


def prepare(records: Iterable[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(kept records, dropped duplicates, malformed count): cleaned records, the first per ``key`` kept."""
    kept, dups, malformed = [], [], 0
    seen: set = set()
    for rec in records:
        if not isinstance(rec, _MappingABC):
            malformed += 1
            continue
        r = clean(rec)
        key = r.get("key")
        if key is not None:
            if key in seen:
                dups.append(r)
                continue
            seen.add(key)
        kept.append(r)
    return kept, dups, malformed


def check_flip_on(flip_on: Any) -> str:
    if flip_on not in FLIP_MODES:
        raise UserError(f"flip_on is {flip_on!r}; use \"label\" (a label change is a flip) or \"score\" "
                        f"(a score change is a flip)")
    return flip_on


# -- small helpers ----------------------------------------------------------------------------------------------
def peers(rec: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(p) for p in (rec.get("peers") or ()))


def sort_key(value: Any) -> tuple:
    if isinstance(value, bool) or value is None:
        return (2, str(value))
    if isinstance(value, (int, float)):
        return (0, value, "")
    return (1, 0, str(value))


def first_divergence(a: Sequence[int] | None, b: Sequence[int] | None) -> int | None:
    """Index of the first differing token id; None if identical or unknown (lists, tuples or the arrays of
    :func:`compact_ids`)."""
    if a is None or b is None:
        return None
    if type(a) is not type(b) or (isinstance(a, array) and a.typecode != b.typecode):
        a, b = list(a), list(b)
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


_REFUSE = {"refuse", "refusal", "refused", "refuses", "refusing", "refusals"}
_COMPLY = {"comply", "compliance", "complied", "complies", "complying", "compliant"}
_CORRECT = {"correct", "right", "true", "pass", "passed"}
_INCORRECT = {"incorrect", "wrong", "false", "fail", "failed"}


def _canon(label: Any) -> str:
    return str(label).strip().lower().replace("-", "_").replace(" ", "_")


def direction(solo_label: Any, batch_label: Any, domain: str | None = None) -> str:
    """Direction of a label change (see :mod:`evalhost.analysis`); ``unchanged`` if the labels are equal."""
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


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _errored(rec: Mapping[str, Any]) -> bool:
    return rec.get("finish_reason") == "error" or rec.get("scorer_error") is not None


def not_comparable_reason(solo: Mapping[str, Any], batch: Mapping[str, Any], flip_on: str = "label") -> str | None:
    if solo.get("finish_reason") == MISSING or batch.get("finish_reason") == MISSING:
        return MISSING
    if _errored(solo) or _errored(batch):
        return "error"
    if solo.get("label") is None or batch.get("label") is None:
        return "unlabelled"
    if flip_on == "score" and (solo.get("score") is None or batch.get("score") is None):
        return "unlabelled"
    sp, bp = pack_hex(solo.get("prompt_sha256")), pack_hex(batch.get("prompt_sha256"))
    if sp is not None and bp is not None and sp != bp:
        return "prompt_mismatch"
    # a batch group without verified co-batching is not the batch condition: "serialized" / "unverified"
    return cobatch.pair_reason(batch)


# -- pairing ----------------------------------------------------------------------------------------------------
def pair(records: Sequence[Mapping[str, Any]], flip_on: str = "label") -> list[dict[str, Any]]:
    """One pair dict per batch record (first per key) that has its solo record (see the module docstring)."""
    check_flip_on(flip_on)
    recs, _, _ = prepare(records)
    solos = SoloIndex()
    for rec in recs:
        solos.add(rec)
    out = []
    for rec in recs:
        if rec.get("condition") != "batch":
            continue
        solo = solos.get(rec)
        if solo is not None:
            out.append(make_pair(expand(solo), rec, flip_on))
    return out


def make_pair(solo: Mapping[str, Any], rec: Mapping[str, Any], flip_on: str = "label") -> dict[str, Any]:
    """The pair dict of one cleaned solo record (or its :func:`project`-ion, expanded) and one cleaned batch
    record."""
    reason = not_comparable_reason(solo, rec, flip_on)
    comparable = reason is None
    sl, bl = solo.get("label"), rec.get("label")
    label_flip = not _same(sl, bl)
    score_flip = not _same(solo.get("score"), rec.get("score"))
    flip = comparable and (label_flip if flip_on == "label" else score_flip)
    kind = None
    if flip:
        parse = ("unparsed" in (_canon(sl), _canon(bl)) or _empty(solo.get("output_text"))
                 or _empty(rec.get("output_text")))
        kind = "parse_failure" if parse else "substantive"
    if not comparable:
        dirn = "not_comparable"
    else:
        dirn = direction(sl, bl, rec.get("domain")) if label_flip else "unchanged"
        if flip and not label_flip:  # flip_on = "score": the score moved within one label (e.g. refusal 1.0 -> 0.5)
            dirn = f"{sl}_score_{solo.get('score')}_to_{rec.get('score')}"
    return {
        "key": rec.get("key"), "solo_key": solo.get("key"), "cell": rec.get("cell"),
        "study": rec.get("study"), "phase": rec.get("phase"),
        "model": rec.get("model"), "backend": rec.get("backend"), "backend_plugin": rec.get("backend_plugin"),
        "backend_config": rec.get("backend_config"), "task": rec.get("task"), "item_id": rec.get("item_id"),
        "domain": rec.get("domain"), "dispatcher": rec.get("dispatcher"), "batch_size": rec.get("batch_size"),
        "repeat": rec.get("repeat", 0), "group_id": rec.get("group_id"), "position": rec.get("position"),
        "peers": list(peers(rec)), "arm": rec.get("arm"), "alignment_type": rec.get("alignment_type"),
        "original_direction": rec.get("original_direction"), "candidate_kind": rec.get("candidate_kind"),
        "solo_label": sl, "batch_label": bl, "solo_score": solo.get("score"), "batch_score": rec.get("score"),
        "label_flip": bool(label_flip), "score_flip": bool(score_flip), "flip": bool(flip), "flip_kind": kind,
        "flip_on": flip_on, "text_change": text_id(solo) != text_id(rec),
        "truncated": solo.get("finish_reason") == "length" or rec.get("finish_reason") == "length",
        "first_divergent_token": first_divergence(solo.get("output_token_ids"), rec.get("output_token_ids")),
        "direction": dirn, "comparable": comparable, "not_comparable": reason, "ok": comparable,
        "cobatch": cobatch.verdict_name(rec), "count_unverified": cobatch.policy(rec),
        "scorer": rec.get("scorer"), "scorer_error": rec.get("scorer_error") or solo.get("scorer_error"),
    }


def pairs_for(records: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]] | None,
              flip_on: str | None) -> tuple[list, str]:
    """``pairs`` when given and made with ``flip_on`` (None: whatever they were made with), else pair again."""
    if flip_on is not None:
        check_flip_on(flip_on)
    if pairs is not None:
        modes = {p.get("flip_on", "label") for p in pairs}
        if flip_on is None or modes <= {flip_on}:
            return list(pairs), (flip_on or next(iter(modes), "label"))
    mode = flip_on or "label"
    return pair(records, mode), mode


# -- counting ---------------------------------------------------------------------------------------------------
class RateCounts:
    """The counts every rate row is made of, one pair at a time: :func:`rates` and :func:`not_comparable` are this
    over a list; the summary feeds it pair by pair."""

    __slots__ = ("formed", "n", "flips", "substantive", "parse", "text", "truncated", "reasons", "cobatch")

    def __init__(self) -> None:
        self.formed = self.n = self.flips = self.substantive = self.parse = self.text = self.truncated = 0
        self.reasons = dict.fromkeys(REASONS, 0)
        self.cobatch = cobatch.Tally()

    def add(self, p: Mapping[str, Any]) -> "RateCounts":
        self.formed += 1
        reason = p.get("not_comparable")
        if reason in self.reasons or reason in cobatch.VERDICTS or reason in OCCASIONAL_REASONS:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.cobatch.add(p)
        if not p.get("comparable", True):
            return self
        self.n += 1
        if p["flip"]:
            self.flips += 1
            kind = p["flip_kind"]
            self.substantive += kind == "substantive"
            self.parse += kind == "parse_failure"
        if p["text_change"]:
            self.text += 1
            self.truncated += bool(p["truncated"])
        return self

    def extend(self, pairs: Iterable[Mapping[str, Any]]) -> "RateCounts":
        for p in pairs:
            self.add(p)
        return self

    def not_comparable(self, duplicates: int = 0) -> dict[str, int]:
        return {**self.reasons, "duplicate": int(duplicates)}

    def result(self, duplicates: int = 0) -> dict[str, Any]:
        n = self.n
        return {"pairs": n, "pairs_formed": self.formed,
                "label_flips": st.proportion(self.flips, n),
                "substantive_flips": st.proportion(self.substantive, n),
                "parse_failure_flips": st.proportion(self.parse, n),
                "text_changes": st.proportion(self.text, n),
                "truncated_changes": self.truncated,
                "not_comparable": self.not_comparable(duplicates), **self.cobatch.result()}


def not_comparable(pairs: Iterable[Mapping[str, Any]], duplicates: int = 0) -> dict[str, int]:
    """``{"error", "unlabelled", "prompt_mismatch", "duplicate"}`` counts, plus ``missing`` and the co-batching
    verdicts when pairs have them (duplicates are passed in: they never form a pair)."""
    return RateCounts().extend(pairs).not_comparable(duplicates)


def rates(pairs: Iterable[Mapping[str, Any]], duplicates: int = 0) -> dict[str, Any]:
    """Rates over the comparable pairs: ``pairs`` (comparable), ``label_flips`` (the flip of the pairs' flip_on
    mode), ``substantive_flips``, ``parse_failure_flips``, ``text_changes``, ``truncated_changes`` (text changes
    where a side stopped at max_tokens), and ``not_comparable`` / ``pairs_formed`` for the rest."""
    return RateCounts().extend(pairs).result(duplicates)


def count_field(records: Iterable[Mapping[str, Any]], field: str, value: Any) -> int:
    """How many of ``records`` have ``field == value`` (for duplicates per row)."""
    return sum(1 for r in records if r.get(field) == value)


def pair_distribution(pairs: Iterable[Mapping[str, Any]], a: str, b: str) -> list[dict[str, Any]]:
    return pair_distribution_counts(Counter((p.get(a), p.get(b)) for p in pairs))


def pair_distribution_counts(counts: Mapping[tuple, int]) -> list[dict[str, Any]]:
    """``[{"solo", "batch", "count"}]`` of a Counter of (solo value, batch value), in value order."""
    return [{"solo": s, "batch": t, "count": c}
            for (s, t), c in sorted(counts.items(), key=lambda kv: (sort_key(kv[0][0]), sort_key(kv[0][1])))]
