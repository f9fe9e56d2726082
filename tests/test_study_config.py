"""Study TOML validation: each bad config gives one sentence naming the key; the CLI exits 2 without a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from evalhost.errors import UserError
from evalhost.plan import build_plan
from evalhost.registry import build_registry
from evalhost.study import parse_study

GOOD = """
[study]
name = "s"
seed = 1

[sampling]
temperature = 0.0
max_tokens = 32

[[models]]
name = "m"
path = "builtin:smollm2-135m-instruct"

[[backends]]
name = "hf"

[[dispatchers]]
name = "prompt_list"
batch_sizes = [4]

[[tasks]]
name = "bench"
source = "builtin:benign"
limit = 8
"""


def edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


BAD = [
    (edit('seed = 1', 'sed = 1'), "unknown key 'study.sed' (did you mean 'study.seed'?)"),
    (edit('limit = 8', 'limt = 8'), "unknown key 'tasks[0].limt' (did you mean 'tasks[0].limit'?)"),
    (edit('[sampling]', '[sampeling]'), "unknown top-level key 'sampeling' (did you mean 'sampling'?)"),
    (edit('max_tokens = 32', 'max_tokens = "32"'), "'sampling.max_tokens' must be an integer, got str '32'"),
    (edit('max_tokens = 32', 'max_tokens = 0'), "'sampling.max_tokens' must be between 1 and 131072 (got 0)"),
    (edit('max_tokens = 32', 'max_tokens = 99999999'), "'sampling.max_tokens' must be between 1 and 131072"),
    (edit('temperature = 0.0', 'temperature = -1.0'), "'sampling.temperature' must be a finite number, not negative (got -1.0)"),
    (edit('batch_sizes = [4]', 'batch_sizes = [-2]'), "'dispatchers[0].batch_sizes' must hold integers between 1"),
    (edit('batch_sizes = [4]', 'batch_sizes = []'), "'dispatchers[0].batch_sizes' must list at least one batch size"),
    (edit('batch_sizes = [4]', 'batch_sizes = 4'), "'dispatchers[0].batch_sizes' must be a list, got int 4"),
    (edit('name = "s"\n', ''), "missing required key 'study.name'"),
    (GOOD.split("[[tasks]]")[0], "missing required section 'tasks'; add a [[tasks]] section"),
    (edit('limit = 8', 'limit = 8\ndomain = "safty"'), "'tasks[0].domain' must be one of safety, capability"),
    (edit('path = "builtin:smollm2-135m-instruct"', 'path = "m"\ndtype = "fp16"'),
     "'models[0].dtype' must be one of auto, float32, float16, bfloat16 (got 'fp16')"),
    (GOOD + '\n[[tasks]]\nname = "bench"\nsource = "builtin:benign"\n', "two tasks are named 'bench'"),
    (edit('name = "prompt_list"', 'name = "solo"'), "'dispatchers[0]' is 'solo', which every study runs already"),
    (edit('[study]', '[study]\nrepeats = 0'), "'study.repeats' must be at least 1 (got 0)"),
    (edit('seed = 1', 'seed = = 1'), "is not valid TOML"),
    (edit('top_p', 'top_p') if 'top_p' in GOOD else edit('temperature = 0.0', 'top_p = 1.5'),
     "'sampling.top_p' must be in (0, 1] (got 1.5)"),
    (edit('[[backends]]\nname = "hf"', '[[backends]]\nname = "hf"\n[backends.matrix]\nattention_backend = "X"'),
     "'backends[0].matrix.attention_backend' must be a non-empty list of option values"),
    ("study = 3\n", "'study' must be a table"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_config_message(text, message):
    with pytest.raises(UserError) as err:
        parse_study(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value).strip()


PLAN_BAD = [
    (edit('name = "hf"', 'name = "hff"'), "unknown backend 'hff' (did you mean 'hf'?)"),
    (edit('name = "prompt_list"', 'name = "promptlist"'), "unknown dispatcher 'promptlist' (did you mean 'prompt_list'?)"),
    (edit('name = "prompt_list"', 'name = "synchronized"'),
     "dispatcher 'synchronized' needs concurrent, which backend 'hf' (hf) cannot do"),
    (edit('source = "builtin:benign"', 'source = "builtin:no_such_set"'), "no_such_set"),
    (edit('source = "builtin:benign"', 'source = "jsonl:/nonexistent/x.jsonl"'), "/nonexistent/x.jsonl"),
    (edit('source = "builtin:benign"', 'source = "bogus:thing"'), "unknown task source 'bogus'"),
    (edit('limit = 8', 'limit = 8\nscorer = "refusl"'), "unknown scorer 'refusl' (did you mean 'refusal'?)"),
]


@pytest.mark.parametrize("text,message", PLAN_BAD, ids=[m[:40] for _, m in PLAN_BAD])
def test_bad_plugin_names_at_plan_time(text, message):
    with pytest.raises(UserError) as err:
        build_plan(parse_study(text), build_registry(entry_points=False))
    assert message in str(err.value)


def test_good_config_plans_solo_and_batch_cells():
    plan = build_plan(parse_study(GOOD), build_registry(entry_points=False))
    cells = plan.cells()
    assert cells["m/hf/bench/solo/bs1"] == 8 and cells["m/hf/bench/prompt_list/bs4"] == 8
    assert plan.n_generations() == 16


def test_matrix_expands_backend_configurations():
    text = GOOD.replace('[[backends]]\nname = "hf"', '[[backends]]\nname = "hf"\n[backends.matrix]\ndtype = ["float32", "bfloat16"]')
    study = parse_study(text)
    assert [b.label for b in study.backends] == ["hf[dtype=float32]", "hf[dtype=bfloat16]"]
    assert study.backends[1].options == {"dtype": "bfloat16"}


def test_cli_exit_code_2_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(edit('limit = 8', 'limt = 8'))
    proc = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(bad), "--dry-run"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {bad}: unknown key 'tasks[0].limt' (did you mean 'tasks[0].limit'?)"


def test_cli_missing_study_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "evalhost.cli", "run", str(tmp_path / "nope.toml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
