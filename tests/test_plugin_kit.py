"""The plugin author kit (issue 19, part B): fingerprints name every plugin with its distribution and version and a
new backend plugin version misses the solo cache; ``Generation.extra`` is recorded as ``backend_extra``;
``report_sections`` gets the run directory, manifest and study (old one-argument implementations keep working);
``evalhost.testing`` (register a module, run a study in a temp directory, the fake server)."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from evalhost import registry as reg_mod
from evalhost.records import read_records
from evalhost.runner import run_file
from toy import make_distribution, study_text, write_tasks


def _study(tmp_path: Path, n_items: int = 6, batch_sizes=(2,)) -> Path:
    tasks = write_tasks(tmp_path / "tasks.jsonl", n_items)
    path = tmp_path / "study.toml"
    path.write_text(study_text(tasks, tmp_path / "runs", batch_sizes))
    return path


def _run(path: Path) -> list[dict]:
    run_dir = run_file(path, progress=False, report=False, out=lambda s: None)
    return read_records(run_dir / "records.jsonl")


def _manifest(records: list[dict], path: Path) -> dict:
    return json.loads((path.parent / "runs" / records[0]["run_id"] / "manifest.json").read_text())


@pytest.fixture
def fresh_registry():
    reg_mod._REGISTRY = None
    yield
    reg_mod._REGISTRY = None


def _use_site(monkeypatch, site: Path, drop: Path | None = None) -> None:
    """Put the distribution in ``site`` on sys.path (instead of ``drop``'s) and rebuild the registry."""
    if drop is not None:
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(drop)])
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    reg_mod._REGISTRY = None


# -- 1. fingerprints and the solo cache ---------------------------------------------------------------------------
def test_fingerprint_names_every_plugin_in_use_with_distribution_and_version(tmp_path, toy_env, monkeypatch):
    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    path = _study(tmp_path)
    records = _run(path)
    fp = _manifest(records, path)["fingerprints"][records[0]["fingerprint_id"]]
    from evalhost import __version__

    assert fp["plugins"] == {
        "backend:toy": "evalhost-toy==0.3.1", "scorer:toy_refusal": "evalhost-toy==0.3.1",
        "dispatcher:prompt_list": f"evalhost=={__version__}", "dispatcher:solo": f"evalhost=={__version__}",
        "task_source:jsonl": f"evalhost=={__version__}"}
    assert fp["evalhost"] == __version__


def test_a_new_backend_plugin_version_misses_the_solo_cache(tmp_path, monkeypatch, fresh_registry):
    """The same toy backend code installed as 1.0 fills the solo cache; installed as 1.1 (same code, same
    fingerprint()) it gets no hit, and the 1.0 entries still serve 1.0."""
    monkeypatch.setenv("EVALHOST_SOLO_CACHE_DIR", str(tmp_path / "solo-cache"))
    monkeypatch.delenv("EVALHOST_SOLO_CACHE", raising=False)
    v10 = make_distribution(tmp_path / "site-1.0", version="1.0")
    v11 = make_distribution(tmp_path / "site-1.1", version="1.1")
    path = _study(tmp_path)

    def solo_hits(records):
        solo = [r for r in records if r["condition"] == "solo"]
        assert len(solo) == 6
        return sum(r["dispatch_evidence"].get("solo_cache") == "hit" for r in solo)

    _use_site(monkeypatch, v10)
    assert reg_mod.get_registry().entry("backend", "toy").version == "1.0"
    assert solo_hits(_run(path)) == 0  # fills the cache
    assert solo_hits(_run(path)) == 6  # same version: every solo from the cache
    _use_site(monkeypatch, v11, drop=v10)
    assert reg_mod.get_registry().entry("backend", "toy").version == "1.1"
    first_11 = _run(path)
    assert solo_hits(first_11) == 0
    assert _manifest(first_11, path)["fingerprints"][first_11[0]["fingerprint_id"]]["plugins"]["backend:toy"] \
        == "evalhost-toy==1.1"
    _use_site(monkeypatch, v10, drop=v11)
    assert solo_hits(_run(path)) == 6  # back on 1.0: its entries were kept


