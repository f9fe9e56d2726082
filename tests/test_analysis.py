"""evalhost.analysis on hand-made records: pairing, flips, directions, summaries, Study B/C/D statistics."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from evalhost import analysis as an
from evalhost import stats as st


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
