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
    implementation that names only ``summary`` (pluggy documents this: implementations may take fewer)."""
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
