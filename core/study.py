"""Study files (TOML): schema, validation and the typed :class:`Study`.

Every problem is reported as one sentence naming the file and the key (``tasks[1].limit``), with "did you mean" for
misspelled keys; the CLI turns it into exit code 2. Plugin names are checked later, against the registry, in
:mod:`evalhost.plan`.

Bounds (so no input can make evalhost write outside ``output_dir``, recurse, or expand without end): ``study.name``
is one path component of ``[A-Za-z0-9._-]``, at most :data:`MAX_NAME` characters, not ``.`` or ``..``; other names
and labels at most :data:`MAX_NAME` characters, a matrix configuration's label at most :data:`MAX_LABEL`; tables
and arrays nest at most :data:`MAX_DEPTH` levels; at most :data:`MAX_BACKEND_CONFIGS` backend configurations,
counted from the matrix axes before any is expanded; options hold no TOML dates (they are recorded as JSON).
:func:`load_study` (``evalhost run``) also applies :func:`check_output_dir`.
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
from .options import unknown_key
from .types import DOMAINS, ModelSpec, Sampling

DTYPES = ("auto", "float32", "float16", "bfloat16")
MAX_BATCH = 4096
MAX_TOKENS = 131072
MAX_REPEATS = 1000

# key -> (type(s), required, check) per table. check(value) returns an error fragment or None.
_pos = lambda v: None if v >= 1 else "must be at least 1"  # noqa: E731
_nonneg = lambda v: None if v >= 0 else "must not be negative"  # noqa: E731
_unit = lambda v: None if 0 < v <= 1 else "must be in (0, 1]"  # noqa: E731
_maxtok = lambda v: None if 1 <= v <= MAX_TOKENS else f"must be between 1 and {MAX_TOKENS}"  # noqa: E731
# vLLM refuses more than max_logprobs (default 20: vllm/config/model.py, ModelConfig.max_logprobs) per token
MAX_TOP_LOGPROBS = 20
_top_logprobs = lambda v: None if 0 <= v <= MAX_TOP_LOGPROBS else (  # noqa: E731
    f"must be between 0 (off) and {MAX_TOP_LOGPROBS} (vLLM's default max_logprobs); 2 or more gives the margin "
    f"between the top two tokens")
_repeats = lambda v: _pos(v) or (None if v <= MAX_REPEATS else f"must be at most {MAX_REPEATS}")  # noqa: E731
_nonempty = lambda v: None if v.strip() else "must not be empty"  # noqa: E731

MAX_NAME = 100
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_DEPTH = 32  # tables/arrays nested in a study file; real studies use 3 or 4
MAX_BACKEND_CONFIGS = 256  # backend configurations of a study, all [backends.matrix] products together
# output_dir may not be one of these system directories or lie inside one (root could write there)
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
                "/sys", "/usr", "/var/cache", "/var/lib", "/var/lock", "/var/log", "/var/mail", "/var/run",
                "/var/spool")
SYSTEM_ROOTS = ("/", "/home", "/media", "/mnt", "/opt", "/srv", "/var")  # themselves only (not what is below)


def _label(v: str) -> str | None:
    """Names and labels of models, backends, dispatchers, tasks, scorers: they become part of cell ids, record keys
    and log file names."""
    return _nonempty(v) or (None if len(v) <= MAX_NAME else f"must be at most {MAX_NAME} characters")


MAX_LABEL = 150  # a backend configuration's label: "name[axis=value,...]" (it names the server's log file)


def _study_name(v: str) -> str | None:
    """The run directory is ``output_dir/NAME-TIMESTAMP``: the name must be one harmless path component."""
    if not v or len(v) > MAX_NAME:
        return f"must be 1 to {MAX_NAME} characters long (it names the run directory)"
    if v in (".", ".."):
        return "must not be '.' or '..' (it names the run directory); e.g. \"my_study\""
    if not set(v) <= NAME_CHARS:
        return "may only use letters, digits, '.', '_' and '-' (it names the run directory); e.g. \"my_study\""
    return None


def _cut(text: Any, n: int = 40) -> str:
    """A key or name from the file, cut to about ``n`` characters for an error sentence."""
    text = str(text)
    return text if len(text) <= n else f"{text[:n - 3]}... ({len(text)} characters)"


def _shown(value: Any, n: int = 60) -> str:
    """``repr(value)`` cut to about ``n`` characters (an error sentence stays one short line)."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 5] + "...'" + f" ({len(str(value))} characters)"


