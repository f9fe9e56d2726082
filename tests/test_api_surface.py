"""issue 19: evalhost.api is the whole plugin surface.

* every module of the built-in plugins and of examples/ imports no evalhost module but ``evalhost.api`` (and
  siblings inside its own plugin package), checked by reading their source (AST);
* dispatchers reach the engine only through the backend (``engine_metrics``), never its URL;
* ``evalhost run --dry-run`` refuses a bad scorer or task-source option with one sentence, before a run directory;
* the README's four plugins (scorer with options, backend, task source, report section) run as printed.

The collision rule, ``evalhost plugins`` and ``EVALHOST_LOAD_PLUGINS`` are tested in test_plugin_names.py.
"""
from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import evalhost.plugins
from evalhost import registry as reg_mod

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


def test_the_scan_reads_every_module_of_a_plugin_split_into_a_package():
    """executors/ray/ is a package: each of its modules is scanned, as part of its kind's package."""
    mods = dict(plugin_modules())
    ray_dir = PLUGINS / "executors" / "ray"
    inside = {p.name: package for p, package in mods.items() if p.parent == ray_dir}
    assert {"__init__.py", "executor.py", "actor.py", "relay.py", "connect.py", "resources.py"} <= set(inside)
    assert set(inside.values()) == {"evalhost.plugins.executors"}


def test_api_names_every_plugin_kind_and_service():
    import evalhost.api as api

    for name in api.__all__:
        assert getattr(api, name) is not None, name
    assert api.execute_work.__module__ == "evalhost.run_worker"
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

