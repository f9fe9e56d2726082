"""What a generated task file should get from ``evalhost run --dry-run`` (tasks/README.md "Item format"), decided
before it runs; the study-file rules, and why the rules are written this way, are in tests/fuzz_expect.py."""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from evalhost.errors import UserError

DOMAINS = ("safety", "capability")
ITEM_FIELDS = ("id", "prompt", "messages", "domain", "choices", "answer", "targets", "scorer", "metadata")
TARGET_KEYS = ("stereotyped", "anti_stereotyped", "unknown")
MAX_ITEM_ID = 200


class Unclassified(Exception):
    """An input these rules cannot decide (e.g. an existing directory given as a hub dataset); the test discards
    it. The generators practically never make one."""


# ------------------------------------------------------------------------------------------------ task items
def _storable(value: Any) -> bool:
    """Every string is UTF-8 text (no lone surrogate) and every integer fits a record (Python's 4300 digits)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(node, int) and not isinstance(node, bool):
            if node and math.log10(abs(node)) > 4290:
                return False
        elif isinstance(node, dict):
            stack += list(node.keys()) + list(node.values())
        elif isinstance(node, list):
            stack += node
    return True


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def item_problem(raw: Any, task_domain: str | None) -> str | None:
    """Why one decoded JSONL value is not a valid item (tasks/README.md), or None."""
    if not isinstance(raw, dict):
        return "not an object"
    if not _storable(raw):
        return "holds a lone surrogate or a huge integer"
    if any(k not in ITEM_FIELDS for k in raw):
        return "unknown field"
    item_id = raw.get("id")
    # evalhost also takes an integer id (it becomes its decimal string)
    if not (isinstance(item_id, str) and item_id.strip()) and not _is_int(item_id):
        return "no usable id"
    if len(str(item_id)) > MAX_ITEM_ID:
        return "id too long"
    prompt, messages = raw.get("prompt"), raw.get("messages")
    if (prompt is None) == (messages is None):
        return "needs exactly one of prompt / messages"
    if prompt is not None and not (isinstance(prompt, str) and prompt.strip()):
        return "empty or non-string prompt"
    if messages is not None and not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        return "malformed messages"
    domain = raw.get("domain") or task_domain  # an empty value counts as absent
    if domain not in DOMAINS:
        return "no domain or an unknown one"
    choices = raw.get("choices")
    if choices is not None:
        if isinstance(choices, list):
            choices = {chr(ord("A") + i): c for i, c in enumerate(choices)}
        if not (isinstance(choices, dict) and choices and all(
                isinstance(k, str) and len(k) == 1 and k.isalpha() and isinstance(v, (str, int, float))
                for k, v in choices.items())):
            return "malformed choices"
        choices = {k.upper() for k in choices}
    answer = raw.get("answer")
    if answer is not None:
        if not isinstance(answer, str):
            return "non-string answer"
        if choices and answer.strip().upper() not in choices:
            return "answer is not a choice"
    targets = raw.get("targets")
    if targets is not None:
        if not (isinstance(targets, dict) and all(isinstance(v, str) for v in targets.values())):
            return "malformed targets"
        if any(k not in TARGET_KEYS for k in targets):
            return "unknown target"
        if choices and any(v.strip().upper() not in choices for v in targets.values()):
            return "target is not a choice"
    scorer = raw.get("scorer")
    if scorer and not isinstance(scorer, str):
        return "non-string scorer"
    metadata = raw.get("metadata")
    if metadata and not isinstance(metadata, dict):
        return "metadata is not an object"
    if metadata and metadata.get("group_members"):
        return "metadata group_members is reserved for the candidates source"
    return None


def _jsonl_items(text: str) -> list[Any] | str:
    """The decoded values of a JSON Lines text (lines end with \\n, optionally \\r\\n; blank lines are skipped), or
    why it is not one."""
    values = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except (ValueError, RecursionError):
            return "a line is not JSON"
    return values


def task_file_problem(data: bytes, scheme: str, task_domain: str | None = None) -> tuple[str | None, list[dict]]:
    """(why the bytes are not a valid ``scheme`` task file or None, the raw items when valid)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return "not UTF-8", []
    if scheme == "csv":
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if any(c.strip() for c in r)]
        header = [h.strip() for h in rows[0]] if rows else []
        if "id" not in header or "prompt" not in header:
            return "CSV without an id and a prompt column", []
        raise Unclassified("a CSV with a real header")  # the generators write JSON lines only
    values = _jsonl_items(text)
    if isinstance(values, str):
        return values, []
    if not values:
        return "no items", []
    for raw in values:
        why = item_problem(raw, task_domain)
        if why:
            return why, []
    ids = [str(v["id"]) for v in values]
    if len(set(ids)) != len(ids):
        return "repeated id", []
    return None, values


def items_scorer_problem(items: list[dict], task_scorer: str | None, registry, scorer_options: dict) -> str | None:
    """The task's scorer decides; without one, every item names a scorer that exists and takes the options."""
    if task_scorer:
        return None
    names = {raw.get("scorer") or None for raw in items}
    if None in names:
        return "an item has no scorer and the task names none"
    for name in names:
        why = _plugin_problem(registry, "scorer", name, scorer_options)
        if why:
            return why
    return None


# ------------------------------------------------------------------------------------------------ plugins
def _plugin_problem(registry, kind: str, name: Any, options: dict) -> str | None:
    entry = registry.find(kind, name) if isinstance(name, str) else None
    if entry is None:
        return f"no (or a contested) {kind} {name!r}"
    try:
        entry.cls.check_options(dict(options))
    except UserError:
        return f"{kind} {name!r} refuses its options"
    return None
