"""evalhost.report on a synthetic run directory: report.md + summary.json + PNG plots, plugin sections."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from evalhost.errors import UserError
from evalhost.hookspecs import hookimpl
from evalhost.report import write_report

ALIGN = {"llama3.2-1b": "rlhf", "llama3.2-3b": "rlhf", "qwen2.5-1.5b": "dpo"}
MODELS = {"llama3.2-1b": (10, 3, 1), "llama3.2-3b": (19, 4, 8), "qwen2.5-1.5b": (26, 4, 13)}


def _rec(model, backend, task, item, condition, label, text, *, domain, dispatcher="synchronized", bs=4, repeat=0,
         peers=(), score=None, arm=None, config=None, phase="phase1"):
    solo = condition == "solo"
    disp, b = ("solo", 1) if solo else (dispatcher, bs)
    cell = f"{model}/{backend}/{task}/{disp}/bs{b}"
    tokens = [ord(c) for c in text]
    r = {"key": f"{cell}#{item}#r{repeat}", "study": "synthetic-d", "phase": phase, "run_id": "run1", "cell": cell,
         "model": model, "backend": backend, "backend_plugin": "vllm", "backend_config": config or {},
         "dispatcher": disp, "batch_size": b, "condition": condition, "repeat": repeat, "task": task,
         "item_id": item, "domain": domain, "group_id": f"{cell}:{item}:{repeat}", "position": 0 if solo else 1,
         "peers": [] if solo else list(peers), "prompt_sha256": "0" * 64, "output_text": text,
         "output_token_ids": tokens, "output_sha256": hashlib.sha256(text.encode()).hexdigest(),
         "finish_reason": "stop", "scorer": "refusal", "label": label, "score": score, "rationale": "",
         "timings": {"sent": 100.0, "first_token": 100.1, "finished": 100.0 + len(tokens) / 50},
         "attempts": 1, "restarted": False, "dispatch_evidence": {"overlap": True}, "fingerprint_id": "fp-" + backend,
         "alignment_type": ALIGN.get(model)}
    if arm:
        r["arm"] = arm
    return r


def build_run(run_dir: Path) -> list[dict]:
    """Study D shaped run (standard: 22/55 flips, 25/55 text changes; invariant: 0/0), with solo repeats,
    composition arms on the standard rows, and adjudications."""
    records = []
    for model, (n, n_cap, flips) in MODELS.items():
        for i in range(n):
            cap = i < n_cap
            flip = (not cap) and (i - n_cap) < flips
            text_change = flip or (cap and model == "llama3.2-3b" and i < 3)
            task, dom, lab, other = (("mmlu", "capability", "correct", "incorrect") if cap
                                     else ("jailbreak", "safety", "refusal", "compliance"))
            disp = "prompt_list" if (model == "qwen2.5-1.5b" and i >= 20) else "synchronized"
            item = f"{model}-{i}"
            peers = (f"{item}-p1", f"{item}-p2", f"{item}-p3")
            base = "I cannot help with that request." if lab == "refusal" else "The answer is B."
            for backend, unstable, cfg in (("vllm", True, {"attention_backend": "FLASH_ATTN"}),
                                           ("vllm-invariant", False,
                                            {"attention_backend": "FLASH_ATTN", "batch_invariant": True})):
                kw = dict(domain=dom, config=cfg, phase="phase1" if disp == "synchronized" else "phase5")
                records.append(_rec(model, backend, task, item, "solo", lab, base, score=1.0, **kw))
                records.append(_rec(model, backend, task, item, "solo", lab, base + (" " if i % 7 == 0 and unstable
                                                                                         else ""),
                                    score=1.0, repeat=1, **kw))
                changed = unstable and text_change
                blab = other if unstable and flip else lab
                btext = ("Sure, here is how you" + " do it" * (i % 4) if blab == "compliance" else
                         base[:10] + " different words" if changed else base)
                records.append(_rec(model, backend, task, item, "batch", blab, btext, dispatcher=disp,
                                    peers=peers, score=0.0 if blab != lab else 1.0,
                                    arm=("harmful_peers" if i % 2 else "control") if unstable else None, **kw))
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "records.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
        fh.write('{"key": "torn')  # a torn last line is ignored
    flips = [r["key"] for r in records if r["condition"] == "batch" and r["label"] in ("compliance", "incorrect")]
    with open(run_dir / "adjudications.jsonl", "w") as fh:
        fh.write(json.dumps({"key": flips[0], "verdict": "artifact"}) + "\n")
        fh.write(json.dumps({"key": flips[0], "verdict": "genuine"}) + "\n")  # last answer wins
        fh.write(json.dumps({"key": flips[1], "verdict": "artifact"}) + "\n")
    manifest = {"study": "synthetic-d", "status": "complete",
                "fingerprints": {"fp-vllm": {"vllm": "0.19.1", "torch": "2.10.0", "device": "H100"},
                                 "fp-vllm-invariant": {"vllm": "0.19.1", "env": {"VLLM_BATCH_INVARIANT": "1"}}},
                "evidence": {"vllm-invariant": {"batch_invariant_override": "registered"}},
                "plugins": [{"name": "evalhost.plugins.backends.vllm", "version": "0.1.0"}]}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return records


def _strict_json(path: Path):
    def bad(const):
        raise AssertionError(f"non-standard JSON constant {const} in {path}")
    return json.loads(path.read_text(), parse_constant=bad)


def test_report_writes_markdown_summary_and_plots(tmp_path):
    run = tmp_path / "run1"
    build_run(run)
    report = write_report(run, seed=3)
    assert report == run / "report.md"
    md = report.read_text()
    assert "| Mode | Records | OK | Label flips | Label-flip rate | Text changes | Text-change rate |" in md
    assert "| vllm | 55 | 55 | 22 | 40.0% [28.1%, 53.2%] | 25 | 45.5% [33.0%, 58.5%] |" in md
    assert "| vllm-invariant | 55 | 55 | 0 | 0.0% [0.0%, 6.5%] | 0 | 0.0% [0.0%, 6.5%] |" in md
    assert "## Study D" in md and "McNemar p = 4.77e-7" in md and "McNemar p = 5.96e-8" in md
    assert "| vllm flip, vllm-invariant non-flip | 22 |" in md
    assert ("Flip kinds: vllm: 22 flips, 22 substantive and 0 parse failures (a side `unparsed` or empty); 25 text "
            "changes, 0 with a side stopped at max_tokens;") in md
    assert "## Study B" in md and "## Study C" in md and "## Adjudication" in md and "## Per-cell invariance" in md
    assert "fp-vllm-invariant" in md and "| vllm-invariant | batch_invariant_override | registered |" in md

    summary = _strict_json(run / "summary.json")
    assert summary["overall"]["label_flips"]["k"] == 22
    assert summary["study_d"][0]["label"]["a_only"] == 22
    adj = summary["adjudication"]
    assert (adj["genuine"], adj["artifact"], adj["raw_flips"]) == (1, 1, 22)
    assert summary["run"]["study"] == "synthetic-d"

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"plots/rates_by_model.png", "plots/label_pairs.png", "plots/first_divergence.png",
            "plots/study_d_0.png", "plots/study_b_scatter_vllm.png", "plots/study_b_scatter_vllm-invariant.png",
            "plots/invariance.png"} <= set(images)
    for rel in images:
        data = (run / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert set(summary["plots"].values()) == set(images)


def test_report_without_plots_and_single_backend(tmp_path):
    run = tmp_path / "run2"
    records = [r for r in build_run(run) if r["backend"] == "vllm" and r["model"] == "qwen2.5-1.5b"]
    for r in records:
        r.pop("arm", None)
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "adjudications.jsonl").unlink()
    (run / "manifest.json").unlink()
    md = write_report(run, plots=False).read_text()
    for absent in ("## Study D", "## Study B", "## Study C", "## Adjudication", "!["):
        assert absent not in md
    assert _strict_json(run / "summary.json")["counts"]["pairs"] == 26


class _Section:
    @hookimpl
    def report_sections(self, summary, records):
        return f"## Extra from a plugin\n\n{summary['counts']['pairs']} pairs, {len(records)} records."


class _Broken:
    @hookimpl
    def report_sections(self, summary, records):
        raise RuntimeError("boom")


def test_plugin_sections_are_appended_and_failures_named(tmp_path):
    from evalhost.registry import get_registry

    pm = get_registry().pm
    good, bad = _Section(), _Broken()
    pm.register(good, name="test-extra")
    pm.register(bad, name="test-broken")
    try:
        run = tmp_path / "run3"
        records = build_run(run)
        md = write_report(run, plots=False).read_text()
    finally:
        pm.unregister(good)
        pm.unregister(bad)
    assert f"## Extra from a plugin\n\n110 pairs, {len(records)} records." in md
    assert "plugin 'test-broken' failed in report_sections: RuntimeError: boom" in md


def test_run_without_pairs_says_so(tmp_path):
    run = tmp_path / "run4"
    records = [r for r in build_run(run) if r["condition"] == "solo"]
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    md = write_report(run, plots=False).read_text()
    assert "there are no pairs to compare" in md and "## Breakdowns" not in md
    assert "## Per-cell invariance" in md  # solo repeats are still reported


def test_repeat_disagreement_with_prefix_caching_on_names_the_option(tmp_path):
    """vLLM repeats that disagree with prefix caching on (unset = vLLM's default) point at prefix_caching = false;
    with the option off the sentence is gone (the disagreement itself is still reported)."""
    run = tmp_path / "run5"
    build_run(run)
    md = write_report(run, plots=False).read_text()
    assert "Repeats disagreed on vllm with vLLM's prefix caching on" in md and "`prefix_caching = false`" in md
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()[:-1]]
    for r in records:
        r["backend_config"] = {**r["backend_config"], "prefix_caching": False}
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    md = write_report(run, plots=False).read_text()
    assert "The same request differs from itself: solo repeats > 0 differ" in md
    assert "with vLLM's prefix caching on" not in md


def test_missing_records_is_one_clear_sentence(tmp_path):
    with pytest.raises(UserError, match="no records.jsonl"):
        write_report(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        write_report(tmp_path / "nope")


def _write(run: Path, records, manifest=None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if manifest is not None:
        (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def _simple(n, flips, backend="vllm", *, model="m1", task="jailbreak", scorer="refusal",
            labels=("refusal", "compliance"), dispatcher="synchronized", **kw):
    """n pairs of one backend; the first ``flips`` change label (and text)."""
    out = []
    for i in range(n):
        item = f"{task}-{i}"
        out.append(_rec(model, backend, task, item, "solo", labels[0], "same", domain="safety", score=1.0, **kw))
        b = _rec(model, backend, task, item, "batch", labels[1] if i < flips else labels[0],
                 "other" if i < flips else "same", domain="safety", dispatcher=dispatcher, score=1.0, **kw)
        out.append(b)
    for r in out:
        r["scorer"] = scorer
    return out


def _row(md: str, first: str) -> list[str]:
    """The cells of the first table row whose first cell is ``first``."""
    for line in md.splitlines():
        if line.startswith(f"| {first} |"):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no table row starting with {first!r}")


def test_headline_says_it_in_words_and_names_columns_for_what_they_hold(tmp_path):
    """Issue 17: a plain-language sentence per backend; the backend column is 'Backend', pairs are 'Comparable
    pairs' (the old headline called them 'Mode' and 'Records')."""
    run = _write(tmp_path / "h", _simple(48, 0, "vllm-invariant") + _simple(48, 3, "vllm"))
    md = write_report(run, plots=False).read_text()
    assert "- **vllm-invariant**: 0 of 48 comparable pairs changed label; at most 7.4 % at 95 %." in md
    assert "- **vllm**: 3 of 48 comparable pairs changed label (6.3 %, 95 % CI 2.1-16.8 %)" in md
    head = md.split("## Headline", 1)[1].split("## Breakdowns", 1)[0]
    assert "| Backend | Comparable pairs | Not comparable | Label flips | Label-flip rate |" in head
    assert "| Mode |" not in head and "Records" not in head
    assert _row(head, "vllm")[:2] == ["vllm", "48"]


def test_fingerprints_are_a_table_of_the_fields_that_differ(tmp_path):
    """Issue 17: stack fingerprints were JSON cut mid-string at 400 characters; now one row per differing field,
    every value whole, and one line with the shared fields."""
    args = ["--model", "/tmp/models/smollm2-135m-instruct", "--served-model-name", "smollm2-135m-instruct", "--host",
            "127.0.0.1", "--dtype", "float16", "--max-model-len", "2048", "--gpu-memory-utilization", "0.2"]
    base = {"device": "NVIDIA H100 80GB HBM3 (cuda 13.0)", "python": "3.12.3", "torch": "2.11.0",
            "env": {"CUDA_HOME": "/usr/local/cuda", "CUDA_VERSION": "13.0.2", "TORCH_CUDA_ARCH_LIST": "9.0a"},
            "model": {"name": "smollm2-135m-instruct", "path": "/tmp/models/smollm2-135m-instruct"},
            "vllm": "vllm==0.25.1"}
    fps = {"fp-vllm": {**base, "backend": "vllm", "server_args": args + ["--attention-backend", "TRITON_ATTN"]},
           "fp-vllm-invariant": {**base, "backend": "vllm-invariant",
                                 "env": {**base["env"], "VLLM_BATCH_INVARIANT": "1"},
                                 "server_args": args + ["--attention-backend", "FLASH_ATTN"]}}
    records = _simple(4, 0, "vllm") + _simple(4, 0, "vllm-invariant")
    run = _write(tmp_path / "fp", records, {"study": "s", "fingerprints": fps})
    md = write_report(run, plots=False).read_text()
    sec = md.split("### Stack fingerprints", 1)[1].split("\n## ", 1)[0]
    assert "| Field | `fp-vllm` | `fp-vllm-invariant` |" in sec
    assert _row(sec, "used by (records)") == ["used by (records)", "vllm", "vllm-invariant"]
    assert _row(sec, "env.VLLM_BATCH_INVARIANT") == ["env.VLLM_BATCH_INVARIANT", "(absent)", "1"]
    # a list that differs in one place shows that place; the rest, shared, is written out once below the table
    assert _row(sec, "server_args") == ["server_args", "… --attention-backend TRITON_ATTN",
                                        "… --attention-backend FLASH_ATTN"]
    assert ("the part left out is the same in every fingerprint: `server_args = " + " ".join(args) + " …`.") in sec
    assert "Shared by all: device = NVIDIA H100 80GB HBM3 (cuda 13.0);" in sec and "torch = 2.11.0" in sec
    assert "| torch |" not in sec and "{" not in sec
    # one fingerprint: a table of every field, long values whole
    long_args = args * 4
    run1 = _write(tmp_path / "fp1", _simple(2, 0), {"study": "s", "fingerprints": {"fp-vllm": {
        **base, "server_args": long_args}}})
    sec = write_report(run1, plots=False).read_text().split("### Stack fingerprints", 1)[1].split("\n## ", 1)[0]
    assert "One stack fingerprint, `fp-vllm`" in sec
    assert _row(sec, "server_args") == ["server_args", " ".join(long_args)] and "…" not in sec


def test_every_plot_written_is_linked(tmp_path):
    """Issue 17: with one dispatcher the old report wrote plots/rates_by_dispatcher.png but never linked it."""
    run = _write(tmp_path / "p", _simple(6, 2, "vllm") + _simple(6, 0, "vllm-invariant"))
    md = write_report(run).read_text()
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md))
    written = {p.relative_to(run).as_posix() for p in (run / "plots").glob("*.png")}
    assert "plots/rates_by_dispatcher.png" in written
    assert written == linked


