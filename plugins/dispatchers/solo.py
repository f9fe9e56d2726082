"""``solo``: every member alone, one request at a time (``backend.generate([prompt])``).

This is the reference condition every batched record is paired with. It needs no backend capability.
Also home of :func:`check_known_options`, the option check the other built-in dispatchers share.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable

from evalhost.errors import UserError
from evalhost.hookspecs import hookimpl
from evalhost.types import Backend, Dispatcher, Generation, Group, GroupResult, Sampling


def check_known_options(dispatcher: str, options: dict[str, Any], known: Iterable[str]) -> None:
    """Raise one-sentence :class:`UserError` for an option key the dispatcher does not know (with did-you-mean)."""
    known = sorted(known)
    for key in options:
        if key in known:
            continue
        hint = difflib.get_close_matches(str(key), known, n=1)
        msg = f"dispatcher '{dispatcher}' has no option '{key}'"
        if hint:
            msg += f" (did you mean '{hint[0]}'?)"
        msg += f"; known options: {', '.join(known) if known else 'none'}"
        raise UserError(msg)


def expect_count(dispatcher: str, backend: Backend, gens: list[Generation], n: int) -> list[Generation]:
    """A backend that returns the wrong number of generations is a bug in the backend plugin: say so plainly."""
    if not isinstance(gens, list) or len(gens) != n:
        got = len(gens) if isinstance(gens, list) else type(gens).__name__
        raise RuntimeError(
            f"backend {type(backend).__name__} returned {got} generations for {n} prompts "
            f"(dispatcher '{dispatcher}'); its generate() must return one Generation per prompt"
        )
    return gens


class Solo(Dispatcher):
    """Each member of the group runs alone: one ``generate([prompt])`` call per member, sequentially."""

    requires = frozenset()
    options_known: tuple[str, ...] = ()

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        check_known_options("solo", options, cls.options_known)

    def run_group(self, backend: Backend, group: Group, sampling: Sampling) -> GroupResult:
        generations: list[Generation] = []
        for prompt in group.prompts:
            generations.extend(expect_count("solo", backend, backend.generate([prompt], sampling), 1))
        return GroupResult(generations, {"mode": "solo", "requests": len(group.members)})


@hookimpl
def register_dispatchers(register):
    register("solo", Solo)
