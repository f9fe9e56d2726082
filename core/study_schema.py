"""The study file's schema: each table's keys with their type, whether required, and their check; the bounds; and
:func:`check_table`, which turns the first problem into one sentence naming the file and the key
(``tasks[1].limit``), with "did you mean" for a misspelled key (:func:`evalhost.options.unknown_key`).

:mod:`evalhost.study` parses the TOML, checks each table here, and builds the typed :class:`~evalhost.study.Study`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UserError
from .options import unknown_key
from .types import DOMAINS

DTYPES = ("auto", "float32", "float16", "bfloat16")
MAX_BATCH = 4096
MAX_TOKENS = 131072
MAX_REPEATS = 1000

# key -> (type(s), required, check) per table. check(value) returns an error fragment or None.
_pos = lambda v: None if v >= 1 else "must be at least 1"  # noqa: E731
_nonneg = lambda v: None if 0 <= v < float("inf") else "must be a finite number, not negative"  # noqa: E731
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


def cut(text: Any, n: int = 40) -> str:
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
    seen: set[int] = set()
    for b in v:  # one batch size is one cell: listed twice, the plan counted its groups twice
        if b in seen:
            return f"lists batch size {b} twice; each batch size is one cell, so list it once"
        seen.add(b)
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


def file_prefix(path: Path | None) -> str:
    """``"PATH: "`` in front of a sentence about the study file ``path`` (nothing for a study given as text)."""
    return f"{path}: " if path else ""


def fail(path: Path | None, msg: str) -> UserError:
    """The :class:`UserError` for one problem of the study file ``path``."""
    return UserError(file_prefix(path) + msg)


def _typename(t) -> str:
    return _TYPE_NAMES.get(t, getattr(t, "__name__", str(t)))


def check_table(table: Any, schema: dict[str, tuple], where: str, path: Path | None) -> None:
    if not isinstance(table, dict):
        raise fail(path, f"'{where}' must be a table ([{where}] or [[{where}]]), got {type(table).__name__}")
    unknown = unknown_key(table, schema, f"{where}.")
    if unknown is not None:
        key, hint = unknown
        raise fail(path, f"unknown key '{where}.{cut(key)}'{hint or '; allowed: ' + ', '.join(schema)}")
    for key, (typ, required, check) in schema.items():
        if key not in table:
            if required:
                raise fail(path, f"missing required key '{where}.{key}'")
            continue
        value = table[key]
        ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
        if typ is list and isinstance(value, list):
            ok = True
        if not ok:
            raise fail(path, f"'{where}.{key}' must be {_typename(typ)}, got {type(value).__name__} "
                              f"{_shown(value)}")
        if check is not None:
            problem = check(value)
            if problem:
                raise fail(path, f"'{where}.{key}' {problem} (got {_shown(value)})")


def check_sections(data: dict[str, Any], path: Path | None) -> None:
    """The parsed file's sections: no unknown one, each a table or a non-empty list of tables as :data:`TOP` says,
    every key checked (:func:`check_table`), the required ones present."""
    unknown = unknown_key(data, TOP)
    if unknown is not None:
        key, hint = unknown
        raise fail(path, f"unknown top-level key '{cut(key)}'{hint or '; allowed: ' + ', '.join(TOP)}")
    for key, kind in TOP.items():
        if key not in data:
            continue
        if kind == "table":
            check_table(data[key], SCHEMA[key], key, path)
        else:
            if not isinstance(data[key], list) or not data[key]:
                raise fail(path, f"'{key}' must be a non-empty list of tables ([[{key}]])")
            for i, t in enumerate(data[key]):
                check_table(t, SCHEMA[key], f"{key}[{i}]", path)
    for key in REQUIRED_TOP:
        if key not in data:
            form = f"[{key}]" if TOP[key] == "table" else f"[[{key}]]"
            raise fail(path, f"missing required section '{key}'; add a {form} section")
