"""evalhost.testing's helpers themselves (issue 19, weak tests): ``register_module`` blocks nest — an inner block
adds its module to the outer one's, and leaving it gives back the outer registry."""
from __future__ import annotations

import types

import pytest

from evalhost import registry as reg_mod
from evalhost.hookspecs import hookimpl
from evalhost.testing import register_module
from evalhost.types import Score, Scorer


def _scorer_module(module_name: str, scorer_name: str) -> types.ModuleType:
    """A plugin module (never installed) that registers one scorer ``scorer_name``."""
    module = types.ModuleType(module_name)

    class Constant(Scorer):
        def score(self, item, output):  # pragma: no cover - only registered, never run here
            return Score(label=scorer_name, value=1.0)

    @hookimpl
    def register_scorers(register):
        register(scorer_name, Constant)

    module.Constant = Constant
    module.register_scorers = register_scorers
    return module


@pytest.fixture
def fresh_registry():
    reg_mod._REGISTRY = None
    yield
    reg_mod._REGISTRY = None


def _scorers() -> set[str]:
    return set(reg_mod.get_registry().names("scorer"))


def test_register_module_blocks_nest_and_unwind(fresh_registry):
    a = _scorer_module("helper_plugin_a", "helper_a")
    b = _scorer_module("helper_plugin_b", "helper_b")
    before = reg_mod.get_registry()
    assert not {"helper_a", "helper_b"} & _scorers()
    with register_module(a) as outer:
        assert reg_mod.get_registry() is outer
        assert {"helper_a"} <= _scorers() and "helper_b" not in _scorers()
        with register_module(b) as inner:
            assert reg_mod.get_registry() is inner
            assert {"helper_a", "helper_b"} <= _scorers()  # the inner block still sees the outer module
            assert inner.entry("scorer", "helper_a").plugin == "helper_plugin_a"
            assert inner.entry("scorer", "helper_b").plugin == "helper_plugin_b"
        assert reg_mod.get_registry() is outer  # leaving the inner block restores a only
        assert "helper_a" in _scorers() and "helper_b" not in _scorers()
    assert reg_mod.get_registry() is before
    assert not {"helper_a", "helper_b"} & _scorers()


def test_register_module_nesting_unwinds_after_an_error(fresh_registry):
    """An exception in the inner block still pops it: a later block sees only what is open then."""
    a = _scorer_module("helper_plugin_a", "helper_a")
    b = _scorer_module("helper_plugin_b", "helper_b")
    c = _scorer_module("helper_plugin_c", "helper_c")
    with register_module(a):
        with pytest.raises(RuntimeError):
            with register_module(b):
                raise RuntimeError("inside")
        with register_module(c):
            names = _scorers()
            assert {"helper_a", "helper_c"} <= names and "helper_b" not in names
    with register_module(c):
        names = _scorers()
        assert "helper_c" in names and not {"helper_a", "helper_b"} & names


def test_run_study_in_registers_every_plugin_it_is_given(tmp_path, fresh_registry):
    """``plugins=[backend module, scorer module]``: the study uses a backend from one and a scorer from the other
    (each registration used to replace the one before, so the first module's names were unknown)."""
    from evalhost.testing import run_study_in
    from toy import evalhost_toy, study_text, write_tasks

    tasks = write_tasks(tmp_path / "tasks.jsonl", 4)
    text = study_text(tasks, tmp_path / "runs", (2,)).replace('scorer = "toy_refusal"', 'scorer = "helper_a"')
    records = run_study_in(tmp_path, text, plugins=[evalhost_toy, _scorer_module("helper_plugin_a", "helper_a")])
    assert len(records) == 8 and {r["condition"] for r in records} == {"solo", "batch"}
    assert {r["label"] for r in records} == {"helper_a"}  # the second module's scorer labelled every output
    assert records.manifest["status"] == "complete"


def test_run_cli_gives_the_exit_code_and_both_streams(tmp_path):
    from evalhost import __version__
    from evalhost.testing import run_cli

    assert run_cli(["--version"]) == (0, f"evalhost, version {__version__}\n", "")
    code, out, err = run_cli(["run", str(tmp_path / "missing.toml"), "--dry-run"])
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1
