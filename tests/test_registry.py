"""Plugin loading: built-ins and a third-party plugin through a real entry point; problems name plugin + dist."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evalhost import registry as reg_mod
from toy import make_distribution


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    def add(root):
        monkeypatch.syspath_prepend(str(root))
        return root
    yield add
    reg_mod._REGISTRY = None


def test_builtins_are_registered_like_plugins():
    reg = reg_mod.build_registry(entry_points=False)
    for kind, name in [("backend", "hf"), ("backend", "vllm"), ("backend", "vllm-invariant"), ("backend", "openai"),
                       ("dispatcher", "solo"), ("dispatcher", "synchronized"), ("dispatcher", "prompt_list"),
                       ("dispatcher", "continuous"), ("scorer", "refusal"), ("scorer", "mcq"), ("scorer", "bbq"),
                       ("scorer", "truthfulqa"), ("task_source", "builtin"), ("task_source", "jsonl"),
                       ("executor", "local")]:
        entry = reg.entry(kind, name)
        assert entry.distribution == "evalhost"


def test_third_party_entry_point_is_loaded(tmp_path, on_path):
    on_path(make_distribution(tmp_path / "site"))
    reg = reg_mod.build_registry()
    entry = reg.entry("backend", "toy")
    assert (entry.distribution, entry.version, entry.plugin) == ("evalhost-toy", "0.3.1", "toy")
    assert reg.entry("scorer", "toy_refusal").distribution == "evalhost-toy"


def test_plugins_command_lists_third_party_with_distribution(tmp_path):
    root = make_distribution(tmp_path / "site")
    out = subprocess.run([sys.executable, "-m", "evalhost.cli", "plugins", "--json"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, check=True).stdout
    rows = json.loads(out)["plugins"]
    toy = [r for r in rows if r["name"] == "toy"]
    assert toy == [{"kind": "backend", "name": "toy", "plugin": "toy", "distribution": "evalhost-toy",
                    "version": "0.3.1"}]
    assert {"kind": "dispatcher", "name": "solo"}.items() <= next(r for r in rows if r["name"] == "solo").items()


def test_import_failure_is_a_problem_and_the_rest_keep_working(tmp_path, on_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_module_xyz\n")
    on_path(make_distribution(tmp_path / "site", name="evalhost-broken", module="broken_plugin", source=bad,
                              entry="broken"))
    reg = reg_mod.build_registry()
    assert any("'broken' (distribution evalhost-broken) failed to import" in p and "no_such_module_xyz" in p
               for p in reg.problems)
    assert reg.entry("scorer", "refusal")  # built-ins unaffected


def test_misspelled_hook_names_plugin_and_distribution(tmp_path, on_path):
    src = tmp_path / "typo.py"
    src.write_text("from evalhost.hookspecs import hookimpl\n@hookimpl\ndef register_scorer(register):\n    pass\n")
    on_path(make_distribution(tmp_path / "site", name="evalhost-typo", module="typo_plugin", source=src, entry="typo"))
    reg = reg_mod.build_registry()
    problem = next(p for p in reg.problems if "typo" in p)
    assert "plugin 'typo' (distribution evalhost-typo)" in problem and "register_scorer" in problem


def test_duplicate_name_is_refused_naming_both(tmp_path, on_path):
    src = tmp_path / "dup.py"
    src.write_text("from evalhost.hookspecs import hookimpl\nfrom evalhost.types import Scorer\n"
                   "@hookimpl\ndef register_scorers(register):\n    register('refusal', Scorer)\n")
    on_path(make_distribution(tmp_path / "site", name="evalhost-dup", module="dup_plugin", source=src, entry="dup"))
    reg = reg_mod.build_registry()
    problem = next(p for p in reg.problems if "dup" in p)
    assert "'refusal' from plugin 'dup' (distribution evalhost-dup)" in problem
    assert "evalhost.plugins.scorers.refusal" in problem and "(distribution evalhost)" in problem
    # issue 19: neither wins the bare name (one collision rule for every kind); each can be named qualified
    with pytest.raises(reg_mod.PluginError, match="name the one you mean as 'evalhost:refusal' or "
                                                  "'evalhost-dup:refusal'"):
        reg.get("scorer", "refusal")
    assert reg.entry("scorer", "evalhost:refusal").distribution == "evalhost"
    assert reg.entry("scorer", "evalhost-dup:refusal").distribution == "evalhost-dup"


def test_unknown_name_suggests_close_match():
    reg = reg_mod.build_registry(entry_points=False)
    with pytest.raises(Exception, match=r"unknown dispatcher 'prompt_lst' \(did you mean 'prompt_list'\?\)"):
        reg.get("dispatcher", "prompt_lst")