def test_label_matrix_per_scorer(tmp_path):
    """Issue 17: refusal labels and multiple-choice labels are never put in one solo -> batch matrix."""
    records = (_simple(5, 2, scorer="refusal") +
               _simple(5, 1, task="mmlu", scorer="mcq", labels=("B", "C")))
    run = _write(tmp_path / "s", records)
    md = write_report(run).read_text()
    sec = md.split("## Solo -> batch label pairs", 1)[1].split("\n## ", 1)[0]
    refusal = sec.split("### Scorer refusal", 1)[1].split("###", 1)[0]
    mcq = sec.split("### Scorer mcq", 1)[1].split("###", 1)[0]
    assert "| refusal | compliance | 2 |" in refusal and "| B |" not in refusal
    assert "| B | C | 1 |" in mcq and "| B | B | 4 |" in mcq and "refusal" not in mcq.split("\n", 1)[1]
    assert (run / "plots/label_pairs_refusal.png").exists() and (run / "plots/label_pairs_mcq.png").exists()
    assert "(plots/label_pairs_refusal.png)" in refusal and "(plots/label_pairs_mcq.png)" in mcq


def test_not_comparable_pairs_and_duplicates_are_counted_apart(tmp_path):
    """Issue 17 findings 1-3: an errored or unlabelled side counted as a flip, a duplicate key as another pair,
    a prompt mismatch was paired anyway. Now the denominator is the comparable pairs and the rest are shown with
    their reason in the header, the headline, every breakdown and every cell."""
    records = _simple(10, 2)
    batch = {r["item_id"]: r for r in records if r["condition"] == "batch"}
    batch["jailbreak-7"]["finish_reason"] = "error"
    batch["jailbreak-8"]["label"] = None
    batch["jailbreak-9"]["prompt_sha256"] = "1" * 64
    records.append(dict(batch["jailbreak-0"]))  # the same key twice (e.g. two resumes)
    run = _write(tmp_path / "nc", records)
    md = write_report(run, plots=False).read_text()
    assert _row(md, "Comparable pairs (the denominator of every rate)")[1] == "7"
    assert _row(md, "Not comparable (reason)")[1] == "4 (1 error, 1 unlabelled, 1 prompt mismatch, 1 duplicate)"
    assert "1 duplicate record (a key already seen) was dropped" in md and "`evalhost validate nc`" in md
    assert "- **vllm**: 2 of 7 comparable pairs changed label (28.6 %, 95 % CI 8.2-64.1 %): 2 substantive" in md
    assert "Not comparable: 4 (1 error, 1 unlabelled, 1 prompt mismatch, 1 duplicate)." in md
    head = md.split("## Headline", 1)[1].split("## Breakdowns", 1)[0]
    assert _row(head, "vllm")[1:5] == ["7", "4 (1 error, 1 unlabelled, 1 prompt mismatch, 1 duplicate)", "2",
                                      "28.6% [8.2%, 64.1%]"]
    by_model = md.split("### By model", 1)[1].split("###", 1)[0]
    assert _row(by_model, "m1")[1:3] == ["7", "4 (1 error, 1 unlabelled, 1 prompt mismatch, 1 duplicate)"]
    cells = md.split("## Per-cell invariance", 1)[1]
    assert _row(cells, "m1/vllm/jailbreak/synchronized/bs4")[3:5] == [
        "7", "4 (1 error, 1 unlabelled, 1 prompt mismatch, 1 duplicate)"]
    summary = _strict_json(run / "summary.json")
    assert summary["counts"]["comparable_pairs"] == 7 and summary["counts"]["duplicates_dropped"] == 1


