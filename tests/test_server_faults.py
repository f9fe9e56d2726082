"""Fault injection for the managed-server backend: the real ``vllm`` backend code (server management, restarts,
retries) drives tests/fake_server.py instead of vLLM, because a real server cannot be made to crash, fail or hang
on a chosen request.  Request #1 of every fake server is the backend's return_token_ids probe at start."""
from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from evalhost.errors import RunError, UserError
from evalhost.plugins.backends.server import ManagedServer, port_in_use
from evalhost.plugins.backends.vllm import VLLMBackend
from evalhost.testing import fake_server_argv
from evalhost.types import ModelSpec, RunContext, Sampling

FAKE = Path(__file__).with_name("fake_server.py")
PROMPTS = ["alpha prompt", "beta prompt", "gamma prompt"]


class FakeVLLM(VLLMBackend):
    """The vllm backend with its server command replaced by the fault-injecting fake server."""

    fake_args: list[str] = []

    def preflight(self) -> None:
        pass

    def server_args(self, port: int) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(port)]

    def server_argv(self, port: int) -> list[str]:
        state = Path(self.context.run_dir) / "requests.count"
        return fake_server_argv(port, state) + list(self.fake_args)  # evalhost.testing's fake server


def make(tmp_path: Path, fake_args: list[str], **options) -> tuple[FakeVLLM, list[str]]:
    lines: list[str] = []
    ctx = RunContext(run_dir=tmp_path, cache_dir=tmp_path / "cache", log=lines.append)
    opts = {"backoff_s": 0.05, "request_timeout_s": 5, "startup_timeout_s": 30, "stop_timeout_s": 5,
            "label": "fake", **options}
    backend = FakeVLLM(ModelSpec(name="fake", path=str(tmp_path)), opts, ctx)
    backend.fake_args = fake_args
    return backend, lines


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_healthy_fake_orders_choices_by_index(tmp_path):
    backend, _ = make(tmp_path, [])
    try:
        gens = backend.generate(PROMPTS, Sampling(max_tokens=4))
        assert [g.text for g in gens] == ["echo:" + p[:12] for p in PROMPTS]  # fake answers in reverse order
        assert all(g.attempts == 1 and not g.restarted for g in gens)
        assert backend.token_ids_source == "server"
        assert gens[0].token_ids == [ord(c) for c in gens[0].text]
    finally:
        backend.close()


def test_killed_mid_run_restarts_and_retries(tmp_path):
    backend, lines = make(tmp_path, ["--die-on", "2"])
    try:
        backend.start()
        first_pid = backend.server.proc.pid
        gens = backend.generate(PROMPTS, Sampling(max_tokens=4))
        assert [g.text for g in gens] == ["echo:" + p[:12] for p in PROMPTS]
        assert all(g.restarted and g.attempts == 2 for g in gens)
        assert backend.restarts == 1 and backend.server.starts == 2
        assert backend.server.proc.pid != first_pid and group_gone(first_pid)
        assert any("restarting (1/3)" in line for line in lines)
        log = (tmp_path / "server-fake.log").read_text()
        assert "simulated crash on request #2" in log and log.count("=== evalhost: starting") == 2
        # the next request is unaffected
        again = backend.generate(PROMPTS[:1], Sampling(max_tokens=4))[0]
        assert again.attempts == 1 and not again.restarted
    finally:
        backend.close()


def test_killed_with_concurrent_requests_restarts_once(tmp_path):
    backend, _ = make(tmp_path, ["--die-on", "3"])
    try:
        backend.start()

        async def run():
            return await asyncio.gather(*[backend.agenerate(p, Sampling(max_tokens=4)) for p in PROMPTS])

        gens = asyncio.run(run())
        assert [g.text for g in gens] == ["echo:" + p[:12] for p in PROMPTS]
        assert backend.restarts == 1
        assert any(g.restarted for g in gens)
        assert all(g.restarted == (g.attempts > 1) for g in gens)
    finally:
        backend.close()


def test_http_500_bounded_retries_then_success(tmp_path):
    backend, lines = make(tmp_path, ["--fail-500-on", "2,3"])
    try:
        gens = backend.generate(PROMPTS, Sampling(max_tokens=4))
        assert all(g.attempts == 3 and not g.restarted for g in gens)
        assert backend.restarts == 0
        assert sum("HTTP 500" in line for line in lines) == 2
        assert len(gens[0].extra["failures"]) == 2
    finally:
        backend.close()


