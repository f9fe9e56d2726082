"""``solo``: every member alone, one request at a time (``backend.generate([prompt])``).

This is the reference condition every batched record is paired with. It needs no backend capability.
Also home of :func:`expect_count`, the generation count check the other built-in dispatchers share.
"""
from __future__ import annotations

from typing import Any

from evalhost.api import Backend, Dispatcher, Generation, Group, GroupResult, Sampling, check_keys, hookimpl


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
        check_keys(options, cls.options_known, "dispatcher 'solo'")

    def run_group(self, backend: Backend, group: Group, sampling: Sampling) -> GroupResult:
        generations: list[Generation] = []
        for prompt in group.prompts:
            generations.extend(expect_count("solo", backend, backend.generate([prompt], sampling), 1))
        return GroupResult(generations, {"mode": "solo", "requests": len(group.members)})


@hookimpl
def register_dispatchers(register):
    register("solo", Solo)
