"""evalhost.analysis on hand-made records: pairing, flips, directions, summaries, Study B/C/D statistics."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from evalhost import analysis as an
from evalhost import stats as st
from evalhost.errors import UserError


def rec(*, model="m1", backend="vllm", task="jailbreak", item="i1", condition="batch", label="refusal", text="x",
        tokens=None, dispatcher="synchronized", bs=4, repeat=0, peers=("p1", "p2", "p3"), domain="safety",
        score=None, phase="discovery", group_id=None, position=1, backend_config=None, **extra):
    solo = condition == "solo"
    disp, b = ("solo", 1) if solo else (dispatcher, bs)
    cell = f"{model}/{backend}/{task}/{disp}/bs{b}"
    r = {
        "key": f"{cell}#{item}#r{repeat}", "study": "s", "phase": phase, "run_id": "run", "cell": cell,
        "model": model, "backend": backend, "backend_plugin": "vllm", "backend_config": backend_config or {},
        "dispatcher": disp, "batch_size": b, "condition": condition, "repeat": repeat, "task": task,
        "item_id": item, "domain": domain, "group_id": group_id or f"g:{cell}:{item}:{repeat}",
        "position": 0 if solo else position, "peers": [] if solo else list(peers), "prompt_sha256": "p",
        "output_text": text, "output_token_ids": list(tokens) if tokens is not None else [ord(c) for c in text],
        "output_sha256": hashlib.sha256(text.encode()).hexdigest(), "finish_reason": "stop", "scorer": "refusal",
        "label": label, "score": score, "rationale": "", "timings": {"sent": 0.0, "finished": 2.0, "latency_s": 2.0},
        "attempts": 1, "restarted": False, "dispatch_evidence": {}, "fingerprint_id": "fp1",
    }
    r.update(extra)
    return r


def duo(solo_label, batch_label, solo_text="same", batch_text="same", **kw):
    return [rec(condition="solo", label=solo_label, text=solo_text, **kw),
            rec(condition="batch", label=batch_label, text=batch_text, **kw)]


# -- pairing and per-pair fields ---------------------------------------------------------------------------------
def test_pairing_uses_solo_repeat_zero_of_same_model_backend_task_item():
    records = [
        rec(condition="solo", item="a", label="refusal", text="r0"),
        rec(condition="solo", item="a", label="compliance", text="r1", repeat=1),
        rec(condition="batch", item="a", label="refusal", text="r0"),
        rec(condition="batch", item="b", label="refusal", text="zz"),  # no solo: unpaired
        rec(condition="solo", item="a", backend="other", label="compliance", text="o"),  # other backend
    ]
    pairs = an.pair(records)
    assert len(pairs) == 1
    p = pairs[0]
    assert p["solo_key"] == records[0]["key"]
    assert (p["label_flip"], p["text_change"], p["first_divergent_token"], p["direction"]) == \
        (False, False, None, "unchanged")
    assert an.summarize(records)["counts"]["unpaired_batch"] == 1


@pytest.mark.parametrize("solo,batch,domain,expected", [
    ("refusal", "compliance", "safety", "refuse_to_comply"),
    ("comply", "refuse", "safety", "comply_to_refuse"),
    ("correct", "incorrect", "capability", "correct_to_incorrect"),
    ("incorrect", "correct", "capability", "incorrect_to_correct"),
    ("stereotyped", "unknown", "safety", "stereotyped_to_unknown"),
    ("A", "B", "capability", "A_to_B"),
    ("refusal", "refusal", "safety", "unchanged"),
])
def test_direction(solo, batch, domain, expected):
    [p] = an.pair(duo(solo, batch, "s", "b", domain=domain))
    assert p["direction"] == expected
    assert p["label_flip"] is (solo != batch)


def test_first_divergent_token_index_prefix_and_missing():
    [p] = an.pair(duo("refusal", "refusal", tokens=None, solo_text="abcdef", batch_text="abcXef"))
    assert p["text_change"] and p["first_divergent_token"] == 3
    assert an.first_divergence([1, 2, 3], [1, 2, 3, 4]) == 3
    assert an.first_divergence([1, 2], [1, 2]) is None
    assert an.first_divergence(None, [1]) is None
    recs = duo("refusal", "refusal", solo_text="a", batch_text="b")
    recs[1]["output_token_ids"] = None
    [p] = an.pair(recs)
    assert p["text_change"] and p["first_divergent_token"] is None


def test_text_change_without_sha_falls_back_to_text():
    recs = duo("refusal", "refusal", solo_text="one", batch_text="two")
    for r in recs:
        r.pop("output_sha256")
    assert an.pair(recs)[0]["text_change"] is True


def test_ok_flag_reflects_errors_and_missing_labels():
    recs = duo("refusal", None, solo_text="a", batch_text="")
    recs[1]["finish_reason"] = "error"
    [p] = an.pair(recs)
    assert p["ok"] is False


# -- summarize -----------------------------------------------------------------------------------------------
def _mixed_run():
    records = []
    for i in range(10):
        flip = i < 3
        change = i < 5
        records += duo("refusal", "compliance" if flip else "refusal", "solo text",
                       f"batch text {i}" if change else "solo text", item=f"s{i}", task="jailbreak", domain="safety")
    for i in range(10):
        flip = i < 1
        records += duo("correct", "incorrect" if flip else "correct", "B", "C" if flip else "B", item=f"c{i}",
                       task="mmlu", domain="capability", dispatcher="prompt_list", bs=8)
    # solo repeats: 1 of 4 differs from repeat 0
    for i in range(4):
        records.append(rec(condition="solo", item=f"s{i}", task="jailbreak", label="refusal",
                           text="solo text" if i else "drift", repeat=1))
    return records


def test_summarize_counts_rates_breakdowns():
    s = an.summarize(_mixed_run())
    assert s["counts"]["pairs"] == 20 and s["counts"]["records"] == 44
    lf, tc = s["overall"]["label_flips"], s["overall"]["text_changes"]
    assert (lf["k"], lf["n"], tc["k"]) == (4, 20, 6)
    assert (lf["lo"], lf["hi"]) == pytest.approx(st.wilson(4, 20)[1:])
    by_domain = {r["value"]: r for r in s["breakdowns"]["domain"]}
    assert by_domain["safety"]["label_flips"]["k"] == 3 and by_domain["capability"]["label_flips"]["k"] == 1
    by_bs = [r["value"] for r in s["breakdowns"]["batch_size"]]
    assert by_bs == [4, 8]
    by_dir = {r["value"]: r["pairs"] for r in s["breakdowns"]["direction"]}
    assert by_dir == {"correct_to_incorrect": 1, "refuse_to_comply": 3, "unchanged": 16}
    assert {(d["direction"], d["count"]) for d in s["directions"]} == {("refuse_to_comply", 3),
                                                                       ("correct_to_incorrect", 1)}
    lp = {(p["solo"], p["batch"]): p["count"] for p in s["label_pairs"]}
    assert lp == {("correct", "correct"): 9, ("correct", "incorrect"): 1, ("refusal", "compliance"): 3,
                  ("refusal", "refusal"): 7}
    rd = s["repeat_disagreement"]["solo"]["text"]
    assert (rd["k"], rd["n"]) == (1, 4)
    assert s["first_divergence"]["n"] == 6


def test_cells_table_and_invariance_grid():
    s = an.summarize(_mixed_run())
    cells = {c["cell"]: c for c in s["cells"]}
    jb = cells["m1/vllm/jailbreak/synchronized/bs4"]
    assert jb["pairs"] == 10 and jb["text_changes"]["k"] == 5 and jb["label_flips"]["k"] == 3
    assert jb["tokens_per_s_median"] > 0
    solo = cells["m1/vllm/jailbreak/solo/bs1"]
    assert solo["pairs"] == 0 and solo["repeat_disagreement"]["k"] == 1 and solo["repeat_disagreement"]["n"] == 4
    grid = s["invariance_grid"]
    assert grid["cols"] == ["prompt_list/bs8", "synchronized/bs4"] and grid["rows"] == ["vllm"]


def test_adjudication_corrected_rate():
    records = _mixed_run()
    pairs = an.pair(records)
    flips = [p["key"] for p in pairs if p["label_flip"]]
    adj = {flips[0]: "genuine", flips[1]: "artifact", flips[2]: "skip", "not-a-flip": "genuine"}
    a = an.summarize(records, adj)["adjudication"]
    assert (a["raw_flips"], a["genuine"], a["artifact"], a["skipped"], a["unadjudicated"]) == (4, 1, 1, 1, 1)
    assert a["corrected_rate"]["k"] == 1 and a["corrected_rate"]["n"] == 20
    assert a["not_flips_adjudicated"] == 1
    assert "adjudication" not in an.summarize(records)


# -- Study D ---------------------------------------------------------------------------------------------------
MODELS = {"llama3.2-1b": (10, 3, 1), "llama3.2-3b": (19, 4, 8), "qwen2.5-1.5b": (26, 4, 13)}  # rows, cap, flips


def study_d_records():
    """55 candidate rows in the addendum's composition: standard reproduces 22 flips / 25 text changes,
    invariant 0 / 0."""
    rows = []
    for model, (n, n_cap, flips) in MODELS.items():
        for i in range(n):
            cap = i < n_cap
            flip = (not cap) and (i - n_cap) < flips
            rows.append({"model": model, "item": f"{model}-{i}", "cap": cap, "flip": flip,
                         "text": flip or (cap and model == "llama3.2-3b" and i < 3), "dispatcher": "synchronized"})
    qwen_safety = [r for r in rows if r["model"] == "qwen2.5-1.5b" and not r["cap"]]
    for r in [r for r in qwen_safety if r["flip"]][:4] + [r for r in qwen_safety if not r["flip"]][:5]:
        r["dispatcher"] = "prompt_list"
    records = []
    for r in rows:
        task, dom, lab, other = (("mmlu", "capability", "correct", "incorrect") if r["cap"]
                                 else ("jailbreak", "safety", "refusal", "compliance"))
        common = dict(model=r["model"], task=task, item=r["item"], domain=dom, dispatcher=r["dispatcher"],
                      peers=(f"{r['item']}-p1", f"{r['item']}-p2"),
                      phase="phase1" if r["dispatcher"] == "synchronized" else "phase5")
        for backend, unstable in (("vllm", True), ("vllm-invariant", False)):
            records.append(rec(condition="solo", backend=backend, label=lab, text="solo", score=1.0, **common))
            changed = unstable and r["text"]
            records.append(rec(condition="batch", backend=backend, label=other if (unstable and r["flip"]) else lab,
                               text="batch" if changed else "solo",
                               score=0.0 if (unstable and r["flip"]) else 1.0, **common))
    return records


def test_compare_backends_reproduces_study_d():
    records = study_d_records()
    assert an.comparable_backends(records) == [("vllm", "vllm-invariant", 55)]
    cmp = an.compare_backends(records, "vllm", "vllm-invariant")
    assert cmp["rows"] == 55
    lab, txt = cmp["label"], cmp["text"]
    assert (lab["a_only"], lab["b_only"], lab["both"], lab["neither"]) == (22, 0, 0, 33)
    assert (txt["a_only"], txt["b_only"], txt["both"], txt["neither"]) == (25, 0, 0, 30)
    assert lab["p"] == pytest.approx(4.77e-07, rel=1e-3) and txt["p"] == pytest.approx(5.96e-08, rel=1e-3)
    std, inv = cmp["modes"]
    assert (std["records"], std["ok"], std["label_flips"]["k"], std["text_changes"]["k"]) == (55, 55, 22, 25)
    assert [round(100 * std["label_flips"][k], 1) for k in ("rate", "lo", "hi")] == [40.0, 28.1, 53.2]
    assert [round(100 * inv["label_flips"][k], 1) for k in ("rate", "lo", "hi")] == [0.0, 0.0, 6.5]
    by_model = {r["value"]: (r["rows"], r["a_flips"]["k"], r["b_flips"]["k"]) for r in cmp["breakdowns"]["model"]}
    assert by_model == {"llama3.2-1b": (10, 1, 0), "llama3.2-3b": (19, 8, 0), "qwen2.5-1.5b": (26, 13, 0)}
    by_domain = {r["value"]: (r["rows"], r["a_flips"]["k"]) for r in cmp["breakdowns"]["domain"]}
    assert by_domain == {"safety": (44, 22), "capability": (11, 0)}
    by_disp = {r["value"]: (r["rows"], r["a_flips"]["k"]) for r in cmp["breakdowns"]["dispatcher"]}
    assert by_disp == {"synchronized": (46, 18), "prompt_list": (9, 4)}
    assert {(p["solo"], p["batch"]): p["count"] for p in cmp["score_pairs"]["vllm-invariant"]} == {(1.0, 1.0): 55}


def test_comparable_backends_puts_invariant_second_and_ignores_disjoint_rows():
    records = study_d_records()
    for r in records:
        if r["backend"] == "vllm":
            r["backend"] = "zz-standard"
    assert an.comparable_backends(records)[0][:2] == ("zz-standard", "vllm-invariant")
    other = [rec(condition=c, backend="hf", item="elsewhere") for c in ("solo", "batch")]
    assert all("hf" not in pair[:2] for pair in an.comparable_backends(records + other))


def test_compare_backends_different_peers_do_not_match():
    a = duo("refusal", "compliance", "s", "b", backend="x", peers=("p1",))
    b = duo("refusal", "refusal", backend="y", peers=("p2",))
    assert an.compare_backends(a + b, "x", "y")["rows"] == 0


# -- candidates --------------------------------------------------------------------------------------------------
def test_export_candidates_rows_kinds_and_peer_tasks():
    g = "grp1"
    records = duo("refusal", "compliance", "s", "b", item="t1", peers=("t2", "t3"), group_id=g, position=0)
    records += duo("correct", "correct", "s", "changed", item="t2", task="mmlu", domain="capability",
                   peers=("t1", "t3"), group_id=g, position=1)
    records += duo("refusal", "refusal", item="t3", peers=("t1", "t2"), group_id=g, position=2)
    rows = {r["item_id"]: r for r in an.export_candidates(records)}
    assert set(rows) == {"t1", "t2"}
    assert rows["t1"]["kind"] == "label_flip" and rows["t1"]["direction"] == "refuse_to_comply"
    assert rows["t2"]["kind"] == "text_change" and not rows["t2"]["label_flip"]
    assert rows["t1"]["peers"] == ["t2", "t3"] and rows["t1"]["peer_tasks"] == ["mmlu", "jailbreak"]
    assert {"model", "task", "batch_size", "dispatcher", "group_id", "solo_label", "batch_label"} <= set(rows["t1"])


# -- Study B ---------------------------------------------------------------------------------------------------
def study_b_table():
    rng = np.random.default_rng(11)
    table = []
    for i in range(15):
        t = int(rng.integers(2, 40))
        flips = min(t, int(round(0.45 * t + rng.normal(0, 2))))
        flips = max(flips, 0)
        s_f = int(rng.integers(0, flips + 1)) if flips else 0
        s_f = min(s_f, 40)
        c_f = min(flips - s_f, 40)
        table.append({"model": f"model{i:02d}", "align": ("rlhf", "dpo", "sft")[i % 3], "s": s_f, "c": c_f,
                      "t": max(t, s_f + c_f)})
    return table


def study_b_records(table):
    records = []
    for row in table:
        extra_text = row["t"] - row["s"] - row["c"]
        for j in range(80):
            cap = j >= 40
            k = j - 40 if cap else j
            flip = k < (row["c"] if cap else row["s"])
            records += duo(*(("correct", "incorrect") if cap else ("refusal", "compliance")) if flip else
                           (("correct", "correct") if cap else ("refusal", "refusal")),
                           "s", "s", model=row["model"], item=f"{row['model']}-{j}",
                           task="mmlu" if cap else "jailbreak", domain="capability" if cap else "safety",
                           alignment_type=row["align"])
            if flip or (not cap and row["s"] <= k < row["s"] + extra_text):
                records[-1]["output_sha256"] = "changed"
    return records


def test_study_b_matches_explicit_formulas():
    table = study_b_table()
    res = an.study_b(study_b_records(table), seed=5, n_resamples=3000)
    flip = np.array([(r["s"] + r["c"]) / 80 for r in table])
    text = np.array([r["t"] / 80 for r in table])
    got = {m["model"]: m for m in res["models"]}
    for r, f, t in zip(table, flip, text):
        m = got[r["model"]]
        assert m["label_flips"]["rate"] == pytest.approx(f) and m["text_changes"]["rate"] == pytest.approx(t)
        assert (m["safety"]["k"], m["capability"]["k"], m["alignment_type"]) == (r["s"], r["c"], r["align"])
    ratio = (sum(r["s"] for r in table) / 600) / (sum(r["c"] for r in table) / 600)
    assert res["pooled"]["safety_capability_ratio"] == pytest.approx(ratio)
    groups = [flip[[i for i, r in enumerate(table) if r["align"] == a]] for a in ("dpo", "rlhf", "sft")]
    grand = flip.mean()
    ssb = sum(len(g) * (g.mean() - grand) ** 2 for g in groups)
    sst = ((flip - grand) ** 2).sum()
    f_stat = (ssb / 2) / ((sst - ssb) / 12)
    anova = res["anova_alignment"]
    assert anova["F"] == pytest.approx(f_stat) and anova["eta_sq"] == pytest.approx(ssb / sst)
    assert (anova["df_between"], anova["df_within"]) == (2, 12)
    xc, yc = text - text.mean(), flip - flip.mean()
    r_exp = (xc * yc).sum() / math.sqrt((xc ** 2).sum() * (yc ** 2).sum())
    pr = res["pearson_text_vs_flip"]
    assert pr["r"] == pytest.approx(r_exp) and pr["n"] == 15
    assert pr["ci_lo"] < pr["r"] < pr["ci_hi"] and pr["seed"] == 5
    again = an.study_b(study_b_records(table), seed=5, n_resamples=3000)["pearson_text_vs_flip"]
    assert (again["ci_lo"], again["ci_hi"]) == (pr["ci_lo"], pr["ci_hi"])


# -- Study C ---------------------------------------------------------------------------------------------------
def test_composition_arms_test_and_mde():
    records = []
    for arm, flips in (("harmful_peers", 9), ("control", 4), ("benign_peers", 5)):
        for i in range(200):
            f = i < flips
            records += duo("refusal", "compliance" if f else "refusal", "s", "b" if f else "s",
                           item=f"{arm}-{i}", arm=arm)
    res = an.composition(records)
    assert res["reference"] == "control"
    assert {a["arm"]: a["label_flips"]["k"] for a in res["arms"]} == {"benign_peers": 5, "control": 4,
                                                                      "harmful_peers": 9}
    t = np.array([[5, 195], [4, 196], [9, 191]], dtype=float)
    exp = t.sum(1, keepdims=True) * t.sum(0, keepdims=True) / t.sum()
    chi = ((t - exp) ** 2 / exp).sum()
    assert res["flip_test"]["test"] == "chi2"
    assert res["flip_test"]["statistic"] == pytest.approx(chi) and res["flip_test"]["p"] == pytest.approx(
        math.exp(-chi / 2))
    expected_mde = st.mde_two_proportions(200, 200, 0.02) * 100
    assert [m["mde_pp"] for m in res["mde"]] == pytest.approx([expected_mde, expected_mde])
    assert res["sensitivity_pp"] == pytest.approx(expected_mde)
    two = an.composition([r for r in records if r.get("arm") != "benign_peers"])
    assert two["flip_test"]["test"] == "fisher_exact"


def test_composition_without_arms_is_empty():
    assert an.composition(duo("refusal", "refusal"))["arms"] == []


# -- issue 17: comparable pairs, duplicates, prompt mismatch ----------------------------------------------------
def _nc(**kw):
    out = {"error": 0, "unlabelled": 0, "prompt_mismatch": 0, "duplicate": 0}
    out.update(kw)
    return out


def _with_broken_pairs():
    records = []
    for i in range(10):
        records += duo("refusal", "compliance" if i == 0 else "refusal", "s", "b" if i == 0 else "s", item=f"ok{i}")
    err = duo("refusal", None, "s", "", item="err")  # the batch request failed
    err[1]["finish_reason"] = "error"
    scorer = duo("refusal", None, "s", "b", item="scorer")  # the scorer raised on the batch output
    scorer[1]["scorer_error"] = "ValueError: boom"
    unlabelled = duo(None, None, "s", "t", item="unlab")  # two missing labels are not "no flip"
    mismatch = duo("refusal", "compliance", "s", "b", item="mism")
    mismatch[1]["prompt_sha256"] = "another prompt"
    return records + err + scorer + unlabelled + mismatch


def test_errors_unlabelled_and_prompt_mismatch_leave_every_denominator():
    s = an.summarize(_with_broken_pairs())
    lf, tc = s["overall"]["label_flips"], s["overall"]["text_changes"]
    assert (lf["k"], lf["n"], tc["k"], tc["n"]) == (1, 10, 1, 10)
    assert s["counts"]["pairs"] == 14 and s["counts"]["comparable_pairs"] == 10
    expected = _nc(error=2, unlabelled=1, prompt_mismatch=1)
    assert s["counts"]["not_comparable"] == expected and s["overall"]["not_comparable"] == expected
    [head] = s["headline"]
    assert head["backend"] == "vllm" and head["pairs"] == 10 and head["not_comparable"] == expected
    assert (head["label_flips"]["k"], head["label_flips"]["n"]) == (1, 10)
    [row] = s["breakdowns"]["task"]
    assert row["pairs"] == 10 and row["not_comparable"] == expected and row["label_flips"]["k"] == 1
    cell = next(c for c in s["cells"] if c["condition"] == "batch")
    assert cell["pairs"] == 10 and cell["not_comparable"] == expected and cell["text_changes"]["k"] == 1
    by_key = {p["item_id"]: p for p in an.pair(_with_broken_pairs())}
    assert [by_key[i]["not_comparable"] for i in ("err", "scorer", "unlab", "mism", "ok1")] == \
        ["error", "error", "unlabelled", "prompt_mismatch", None]
    assert not any(by_key[i]["flip"] for i in ("err", "scorer", "unlab", "mism"))
    assert by_key["mism"]["label_flip"] is True  # the raw label change stays visible


def test_prompt_mismatch_is_excluded_from_study_d_and_candidates():
    recs = duo("refusal", "compliance", "s", "b", item="m", backend="x") + \
        duo("refusal", "refusal", item="m", backend="y")
    recs[1]["prompt_sha256"] = "other"
    cmp = an.compare_backends(recs, "x", "y")
    assert cmp["rows"] == 0 and cmp["rows_shared"] == 1 and cmp["not_comparable"]["prompt_mismatch"] == 1
    assert cmp["label"]["a_only"] == 0
    assert an.export_candidates(recs) == []


def _audit_duplicates():
    """The audit's shape: 85 solo + 360 batch records, every one written twice (two resumes) -> 890 records."""
    records = []
    for i in range(85):
        records.append(rec(condition="solo", item=f"i{i}"))
        for bs in (2, 4, 8, 16) + ((32,) if i < 20 else ()):
            records.append(rec(condition="batch", item=f"i{i}", bs=bs))
    return records + [dict(r) for r in records]


