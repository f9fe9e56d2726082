"""issue 19: evalhost.api is the whole plugin surface.

* every module of the built-in plugins and of examples/ imports no evalhost module but ``evalhost.api`` (and
  siblings inside its own plugin package), checked by reading their source (AST);
* dispatchers reach the engine only through the backend (``engine_metrics``), never its URL;
* ``evalhost run --dry-run`` refuses a bad scorer or task-source option with one sentence, before a run directory;
* one collision rule for every kind, ``distribution:name`` to pick, a warning for names the study does not use;
* ``evalhost plugins`` lists every plugin with its hooks (a ``report_sections``-only one too);
  ``EVALHOST_LOAD_PLUGINS`` picks the third-party plugins that load.
"""
from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evalhost.plugins
from evalhost import registry as reg_mod
from toy import make_distribution

REPO = Path(__file__).resolve().parents[1]
PLUGINS = Path(evalhost.plugins.__file__).parent  # the plugins of the evalhost that is imported
EXAMPLES = REPO / "examples"


# ------------------------------------------------------------------------------------------------ the AST scan
def _modules(root: Path) -> list[Path]:
    """Every module under ``root`` (an example's own tests included), not build outputs."""
    return sorted(p for p in root.rglob("*.py") if not {"build", "__pycache__"} & set(p.parts)
                  and not any(part.endswith(".egg-info") for part in p.parts))


