"""Multiple-choice scorer: finds the option letter a model chose in free text.

:func:`extract_choice` is shared by the ``bbq`` and ``truthfulqa`` scorers. It tries, in order of confidence:

1. an explicit statement: "The answer is (B)", "Answer: b", "correct option is C", "I'd go with D", "Option B";
2. a letter that opens the reply: "B.", "(B)", "**B**", "B) Paris", "B" alone;
3. a letter said to be right: "I think C is correct", "B is the right answer";
4. a single bracketed letter anywhere: "... so (C)";
5. the text of exactly one option (``item.choices``), e.g. "Paris" when B is "Paris".

A letter directly followed by the text of a *different* option ("A. The grandson" when the grandson is B, which
small models produce when they echo the option list) is ``unparsed`` rather than a guess. Lines that repeat the
option list itself ("A. 37.5 km/h" ... "D. 75 km/h", two or more) are set aside before parsing: a reply that is only
the echoed list is ``unparsed``, and one that echoes the list and then answers is read from the answer.

Markdown emphasis, backticks and curly quotes are ignored. Lower-case letters count only where the context makes
them a choice ("answer: b", "(b)", "b."), so words like "a" are not taken for option A.
"""
from __future__ import annotations

import re

from evalhost.api import hookimpl, Score, Scorer, TaskItem

DEFAULT_LETTERS = "ABCD"

_MARKDOWN = re.compile(r"[*_`#>~]+")