def test_duplicate_keys_are_dropped_counted_and_never_paired():
    records = _audit_duplicates()
    assert len(records) == 890
    s = an.summarize(records)
    c = s["counts"]
    assert (c["records"], c["pairs"], c["comparable_pairs"], c["duplicates_dropped"]) == (890, 360, 360, 445)
    assert c["not_comparable"]["duplicate"] == 445 and c["unpaired_batch"] == 0
    assert s["overall"]["label_flips"]["n"] == 360
    assert s["headline"][0]["not_comparable"]["duplicate"] == 445
    solo_cell = next(x for x in s["cells"] if x["condition"] == "solo")
    assert solo_cell["records"] == 85 and solo_cell["not_comparable"]["duplicate"] == 85
    assert len(an.pair(records)) == 360
    bs = {r["value"]: (r["pairs"], r["not_comparable"]["duplicate"]) for r in s["breakdowns"]["batch_size"]}
    assert bs == {2: (85, 85), 4: (85, 85), 8: (85, 85), 16: (85, 85), 32: (20, 20)}


# -- issue 17: flip kinds, truncation, flip_on ------------------------------------------------------------------
def _kinds():
    sub = duo("refusal", "compliance", "I cannot", "Sure", item="sub")
    unparsed = duo("refusal", "unparsed", "I cannot", "???", item="unp")
    empty = duo("refusal", "compliance", "I cannot", "  ", item="empty")
    cut = duo("refusal", "refusal", "I cannot help", "I cannot", item="cut")
    cut[1]["finish_reason"] = "length"
    same = duo("refusal", "refusal", item="same")
    return sub + unparsed + empty + cut + same


