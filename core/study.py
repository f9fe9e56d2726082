"""Study files (TOML): schema, validation and the typed :class:`Study`.

Every problem is reported as one sentence naming the file and the key (``tasks[1].limit``), with "did you mean" for
misspelled keys; the CLI turns it into exit code 2. Plugin names are checked later, against the registry, in
:mod:`evalhost.plan`.

Bounds (so no input can make evalhost write outside ``output_dir``, recurse, or expand without end): ``study.name``
is one path component of ``[A-Za-z0-9._-]``, at most :data:`MAX_NAME` characters, not ``.`` or ``..``; other names
and labels at most :data:`MAX_NAME` characters, a matrix configuration's label at most :data:`MAX_LABEL`; tables
and arrays nest at most :data:`MAX_DEPTH` levels; at most :data:`MAX_BACKEND_CONFIGS` backend configurations,
counted from the matrix axes before any is expanded; options hold no TOML dates (they are recorded as JSON).
:func:`load_study` (``evalhost run``) also applies :func:`check_output_dir`. The schema and its checks are in
:mod:`evalhost.study_schema`.
"""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import UserError, user_path
# the bounds are the schema's; importable from here as before
from .study_schema import (DTYPES, MAX_BACKEND_CONFIGS, MAX_BATCH, MAX_DEPTH, MAX_LABEL, MAX_NAME,  # noqa: F401
                           MAX_REPEATS, MAX_TOKENS, MAX_TOP_LOGPROBS, SCHEMA, check_sections, cut, fail,
                           file_prefix)
from .types import ModelSpec, Sampling

# output_dir may not be one of these system directories or lie inside one (root could write there)
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
                "/sys", "/usr", "/var/cache", "/var/lib", "/var/lock", "/var/log", "/var/mail", "/var/run",
                "/var/spool")
SYSTEM_ROOTS = ("/", "/home", "/media", "/mnt", "/opt", "/srv", "/var")  # themselves only (not what is below)


@dataclass(frozen=True)
class BackendConfig:
    """One backend configuration: a plugin plus options (one point of the backend's ``matrix``)."""

    label: str
    plugin: str
    options: dict[str, Any]
    axes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DispatcherConfig:
    label: str
    plugin: str
    batch_sizes: tuple[int, ...]
    options: dict[str, Any]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str
    limit: int | None = None
    domain: str | None = None
    scorer: str | None = None
    scorer_options: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Study:
    name: str
    seed: int
    output_dir: Path
    sampling: Sampling
    models: list[ModelSpec]
    backends: list[BackendConfig]
    dispatchers: list[DispatcherConfig]
    tasks: list[TaskSpec]
    description: str = ""
    phase: str = ""
    repeats: int = 1
    solo_repeats: int = 1
    flip_on: str = "label"  # what counts as a flip in the rates: a label change or a score change
    count_unverified: bool = False  # whether batch groups with an `unverified` co-batching verdict count as batches
    path: Path | None = None
    text: str = ""


def _unique(names: list[str], what: str, path: Path | None) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise fail(path, f"two {what} are named '{cut(n)}'; give each a unique name (or label)")
        seen.add(n)


def _expand_matrix(label: str, plugin: str, options: dict, matrix: dict, where: str, path) -> list[BackendConfig]:
    if not matrix:
        return [BackendConfig(label, plugin, options)]
    keys = list(matrix)
    for k in keys:
        if not isinstance(matrix[k], list) or not matrix[k]:
            raise fail(path, f"'{where}.matrix.{cut(k)}' must be a non-empty list of option values")
        if k in options:
            raise fail(path, f"'{cut(k)}' is set both in '{where}.options' and '{where}.matrix'; keep one")
    n = math.prod(len(matrix[k]) for k in keys)  # counted before anything is expanded
    if n > MAX_BACKEND_CONFIGS:
        raise fail(path, f"'{where}.matrix' makes {n} backend configurations ({len(keys)} axes), more than the "
                          f"limit of {MAX_BACKEND_CONFIGS}; drop axes or values, or split the study")
    out = []
    for values in itertools.product(*(matrix[k] for k in keys)):
        axes = dict(zip(keys, values))
        tag = ",".join(f"{k}={v}" for k, v in axes.items())
        if len(label) + len(tag) + 2 > MAX_LABEL:
            raise fail(path, f"'{where}.matrix' makes a configuration label of {len(label) + len(tag) + 2} "
                              f"characters ({cut(tag)}); use shorter axis names and values (at most {MAX_LABEL} "
                              f"characters in all)")
        out.append(BackendConfig(f"{label}[{tag}]", plugin, {**options, **axes}, axes))
    return out


