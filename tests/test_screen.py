"""The fragility screen (issue 22, item 5): the score, its ROC AUC against observed text changes, the batching
cost saved at 90 % recall (evalhost.analysis_screen), and `evalhost run --screen K` (evalhost.screen) end to end on
the real small model with the hf backend."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from evalhost.analysis import pair, summarize_run
from evalhost.analysis_screen import auc, fragility, saved_at_recall, screen_of, section
from evalhost.screen import toml_dumps


# -- the AUC ------------------------------------------------------------------------------------------------------
def test_auc_textbook_value_hanley_mcneil_1982():
    # Hanley & McNeil, Radiology 143:29-36 (1982), Table 1: 109 CT images rated 1 (definitely normal) to
    # 5 (definitely abnormal); 58 normal, 51 abnormal; the Wilcoxon area under the ROC curve is 0.893.
    normal = [1] * 33 + [2] * 6 + [3] * 6 + [4] * 11 + [5] * 2
    abnormal = [1] * 3 + [2] * 2 + [3] * 2 + [4] * 11 + [5] * 33
    # a margin is the opposite of a rating: the smaller, the more "abnormal" (fragile)
    a = auc([-r for r in abnormal], [-r for r in normal])
    assert round(a["auc"], 3) == 0.893 and (a["n1"], a["n0"]) == (51, 58)
    assert a["u"] == 2642.0 and a["p_value"] < 1e-10


def test_auc_hand_computed_with_ties():
    # (changed, unchanged) pairs where the changed margin is smaller, a tie counting 1/2:
    # 0.0 < all three -> 3; 0.125 ties 0.125 (1/2) and is below 2 and 3 -> 2.5; 1.0 below 2 and 3 -> 2; 7.5 / 9
    a = auc([0.0, 0.125, 1.0], [0.125, 2.0, 3.0])
    assert a["u"] == 7.5 and a["auc"] == pytest.approx(7.5 / 9)
    assert auc([0.0, 0.1], [1.0, 2.0])["auc"] == 1.0  # every changed item more fragile
    assert auc([1.0, 2.0], [0.0, 0.1])["auc"] == 0.0
    assert auc([0.5, 0.5], [0.5])["auc"] == 0.5  # all tied: chance
    assert auc([], [1.0])["auc"] is None and auc([1.0], [])["auc"] is None


# -- the cost saved at 90 % recall --------------------------------------------------------------------------------
def test_saved_cost_at_90_percent_recall_constructed_case():
    margins = [0.0, 0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0]
    changed = [True, False, True, True, False, False, True, False, False, False]
    # 4 changed: 90 % is 3.6, so all 4 must be caught; the last one is the 7th most fragile -> test 7 of 10
    s = saved_at_recall(zip(margins, changed))
    assert (s["items"], s["changed"], s["needed"], s["tested"], s["caught"]) == (10, 4, 4, 7, 4)
    assert s["saved"] == pytest.approx(0.3)
    # at 50 %: 2 needed; the tie group {0.0, 0.0} holds one, 0.125 the second -> test 3, save 70 %
    s = saved_at_recall(zip(margins, changed), recall=0.5)
    assert (s["needed"], s["tested"]) == (2, 3) and s["saved"] == pytest.approx(0.7)
    # a tie at the cut is tested whole: one changed item among 5 equal margins -> all 5 tested, nothing saved
    s = saved_at_recall([(0.125, i == 3) for i in range(5)])
    assert s["tested"] == 5 and s["saved"] == 0.0
    # 10 changed: ceil(9.0) = 9 exactly (no float rounding up to 10)
    s = saved_at_recall([(float(i), i < 10) for i in range(20)])
    assert s["needed"] == 9 and s["tested"] == 9 and s["saved"] == pytest.approx(11 / 20)
    assert saved_at_recall([(1.0, False)])["saved"] is None  # nothing changed: undefined


# -- the score ----------------------------------------------------------------------------------------------------
def test_fragility_is_the_smallest_margin_along_the_output():
    r = {"top_logprobs": [[[1, -0.1], [2, -3.0]], [[3, -0.5], [4, -0.75]], [[5, -0.01], [6, -9.0]]]}
    assert fragility(r) == pytest.approx(0.25)
    assert fragility(r, first_n=1) == pytest.approx(2.9)
    # unusable tokens are skipped; nothing usable -> no score
    assert fragility({"top_logprobs": [[[1, -0.1]], "x", [[1, "a"], [2, -0.2], [3, -0.7]]]}) == pytest.approx(0.5)
    assert fragility({"top_logprobs": [[[1, -0.1]]]}) is None
    assert fragility({}) is None and fragility({"top_logprobs": {"a": 1}}) is None


def rec(key, cond, item, text, top=None, backend="b1", task="t", **kw):
    r = {"key": key, "condition": cond, "repeat": 0, "model": "m", "backend": backend, "task": task,
         "item_id": item, "domain": "safety", "dispatcher": "solo" if cond == "solo" else "prompt_list",
         "batch_size": 1 if cond == "solo" else 4, "output_token_ids": [len(text)], "output_text": text,
         "label": "comply", "score": 1.0, "finish_reason": "stop", "prompt_sha256": item,
         "cell": f"{backend}-{cond}", "top_logprobs": top}
    r.update(kw)
    return r


def top(m):  # one token whose top two are m apart
    return [[[1, -0.01], [2, -0.01 - m]]]


def synthetic():
    out = []
    # b1: A (margin 0) and C (0.5) changed; B (0.25), D (2) did not; E has no top-k (unscored); F unpaired
    for item, m, changed in (("A", 0.0, True), ("B", 0.25, False), ("C", 0.5, True), ("D", 2.0, False)):
        out += [rec(f"s{item}", "solo", item, "x", top(m)), rec(f"b{item}", "batch", item, "y" if changed else "x")]
    out += [rec("sE", "solo", "E", "x"), rec("bE", "batch", "E", "y")]
    out += [rec("sF", "solo", "F", "x", top(0.0))]
    # G's batch output errored: not comparable, left out
    out += [rec("sG", "solo", "G", "x", top(0.0)), rec("bG", "batch", "G", "z", finish_reason="error")]
    # b2: a perfect screen
    out += [rec("s2A", "solo", "A", "x", top(0.0), backend="b2"), rec("b2A", "batch", "A", "y", backend="b2"),
            rec("s2B", "solo", "B", "x", top(1.0), backend="b2"), rec("b2B", "batch", "B", "x", backend="b2")]
    return out


def test_screen_summary_per_backend_and_overall():
    records = synthetic()
    s = screen_of(records, pair(records))
    b1 = next(b for b in s["by_backend"] if b["backend"] == "b1")
    # b1 changed {0, 0.5} vs unchanged {0.25, 2}: pairs (0<0.25, 0<2, 0.5>0.25, 0.5<2) -> U = 3 of 4
    assert (b1["items"], b1["changed"], b1["unscored"], b1["unpaired"]) == (4, 2, 1, 2)  # F and G unpaired
    assert b1["auc"] == pytest.approx(0.75) and b1["u"] == 3.0
    # both changed caught only after 0, 0.25, 0.5: 3 of 4 tested
    assert (b1["needed"], b1["tested"]) == (2, 3) and b1["saved"] == pytest.approx(0.25)
    assert b1["median_margin_changed"] == pytest.approx(0.25)
    b2 = next(b for b in s["by_backend"] if b["backend"] == "b2")
    assert b2["auc"] == 1.0 and (b2["tested"], b2["saved"]) == (1, 0.5)
    o = s["overall"]  # changed {0, 0.5, 0} vs unchanged {0.25, 2, 1}: U = 3 + 3 + 2 = 8 of 9
    assert (o["items"], o["changed"]) == (6, 3) and o["auc"] == pytest.approx(8 / 9)
    text = section(s)
    assert "## Fragility screen" in text and "| b1 | 4 | 2 | 0.750 |" in text and "| all | 6 | 3 | 0.889 |" in text
    assert "This run was screened" not in text


def test_streamed_summary_carries_the_screen_only_with_top_k():
    records = synthetic()
    summary = summarize_run(records).summary
    assert summary["screen"] == screen_of(records, pair(records))
    plain = [{k: v for k, v in r.items() if k != "top_logprobs"} for r in records]
    assert "screen" not in summarize_run(plain).summary
    assert section(None) is None
    line = section(None, {"k": 2, "screen_run_dir": "/r/screen-1", "selected": {"t": ["a", "b"]},
                          "items": {"t": 5}, "top_logprobs": 2})
    assert "This run was screened" in line and "t 2 of 5" in line and "/r/screen-1" in line
    assert section(None, "not a mapping") is None  # a hostile manifest entry is ignored
    solo_only = summarize_run([r for r in records if r["condition"] == "solo"]).summary["screen"]
    assert "nothing to screen against" in section(solo_only) and "| Backend |" not in section(solo_only)


def test_toml_writer_round_trips():
    data = {"study": {"name": "s", "seed": 3, "description": 'quote " back\\slash\nnew\ttab \x7f é 🙂'},
            "sampling": {"temperature": 0.0, "top_p": 1e-05, "max_tokens": 8, "top_logprobs": 2},
            "backends": [{"name": "hf", "options": {"dtype": "bfloat16", "a b": [1, 2.5, True, {"x": "y"}]},
                          "matrix": {"attention_backend": ["A", "B"]}}],
            "tasks": [{"name": "t", "source": "jsonl:/tmp/x.jsonl", "scorer_options": {}}]}
    assert tomllib.loads(toml_dumps(data)) == data


# -- evalhost run --screen K ----------------------------------------------------------------------------------------
def _main(argv):
    from evalhost.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return exc.code
    return 0


STUDY = """
[study]
name = "scr"
output_dir = "{out}"
[sampling]
max_tokens = 3
[[models]]
name = "smollm2"
path = "builtin:smollm2-135m-instruct"
[[backends]]
name = "hf"
[[dispatchers]]
name = "prompt_list"
batch_sizes = [2]
[[tasks]]
name = "one"
source = "jsonl:one.jsonl"
[[tasks]]
name = "two"
source = "builtin:benign"
limit = 3
"""

QUESTIONS = ["What is 2+2?", "Name a color.", "Say hi."]


def _study(tmp_path: Path) -> Path:
    (tmp_path / "one.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "prompt": q, "domain": "capability", "scorer": "refusal"}) + "\n"
        for i, q in enumerate(QUESTIONS)))
    path = tmp_path / "s.toml"
    path.write_text(STUDY.format(out=tmp_path / "runs"))
    return path


@pytest.mark.parametrize("argv, says", [
    (["--screen", "0"], "--screen 0 is not a number of items per task"),
    (["--screen", "-3"], "--screen -3 is not a number of items per task"),
    (["--screen", "2", "--resume", "somewhere"], "cannot resume"),
    (["--screen", "2", "--dry-run"], "drop --dry-run"),
])
def test_bad_screen_is_one_sentence_and_writes_nothing(tmp_path, capsys, argv, says):
    study = _study(tmp_path)
    assert _main(["run", str(study), *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def _records(run_dir: Path) -> list[dict]:
    from evalhost.records import read_records

    return read_records(run_dir / "records.jsonl")  # a model output may hold U+2028: not splitlines()


def test_screen_k_end_to_end_on_the_real_model(tmp_path, monkeypatch, capsys):
    from evalhost.analysis_screen import fragility as frag

    monkeypatch.setenv("EVALHOST_SOLO_CACHE_DIR", str(tmp_path / "solo-cache"))
    monkeypatch.delenv("EVALHOST_SOLO_CACHE", raising=False)
    study = _study(tmp_path)
    assert _main(["run", str(study), "--screen", "2", "--quiet"]) == 0
    runs = tmp_path / "runs"
    [folder] = [p for p in runs.iterdir() if "-screen-" in p.name]
    [run_dir] = [p for p in runs.iterdir() if p.name.startswith("scr-") and p != folder]
    [screen_run] = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("screen-")]

    # the screening pass: solo only, every item of both tasks, with top-k logprobs
    screening = _records(screen_run)
    assert {r["condition"] for r in screening} == {"solo"} and len(screening) == 3 + 3
    assert all(isinstance(r["top_logprobs"], list) and len(r["top_logprobs"][0]) == 2 for r in screening)
    # the K most fragile per task, recomputed here from the screening records (ties by the task's order)
    order = {"one": [f"q{i}" for i in range(3)], "two": ["benign-001", "benign-002", "benign-003"]}
    score = {(r["task"], r["item_id"]): frag(r) for r in screening}
    want = {t: set(sorted(ids, key=lambda i: (score[(t, i)], ids.index(i)))[:2]) for t, ids in order.items()}

    # only those items reach the batch dispatcher (as targets and as peers), in both tasks
    records = _records(run_dir)
    batch = [r for r in records if r["condition"] == "batch"]
    assert batch
    for t in ("one", "two"):
        targets = {r["item_id"] for r in batch if r["task"] == t}
        peers = {p for r in batch if r["task"] == t for p in r["peers"]}
        assert targets == want[t] and peers <= want[t]
    # the real run's solos came from the screening's cache entries (same prompt, sampling and stack)
    solos = [r for r in records if r["condition"] == "solo"]
    assert len(solos) == 4 and all(r["dispatch_evidence"].get("solo_cache") == "hit" for r in solos)

    manifest = json.loads((run_dir / "manifest.json").read_text())
    s = manifest["screen"]
    assert s["k"] == 2 and s["screen_run_dir"] == str(screen_run) and s["top_logprobs"] == 2
    assert {t: set(v) for t, v in s["selected"].items()} == want and s["items"] == {"one": 3, "two": 3}
    assert s["solo_cache"].startswith("4 of 4")
    report = (run_dir / "report.md").read_text()
    assert "This run was screened" in report and str(screen_run) in report and "--screen 2" in report
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["screen"]["overall"]["items"] == 4
    out = capsys.readouterr().out
    assert "screen: picked one 2 of 3, two 2 of 3 items" in out
