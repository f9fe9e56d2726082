"""``prompt_list``: the whole group as one true batch, one ``backend.generate(prompts)`` call.

For the vLLM/OpenAI backends that is ONE ``/v1/completions`` request whose ``prompt`` is the list (the engine
schedules the prompts together); for the HF backend one left-padded ``generate``. Needs capability ``prompt_list``.
"""
from __future__ import annotations

from typing import Any

from evalhost.api import PROMPT_LIST, Backend, Dispatcher, Group, GroupResult, Sampling, check_keys, hookimpl

from .solo import expect_count


class PromptList(Dispatcher):
    requires = frozenset({PROMPT_LIST})
    options_known: tuple[str, ...] = ()

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        check_keys(options, cls.options_known, "dispatcher 'prompt_list'")

    def run_group(self, backend: Backend, group: Group, sampling: Sampling) -> GroupResult:
        prompts = group.prompts
        generations = expect_count("prompt_list", backend, backend.generate(prompts, sampling), len(prompts))
        from evalhost.api import prompt_list_verdict  # one batch by construction, or unverified

        return GroupResult(generations, {"mode": "prompt_list", "requests": 1, "size": len(prompts),
                                         "cobatch": prompt_list_verdict(backend, len(prompts))})


@hookimpl
def register_dispatchers(register):
    register("prompt_list", PromptList)
