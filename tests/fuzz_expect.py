"""What a generated study or task file should get from ``evalhost run --dry-run``, decided before it runs.

The fuzz tests (tests/test_fuzz_inputs.py) generate inputs that are mostly bad but sometimes valid. Each input is
classified here first: :func:`study_problem` / :func:`task_file_problem` return ``None`` for a valid input (the dry
run must exit 0 and print a plan) or a short reason it is bad (the dry run must exit 2 with one ``error:`` sentence).

The rules are written from the documentation (README "Limits on a study" and its annotated study file,
tasks/README.md "Item format"; the task-file rules are in tests/fuzz_expect_items.py) rather than by calling the
code under test, so a check that evalhost forgets shows up as a bad input that exited 0. Where the documentation
leaves a detail open (an integer item id, a whitespace-only line), the rule is the one evalhost implements and
says so. Two things are taken as given instead of re-derived:

* which plugin names exist (the registry: the built-ins and the toy distribution the tests install), and
* each plugin's own option rules: a plugin's ``check_options`` is the specification of its options (tested with the
  plugin); the host's part, tested here, is that a refusal becomes exit 2 with one sentence.

A dry run does not resolve model paths (that may convert or download a model); beyond the schema's rule (a non-empty
string), a backend's own ``check_model`` (side-effect free, tested with the backend: ``evalhost.api.check_model_path``)
is the specification of the model paths it accepts, as ``check_options`` is of its options.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

from fuzz_expect_items import (DOMAINS, Unclassified, _is_int, _plugin_problem, items_scorer_problem,  # noqa: F401
                               task_file_problem)

MAX_NAME, MAX_LABEL, MAX_DEPTH = 100, 150, 32
MAX_BACKEND_CONFIGS, MAX_CELLS, MAX_PROMPTS = 256, 20_000, 1_000_000
MAX_BATCH, MAX_TOKENS, MAX_REPEATS, MAX_TOP_LOGPROBS = 4096, 131072, 1000, 20
# the README's "system directories": these trees and everything in them, and these top-level directories themselves
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
                "/sys", "/usr", "/var/cache", "/var/lib", "/var/lock", "/var/log", "/var/mail", "/var/run",
                "/var/spool")
SYSTEM_ROOTS = ("/", "/home", "/media", "/mnt", "/opt", "/srv", "/var")
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


# ------------------------------------------------------------------------------------------------ study files
def _model_problem(registry, plugin: str, options: dict, models: list[dict]) -> str | None:
    """The backend's ``check_model`` refuses one of the study's model paths (its rule is taken as given)."""
    from evalhost.errors import UserError
    from evalhost.models import ModelNotHere
    from evalhost.types import ModelSpec

    cls = registry.find("backend", plugin).cls
    for m in models:
        try:
            cls.check_model(ModelSpec(m["name"], m["path"], m.get("dtype"), m.get("alignment_type")), dict(options))
        except ModelNotHere:
            continue  # names nothing on this machine: a dry run notes it and plans on (a real run refuses it)
        except UserError:
            return "a model path the backend cannot load"
    return None


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _nonempty(v):
    return bool(v.strip())


def _label(v):
    return bool(v.strip()) and len(v) <= MAX_NAME


def _study_name(v):
    return 0 < len(v) <= MAX_NAME and v not in (".", "..") and set(v) <= NAME_CHARS


def _batch_sizes(v):  # each batch size is one cell, so it is listed once
    return bool(v) and all(_is_int(b) and 1 <= b <= MAX_BATCH for b in v) and len(set(v)) == len(v)


def _repeats(v):
    return 1 <= v <= MAX_REPEATS


STR, INT, BOOL, DICT, LIST, NUM = "str", "int", "bool", "dict", "list", "number"
TYPES = {STR: lambda v: isinstance(v, str), INT: _is_int, BOOL: lambda v: isinstance(v, bool),
         DICT: lambda v: isinstance(v, dict), LIST: lambda v: isinstance(v, list), NUM: _number}
# table -> key -> (type, required, rule): the schema of docs/architecture.md and the README's limits
SCHEMA = {
    "study": {"name": (STR, True, _study_name), "seed": (INT, False, None), "output_dir": (STR, False, _nonempty),
              "description": (STR, False, None), "phase": (STR, False, None), "repeats": (INT, False, _repeats),
              "solo_repeats": (INT, False, _repeats), "flip_on": (STR, False, lambda v: v in ("label", "score")),
              "count_unverified": (BOOL, False, None)},
    "sampling": {"temperature": (NUM, False, lambda v: 0 <= v < float("inf")), "top_p": (NUM, False, lambda v: 0 < v <= 1),
                 "max_tokens": (INT, False, lambda v: 1 <= v <= MAX_TOKENS), "seed": (INT, False, None),
                 "logprobs": (INT, False, lambda v: 0 <= v < float("inf")),
                 "top_logprobs": (INT, False, lambda v: 0 <= v <= MAX_TOP_LOGPROBS)},
    "models": {"name": (STR, True, _label), "path": (STR, True, _nonempty),
               "dtype": (STR, False, lambda v: v in ("auto", "float32", "float16", "bfloat16")),
               "alignment_type": (STR, False, None)},
    "backends": {"name": (STR, True, _label), "label": (STR, False, _label), "options": (DICT, False, None),
                 "matrix": (DICT, False, None)},
    "dispatchers": {"name": (STR, True, _label), "label": (STR, False, _label),
                    "batch_sizes": (LIST, True, _batch_sizes), "options": (DICT, False, None)},
    "tasks": {"name": (STR, True, _label), "source": (STR, True, _nonempty), "limit": (INT, False, lambda v: v >= 1),
              "domain": (STR, False, lambda v: v in DOMAINS), "scorer": (STR, False, _label),
              "scorer_options": (DICT, False, None), "options": (DICT, False, None)},
}
LISTS = ("models", "backends", "dispatchers", "tasks")
REQUIRED = ("study", "models", "backends", "tasks")


def _depth(node, level=1) -> int:
    children = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
    return max([level] + [_depth(c, level + 1) for c in children if isinstance(c, (dict, list))])


def _has_datetime(node) -> bool:
    if isinstance(node, (dt.date, dt.time)):
        return True
    if isinstance(node, dict):
        return any(_has_datetime(v) for v in node.values())
    return isinstance(node, list) and any(_has_datetime(v) for v in node)


def _table_problem(table: Any, schema: dict, where: str) -> str | None:
    if not isinstance(table, dict):
        return f"{where} is not a table"
    unknown = [k for k in table if k not in schema]
    if unknown:
        return f"unknown key {where}.{unknown[0]!r}"
    for key, (typ, required, rule) in schema.items():
        if key not in table:
            if required:
                return f"missing {where}.{key}"
            continue
        if not TYPES[typ](table[key]):
            return f"{where}.{key} is not a {typ}"
        if rule is not None:
            try:
                fine = rule(table[key])
            except TypeError:  # e.g. NaN compares false everywhere, but a type error means a wrong value too
                fine = False
            if not fine:
                return f"{where}.{key} out of range: {table[key]!r}"
    return None


def _path_exists(p: Path) -> bool | None:
    """Whether ``p`` exists; None when the OS refuses the name (too long, a NUL byte)."""
    try:
        os.stat(p)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError):
        return None


def _user_path(text: str) -> Path | None:
    try:
        p = Path(text).expanduser()
    except RuntimeError:  # ~user that does not exist
        return None
    return None if _path_exists(p) is None else p


def output_dir_problem(text: str) -> str | None:
    """README: a directory, or not there yet below one you may write to; not /, a top-level directory such as
    /home or /var, nor a system directory such as /etc or /usr (or inside one)."""
    p = _user_path(text)
    if p is None:
        return "output_dir cannot be used"
    p = p if p.is_absolute() else Path.cwd() / p
    real = os.path.realpath(p)
    if real in SYSTEM_ROOTS or any(real == t or real.startswith(t + "/") for t in SYSTEM_TREES):
        return "output_dir is a system directory"
    if p.exists() and not p.is_dir():
        return "output_dir is a file"
    existing = p
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return "output_dir lies inside a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "output_dir is not writable"
    return None


def builtin_items(name: str) -> list[dict] | None:
    root = resources.files("evalhost.tasks")
    name = name.strip().removesuffix(".jsonl")
    f = root.joinpath(f"{name}.jsonl")
    try:
        if not name or "/" in name or not f.is_file():
            return None
    except (OSError, ValueError):  # a name the OS refuses
        return None
    return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def task_items(task: dict, registry, study_dir: Path) -> tuple[str | None, list[dict]]:
    """(why the task's source gives no valid items, its raw items)."""
    source = task["source"]
    scheme, sep, location = source.partition(":")
    if not (sep and scheme in registry.names("task_source")):
        if source.lower().endswith(".jsonl"):
            scheme, location = "jsonl", source
        elif source.lower().endswith(".csv"):
            scheme, location = "csv", source
        else:
            return "the source names no known scheme", []
    why = _plugin_problem(registry, "task_source", scheme, task.get("options", {}))
    if why:
        return why, []
    if scheme == "builtin":
        items = builtin_items(location)
        return (None, items) if items is not None else ("no such built-in task set", [])
    if scheme in ("jsonl", "csv"):
        p = _user_path(location) if location else None
        if p is None:
            return "no usable task path", []
        if not p.is_absolute() and not p.exists():
            nearby = _user_path(str(study_dir / p))
            if nearby is not None and nearby.exists():
                p = nearby
        if not p.is_file():
            return "the task path is not a file", []
        return task_file_problem(p.read_bytes(), scheme, task.get("domain"))
    p = _user_path(location) if location else None
    if p is None or not p.exists():  # candidates:, hf-disk:, hf: sources of the generators name nothing real
        return f"nothing at the {scheme} location", []
    raise Unclassified(f"an existing path as a {scheme} source")


def _backend_configs(b: dict) -> list[tuple[str, dict]] | str:
    label, options, matrix = b.get("label", b["name"]), dict(b.get("options", {})), dict(b.get("matrix", {}))
    if not matrix:
        return [(label, options)]
    for k, v in matrix.items():
        if not isinstance(v, list) or not v:
            return "a matrix axis is not a non-empty list"
        if k in options:
            return "a key is both an option and a matrix axis"
    if math.prod(len(v) for v in matrix.values()) > MAX_BACKEND_CONFIGS:
        return "the matrix makes too many configurations"
    out = []

    def walk(i, axes):
        if i == len(matrix):
            out.append(axes)
            return
        key = list(matrix)[i]
        for value in matrix[key]:
            walk(i + 1, {**axes, key: value})

    walk(0, {})
    configs = []
    for axes in out:
        tag = ",".join(f"{k}={v}" for k, v in axes.items())
        if len(label) + len(tag) + 2 > MAX_LABEL:
            return "a configuration label is too long"
        configs.append((f"{label}[{tag}]", {**options, **axes}))
    return configs


def study_problem(text: str, registry, study_dir: Path) -> str | None:
    """Why the study text is a bad study for ``evalhost run --dry-run``, or None when it is a valid one."""
    import tomllib

    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError):
        return "not TOML"
    if _depth(data) > MAX_DEPTH:
        return "nested too deeply"
    unknown = [k for k in data if k not in SCHEMA]
    if unknown:
        return f"unknown top-level key {unknown[0]!r}"
    for key in SCHEMA:
        if key not in data:
            if key in REQUIRED:
                return f"missing section {key}"
            continue
        if key in LISTS:
            if not (isinstance(data[key], list) and data[key]):
                return f"{key} is not a non-empty list of tables"
            for i, t in enumerate(data[key]):
                why = _table_problem(t, SCHEMA[key], f"{key}[{i}]")
                if why:
                    return why
        else:
            why = _table_problem(data[key], SCHEMA[key], key)
            if why:
                return why
    for key in ("backends", "dispatchers", "tasks"):
        for t in data.get(key, []):
            if any(_has_datetime(t.get(sub)) for sub in ("options", "matrix", "scorer_options")):
                return "a TOML date in options"
    models = [m["name"] for m in data["models"]]
    if len(set(models)) != len(models):
        return "two models share a name"
    configs: list[tuple[str, str, dict]] = []
    for b in data["backends"]:
        made = _backend_configs(b)
        if isinstance(made, str):
            return made
        configs += [(label, b["name"], options) for label, options in made]
    if len(configs) > MAX_BACKEND_CONFIGS:
        return "too many backend configurations"
    if len({c[0] for c in configs}) != len(configs):
        return "two backend configurations share a label"
    dispatchers = data.get("dispatchers", [])
    if any(d["name"] == "solo" for d in dispatchers):
        return "solo listed as a dispatcher"
    labels = [d.get("label", d["name"]) for d in dispatchers]
    if len(set(labels)) != len(labels):
        return "two dispatchers share a label"
    tasks = data["tasks"]
    if len({t["name"] for t in tasks}) != len(tasks):
        return "two tasks share a name"
    why = output_dir_problem(data["study"].get("output_dir", "runs"))
    if why:
        return why
    # plugins: they exist and take their options; a dispatcher's needs are capabilities of every backend
    for _label_, plugin, options in configs:
        why = _plugin_problem(registry, "backend", plugin, options)
        if why:
            return why
        why = _model_problem(registry, plugin, options, data["models"])
        if why:
            return why
    for d in dispatchers:
        why = _plugin_problem(registry, "dispatcher", d["name"], d.get("options", {}))
        if why:
            return why
        needs = registry.find("dispatcher", d["name"]).cls.requires
        if any(set(needs) - set(registry.find("backend", plugin).cls.capabilities) for _l, plugin, _o in configs):
            return "a dispatcher needs a capability a backend lacks"
    items_of = {}
    for t in tasks:
        if t.get("scorer"):
            why = _plugin_problem(registry, "scorer", t["scorer"], t.get("scorer_options", {}))
            if why:
                return why
        why, items = task_items(t, registry, study_dir)
        if why:
            return why
        why = items_scorer_problem(items, t.get("scorer"), registry, t.get("scorer_options", {}))
        if why:
            return why
        items_of[t["name"]] = items[: t["limit"]] if t.get("limit") else items
    # the plan's size, counted as the README says: every (model, backend configuration) runs every task solo
    # (solo_repeats times) and in groups of each batch size (repeats times, a short last group padded)
    study = data["study"]
    repeats = study.get("repeats", 1)
    solo_repeats = study.get("solo_repeats", repeats)
    cells = prompts = 0
    for t in tasks:
        n = len(items_of[t["name"]])
        cells += 1
        prompts += solo_repeats * n
        for d in dispatchers:
            sizer = getattr(registry.find("dispatcher", d["name"]).cls, "group_size_for", None)
            fixed = int(sizer(d.get("options", {}))) if sizer else None
            for bs in d["batch_sizes"]:
                size = max(1, fixed or bs)
                cells += 1
                prompts += repeats * -(-n // size) * size
    n_configs = len(models) * len(configs)
    if n_configs * cells > MAX_CELLS:
        return "too many cells"
    if n_configs * prompts > MAX_PROMPTS:
        return "too many prompts"
    return None
