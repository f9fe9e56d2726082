"""Shared client for OpenAI-compatible ``/v1/completions`` endpoints, and the base class of the server backends.

:class:`CompletionsClient` sends one request (sync with ``httpx.Client`` or async with ``httpx.AsyncClient``) and
retries, with bounded exponential backoff, on connection errors, timeouts, HTTP 429/5xx and malformed answers
(wrong number of choices, missing text).  Between attempts it calls a ``recover`` hook: the managed vLLM backend
uses it to restart a dead or hung server.  A result is returned only when every prompt of the request has a complete
choice; otherwise :class:`RunError` — never a partial or misordered output.

* **Choices are matched to prompts by their ``index`` only.** In an answer to a multi-prompt request every choice
  must carry an integer ``index`` in ``[0, n)``, each exactly once; a missing, repeated or out-of-range index (or
  ``token_ids`` that are not integers) makes the attempt a failure that is retried, never a guess by position. A
  single-prompt answer may omit ``index`` (there is nothing to confuse).
* **``request_timeout_s`` is a deadline for the whole request** (connect, wait, and reading the whole body), not a
  per-read timeout: a server that drips its answer byte by byte is cut off at the deadline. Unset, it is sized for
  the request's ``max_tokens``: ``DEFAULT_TIMEOUT_BASE_S + DEFAULT_TIMEOUT_PER_TOKEN_S * max_tokens`` seconds
  (120 s + 1 s per token: 248 s at max_tokens = 128, 4216 s at 4096). Synchronous requests run on one private
  event loop thread per client, so the same deadline (``asyncio.wait_for``) covers both paths.

The API key (if any) lives only in the ``Authorization`` header of the HTTP client; it is redacted from every
message this module produces.
"""
from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

from evalhost.api import Backend, Generation, RunError, Sampling, TaskItem, UserError, check_keys, check_type

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
DEFAULT_TIMEOUT_BASE_S = 120.0
DEFAULT_TIMEOUT_PER_TOKEN_S = 1.0
MAX_REQUEST_TIMEOUT_S = 7 * 24 * 3600.0  # a week: anything longer is a typo


def default_request_timeout(max_tokens: Any) -> float:
    """The deadline of one request when ``request_timeout_s`` is not set: 120 s + 1 s per ``max_tokens`` token (a
    slow CPU server generating one token per second for every sequence of a batch still finishes)."""
    tokens = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0 else 16
    return DEFAULT_TIMEOUT_BASE_S + DEFAULT_TIMEOUT_PER_TOKEN_S * tokens


@dataclass
class Failure:
    """Why an attempt failed: ``kind`` is ``connect`` | ``timeout`` | ``http`` | ``bad_response`` | ``protocol``."""

    kind: str
    message: str
    status: int | None = None


@dataclass
class Outcome:
    choices: list[dict[str, Any]]
    attempts: int
    restarted: bool
    sent: float
    finished: float
    first_sent: float
    failures: list[str] = field(default_factory=list)


