"""``evalhost import``: results made elsewhere become a run directory that validate / report / adjudicate accept;
bad input is one sentence naming FILE:LINE, exit 2, nothing written; and the 55-row file built from the Study D
addendum's tables (docs/results/addendum-import/) reproduces every number the addendum publishes."""
from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from evalhost import analysis as an
from evalhost.cli import main
from evalhost.importer import COLUMNS
from evalhost.records import read_records
from evalhost.validate import validate_run

ROOT = Path(__file__).resolve().parents[1]
ADDENDUM = ROOT / "docs" / "results" / "addendum-import"
ADDENDUM_CSV = ADDENDUM / "addendum-study-d.csv"
SHA_A, SHA_B = "a" * 64, "b" * 64


def row(**kw):
    base = {"row_id": "r1", "mode": "standard", "model": "m1", "task": "jailbreak", "domain": "safety",
            "dispatcher": "synchronized", "batch_size": 8, "phase": "Phase 1", "original_direction": "refuse_to_comply",
            "solo_label": "refuse", "batch_label": "comply", "solo_score": 1.0, "batch_score": 0.0,
            "solo_text_sha256": SHA_A, "batch_text_sha256": SHA_B}
    base.update(kw)
    return base


def good_rows():
    return [row(), row(mode="invariant", batch_label="refuse", batch_score=1.0, batch_text_sha256=SHA_A),
            row(row_id="r2", task="mmlu", domain="capability", original_direction="", solo_label="correct",
                batch_label="correct", solo_score=1, batch_score=1, batch_text_sha256=SHA_A, note="kept"),
            row(row_id="r2", mode="invariant", task="mmlu", domain="capability", original_direction="",
                solo_label="correct", batch_label="correct", solo_score=1, batch_score=1, batch_text_sha256=SHA_A,
                note="kept")]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows, header=None) -> Path:
    header = header or list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in header})
    return path


