"""The retry rules of one ``/v1/completions`` request, written once for the sync and the async client.

:func:`request_steps` decides and does no I/O. It is a generator that yields what to do next and is sent back what
happened:

* :class:`Send` — POST the payload once, within ``deadline`` seconds for the whole request; the shell sends back
  the HTTP response, or the exception the transport raised (a timeout of the deadline included);
* :class:`Recover` — call the client's ``recover`` hook (the managed vLLM backend restarts a dead or hung server);
* :class:`Sleep` — back off for ``seconds``.

It returns the :class:`Outcome` (every prompt has its choice) or raises :class:`RequestRejected` /
:class:`evalhost.api.RunError`. :meth:`CompletionsClient.complete` (sync) and :meth:`~CompletionsClient.acomplete`
(async) only carry the steps out, so these rules hold for both because they are written here alone:

* **retried**: connection errors, timeouts, HTTP 408/429/500/502/503/504 and malformed answers (not JSON, wrong
  number of choices, a choice without text, a missing/repeated/out-of-range ``index`` in an answer to several
  prompts, ``token_ids`` that are not integers, a ``finish_reason`` that is not a string);
* **not retried**: any other HTTP status from 400 up (401/403 a refused key, 404 a wrong URL, 400 a bad request):
  :class:`RequestRejected` at once, its body redacted;
* at most ``max_retries`` retries (``max_retries + 1`` attempts), then one RunError naming the count and the last
  failure;
* before each retry the ``recover`` hook runs (when the client has one); a retry after a restart (the incarnation
  changed) goes at once, any other after ``min(backoff_max_s, backoff_s * 2 ** (attempt - 1))`` seconds;
* the deadline of one attempt is ``request_timeout_s``, or unset ``120 s + 1 s x max_tokens``
  (:func:`default_request_timeout`).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Union

from evalhost.api import RunError

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
DEFAULT_TIMEOUT_BASE_S = 120.0
DEFAULT_TIMEOUT_PER_TOKEN_S = 1.0


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


@dataclass(frozen=True)
class Send:
    """POST the payload once; the whole request (connect, wait, read) within ``deadline`` seconds."""

    deadline: float


@dataclass(frozen=True)
class Recover:
    """Call ``recover(failure, incarnation)`` (the incarnation seen when the failed attempt was sent)."""

    failure: Failure
    incarnation: int


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Union[Send, Recover, Sleep]


@dataclass
class RetryPolicy:
    """How many retries, how long to back off, and the deadline of one attempt."""

    max_retries: int = 4
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    request_timeout_s: float | None = None

    def deadline_for(self, payload: dict[str, Any]) -> float:
        """Seconds one attempt of ``payload`` may take, from sending to the last byte of the answer."""
        if self.request_timeout_s is not None:
            return self.request_timeout_s
        return default_request_timeout(payload.get("max_tokens"))

    def backoff(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * (2 ** (attempt - 1)))


def request_steps(policy: RetryPolicy, payload: dict[str, Any], n: int, *, url: str,
                  incarnation: Callable[[], int], redact: Callable[[str], str], log: Callable[[str], None],
                  recover: bool) -> Generator[Step, Any, Outcome]:
    """The attempts of one request of ``n`` prompts to ``url`` (see the module's rules). ``incarnation()`` counts
    the server's restarts; ``recover``: whether the client has a recover hook (then a :class:`Recover` step comes
    before each retry)."""
    failures: list[str] = []
    start_inc = incarnation()
    first_sent = time.time()
    for attempt in range(1, policy.max_retries + 2):
        inc = incarnation()
        sent = time.time()
        deadline = policy.deadline_for(payload)
        choices, failure = judge((yield Send(deadline)), n, url, deadline, redact)
        if failure is None:
            return Outcome(choices, attempt, incarnation() != start_inc, sent, time.time(), first_sent, failures)
        failures.append(redact(failure.message))
        if attempt > policy.max_retries:
            break
        log(f"request to {url} failed ({failures[-1][:200]}); retry {attempt}/{policy.max_retries}")
        if recover:
            yield Recover(failure, inc)
        if incarnation() == inc:  # nothing restarted: back off before the next attempt
            yield Sleep(policy.backoff(attempt))
    raise RunError(
        f"{url} failed {len(failures)} times for a request of {n} prompt(s) (last: {failures[-1]}); check the "
        f"server log, or raise max_retries / request_timeout_s"
    )


class Steps:
    """Iterate over the steps of :func:`request_steps`: set :attr:`result` to what a :class:`Send` gave before
    asking for the next step; at the end :attr:`outcome` holds the Outcome (an error raised by the core goes out of
    the iteration). Closing it closes the core."""

    def __init__(self, steps: Generator[Step, Any, Outcome]) -> None:
        self._steps = steps
        self.result: Any = None
        self.outcome: Outcome | None = None

    def __iter__(self) -> "Steps":
        return self

    def __next__(self) -> Step:
        result, self.result = self.result, None
        try:
            return self._steps.send(result)
        except StopIteration as done:
            self.outcome = done.value
            raise StopIteration from None

    def close(self) -> None:
        self._steps.close()


def judge(result: Any, n: int, url: str, deadline: float,
          redact: Callable[[str], str]) -> tuple[list[dict[str, Any]] | None, Failure | None]:
    """(the ``n`` choices in prompt order, None) for a good answer, (None, why) for an attempt to retry; raises
    :class:`RequestRejected` for an answer not to retry. ``result``: the response, or the exception raised."""
    if isinstance(result, (asyncio.TimeoutError, TimeoutError)):
        return None, Failure("timeout", f"timed out: no complete answer within the {deadline:g} s deadline "
                                        f"(request_timeout_s)")
    if isinstance(result, BaseException):
        return None, classify(result)
    try:
        return check_answer(result, n, url, redact)
    except RequestRejected:
        raise
    except Exception as exc:  # a body that cannot be read counts as a transport failure
        return None, classify(exc)


def classify(exc: BaseException) -> Failure:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return Failure("timeout", f"timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        return Failure("connect", f"connection failed ({exc})")
    return Failure("protocol", f"{type(exc).__name__}: {exc}")


def check_answer(response: Any, n: int, url: str,
                 redact: Callable[[str], str]) -> tuple[list[dict[str, Any]] | None, Failure | None]:
    """The status and body of one answer: choices matched to prompts by their ``index`` only."""
    status = response.status_code
    if status >= 400:
        body = redact(response.text[:500])
        if status in RETRY_STATUS:
            return None, Failure("http", f"HTTP {status}: {body}", status)
        raise RequestRejected(f"{url} rejected the request with HTTP {status}: {body}", status, body)
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
            return None, Failure("bad_response", f"choice index {str(index)[:40]!r} is not an integer in [0, {n})")
        if index in by_index:
            return None, Failure("bad_response", f"choice index {index} is repeated")
        by_index[index] = choice
    if len(by_index) != n:
        return None, Failure("bad_response", f"{len(by_index)} choices for {n} prompts")
    return [by_index[i] for i in range(n)], None


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