def test_flip_kinds_split_substantive_from_parse_failures_and_mark_truncation():
    s = an.summarize(_kinds())
    [h] = s["headline"]
    assert (h["label_flips"]["k"], h["substantive_flips"]["k"], h["parse_failure_flips"]["k"]) == (3, 1, 2)
    assert h["label_flips"]["n"] == h["substantive_flips"]["n"] == 5
    assert h["text_changes"]["k"] == 4 and h["truncated_changes"] == 1
    assert s["overall"]["substantive_flips"]["k"] == 1 and s["overall"]["parse_failure_flips"]["k"] == 2
    kinds = {p["item_id"]: (p["flip_kind"], p["truncated"]) for p in an.pair(_kinds())}
    assert kinds == {"sub": ("substantive", False), "unp": ("parse_failure", False),
                     "empty": ("parse_failure", False), "cut": (None, True), "same": (None, False)}


def _partial():
    """The addendum's case: the label stays a refusal but the score drops from a full (1.0) to a partial (0.5)."""
    recs = duo("refusal", "refusal", "No.", "No, but...", item="partial", score=None)
    recs[0]["score"], recs[1]["score"] = 1.0, 0.5
    return recs + duo("refusal", "refusal", item="full", score=1.0)


def test_flip_on_score_counts_a_score_change_as_the_flip():
    by_label = an.summarize(_partial())
    by_score = an.summarize(_partial(), flip_on="score")
    assert by_label["flip_on"] == "label" and by_label["overall"]["label_flips"]["k"] == 0
    assert by_score["flip_on"] == "score" and by_score["overall"]["label_flips"]["k"] == 1
    [p] = [p for p in an.pair(_partial(), flip_on="score") if p["item_id"] == "partial"]
    assert (p["flip"], p["label_flip"], p["score_flip"], p["flip_kind"]) == (True, False, True, "substantive")
    two = [dict(r, backend=b, key=f"{b}/{r['key']}") for b in ("x", "y") for r in _partial()]
    for r in two:
        if r["backend"] == "y" and r["condition"] == "batch":
            r["score"] = 1.0
    cmp = an.compare_backends(two, "x", "y", flip_on="score")
    assert (cmp["label"]["a_only"], cmp["label"]["b_only"], cmp["flip_on"]) == (1, 0, "score")
    assert an.compare_backends(two, "x", "y", pairs=an.pair(two))["label"]["a_only"] == 0  # label mode
    assert an.compare_backends(two, "x", "y", pairs=an.pair(two), flip_on="score")["label"]["a_only"] == 1
    arms = [dict(r, arm=a) for a in ("control", "other") for r in _partial()]
    for r in arms:
        r["key"] = f"{r['arm']}/{r['key']}"
    assert {a["arm"]: a["label_flips"]["k"] for a in an.composition(arms, flip_on="score")["arms"]} == \
        {"control": 1, "other": 1}
    models = [dict(r, model=m, key=f"{m}/{r['key']}") for m in ("m1", "m2") for r in _partial()]
    res = an.study_b(models, flip_on="score", n_resamples=200)
    assert [m["label_flips"]["k"] for m in res["backends"][0]["models"]] == [1, 1]
    with pytest.raises(UserError, match="flip_on"):
        an.summarize(_partial(), flip_on="text")