def test_solo_cache_key_ignores_scorer_and_dispatcher_versions():
    """Unit: only the backend's plugin entry (and evalhost's version) are in the solo key's stack."""
    from evalhost.solo_cache import solo_stack

    fp = {"backend_plugin": "toy", "evalhost": "0.1.0",
          "plugins": {"backend:toy": "evalhost-toy==1.0", "scorer:s": "x==1", "dispatcher:d": "y==2"}}
    other = {**fp, "plugins": {**fp["plugins"], "scorer:s": "x==2", "dispatcher:d": "y==3"}}
    assert solo_stack(fp) == solo_stack(other)
    newer = {**fp, "plugins": {**fp["plugins"], "backend:toy": "evalhost-toy==1.1"}}
    assert solo_stack(fp) != solo_stack(newer)
    assert solo_stack({**fp, "evalhost": "0.2.0"}) != solo_stack(fp)


# -- 2. Generation.extra -> backend_extra ---------------------------------------------------------------------
EXTRA_BACKEND = '''
import math
from evalhost.hookspecs import hookimpl
from evalhost.types import PROMPT_LIST, Backend, Generation


class Marker:
    def __repr__(self):
        return "<Marker>"


class ExtraBackend(Backend):
    capabilities = frozenset({PROMPT_LIST})

    def generate(self, prompts, sampling):
        out = []
        for p in prompts:
            extra = {"batch": len(prompts), "nan": math.nan, "raw": b"\\x00\\x01", "tags": {"b", "a"},
                     3: (1, 2), "obj": Marker()}
            if "number 1:" in p:
                extra = {"small": 1, "huge": "x" * 70000, "after": 2}
            out.append(Generation("Sure.", [1], "stop", extra=extra))
        return out


@hookimpl
def register_backends(register):
    register("extra", ExtraBackend)
'''


def test_generation_extra_is_recorded_json_safe_and_bounded(tmp_path, monkeypatch, fresh_registry):
    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    src = tmp_path / "extra_src.py"
    src.write_text(EXTRA_BACKEND)
    _use_site(monkeypatch, make_distribution(tmp_path / "site", name="evalhost-extra", module="evalhost_extra",
                                             source=src, entry="extra"))
    path = _study(tmp_path, n_items=4)
    path.write_text(path.read_text().replace('[[backends]]\nname = "toy"', '[[backends]]\nname = "extra"')
                    .replace('scorer = "toy_refusal"', 'scorer = "refusal"'))
    records = _run(path)
    assert len(records) == 8
    by = {(r["item_id"], r["condition"]): r for r in records}
    plain = by[("q000", "batch")]["backend_extra"]
    assert plain == {"batch": 2, "nan": "nan", "raw": "b'\\x00\\x01'", "tags": ["a", "b"], "3": [1, 2],
                     "obj": "<Marker>"}
    assert by[("q000", "solo")]["backend_extra"]["batch"] == 1
    big = by[("q001", "solo")]["backend_extra"]
    assert big["small"] == 1 and big["after"] == 2 and "huge" not in big
    assert "over the 65536-byte limit" in big["_evalhost_note"] and "'huge'" in big["_evalhost_note"]
    assert len(json.dumps(big)) < 64 * 1024


def test_record_extra_limit_unit():
    from evalhost.backend_extra import LIMIT, record_extra

    assert record_extra({}) == {} and record_extra(None) == {}
    many = {f"k{i}": "y" * 1000 for i in range(100)}  # ~100 KB
    cut = record_extra(many)
    assert len(json.dumps(cut, separators=(",", ":"))) <= LIMIT
    kept = [k for k in cut if k != "_evalhost_note"]
    assert kept == [f"k{i}" for i in range(len(kept))] and 50 < len(kept) < 100
    assert "and" in cut["_evalhost_note"] and "more" in cut["_evalhost_note"]


# -- 3. report_sections gets run_dir, manifest and study ------------------------------------------------------
OLD_SECTION = '''
from evalhost.hookspecs import hookimpl

@hookimpl
def report_sections(summary):
    return "## Old-style section\\n\\n%d records" % summary["counts"]["records"]
'''

NEW_SECTION = '''
from evalhost.hookspecs import hookimpl

@hookimpl
def report_sections(summary, run_dir, manifest, study):
    files = sorted(p.name for p in run_dir.path.iterdir() if p.name in ("records.jsonl", "study.toml"))
    return ("## New-style section\\n\\nfiles %s; status %s; study %s; tasks %s; plugins %s"
            % (files, manifest["status"], study["study"]["name"], [t["name"] for t in study["tasks"]],
               sorted(p["name"] for p in manifest["plugins"] if p["name"] in ("old_section", "new_section"))))
'''