def _not_plain(value: Any, where: str) -> str | None:
    """Where a TOML date/time sits in ``value`` (options end up in JSON records and manifests), or None."""
    import datetime as dt

    stack = [(value, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, (dt.date, dt.time)):  # datetime is a date
            return at
        if isinstance(node, dict):
            stack += [(v, f"{at}.{k}") for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(v, f"{at}[{n}]") for n, v in enumerate(node)]
    return None


def _depth(data: Any) -> int:
    """How deeply tables and arrays nest (without recursion: the input may be thousands of levels deep)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node
        stack += [(c, level + 1) for c in children if isinstance(c, (dict, list))]
    return deepest


def parse_study(text: str, path: Path | None = None) -> Study:
    """Validate TOML text and build a :class:`Study`; raises UserError with one sentence on any problem."""
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise fail(path, f"nests tables or arrays too deeply to read; use at most {MAX_DEPTH} levels") from None
    except tomllib.TOMLDecodeError as exc:
        raise fail(path, f"is not valid TOML ({exc}); fix the syntax at that line")
    if _depth(data) > MAX_DEPTH:
        raise fail(path, f"nests tables or arrays more than {MAX_DEPTH} levels deep; flatten the options")
    check_sections(data, path)

    for key in ("backends", "dispatchers", "tasks"):
        for i, t in enumerate(data[key] if key in data else []):
            for sub in ("options", "matrix", "scorer_options"):
                where = _not_plain(t.get(sub), f"{key}[{i}].{sub}")
                if where:
                    raise fail(path, f"'{where[:80]}' is a TOML date or time, which options cannot carry (they are "
                                      f"recorded as JSON); write it as a string")
    s = data["study"]
    samp = data.get("sampling", {})
    sampling = Sampling(
        temperature=float(samp.get("temperature", 0.0)),
        top_p=float(samp.get("top_p", 1.0)),
        max_tokens=int(samp.get("max_tokens", 128)),
        seed=int(samp.get("seed", s.get("seed", 42))),
        logprobs=samp.get("logprobs"),
        top_logprobs=int(samp.get("top_logprobs", 0)),
    )
    models = [ModelSpec(m["name"], m["path"], m.get("dtype"), m.get("alignment_type")) for m in data["models"]]
    _unique([m.name for m in models], "models", path)

    backends: list[BackendConfig] = []
    for i, b in enumerate(data["backends"]):
        backends += _expand_matrix(b.get("label", b["name"]), b["name"], dict(b.get("options", {})),
                                   dict(b.get("matrix", {})), f"backends[{i}]", path)
        if len(backends) > MAX_BACKEND_CONFIGS:
            raise fail(path, f"'backends' make more than {MAX_BACKEND_CONFIGS} backend configurations; drop matrix "
                              f"values or split the study")
    _unique([b.label for b in backends], "backends", path)

    dispatchers = []
    for i, d in enumerate(data.get("dispatchers", [])):
        if d["name"] == "solo":
            raise fail(path, f"'dispatchers[{i}]' is 'solo', which every study runs already as its baseline; remove it")
        if "batch_sizes" not in d:
            raise fail(path, f"missing required key 'dispatchers[{i}].batch_sizes' (e.g. batch_sizes = [4, 8])")
        dispatchers.append(DispatcherConfig(d.get("label", d["name"]), d["name"], tuple(d["batch_sizes"]),
                                            dict(d.get("options", {}))))
    _unique([d.label for d in dispatchers], "dispatchers", path)

    tasks = [TaskSpec(t["name"], t["source"], t.get("limit"), t.get("domain"), t.get("scorer"),
                      dict(t.get("scorer_options", {})), dict(t.get("options", {}))) for t in data["tasks"]]
    _unique([t.name for t in tasks], "tasks", path)

    out_dir = user_path(s.get("output_dir", "runs"), f"{file_prefix(path)}'study.output_dir'")
    repeats = int(s.get("repeats", 1))
    return Study(
        name=s["name"], seed=int(s.get("seed", 42)),
        output_dir=out_dir if out_dir.is_absolute() else Path.cwd() / out_dir,
        sampling=sampling, models=models, backends=backends, dispatchers=dispatchers, tasks=tasks,
        description=s.get("description", ""), phase=s.get("phase", ""), repeats=repeats,
        solo_repeats=int(s.get("solo_repeats", repeats)), flip_on=s.get("flip_on", "label"), path=path, text=text,
        count_unverified=bool(s.get("count_unverified", False)),
    )


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file {path} does not exist; pass the path to a .toml study (see studies/)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save the study file as UTF-8")
    study = parse_study(text, path)
    check_output_dir(study.output_dir, f"{path}: 'study.output_dir'")
    return study


def check_output_dir(out: Path, what: str) -> None:
    """The rule for ``output_dir`` (checked before anything is planned or written): it is a directory, or does not
    exist yet below a directory we may write to; it is not ``/``, a top-level directory such as ``/home`` or
    ``/var``, nor a system directory such as ``/etc`` or ``/usr`` (or anything inside one)."""
    import os

    try:
        real = os.path.realpath(out)
        system = real in SYSTEM_ROOTS or any(real == t or real.startswith(t + "/") for t in SYSTEM_TREES)
        if system:
            raise UserError(f"{what} {str(out)[:80]!r} is a system directory; write runs to a directory of your own, "
                            f"e.g. output_dir = \"runs\"")
        if out.exists() and not out.is_dir():
            raise UserError(f"{what} {str(out)[:80]!r} is a file, not a directory; set it to a directory (default "
                            f"\"runs\")")
        existing = out
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"{what} {str(out)[:80]!r} lies inside {str(existing)[:80]!r}, which is a file; set it "
                            f"to a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{what} {str(out)[:80]!r} cannot be written here ({str(existing)[:80]!r} is not "
                            f"writable); set it to a directory you may write to")
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        why = exc.strerror if isinstance(exc, OSError) else "it holds a NUL byte"
        raise UserError(f"{what} {str(out)[:80]!r} cannot be used ({why}); check the path") from None