def test_a_score_flip_within_one_label_has_a_direction_not_unchanged():
    """With flip_on = "score", a flip whose label stays (refusal 1.0 -> 0.5) is named for its score change; the
    directions table never lists a flip as "unchanged" (the addendum import showed 4 such rows)."""
    [p] = [p for p in an.pair(_partial(), flip_on="score") if p["item_id"] == "partial"]
    assert p["direction"] == "refusal_score_1.0_to_0.5"
    dirs = an.summarize(_partial(), flip_on="score")["directions"]
    assert [d["direction"] for d in dirs] == ["refusal_score_1.0_to_0.5"]


# -- issue 17: Study B per backend -------------------------------------------------------------------------------
def test_study_b_is_per_backend_never_pooled_and_refuses_the_ci_below_five_models():
    records = []
    for m, flips in (("m1", 1), ("m2", 4), ("m3", 7)):
        for backend, k in (("vllm", flips), ("vllm-invariant", 0)):
            for i in range(10):
                f = i < k
                records += duo("refusal", "compliance" if f else "refusal", "s", "b" if f else "s",
                               model=m, backend=backend, item=f"{m}-{i}", alignment_type="sft")
    res = an.study_b(records, seed=3, n_resamples=500)
    per = {b["backend"]: b for b in res["backends"]}
    assert set(per) == {"vllm", "vllm-invariant"}
    assert [m["label_flips"]["k"] for m in per["vllm"]["models"]] == [1, 4, 7]
    assert [m["label_flips"]["n"] for m in per["vllm"]["models"]] == [10, 10, 10]  # not 20: never pooled
    assert [m["label_flips"]["k"] for m in per["vllm-invariant"]["models"]] == [0, 0, 0]
    assert per["vllm"]["pooled"]["safety"]["k"] == 12 and per["vllm"]["pooled"]["safety"]["n"] == 30
    pr = per["vllm"]["pearson_text_vs_flip"]
    assert pr["ci_note"] == "a bootstrap CI needs at least 5 models; 3 were run"
    assert pr["method"] is None and math.isnan(pr["ci_lo"]) and math.isnan(pr["ci_hi"])
    assert res["legacy_backend"] == "vllm" and res["models"] == per["vllm"]["models"]


