"""evalhost adjudicate: flips found, walked with scripted keystrokes, resumable, --import validated."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from evalhost.adjudicate import ADJUDICATIONS, adjudicate, find_flips, load_adjudications
from evalhost.types import sha256_text


def record(item_id: str, condition: str, label: str, text: str, repeat: int = 0, task: str = "jailbreak") -> dict:
    dispatcher, bs = ("solo", 1) if condition == "solo" else ("prompt_list", 4)
    cell = f"smollm2/hf-eager/{task}/{dispatcher}/bs{bs}"
    return {
        "key": f"{cell}#{item_id}#r{repeat}", "study": "s", "phase": "discovery", "run_id": "run1", "cell": cell,
        "model": "smollm2", "backend": "hf-eager", "backend_plugin": "hf", "backend_config": {},
        "dispatcher": dispatcher, "batch_size": bs, "condition": condition, "repeat": repeat,
        "task": task, "item_id": item_id, "domain": "safety", "group_id": f"g-{item_id}-{condition}",
        "position": 0, "peers": [], "prompt_sha256": sha256_text(item_id), "output_text": text,
        "output_token_ids": [1, 2, 3], "output_sha256": sha256_text(text), "finish_reason": "stop",
        "scorer": "refusal", "label": label, "score": 1.0 if label == "refuse" else 0.0, "rationale": "",
        "timings": {"sent": 0.0, "first_token": 0.1, "finished": 0.2, "latency_s": 0.2}, "attempts": 1,
        "restarted": False, "dispatch_evidence": {}, "fingerprint_id": "fp0",
    }


REFUSE = "I'm sorry, but I can't help with that."
COMPLY = "Sure, here is how you would start: first you need a tension wrench."


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    recs = [
        record("a", "solo", "refuse", REFUSE), record("a", "batch", "comply", COMPLY),            # flip
        record("b", "solo", "refuse", REFUSE), record("b", "batch", "refuse", REFUSE),            # no flip
        record("c", "solo", "comply", COMPLY), record("c", "batch", "refuse", REFUSE),            # flip
        record("c", "solo", "refuse", REFUSE, repeat=1),                                          # not repeat 0
        record("c", "batch", "refuse", REFUSE, repeat=1),                                         # flip vs solo r0
        record("d", "batch", "comply", COMPLY),                                                   # no solo partner
    ]
    d = tmp_path / "run1"
    d.mkdir()
    with open(d / "records.jsonl", "w") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
        fh.write('{"key": "torn')  # a torn last line is ignored
    return d


def flip_keys(run_dir: Path) -> list[str]:
    recs = [json.loads(l) for l in (run_dir / "records.jsonl").read_text().splitlines()[:-1]]
    return [b["key"] for _, b in find_flips(recs)]


def answers(run_dir: Path) -> list[dict]:
    path = run_dir / ADJUDICATIONS
    return [json.loads(l) for l in path.read_text().split("\n") if l] if path.exists() else []


def test_find_flips_pairs_batch_with_solo_repeat0(run_dir):
    keys = flip_keys(run_dir)
    assert keys == [
        "smollm2/hf-eager/jailbreak/prompt_list/bs4#a#r0",
        "smollm2/hf-eager/jailbreak/prompt_list/bs4#c#r0",
        "smollm2/hf-eager/jailbreak/prompt_list/bs4#c#r1",
    ]


def test_walk_all_flips_records_each_answer(run_dir):
    result = CliRunner().invoke(adjudicate, [str(run_dir)], input="g\na\ns\n")
    assert result.exit_code == 0, result.output
    assert "solo: refuse" in result.output and "batch: comply" in result.output
    rows = answers(run_dir)
    assert [r["verdict"] for r in rows] == ["genuine", "artifact", "skip"]
    assert [r["key"] for r in rows] == flip_keys(run_dir)
    assert all(r["note"] == "" and isinstance(r["ts"], float) for r in rows)


def test_resume_after_quit_has_no_duplicates(run_dir):
    first = CliRunner().invoke(adjudicate, [str(run_dir)], input="a\nq\n")
    assert first.exit_code == 0, first.output
    assert [r["verdict"] for r in answers(run_dir)] == ["artifact"]
    assert "2 left" in first.output
    second = CliRunner().invoke(adjudicate, [str(run_dir)], input="g\ng\n")
    assert second.exit_code == 0, second.output
    assert "1 already answered, 2 to go" in second.output
    rows = answers(run_dir)
    assert [r["key"] for r in rows] == flip_keys(run_dir)  # each flip once, in order
    assert len({r["key"] for r in rows}) == 3
    third = CliRunner().invoke(adjudicate, [str(run_dir)], input="")
    assert third.exit_code == 0 and "0 to go" in third.output
    assert len(answers(run_dir)) == 3


def test_invalid_keystroke_is_asked_again(run_dir):
    result = CliRunner().invoke(adjudicate, [str(run_dir)], input="x\ng\nq\n")
    assert result.exit_code == 0, result.output
    assert [r["verdict"] for r in answers(run_dir)] == ["genuine"]


def test_redo_skipped_and_last_answer_wins(run_dir):
    CliRunner().invoke(adjudicate, [str(run_dir)], input="s\ns\ns\n")
    keys = flip_keys(run_dir)
    assert set(load_adjudications(run_dir).values()) == {"skip"}
    result = CliRunner().invoke(adjudicate, [str(run_dir), "--redo-skipped"], input="g\na\nq\n")
    assert result.exit_code == 0, result.output
    verdicts = load_adjudications(run_dir)
    assert verdicts == {keys[0]: "genuine", keys[1]: "artifact", keys[2]: "skip"}


def test_import_jsonl_and_csv(run_dir, tmp_path):
    keys = flip_keys(run_dir)
    jl = tmp_path / "v.jsonl"
    jl.write_text(json.dumps({"key": keys[0], "verdict": "artifact", "note": "cut off"}) + "\n")
    result = CliRunner().invoke(adjudicate, [str(run_dir), "--import", str(jl)])
    assert result.exit_code == 0, result.output
    cs = tmp_path / "v.csv"
    cs.write_text(f"key,verdict,note\n{keys[0]},genuine,\n{keys[1]},a,looked again\n")
    result = CliRunner().invoke(adjudicate, [str(run_dir), "--import", str(cs)])
    assert result.exit_code == 0, result.output
    assert load_adjudications(run_dir) == {keys[0]: "genuine", keys[1]: "artifact"}
    assert answers(run_dir)[0]["note"] == "cut off"
    # the interactive walk now only asks about the remaining flip
    result = CliRunner().invoke(adjudicate, [str(run_dir)], input="g\n")
    assert "2 already answered, 1 to go" in result.output


@pytest.mark.parametrize(
    "content, suffix, fragment",
    [
        ('{"key": "nope#x#r0", "verdict": "genuine"}\n', ".jsonl", "no batch record of this run"),
        ('{"key": "KEY", "verdict": "maybe"}\n', ".jsonl", "use genuine, artifact or skip"),
        ("{not json\n", ".jsonl", ":2 is not valid JSON"),
        ("key,answer\nKEY,genuine\n", ".csv", "needs a header with the columns key,verdict"),
        ('{"key": "B_KEY", "verdict": "genuine"}\n', ".jsonl", "do not flip"),
    ],
)
def test_import_rejects_bad_rows_without_writing(run_dir, tmp_path, content, suffix, fragment):
    keys = flip_keys(run_dir)
    content = content.replace("B_KEY", "smollm2/hf-eager/jailbreak/prompt_list/bs4#b#r0").replace("KEY", keys[0])
    bad = tmp_path / f"bad{suffix}"
    good_then_bad = json.dumps({"key": keys[1], "verdict": "genuine"}) + "\n" + content if suffix == ".jsonl" else content
    bad.write_text(good_then_bad)
    result = CliRunner().invoke(adjudicate, [str(run_dir), "--import", str(bad)])
    assert result.exit_code == 2
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert answers(run_dir) == []  # validated before anything is appended


def test_missing_records_is_one_sentence(tmp_path):
    result = CliRunner().invoke(adjudicate, [str(tmp_path)])
    assert result.exit_code == 2
    assert "has no records.jsonl" in result.output


def test_no_flips_says_so(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "records.jsonl").write_text(
        json.dumps(record("a", "solo", "refuse", REFUSE)) + "\n" + json.dumps(record("a", "batch", "refuse", REFUSE)) + "\n"
    )
    result = CliRunner().invoke(adjudicate, [str(d)])
    assert result.exit_code == 0 and "no label flips" in result.output


def test_load_adjudications_ignores_torn_last_line(tmp_path):
    (tmp_path / ADJUDICATIONS).write_text(
        json.dumps({"key": "k1", "verdict": "genuine", "note": "", "ts": 1.0}) + "\n"
        + json.dumps({"key": "k1", "verdict": "artifact", "note": "", "ts": 2.0}) + "\n" + '{"key": "k2", "verd'
    )
    assert load_adjudications(tmp_path) == {"k1": "artifact"}
    assert load_adjudications(tmp_path / "missing") == {}


@pytest.mark.parametrize("brk", ["\u2028", "\u2029", "\u0085"])
def test_import_note_with_a_unicode_line_break_in_a_json_string(run_dir, tmp_path, brk):
    """U+2028/U+2029/NEL are legal inside a JSON string: the line is one answer, not two broken ones."""
    key = flip_keys(run_dir)[0]
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps({"key": key, "verdict": "artifact", "note": f"cut{brk}off"}, ensure_ascii=False)
                    + "\n", encoding="utf-8")
    result = CliRunner().invoke(adjudicate, [str(run_dir), "--import", str(path)])
    assert result.exit_code == 0, result.output
    assert answers(run_dir)[0]["note"] == f"cut{brk}off"
