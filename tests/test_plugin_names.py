"""issue 19: plugin names and listing, with real distributions (dist-info and an ``evalhost`` entry point).

* one collision rule for every kind: a study that uses a contested name is refused and told how to pick one
  (``distribution:name``); a contested name the study does not use is only a warning;
* ``evalhost plugins [--json]`` lists every plugin with the hooks it implements (a ``report_sections``-only one too);
* ``EVALHOST_LOAD_PLUGINS=a,b`` loads only those third-party plugins (empty: none).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from evalhost import registry as reg_mod
from test_api_surface import _cli, _study
from toy import make_distribution

# ------------------------------------------------------------------------------------------------ collisions
TWIN = '''
from evalhost.api import PROMPT_LIST, Backend, Generation, Score, Scorer, hookimpl

WHO = "{who}"


class TwinBackend(Backend):
    capabilities = frozenset({{PROMPT_LIST}})

    def generate(self, prompts, sampling):
        return [Generation(WHO, [1], "stop") for _ in prompts]


class TwinScorer(Scorer):
    def score(self, item, text):
        return Score(WHO, 1.0, "")


@hookimpl
def register_backends(register):
    register("twin", TwinBackend)


@hookimpl
def register_scorers(register):
    register("twin", TwinScorer)
'''

SECTION_ONLY = '''
from evalhost.api import hookimpl


@hookimpl
def report_sections(summary):
    return "## Extra\\n\\nhello\\n"
'''


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Three real distributions (dist-info with an ``evalhost`` entry point): evalhost-one and evalhost-two both
    register a backend and a scorer named ``twin``; evalhost-section implements only ``report_sections``."""
    root = tmp_path / "site"
    for who in ("one", "two"):
        src = tmp_path / f"twin_{who}.py"
        src.write_text(TWIN.format(who=who))
        make_distribution(root, name=f"evalhost-{who}", module=f"twin_{who}", source=src, entry=f"twin-{who}",
                          version="1.0")
    src = tmp_path / "section_only.py"
    src.write_text(SECTION_ONLY)
    make_distribution(root, name="evalhost-section", module="section_only", source=src, entry="section",
                      version="2.0")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("EVALHOST_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("EVALHOST_PLUGINS", raising=False)
    yield root
    reg_mod._REGISTRY = None


def _env(root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("EVALHOST_LOAD_PLUGINS", "EVALHOST_PLUGINS")}
    return {**env, "PYTHONPATH": os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            **extra}


@pytest.mark.parametrize("kind", ["backend", "scorer"])
def test_a_contested_name_is_refused_and_a_qualified_one_picks(site, kind):
    reg = reg_mod.build_registry()
    with pytest.raises(reg_mod.PluginError) as err:
        reg.get(kind, "twin")
    assert str(err.value) == (
        f"{kind} 'twin' is registered by plugin 'twin-one' (distribution evalhost-one) and plugin 'twin-two' "
        f"(distribution evalhost-two); name the one you mean as 'evalhost-one:twin' or 'evalhost-two:twin' in the "
        f"study (or uninstall one of them)")
    assert reg.get(kind, "evalhost-two:twin").__module__ == "twin_two"
    assert reg.get(kind, "twin-one:twin").__module__ == "twin_one"  # the entry-point name works too
    assert sum("'twin'" in p for p in reg.problems) == 2  # listed (a warning) for each kind


@pytest.mark.parametrize("backend, scorer", [("twin", "refusal"), ("hf", "twin")])
def test_a_study_that_uses_a_contested_name_is_refused_in_one_sentence(site, tmp_path, backend, scorer):
    proc = _cli(["run", str(_study(tmp_path, backend=backend, scorer=scorer)), "--dry-run"], tmp_path, _env(site))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    kind = "backend" if backend == "twin" else "scorer"
    assert last.startswith(f"error: {kind} 'twin' is registered by plugin 'twin-one'") and "'evalhost-two:twin'" in last
    assert not (tmp_path / "runs").exists()


def test_qualified_names_run_and_an_unused_contested_name_is_only_a_warning(site, tmp_path):
    study = _study(tmp_path, backend="evalhost-one:twin", scorer="evalhost-two:twin", name="qualified")
    proc = _cli(["run", str(study), "--dry-run"], tmp_path, _env(site))
    assert proc.returncode == 0, proc.stderr
    unused = _cli(["run", str(_study(tmp_path)), "--dry-run"], tmp_path, _env(site))
    assert unused.returncode == 0, unused.stderr
    assert "warning: backend 'twin' from plugin 'twin-two'" in unused.stderr
    # a real run with the qualified names: the records name them, each from its own distribution
    done = _cli(["run", str(study), "--quiet"], tmp_path, _env(site))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for run in (tmp_path / "runs").iterdir() for line in
               (run / "records.jsonl").read_text().splitlines()]
    assert records and {(r["backend_plugin"], r["scorer"], r["output_text"], r["label"]) for r in records} == {
        ("evalhost-one:twin", "evalhost-two:twin", "one", "two")}


# ------------------------------------------------------------------------------------------------ plugins listing
def test_plugins_lists_every_plugin_with_its_hooks(site, tmp_path):
    proc = _cli(["plugins", "--json"], tmp_path, _env(site))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    modules = {m["name"]: m for m in data["modules"]}
    assert modules["section"] == {"name": "section", "distribution": "evalhost-section", "version": "2.0",
                                  "hooks": ["report_sections"], "registers": []}
    assert modules["twin-one"]["hooks"] == ["register_backends", "register_scorers"]
    assert {"kind": "backend", "name": "twin"} in modules["twin-one"]["registers"]
    assert modules["evalhost.plugins.scorers.refusal"]["hooks"] == ["register_scorers"]
    twins = [r for r in data["plugins"] if r["name"] == "twin"]
    assert len(twins) == 4 and all(r.get("contested") for r in twins)
    text = _cli(["plugins"], tmp_path, _env(site)).stdout
    assert "section  (evalhost-section 2.0)\n  hooks: report_sections\n" in text


@pytest.mark.parametrize("value, loaded", [("evalhost-section", {"section"}), ("twin-one,evalhost-two",
                                                                                {"twin-one", "twin-two"}),
                                           ("", set())])
def test_load_plugins_picks_the_third_party_plugins(site, monkeypatch, value, loaded):
    monkeypatch.setenv("EVALHOST_LOAD_PLUGINS", value)
    reg = reg_mod.build_registry()
    third = {p["name"] for p in reg.plugins if p["distribution"] != "evalhost"}
    assert third == loaded
    assert reg.get("scorer", "refusal")  # the built-ins always load
    if loaded != {"twin-one", "twin-two"}:
        assert not reg.contested


def test_load_plugins_names_an_unknown_plugin(site, monkeypatch):
    monkeypatch.setenv("EVALHOST_LOAD_PLUGINS", "evalhost-one,evalhost-nine")
    reg = reg_mod.build_registry()
    assert {p["name"] for p in reg.plugins if p["distribution"] != "evalhost"} == {"twin-one"}
    assert any("EVALHOST_LOAD_PLUGINS names 'evalhost-nine'" in p for p in reg.problems)