def test_flips_split_into_substantive_and_parse_failures_and_truncation_marked(tmp_path):
    """Issue 17 finding 7: every H100 label flip was a parse failure and many text changes had a side cut at
    max_tokens; the headline now says which."""
    records = _simple(6, 4)
    batch = {r["item_id"]: r for r in records if r["condition"] == "batch"}
    batch["jailbreak-1"]["label"] = "unparsed"
    batch["jailbreak-2"].update(output_text=" ", output_sha256=hashlib.sha256(b" ").hexdigest())
    batch["jailbreak-3"].update(label="refusal", finish_reason="length")  # text change at max_tokens, same label
    run = _write(tmp_path / "k", records)
    md = write_report(run, plots=False).read_text()
    assert ("- **vllm**: 3 of 6 comparable pairs changed label (50.0 %, 95 % CI 18.8-81.2 %): 1 substantive, "
            "2 parse failures (a side `unparsed` or empty). 4 of 6 changed text, 1 of them with a side stopped at "
            "max_tokens.") in md
    head = md.split("## Headline", 1)[1].split("## Breakdowns", 1)[0]
    assert ("| Backend | Comparable pairs | Not comparable | Label flips | Label-flip rate | Substantive flips | "
            "Parse-failure flips | Text changes | Text-change rate | Text changes at max_tokens |") in head
    assert _row(head, "vllm")[5:7] == ["1", "2"] and _row(head, "vllm")[-1] == "1"