def test_http_500_forever_gives_clear_run_error(tmp_path):
    backend, _ = make(tmp_path, ["--fail-500-on", ",".join(str(i) for i in range(2, 50))], max_retries=3)
    try:
        backend.start()
        t0 = time.monotonic()
        with pytest.raises(RunError, match=r"failed 4 times .*HTTP 500.*max_retries"):
            backend.generate(PROMPTS, Sampling(max_tokens=4))
        assert time.monotonic() - t0 < 10
        assert backend.restarts == 0
    finally:
        backend.close()


def test_hung_server_times_out_and_restarts(tmp_path):
    backend, lines = make(tmp_path, ["--hang-on", "2"], request_timeout_s=1.5)
    try:
        backend.start()
        gens = backend.generate(PROMPTS, Sampling(max_tokens=4))
        assert all(g.restarted and g.attempts == 2 for g in gens)
        assert any("timed out (hung)" in line for line in lines)
    finally:
        backend.close()


def test_short_answer_is_never_returned_as_partial_output(tmp_path):
    backend, _ = make(tmp_path, ["--short-on", "2"])
    try:
        gens = backend.generate(PROMPTS, Sampling(max_tokens=4))
        assert len(gens) == 3 and all(g.attempts == 2 for g in gens)
        assert "2 choices for 3 prompts" in gens[0].extra["failures"][0]
    finally:
        backend.close()


def test_restarts_are_bounded(tmp_path):
    backend, _ = make(tmp_path, ["--die-on", ",".join(str(i) for i in range(2, 50))], max_restarts=2,
                      max_retries=10)
    try:
        backend.start()
        with pytest.raises(RunError, match=r"after 2 restart\(s\) \(max_restarts\)"):
            backend.generate(PROMPTS, Sampling(max_tokens=4))
        assert backend.restarts == 2
    finally:
        backend.close()


def test_early_death_at_startup_quotes_log(tmp_path):
    backend, _ = make(tmp_path, ["--exit-at-start"])
    t0 = time.monotonic()
    with pytest.raises(RunError, match=r"exited with code 3 during startup(.|\n)*simulated startup crash"):
        backend.start()
    assert time.monotonic() - t0 < 15
    backend.close()


def test_close_stops_process_group_and_frees_port(tmp_path):
    backend, _ = make(tmp_path, [])
    backend.start()
    server = backend.server
    assert server.url.startswith("http://127.0.0.1:")
    backend.close()
    assert server.proc.poll() is not None and group_gone(server.pgid)
    assert not port_in_use(server.port)
    backend.close()  # safe twice


