"""A tiny third-party-style plugin for the core tests: a deterministic, batch-sensitive toy backend and a scorer.

It is registered through a real ``evalhost`` entry point (see tests/toy/__init__.py's make_distribution), not by
touching the plugin manager. Outputs depend on the batch size for some prompts, so batched runs produce flips.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time

from evalhost.hookspecs import hookimpl
from evalhost.types import CONCURRENT, PROMPT_LIST, Backend, Generation, Scorer, Score


def _reply(prompt: str, batch: int) -> str:
    h = hashlib.sha256(f"{prompt}|{batch if batch > 1 else 1}".encode()).hexdigest()
    if batch > 1 and int(h[:4], 16) % 4 == 0:
        return "I'm sorry, I can't help with that."
    return "Sure: " + hashlib.sha256(prompt.encode()).hexdigest()[:12]


class ToyBackend(Backend):
    """Options: ``delay`` (s per request), ``start_s`` (s to start), ``parallel_start`` (may start alongside
    others), ``events`` (a file to append start/generate intervals to, one JSON line each), ``flavour`` (a free
    axis value). Env ``EVALHOST_TOY_FAIL=<flavour>`` makes that flavour's third batch request fail."""

    capabilities = frozenset({PROMPT_LIST, CONCURRENT})
    # its generate(prompts) is one call over the whole list: a prompt_list group is one batch (evalhost.cobatch)
    prompt_list_one_batch = "one generate call over the whole list"

    def _event(self, what, t0):
        if self.options.get("events"):
            with open(self.options["events"], "a") as fh:
                fh.write(json.dumps({"flavour": self.options.get("flavour"), "what": what, "t0": t0,
                                     "t1": time.time()}) + "\n")

    def starts_alongside_others(self):
        return bool(self.options.get("parallel_start"))

    def start(self):
        t0 = time.time()
        self.delay = float(os.environ.get("EVALHOST_TOY_DELAY", self.options.get("delay", 0)))
        self.calls = 0
        time.sleep(float(self.options.get("start_s", 0)))
        self._event("start", t0)

    def generate(self, prompts, sampling):
        t0 = time.time()
        self.calls += 1
        fail = os.environ.get("EVALHOST_TOY_FAIL")
        if fail and fail == self.options.get("flavour") and self.calls == 3:
            raise RuntimeError(f"toy backend {self.options.get('flavour')} failed on purpose")
        time.sleep(self.delay)
        self._event("generate", t0)
        now = time.time()
        return [Generation(_reply(p, len(prompts)), [ord(c) for c in _reply(p, len(prompts))], "stop",
                           {"sent": now, "finished": time.time()}) for p in prompts]

    async def agenerate(self, prompt, sampling):
        await asyncio.sleep(self.delay)
        text = _reply(prompt, 2)
        return Generation(text, [ord(c) for c in text], "stop", {"sent": time.time(), "finished": time.time()})

    def fingerprint(self):
        return {"toy": "1"}


class ToyScorer(Scorer):
    def score(self, item, text):
        refused = "sorry" in text.lower()
        return Score("refuse" if refused else "comply", 1.0 if refused else 0.0, "toy")


@hookimpl
def register_backends(register):
    register("toy", ToyBackend)


@hookimpl
def register_scorers(register):
    register("toy_refusal", ToyScorer)
