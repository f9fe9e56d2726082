"""The retry rules of /v1/completions requests are written once (plugins/backends/completions_retry.request_steps)
and carried out by two thin shells: CompletionsClient.complete (sync) and CompletionsClient.acomplete (async).

Each case below runs one fault sequence of evalhost.testing.FakeServer through each shell (a fresh server each, so
request #k is the same request in both). A recorder between the core and the shell writes down every step the core
asks for (send within a deadline, recover, sleep), how it judged each answer, and how it ended (the outcome's
attempts and restart, or the error). Both shells must give the SAME trace, and it must be the expected one: which
failures retry, how often, the backoff and its cap, the deadline (120 s + 1 s x max_tokens when unset), the restart
through the recover hook (no backoff after a restart), and the 4xx answers that are never retried.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from evalhost.errors import RunError
from evalhost.plugins.backends.completions_client import CompletionsClient
from evalhost.plugins.backends.completions_retry import (Recover, RequestRejected, Send, Sleep,
                                                         default_request_timeout, judge)
from evalhost.testing import FakeServer, free_port

PROMPTS = ["alpha prompt", "beta prompt", "gamma prompt"]


def _record(steps, trace: list, n: int, url: str):
    """Pass the core's steps through, writing down each step, the core's judgement of each answer, and the end."""
    result = None
    try:
        while True:
            step = steps.send(result)
            if isinstance(step, Send):
                trace.append(("send", step.deadline))
            elif isinstance(step, Recover):
                trace.append(("recover", step.failure.kind))
            elif isinstance(step, Sleep):
                trace.append(("sleep", step.seconds))
            result = yield step
            if isinstance(step, Send):
                try:
                    _, failure = judge(result, n, url, step.deadline, lambda text: text)
                    trace.append(("answer", "ok" if failure is None else failure.kind))
                except RequestRejected as exc:
                    trace.append(("answer", f"rejected {exc.status}"))
    except StopIteration as done:
        trace.append(("return", done.value.attempts, done.value.restarted))
        return done.value
    except Exception as exc:
        trace.append(("raise", type(exc).__name__))
        raise


class TracedClient(CompletionsClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trace: list[tuple] = []

    def _steps(self, payload, n, url):
        return _record(super()._steps(payload, n, url), self.trace, n, url)


def _restarter(server: FakeServer, state: dict):
    """A recover hook like the managed vLLM backend's: restart the server if it died or hung, once per incarnation."""

    def recover(failure, seen: int) -> None:
        if state["incarnation"] != seen:
            return
        try:  # a crashing server drops its connections a moment before it is reaped
            server.proc.wait(timeout=1.0)
        except Exception:  # noqa: BLE001 - still running
            pass
        if server.proc.poll() is not None or failure.kind == "timeout":
            server.stop()
            server.start()
            state["incarnation"] += 1

    return recover


def run_case(workdir: Path, shell: str, faults: dict, n: int = 3, restart: bool = False, url_suffix: str = "",
             no_server: bool = False, **client_options: Any) -> tuple[list[tuple], Any]:
    """(trace, outcome or the exception raised) of one request of ``n`` prompts through ``shell``."""
    options = {"max_retries": 3, "backoff_s": 0.01, "backoff_max_s": 0.02, "request_timeout_s": 5.0,
               "log": lambda line: None, **client_options}
    payload = {"model": "fake", "prompt": PROMPTS[0] if n == 1 else PROMPTS[:n], "max_tokens": 4}
    if "max_tokens" in options:
        payload["max_tokens"] = options.pop("max_tokens")
    server = None if no_server else FakeServer(workdir / shell, **faults).start()
    url = f"http://127.0.0.1:{free_port()}" if server is None else server.url + url_suffix
    state = {"incarnation": 0}
    if restart:
        options.update(recover=_restarter(server, state), incarnation=lambda: state["incarnation"])
    client = TracedClient(url, **options)
    try:
        if shell == "sync":
            result: Any = client.complete(payload, n)
        else:
            result = asyncio.run(client.acomplete(payload, n))
    except Exception as exc:  # noqa: BLE001 - the error is part of what is compared
        result = exc
    finally:
        client.close()
        if server is not None:
            server.stop()
    return client.trace, result


def both(tmp_path: Path, faults: dict, **kw: Any) -> tuple[list[tuple], Any, Any]:
    """Run the case through the sync and the async shell; their traces must be equal. (trace, sync, async)."""
    sync_trace, sync_result = run_case(tmp_path, "sync", faults, **kw)
    async_trace, async_result = run_case(tmp_path, "async", faults, **kw)
    assert sync_trace == async_trace, f"sync: {sync_trace}\nasync: {async_trace}"
    assert type(sync_result) is type(async_result), (sync_result, async_result)
    return sync_trace, sync_result, async_result


SEND = ("send", 5.0)
OK = ("answer", "ok")


def test_a_healthy_answer_is_one_attempt_and_the_default_deadline_is_sized_for_max_tokens(tmp_path):
    trace, outcome, async_outcome = both(tmp_path, {}, request_timeout_s=None, max_tokens=128)
    assert default_request_timeout(128) == 248.0
    assert trace == [("send", 248.0), OK, ("return", 1, False)]
    for out in (outcome, async_outcome):  # fake answers in reverse order; the choices come back in prompt order
        assert [c["text"] for c in out.choices] == ["echo:" + p[:12] for p in PROMPTS]
        assert out.failures == []