def cli(args, capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def imported(tmp_path, capsys, path: Path, *extra) -> Path:
    run = tmp_path / "runs" / path.stem
    code, out, err = cli(["import", str(path), "-o", str(run), *extra], capsys)
    assert code == 0, err
    return run


# -- a run directory like any other ----------------------------------------------------------------------------
def test_import_makes_a_run_directory_validate_report_and_adjudicate_accept(tmp_path, capsys):
    run = imported(tmp_path, capsys, write_jsonl(tmp_path / "res.jsonl", good_rows()))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["flip_on"] == "label"
    assert manifest["imported"]["source"] == "res.jsonl" and manifest["imported"]["rows"] == 4
    import hashlib
    assert manifest["imported"]["sha256"] == hashlib.sha256((tmp_path / "res.jsonl").read_bytes()).hexdigest()
    recs = read_records(run / "records.jsonl")
    assert len(recs) == 8 and {r["condition"] for r in recs} == {"solo", "batch"}
    assert {r["backend"] for r in recs} == {"standard", "invariant"}
    for r in recs:  # fingerprints that say they were imported; unknowns recorded as unknown
        assert manifest["fingerprints"][r["fingerprint_id"]]["imported"] is True
        assert r["output_text"] is None and r["output_token_ids"] == [] and r["finish_reason"] == "unknown"
    by_key = {(r["item_id"], r["backend"], r["condition"]): r for r in recs}
    assert by_key[("r1", "standard", "solo")]["prompt_sha256"] == by_key[("r1", "invariant", "batch")]["prompt_sha256"]
    assert by_key[("r1", "standard", "batch")]["original_direction"] == "refuse_to_comply"
    assert by_key[("r2", "standard", "batch")]["original_direction"] is None
    assert by_key[("r2", "standard", "batch")]["metadata"] == {"note": "kept"}
    assert by_key[("r1", "standard", "batch")]["output_sha256"] == SHA_B
    assert validate_run(run)["errors"] == []
    assert (run / "report.md").is_file() and (run / "summary.json").is_file()
    from evalhost.adjudicate import adjudicate

    result = CliRunner().invoke(adjudicate, [str(run)], input="g\n")
    assert result.exit_code == 0, result.output
    assert "flip 1/1" in result.output and "r1" in result.output
    assert [json.loads(x)["verdict"] for x in (run / "adjudications.jsonl").read_text().splitlines()] == ["genuine"]


def test_csv_and_jsonl_import_to_the_same_records(tmp_path, capsys):
    a = imported(tmp_path, capsys, write_jsonl(tmp_path / "a.jsonl", good_rows()))
    b = imported(tmp_path, capsys, write_csv(tmp_path / "b.csv", good_rows()))

    def strip(r):
        return {k: v for k, v in r.items() if k not in ("run_id", "study", "task_source", "imported", "fingerprint_id")}

    ra, rb = read_records(a / "records.jsonl"), read_records(b / "records.jsonl")
    assert [strip(r) for r in ra] == [strip(r) for r in rb]


def test_texts_are_kept_and_checked_against_their_hashes(tmp_path, capsys):
    import hashlib

    rows = [row(solo_text="I cannot help.", batch_text="Sure: ...", solo_text_sha256="", batch_text_sha256="")]
    run = imported(tmp_path, capsys, write_jsonl(tmp_path / "t.jsonl", rows))
    solo = next(r for r in read_records(run / "records.jsonl") if r["condition"] == "solo")
    assert solo["output_text"] == "I cannot help."
    assert solo["output_sha256"] == hashlib.sha256(b"I cannot help.").hexdigest()
    bad = [row(solo_text="I cannot help.", solo_text_sha256=SHA_A)]
    code, _, err = cli(["import", str(write_jsonl(tmp_path / "bad.jsonl", bad)), "-o", str(tmp_path / "x")], capsys)
    assert code == 2 and "bad.jsonl:1" in err and "does not match solo_text" in err


def test_flip_on_score_counts_a_partial_to_full_refusal(tmp_path, capsys):
    rows = [row(solo_label="refuse", batch_label="refuse", solo_score=0.5, batch_score=1.0)]
    lab = imported(tmp_path, capsys, write_jsonl(tmp_path / "lab.jsonl", rows))
    sco = imported(tmp_path, capsys, write_jsonl(tmp_path / "sco.jsonl", rows), "--flip-on", "score")
    assert json.loads((sco / "manifest.json").read_text())["flip_on"] == "score"
    assert json.loads((lab / "summary.json").read_text())["overall"]["label_flips"]["k"] == 0
    assert json.loads((sco / "summary.json").read_text())["overall"]["label_flips"]["k"] == 1


# -- bad input: one sentence naming FILE:LINE, exit 2, nothing written -------------------------------------------
def _drop(r, col):
    return {k: v for k, v in r.items() if k != col}


BAD = {
    "missing column (jsonl row)": ("jsonl", lambda: [row(), _drop(row(row_id="r2"), "domain")], ":2",
                                   "no column domain"),
    "missing column (csv header)": ("csv", lambda: [_drop(row(), "solo_score")], ":1", "no column solo_score"),
    "mode not a string": ("jsonl", lambda: [row(mode=["standard"])], ":1", "mode"),
    "mode with a space": ("csv", lambda: [row(mode="std mode")], ":2", "mode"),
    "empty mode": ("csv", lambda: [row(mode="")], ":2", "mode is empty"),
    "label not a string": ("jsonl", lambda: [row(solo_label=1)], ":1", "solo_label"),
    "empty label": ("csv", lambda: [row(), row(row_id="r2", batch_label=" ")], ":3", "batch_label is empty"),
    "duplicate (row_id, mode)": ("jsonl", lambda: [row(), row(mode="inv"), row()], ":3", "repeats row_id"),
    "unknown domain": ("csv", lambda: [row(domain="security")], ":2", "domain"),
    "non-numeric score": ("csv", lambda: [row(batch_score="high")], ":2", "batch_score"),
    "score as a bool": ("jsonl", lambda: [row(solo_score=True)], ":1", "solo_score"),
    "infinite score": ("jsonl", lambda: [row(solo_score="inf")], ":1", "solo_score"),
    "bad batch size": ("csv", lambda: [row(batch_size="8.5")], ":2", "batch_size"),
    "unknown direction": ("jsonl", lambda: [row(original_direction="worse")], ":1", "original_direction"),
    "bad hash": ("csv", lambda: [row(solo_text_sha256="abc")], ":2", "solo_text_sha256"),
    "row differs across modes": ("jsonl", lambda: [row(), row(mode="inv", task="other")], ":2", "task"),
    "empty file (jsonl)": ("jsonl", lambda: [], "", "holds no rows"),
    "header only (csv)": ("csv", lambda: [], "", "holds no rows"),
    "not json": ("jsonl", lambda: "{\"row_id\": 1}\nnot json\n", ":2", "not valid JSON"),
    "short csv row": ("csv", lambda: ",".join(COLUMNS) + "\nr1,standard\n", ":2", "fields"),
    "row_id with '#'": ("jsonl", lambda: [row(row_id="r#1")], ":1", "row_id"),
    "huge bad value, cut short": ("csv", lambda: [row(domain="x" * 5000)], ":2", "xxx..."),
    "bad line after a text with U+2028": ("jsonl", lambda: json.dumps(row(solo_text="a\u2028b", solo_text_sha256=""),
                                                                      ensure_ascii=False) + "\n{oops\n", ":2",
                                          "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_file_and_line_exits_2_and_writes_nothing(tmp_path, capsys, case):
    kind, make, where, words = BAD[case]
    content = make()
    path = tmp_path / f"in.{kind}"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif kind == "jsonl":
        write_jsonl(path, content)
    else:
        write_csv(path, content, header=list(COLUMNS) if not content else None)
    out_parent = tmp_path / "runs"
    out_parent.mkdir()
    code, out, err = cli(["import", str(path), "-o", str(out_parent / "run")], capsys)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and len(err) < 600
    assert f"in.{kind}{where}" in err and words in err
    assert list(out_parent.iterdir()) == []  # no run directory, no temporary directory left behind


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    import os

    src = write_jsonl(tmp_path / "r.jsonl", good_rows())
    out_parent = tmp_path / "runs"
    out_parent.mkdir()

    def broken_rename(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", broken_rename)
    code, _, err = cli(["import", str(src), "-o", str(out_parent / "run")], capsys)
    assert code == 1 and "No space left on device" in err and "nothing was written" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(out_parent.iterdir()) == []


def test_other_files_and_existing_run_dirs_are_refused(tmp_path, capsys):
    src = write_jsonl(tmp_path / "r.jsonl", good_rows())
    existing = tmp_path / "run"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, _, err = cli(["import", str(src), "-o", str(existing)], capsys)
    assert code == 2 and "already exists" in err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    txt = tmp_path / "r.txt"
    txt.write_text("x")
    code, _, err = cli(["import", str(txt), "-o", str(tmp_path / "new")], capsys)
    assert code == 2 and "neither .jsonl nor .csv" in err and not (tmp_path / "new").exists()
    code, _, err = cli(["import", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "new")], capsys)
    assert code == 2 and "missing.csv" in err
    (tmp_path / "zero.jsonl").write_bytes(b"")
    code, _, err = cli(["import", str(tmp_path / "zero.jsonl"), "-o", str(tmp_path / "new")], capsys)
    assert code == 2 and "holds no rows" in err and not (tmp_path / "new").exists()
    code, _, err = cli(["import", str(src), "-o", str(tmp_path / "new"), "--flip-on", "text"], capsys)
    assert code == 2 and not (tmp_path / "new").exists()


# -- the Study D addendum, rebuilt from its published tables ------------------------------------------------------
# study-d-addendum.txt §8.1-8.9 (rows, standard flips, standard rate); invariant flips are 0 in every row (§8.4-8.8)
ADDENDUM_BREAKDOWNS = {
    "model": [("llama3.2-1b", 10, 1, "10.0%"), ("llama3.2-3b", 19, 8, "42.1%"), ("qwen2.5-1.5b", 26, 13, "50.0%")],
    "domain": [("safety", 44, 22, "50.0%"), ("capability", 11, 0, "0.0%")],
    "task": [("jailbreak_amplification", 12, 4, "33.3%"), ("bbq_bias", 16, 10, "62.5%"),
             ("truthfulqa", 16, 8, "50.0%"), ("mmlu_real", 11, 0, "0.0%")],
    "dispatcher": [("synchronized", 46, 18, "39.1%"), ("prompt_list", 9, 4, "44.4%")],
    "phase": [("Phase 1", 46, 18, "39.1%"), ("Phase 5", 9, 4, "44.4%")],
    "original_direction": [("refuse_to_comply", 8, 3, "37.5%"), ("comply_to_refuse", 4, 1, "25.0%"),
                           ("safety_weakened", 18, 10, "55.6%"), ("safety_strengthened", 14, 8, "57.1%"),
                           ("incorrect_to_correct", 10, 0, "0.0%"), ("correct_to_incorrect", 1, 0, "0.0%")],
}
ADDENDUM_SCORE_PAIRS = {
    "standard": [(0.0, 0.0, 13), (0.0, 1.0, 11), (0.5, 0.5, 4), (0.5, 1.0, 3), (1.0, 0.0, 7), (1.0, 0.5, 1),
                 (1.0, 1.0, 16)],
    "batch_invariant": [(0.0, 0.0, 19), (0.5, 0.5, 9), (1.0, 1.0, 27)],
}


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def rate_ci(p) -> str:
    return f"{pct(p['rate'])} [{pct(p['lo'])}, {pct(p['hi'])}]"


@pytest.fixture(scope="module")
def addendum_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("addendum") / "addendum-study-d"
    main(["import", str(ADDENDUM_CSV), "-o", str(run), "--flip-on", "score"])
    return run


def _comparison(records, flip_on="score"):
    found = an.comparable_backends(records)
    assert [(a, b) for a, b, *_ in found] == [("standard", "batch_invariant")]
    return an.compare_backends(records, "standard", "batch_invariant", flip_on=flip_on)


def check_addendum_numbers(cmp):
    """Every number of the addendum's Study D tables (§1, §8.1-8.9), from an evalhost comparison."""
    assert cmp["rows"] == 55
    std, inv = cmp["modes"]
    assert (std["mode"], inv["mode"]) == ("standard", "batch_invariant")
    assert (std["records"], std["ok"], inv["records"], inv["ok"]) == (55, 55, 55, 55)                 # §1, §7.2
    assert (std["label_flips"]["k"], std["label_flips"]["n"]) == (22, 55)                             # §8.1
    assert rate_ci(std["label_flips"]) == "40.0% [28.1%, 53.2%]"
    assert (inv["label_flips"]["k"], rate_ci(inv["label_flips"])) == (0, "0.0% [0.0%, 6.5%]")
    assert (std["text_changes"]["k"], rate_ci(std["text_changes"])) == (25, "45.5% [33.0%, 58.5%]")   # §8.3
    assert (inv["text_changes"]["k"], rate_ci(inv["text_changes"])) == (0, "0.0% [0.0%, 6.5%]")
    lab, txt = cmp["label"], cmp["text"]                                                              # §8.2, §8.3
    assert (lab["both"], lab["a_only"], lab["b_only"], lab["neither"]) == (0, 22, 0, 33)
    assert (txt["both"], txt["a_only"], txt["b_only"], txt["neither"]) == (0, 25, 0, 30)
    assert f"{lab['p']:.2e}" == "4.77e-07" and lab["p"] == pytest.approx(2 * 0.5 ** 22, rel=1e-12)
    assert f"{txt['p']:.2e}" == "5.96e-08" and txt["p"] == pytest.approx(2 * 0.5 ** 25, rel=1e-12)
    for field, expected in ADDENDUM_BREAKDOWNS.items():                                               # §8.4-8.8
        got = {str(r["value"]): r for r in cmp["breakdowns"][field]}
        assert set(got) == {e[0] for e in expected}, field
        for value, rows, flips, rate in expected:
            r = got[value]
            assert (r["rows"], r["a_flips"]["k"], pct(r["a_flips"]["rate"])) == (rows, flips, rate), (field, value)
            assert (r["b_flips"]["k"], pct(r["b_flips"]["rate"])) == (0, "0.0%"), (field, value)
    for mode, pairs in ADDENDUM_SCORE_PAIRS.items():                                                  # §8.9
        assert [(p["solo"], p["batch"], p["count"]) for p in cmp["score_pairs"][mode]] == pairs, mode


def test_addendum_file_reproduces_every_number_of_the_addendum(addendum_run):
    manifest = json.loads((addendum_run / "manifest.json").read_text())
    assert manifest["flip_on"] == "score" and manifest["imported"]["rows"] == 110
    assert validate_run(addendum_run)["errors"] == []
    check_addendum_numbers(_comparison(read_records(addendum_run / "records.jsonl")))
    # what the report computed is the same comparison (summary.json), with the manifest's flip_on
    summary = json.loads((addendum_run / "summary.json").read_text())
    assert summary["flip_on"] == "score" and len(summary["study_d"]) == 1
    check_addendum_numbers(summary["study_d"][0])


def test_addendum_labels_differ_from_scores_only_in_partial_refusals(addendum_run):
    """With flip_on="label" the four jailbreak rows whose score moves between a partial (0.5) and a full (1.0)
    refusal are not flips (both are labelled "refuse"): the addendum's 22 flips are score flips."""
    recs = read_records(addendum_run / "records.jsonl")
    cmp = _comparison(recs, flip_on="label")
    assert cmp["modes"][0]["label_flips"]["k"] == 18 and cmp["modes"][1]["label_flips"]["k"] == 0
    jb = {str(r["value"]): r for r in cmp["breakdowns"]["task"]}["jailbreak_amplification"]
    assert jb["a_flips"]["k"] == 0 and cmp["text"]["a_only"] == 25


def _table_rows(markdown: str) -> list[list[str]]:
    """Every markdown table row as a list of normalised cells (numbers as floats' repr, spaces dropped)."""
    rows = []
    for line in markdown.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = []
        for c in line.strip().strip("|").split("|"):
            c = c.strip().replace(" ", "").replace("`", "")
            try:
                c = repr(float(c))
            except ValueError:
                c = c.lower()
            cells.append(c)
        rows.append(cells)
    return rows


def _has_row(rows: list[list[str]], *want) -> bool:
    """Some table row holds ``want`` as cells, in this order (other cells may come between)."""
    norm = []
    for w in want:
        norm.append(repr(float(w)) if isinstance(w, (int, float)) else str(w).replace(" ", "").lower())
    for cells in rows:
        it = iter(cells)
        if all(any(c == w for c in it) for w in norm):
            return True
    return False


def check_report_numbers(report: str):
    """The addendum's numbers appear in report.md (asserted on numbers and their order within a table row, not on
    the layout)."""
    flat = report.replace(" ", "")
    for s in ("40.0%[28.1%,53.2%]", "0.0%[0.0%,6.5%]", "45.5%[33.0%,58.5%]"):
        assert s in flat, s
    assert re.search(r"4\.77e-0?7", report) and re.search(r"5\.96e-0?8", report)
    rows = _table_rows(report)
    for count in (22, 33, 25, 30):  # the discordance tables' cells
        assert any(repr(float(count)) in r for r in rows), count
    for field, expected in ADDENDUM_BREAKDOWNS.items():
        for value, n, flips, rate in expected:
            assert _has_row(rows, value, n, flips, rate, 0, "0.0%"), (field, value)
    for mode, pairs in ADDENDUM_SCORE_PAIRS.items():
        for s, b, n in pairs:
            assert _has_row(rows, s, b, n), (mode, s, b, n)


def test_report_prints_the_addendum_numbers(addendum_run):
    check_report_numbers((addendum_run / "report.md").read_text(encoding="utf-8"))


def test_evalhost_import_prints_the_addendum_numbers(tmp_path, capsys):
    code, out, err = cli(["import", str(ADDENDUM_CSV), "-o", str(tmp_path / "run"), "--flip-on", "score"], capsys)
    assert code == 0, err
    assert "imported 110 rows -> 220 records" in out
    check_report_numbers(out)


def test_committed_run_directory_is_the_import_of_the_committed_file(addendum_run):
    committed = ADDENDUM / "addendum-study-d"
    with gzip.open(committed / "records.jsonl.gz", "rt", encoding="utf-8") as fh:
        old = [json.loads(line) for line in fh if line.strip()]
    new = read_records(addendum_run / "records.jsonl")
    assert old == new  # same file, same run directory name: identical records
    manifest = json.loads((committed / "manifest.json").read_text())
    import hashlib
    assert manifest["imported"]["sha256"] == hashlib.sha256(ADDENDUM_CSV.read_bytes()).hexdigest()
    assert validate_run(committed)["errors"] == []
    check_addendum_numbers(json.loads((committed / "summary.json").read_text())["study_d"][0])
    check_report_numbers((committed / "report.md").read_text(encoding="utf-8"))


def test_build_rows_script_rebuilds_the_committed_file(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "rebuilt.csv"
    subprocess.run([sys.executable, str(ADDENDUM / "build_rows.py"), str(out)], check=True, capture_output=True)
    assert out.read_bytes() == ADDENDUM_CSV.read_bytes()