def test_report_sections_gets_run_dir_manifest_and_study_and_old_ones_still_work(tmp_path, monkeypatch, toy_env):
    from evalhost.report import write_report

    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    for name, text in (("old_section", OLD_SECTION), ("new_section", NEW_SECTION)):
        src = tmp_path / f"{name}_src.py"
        src.write_text(text)
        make_distribution(toy_env, name=f"evalhost-{name.replace('_', '-')}", module=f"evalhost_{name}",
                          source=src, entry=name)
    importlib.invalidate_caches()
    reg_mod._REGISTRY = None
    assert not [p for p in reg_mod.get_registry().problems if "section" in p]
    path = _study(tmp_path)
    records = _run(path)
    run_dir = path.parent / "runs" / records[0]["run_id"]
    text = write_report(run_dir, plots=False).read_text()
    assert "## Old-style section\n\n12 records" in text
    assert ("## New-style section\n\nfiles ['records.jsonl', 'study.toml']; status complete; study toy; "
            "tasks ['toyset']; plugins ['new_section', 'old_section']") in text
    assert "failed in report_sections" not in text


def test_pluggy_passes_an_implementation_only_the_arguments_it_names():
    """What the backwards compatibility rests on: pluggy's own hook call with every argument reaches an
    implementation that names only ``summary``. pluggy: "Args are always opt in for hookimpls regardless of whether
    the spec or call defines more then the impl accepts" (pytest-dev/pluggy commit 429c5fc, issue #170)."""
    import pluggy

    from evalhost import hookspecs

    pm = pluggy.PluginManager("evalhost")
    pm.add_hookspecs(hookspecs)

    class Old:
        @hookspecs.hookimpl
        def report_sections(self, summary):
            return f"old {summary['n']}"

    class New:
        @hookspecs.hookimpl
        def report_sections(self, records, study):
            return f"new {len(records)} {study['study']['name']}"

    pm.register(Old())
    pm.register(New())
    out = pm.hook.report_sections(summary={"n": 3}, records=[{}, {}], run_dir=None, manifest={},
                                  study={"study": {"name": "s"}})
    assert sorted(out) == ["new 2 s", "old 3"]


# -- 4. evalhost.testing ---------------------------------------------------------------------------------------
def _toy_text(tmp_path: Path, n_items: int = 6) -> str:
    tasks = write_tasks(tmp_path / "tasks.jsonl", n_items)
    return study_text(tasks, tmp_path / "runs", (2,)).replace(f'output_dir = "{tmp_path / "runs"}"\n', "")


def test_register_module_and_run_study_in_without_installing(tmp_path, fresh_registry):
    """The toy plugin module, never installed (no dist-info on sys.path): registered for a with block, a study
    runs on it in tmp_path, and the registry is the old one afterwards."""
    from evalhost.testing import register_module, run_study_in
    from toy import evalhost_toy

    before = reg_mod.get_registry()
    assert ("backend", "toy") not in before.entries
    with register_module(evalhost_toy) as registry:
        assert registry.entry("backend", "toy").distribution == "toy.evalhost_toy (not installed)"
        records = run_study_in(tmp_path, _toy_text(tmp_path))
    assert reg_mod.get_registry() is before
    assert len(records) == 12 and records.run_dir.parent == tmp_path / "runs"
    assert records.manifest["status"] == "complete"
    assert {r["condition"] for r in records} == {"solo", "batch"}
    # the solo cache lives in tmp_path: a second run there hits it
    again = run_study_in(tmp_path, _toy_text(tmp_path), plugins=[evalhost_toy])
    assert all(r["dispatch_evidence"].get("solo_cache") == "hit" for r in again if r["condition"] == "solo")
    assert (tmp_path / "solo-cache").is_dir()