def test_http_500_is_retried_with_a_capped_backoff(tmp_path):
    trace, outcome, _ = both(tmp_path, {"fail_500_on": [1, 2, 3]})
    assert trace == [SEND, ("answer", "http"), ("sleep", 0.01), SEND, ("answer", "http"), ("sleep", 0.02),
                     SEND, ("answer", "http"), ("sleep", 0.02), SEND, OK, ("return", 4, False)]
    assert len(outcome.failures) == 3 and all(f.startswith("HTTP 500") for f in outcome.failures)


def test_http_500_past_max_retries_is_one_run_error(tmp_path):
    trace, sync_error, async_error = both(tmp_path, {"fail_500_on": list(range(1, 10))}, max_retries=2)
    assert trace == [SEND, ("answer", "http"), ("sleep", 0.01), SEND, ("answer", "http"), ("sleep", 0.02),
                     SEND, ("answer", "http"), ("raise", "RunError")]
    for error in (sync_error, async_error):
        assert isinstance(error, RunError) and not isinstance(error, RequestRejected)
        assert "/v1/completions failed 3 times for a request of 3 prompt(s) (last: HTTP 500" in str(error)
        assert str(error).endswith("check the server log, or raise max_retries / request_timeout_s")


@pytest.mark.parametrize("fault, message", [
    ("short_on", "2 choices for 3 prompts"),
    ("omit_index_on", "a choice has no 'index' in an answer to 3 prompts"),
    ("repeat_index_on", "choice index 0 is repeated"),
    ("index_out_of_range_on", "choice index '3' is not an integer in [0, 3)"),
    ("bad_token_ids_on", "token_ids are not a list of token ids"),
])
def test_a_malformed_answer_is_retried_never_recorded(tmp_path, fault, message):
    trace, outcome, async_outcome = both(tmp_path, {fault: [1]})
    assert trace == [SEND, ("answer", "bad_response"), ("sleep", 0.01), SEND, OK, ("return", 2, False)]
    for out in (outcome, async_outcome):
        assert message in out.failures[0]
        assert [c["text"] for c in out.choices] == ["echo:" + p[:12] for p in PROMPTS]


@pytest.mark.parametrize("case, kw, status", [
    ("refused key", {"faults": {"require_key": "sk-right"}, "api_key": "sk-wrong-secret"}, 401),
    ("wrong URL", {"faults": {}, "url_suffix": "/nowhere"}, 404),
])
def test_a_4xx_answer_is_rejected_at_once_without_retry(tmp_path, case, kw, status):
    kw = dict(kw)
    trace, sync_error, async_error = both(tmp_path, kw.pop("faults"), **kw)
    assert trace == [SEND, ("answer", f"rejected {status}"), ("raise", "RequestRejected")]
    for error in (sync_error, async_error):
        assert error.status == status and f"rejected the request with HTTP {status}" in str(error)
        assert "sk-wrong-secret" not in str(error)


def test_a_server_that_dies_is_restarted_and_the_retry_goes_without_backoff(tmp_path):
    trace, outcome, async_outcome = both(tmp_path, {"die_on": [1]}, restart=True)
    assert trace == [SEND, ("answer", "protocol"), ("recover", "protocol"), SEND, OK, ("return", 2, True)]
    assert outcome.restarted and async_outcome.restarted


def test_a_hung_server_times_out_at_the_deadline_and_is_restarted(tmp_path):
    trace, outcome, _ = both(tmp_path, {"hang_on": [1]}, restart=True, request_timeout_s=1.0)
    assert trace == [("send", 1.0), ("answer", "timeout"), ("recover", "timeout"), ("send", 1.0), OK,
                     ("return", 2, True)]
    assert "no complete answer within the 1 s deadline (request_timeout_s)" in outcome.failures[0]


def test_a_dripped_answer_is_cut_off_at_the_whole_request_deadline(tmp_path):
    """Each read of the dripped answer returns quickly; only the deadline of the whole request stops it."""
    trace, outcome, _ = both(tmp_path, {"drip_on": [1], "drip_seconds": 30}, request_timeout_s=1.0)
    assert trace == [("send", 1.0), ("answer", "timeout"), ("sleep", 0.01), ("send", 1.0), OK, ("return", 2, False)]
    assert "within the 1 s deadline" in outcome.failures[0]


def test_a_server_that_dies_without_a_recover_hook_is_retried_then_one_run_error(tmp_path):
    """The openai backend has no recover hook: the connection errors after the death are retried with backoff."""
    trace, sync_error, _ = both(tmp_path, {"die_on": [1]}, max_retries=2)
    assert trace == [SEND, ("answer", "protocol"), ("sleep", 0.01), SEND, ("answer", "connect"), ("sleep", 0.02),
                     SEND, ("answer", "connect"), ("raise", "RunError")]
    assert "failed 3 times" in str(sync_error) and "connection failed" in str(sync_error)


def test_no_server_at_all_is_connection_errors_then_one_run_error(tmp_path):
    trace, sync_error, _ = both(tmp_path, {}, no_server=True, max_retries=1)
    assert trace == [SEND, ("answer", "connect"), ("sleep", 0.01), SEND, ("answer", "connect"), ("raise", "RunError")]
    assert "failed 2 times for a request of 3 prompt(s)" in str(sync_error)