def violations(path: Path, plugin_package: str | None) -> list[str]:
    """``file:line module`` for each import of an evalhost module other than evalhost.api; ``plugin_package``
    (e.g. ``evalhost.plugins.backends``) may import its own siblings, absolutely or relatively (one dot)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:  # from .. import: out of the plugin's own package
                names = ["." * node.level + (node.module or "")]
            elif node.level == 0 and node.module:
                names = [node.module] if node.module != "evalhost" else [f"evalhost.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("."):
                out.append(f"{path}:{node.lineno} {name}")
            elif name == "evalhost.api" or not (name == "evalhost" or name.startswith("evalhost.")):
                continue
            elif plugin_package and (name == plugin_package or name.startswith(plugin_package + ".")):
                continue
            else:
                out.append(f"{path}:{node.lineno} {name}")
    return out


def plugin_modules() -> list[tuple[Path, str | None]]:
    mods = []
    for path in _modules(PLUGINS):
        rel = path.relative_to(PLUGINS)
        if rel == Path("__init__.py"):
            continue  # the package of the built-ins re-exports the registry for core's use; it is no plugin
        mods.append((path, "evalhost.plugins." + rel.parts[0] if len(rel.parts) > 1 else None))
    return mods


def test_built_in_plugins_and_examples_import_only_evalhost_api():
    mods = plugin_modules()
    examples = [(p, None) for p in _modules(EXAMPLES)]
    assert len(mods) >= 18 and examples, (mods, examples)  # the scan sees the files it is meant to see
    bad = [v for path, package in mods + examples for v in violations(path, package)]
    assert bad == [], "plugins must import only evalhost.api:\n" + "\n".join(bad)


def test_the_scan_catches_each_way_of_reaching_into_core(tmp_path):
    src = tmp_path / "p.py"
    src.write_text("import evalhost.runner\nfrom evalhost import models\nfrom evalhost.plan import load_task\n"
                   "from ..scorers import mcq\nfrom evalhost.plugins.dispatchers.synchronized import x\n"
                   "def f():\n    from evalhost.registry import get_registry\n"
                   "from evalhost.api import hookimpl\nfrom .completions import y\n"
                   "from evalhost.plugins.backends.server import z\n")
    found = [v.split(" ", 1)[1] for v in violations(src, "evalhost.plugins.backends")]
    assert found == ["evalhost.runner", "evalhost.models", "evalhost.plan", "..scorers",
                     "evalhost.plugins.dispatchers.synchronized", "evalhost.registry"]


def test_api_names_every_plugin_kind_and_service():
    import evalhost.api as api

    for name in api.__all__:
        assert getattr(api, name) is not None, name
    assert api.execute_work.__module__ == "evalhost.runner"
    assert api.did_you_mean("metric", ["metrics", "phase"]) == " (did you mean 'metrics'?)"
    with pytest.raises(api.UserError, match=r"^scorer 'x' has no option 'lenght' \(did you mean 'length'\?\); "
                                            r"its options are: length, width$"):
        api.check_keys({"length": 1, "lenght": 2}, ["width", "length"], "scorer 'x'")
    item = api.item_from_dict({"id": 1, "prompt": "hi", "domain": "safety"}, "f:1", "t")
    assert (item.id, item.task, item.chat()) == ("1", "t", [{"role": "user", "content": "hi"}])


def test_no_did_you_mean_is_written_by_hand_in_plugins():
    """The one helper (evalhost.api.check_keys / did_you_mean) replaced the copies of difflib in plugins."""
    users = [p for p, _ in plugin_modules() if "difflib" in p.read_text(encoding="utf-8")]
    assert users == []


# ------------------------------------------------------------------------------------------------ engine metrics
def test_synchronized_reads_running_requests_through_the_backend(tmp_path):
    """The dispatcher samples ``backend.engine_metrics()``; it has no URL of its own (no base_url, no httpx)."""
    from evalhost.api import CONCURRENT, Backend, Generation, Group, Member, ModelSpec, RunContext, Sampling, TaskItem

    class Engine(Backend):
        capabilities = frozenset({CONCURRENT})

        def __init__(self, *a):
            super().__init__(*a)
            self.running = 0
            self.asked = 0

        async def agenerate(self, prompt, sampling):
            self.running += 1
            await asyncio.sleep(0.3)
            self.running -= 1
            return Generation(prompt[::-1], [1], "stop")

        async def engine_metrics(self):
            self.asked += 1
            return {"requests_running": self.running}

    ctx = RunContext(tmp_path, tmp_path, log=lambda m: None)
    backend = Engine(ModelSpec("m", "none"), {}, ctx)
    items = [TaskItem(id=f"i{k}", task="t", domain="safety", prompt=f"p{k}") for k in range(4)]
    group = Group("g", tuple(Member(it, it.prompt) for it in items))
    reg = reg_mod.build_registry(entry_points=False)
    result = reg.get("dispatcher", "synchronized")({"metrics_interval_s": 0.02}, ctx).run_group(
        backend, group, Sampling())
    assert backend.asked >= 1
    assert result.evidence["max_running"] == 4
    source = (PLUGINS / "dispatchers" / "synchronized.py").read_text() + (PLUGINS / "dispatchers" /
                                                                          "continuous.py").read_text()
    assert "base_url" not in source and "httpx" not in source


def test_the_openai_backend_reads_engine_metrics_from_its_server(tmp_path):
    """``engine_metrics`` of a completions backend: the server's ``vllm:num_requests_running`` at ``/metrics``
    (a ``/v1`` base URL is cut back to the root); None before it knows a server; a page without the gauge raises."""
    from evalhost.api import ModelSpec, RunContext
    from evalhost.testing import FakeServer

    ctx = RunContext(tmp_path, tmp_path, log=lambda m: None)
    backend = reg_mod.build_registry(entry_points=False).get("backend", "openai")(
        ModelSpec("m", "none"), {"base_url": "http://127.0.0.1:9/v1", "model": "m"}, ctx)
    assert asyncio.run(backend.engine_metrics()) is None  # not started: no server known
    with FakeServer(tmp_path) as server:
        backend.base_url = server.url + "/v1"
        assert asyncio.run(backend.engine_metrics()) == {"requests_running": 0}
        backend.base_url = server.url + "/nowhere"
        with pytest.raises(Exception):
            asyncio.run(backend.engine_metrics())


# ------------------------------------------------------------------------------------------------ dry-run options
STUDY = """
[study]
name = "opts"
seed = 1
output_dir = "{out}"

[sampling]
max_tokens = 8

[[models]]
name = "m"
path = "builtin:smollm2-135m-instruct"

[[backends]]
name = "{backend}"

[[dispatchers]]
name = "prompt_list"
batch_sizes = [2]

