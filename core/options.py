"""The one "unknown key, did you mean" check, and small option type checks, used by core and by every plugin.

Plugins reach these through :mod:`evalhost.api` (``did_you_mean``, ``check_keys``, ``check_type``); core modules
import them from here (this module imports nothing but :mod:`evalhost.errors`, so anything may import it).

Every message is one sentence that names the owner (``scorer 'length'``, ``dispatcher 'synchronized'``), the key,
the closest known key when one is close, and the fix.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable

from .errors import UserError


def closest(word: Any, choices: Iterable[Any]) -> str | None:
    """The choice closest to ``word`` (difflib's ratio >= 0.6), or None."""
    hint = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return hint[0] if hint else None


def did_you_mean(word: Any, choices: Iterable[Any], prefix: str = "") -> str:
    """``" (did you mean 'PREFIXclosest'?)"`` for the choice closest to ``word``, or ``""`` when none is close."""
    hint = closest(word, choices)
    return f" (did you mean '{prefix}{hint}'?)" if hint is not None else ""


def unknown_key(keys: Iterable[Any], known: Iterable[Any], prefix: str = "") -> tuple[Any, str] | None:
    """The first of ``keys`` not in ``known`` with its hint (:func:`did_you_mean`, ``prefix`` in front of the
    suggestion; ``""`` when none is close), or None when every key is known. Every "unknown key" sentence (here,
    the study file's keys, a task item's fields) is built on this one check."""
    known = [str(k) for k in known]
    names = set(known)
    for key in keys:
        if key not in names:
            return key, did_you_mean(key, known, prefix)
    return None


def check_keys(options: dict[str, Any], known: Iterable[str], owner: str, noun: str = "option") -> None:
    """Raise :class:`UserError` for the first key of ``options`` not in ``known``, e.g.
    ``scorer 'length' has no option 'max_word' (did you mean 'max_words'?); its options are: max_words, min_words``.

    ``owner`` names what takes the options (``"backend 'vllm'"``); ``noun`` is what a key is (option, field, key).
    """
    known = sorted(str(k) for k in known)
    found = unknown_key(options, known)
    if found is not None:
        key, hint = found
        listing = ", ".join(known) if known else "none"
        raise UserError(f"{owner} has no {noun} '{_short(key)}'{hint}; its {noun}s are: {listing}")


def check_choice(value: Any, choices: Iterable[str], owner: str, key: str) -> None:
    """Raise :class:`UserError` unless ``value`` is one of ``choices`` (with the closest one suggested)."""
    choices = [str(c) for c in choices]
    if value not in choices:
        raise UserError(f"{owner} option '{key}' must be one of {', '.join(choices)}, got {_short(value)!r}"
                        f"{did_you_mean(value, choices)}")


def check_type(value: Any, types: type | tuple[type, ...] | None, owner: str, key: str) -> None:
    """Raise :class:`UserError` unless ``value`` is an instance of ``types`` (``True`` is no ``int`` here unless
    ``bool`` is listed). ``None`` passes either way: an unset option, or ``types`` None for any value."""
    if value is None or types is None:
        return
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise UserError(f"{owner} option '{key}' must be {names}, not {_short(value)!r}; fix it in the study file")


def _short(value: Any, limit: int = 80) -> Any:
    text = value if isinstance(value, str) else None
    if text is not None and len(text) > limit:
        return text[: limit - 3] + "..."
    return value