def test_register_module_refuses_a_broken_module(tmp_path, fresh_registry, monkeypatch):
    from evalhost.errors import PluginError
    from evalhost.testing import register_module

    (tmp_path / "misspelled_plugin.py").write_text(
        "from evalhost.api import hookimpl\n@hookimpl\ndef register_scorer(register):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="misspelled_plugin.*implements a hook evalhost does not define"):
        with register_module("misspelled_plugin"):
            pass
    assert reg_mod._REGISTRY is None


def test_fake_server_fault_switches(tmp_path):
    import httpx

    from evalhost.testing import FakeServer

    body = {"model": "m", "prompt": ["first prompt", "second"], "return_token_ids": True}
    with FakeServer(tmp_path, fail_500_on=[1], omit_index_on=[3], die_on=[4]) as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=10).status_code == 500
        ok = httpx.post(server.url + "/v1/completions", json=body, timeout=10).json()
        assert [c["index"] for c in ok["choices"]] == [1, 0]  # out of order on purpose
        assert ok["choices"][1]["text"] == "echo:first prompt"  # "echo:" + the prompt's first 12 characters
        assert ok["choices"][1]["token_ids"] == [ord(c) for c in ok["choices"][1]["text"]]
        no_index = httpx.post(server.url + "/v1/completions", json=body, timeout=10).json()
        assert all("index" not in c for c in no_index["choices"])
        with pytest.raises(httpx.HTTPError):
            httpx.post(server.url + "/v1/completions", json=body, timeout=10)
        assert server.requests == 4
        server.proc.wait(timeout=10)
        assert server.proc.returncode == 9
    assert "simulated crash on request #4" in server.log.read_text()


def test_fake_server_argv_refuses_an_unknown_switch(tmp_path):
    from evalhost.testing import fake_server_argv

    assert fake_server_argv(1, tmp_path / "s", hang_on=2, exit_at_start=True)[-3:] == ["--hang-on", "2",
                                                                                        "--exit-at-start"]
    with pytest.raises(TypeError, match="unknown fake server option 'die_at'"):
        fake_server_argv(1, tmp_path / "s", die_at=[1])


# -- 5. the example backend distribution ---------------------------------------------------------------------
ECHO = Path(__file__).resolve().parents[1] / "examples" / "evalhost-echo-backend"


ECHO_STUDY = """
[study]
name = "echo"

[[models]]
name = "none"
path = "none"

[[backends]]
name = "echo"
options = { batch_noise = 0.25 }

[[dispatchers]]
name = "prompt_list"
batch_sizes = [4]

[[tasks]]
name = "asks"
source = "jsonl:asks.jsonl"
scorer = "refusal"
"""


@pytest.fixture(scope="module")
def echo_installed():
    """The example installed for real (scripts/setup.sh does it; this installs it when missing)."""
    import importlib.metadata as md
    import subprocess

    try:
        version = md.version("evalhost-echo-backend")
    except md.PackageNotFoundError:
        version = None
    if version != "0.1.0":
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                               "--quiet", str(ECHO)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        importlib.invalidate_caches()
    return md.version("evalhost-echo-backend")


def test_echo_example_runs_through_its_entry_point_and_shows_flips(tmp_path, echo_installed, fresh_registry):
    from evalhost.testing import run_study_in

    entry = reg_mod.get_registry().entry("backend", "echo")
    assert (entry.distribution, entry.version, entry.plugin) == ("evalhost-echo-backend", "0.1.0", "echo")
    with open(tmp_path / "asks.jsonl", "w") as fh:
        for i in range(24):
            fh.write(json.dumps({"id": f"a{i:02d}", "prompt": f"Tell me fact {i} about rivers.",
                                 "domain": "safety"}) + "\n")
    records = run_study_in(tmp_path, ECHO_STUDY)
    solo = {r["item_id"]: r["label"] for r in records if r["condition"] == "solo"}
    flips = [r for r in records if r["condition"] == "batch" and r["label"] != solo[r["item_id"]]]
    assert set(solo.values()) == {"comply"} and 1 <= len(flips) < 24
    assert all(r["backend_extra"]["perturbed"] for r in flips)
    fp = records.manifest["fingerprints"][records[0]["fingerprint_id"]]
    assert fp["plugins"]["backend:echo"] == "evalhost-echo-backend==0.1.0"


def test_echo_example_own_tests_pass(echo_installed):
    """The example's own test suite, run the way its author runs it (pytest in its directory)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=ECHO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_echo_example_imports_only_the_api():
    """The plugin and its tests import evalhost.api and nothing else of evalhost."""
    import ast

    files = [ECHO / "evalhost_echo_backend" / "__init__.py", *sorted((ECHO / "tests").glob("*.py"))]
    for path in files:
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert {n for n in names if n.split(".")[0] == "evalhost"} <= {"evalhost.api"}, path
    assert "evalhost.api" in (ECHO / "evalhost_echo_backend" / "__init__.py").read_text()
