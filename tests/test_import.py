"""``evalhost import``: results made elsewhere become a run directory that validate / report / adjudicate accept;
bad input is one sentence naming FILE:LINE, exit 2, nothing written. (The Study D addendum's file:
tests/test_import_addendum.py.)"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from evalhost.testing import run_cli
from click.testing import CliRunner

from evalhost.importer import COLUMNS
from evalhost.records import read_records
from evalhost.validate import validate_run

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




def imported(tmp_path, capsys, path: Path, *extra) -> Path:
    run = tmp_path / "runs" / path.stem
    code, out, err = run_cli(["import", str(path), "-o", str(run), *extra])
    assert code == 0, err
    return run


# -- a run directory like any other ----------------------------------------------------------------------------
def test_import_makes_a_run_directory_validate_report_and_adjudicate_accept(tmp_path, capsys):
    run = imported(tmp_path, capsys, write_jsonl(tmp_path / "res.jsonl", good_rows()))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["flip_on"] == "label"
    assert manifest["imported"]["source"] == "res.jsonl" and manifest["imported"]["rows"] == 4
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
    rows = [row(solo_text="I cannot help.", batch_text="Sure: ...", solo_text_sha256="", batch_text_sha256="")]
    run = imported(tmp_path, capsys, write_jsonl(tmp_path / "t.jsonl", rows))
    solo = next(r for r in read_records(run / "records.jsonl") if r["condition"] == "solo")
    assert solo["output_text"] == "I cannot help."
    assert solo["output_sha256"] == hashlib.sha256(b"I cannot help.").hexdigest()
    bad = [row(solo_text="I cannot help.", solo_text_sha256=SHA_A)]
    code, _, err = run_cli(["import", str(write_jsonl(tmp_path / "bad.jsonl", bad)), "-o", str(tmp_path / "x")])
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
    code, out, err = run_cli(["import", str(path), "-o", str(out_parent / "run")])
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
    code, _, err = run_cli(["import", str(src), "-o", str(out_parent / "run")])
    assert code == 1 and "No space left on device" in err and "nothing was written" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(out_parent.iterdir()) == []


def test_other_files_and_existing_run_dirs_are_refused(tmp_path, capsys):
    src = write_jsonl(tmp_path / "r.jsonl", good_rows())
    existing = tmp_path / "run"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, _, err = run_cli(["import", str(src), "-o", str(existing)])
    assert code == 2 and "already exists" in err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    txt = tmp_path / "r.txt"
    txt.write_text("x")
    code, _, err = run_cli(["import", str(txt), "-o", str(tmp_path / "new")])
    assert code == 2 and "neither .jsonl nor .csv" in err and not (tmp_path / "new").exists()
    code, _, err = run_cli(["import", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "new")])
    assert code == 2 and "missing.csv" in err
    (tmp_path / "zero.jsonl").write_bytes(b"")
    code, _, err = run_cli(["import", str(tmp_path / "zero.jsonl"), "-o", str(tmp_path / "new")])
    assert code == 2 and "holds no rows" in err and not (tmp_path / "new").exists()
    code, _, err = run_cli(["import", str(src), "-o", str(tmp_path / "new"), "--flip-on", "text"])
    assert code == 2 and not (tmp_path / "new").exists()