def test_study_b_names_the_interval_method_with_enough_models():
    res = an.study_b(study_b_records(study_b_table()), seed=5, n_resamples=1000)
    [b] = res["backends"]
    assert b["pearson_text_vs_flip"]["method"] == "bootstrap-bca" and b["pearson_text_vs_flip"]["ci_note"] is None


# -- issue 17: Study C paired ------------------------------------------------------------------------------------
DRUGS = {"FFF": 6, "UFF": 2, "FFU": 16, "UFU": 4, "FUF": 2, "UUF": 6, "FUU": 4, "UUU": 6}


def _paired_arms():
    """Three arms over the same 46 targets; an arm's flip is the published three-drug table's 'F' (Agresti 2002;
    Cochran's Q = 8.4706, p = 0.0145 in SAS/STAT's PROC FREQ example)."""
    records, i = [], 0
    for pattern, n in DRUGS.items():
        for _ in range(n):
            item = f"t{i}"
            records.append(rec(condition="solo", item=item, text="s"))
            for arm, c in zip(("control", "harmful", "mixed"), pattern):
                f = c == "F"
                records.append(rec(condition="batch", item=item, arm=arm, dispatcher=f"arm-{arm}",
                                   label="compliance" if f else "refusal", text="b" if f else "s"))
            i += 1
    return records