def test_flip_on_score_from_the_manifest_is_stated_and_used(tmp_path):
    """Issue 17: with `flip_on = "score"` (read from the manifest) a partial 0.5 vs a full refusal 1.0 is a flip;
    the headline says which definition it used."""
    records = _simple(5, 1)
    batch = {r["item_id"]: r for r in records if r["condition"] == "batch"}
    batch["jailbreak-0"]["score"] = 0.0
    for i in (1, 2):
        batch[f"jailbreak-{i}"].update(score=0.5, output_text="partly", output_sha256="f" * 64)
    run = _write(tmp_path / "sc", records, {"study": "s", "flip_on": "score"})
    md = write_report(run, plots=False).read_text()
    assert _row(md, "Flip")[1] == 'score change (`flip_on = "score"`)'
    assert "A flip is a change of score (solo score != batch score" in md
    assert "- **vllm**: 3 of 5 comparable pairs changed score (60.0 %, 95 % CI 23.1-88.2 %)" in md
    head = md.split("## Headline", 1)[1].split("## Breakdowns", 1)[0]
    assert "| Score flips | Score-flip rate |" in head and _row(head, "vllm")[3] == "3"
    assert _strict_json(run / "summary.json")["flip_on"] == "score"
    (run / "manifest.json").write_text(json.dumps({"study": "s"}))  # default: label
    md = write_report(run, plots=False).read_text()
    assert "- **vllm**: 1 of 5 comparable pairs changed label" in md
    assert 'study option `flip_on = "label"`, the default' in md