[[tasks]]
name = "bench"
source = "builtin:benign"
limit = 4
scorer = "{scorer}"
{extra}
"""


def _cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evalhost.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def _study(tmp_path: Path, backend="hf", scorer="refusal", extra="", name="study") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(STUDY.format(out=tmp_path / "runs", backend=backend, scorer=scorer, extra=extra))
    return path


@pytest.mark.parametrize("extra, sentence", [
    ('scorer_options = { extra_refusal_phrase = ["no way"] }',
     "task 'bench': scorer 'refusal' has no option 'extra_refusal_phrase' (did you mean 'extra_refusal_phrases'?); "
     "its options are: extra_compliance_phrases, extra_refusal_phrases"),
    ('scorer_options = { extra_refusal_phrases = "" }',
     "task 'bench': scorer option 'extra_refusal_phrases' must be a list of non-empty strings"),
    ('options = { limt = 2 }',
     "task 'bench' (builtin): the task source has no option 'limt'; its options are: none"),
])
def test_dry_run_refuses_a_bad_scorer_or_task_source_option(tmp_path, extra, sentence):
    proc = _cli(["run", str(_study(tmp_path, extra=extra)), "--dry-run"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: " + sentence) and "\n" not in line and "Traceback" not in line, line
    assert not (tmp_path / "runs").exists()


def test_dry_run_refuses_a_bad_option_of_a_third_party_scorer(tmp_path):
    pytest.importorskip("evalhost_length_scorer")
    proc = _cli(["run", str(_study(tmp_path, scorer="length", extra="scorer_options = { shortest = 3 }")),
                 "--dry-run"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: task 'bench': scorer 'length' has no option 'shortest'")
    assert not (tmp_path / "runs").exists()


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


# ------------------------------------------------------------------------------------------------ the README
README_STUDY = """
[study]
name = "readme"
seed = 3

[sampling]
max_tokens = 8

[[models]]
name = "m"
path = "none"

{backends_and_tasks}

[[dispatchers]]
name = "prompt_list"
batch_sizes = [2]
"""


def readme_plugins() -> dict[str, str]:
    """The ``# NAME.py`` python blocks and the study block of README.md's "Write a plugin" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Write a plugin\n", 1)[1].split("\n## ", 1)[0]
    blocks = {}
    for lang, body in [(b.split("\n", 1)[0], b.split("\n", 1)[1]) for b in section.split("```")[1::2]]:
        first = body.split("\n", 1)[0]
        if lang == "python" and first.startswith("# ") and first.split()[1].endswith(".py"):
            blocks[first.split()[1]] = body
        elif lang == "toml" and "[[tasks]]" in body:
            blocks["study"] = body
    return blocks


def test_the_readme_plugins_use_only_evalhost_api_and_run(tmp_path, monkeypatch):
    """The README's scorer with options, backend, task source and report section, written to files as they are
    printed, import only evalhost.api, run a study together, and --dry-run refuses their bad options."""
    import importlib

    from evalhost.api import UserError
    from evalhost.runner import run_study
    from evalhost.study import parse_study
    from evalhost.testing import register_module, run_study_in

    blocks = readme_plugins()
    names = ["shouting.py", "upper_backend.py", "lines_source.py", "shout_report.py"]
    assert set(names) <= set(blocks) and "study" in blocks
    for name in names:
        (tmp_path / name).write_text(blocks[name])
        assert violations(tmp_path / name, None) == [], name
    # one module holding the four modules' hooks (evalhost.testing.register_module takes one module at a time)
    (tmp_path / "readme_plugins.py").write_text(
        "from shouting import register_scorers\nfrom upper_backend import register_backends\n"
        "from lines_source import register_task_sources\nfrom shout_report import report_sections\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello there\n\nbe loud\nquiet please\n")
    study = README_STUDY.format(backends_and_tasks=blocks["study"])
    with register_module(importlib.import_module("readme_plugins")):
        records = run_study_in(tmp_path / "run", study.replace("lines:notes.txt", f"lines:{tmp_path}/notes.txt"),
                               report=True)
        assert len(records) == 6  # 3 items, solo and batch
        assert {(r["output_text"], r["label"]) for r in records if r["item_id"] == "line-4"} == {
            ("SAY: QUIET PLEASE", "shout")}
        report = (records.run_dir / "report.md").read_text()
        assert "## Shouting\n\n6 of 6 outputs shout." in report
        # the task file is read next to the study file, and bad options stop a dry run with one sentence
        (tmp_path / "study.toml").write_text(study)
        for bad, sentence in [("min_letters = 2", "min_leters = 2"), ('prefix = "say: "', 'prefx = "say: "')]:
            (tmp_path / "bad.toml").write_text(study.replace(bad, sentence))
            with pytest.raises(UserError, match="did you mean"):
                run_study(parse_study((tmp_path / "bad.toml").read_text(), tmp_path / "bad.toml"), dry_run=True,
                          out=lambda line: None)
        assert run_study(parse_study(study, tmp_path / "study.toml"), dry_run=True, out=lambda line: None) is None

