"""Task sources that read files: ``builtin:NAME``, ``jsonl:PATH`` and ``csv:PATH``.

One item per JSONL line (see ``tasks/README.md``)::

    {"id": "mm-001", "prompt": "...", "domain": "capability", "choices": {"A": "...", "B": "..."},
     "answer": "B", "targets": null, "scorer": "mcq", "metadata": {"subject": "chemistry"}}

``prompt`` or ``messages`` (a list of ``{"role", "content"}``) is required; so is ``id``; ``domain`` may come from the
task's ``domain`` option instead. A CSV has a header row with ``id``, ``prompt``, ``domain``, ``answer``, ``scorer``,
``choice_A`` ... ``choice_E``, ``target_stereotyped`` / ``target_anti_stereotyped`` / ``target_unknown``; any other
column goes into ``metadata``. Empty cells count as absent.

Options given by the host: ``task`` (the task name from the study; set on every item), ``domain`` (default for items
without one), ``scorer`` (the task's scorer, stored on items without one; it scores every item of the task, also one
that names its own: the host's rule, ``evalhost.scoring.scorer_for``, puts the task's scorer first). A problem in a
file is a :class:`UserError` naming ``file:line`` and the fix.
"""
from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from evalhost.api import (DOMAINS, TaskItem, TaskSource, UserError, did_you_mean, hookimpl,
                          item_from_dict, user_path)

TARGET_KEYS = ("stereotyped", "anti_stereotyped", "unknown")

OPTION_KEYS = ("task", "domain", "scorer")


def _fail(where: str, problem: str, fix: str) -> UserError:
    return UserError(f"{where}: {problem}; {fix}")


def check_options(options: dict[str, Any], where: str) -> tuple[str, str | None, str | None]:
    """Validate the host's options; return (task, default domain, default scorer)."""
    task = options.get("task") or Path(where).stem
    domain = options.get("domain")
    if domain is not None and domain not in DOMAINS:
        raise UserError(f"task '{task}' has domain '{domain}'; use one of: {', '.join(DOMAINS)}")
    scorer = options.get("scorer")
    if scorer is not None and not isinstance(scorer, str):
        raise UserError(f"task '{task}' has a scorer that is not a name; write e.g. scorer = \"refusal\"")
    return str(task), domain, scorer


def _unique(items: list[TaskItem], wheres: list[str]) -> list[TaskItem]:
    seen: dict[str, str] = {}
    for item, where in zip(items, wheres):
        if item.id in seen:
            raise _fail(where, f"id '{item.id}' repeats the id at {seen[item.id]}", "give every item a unique id")
        seen[item.id] = where
    return items


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _fail(f"{name}:{line}", "the file is not UTF-8 text", "re-save it with UTF-8 encoding") from None


def parse_jsonl(text: str, name: str, options: dict[str, Any]) -> list[TaskItem]:
    task, domain, scorer = check_options(options, name)
    items, wheres = [], []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(where, f"the line is not valid JSON ({exc.msg} at column {exc.colno})",
                        "fix it so the line is one JSON object") from None
        except (ValueError, RecursionError):  # an integer of more than 4300 digits, or arrays thousands deep
            raise _fail(where, "the line holds a number too long or nesting too deep to read",
                        "shorten it (ids are strings such as \"item-001\")") from None
        items.append(item_from_dict(raw, where, task, domain, scorer))
        wheres.append(where)
    if not items:
        raise UserError(f"{name}: the file has no items; add one JSON object per line")
    return _unique(items, wheres)