class RequestRejected(RunError):
    """The endpoint answered 4xx (not retryable): the request itself is wrong."""

    def __init__(self, message: str, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


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


class _LoopThread:
    """One event loop in a daemon thread: the synchronous :meth:`CompletionsClient.complete` runs each attempt on it,
    so ``asyncio.wait_for`` gives that attempt a deadline for the whole request (httpx's timeouts are per read)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="evalhost-completions-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, client=None) -> None:
        """Cancel what is still in flight (a caller waiting on it gets an error, never a hang), close ``client``,
        end the loop."""

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # their callers' futures are settled by now
            if client is not None and not client.is_closed:
                await client.aclose()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
        except Exception:  # best effort: the loop goes away anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class CompletionsClient:
    """POST ``/v1/completions`` with retries. ``recover(failure, incarnation) -> None`` runs before each retry.

    ``request_timeout_s`` is the deadline of one attempt, whole request included; ``None`` sizes it for the
    payload's ``max_tokens`` (:func:`default_request_timeout`)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        request_timeout_s: float | None = None,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        recover: Callable[[Failure, int], None] | None = None,
        incarnation: Callable[[], int] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        self._api_key = api_key or None
        self.request_timeout_s = None if request_timeout_s is None else float(request_timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.recover = recover
        self.incarnation = incarnation or (lambda: 0)
        self.log = log
        self._client = None
        self._lock = threading.Lock()
        self._loop_thread: _LoopThread | None = None

    # -- plumbing ----------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def deadline_for(self, payload: dict[str, Any]) -> float:
        """Seconds one attempt of ``payload`` may take, from sending to the last byte of the answer."""
        if self.request_timeout_s is not None:
            return self.request_timeout_s
        return default_request_timeout(payload.get("max_tokens"))

    def _timeout(self):
        import httpx

        # a per-read bound as well; the deadline of the whole request is asyncio.wait_for's (see _attempt)
        read = self.request_timeout_s or DEFAULT_TIMEOUT_BASE_S + DEFAULT_TIMEOUT_PER_TOKEN_S * 131072
        return httpx.Timeout(read, connect=min(10.0, read))

    def redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def client(self):
        import httpx

        with self._lock:
            if self._client is None:
                self._client = httpx.Client(headers=self._headers(), timeout=self._timeout(),
                                            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S))
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            loop_thread, self._loop_thread = self._loop_thread, None
        if loop_thread is not None:
            client = self.__dict__.get("_async_clients", {}).pop(id(loop_thread.loop), None)
            loop_thread.stop(client)

    def get(self, path: str, timeout: float = 10.0):
        return self.client().get(self.base_url + path, timeout=timeout)

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * (2 ** (attempt - 1)))

    @staticmethod
    def _classify(exc: Exception) -> Failure:
        import httpx

        if isinstance(exc, httpx.TimeoutException):
            return Failure("timeout", f"timed out ({type(exc).__name__})")
        if isinstance(exc, httpx.ConnectError):
            return Failure("connect", f"connection failed ({exc})")
        return Failure("protocol", f"{type(exc).__name__}: {exc}")

    def _check(self, response, n: int) -> tuple[list[dict[str, Any]] | None, Failure | None]:
        status = response.status_code
        if status >= 400:
            body = self.redact(response.text[:500])
            if status in RETRY_STATUS:
                return None, Failure("http", f"HTTP {status}: {body}", status)
            raise RequestRejected(
                f"{self.base_url}/v1/completions rejected the request with HTTP {status}: {body}", status, body
            )
        try:
            data = response.json()
            choices = data["choices"]
        except Exception:
            return None, Failure("bad_response", f"answer is not a completions JSON object: {response.text[:200]!r}")
        if not isinstance(choices, list):
            return None, Failure("bad_response", f"'choices' is a {type(choices).__name__}, not a list")
        by_index: dict[int, dict[str, Any]] = {}
        for choice in choices:
            if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
                return None, Failure("bad_response", "a choice has no text")
            problem = _choice_problem(choice)
            if problem:
                return None, Failure("bad_response", problem)
            # matched by index only: a position in the list says nothing (servers answer in completion order)
            if "index" not in choice and n == 1:
                index: Any = 0
            elif "index" not in choice:
                return None, Failure("bad_response", f"a choice has no 'index' in an answer to {n} prompts; "
                                                     f"outputs cannot be matched to their prompts")
            else:
                index = choice["index"]
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
                return None, Failure("bad_response", f"choice index {str(index)[:40]!r} is not an integer in "
                                                     f"[0, {n})")
            if index in by_index:
                return None, Failure("bad_response", f"choice index {index} is repeated")
            by_index[index] = choice
        if len(by_index) != n:
            return None, Failure("bad_response", f"{len(by_index)} choices for {n} prompts")
        return [by_index[i] for i in range(n)], None

    async def _attempt(self, client, url: str, payload: dict[str, Any], n: int):
        """One POST and its check, within the deadline for the whole request."""
        deadline = self.deadline_for(payload)
        try:
            response = await asyncio.wait_for(client.post(url, json=payload), deadline)
        except (asyncio.TimeoutError, TimeoutError):
            return None, Failure("timeout", f"timed out: no complete answer within the {deadline:g} s deadline "
                                            f"(request_timeout_s)")
        return self._check(response, n)

    def _run_sync(self, url: str, payload: dict[str, Any], n: int):
        with self._lock:
            if self._loop_thread is None:
                self._loop_thread = _LoopThread()
            loop_thread = self._loop_thread

        async def attempt():
            return await self._attempt(self._async_client(), url, payload, n)

        return loop_thread.call(attempt())

    def _give_up(self, failures: list[str], n: int) -> RunError:
        return RunError(
            f"{self.base_url}/v1/completions failed {len(failures)} times for a request of {n} prompt(s) "
            f"(last: {failures[-1]}); check the server log, or raise max_retries / request_timeout_s"
        )

    # -- requests ----------------------------------------------------------------------------
    def complete(self, payload: dict[str, Any], n: int) -> Outcome:
        """Send ``payload``; return the ``n`` choices ordered by ``index`` (sync)."""
        url = self.base_url + "/v1/completions"
        failures: list[str] = []
        start_inc = self.incarnation()
        first_sent = time.time()
        for attempt in range(1, self.max_retries + 2):
            inc = self.incarnation()
            sent = time.time()
            try:
                choices, failure = self._run_sync(url, payload, n)
            except RequestRejected:
                raise
            except Exception as exc:  # httpx errors and anything the transport raises
                choices, failure = None, self._classify(exc)
            if failure is None:
                return Outcome(choices, attempt, self.incarnation() != start_inc, sent, time.time(), first_sent,
                               failures)
            failures.append(self.redact(failure.message))
            if attempt > self.max_retries:
                break
            self.log(f"request to {url} failed ({failures[-1][:200]}); retry {attempt}/{self.max_retries}")
            if self.recover is not None:
                self.recover(failure, inc)
            if self.incarnation() == inc:  # nothing restarted: back off before the next attempt
                time.sleep(self._backoff(attempt))
        raise self._give_up(failures, n)

    def _async_client(self):
        import httpx

        loop = asyncio.get_running_loop()
        clients = self.__dict__.setdefault("_async_clients", {})
        client = clients.get(id(loop))
        if client is None or client.is_closed:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=256,
                                  keepalive_expiry=KEEPALIVE_EXPIRY_S)
            client = httpx.AsyncClient(headers=self._headers(), timeout=self._timeout(), limits=limits)
            clients[id(loop)] = client
        return client

    async def acomplete(self, payload: dict[str, Any], n: int = 1) -> Outcome:
        """Like :meth:`complete`, with one ``httpx.AsyncClient`` per event loop (reused, so requests released
        together leave together instead of each paying for a new connection pool)."""
        url = self.base_url + "/v1/completions"
        failures: list[str] = []
        start_inc = self.incarnation()
        first_sent = time.time()
        client = self._async_client()
        for attempt in range(1, self.max_retries + 2):
            inc = self.incarnation()
            sent = time.time()
            try:
                choices, failure = await self._attempt(client, url, payload, n)
            except RequestRejected:
                raise
            except Exception as exc:
                choices, failure = None, self._classify(exc)
            if failure is None:
                return Outcome(choices, attempt, self.incarnation() != start_inc, sent, time.time(),
                               first_sent, failures)
            failures.append(self.redact(failure.message))
            if attempt > self.max_retries:
                break
            self.log(f"request to {url} failed ({failures[-1][:200]}); retry {attempt}/{self.max_retries}")
            if self.recover is not None:
                await asyncio.to_thread(self.recover, failure, inc)
            if self.incarnation() == inc:
                await asyncio.sleep(self._backoff(attempt))
        raise self._give_up(failures, n)


def _choice_problem(choice: dict[str, Any]) -> str | None:
    """Why a choice (that has text) cannot be recorded as it is, or None."""
    token_ids = choice.get("token_ids")
    if token_ids is not None and not (isinstance(token_ids, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2 ** 63 for t in token_ids)):
        return f"a choice's token_ids are not a list of token ids ({str(token_ids)[:60]})"
    finish = choice.get("finish_reason")
    if finish is not None and not isinstance(finish, str):
        return f"a choice's finish_reason is a {type(finish).__name__}, not a string"
    return None


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


# vLLM's HTTP server closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), which is also httpx's default
# pool expiry: a request on a connection idle for ~5 s raced the server's close and failed with ReadError (seen once
# per server start on the H100, and on filler requests). Drop idle connections well before the server does.
KEEPALIVE_EXPIRY_S = 2.0

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
