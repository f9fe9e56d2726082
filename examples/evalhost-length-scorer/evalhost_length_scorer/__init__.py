"""evalhost-length-scorer: label an output by its length and shape.

A batch can change *how much* a model says before it changes *what* it says. This scorer turns that into a label,
so ``evalhost report`` counts solo/batch flips in length class just like refusal flips:

* ``empty``: no visible text;
* ``truncated_like``: the generation stopped on the token limit (``finish_reason`` is not visible to scorers, so
  this is judged from the text): it ends mid-sentence, mid-word or inside an unclosed code block / bracket, and is at
  least ``min_truncated_tokens`` long;
* ``short``: fewer than ``short_below`` tokens;
* ``long``: more than ``long_above`` tokens;
* ``ok``: anything else.

``value`` is the token-ish count (words and punctuation marks, a cheap stand-in for a tokenizer). Options (all
optional): ``short_below`` (default 8), ``long_above`` (default 200), ``min_truncated_tokens`` (default 20).
"""
from __future__ import annotations

import re
from typing import Any

from evalhost.api import Score, Scorer, TaskItem, UserError, check_keys, hookimpl

__version__ = "0.1.0"

_TOKEN = re.compile(r"\w+|[^\w\s]")
_END_OK = re.compile(r"""[.!?:;)\]}"'`*]\s*$|\n\s*$""")
DEFAULTS = {"short_below": 8, "long_above": 200, "min_truncated_tokens": 20}


def token_count(text: str) -> int:
    """Words and punctuation marks: roughly what a subword tokenizer would count for English prose."""
    return len(_TOKEN.findall(text))


def _looks_cut(text: str) -> str | None:
    stripped = text.rstrip()
    if stripped.count("```") % 2 == 1:
        return "unclosed code block"
    opened = sum(stripped.count(c) for c in "([{")
    closed = sum(stripped.count(c) for c in ")]}")
    if opened > closed:
        return "unclosed bracket"
    last_line = stripped.splitlines()[-1].strip() if stripped else ""
    if re.match(r"^(?:\d+[.)]|[-*])\s*$", last_line):
        return "ends on an empty list item"
    if not _END_OK.search(stripped):
        return "ends mid-sentence"
    return None


class LengthFormat(Scorer):
    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        # evalhost builds the scorer once when it plans a study, so these checks also run on `evalhost run --dry-run`
        check_keys(self.options, DEFAULTS, "scorer 'length'")  # "... (did you mean 'short_below'?)"
        merged = {**DEFAULTS, **self.options}
        for key, value in merged.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"length scorer option '{key}' must be a whole number >= 0, not {value!r}")
        if merged["short_below"] >= merged["long_above"]:
            raise UserError("length scorer option 'short_below' must be smaller than 'long_above'")
        self.short_below = merged["short_below"]
        self.long_above = merged["long_above"]
        self.min_truncated = merged["min_truncated_tokens"]

    def score(self, item: TaskItem, text: str) -> Score:
        n = token_count(text or "")
        if n == 0:
            return Score("empty", 0.0, "no visible text")
        if n >= self.min_truncated:
            why = _looks_cut(text)
            if why:
                return Score("truncated_like", float(n), f"{n} tokens, {why}")
        if n < self.short_below:
            return Score("short", float(n), f"{n} tokens (< {self.short_below})")
        if n > self.long_above:
            return Score("long", float(n), f"{n} tokens (> {self.long_above})")
        return Score("ok", float(n), f"{n} tokens")


@hookimpl
def register_scorers(register):
    register("length", LengthFormat)
