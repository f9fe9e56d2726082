"""The streamed summary of ``evalhost report`` (issue 18: bounded memory) equals the summary of the records held in
memory, on synthetic runs that hit every case: duplicate keys, errors and scorer errors, unlabelled records,
prompt mismatches, solo and batch repeats, several backends (Study D), composition arms (Study C), several models
with alignment types (Study B), Study D candidate rows, ``flip_on = "score"``, empty and truncated outputs, parse
failures, token-id divergences (incl. a prefix and a same-text re-tokenisation), top-k logprobs, adjudications.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from evalhost import analysis as an
from evalhost.report import build_summary, write_report
from evalhost.report_format import json_safe

LABELS = ("refusal", "compliance", "unparsed")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _rec(rng: random.Random, *, model: str, backend: str, task: str, item: str, condition: str, dispatcher: str,
         bs: int, repeat: int, text: str, label, score, arm=None, **extra) -> dict:
    cell = f"{model}/{backend}/{task}/{dispatcher}/bs{bs}" + (f"/{arm}" if arm else "")
    toks = [ord(c) for c in text]
    r = {"schema": 1, "key": f"{cell}#{item}#r{repeat}", "study": "syn", "phase": extra.pop("phase", "discovery"),
         "run_id": "syn", "cell": cell, "model": model, "alignment_type": {"m1": "rlhf", "m2": "sft"}.get(model),
         "backend": backend, "backend_plugin": "vllm",
         "backend_config": {"invariant": backend.endswith("inv")}, "dispatcher": dispatcher,
         "batch_size": bs, "condition": condition, "repeat": repeat, "task": task, "task_source": task,
         "item_id": item, "domain": "safety" if task == "harm" else "capability",
         "group_id": f"{cell}#g{item}#{repeat}", "position": 0 if condition == "solo" else 1,
         "peers": [] if condition == "solo" else ["x1", "x2"], "prompt_sha256": _sha(item + task),
         "output_text": text, "output_token_ids": toks, "output_sha256": _sha(text), "finish_reason": "stop",
         "scorer": "refusal" if task == "harm" else "mc", "label": label, "score": score, "rationale": "",
         "timings": {"sent": 1.0, "finished": 1.0 + rng.choice((0.5, 1.0, 2.0)), "latency_s": None},
         "attempts": rng.choice((1, 1, 2)), "restarted": rng.random() < 0.05, "fingerprint_id": f"fp-{backend}",
         "arm": arm, "candidate_kind": None, "original_direction": None, "scorer_error": None}
    r.update(extra)
    return r


def synthetic_run(seed: int = 0, n_items: int = 14) -> tuple[list[dict], dict]:
    """Records of a run with every case the analysis distinguishes (see the module docstring), in a shuffled
    order (batch records before their solo, repeats before their repeat 0), and adjudications."""
    rng = random.Random(seed)
    out: list[dict] = []
    for model in ("m1", "m2"):
        for backend in ("vllm", "vllm-inv"):
            for task in ("harm", "mmlu"):
                for i in range(n_items):
                    item = f"{task}-{i}"
                    base = f"answer {item} {rng.choice('ab')}"
                    for rep in (0, 1):
                        text = base if rep == 0 or rng.random() < 0.7 else base + "!"
                        extra = {}
                        if rng.random() < 0.5:  # top-k logprobs: the margins at the divergence
                            extra["top_logprobs"] = [[[ord(c), -0.1], [ord(c) + 1, -0.1 - rng.choice((0.0625, 0.5))]]
                                                     for c in text]
                        out.append(_rec(rng, model=model, backend=backend, task=task, item=item, condition="solo",
                                        dispatcher="solo", bs=1, repeat=rep, text=text,
                                        label=rng.choice(LABELS[:2]), score=rng.choice((0.0, 0.5, 1.0)), **extra))
                    for disp, bs, arm in (("prompt_list", 4, None), ("continuous", 8, "control"),
                                          ("continuous", 8, "mixed")):
                        for rep in (0, 1):
                            roll = rng.random()
                            text = (base if roll < 0.5 else base[:-1] + "z" if roll < 0.7 else base[:6]
                                    if roll < 0.8 else "  " if roll < 0.85 else base + " more")
                            extra = {}
                            if rng.random() < 0.06:
                                extra["finish_reason"] = "error"
                            elif rng.random() < 0.05:
                                extra["scorer_error"] = "ValueError: boom"
                            elif rng.random() < 0.08:
                                extra["finish_reason"] = "length"
                            if rng.random() < 0.05:
                                extra["prompt_sha256"] = _sha("other")
                            if rng.random() < 0.2:
                                extra.update(candidate_kind="label_flip", phase="confirm",
                                             original_direction=rng.choice(("refuse_to_comply", "comply_to_refuse")))
                            if rng.random() < 0.3:
                                extra["top_logprobs"] = [[[ord(c), -0.2], [ord(c) + 2, -0.3]] for c in text]
                            label = None if rng.random() < 0.05 else rng.choice(LABELS)
                            r = _rec(rng, model=model, backend=backend, task=task, item=item, condition="batch",
                                     dispatcher=disp, bs=bs, repeat=rep, text=text, label=label,
                                     score=rng.choice((0.0, 0.5, 1.0)), arm=arm, **extra)
                            if rng.random() < 0.05:  # same text, other token ids (a re-tokenisation)
                                r["output_token_ids"] = r["output_token_ids"][:-1] + [7]
                            out.append(r)
                            if rng.random() < 0.04:  # a duplicate key (two resumes), different content
                                out.append({**r, "label": "compliance", "output_text": "dup"})
    rng.shuffle(out)
    keys = [r["key"] for r in out if r["condition"] == "batch"]
    adjudications = {k: rng.choice(("genuine", "artifact", "skip")) for k in rng.sample(keys, 25)}
    adjudications["not-a-flip-key"] = "genuine"
    return out, adjudications


def _canon(summary: dict) -> str:
    return json.dumps(json_safe(summary), sort_keys=True, allow_nan=False)


def write_run(run: Path, records: list[dict], adjudications: dict, flip_on: str) -> None:
    run.mkdir()
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fps = {f"fp-{b}": {"vllm": "0.1", "backend": b} for b in ("vllm", "vllm-inv")}
    (run / "manifest.json").write_text(json.dumps({"study": "syn", "flip_on": flip_on, "fingerprints": fps}))
    (run / "adjudications.jsonl").write_text("".join(json.dumps({"key": k, "verdict": v}) + "\n"
                                                     for k, v in adjudications.items()))


def _strip(summary: dict) -> dict:
    """What summary.json and the in-memory summary share: not the run header, plots and notes, nor the per-change
    margin rows (those go to report.html only)."""
    out = {k: v for k, v in summary.items() if k not in ("run", "plots", "notes")}
    if isinstance(out.get("margins"), dict):
        out["margins"] = {k: v for k, v in out["margins"].items() if k not in ("rows", "rows_in")}
    return out


@pytest.mark.parametrize("flip_on", ["label", "score"])
def test_streamed_report_summary_equals_the_summary_of_the_records_in_memory(tmp_path, flip_on):
    records, adjudications = synthetic_run(seed=5)
    run = tmp_path / "run"
    write_run(run, records, adjudications, flip_on)
    write_report(run, plots=False)
    streamed = _strip(json.loads((run / "summary.json").read_text()))
    held = build_summary(records, adjudications, flip_on=flip_on)
    assert _canon(streamed) == _canon(_strip(held))
    # the synthetic run reaches every case it is meant to
    c = held["counts"]
    assert c["duplicates_dropped"] > 0 and c["max_repeat"] == 1 and c["scorer_errors"] > 0
    assert all(c["not_comparable"][k] > 0 for k in ("error", "unlabelled", "prompt_mismatch", "duplicate"))
    assert held["study_d"] and held["study_d"][0]["rows"] > 0 and "study_b" in held
    assert held["study_c"]["paired"] and held["adjudication"]["genuine"] > 0
    assert held["repeat_disagreement"]["solo"]["text"]["n"] and held["repeat_disagreement"]["batch"]["label"]["n"]
    assert held["margins"]["overall"]["tie"] and held["margins"]["overall"]["non_tie"]
    assert held["first_divergence"]["n"] and any(r["value"] for r in held["breakdowns"]["original_direction"])
    assert held["flip_on"] == flip_on


def test_changed_pairs_views_give_the_margins_and_explorer_rows_of_the_full_records():
    """The report keeps of a changed pair's records only what the margins and report.html read; both give the
    same rows as the full records and every pair."""
    from evalhost.analysis_margins import margins
    from evalhost.report_html import explorer_rows

    records, _ = synthetic_run(seed=8)
    run = an.summarize_run(records)
    pairs = an.pair(records)
    full = margins(records, pairs)
    assert _canon(run.summary["margins"]) == _canon(full)
    assert _canon(explorer_rows(run.changed_records, run.changed_pairs, full)) == \
        _canon(explorer_rows(records, pairs, full))
    assert len(run.changed_pairs) == sum(1 for p in pairs if p["comparable"] and (p["flip"] or p["text_change"]))


def test_report_holds_a_projection_not_the_records(tmp_path):
    """Peak memory allocated while writing the report stays a fraction of what the parsed records take (issue 18:
    the report held every record, and several copies of them)."""
    import tracemalloc

    from evalhost.records import read_records

    rng = random.Random(1)
    rows = []
    for i in range(1500):
        base = f"output of item {i} " * 8
        for disp, bs in (("solo", 1), ("prompt_list", 4), ("prompt_list", 8), ("prompt_list", 16)):
            text = base if disp == "solo" or rng.random() > 0.03 else base + "changed"
            rows.append(_rec(rng, model="m1", backend="vllm", task="harm", item=f"i{i}",
                             condition="solo" if disp == "solo" else "batch", dispatcher=disp, bs=bs, repeat=0,
                             text=text, label="refusal" if "changed" not in text else "compliance", score=1.0))
    run = tmp_path / "big"
    write_run(run, rows, {}, "label")
    (run / "manifest.json").unlink()  # reading it allocates its 64 MiB size limit at once (RunDir.read_bytes)
    tracemalloc.start()
    try:
        held = read_records(run / "records.jsonl")
        size = tracemalloc.get_traced_memory()[0]
        del held
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        write_report(run, plots=False)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert json.loads((run / "summary.json").read_text())["counts"]["pairs"] == 4500
    assert peak < 0.25 * size, (peak, size)


def test_records_for_keys_finds_the_first_record_of_each_key_in_file_order(tmp_path):
    from evalhost.analysis_run import StreamSource, list_source, records_for_keys

    tricky = 'a "quoted" \\ key é'
    rows = [{"key": "k1", "v": 1}, {"backend_config": {"key": "k2"}, "key": "other", "v": 2},
            {"key": tricky, "v": 3}, {"key": "k1", "v": 4}, {"key": "k2", "v": 5}, {"key": "k3", "v": 6}]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=i % 2 == 0) + "\n" for i, r in enumerate(rows)))
    want = {"k1", "k2", tricky}
    for source in (StreamSource(path), list_source(rows)):
        assert [r["v"] for r in records_for_keys(source, want)] == [1, 3, 5]
        assert [r["v"] for r in records_for_keys(source, want, limit=4)] == [1, 3]
        assert records_for_keys(source, {"k3"}, view=lambda r: r["v"]) == [6]


def test_records_appended_after_the_first_pass_are_left_out():
    """A run that is still writing: later passes read only the records the first pass counted."""
    records, _ = synthetic_run(seed=2, n_items=4)
    extra, _ = synthetic_run(seed=3, n_items=4)
    calls = []

    def growing():
        calls.append(1)
        return iter(records if len(calls) == 1 else records + extra)

    assert _canon(an.summarize_records(growing).summary) == _canon(build_summary(records))
    assert len(calls) == 4  # pass 1 twice (the run has duplicate keys), pass 2, pass 3


def test_keys_that_hash_alike_are_both_kept_and_true_duplicates_dropped():
    """Duplicate keys are found by a 64-bit hash first; keys that only hash alike (-1 and -2 in CPython) are
    compared exactly and both kept."""
    from test_analysis import rec

    assert hash(-1) == hash(-2)
    records = [dict(rec(condition="solo", item="a"), key=-1), dict(rec(condition="batch", item="a"), key=-2),
               dict(rec(condition="batch", item="a", label="compliance"), key=-2)]
    c = an.summarize(records)["counts"]
    assert (c["unique_records"], c["duplicates_dropped"], c["pairs"]) == (2, 1, 1)
    assert an.summarize(records)["overall"]["label_flips"]["k"] == 0


def test_every_public_name_of_analysis_is_importable():
    names = ("BREAKDOWN_FIELDS", "PAIR_KEY", "STUDY_D_FIELDS", "REFERENCE_ARM_NAMES", "adjudication_summary",
             "breakdown", "cells_table", "check_flip_on", "comparable_backends", "compare_backends", "composition",
             "count_field", "direction", "export_candidates", "first_divergence", "headline", "invariance_grid",
             "looks_invariant", "not_comparable", "pair", "prepare", "rates", "repeat_disagreement", "study_b",
             "summarize", "records_for_keys", "summarize_run", "RunRecords")
    assert [n for n in names if not hasattr(an, n)] == []


def test_list_functions_agree_with_the_summary():
    records, adjudications = synthetic_run(seed=4, n_items=6)
    s = an.summarize(records, adjudications)
    pairs = an.pair(records)
    kept, dups, _ = an.prepare(records)
    assert _canon(an.breakdown(pairs, "model", dups)) == _canon(s["breakdowns"]["model"])
    assert _canon(an.headline(pairs, s["counts"]["backends"], dups)) == _canon(s["headline"])
    assert _canon(an.cells_table(records, pairs, dups)) == _canon(s["cells"])
    assert _canon(an.invariance_grid(pairs)) == _canon(s["invariance_grid"])
    assert _canon(an.adjudication_summary(pairs, adjudications)) == _canon(s["adjudication"])
    assert _canon(an.repeat_disagreement(records)) == _canon(s["repeat_disagreement"])
    assert _canon(an.rates(pairs, len(dups))) == _canon(s["overall"])