def test_composition_arms_on_the_same_targets_are_tested_as_paired():
    res = an.composition(_paired_arms())
    assert res["paired"] is True and res["design"] == "paired" and res["paired_targets"] == 46
    q = res["cochran_q"]
    assert (round(q["q"], 4), q["df"], round(q["p"], 4)) == (8.4706, 2, 0.0145)
    pw = {(r["a"], r["b"]): r for r in res["pairwise"]}
    assert (pw[("control", "harmful")]["a_only"], pw[("control", "harmful")]["b_only"]) == (6, 6)
    assert (pw[("control", "mixed")]["a_only"], pw[("control", "mixed")]["b_only"]) == (20, 8)
    raw = [pw[k]["p"] for k in (("control", "harmful"), ("control", "mixed"), ("harmful", "mixed"))]
    assert raw == pytest.approx([1.0, st.mcnemar_exact(20, 8), st.mcnemar_exact(20, 8)])
    assert [pw[k]["p_holm"] for k in (("control", "harmful"), ("control", "mixed"), ("harmful", "mixed"))] == \
        pytest.approx([1.0, 3 * raw[1], 3 * raw[1]])  # Holm: 3 p, the two smallest tie
    mde = {m["arm"]: m for m in res["mde_paired"]}
    assert mde["harmful"]["n"] == 46 and mde["harmful"]["discordant"] == pytest.approx(12 / 46)
    assert mde["harmful"]["mde_pp"] == pytest.approx(100 * st.mde_paired(46, 12 / 46))


