"""The whole summary of a run in a few streamed passes over its records, holding a compact projection.

``evalhost report`` never holds the records.  :func:`summarize_records` reads them from a *source*, a function
that returns a fresh iterator over the records each time it is called (:class:`StreamSource`: the records file
streamed again with :func:`evalhost.records.iter_records`' bounds; or a list), and makes these passes:

1. every record (its shape checked): the record-level counts (:class:`evalhost.analysis_acc.Tally`), a 64-bit
   hash of each key (to find duplicate keys: when two hash alike the pass is made again over the same records,
   keeping the exact keys of those records), and for each solo record of repeat 0 its
   :func:`evalhost.analysis_pairs.project`-ion (label, score, finish reason, scorer error, packed prompt and
   output hashes, whether the text is empty, compact token ids);
2. the same records again: each batch record is paired with its solo's projection at once (:func:`make_pair`)
   and fed to the summary, the Study B/C counters and, with two or more backends, a slotted Study D row
   (:class:`evalhost.analysis_study_d.Slim`); records of repeat != 0 are compared with their repeat 0; the pair
   dicts of comparable pairs that flipped or changed text are kept (``RunSummary.changed_pairs``);
3. only when some pair changed: the lines that hold the keys of those pairs' solo records (a regular-expression
   look at the line, then JSON).  Of a changed pair's records :func:`_changed_view` keeps what the logprob margins
   and report.html read (key, output text, token ids, top-k logprobs at the divergent token) in
   ``RunSummary.changed_records`` (the batch record's view is made in pass 2, where it is in hand).

Later passes read only the records the first pass counted (a run still writing may append meanwhile).  Memory
grows with the solo items (one projection each, ~0.5-1 KB), the changed pairs (their pair dicts and views) and,
with two or more backends, the pairs (a ~250-byte Study D row each); never with the other records.  The
in-memory path is the same code with a list as the source (:func:`evalhost.report.build_summary`,
:func:`evalhost.analysis.summarize`): one way to compute each number.

**Getting the records of some keys** (e.g. both texts of the flips report.html shows):
``records_for_keys(source, keys, view=None)`` streams the source once and returns the first record of each key
in ``keys`` (file order), or ``view(record)`` of it; for a run directory use
``RunRecords(find_records(run_dir)).source`` (or :func:`stream_source`) as the source.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping as _MappingABC
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from .analysis_acc import Tally, usable
from .analysis_pairs import (PAIR_KEY, PairRow, SoloIndex, check_flip_on, clean, expand, make_pair, peers,
                             text_id)
from .analysis_studies import Composition, StudyB
from .analysis_study_d import Slim, comparable_backends, compare_backends

Source = Callable[[], Iterable[Any]]


class _Dedupe:
    """Keeps the first record per key: 8 bytes per record to find keys that may repeat, exact keys for those."""

    def __init__(self, suspects: set | None) -> None:
        from array import array

        self.hashes = array("q")
        self.suspects = suspects  # None: first pass, nothing known yet (every record kept)
        self.seen: set = set()

    def first(self, key: Any) -> bool:
        if key is None:
            return True
        h = hash(key)
        if self.suspects is None:
            self.hashes.append(h)
            return True
        if h not in self.suspects:
            return True
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def repeated_hashes(self) -> set:
        import numpy as np

        a = np.sort(np.frombuffer(self.hashes, dtype=np.int64)) if len(self.hashes) else np.zeros(0, np.int64)
        return set(a[1:][a[1:] == a[:-1]].tolist())


def _repeat_key(r: Mapping[str, Any]) -> tuple:
    return (r.get("cell"), r.get("item_id"), r.get("position"), peers(r))


class RunSummary:
    """What :func:`summarize_records` returns: ``summary`` (the report's summary dict), ``changed_records`` and
    ``changed_pairs`` (full records and pair dicts of every comparable pair that flipped or changed text),
    ``fingerprint_rows`` (one ``{"fingerprint_id", "backend"}`` per combination used), ``prompt_warnings``
    (:func:`evalhost.validate.prompts_across_backends`' sentences), ``records`` (how many) and ``study``."""

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}
        self.changed_records: list[dict[str, Any]] = []
        self.changed_pairs: list[dict[str, Any]] = []
        self.fingerprint_rows: list[dict[str, Any]] = []
        self.prompt_warnings: list[str] = []
        self.records = 0
        self.study: Any = None


CHANGED_FIELDS = ("key", "output_text", "output_token_ids", "top_logprobs")


def _changed_view(raw: Mapping[str, Any], need: Mapping[Any, tuple], recorded: bool) -> dict[str, Any]:
    """What the margins (:func:`evalhost.analysis_margins.margins`) and report.html's explorer read of a changed
    pair's record: its key and output text, and when the run has top-k logprobs (``recorded``) its token ids and
    its top-k logprobs only at the token indices where one of its pairs diverged (the other positions are None; the
    list keeps its length).  Without top-k logprobs the margins read neither."""
    r = clean(raw)
    view = {f: r[f] for f in (CHANGED_FIELDS if recorded else CHANGED_FIELDS[:2]) if f in r}
    top = view.get("top_logprobs")
    if isinstance(top, list):
        sparse: list = [None] * len(top)
        for i in need.get(r.get("key"), ()):
            if 0 <= i < len(top):
                sparse[i] = top[i]
        view["top_logprobs"] = sparse
    return view


def records_for_keys(source: Source, keys: Iterable[Any],
                     view: Callable[[Mapping[str, Any]], Any] | None = None, limit: int | None = None) -> list[Any]:
    """The first record (file order) of each key in ``keys``, in file order, streaming ``source`` once; keys
    compare as :func:`evalhost.analysis_pairs.clean` makes them (a list as key becomes its JSON text).  With
    ``view``, ``view(record)`` is kept instead of the record (so only that part is ever held).

    E.g. both texts of some pairs: ``records_for_keys(stream_source(path), {p["key"] for p in ps} |
    {p["solo_key"] for p in ps}, lambda r: (r["key"], r.get("output_text")))``."""
    want = set(keys)
    out, seen = [], set()
    with_keys = getattr(source, "with_keys", None)
    for raw in (with_keys(want, limit) if with_keys else islice(source(), limit)):
        if not isinstance(raw, _MappingABC):
            continue
        key = raw.get("key")
        if key is not None and not isinstance(key, (str, int, float)):
            key = clean(raw).get("key")
        if key in want and key not in seen:
            seen.add(key)
            out.append(raw if view is None else view(raw))
    return out


def summarize_records(source: Source, adjudications: Mapping[str, str] | None = None, seed: int = 0,
                      flip_on: str = "label", full: bool = True) -> RunSummary:
    """The summary of the records of ``source`` (see the module docstring); ``full=False`` stops at the core
    summary (``evalhost.analysis.summarize``'s keys)."""
    from .analysis_screen import ScreenTally
    from .validate import _PromptsAcross

    check_flip_on(flip_on)
    suspects: set | None = None
    first = 0
    while True:  # pass 1, made twice only when two keys hash alike
        out, tally, prompts = RunSummary(), Tally(flip_on, adjudications), _PromptsAcross()
        dedupe = _Dedupe(suspects)
        solos = SoloIndex()
        screen = ScreenTally()  # the fragility screen (evalhost.analysis_screen)
        wanted_bases: set = set()
        align: dict[str, Any] = {}
        fps: set = set()
        has_arm = False
        recorded = False
        again = getattr(source, "again", None)
        for raw in source() if suspects is None else again(first) if again else islice(source(), first):
            tally.given += 1
            if not isinstance(raw, _MappingABC):
                tally.malformed += 1
                continue
            if raw.get("alignment_type") is not None:
                align.setdefault(str(raw.get("model")), raw.get("alignment_type"))
            has_arm = has_arm or raw.get("arm") is not None
            if out.study is None and raw.get("study"):
                out.study = raw.get("study")
            if raw.get("fingerprint_id") is not None:
                fps.add((str(raw["fingerprint_id"]), str(raw.get("backend"))))
            recorded = recorded or isinstance(raw.get("top_logprobs"), list)
            prompts.see(raw)
            r = clean(raw)
            if not dedupe.first(r.get("key")):
                tally.duplicate(r)
                continue
            tally.record(r)
            solos.add(r)
            screen.solo(r)
            if r["repeat"] != 0:
                wanted_bases.add(hash(_repeat_key(r)))
        if suspects is not None:
            break
        first = tally.given  # the second time, the same records (a run still writing may have appended more)
        suspects = dedupe.repeated_hashes()
        if not suspects:
            break
    out.records = tally.given
    out.fingerprint_rows = [{"fingerprint_id": f, "backend": b} for f, b in sorted(fps)]
    models = tally.names["models"]
    several_backends = len(tally.names["backends"]) >= 2
    study_b, study_c = StudyB(), Composition()
    slims: list[Slim] = []
    first_config: dict[str, Any] = {}
    need: dict[Any, tuple] = {}  # key of a changed pair's solo record -> the token indices its margins read
    batch_views: list[dict[str, Any]] = []  # the same views of the changed pairs' batch records (in hand now)
    bases: dict[tuple, tuple] = {}  # (cell, item, position, peers) -> the first repeat-0 record's value
    batch_bases: dict[tuple, tuple] = {}  # the same for the first repeat-0 *batch* record when that differs
    stash: list[tuple] = []  # records of repeat != 0, compared once every base is known

    dedupe = _Dedupe(suspects or set())
    for raw in (again(tally.given) if again else islice(source(), tally.given)):  # pass 2: pass 1's records only
        if not isinstance(raw, _MappingABC):
            continue
        prompts.see_again(raw)
        if not (wanted_bases or suspects) and raw.get("condition") != "batch":
            continue  # nothing of a solo record is needed again (no repeats, no duplicate keys)
        r = clean(raw)
        if not dedupe.first(r.get("key")):
            continue
        rep, cond = r["repeat"], r.get("condition")
        if wanted_bases:
            rk = _repeat_key(r)
            value = (text_id(r), r.get("label"), usable(r), cond)
            if rep == 0 and hash(rk) in wanted_bases:
                first = bases.setdefault(rk, value)
                if cond == "batch" and first[3] != "batch":
                    batch_bases.setdefault(rk, value)
            elif rep != 0:
                stash.append((rep, cond, r.get("backend"), r.get("cell"), rk, value,
                              tuple(r.get(f) for f in PAIR_KEY)))
        if cond != "batch":
            continue
        solo = solos.get(r)
        if solo is None:
            continue
        p = make_pair(expand(solo), r, flip_on)
        tally.pair(p)
        screen.pair(p)
        if not full:
            continue
        if len(models) >= 2:
            study_b.add(p)
        if has_arm:
            study_c.add(p)
        if several_backends:
            s = Slim(p)
            s.backend_config = first_config.setdefault(str(p["backend"]), p.get("backend_config"))
            s.peers = tuple(p["peers"])
            slims.append(s)
        if p["comparable"] and (p["flip"] or p["text_change"]):
            out.changed_pairs.append(PairRow(p))
            d = p["first_divergent_token"]
            batch_views.append(_changed_view(r, {p["key"]: () if d is None else (d,)}, recorded))
            have = need.setdefault(p["solo_key"], ())
            if d is not None and d not in have:
                need[p["solo_key"]] = have + (d,)
    for rep, cond, backend, cell, rk, value, pk in stash:  # repeats against their repeat 0
        if cond == "solo":
            solo = solos.get(dict(zip(PAIR_KEY, pk)))
            solo = None if solo is None else expand(solo)
            base = None if solo is None else (text_id(solo), solo["label"], usable(solo))
        elif cond == "batch":
            base = bases.get(rk)
            base = base if base is not None and base[3] == "batch" else batch_bases.get(rk)
        else:
            base = None
        text = label = in_cell = None
        if base is not None and value[2] and base[2]:
            text = value[0] != base[0]
            if value[1] is not None and base[1] is not None:
                label = value[1] != base[1]
        cell_base = bases.get(rk) if rep > 0 else None
        if cell_base is not None and value[2] and cell_base[2]:
            in_cell = value[0] != cell_base[0]
        tally.repeat(cond, backend, cell, text, label, in_cell)
    out.prompt_warnings = prompts.messages()
    del solos, bases, batch_bases, stash, prompts, dedupe  # the per-item state: freed before the statistics
    out.summary = summary = tally.result()
    if not full:
        return out
    flip_mode = flip_on
    summary["label_pairs_by_scorer"] = tally.scorer_pairs()
    if need:  # pass 3: the solo records of the changed pairs (their batch records were viewed in pass 2)
        out.changed_records = records_for_keys(source, need, lambda r: _changed_view(r, need, recorded),
                                               tally.given) + batch_views
    from .analysis_margins import margins

    summary["margins"] = margins(out.changed_records, out.changed_pairs)
    summary["margins"]["recorded"] = recorded  # over every record, not only the changed pairs'
    if recorded:
        summary["screen"] = screen.result()
    summary["study_d"] = [compare_backends((), a, b, pairs=slims, flip_on=flip_mode)
                          for a, b, _ in comparable_backends((), slims)] if several_backends else []
    if len(summary["counts"]["models"]) >= 2:
        summary["study_b"] = study_b.result(align, flip_mode, seed)
    if has_arm:
        summary["study_c"] = study_c.result(flip_mode)
    return out


def list_source(records: Iterable[Any]) -> Source:
    """A source over records already in memory (a list; a one-shot iterable is read into a list first)."""
    items = records if isinstance(records, (list, tuple)) else list(records)
    return lambda: iter(items)


_KEY = re.compile(rb'"key"\s*:\s*"((?:[^"\\]|\\.)*)"')


class StreamSource:
    """A source that streams a run's records file each time with :func:`evalhost.records.iter_records`' bounds.
    Calling it checks every record's shape (a badly shaped record is one UserError); :meth:`again` and
    :meth:`with_keys` re-read the first ``n`` records, already checked (records are only ever appended, so they
    are the same ones; anything appended meanwhile is left out)."""

    def __init__(self, path: Any) -> None:
        self.path = Path(path)

    def __call__(self) -> Iterator[dict[str, Any]]:
        from .records import iter_records

        return iter_records(self.path, checked=True)

    def again(self, n: int | None) -> Iterator[dict[str, Any]]:
        from .records import iter_records

        return islice(iter_records(self.path), n)

    def with_keys(self, keys: set, n: int | None) -> Iterator[dict[str, Any]]:
        """The first ``n`` records, parsing only the lines that hold one of ``keys`` as a ``"key"`` string
        (checked records always have a string key)."""
        from .records import _lines

        count = 0
        for _, raw, ended in _lines(self.path):
            if not raw.strip():
                continue
            count += 1
            if n is not None and count > n:
                return
            for m in _KEY.findall(raw):
                try:
                    if (json.loads(b'"' + m + b'"') if b"\\" in m else m.decode("utf-8")) in keys:
                        break
                except ValueError:  # UnicodeDecodeError included
                    continue
            else:
                continue
            try:
                rec = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if isinstance(rec, dict):
                yield rec


def stream_source(path: Any) -> StreamSource:
    return StreamSource(path)


class RunRecords:
    """The records of a run as a re-iterable stream, never a list: each iteration reads the records file again
    (bounded, links refused, a badly shaped record is one UserError).  ``len()`` is the number of records.  After
    :func:`summarize_run` it also carries ``fingerprint_rows`` and ``prompt_warnings`` (what the report header
    reads of the records), so nothing else needs another pass.  This is what report plugins receive as
    ``records`` in ``report_sections``."""

    def __init__(self, path: Any) -> None:
        self.path = path
        self.source = stream_source(path)
        self.count: int | None = None
        self.fingerprint_rows: list[dict[str, Any]] = []
        self.prompt_warnings: list[str] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.source())

    def __len__(self) -> int:
        if self.count is None:
            self.count = sum(1 for _ in self)
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0 if self.count is not None else next(iter(self), None) is not None


def summarize_run(records: Any, adjudications: Mapping[str, str] | None = None, seed: int = 0,
                  flip_on: str = "label") -> RunSummary:
    """:func:`summarize_records` of a :class:`RunRecords` (streamed) or of a list of records (held)."""
    if isinstance(records, RunRecords):
        out = summarize_records(records.source, adjudications, seed, flip_on)
        records.count = out.records
        records.fingerprint_rows, records.prompt_warnings = out.fingerprint_rows, out.prompt_warnings
        return out
    return summarize_records(list_source(records), adjudications, seed, flip_on)