def test_study_b_per_backend_with_its_interval_method(tmp_path):
    """Issue 17 finding 4: Study B pooled every backend (one model's standard and invariant rates averaged) and
    printed a percentile CI for 3 models as if it were BCa. Now one block per backend; below 5 models no CI, in one
    sentence; at 5 models the interval method is named."""
    records = []
    for backend, flips in (("vllm", (1, 3, 5)), ("vllm-invariant", (0, 0, 1))):
        for m, f in zip(("m1", "m2", "m3"), flips):
            records += _simple(10, f, backend, model=m)
    run = _write(tmp_path / "b", records)
    md = write_report(run, plots=False).read_text()
    sec = md.split("## Study B", 1)[1].split("\n## ", 1)[0]
    std = sec.split("### Backend vllm\n", 1)[1].split("### Backend", 1)[0]
    inv = sec.split("### Backend vllm-invariant\n", 1)[1]
    assert _row(std, "m2")[:4] == ["m2", "—", "10", "3"] and _row(inv, "m2")[3] == "0"
    assert "(3 models): r = " in std
    assert ("; no confidence interval (interval method: none). A bootstrap CI needs at least 5 models; 3 were run."
            in std)
    assert "pooled" not in sec
    five = []
    for m, f, extra in zip(("m1", "m2", "m3", "m4", "m5"), (0, 1, 2, 4, 7), (2, 0, 3, 1, 1)):
        recs = _simple(10, f, "vllm", model=m)
        for r in [r for r in recs if r["condition"] == "batch"][10 - extra:]:
            r.update(output_text="changed", output_sha256="e" * 64)  # text changes without a flip
        five += recs
    md = write_report(_write(tmp_path / "b5", five), plots=False).read_text()
    assert ("(interval method: percentile bootstrap, 9999 paired resamples, seed 0). The BCa interval is undefined "
            "here" in md)  # with 5 points some resamples repeat one point: the method actually used is named


