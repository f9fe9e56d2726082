"""``evalhost import --from lm-eval|inspect SOLO BATCH -o RUN_DIR`` on real files made by the real tools
(tests/fixtures/bridges: lm-eval --log_samples at --batch_size 1 and 8; inspect eval with --max-connections 1 and
8; the commands are in make_fixtures.sh). Every count is checked against numbers computed here from the fixture
files themselves (pandas / json / zipfile, scipy and statsmodels for the statistics), not through evalhost."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from evalhost.testing import run_cli
from scipy.stats import binomtest
from statsmodels.stats.proportion import proportion_confint

from evalhost.records import read_records
from evalhost.validate import validate_run

FIX = Path(__file__).parent / "fixtures" / "bridges"
LM_SOLO = next((FIX / "lmeval" / "bs1").glob("samples_*.jsonl"))
LM_BATCH = next((FIX / "lmeval" / "bs8").glob("samples_*.jsonl"))
IN_SOLO, IN_BATCH = FIX / "inspect" / "bs1.eval", FIX / "inspect" / "bs8.eval"
EP_SOLO, EP_BATCH = FIX / "inspect" / "epochs2-bs1.eval", FIX / "inspect" / "epochs2-bs8.eval"  # 8 samples x 2




def expected(solo: pd.DataFrame, batch: pd.DataFrame) -> dict:
    """Pairs, flips, text changes, correct counts, discordant pairs and McNemar p from two frames with columns
    id, correct (bool), text: computed here, independently of evalhost."""
    m = solo.merge(batch, on="id", suffixes=("_s", "_b"))
    b = int((m.correct_s & ~m.correct_b).sum())
    c = int((~m.correct_s & m.correct_b).sum())
    return {"pairs": len(m), "flips": int((m.correct_s != m.correct_b).sum()),
            "text": int((m.text_s != m.text_b).sum()), "solo_correct": int(m.correct_s.sum()),
            "batch_correct": int(m.correct_b.sum()), "b": b, "c": c,
            "p": binomtest(b, b + c, 0.5).pvalue if b + c else 1.0}


def lmeval_frame(path: Path) -> pd.DataFrame:
    df = pd.read_json(path, lines=True)
    return pd.DataFrame({"id": df.doc_id.astype(str), "correct": df.exact_match == 1,
                         "text": df.filtered_resps.map(lambda r: r[0])})


def inspect_frame(path: Path, epochs: bool = False) -> pd.DataFrame:
    pytest.importorskip("zipfile_zstd")  # inspect-ai's dependency: lets zipfile read the .eval's zstd members
    rows = []
    with zipfile.ZipFile(path) as z:  # the .eval format: a zip with one JSON file per sample under samples/
        for name in z.namelist():
            if name.startswith("samples/") and name.endswith(".json"):
                s = json.loads(z.read(name))
                msg = s["output"]["choices"][0]["message"]["content"]
                text = msg if isinstance(msg, str) else "".join(c.get("text", "") for c in msg
                                                                if c.get("type") == "text")
                rows.append({"id": f"{s['id']}:e{s['epoch']}" if epochs else str(s["id"]),
                             "correct": s["scores"]["includes"]["value"] == "C", "text": text})
    return pd.DataFrame(rows)


def check_run(run: Path, exp: dict, out: str) -> dict:
    manifest = json.loads((run / "manifest.json").read_text())
    paired = manifest["imported"]["paired"]
    assert paired["pairs"] == exp["pairs"]
    assert paired["solo_correct"]["k"] == exp["solo_correct"] and paired["batch_correct"]["k"] == exp["batch_correct"]
    assert (paired["solo_only"], paired["batch_only"]) == (exp["b"], exp["c"])
    assert paired["mcnemar_p"] == pytest.approx(exp["p"])
    lo, hi = proportion_confint(exp["solo_correct"], exp["pairs"], alpha=0.05, method="wilson")
    assert (paired["solo_correct"]["lo"], paired["solo_correct"]["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    summary = json.loads((run / "summary.json").read_text())
    overall = summary["overall"]
    assert overall["pairs"] == exp["pairs"]
    assert overall["label_flips"]["k"] == exp["flips"] and overall["text_changes"]["k"] == exp["text"]
    lo, hi = proportion_confint(exp["flips"], exp["pairs"], alpha=0.05, method="wilson")
    assert overall["label_flips"]["lo"] == pytest.approx(lo) and overall["label_flips"]["hi"] == pytest.approx(hi)
    assert f"{exp['pairs']} pairs, {exp['pairs']} comparable: {exp['flips']} flips, {exp['text']} text changes" in out
    assert validate_run(run)["errors"] == []
    assert (run / "report.md").is_file()
    return manifest


def test_fixtures_are_small_and_came_with_their_commands():
    for f in [LM_SOLO, LM_BATCH, IN_SOLO, IN_BATCH, EP_SOLO, EP_BATCH]:
        assert f.stat().st_size < 200_000, f
    assert "lm_eval" in (FIX / "make_fixtures.sh").read_text() and "inspect\" eval" in (FIX / "make_fixtures.sh"
                                                                                        ).read_text()


def test_lmeval_pair_is_imported_with_flips_text_changes_wilson_and_mcnemar(tmp_path, capsys):
    run = tmp_path / "lm"
    code, out, err = run_cli(["import", "--from", "lm-eval", str(LM_SOLO), str(LM_BATCH), "-o", str(run)])
    assert code == 0, err
    exp = expected(lmeval_frame(LM_SOLO), lmeval_frame(LM_BATCH))
    manifest = check_run(run, exp, out)
    assert manifest["imported"]["format"] == "lm-eval" and "exact_match" in manifest["imported"]["label"]
    fp = next(iter(manifest["fingerprints"].values()))
    assert fp["solo"]["batch_size"] == 1 and fp["batch"]["batch_size"] == 8 and fp["metric"] == "exact_match"
    assert fp["batch"]["lm_eval_version"]
    recs = read_records(run / "records.jsonl")
    batch = [r for r in recs if r["condition"] == "batch"]
    assert len(batch) == exp["pairs"] and {r["batch_size"] for r in batch} == {8}
    assert {r["task"] for r in recs} == {"evalhost_tinyqa"} and {r["model"] for r in recs} == {"smollm2-135m-instruct"}
    solo_text = dict(zip(lmeval_frame(LM_SOLO).id, lmeval_frame(LM_SOLO).text))
    assert all(r["output_text"] == solo_text[r["item_id"]] for r in recs if r["condition"] == "solo")
    assert all(r["metadata"]["prompt"].startswith("Q: ") for r in recs)
    assert f"p = {exp['p']:.3g}" in out


def test_inspect_pair_is_imported_with_flips_text_changes_wilson_and_mcnemar(tmp_path, capsys):
    run = tmp_path / "insp"
    code, out, err = run_cli(["import", "--from", "inspect", str(IN_SOLO), str(IN_BATCH), "-o", str(run)])
    assert code == 0, err
    exp = expected(inspect_frame(IN_SOLO), inspect_frame(IN_BATCH))
    manifest = check_run(run, exp, out)
    fp = next(iter(manifest["fingerprints"].values()))
    assert fp["solo"]["batch_size"] == 1 and fp["batch"]["batch_size"] == 8 and fp["metric"] == "includes"
    recs = read_records(run / "records.jsonl")
    assert {r["model"] for r in recs} == {"smollm2-135m-instruct"} and {r["backend"] for r in recs} == {"inspect-hf"}



def test_an_inspect_pair_with_two_epochs_is_paired_by_sample_id_and_epoch(tmp_path, capsys):
    run = tmp_path / "ep"
    code, out, err = run_cli(["import", "--from", "inspect", str(EP_SOLO), str(EP_BATCH), "-o", str(run)])
    assert code == 0, err
    solo, batch = inspect_frame(EP_SOLO, epochs=True), inspect_frame(EP_BATCH, epochs=True)
    assert len(solo) == len(batch) == 16 and solo.id.nunique() == 16  # 8 sample ids x 2 epochs
    exp = expected(solo, batch)
    assert exp["pairs"] == 16  # paired by (id, epoch): by id alone there would be 8 (or a refusal)
    check_run(run, exp, out)
    recs = read_records(run / "records.jsonl")
    assert sorted({r["item_id"] for r in recs}) == sorted(solo.id)
    text = {(cond, i): t for cond, f in (("solo", solo), ("batch", batch)) for i, t in zip(f.id, f.text)}
    assert all(r["output_text"] == text[(r["condition"], r["item_id"])] for r in recs)
    assert {r["metadata"]["epoch"] for r in recs} == {1, 2}

def test_the_export_of_an_imported_pair_is_read_by_inspect_ai(tmp_path, capsys):
    inspect_log = pytest.importorskip("inspect_ai.log")
    run = tmp_path / "lm"
    assert run_cli(["import", "--from", "lm-eval", str(LM_SOLO), str(LM_BATCH), "-o", str(run), "--no-report"])[0] == 0
    assert run_cli(["export", "--format", "inspect", str(run), "-o", str(tmp_path / "lm.eval")])[0] == 0
    log = inspect_log.read_eval_log(str(tmp_path / "lm.eval"))
    frame = lmeval_frame(LM_SOLO)
    assert len(log.samples) == len(frame)
    assert all(s.input.startswith("Q: ") for s in log.samples)  # the prompt lm-eval logged



def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"  # report.md's percentages: one decimal (none of these values ends in a half)


@pytest.mark.parametrize("source", ["lm-eval", "inspect"])  # the inspect pair has discordant pairs (0 vs 1)
def test_the_report_shows_the_paired_accuracy_test_of_an_imported_pair(tmp_path, capsys, source):
    solo_f, batch_f, frame = ((LM_SOLO, LM_BATCH, lmeval_frame) if source == "lm-eval"
                              else (IN_SOLO, IN_BATCH, inspect_frame))
    exp = expected(frame(solo_f), frame(batch_f))
    run = tmp_path / "run"
    assert run_cli(["import", "--from", source, str(solo_f), str(batch_f), "-o", str(run)])[0] == 0
    paired = json.loads((run / "manifest.json").read_text())["imported"]["paired"]
    report = (run / "report.md").read_text()
    assert "## Paired accuracy test (imported pair)" in report
    section = report.split("## Paired accuracy test (imported pair)", 1)[1].split("\n## ", 1)[0]
    for side, path, k in (("solo", solo_f, exp["solo_correct"]), ("batch", batch_f, exp["batch_correct"])):
        p = paired[f"{side}_correct"]
        lo, hi = proportion_confint(k, exp["pairs"], alpha=0.05, method="wilson")
        assert (p["k"], p["n"]) == (k, exp["pairs"]) and (p["lo"], p["hi"]) == (pytest.approx(lo), pytest.approx(hi))
        row = f"| {side} | {path.name} | {k}/{exp['pairs']} | {_pct(k / exp['pairs'])} [{_pct(lo)}, {_pct(hi)}] |"
        assert row in section, (row, section)
    assert (f"{exp['b']} are correct only solo and {exp['c']} only batched: exact McNemar p = {exp['p']:.3g}"
            in section), section
    html_page = (run / "report.html").read_text()
    assert 'id="imported-paired"' in html_page and f"exact McNemar p = {exp['p']:.3g}" in html_page
    # a run evalhost made itself (no imported pair) gets no such section
    from evalhost.report_imported import html_section, section as md_section
    assert md_section(None) is None and md_section({"format": "jsonl"}) is None and html_section({}) == ""


def _drop(src: Path, dst: Path, ids: set[int]) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(line + "\n" for line in src.read_text().splitlines()
                           if json.loads(line)["doc_id"] not in ids))
    return dst


def test_mismatched_sample_sets_are_counted_not_dropped(tmp_path, capsys):
    solo = _drop(LM_SOLO, tmp_path / "s" / LM_SOLO.name, {5})
    batch = _drop(LM_BATCH, tmp_path / "b" / LM_BATCH.name, {0, 1})
    run = tmp_path / "run"
    code, out, err = run_cli(["import", "--from", "lm-eval", str(solo), str(batch), "-o", str(run)])
    assert code == 0, err
    n = len(lmeval_frame(LM_SOLO))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["imported"]["only_solo"] == ["0", "1"] and manifest["imported"]["only_batch"] == ["5"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["counts"]["pairs"] == n  # every sample of either file is a pair
    assert summary["overall"]["pairs"] == n - 3  # comparable: both sides present
    # counted under their own reason, "missing", not as errors (issue 22 item 4 follow-up)
    assert summary["overall"]["not_comparable"]["missing"] == 3 and summary["overall"]["not_comparable"]["error"] == 0
    assert summary["counts"]["not_comparable"]["missing"] == 3
    placeholders = [r for r in read_records(run / "records.jsonl") if r["finish_reason"] == "missing"]
    assert sorted((r["condition"], r["item_id"]) for r in placeholders) == [("batch", "0"), ("batch", "1"),
                                                                            ("solo", "5")]
    assert all(r["label"] is None and r["output_text"] is None for r in placeholders)
    report = (run / "report.md").read_text()
    assert "Not comparable: 3 (3 missing on one side)." in report
    assert f"2 samples only in {solo.name}" in out and f"1 samples only in {batch.name}" in out
    assert validate_run(run)["errors"] == []
    inspect_log = pytest.importorskip("inspect_ai.log")  # the export keeps the pairs that are not comparable
    assert run_cli(["export", "--format", "inspect", str(run), "-o", str(tmp_path / "m.eval")])[0] == 0
    samples = inspect_log.read_eval_log(str(tmp_path / "m.eval")).samples
    assert len(samples) == n
    gone = sorted(s.metadata["item_id"] for s in samples if not s.metadata["comparable"])
    assert gone == ["0", "1", "5"]
    assert all(s.scores["flip"].explanation == "not comparable: missing" for s in samples
               if s.metadata["item_id"] in gone)



def test_missing_is_its_own_reason_and_only_counted_where_it_occurs():
    from evalhost import analysis as an

    def rec(cond, item, **kw):
        return {"key": f"m/b/t/{cond}/bs1#{item}#r0", "cell": f"m/b/t/{cond}/bs1", "model": "m", "backend": "b",
                "task": "t", "item_id": item, "condition": cond, "dispatcher": cond, "batch_size": 1, "repeat": 0,
                "domain": "capability", "label": "correct", "score": 1.0, "output_text": "x", "finish_reason": "stop",
                "prompt_sha256": "p", "scorer_error": None, **kw}
    placeholder = {"label": None, "score": None, "output_text": None, "finish_reason": "missing",
                   "scorer_error": "missing: sample b is not in F"}
    records = [rec("solo", "a"), rec("batch", "a"), rec("solo", "b"), rec("batch", "b", **placeholder)]
    by_item = {p["item_id"]: p for p in an.pair(records)}
    assert by_item["b"]["not_comparable"] == "missing" and by_item["a"]["comparable"]
    assert an.not_comparable(by_item.values()) == {"error": 0, "unlabelled": 0, "prompt_mismatch": 0, "missing": 1,
                                                   "duplicate": 0}
    assert "missing" not in an.not_comparable([by_item["a"]])  # other runs keep their four keys

def test_a_changed_prompt_is_a_prompt_mismatch_not_a_flip(tmp_path, capsys):
    lines = [json.loads(x) for x in LM_BATCH.read_text().splitlines()]
    lines[0]["arguments"]["gen_args_0"]["arg_0"] += " (edited)"
    batch = tmp_path / "b" / LM_BATCH.name
    batch.parent.mkdir()
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = tmp_path / "run"
    assert run_cli(["import", "--from", "lm-eval", str(LM_SOLO), str(batch), "-o", str(run)])[0] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["overall"]["not_comparable"]["prompt_mismatch"] == 1


def _bad(tmp_path: Path, case: str) -> list[str]:
    d = tmp_path / "in"
    d.mkdir()
    lm = ["--from", "lm-eval", str(LM_SOLO)]
    if case == "one_file":
        return lm
    if case == "three_files":
        return [*lm, str(LM_BATCH), str(LM_BATCH)]
    if case == "evalhost_two_files":
        return [str(LM_SOLO), str(LM_BATCH)]
    if case == "not_json":
        (d / "samples_x_2026-01-01T00-00-00.1.jsonl").write_text('{"doc_id": 0}\nnot json\n')
        return [*lm, str(d / "samples_x_2026-01-01T00-00-00.1.jsonl")]
    if case == "no_doc_id":
        (d / "s.jsonl").write_text('{"exact_match": 1}\n')
        return [*lm, str(d / "s.jsonl")]
    if case == "duplicate_doc":
        text = LM_BATCH.read_text()
        (d / LM_BATCH.name).write_text(text + text)
        return [*lm, str(d / LM_BATCH.name)]
    if case == "other_task":
        shutil.copy(LM_BATCH, d / LM_BATCH.name.replace("evalhost_tinyqa", "other_task"))
        return [*lm, str(d / LM_BATCH.name.replace("evalhost_tinyqa", "other_task"))]
    if case == "unknown_metric":
        return [*lm, str(LM_BATCH), "--metric", "bleu"]
    if case == "metric_for_evalhost":
        return [str(LM_SOLO), "--metric", "acc"]
    if case == "missing_file":
        return [*lm, str(d / "nope.jsonl")]
    if case == "garbage_eval":
        (d / "x.eval").write_bytes(b"not a zip")
        return ["--from", "inspect", str(IN_SOLO), str(d / "x.eval")]
    if case == "inspect_txt":
        (d / "x.txt").write_text("x")
        return ["--from", "inspect", str(IN_SOLO), str(d / "x.txt")]
    if case == "inspect_unknown_scorer":
        return ["--from", "inspect", str(IN_SOLO), str(IN_BATCH), "--metric", "nope"]
    if case == "disjoint":
        (d / LM_BATCH.name).write_text("".join(json.dumps({**json.loads(x), "doc_id": 1000 + i}) + "\n"
                                               for i, x in enumerate(LM_BATCH.read_text().splitlines())))
        return [*lm, str(d / LM_BATCH.name)]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["one_file", "three_files", "evalhost_two_files", "not_json", "no_doc_id",
                                  "duplicate_doc", "other_task", "unknown_metric", "metric_for_evalhost",
                                  "missing_file", "garbage_eval", "inspect_txt", "inspect_unknown_scorer",
                                  "disjoint"])
def test_bad_input_is_one_sentence_exit_2_nothing_written(tmp_path, capsys, case):
    out = tmp_path / "runs" / "r"
    out.parent.mkdir()
    code, _, err = run_cli(["import", *_bad(tmp_path, case), "-o", str(out)])
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert list(out.parent.iterdir()) == []  # no run directory, no temporary directory left


def test_an_existing_run_dir_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep").write_text("mine")
    code, _, err = run_cli(["import", "--from", "inspect", str(IN_SOLO), str(IN_BATCH), "-o", str(run)])
    assert code == 2 and "already exists" in err
    assert [p.name for p in run.iterdir()] == ["keep"]


def test_an_inspect_json_log_pairs_with_an_eval_log(tmp_path, capsys):
    inspect_log = pytest.importorskip("inspect_ai.log")
    as_json = tmp_path / "bs8.json"  # the same log in inspect's JSON format, written by inspect_ai itself
    inspect_log.write_eval_log(inspect_log.read_eval_log(str(IN_BATCH)), str(as_json), format="json")
    run = tmp_path / "run"
    code, out, err = run_cli(["import", "--from", "inspect", str(IN_SOLO), str(as_json), "-o", str(run)])
    assert code == 0, err
    exp = expected(inspect_frame(IN_SOLO), inspect_frame(IN_BATCH))
    check_run(run, exp, out)


def test_without_inspect_ai_the_inspect_import_says_so_exit_2(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "inspect_ai", None)  # import inspect_ai now raises ImportError
    run = tmp_path / "run"
    code, _, err = run_cli(["import", "--from", "inspect", str(IN_SOLO), str(IN_BATCH), "-o", str(run)])
    assert code == 2 and err.count("\n") == 1 and "evalhost[inspect]" in err and not run.exists()
    # lm-eval files need no inspect_ai
    assert run_cli(["import", "--from", "lm-eval", str(LM_SOLO), str(LM_BATCH), "-o", str(run), "--no-report"])[0] == 0
