"""``evalhost import`` of the 55-row file built from the Study D addendum's tables (docs/results/addendum-import/)
reproduces every number the addendum publishes: in the analysis, in summary.json, in report.md and in what
``evalhost import`` prints; the committed run directory is the import of the committed file."""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evalhost.testing import run_cli

from evalhost import analysis as an
from evalhost.cli import main
from evalhost.records import read_records
from evalhost.validate import validate_run

ROOT = Path(__file__).resolve().parents[1]
ADDENDUM = ROOT / "docs" / "results" / "addendum-import"
ADDENDUM_CSV = ADDENDUM / "addendum-study-d.csv"




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
    code, out, err = run_cli(["import", str(ADDENDUM_CSV), "-o", str(tmp_path / "run"), "--flip-on", "score"])
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
    assert manifest["imported"]["sha256"] == hashlib.sha256(ADDENDUM_CSV.read_bytes()).hexdigest()
    assert validate_run(committed)["errors"] == []
    check_addendum_numbers(json.loads((committed / "summary.json").read_text())["study_d"][0])
    check_report_numbers((committed / "report.md").read_text(encoding="utf-8"))


def test_build_rows_script_rebuilds_the_committed_file(tmp_path):
    out = tmp_path / "rebuilt.csv"
    subprocess.run([sys.executable, str(ADDENDUM / "build_rows.py"), str(out)], check=True, capture_output=True)
    assert out.read_bytes() == ADDENDUM_CSV.read_bytes()