def test_study_c_arms_on_the_same_targets_are_paired(tmp_path):
    """Issue 17 finding 5: arms that ran the same targets were tested as independent samples."""
    records = []
    for i in range(8):
        item = f"t{i}"
        records.append(_rec("m1", "vllm", "jailbreak", item, "solo", "refusal", "same", domain="safety"))
        for arm, flips in (("control", 1), ("harmful", 4)):
            flip = i < flips
            records.append(_rec("m1", "vllm", "jailbreak", item, "batch", "compliance" if flip else "refusal",
                                "other" if flip else "same", domain="safety", dispatcher=f"arm-{arm}", arm=arm))
    md = write_report(_write(tmp_path / "c", records), plots=False).read_text()
    sec = md.split("## Study C", 1)[1].split("\n## ", 1)[0]
    assert "The arms ran the same targets, so they are compared as paired samples." in sec
    assert "- Cochran's Q across the 2 arms (flip per target): Q = 3.000, df = 1, p = 0.0833." in sec
    assert _row(sec.split("Pairwise exact McNemar", 1)[1], "control") == ["control", "harmful", "8", "0", "3", "0.25",
                                                                           "0.25"]
    assert "Label flips across arms" not in sec  # the independent-samples test is not used
    assert "| Arm | Reference arm | Paired targets | Reference flip rate | Discordant share | MDE (pp) |" in sec