def parse_csv(text: str, name: str, options: dict[str, Any]) -> list[TaskItem]:
    task, domain, scorer = check_options(options, name)
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise UserError(f"{name}: the CSV cannot be parsed ({exc}); check its quoting") from None
    rows_numbered = [(n, r) for n, r in enumerate(rows, start=1) if any(c.strip() for c in r)]
    if not rows_numbered:
        raise UserError(f"{name}: the file is empty; add a header row (id,prompt,domain,...) and one row per item")
    header_line, header = rows_numbered[0]
    header = [h.strip() for h in header]
    for required in ("id",):
        if required not in header:
            raise _fail(f"{name}:{header_line}", f"the header has no '{required}' column",
                        "add it (columns: id,prompt,domain,answer,scorer,choice_A,...)")
    if "prompt" not in header:
        raise _fail(f"{name}:{header_line}", "the header has no 'prompt' column", "add a prompt column")
    items, wheres = [], []
    for number, row in rows_numbered[1:]:
        where = f"{name}:{number}"
        if len(row) != len(header):
            raise _fail(where, f"the row has {len(row)} cells but the header has {len(header)}",
                        "quote cells that contain commas")
        raw: dict[str, Any] = {}
        choices: dict[str, str] = {}
        targets: dict[str, str] = {}
        metadata: dict[str, str] = {}
        for column, cell in zip(header, row):
            if cell == "":
                continue
            if column.startswith("choice_") and len(column) == 8:
                choices[column[-1].upper()] = cell
            elif column.startswith("target_") and column[7:] in TARGET_KEYS:
                targets[column[7:]] = cell
            elif column in ("id", "prompt", "domain", "answer", "scorer"):
                raw[column] = cell
            elif column == "metadata":
                try:
                    parsed = json.loads(cell)
                except (ValueError, RecursionError):  # JSONDecodeError, or a number/nesting too big to read
                    raise _fail(where, "the metadata cell is not valid JSON", 'write it as {"key": "value"}') from None
                if isinstance(parsed, dict):
                    metadata.update(parsed)
            else:
                metadata[column] = cell
        if choices:
            raw["choices"] = dict(sorted(choices.items()))
        if targets:
            raw["targets"] = targets
        if metadata:
            raw["metadata"] = metadata
        items.append(item_from_dict(raw, where, task, domain, scorer))
        wheres.append(where)
    if not items:
        raise UserError(f"{name}: the file has a header but no items; add one row per item")
    return _unique(items, wheres)


def _read_path(location: str, kind: str) -> tuple[str, str]:
    if not location:
        raise UserError(f"the task source '{kind}:' has no path; write source = \"{kind}:path/to/file.{kind}\"")
    path = user_path(location, "the task file")
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "missing"
        raise UserError(f"the task file {path} is {what}; check the path in the study's source = \"{kind}:...\"")
    return _decode(path.read_bytes(), str(path)), str(path)


def builtin_names() -> list[str]:
    root = resources.files("evalhost.tasks")
    return sorted(p.name[: -len(".jsonl")] for p in root.iterdir() if p.name.endswith(".jsonl"))


class JsonlSource(TaskSource):
    options_known: tuple[str, ...] = ()  # a study's [[tasks]] options: none

    def load(self, location: str, options: dict[str, Any]) -> list[TaskItem]:
        text, name = _read_path(location, "jsonl")
        return parse_jsonl(text, name, options)


class CsvSource(TaskSource):
    options_known: tuple[str, ...] = ()  # a study's [[tasks]] options: none

    def load(self, location: str, options: dict[str, Any]) -> list[TaskItem]:
        text, name = _read_path(location, "csv")
        return parse_csv(text, name, options)


class BuiltinSource(TaskSource):
    """``builtin:NAME`` reads ``NAME.jsonl`` shipped in the ``evalhost.tasks`` package."""

    options_known: tuple[str, ...] = ()  # a study's [[tasks]] options: none

    def load(self, location: str, options: dict[str, Any]) -> list[TaskItem]:
        name = location.strip()
        if name.endswith(".jsonl"):
            name = name[: -len(".jsonl")]
        known = builtin_names()
        if name not in known:
            raise UserError(f"there is no built-in task set '{name}'{did_you_mean(name, known, 'builtin:')}; "
                            f"known: {', '.join(known)}")
        resource = resources.files("evalhost.tasks").joinpath(f"{name}.jsonl")
        text = _decode(resource.read_bytes(), f"builtin:{name}")
        options = dict(options)
        options.setdefault("task", name)
        return parse_jsonl(text, f"builtin:{name}", options)


def iter_sources() -> Iterable[tuple[str, type[TaskSource]]]:
    yield "builtin", BuiltinSource
    yield "jsonl", JsonlSource
    yield "csv", CsvSource


@hookimpl
def register_task_sources(register):
    for scheme, cls in iter_sources():
        register(scheme, cls)