def _enum(*allowed):
    return lambda v: None if v in allowed else f"must be one of {', '.join(allowed)}"


def _batch_sizes(v):
    if not v:
        return "must list at least one batch size"
    for b in v:
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= MAX_BATCH:
            return f"must hold integers between 1 and {MAX_BATCH} (got {b!r})"
    return None


SCHEMA: dict[str, dict[str, tuple]] = {
    "study": {
        "name": (str, True, _study_name),
        "seed": (int, False, None),
        "output_dir": (str, False, _nonempty),
        "description": (str, False, None),
        "phase": (str, False, None),
        "repeats": (int, False, _repeats),
        "solo_repeats": (int, False, _repeats),
        "flip_on": (str, False, _enum("label", "score")),
        "count_unverified": (bool, False, None),  # batch groups without co-batching evidence count (evalhost.cobatch)
    },
    "sampling": {
        "temperature": ((int, float), False, _nonneg),
        "top_p": ((int, float), False, _unit),
        "max_tokens": (int, False, _maxtok),
        "seed": (int, False, None),
        "logprobs": (int, False, _nonneg),
        "top_logprobs": (int, False, _top_logprobs),
    },
    "models": {
        "name": (str, True, _label),
        "path": (str, True, _nonempty),
        "dtype": (str, False, _enum(*DTYPES)),
        "alignment_type": (str, False, None),
    },
    "backends": {
        "name": (str, True, _label),
        "label": (str, False, _label),
        "options": (dict, False, None),
        "matrix": (dict, False, None),
    },
    "dispatchers": {
        "name": (str, True, _label),
        "label": (str, False, _label),
        "batch_sizes": (list, False, _batch_sizes),
        "options": (dict, False, None),
    },
    "tasks": {
        "name": (str, True, _label),
        "source": (str, True, _nonempty),
        "limit": (int, False, _pos),
        "domain": (str, False, _enum(*DOMAINS)),
        "scorer": (str, False, _label),
        "scorer_options": (dict, False, None),
        "options": (dict, False, None),
    },
}
TOP = {"study": "table", "sampling": "table", "models": "list", "backends": "list", "dispatchers": "list",
       "tasks": "list"}
REQUIRED_TOP = ("study", "models", "backends", "tasks")
_TYPE_NAMES = {str: "a string", int: "an integer", dict: "a table", list: "a list", (int, float): "a number",
               bool: "true or false"}


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


def _where(path: Path | None) -> str:
    return f"{path}: " if path else ""


def _fail(path: Path | None, msg: str) -> UserError:
    return UserError(_where(path) + msg)


def _typename(t) -> str:
    return _TYPE_NAMES.get(t, getattr(t, "__name__", str(t)))


def _check_table(table: Any, schema: dict[str, tuple], where: str, path: Path | None) -> None:
    if not isinstance(table, dict):
        raise _fail(path, f"'{where}' must be a table ([{where}] or [[{where}]]), got {type(table).__name__}")
    unknown = unknown_key(table, schema, f"{where}.")
    if unknown is not None:
        key, hint = unknown
        raise _fail(path, f"unknown key '{where}.{_cut(key)}'{hint or '; allowed: ' + ', '.join(schema)}")
    for key, (typ, required, check) in schema.items():
        if key not in table:
            if required:
                raise _fail(path, f"missing required key '{where}.{key}'")
            continue
        value = table[key]
        ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
        if typ is list and isinstance(value, list):
            ok = True
        if not ok:
            raise _fail(path, f"'{where}.{key}' must be {_typename(typ)}, got {type(value).__name__} "
                              f"{_shown(value)}")
        if check is not None:
            problem = check(value)
            if problem:
                raise _fail(path, f"'{where}.{key}' {problem} (got {_shown(value)})")


def _unique(names: list[str], what: str, path: Path | None) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise _fail(path, f"two {what} are named '{_cut(n)}'; give each a unique name (or label)")
        seen.add(n)