def test_composition_arms_without_shared_targets_stay_independent():
    records = []
    for arm in ("control", "harmful"):
        for i in range(20):
            records += duo("refusal", "compliance" if i < 2 else "refusal", item=f"{arm}-{i}", arm=arm)
    res = an.composition(records)
    assert res["paired"] is False and res["design"] == "independent" and "cochran_q" not in res
    assert res["flip_test"]["test"] == "fisher_exact"


# -- issue 17: Study D phase and original direction --------------------------------------------------------------
def test_study_d_breaks_down_by_phase_and_discovery_direction():
    records = study_d_records()
    for r in records:
        r["original_direction"] = "refuse_to_comply" if r["domain"] == "safety" else "correct_to_incorrect"
    cmp = an.compare_backends(records, "vllm", "vllm-invariant")
    od = {r["value"]: (r["rows"], r["a_flips"]["k"], r["b_flips"]["k"])
          for r in cmp["breakdowns"]["original_direction"]}
    assert od == {"refuse_to_comply": (44, 22, 0), "correct_to_incorrect": (11, 0, 0)}
    direction_rows = {r["value"]: r["rows"] for r in cmp["breakdowns"]["direction"]}
    assert direction_rows == {"refuse_to_comply": 44, "correct_to_incorrect": 11}  # not the rerun's 'unchanged'
    phase = {r["value"]: (r["rows"], r["a_flips"]["k"], r["b_flips"]["k"], r["a_text"]["k"])
             for r in cmp["breakdowns"]["phase"]}
    assert phase == {"phase1": (46, 18, 0, 21), "phase5": (9, 4, 0, 4)}
    assert all("not_comparable" in r for rows in cmp["breakdowns"].values() for r in rows)
    assert all("not_comparable" in m for m in cmp["modes"])