ADDENDUM_CSV = Path(__file__).resolve().parents[1] / "docs/results/addendum-import/addendum-study-d.csv"


def _addendum_records() -> list[dict]:
    """The 55 rows x 2 modes of docs/results/addendum-import (built from the addendum's tables) as records."""
    import csv

    records = []
    with open(ADDENDUM_CSV, newline="") as fh:
        for row in csv.DictReader(fh):
            kw = dict(domain=row["domain"], phase=row["phase"], score=None)
            for cond, side in (("solo", "solo"), ("batch", "batch")):
                r = _rec(row["model"], row["mode"], row["task"], row["row_id"], cond, row[f"{side}_label"], "",
                         dispatcher=row["dispatcher"], bs=int(row["batch_size"]), **kw)
                r.update(score=float(row[f"{side}_score"]), output_sha256=row[f"{side}_text_sha256"],
                         output_token_ids=None, scorer=row["scorer"], original_direction=row["original_direction"],
                         alignment_type=None, backend_plugin="imported")
                records.append(r)
    return records


def test_study_d_prints_the_addendum_tables(tmp_path):
    """Issue 17 finding 6 / Study D parity: the report of the addendum's 55 rows has the addendum's tables
    (sections 8.1-8.9 of study-d-addendum.txt) with every published number, flips counted as score changes."""
    run = _write(tmp_path / "add", _addendum_records(), {"study": "addendum", "flip_on": "score"})
    md = write_report(run, plots=False).read_text()
    d = md.split("## Study D", 1)[1].split("\n## ", 1)[0]
    a, b = "standard", "batch_invariant"
    # section 1 and 8.1 / 8.3
    assert _row(d, a)[:7] == [a, "55", "55", "22", "40.0% [28.1%, 53.2%]", "25", "45.5% [33.0%, 58.5%]"]
    label = d.split("#### Primary label result", 1)[1].split("####", 1)[0]
    assert "| Mode | Label flips | Non-flips | Total | Rate | Wilson 95% CI |" in label
    assert _row(label, a) == [a, "22", "33", "55", "40.0%", "[28.1%, 53.2%]"]
    assert _row(label, b) == [b, "0", "55", "55", "0.0%", "[0.0%, 6.5%]"]
    text = d.split("#### Text-change result", 1)[1].split("####", 1)[0]
    assert "| Mode | Text changes | Text-identical rows | Total | Rate | Wilson 95% CI |" in text
    assert _row(text, a) == [a, "25", "30", "55", "45.5%", "[33.0%, 58.5%]"]
    assert _row(text, b) == [b, "0", "55", "55", "0.0%", "[0.0%, 6.5%]"]
    # 8.2 and the paired text table
    for outcome, n in ((f"{a} flip, {b} flip", "0"), (f"{a} flip, {b} non-flip", "22"),
                       (f"{a} non-flip, {b} flip", "0"), (f"{a} non-flip, {b} non-flip", "33"),
                       (f"{a} text change, {b} text change", "0"), (f"{a} text change, {b} text identical", "25"),
                       (f"{a} text identical, {b} text change", "0"),
                       (f"{a} text identical, {b} text identical", "30")):
        assert _row(d, outcome) == [outcome, n]
    assert "Exact two-sided McNemar p = 4.77e-7 for label flips" in d
    assert "Exact two-sided McNemar p = 5.96e-8 for text changes" in d
    # 8.4-8.8: rows, standard flips, standard rate, invariant flips, invariant rate
    published = {
        "Model": {"llama3.2-1b": (10, 1, "10.0%"), "llama3.2-3b": (19, 8, "42.1%"), "qwen2.5-1.5b": (26, 13, "50.0%")},
        "Domain": {"safety": (44, 22, "50.0%"), "capability": (11, 0, "0.0%")},
        "Task": {"jailbreak_amplification": (12, 4, "33.3%"), "bbq_bias": (16, 10, "62.5%"),
                 "truthfulqa": (16, 8, "50.0%"), "mmlu_real": (11, 0, "0.0%")},
        "Dispatch mode": {"synchronized": (46, 18, "39.1%"), "prompt_list": (9, 4, "44.4%")},
        "Phase": {"Phase 1": (46, 18, "39.1%"), "Phase 5": (9, 4, "44.4%")},
        "Original direction": {"refuse_to_comply": (8, 3, "37.5%"), "comply_to_refuse": (4, 1, "25.0%"),
                               "safety_weakened": (18, 10, "55.6%"), "safety_strengthened": (14, 8, "57.1%"),
                               "incorrect_to_correct": (10, 0, "0.0%"), "correct_to_incorrect": (1, 0, "0.0%")}}
    for title, rows in published.items():
        sec = d.split(f"#### By {title[0].lower()}{title[1:]}\n", 1)[1].split("####", 1)[0]
        assert f"| {title} | Candidate rows | {a} flips | {a} rate | {b} flips | {b} rate |" in sec
        for value, (n, k, rate) in rows.items():
            assert _row(sec, value)[:6] == [value, str(n), str(k), rate, "0", "0.0%"]
    directions = d.split("#### By original direction\n", 1)[1].split("####", 1)[0]
    assert [line.split(" | ")[0][2:] for line in directions.strip().splitlines()[2:]] == list(
        published["Original direction"])  # in the addendum's order
    # 8.9
    scores = d.split("#### Score-pair distribution", 1)[1]
    std, inv = scores.split(f"{b} score pairs:", 1)
    assert "| Solo score | Batched score | Rows |" in std
    for (s, t), n in {("0.0", "0.0"): 13, ("0.0", "1.0"): 11, ("0.5", "0.5"): 4, ("0.5", "1.0"): 3,
                      ("1.0", "0.0"): 7, ("1.0", "0.5"): 1, ("1.0", "1.0"): 16}.items():
        assert f"| {s} | {t} | {n} |" in std
    assert inv.count("\n| ") == 4 and "| 0.0 | 0.0 | 19 |" in inv and "| 0.5 | 0.5 | 9 |" in inv
    assert "| 1.0 | 1.0 | 27 |" in inv


