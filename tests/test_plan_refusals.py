"""What a study's plan refuses before a run directory exists: a sampling number TOML lets be infinite, and a model
path the backend could never load (checked by ``Backend.check_model`` without converting or downloading)."""
from __future__ import annotations

import pytest

from evalhost.testing import run_cli


def study_file(tmp_path, model_path: str = "builtin:smollm2-135m-instruct", backend: str = "hf",
               sampling: str = ""):
    study = tmp_path / "s.toml"
    study.write_text(f'''[study]
name = "s"
output_dir = "{tmp_path / "runs"}"
[sampling]
{sampling}
[[models]]
name = "m"
path = "{model_path}"
[[backends]]
name = "{backend}"
[[dispatchers]]
name = "prompt_list"
batch_sizes = [2]
[[tasks]]
name = "t"
source = "builtin:benign"
''')
    return study


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_infinite_or_nan_temperature_is_refused(tmp_path, value):
    code, _out, err = run_cli(["run", str(study_file(tmp_path, sampling=f"temperature = {value}")), "--dry-run"])
    assert code == 2, err
    assert "temperature" in err and "finite" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("path, fragment", [
    ("/proc/self/status", "is not a checkpoint directory with a config.json"),
    ("./no-such-checkpoint", "does not exist"),
    ("builtin:no-such-model", "unknown built-in model 'no-such-model'"),
    ("~nosuchuser-evalhost/ckpt", "no user of that name has a home here"),
    ("/" + "x" * 300, "cannot be used"),
])
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_a_model_path_the_backend_can_never_load_is_refused_before_the_run(tmp_path, path, fragment, backend):
    """A real run refuses, before a run directory exists, the model path it could never load; --dry-run refuses a path
    that is wrong anywhere and notes one that names nothing on this machine."""
    study = study_file(tmp_path, model_path=path, backend=backend)
    code, out, err = run_cli(["run", str(study), "--dry-run"])
    if fragment == "does not exist":  # it may exist on the machine the study is written for: planned, and said
        assert code == 0 and fragment in out and "a run on this machine will refuse it" in out, err
    else:
        assert code == 2 and fragment in err and "model 'm'" in err and err.count("\n") == 1, err
    code, out, err = run_cli(["run", str(study), "--quiet"])
    assert code == 2 and fragment in err and "model 'm'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_hub_id_and_a_builtin_pass_the_plan_check():
    from evalhost.api import check_model_path

    assert check_model_path("builtin:smollm2-135m-instruct") == "builtin"
    assert check_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"  # checked only when loaded
