"""evalhost-echo-backend: a small in-process backend, as a third-party plugin distribution.

It answers every prompt with a deterministic function of the prompt: ``"<prefix>: "`` followed by the prompt's
words in reverse order, cut to ``max_tokens`` words (then ``finish_reason`` is ``length``). A word's token id is
the first 6 hex digits of its SHA-256, as an integer. No model, no server, no GPU: a study over it runs in
seconds, which makes it a template for a backend plugin and a fixture for tests of scorers and reports.

Option ``batch_noise`` (a probability, default 0) makes batching matter the way it can on a real engine: in a
group of more than one prompt, a prompt whose hash with the group size falls under ``batch_noise`` gets a refusal
instead of its echo. A solo prompt (a group of one) is never perturbed, so with ``batch_noise > 0`` a study shows
solo/batch flips, and with 0 it shows none. Each generation's ``extra`` says the group size and whether it was
perturbed (recorded as ``backend_extra``).

Options: ``batch_noise`` (number in [0, 1], default 0), ``prefix`` (text, default ``"Echo"``). An unknown option
or a bad value is one sentence when the plan is built (``evalhost run --dry-run`` says it).
"""
from __future__ import annotations

import hashlib
import time
from typing import Any

from evalhost.api import PROMPT_LIST, Backend, Generation, UserError, check_keys, check_type, hookimpl

__version__ = "0.1.0"

DEFAULTS: dict[str, Any] = {"batch_noise": 0.0, "prefix": "Echo"}
REFUSAL = "I'm sorry, but I can't help with that."


def _unit(text: str) -> float:
    """A number in [0, 1) that is a deterministic function of ``text``."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 16**8


def token_id(word: str) -> int:
    return int(hashlib.sha256(word.encode("utf-8")).hexdigest()[:6], 16)


def echo(prompt: str, max_tokens: int, prefix: str = "Echo") -> tuple[str, list[int], str]:
    """(text, token ids, finish reason) of the echo answer to ``prompt``."""
    words = [f"{prefix}:"] + list(reversed(prompt.split()))
    cut = words[:max(1, int(max_tokens))]
    return " ".join(cut), [token_id(w) for w in cut], "length" if len(cut) < len(words) else "stop"


def perturbed(prompt: str, group_size: int, batch_noise: float) -> bool:
    """Whether a prompt in a group of ``group_size`` is answered with a refusal instead of its echo."""
    return group_size > 1 and _unit(f"{group_size}|{prompt}") < batch_noise


class EchoBackend(Backend):
    """An in-process backend whose outputs change in batches only through ``batch_noise``."""

    capabilities = frozenset({PROMPT_LIST})

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        owner = "backend 'echo'"
        check_keys(options, DEFAULTS, owner)
        check_type(options.get("batch_noise"), (int, float), owner, "batch_noise")
        check_type(options.get("prefix"), str, owner, "prefix")
        noise = options.get("batch_noise", 0.0)
        if not 0.0 <= float(noise) <= 1.0:
            raise UserError(f"{owner} option 'batch_noise' must be a probability between 0 and 1, got {noise}; "
                            f"use e.g. batch_noise = 0.25")

    def start(self) -> None:
        self.check_options(self.options)
        self.noise = float(self.options.get("batch_noise", DEFAULTS["batch_noise"]))
        self.prefix = str(self.options.get("prefix", DEFAULTS["prefix"]))

    def generate(self, prompts, sampling):
        sent = time.time()
        out = []
        for prompt in prompts:
            hit = perturbed(prompt, len(prompts), self.noise)
            if hit:
                text, ids, finish = REFUSAL, [token_id(w) for w in REFUSAL.split()], "stop"
            else:
                text, ids, finish = echo(prompt, sampling.max_tokens, self.prefix)
            out.append(Generation(text, ids, finish, {"sent": sent, "finished": time.time()},
                                  extra={"group_size": len(prompts), "perturbed": hit}))
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {"backend": "echo", "echo_backend": __version__}


@hookimpl
def register_backends(register):
    register("echo", EchoBackend)