def _expand_matrix(label: str, plugin: str, options: dict, matrix: dict, where: str, path) -> list[BackendConfig]:
    if not matrix:
        return [BackendConfig(label, plugin, options)]
    keys = list(matrix)
    for k in keys:
        if not isinstance(matrix[k], list) or not matrix[k]:
            raise _fail(path, f"'{where}.matrix.{_cut(k)}' must be a non-empty list of option values")
        if k in options:
            raise _fail(path, f"'{_cut(k)}' is set both in '{where}.options' and '{where}.matrix'; keep one")
    n = math.prod(len(matrix[k]) for k in keys)  # counted before anything is expanded
    if n > MAX_BACKEND_CONFIGS:
        raise _fail(path, f"'{where}.matrix' makes {n} backend configurations ({len(keys)} axes), more than the "
                          f"limit of {MAX_BACKEND_CONFIGS}; drop axes or values, or split the study")
    out = []
    for values in itertools.product(*(matrix[k] for k in keys)):
        axes = dict(zip(keys, values))
        tag = ",".join(f"{k}={v}" for k, v in axes.items())
        if len(label) + len(tag) + 2 > MAX_LABEL:
            raise _fail(path, f"'{where}.matrix' makes a configuration label of {len(label) + len(tag) + 2} "
                              f"characters ({_cut(tag)}); use shorter axis names and values (at most {MAX_LABEL} "
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
        raise _fail(path, f"nests tables or arrays too deeply to read; use at most {MAX_DEPTH} levels") from None
    except tomllib.TOMLDecodeError as exc:
        raise _fail(path, f"is not valid TOML ({exc}); fix the syntax at that line")
    if _depth(data) > MAX_DEPTH:
        raise _fail(path, f"nests tables or arrays more than {MAX_DEPTH} levels deep; flatten the options")
    unknown = unknown_key(data, TOP)
    if unknown is not None:
        key, hint = unknown
        raise _fail(path, f"unknown top-level key '{_cut(key)}'{hint or '; allowed: ' + ', '.join(TOP)}")
    for key, kind in TOP.items():
        if key not in data:
            continue
        if kind == "table":
            _check_table(data[key], SCHEMA[key], key, path)
        else:
            if not isinstance(data[key], list) or not data[key]:
                raise _fail(path, f"'{key}' must be a non-empty list of tables ([[{key}]])")
            for i, t in enumerate(data[key]):
                _check_table(t, SCHEMA[key], f"{key}[{i}]", path)

    for key in REQUIRED_TOP:
        if key not in data:
            form = f"[{key}]" if TOP[key] == "table" else f"[[{key}]]"
            raise _fail(path, f"missing required section '{key}'; add a {form} section")

    for key in ("backends", "dispatchers", "tasks"):
        for i, t in enumerate(data[key] if key in data else []):
            for sub in ("options", "matrix", "scorer_options"):
                where = _not_plain(t.get(sub), f"{key}[{i}].{sub}")
                if where:
                    raise _fail(path, f"'{where[:80]}' is a TOML date or time, which options cannot carry (they are "
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
            raise _fail(path, f"'backends' make more than {MAX_BACKEND_CONFIGS} backend configurations; drop matrix "
                              f"values or split the study")
    _unique([b.label for b in backends], "backends", path)

    dispatchers = []
    for i, d in enumerate(data.get("dispatchers", [])):
        if d["name"] == "solo":
            raise _fail(path, f"'dispatchers[{i}]' is 'solo', which every study runs already as its baseline; remove it")
        if "batch_sizes" not in d:
            raise _fail(path, f"missing required key 'dispatchers[{i}].batch_sizes' (e.g. batch_sizes = [4, 8])")
        dispatchers.append(DispatcherConfig(d.get("label", d["name"]), d["name"], tuple(d["batch_sizes"]),
                                            dict(d.get("options", {}))))
    _unique([d.label for d in dispatchers], "dispatchers", path)

    tasks = [TaskSpec(t["name"], t["source"], t.get("limit"), t.get("domain"), t.get("scorer"),
                      dict(t.get("scorer_options", {})), dict(t.get("options", {}))) for t in data["tasks"]]
    _unique([t.name for t in tasks], "tasks", path)

    out_dir = user_path(s.get("output_dir", "runs"), f"{_where(path)}'study.output_dir'")
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