def _normalize(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = _MARKDOWN.sub("", text)
    return text.strip()


def _letters(choices: dict[str, str] | None) -> str:
    if choices:
        return "".join(sorted(k.upper() for k in choices if len(k) == 1 and k.isalpha()))
    return DEFAULT_LETTERS


def _patterns(letters: str) -> list[tuple[str, re.Pattern[str]]]:
    U = f"[{letters}]"  # an upper-case letter counts wherever the pattern allows
    l = f"[{letters.lower()}]"  # a lower-case one only when punctuation or the end follows ("answer: b.")
    end = r"(?![A-Za-z0-9])"
    letter = rf"[\(\[\"']?(?:({U}){end}|({l})(?=[\)\]\"']|\s*(?:$|[.,;:!?\n])))"
    lead_in = (
        r"(?i:answer|option|choice)\s*(?i:is|would\s+be|will\s+be|should\s+be|must\s+be|:|=|-)?\s*"
        r"(?i:option\s+|choice\s+|letter\s+)?"
    )
    chooser = (
        r"\b(?i:i(?:\s+would|'d|\s+will|'ll)\s+(?:go\s+with|choose|pick|select|say)|i\s+(?:choose|pick|select)"
        r"|my\s+(?:pick|choice)\s+is)\s+(?i:option\s+|choice\s+)?"
    )
    return [
        ("stated", re.compile(lead_in + letter)),
        ("stated", re.compile(chooser + letter)),
        ("leading", re.compile(rf"^\s*[\(\[]?({U})[\)\]]?\s*(?:[.:)\-,]|$|\n)")),
        ("leading", re.compile(rf"^\s*[\(\[]({l})[\)\]]")),
        ("leading", re.compile(rf"^\s*({l})[.)](?:\s|$)")),
        (
            "asserted",
            re.compile(
                rf"(?<![A-Za-z])[\(\[]?({U})[\)\]]?\s+(?i:is|seems|looks)\s+(?i:the\s+)?(?i:most\s+)?"
                r"(?i:correct|right|true|best|accurate)",
            ),
        ),
        ("bracketed", re.compile(rf"[\(\[]({U})[\)\]]")),
    ]


def _option_text_match(text: str, choices: dict[str, str]) -> str | None:
    low = " ".join(text.lower().split())
    hits = []
    for letter, option in choices.items():
        opt = " ".join(str(option).lower().split()).rstrip(".")
        if len(opt) >= 2 and re.search(r"(?<![a-z0-9])" + re.escape(opt) + r"(?![a-z0-9])", low):
            hits.append(letter.upper())
    # one option named, or one option whose text contains all the others that were named
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        longest = max(hits, key=lambda h: len(str(choices.get(h, choices.get(h.lower(), "")))))
        longest_text = str(choices.get(longest, choices.get(longest.lower(), ""))).lower()
        others = [str(choices.get(h, choices.get(h.lower(), ""))).lower().rstrip(".") for h in hits if h != longest]
        if all(o in longest_text for o in others):
            return longest
    return None


def _text_conflict(rest: str, letter: str, choices: dict[str, str]) -> str | None:
    """The other option whose text directly follows the chosen letter ("A. The grandson" when B is the grandson)."""
    head = " ".join(rest.lstrip(" .:)]-").lower().split())
    if not head:
        return None
    upper = {k.upper(): " ".join(str(v).lower().split()).rstrip(".") for k, v in choices.items()}
    own = upper.get(letter)
    if own and head.startswith(own):
        return None
    for other, text in upper.items():
        if other != letter and text and head.startswith(text) and not (own and own.startswith(text)):
            return other
    return None


_OPTION_LINE = re.compile(r"^\s*[\(\[]?([A-Za-z])[\)\]]?\s*[.:)\-]\s*(.+?)\s*$")


def _strip_echoed_options(text: str, choices: dict[str, str]) -> tuple[str, int]:
    """Remove lines that repeat the option list ("A. 37.5 km/h" when A is "37.5 km/h") if two or more do.

    A reply that copies the list starts with "A. ...", which would otherwise read as choosing A (mmlu-011).
    One such line alone is an answer, not an echo, and is kept.
    """
    own = {k.upper(): " ".join(str(v).lower().split()).rstrip(".") for k, v in choices.items()}
    lines = text.splitlines()
    echoed = []
    for i, line in enumerate(lines):
        match = _OPTION_LINE.match(line)
        if match and own.get(match.group(1).upper()) == " ".join(match.group(2).lower().split()).rstrip("."):
            echoed.append(i)
    if len(echoed) < 2:
        return text, 0
    kept = [line for i, line in enumerate(lines) if i not in set(echoed)]
    return "\n".join(kept).strip(), len(echoed)


def extract_choice(text: str, choices: dict[str, str] | None = None) -> tuple[str | None, str]:
    """Return ``(letter, how)``: the upper-case option letter the text chose (or None) and which rule found it."""
    if not text or not text.strip():
        return None, "empty output"
    letters = _letters(choices)
    norm = _normalize(text)
    if choices:
        norm, echoed = _strip_echoed_options(norm, choices)
        if echoed and not re.search(r"[A-Za-z0-9]", norm):
            return None, f"the reply only repeats the {echoed} options"
    for how, pattern in _patterns(letters):
        match = pattern.search(norm)
        if match:
            letter = match.group(match.lastindex or 1).upper()
            other = _text_conflict(norm[match.end():], letter, choices) if choices else None
            if other:
                return None, f"letter {letter} followed by the text of option {other}"
            return letter, how
    if choices:
        letter = _option_text_match(norm, choices)
        if letter:
            return letter, "option text"
    return None, "no option letter or option text found"


def extract_letter(text: str, choices: dict[str, str] | None = None) -> str | None:
    """The chosen option letter, or None."""
    return extract_choice(text, choices)[0]


class MCQScorer(Scorer):
    """``correct`` / ``incorrect`` / ``unparsed`` against ``item.answer`` (value 1 / 0 / None)."""

    name = "mcq"
    options_known: tuple[str, ...] = ()  # no scorer_options

    def score(self, item: TaskItem, text: str) -> Score:
        letter, how = extract_choice(text, item.choices)
        if letter is None:
            return Score("unparsed", None, how)
        answer = (item.answer or "").strip().upper()
        if not answer:
            return Score("unparsed", None, f"parsed {letter} ({how}) but the item has no answer")
        if letter == answer:
            return Score("correct", 1.0, self.why_correct(item, letter, how, answer))
        return Score("incorrect", 0.0, self.why_incorrect(item, letter, how, answer))

    def why_correct(self, item: TaskItem, letter: str, how: str, answer: str) -> str:
        return f"parsed {letter} ({how}); answer {answer}"

    def why_incorrect(self, item: TaskItem, letter: str, how: str, answer: str) -> str:
        return f"parsed {letter} ({how}); answer {answer}"


@hookimpl
def register_scorers(register):
    register("mcq", MCQScorer)
