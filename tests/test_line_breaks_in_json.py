"""JSONL files evalhost reads split lines at ``\\n`` only: U+2028, U+2029 and NEL are legal inside a JSON string
(``json.dumps(..., ensure_ascii=False)`` writes them raw), so a hand-written candidates or adjudication file holding
one must load, not fail as "not JSON" (the adjudication case is in test_adjudicate.py). Also: a sampling number that TOML lets be infinite is refused."""
from __future__ import annotations

import json

import pytest
from evalhost.registry import build_registry

BREAKS = ["\u2028", "\u2029", "\u0085"]


@pytest.mark.parametrize("brk", BREAKS)
def test_candidates_row_with_a_unicode_line_break_in_a_string_loads(tmp_path, brk):
    row = {"task": "benign", "task_source": "builtin:benign", "item_id": "benign-001", "peers": ["benign-002"],
           "position": 0, "dispatcher": "prompt_list", "batch_size": 2, "group_id": f"g{brk}1",
           "kind": "label_flip"}
    path = tmp_path / "cand.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert brk in path.read_text(encoding="utf-8")  # written raw, not escaped
    source = build_registry(entry_points=False).get("task_source", "candidates")()
    items = source.load(str(path), {})
    assert len(items) == 1 and items[0].metadata["group_members"]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_infinite_or_nan_temperature_is_refused(tmp_path, value, capsys):
    from evalhost.cli import main

    study = tmp_path / "s.toml"
    study.write_text(f'''[study]
name = "s"
output_dir = "{tmp_path / "runs"}"
[sampling]
temperature = {value}
[[models]]
name = "m"
path = "builtin:smollm2-135m-instruct"
[[backends]]
name = "hf"
[[dispatchers]]
name = "prompt_list"
batch_sizes = [2]
[[tasks]]
name = "t"
source = "builtin:benign"
''')
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(study), "--dry-run"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "temperature" in err and "finite" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("path, fragment", [
    ("/proc/self/status", "is not a checkpoint directory with a config.json"),
    ("./no-such-checkpoint", "does not exist"),
    ("builtin:no-such-model", "unknown built-in model 'no-such-model'"),
    ("~nosuchuser-evalhost/ckpt", "no user of that name has a home here"),
    ("/" + "x" * 300, "cannot be used"),
])
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_a_model_path_no_backend_can_load_is_refused_by_dry_run(tmp_path, capsys, path, fragment, backend):
    """A real run refuses, before a run directory exists, the model path it could never load; --dry-run refuses a path
    that is wrong anywhere and notes one that names nothing on this machine."""
    from evalhost.cli import main

    study = tmp_path / "s.toml"
    study.write_text(f'''[study]
name = "s"
output_dir = "{tmp_path / "runs"}"
[[models]]
name = "m"
path = "{path}"
[[backends]]
name = "{backend}"
[[dispatchers]]
name = "prompt_list"
batch_sizes = [2]
[[tasks]]
name = "t"
source = "builtin:benign"
''')
    here_elsewhere = fragment == "does not exist"
    for args in (["run", str(study), "--dry-run"], ["run", str(study), "--quiet"]):
        if here_elsewhere and "--dry-run" in args:
            # a path that names nothing here may exist on the machine the study is written for: planned, and said
            main(args)
            shown = capsys.readouterr().out
            assert fragment in shown and "a run on this machine will refuse it" in shown
            continue
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, err
        assert fragment in err and "model 'm'" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_hub_id_and_a_builtin_pass_the_plan_check(tmp_path):
    from evalhost.api import check_model_path

    assert check_model_path("builtin:smollm2-135m-instruct") == "builtin"
    assert check_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"  # checked only when loaded
