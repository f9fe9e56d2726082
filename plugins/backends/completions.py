"""The base class of the backends that talk to an OpenAI-compatible ``/v1/completions`` endpoint (``vllm``,
``vllm-invariant``, ``openai``): options, rendering with the model's chat template, the ``return_token_ids`` probe,
payloads and the answer's generations, engine metrics.

Requests go through :class:`~evalhost.plugins.backends.completions_client.CompletionsClient`, whose retry rules
(which failures retry, how often, the whole-request deadline of 120 s + 1 s x max_tokens, the server restart) are
written once in :mod:`evalhost.plugins.backends.completions_retry`.
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

from evalhost.api import Backend, Generation, Sampling, TaskItem, UserError, check_keys, check_type

from .completions_client import CompletionsClient
from .completions_retry import Outcome, RequestRejected
from .completions_retry import Failure  # noqa: F401 - vllm.py imports it from here (until it imports completions_retry)

MAX_REQUEST_TIMEOUT_S = 7 * 24 * 3600.0  # a week: anything longer is a typo


def check_option_keys(backend: str, options: dict[str, Any], known: dict[str, Any]) -> None:
    """UserError for an unknown key (with a did-you-mean) or a value of the wrong type.

    ``known`` maps option name -> accepted type(s) (``None`` for any).
    """
    check_keys(options, known, f"backend '{backend}'")
    for key, value in options.items():
        check_type(value, known[key], f"backend '{backend}'", key)
        if key == "request_timeout_s" and value is not None and not 0 < value <= MAX_REQUEST_TIMEOUT_S:
            raise UserError(f"backend '{backend}' option request_timeout_s must be a number of seconds above 0 and "
                            f"at most {MAX_REQUEST_TIMEOUT_S:g}, not {value!r}; leave it out to size it for max_tokens")


def payload_for(model: str, prompt: str | list[str], sampling: Sampling, return_token_ids: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed,
    }
    if sampling.logprobs is not None:
        payload["logprobs"] = sampling.logprobs
    if sampling.top_logprobs:
        # the completions API's logprobs = k returns the k most likely tokens per output token
        payload["logprobs"] = max(int(sampling.top_logprobs), int(sampling.logprobs or 0))
        if return_token_ids:  # vLLM: name the top-k tokens "token_id:N", so they are ids like token_ids
            payload["return_tokens_as_token_ids"] = True
    if return_token_ids:
        payload["return_token_ids"] = True
    return payload


def parse_top_logprobs(lp: Any, k: int) -> list[list[list[Any]]] | None:
    """The answer's ``logprobs.top_logprobs`` (one ``{token: logprob}`` dict per output token) as one list of
    ``[token, logprob]`` per token, most likely first, at most ``k``; a token named ``token_id:N`` (vLLM's
    ``return_tokens_as_token_ids``) becomes the int N, any other stays its text. None when the answer has no such
    list or any entry is malformed (the margins then count the output as without top-k, never guess)."""
    if k <= 0 or not isinstance(lp, dict) or not isinstance(lp.get("top_logprobs"), list):
        return None
    out: list[list[list[Any]]] = []
    for step in lp["top_logprobs"]:
        if step is None:  # a step the server gave no logprobs for
            out.append([])
            continue
        if not isinstance(step, dict):
            return None
        entries = []
        for token, value in step.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return None
            if isinstance(token, str) and token.startswith("token_id:") and token[9:].isdigit():
                token = int(token[9:])
            entries.append([token, round(float(value), 6)])
        entries.sort(key=lambda e: -e[1])
        out.append(entries[:k])
    return out


# transformers' lazy module imports are not thread-safe: four backends loading their tokenizers at once
# (`evalhost run --parallel 4` on the H100) made three of them fail, and before the check below they silently
# rendered raw prompts. One load at a time per process.
_TOKENIZER_LOAD_LOCK = threading.Lock()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def metrics_url(base_url: Any) -> str | None:
    """``{base_url}/metrics`` at the server root (a trailing ``/v1`` is dropped), or None without a base URL."""
    if not base_url or not isinstance(base_url, str):
        return None
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + "/metrics"


def parse_running(text: str) -> int | None:
    """Sum of ``vllm:num_requests_running`` over its label sets in a Prometheus text page (None if absent)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith("vllm:num_requests_running"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name != "vllm:num_requests_running":
            continue
        try:
            total += float(line.rsplit(" ", 1)[1])
            seen = True
        except (IndexError, ValueError):
            continue
    return int(total) if seen else None


def has_tokenizer_files(path: str) -> bool:
    """Whether a local model directory ships a tokenizer (so failing to load it is an error, not "no tokenizer")."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


class CompletionsBackend(Backend):
    """Base of backends that talk to a ``/v1/completions`` endpoint (``vllm``, ``vllm-invariant``, ``openai``).

    Subclasses set :attr:`client`, :attr:`served_model` and :attr:`base_url` in :meth:`start`.
    Rendering applies the model's chat template client-side with a lazily loaded transformers tokenizer.
    """

    plugin_name = "completions"
    COMMON_OPTIONS: dict[str, Any] = {
        "chat_template": bool,
        "tokenizer": str,
        "request_timeout_s": (int, float),
        "max_retries": int,
        "backoff_s": (int, float),
        "return_token_ids": (bool, str),
        "label": str,
    }

    def __init__(self, model, options, context) -> None:
        super().__init__(model, options, context)
        self.client: CompletionsClient | None = None
        self.served_model: str | None = None
        self.base_url: str | None = None
        self._tokenizer = None
        self._tokenizer_loaded = False
        self._tokenizer_lock = threading.Lock()
        self.token_ids_source = "unknown"  # "server" (return_token_ids) or "retokenized" (client tokenizer)
        self._server_token_ids: bool | None = None

    @property
    def label(self) -> str:
        # option label, else the run's name of this configuration (distinct per matrix value: configurations
        # running at the same time never share a server log), else model-plugin
        raw = (self.options.get("label") or getattr(self.context, "work_label", None)
               or f"{self.model.name}-{self.plugin_name}")
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(raw))

    # -- tokenizer / rendering ---------------------------------------------------------------
    def _tokenizer_path(self) -> str | None:
        if self.options.get("tokenizer"):
            return str(self.options["tokenizer"])
        if not self.model.path:
            return None
        return self.context.resolve_model_path(self.model.path)

    def tokenizer(self):
        """The model's tokenizer (local files only), or None when the model has none (no tokenizer files). A
        tokenizer that exists but fails to load is an error, never a silent switch to raw prompts."""
        with self._tokenizer_lock:
            if not self._tokenizer_loaded:
                path = self._tokenizer_path()
                if path is not None:
                    try:
                        with _TOKENIZER_LOAD_LOCK:
                            from transformers import AutoTokenizer

                            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                    except Exception as exc:
                        if (self.options.get("tokenizer") or self.options.get("chat_template")
                                or has_tokenizer_files(path)):
                            raise UserError(
                                f"cannot load the tokenizer from {path} ({type(exc).__name__}: "
                                f"{str(exc)[:200]}); fix or install it (transformers is in evalhost[hf]), set the "
                                f"backend option tokenizer to a local checkpoint directory, or chat_template = false"
                            ) from None
                        self._tokenizer = None
                self._tokenizer_loaded = True
            return self._tokenizer

    def uses_chat_template(self) -> bool:
        wanted = self.options.get("chat_template")
        if wanted is False:
            return False
        tok = self.tokenizer()
        has = tok is not None and bool(getattr(tok, "chat_template", None))
        if wanted and not has:
            raise UserError(
                f"backend option chat_template = true, but the tokenizer of model '{self.model.name}' has no chat "
                f"template; set chat_template = false or point the option tokenizer at one that has"
            )
        return has

    def render(self, item: TaskItem) -> str:
        if self.uses_chat_template():
            return self.tokenizer().apply_chat_template(item.chat(), add_generation_prompt=True, tokenize=False)
        return item.plain_text()

    # -- return_token_ids support ------------------------------------------------------------
    def probe_token_ids(self) -> None:
        """Decide whether the server returns generated token ids (vLLM >= 0.10 ``return_token_ids``)."""
        setting = self.options.get("return_token_ids", "auto")
        if setting is False or setting == "false":
            self._server_token_ids = False
        else:
            probe = payload_for(self.served_model, "Hi", Sampling(max_tokens=1), True)
            try:
                out = self.client.complete(probe, 1)
                self._server_token_ids = isinstance(out.choices[0].get("token_ids"), list)
            except RequestRejected:
                self._server_token_ids = False
            if setting is True and not self._server_token_ids:
                raise UserError(
                    f"backend option return_token_ids = true, but {self.base_url} does not return token ids; "
                    f"remove the option to let evalhost re-tokenize the text instead"
                )
        self.token_ids_source = "server" if self._server_token_ids else "retokenized"
        if not self._server_token_ids:
            self.context.log(f"{self.label}: the server does not return token ids; re-tokenizing output text "
                             f"client-side (recorded in the fingerprint)")

    def _payload(self, prompt: str | list[str], sampling: Sampling) -> dict[str, Any]:
        if self.client is None:
            self.start()
        return payload_for(self.served_model, prompt, sampling, bool(self._server_token_ids))

    def _generation(self, choice: dict[str, Any], out: Outcome, top_k: int = 0) -> Generation:
        token_ids = choice.get("token_ids")
        if not isinstance(token_ids, list):
            tok = self.tokenizer()
            token_ids = tok.encode(choice["text"], add_special_tokens=False) if tok is not None else []
        logprobs = None
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("token_logprobs"), list):
            logprobs = lp["token_logprobs"]
        top = parse_top_logprobs(lp, top_k)
        extra: dict[str, Any] = {}
        if out.attempts > 1:
            extra["first_sent"] = out.first_sent
            extra["failures"] = out.failures
        if choice.get("stop_reason") is not None:
            extra["stop_reason"] = choice["stop_reason"]
        return Generation(
            text=choice["text"],
            token_ids=[int(t) for t in token_ids],
            finish_reason=choice.get("finish_reason") or "unknown",
            timings={"sent": out.sent, "finished": out.finished},
            attempts=out.attempts,
            restarted=out.restarted,
            logprobs=logprobs,
            extra=extra,
            top_logprobs=top,
        )

    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        """One request whose ``prompt`` is the list (a single prompt is sent as a string)."""
        if not prompts:
            return []
        prompt: str | list[str] = prompts[0] if len(prompts) == 1 else list(prompts)
        out = self.client_or_start().complete(self._payload(prompt, sampling), len(prompts))
        return [self._generation(choice, out, sampling.top_logprobs) for choice in out.choices]

    async def agenerate(self, prompt: str, sampling: Sampling) -> Generation:
        out = await self.client_or_start().acomplete(self._payload(prompt, sampling), 1)
        return self._generation(out.choices[0], out, sampling.top_logprobs)

    def client_or_start(self) -> CompletionsClient:
        if self.client is None:
            self.start()
        return self.client

    async def engine_metrics(self) -> dict[str, Any] | None:
        """``{"requests_running": N}``: ``vllm:num_requests_running`` (summed over its label sets) on the server's
        ``/metrics`` page, or None before the backend knows its server. Raises when the page cannot be read or
        lacks the metric (the dispatcher records that as ``metrics_error``)."""
        url = metrics_url(self.base_url)
        if url is None:
            return None
        if self.client is not None:  # one client per event loop for every scrape (CompletionsClient.aget)
            resp = await self.client.aget(url, timeout=10.0)
        else:
            import httpx

            async with httpx.AsyncClient(timeout=10.0) as client:
                resp = await client.get(url)
        resp.raise_for_status()
        running = parse_running(resp.text)
        if running is None:
            raise RuntimeError("vllm:num_requests_running not found on the metrics page")
        return {"requests_running": running}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    # -- provenance --------------------------------------------------------------------------
    def env_flags(self, extra_env: dict[str, str] | None = None) -> dict[str, str]:
        """Numerics-relevant environment flags (never secrets)."""
        prefixes = ("VLLM_", "CUBLAS_", "CUDA_", "NCCL_", "TORCH_", "PYTORCH_", "OMP_", "MKL_")
        env = {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
        env.update({str(k): str(v) for k, v in (extra_env or {}).items()})
        secretish = ("KEY", "TOKEN", "SECRET", "PASSWORD")
        return {k: ("***" if any(s in k.upper() for s in secretish) else v) for k, v in sorted(env.items())}