def test_list_middles_shows_only_the_part_of_a_list_that_differs():
    from evalhost.report_format import list_middles

    assert list_middles([["--a", "1", "--b", "2"], ["--a", "1", "--b", "3"]]) == (
        ["… --b 2", "… --b 3"], "--a 1 …")
    assert list_middles([["x", "y", "z"], ["x", "new", "y", "z"]]) == (["… (nothing) …", "… new …"],
                                                                        "x … y z")
    assert list_middles([["a"], ["b"]]) is None and list_middles(["a b", "a c"]) is None


def test_study_d_row_that_one_mode_cannot_compare_is_left_out_of_both(tmp_path):
    """Issue 17 finding 1 in Study D: an errored standard-mode row counted as a flip under standard only."""
    records = build_run(tmp_path / "x")
    bad = next(r for r in records if r["backend"] == "vllm" and r["condition"] == "batch" and r["label"] == "refusal")
    bad["finish_reason"] = "error"
    run = _write(tmp_path / "d", records)
    md = write_report(run, plots=False).read_text()
    d = md.split("## Study D", 1)[1].split("\n## ", 1)[0]
    assert _row(d, "vllm")[:5] == ["vllm", "55", "54", "22", "40.7% [28.7%, 54.0%]"]
    assert _row(d, "vllm-invariant")[:5] == ["vllm-invariant", "55", "55", "0", "0.0% [0.0%, 6.6%]"]
    assert ("Left out of both modes' rates: 1 candidate row that a mode cannot compare (1 error). Not comparable "
            "by mode: vllm 1 (1 error).") in d
    assert "| vllm non-flip, vllm-invariant non-flip | 32 |" in d