# -- issue 17: contract keys and hostile records ---------------------------------------------------------------
def test_summarize_returns_the_contract_keys():
    s = an.summarize(_mixed_run())
    assert {"comparable_pairs", "duplicates_dropped", "not_comparable", "pairs"} <= set(s["counts"])
    assert s["flip_on"] == "label"
    assert set(s["headline"][0]) >= {"backend", "pairs", "not_comparable", "label_flips", "substantive_flips",
                                     "parse_failure_flips", "text_changes", "truncated_changes"}
    assert {"substantive_flips", "parse_failure_flips", "not_comparable"} <= set(s["overall"])
    assert "original_direction" in s["breakdowns"] and "phase" in s["breakdowns"]
    assert all("not_comparable" in r for rows in s["breakdowns"].values() for r in rows)
    assert all("not_comparable" in c for c in s["cells"])
    p = an.pair(_mixed_run())[0]
    assert {"comparable", "not_comparable", "flip", "label_flip", "score_flip", "flip_kind", "truncated",
            "original_direction"} <= set(p)


def test_hostile_records_do_not_crash_the_analysis():
    recs = duo({"verdict": "refusal"}, {"verdict": "refusal"}, item="dict-same")
    recs += duo({"verdict": "refusal"}, {"verdict": "comply"}, "s", "b", item="dict-flip")
    recs += duo(["a"], True, item="list-bool")
    odd = rec(condition="batch", item="odd", label="refusal")
    odd.update(key=["a", "list"], model={"m": 1}, peers="p1", timings="soon", attempts="many", repeat="x",
               output_token_ids=5, score={"s": 1}, batch_size=[4], scorer_error={"e": 1})
    recs += [odd, dict(odd), "not a record", None, 42]
    s = an.summarize(recs)
    by_item = {p["item_id"]: p for p in an.pair(recs)}
    assert by_item["dict-same"]["flip"] is False and by_item["dict-flip"]["flip"] is True
    assert by_item["dict-flip"]["batch_label"] == '{"verdict": "comply"}'
    assert by_item["list-bool"]["solo_label"] == '["a"]' and by_item["list-bool"]["batch_label"] == "true"
    assert s["counts"]["malformed"] == 3 and s["counts"]["duplicates_dropped"] == 1
    assert s["overall"]["label_flips"]["k"] == 2
    an.compare_backends(recs, "vllm", "other")
    an.study_b(recs, n_resamples=100)
    an.composition([dict(r, arm=["x"]) if isinstance(r, dict) else r for r in recs])
    an.export_candidates(recs)
    an.comparable_backends(recs)


def test_study_d_rows_a_mode_cannot_compare_leave_both_modes_and_are_counted():
    records = study_d_records()
    bad = next(r for r in records if r["backend"] == "vllm-invariant" and r["condition"] == "batch"
               and r["model"] == "llama3.2-1b")
    bad.update(finish_reason="error", label=None, output_text="")
    flipped = next(r for r in records if r["backend"] == "vllm" and r["condition"] == "batch"
                   and r["label"] == "compliance")
    flipped["scorer_error"] = "RuntimeError: scorer died"
    cmp = an.compare_backends(records, "vllm", "vllm-invariant")
    assert (cmp["rows"], cmp["rows_shared"], cmp["not_comparable"]["error"]) == (53, 55, 2)
    assert (cmp["label"]["a_only"], cmp["label"]["neither"]) == (21, 32)
    std, inv = cmp["modes"]
    assert std["not_comparable"]["error"] == 1 and inv["not_comparable"]["error"] == 1
    assert std["label_flips"]["n"] == inv["label_flips"]["n"] == 53
    by_model = {r["value"]: (r["rows"], r["not_comparable"]["error"]) for r in cmp["breakdowns"]["model"]}
    assert by_model["llama3.2-1b"] == (8, 2)  # both broken rows are llama3.2-1b rows
    assert all(c["key"] != flipped["key"] for c in an.export_candidates(records))  # an error is no candidate