def test_port_in_use_is_a_user_error_without_starting(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        backend, _ = make(tmp_path, [], port=port)
        with pytest.raises(UserError, match=rf"port {port} on 127.0.0.1 is already in use.*option port"):
            backend.start()
        assert backend.server is None or backend.server.proc is None


def test_stop_escalates_to_sigkill(tmp_path):
    # a process that ignores SIGTERM must still be gone after stop()
    code = ("import signal, socket, sys, time, http.server\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200); self.send_header('Content-Length','0'); self.end_headers()\n"
            "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    from evalhost.plugins.backends.server import free_port

    port = free_port()
    server = ManagedServer([sys.executable, "-c", code, str(port)], port=port, log_path=tmp_path / "s.log",
                           startup_timeout_s=20, stop_timeout_s=1, log=lambda m: None)
    server.start()
    t0 = time.monotonic()
    server.stop()
    assert server.proc.returncode == -9 and group_gone(server.pgid)
    assert time.monotonic() - t0 < 10


CHILD = """
import sys, time
from pathlib import Path
from evalhost.plugins.backends.server import ManagedServer, free_port
port = free_port()
tmp = Path(sys.argv[1])
server = ManagedServer([sys.executable, sys.argv[2], "--port", str(port), "--state", str(tmp / "n")], port=port,
                       log_path=tmp / "child.log", startup_timeout_s=30, log=lambda m: None)
server.start()
print(server.pgid, port, flush=True)
if sys.argv[3] == "exit":
    sys.exit(0)  # no close(): the atexit hook must stop the server
time.sleep(60)  # wait for SIGTERM / SIGINT
"""


@pytest.mark.parametrize("how", ["exit", "SIGTERM", "SIGINT", "SIGKILL"])
def test_no_orphan_server_when_evalhost_exits_or_is_signalled(tmp_path, how):
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(FAKE), how if how == "exit" else "wait"],
                            stdout=subprocess.PIPE, text=True)
    pgid, port = (int(x) for x in proc.stdout.readline().split())
    assert not group_gone(pgid)
    if how != "exit":
        proc.send_signal(getattr(signal, how))
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not group_gone(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_gone(pgid), f"the managed server survived {how}"  # SIGKILL: the parent-death signal stops it
    assert not port_in_use(port)


def test_server_started_from_a_short_lived_thread_outlives_the_thread(tmp_path):
    """Linux's parent-death signal follows the forking THREAD: servers are spawned from one long-lived thread, so a
    replica started (or restarted) from a worker thread is not stopped when that thread returns (seen on the H100:
    a fleet's replicas that started together all shut down the moment their start threads ended)."""
    import threading

    from evalhost.plugins.backends.server import free_port

    port = free_port()
    server = ManagedServer([sys.executable, str(FAKE), "--port", str(port), "--state", str(tmp_path / "n")],
                           port=port, log_path=tmp_path / "t.log", startup_timeout_s=30, stop_timeout_s=5,
                           log=lambda m: None)
    t = threading.Thread(target=server.start)
    t.start()
    t.join()
    try:
        time.sleep(1.5)
        assert server.alive() and not group_gone(server.pgid)
    finally:
        server.stop()
    assert group_gone(server.pgid)


CHILD_THREAD = CHILD.replace("server.start()\n", "import threading\nt = threading.Thread(target=server.start)\n"
                                                  "t.start(); t.join()\n")


def test_thread_started_server_still_dies_with_a_killed_parent(tmp_path):
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", CHILD_THREAD, str(tmp_path), str(FAKE), "wait"],
                            stdout=subprocess.PIPE, text=True)
    pgid, port = (int(x) for x in proc.stdout.readline().split())
    time.sleep(1.0)
    assert not group_gone(pgid)  # alive after its starting thread ended
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not group_gone(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_gone(pgid), "the managed server survived SIGKILL of evalhost"


def test_free_port_never_hands_out_the_same_port_twice():
    """Replicas starting together each ask for a free port before any binds it (CI saw two replicas of a fleet end
    up on one port): free_port remembers what it handed out and stays out of the ephemeral range."""
    from evalhost.plugins.backends.server import ephemeral_range, free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert not any(port_in_use(p) for p in ports[:5])
    # below the range the kernel hands to outgoing connections, which cannot then take a port a server was given
    low, _ = ephemeral_range()
    assert all(p < low for p in ports)


# ------------------------------------------------------------------------------------------------ issue 18
@pytest.mark.parametrize("fault, message", [
    ("--omit-index-on", "a choice has no 'index' in an answer to 3 prompts"),
    ("--repeat-index-on", "choice index 0 is repeated"),
    ("--index-out-of-range-on", "choice index '3' is not an integer in [0, 3)"),
    ("--bad-token-ids-on", "token_ids are not a list of token ids"),
])
def test_choices_are_matched_by_index_only_and_a_bad_answer_is_retried(tmp_path, fault, message):
    """The fake server answers in reverse order; on request #2 its choices cannot be matched by index (none, a repeated
    one, one out of range) or carry token ids that are not integers. The real backend code retries that answer and
    records every output against its own prompt; before, an answer without indices was matched by position."""
    backend, _ = make(tmp_path, [fault, "2"])
    try:
        gens = backend.generate(PROMPTS, Sampling(max_tokens=4))
        assert [g.text for g in gens] == ["echo:" + p[:12] for p in PROMPTS]
        assert all(g.attempts == 2 for g in gens)
        assert message in gens[0].extra["failures"][0]
        assert gens[0].token_ids == [ord(c) for c in gens[0].text]
    finally:
        backend.close()


def test_answers_without_index_are_never_recorded(tmp_path):
    """A server that never sends an index cannot serve a multi-prompt request: the request fails with one sentence
    after its retries (no output is guessed), while single-prompt requests (nothing to confuse) still work."""
    backend, _ = make(tmp_path, ["--omit-index-on", ",".join(str(i) for i in range(1, 40))], max_retries=2)
    try:
        solo = backend.generate(PROMPTS[:1], Sampling(max_tokens=4))
        assert solo[0].text == "echo:" + PROMPTS[0][:12] and solo[0].attempts == 1
        with pytest.raises(RunError, match=r"failed 3 times .*has no 'index'"):
            backend.generate(PROMPTS, Sampling(max_tokens=4))
    finally:
        backend.close()


def test_request_timeout_is_a_deadline_for_the_whole_request(tmp_path):
    """Request #2's answer is dripped one byte at a time over 30 s: every read returns quickly, so a per-read timeout
    never fires (before: the request took 30 s and passed with request_timeout_s = 2). The deadline cuts it off and
    the retry (after a restart: a server that does not answer in time counts as hung) gets the answer."""
    backend, lines = make(tmp_path, ["--drip-on", "2", "--drip-seconds", "30"], request_timeout_s=2)
    try:
        backend.start()
        t0 = time.monotonic()
        gens = backend.generate(PROMPTS, Sampling(max_tokens=4))
        assert time.monotonic() - t0 < 20  # well before the 30 s drip would have finished
        assert [g.text for g in gens] == ["echo:" + p[:12] for p in PROMPTS]
        assert all(g.attempts == 2 for g in gens)
        assert "no complete answer within the 2 s deadline" in gens[0].extra["failures"][0]
    finally:
        backend.close()


def test_async_request_timeout_is_a_deadline_too(tmp_path):
    backend, _ = make(tmp_path, ["--drip-on", "2", "--drip-seconds", "30"], request_timeout_s=2)
    try:
        backend.start()
        t0 = time.monotonic()
        gen = asyncio.run(backend.agenerate(PROMPTS[0], Sampling(max_tokens=4)))
        assert time.monotonic() - t0 < 20
        assert gen.text == "echo:" + PROMPTS[0][:12] and gen.attempts == 2
        assert "deadline" in gen.extra["failures"][0]
    finally:
        backend.close()


def test_default_request_timeout_is_sized_for_max_tokens(tmp_path):
    from evalhost.plugins.backends.completions_client import CompletionsClient
    from evalhost.plugins.backends.completions_retry import default_request_timeout

    assert default_request_timeout(16) == 136.0
    assert default_request_timeout(128) == 248.0
    assert default_request_timeout(4096) == 4216.0
    backend, _ = make(tmp_path, [], request_timeout_s=None)
    del backend.options["request_timeout_s"]
    try:
        backend.start()
        assert backend.client.request_timeout_s is None
        assert backend.client.deadline_for({"max_tokens": 128}) == 248.0
        assert CompletionsClient("http://127.0.0.1:9", request_timeout_s=5).deadline_for({"max_tokens": 128}) == 5.0
    finally:
        backend.close()


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), 10 ** 9])
def test_request_timeout_out_of_range_is_one_sentence(value):
    with pytest.raises(UserError, match=r"request_timeout_s must be a number of seconds above 0"):
        VLLMBackend.check_options({"request_timeout_s": value})


def test_close_during_a_request_ends_it_instead_of_hanging(tmp_path):
    """Sync requests run on the client's own event loop thread: closing the client while one is in flight (Ctrl-C,
    a failing sibling configuration) cancels it; the caller gets an error, not a thread blocked forever."""
    import threading

    backend, _ = make(tmp_path, ["--hang-on", "2"], request_timeout_s=60, max_retries=0)
    try:
        backend.start()
        outcome = {}

        def call():
            try:
                backend.generate(PROMPTS, Sampling(max_tokens=4))
                outcome["result"] = "returned"
            except Exception as exc:  # noqa: BLE001 - the error type is what we look at
                outcome["result"] = type(exc).__name__

        t = threading.Thread(target=call, daemon=True)
        t.start()
        log = tmp_path / "server-fake.log"
        deadline = time.monotonic() + 30
        while "simulated hang on request #2" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)  # until the request is in flight (the server hangs on it)
        backend.client.close()
        t.join(timeout=15)
        assert not t.is_alive(), "the request still waits after the client was closed"
        assert outcome["result"] == "RunError"
    finally:
        backend.close()
