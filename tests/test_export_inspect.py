"""``evalhost export --format inspect RUN_DIR -o FILE.eval``: inspect_ai's own reader loads the log, one sample per
solo/batch pair with both outputs, labels, flip and stack facts; bad input is one sentence, exit 2."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from evalhost.analysis import pair
from evalhost.records import read_records
from evalhost.testing import run_cli

inspect_log = pytest.importorskip("inspect_ai.log")


ROWS = [  # evalhost's import format: one label flip, one text change without a flip, two identical pairs
    {"row_id": "a", "solo_label": "refuse", "batch_label": "comply", "solo_score": 1.0, "batch_score": 0.0,
     "solo_text": "I cannot help with that.", "batch_text": "Sure, here is how."},
    {"row_id": "b", "solo_label": "comply", "batch_label": "comply", "solo_score": 0.0, "batch_score": 0.0,
     "solo_text": "The answer is 4.", "batch_text": "The answer is four."},
    {"row_id": "c", "solo_label": "refuse", "batch_label": "refuse", "solo_score": 1.0, "batch_score": 1.0,
     "solo_text": "No.", "batch_text": "No."},
    {"row_id": "d", "solo_label": "comply", "batch_label": "comply", "solo_score": 0.0, "batch_score": 0.0,
     "solo_text": "Paris.", "batch_text": "Paris."},
]




@pytest.fixture
def run_dir(tmp_path, capsys) -> Path:
    src = tmp_path / "res.jsonl"
    base = {"mode": "standard", "model": "m1", "task": "jailbreak", "domain": "safety", "dispatcher": "synchronized",
            "batch_size": 8, "phase": "", "original_direction": "", "solo_text_sha256": "", "batch_text_sha256": ""}
    src.write_text("".join(json.dumps({**base, **r}) + "\n" for r in ROWS), encoding="utf-8")
    run = tmp_path / "run"
    code, _, err = run_cli(["import", str(src), "-o", str(run), "--no-report"])
    assert code == 0, err
    return run


@pytest.mark.parametrize("suffix", [".eval", ".json"])
def test_export_is_read_back_by_inspect_ai_one_sample_per_pair(run_dir, tmp_path, capsys, suffix):
    out = tmp_path / f"run{suffix}"
    code, stdout, err = run_cli(["export", "--format", "inspect", str(run_dir), "-o", str(out)])
    assert code == 0, err
    assert "exported 4 solo/batch pairs" in stdout
    log = inspect_log.read_eval_log(str(out))
    recs = read_records(run_dir / "records.jsonl")
    pairs = {p["key"]: p for p in pair(recs)}
    assert log.status == "success" and log.eval.task == "evalhost/res" and log.eval.model == "m1"
    assert sorted(s.metadata["key"] for s in log.samples) == sorted(pairs)
    assert all(re.fullmatch(r"[A-Za-z0-9_.+=-]+", s.id) for s in log.samples)  # no '/' or '#': viewer URLs
    assert len({s.id for s in log.samples}) == len(log.samples)
    by_item = {s.metadata["item_id"]: s for s in log.samples}
    texts = {r["row_id"]: r for r in ROWS}
    for item, s in by_item.items():
        p = pairs[s.metadata["key"]]
        assert s.metadata["solo_text"] == texts[item]["solo_text"]
        assert s.metadata["batch_text"] == texts[item]["batch_text"]
        assert s.output.completion == texts[item]["batch_text"]
        assert [m.text for m in s.messages[1:]] == [texts[item]["solo_text"], texts[item]["batch_text"]]
        assert s.metadata["solo_label"] == texts[item]["solo_label"]
        assert s.metadata["batch_label"] == texts[item]["batch_label"]
        assert s.scores["flip"].value == int(p["flip"]) and s.scores["text_change"].value == int(p["text_change"])
        assert s.scores["flip"].answer == f"{texts[item]['solo_label']} -> {texts[item]['batch_label']}"
        assert s.metadata["comparable"] is True
        # the stack fingerprint: its id and facts, the same as the manifest's
        fid = s.metadata["fingerprint_id"]
        assert fid in log.eval.metadata["evalhost"]["fingerprints"]
        assert s.metadata["stack"]["imported"] is True and s.metadata["stack"]["backend"] == "standard"
    assert by_item["a"].scores["flip"].value == 1 and by_item["a"].metadata["direction"] == "refuse_to_comply"
    assert by_item["b"].scores["flip"].value == 0 and by_item["b"].scores["text_change"].value == 1
    assert by_item["c"].scores["text_change"].value == 0
    flip = {s.name: s for s in log.results.scores}["flip"].metrics
    assert flip["flip_rate"].value == pytest.approx(1 / 4)
    assert flip["flip_ci_lo"].value < 0.25 < flip["flip_ci_hi"].value
    tc = {s.name: s for s in log.results.scores}["text_change"].metrics
    assert tc["text_change_rate"].value == pytest.approx(2 / 4)
    assert log.eval.metadata["evalhost"]["imported"]["source"] == "res.jsonl"


def test_an_existing_output_is_refused_unless_force(run_dir, tmp_path, capsys):
    out = tmp_path / "x.eval"
    out.write_bytes(b"keep me")
    code, _, err = run_cli(["export", "--format", "inspect", str(run_dir), "-o", str(out)])
    assert code == 2 and err.count("\n") == 1 and "exists" in err and "--force" in err and "Traceback" not in err
    assert out.read_bytes() == b"keep me"
    code, _, err = run_cli(["export", "--format", "inspect", str(run_dir), "-o", str(out), "--force"])
    assert code == 0, err
    assert len(inspect_log.read_eval_log(str(out)).samples) == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".x")] == []  # no temp file left


def test_without_inspect_ai_the_export_says_so_exit_2(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "inspect_ai", None)  # import inspect_ai now raises ImportError
    out = tmp_path / "y.eval"
    code, _, err = run_cli(["export", "--format", "inspect", str(run_dir), "-o", str(out)])
    assert code == 2 and err.count("\n") == 1 and "evalhost[inspect]" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("case", ["suffix", "no_dir", "no_records", "no_pairs", "no_folder"])
def test_bad_input_is_one_sentence_exit_2_nothing_written(run_dir, tmp_path, capsys, case):
    out = tmp_path / "z.eval"
    target = run_dir
    if case == "suffix":
        out = tmp_path / "z.txt"
    elif case == "no_dir":
        target = tmp_path / "nope"
    elif case == "no_records":
        target = tmp_path / "empty"
        target.mkdir()
    elif case == "no_pairs":  # only solo records: nothing to pair
        target = tmp_path / "solo_only"
        target.mkdir()
        lines = [x for x in (run_dir / "records.jsonl").read_text().splitlines() if '"condition":"solo"' in x]
        (target / "records.jsonl").write_text("\n".join(lines) + "\n")
    elif case == "no_folder":
        out = tmp_path / "missing" / "z.eval"
    code, _, err = run_cli(["export", "--format", "inspect", str(target), "-o", str(out)])
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
