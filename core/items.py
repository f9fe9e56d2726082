"""Item helpers: validate one raw task item (a dict, as read from a JSONL line or a dataset row) and build a
:class:`~evalhost.types.TaskItem`. Plugins use them through :mod:`evalhost.api` (``item_from_dict``, ``ITEM_FIELDS``).

Every problem is one sentence ``WHERE: problem; fix`` (``WHERE`` is ``file:line`` or a row's name).
"""
from __future__ import annotations

import json
from typing import Any

from .errors import UserError
from .options import unknown_key
from .types import DOMAINS, TaskItem

FIELDS = ("id", "prompt", "messages", "domain", "choices", "answer", "targets", "scorer", "metadata")
FIELDS_LIST = ", ".join(FIELDS)
TARGET_KEYS = ("stereotyped", "anti_stereotyped", "unknown")
MAX_ID = 200  # characters of an item id (it is part of every record key)


def _fail(where: str, problem: str, fix: str) -> UserError:
    return UserError(f"{where}: {problem}; {fix}")


def item_from_dict(
    raw: Any, where: str, task: str, default_domain: str | None = None, default_scorer: str | None = None
) -> TaskItem:
    """Validate one raw item (``where`` is ``file:line`` for messages) and build a :class:`TaskItem`.

    ``default_domain`` and ``default_scorer`` fill in an item that has no ``domain`` / ``scorer`` of its own. The
    scorer stored here is only the item's: which scorer scores it (the task's scorer comes first) is decided by
    :func:`evalhost.scoring.scorer_for` alone."""
    if not isinstance(raw, dict):
        raise _fail(where, f"the line is a JSON {type(raw).__name__}, not an object", "write one JSON object per line")
    _check_text(raw, where)
    unknown = unknown_key(raw, FIELDS)
    if unknown is not None:
        key, hint = unknown
        raise _fail(where, f"unknown field '{key}'", f"rename or remove it{hint or f' (known fields: {FIELDS_LIST})'}")
    item_id = raw.get("id")
    if item_id is None or (isinstance(item_id, str) and not item_id.strip()):
        raise _fail(where, "the item has no 'id'", 'add a unique "id" string')
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
        raise _fail(where, "'id' is not a string", 'write "id" as a string such as "item-001"')
    if len(str(item_id)) > MAX_ID:
        raise _fail(where, f"the item id is {len(str(item_id))} characters long", f"use at most {MAX_ID}")
    prompt, messages = raw.get("prompt"), raw.get("messages")
    if prompt is None and messages is None:
        raise _fail(where, f"item '{item_id}' has neither 'prompt' nor 'messages'", 'add a "prompt" string')
    if prompt is not None and messages is not None:
        raise _fail(where, f"item '{item_id}' has both 'prompt' and 'messages'", "keep only one of them")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise _fail(where, f"item '{item_id}' has an empty or non-string 'prompt'", "write the prompt as a string")
    msgs = None
    if messages is not None:
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise _fail(where, f"item '{item_id}' has malformed 'messages'",
                        'write a non-empty list of {"role": ..., "content": ...} objects')
        msgs = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    domain = raw.get("domain") or default_domain
    if domain is None:
        raise _fail(where, f"item '{item_id}' has no 'domain'",
                    f"add \"domain\" ({' or '.join(DOMAINS)}) or set domain on the task in the study")
    if domain not in DOMAINS:
        raise _fail(where, f"item '{item_id}' has domain '{domain}'", f"use one of: {', '.join(DOMAINS)}")
    choices = raw.get("choices")
    if choices is not None:
        if isinstance(choices, list):
            choices = {chr(ord("A") + i): c for i, c in enumerate(choices)}
        if not isinstance(choices, dict) or not choices or not all(
            isinstance(k, str) and len(k) == 1 and k.isalpha() and isinstance(v, (str, int, float))
            for k, v in choices.items()
        ):
            raise _fail(where, f"item '{item_id}' has malformed 'choices'",
                        'write {"A": "text", "B": "text", ...} or a list of option texts')
        choices = {k.upper(): str(v) for k, v in choices.items()}
    answer = raw.get("answer")
    if answer is not None:
        if not isinstance(answer, str):
            raise _fail(where, f"item '{item_id}' has a non-string 'answer'", 'write the answer letter, e.g. "B"')
        answer = answer.strip().upper() if choices else answer
        if choices and answer not in choices:
            raise _fail(where, f"item '{item_id}' has answer '{answer}' which is not one of its choices",
                        f"use one of {', '.join(choices)}")
    targets = raw.get("targets")
    if targets is not None:
        if not isinstance(targets, dict) or not all(isinstance(v, str) for v in targets.values()):
            raise _fail(where, f"item '{item_id}' has malformed 'targets'",
                        'write {"stereotyped": "A", "anti_stereotyped": "B", "unknown": "C"}')
        bad = [k for k in targets if k not in TARGET_KEYS]
        if bad:
            raise _fail(where, f"item '{item_id}' has target '{bad[0]}'", f"use only {', '.join(TARGET_KEYS)}")
        targets = {k: v.strip().upper() for k, v in targets.items()}
        if choices:
            off = [v for v in targets.values() if v not in choices]
            if off:
                raise _fail(where, f"item '{item_id}' has target letter '{off[0]}' that is not a choice",
                            f"use one of {', '.join(choices)}")
    scorer = raw.get("scorer") or default_scorer
    if scorer is not None and not isinstance(scorer, str):
        raise _fail(where, f"item '{item_id}' has a non-string 'scorer'", 'write the scorer name, e.g. "mcq"')
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _fail(where, f"item '{item_id}' has 'metadata' that is not an object", "write metadata as {...}")
    return TaskItem(
        id=str(item_id), task=task, domain=domain, prompt=prompt, messages=msgs, choices=choices, answer=answer,
        targets=targets, scorer=scorer, metadata=dict(metadata),
    )


def _check_text(raw: Any, where: str) -> None:
    """Every string of an item must be storable as UTF-8: a JSON escape of half a surrogate pair (``"\\ud800"``)
    decodes to a string no record can hold; refuse it here, before any run directory exists."""
    try:
        json.dumps(raw, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end].encode("utf-8", "backslashreplace").decode("ascii")
        raise _fail(where, f"the item holds a lone surrogate escape ({bad}), which is not text",
                    "write the character itself or a complete surrogate pair") from None
    except (ValueError, TypeError, RecursionError):  # a huge integer, a key no JSON holds, nesting too deep
        raise _fail(where, "the item holds a value no record can store (an integer of thousands of digits or "
                           "nesting thousands deep)", "shorten it") from None
