"""The HTTP client of OpenAI-compatible ``/v1/completions`` endpoints: a sync and an async shell around one retry core.

:class:`CompletionsClient` sends one request (:meth:`~CompletionsClient.complete`, sync, or
:meth:`~CompletionsClient.acomplete`, async) and carries out the steps that
:func:`~evalhost.plugins.backends.completions_retry.request_steps` decides (send, recover, sleep): which failures are
retried, how often, the deadline and the restart are written there once. A result is returned only when every
prompt of the request has a complete choice; otherwise RunError, never a partial or misordered output.

* **``request_timeout_s`` is a deadline for the whole request** (connect, wait, and reading the whole body), not a
  per-read timeout: a server that drips its answer byte by byte is cut off at the deadline. Unset, it is sized for
  the request's ``max_tokens`` (120 s + 1 s per token). Both shells send with ``httpx.AsyncClient`` under
  ``asyncio.wait_for``; the sync one runs each attempt on one private event loop thread per client, so the same
  deadline covers both paths.
* **Keep-alive**: idle connections are dropped after :data:`KEEPALIVE_EXPIRY_S`, before vLLM's server closes them.

The API key (if any) lives only in the ``Authorization`` header of the HTTP client; it is redacted from every
message this module produces.
"""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import closing
from typing import Any, Callable, Generator

from .completions_retry import (DEFAULT_TIMEOUT_BASE_S, DEFAULT_TIMEOUT_PER_TOKEN_S, Failure, Outcome, Recover,
                                RetryPolicy, Send, Step, Steps, request_steps)

# vLLM's HTTP server closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), which is also httpx's default
# pool expiry: a request on a connection idle for ~5 s raced the server's close and failed with ReadError (seen once
# per server start on the H100, and on filler requests). Drop idle connections well before the server does.
KEEPALIVE_EXPIRY_S = 2.0
# httpcore's connection pool matches every queued request against every connection each time a request starts or
# ends: 64 concurrent requests in one pool took 480 ms of CPU per group on the shared CPU VM (an instant fake server),
# in 8 pools 71 ms. The async shell spreads its requests over this many pools per event loop, in turn.
ASYNC_POOL_SHARDS = 16


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

    def stop(self, clients=()) -> None:
        """Cancel what is still in flight (a caller waiting on it gets an error, never a hang), close ``clients``,
        end the loop."""

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # their callers' futures are settled by now
            for client in clients:
                if not client.is_closed:
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
    payload's ``max_tokens`` (:func:`~evalhost.plugins.backends.completions_retry.default_request_timeout`)."""

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
        self.policy = RetryPolicy(int(max_retries), float(backoff_s), float(backoff_max_s),
                                  None if request_timeout_s is None else float(request_timeout_s))
        self.recover = recover
        self.incarnation = incarnation or (lambda: 0)
        self.log = log
        self._client = None
        self._lock = threading.Lock()
        self._loop_thread: _LoopThread | None = None
        self._async_clients: dict[Any, Any] = {}  # per event loop: the request pools; (loop, "get"): aget's
        self._turn = 0
        self._ssl = None

    @property
    def request_timeout_s(self) -> float | None:
        return self.policy.request_timeout_s

    # -- plumbing ----------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def deadline_for(self, payload: dict[str, Any]) -> float:
        """Seconds one attempt of ``payload`` may take, from sending to the last byte of the answer."""
        return self.policy.deadline_for(payload)

    def _timeout(self):
        import httpx

        # a per-read bound as well; the deadline of the whole request is asyncio.wait_for's (see _post)
        read = self.request_timeout_s or DEFAULT_TIMEOUT_BASE_S + DEFAULT_TIMEOUT_PER_TOKEN_S * 131072
        return httpx.Timeout(read, connect=min(10.0, read))

    def redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def client(self):
        """The synchronous ``httpx.Client`` (GETs and the capability probe; requests go through the shells)."""
        import httpx

        with self._lock:
            if self._client is None:
                self._client = httpx.Client(headers=self._headers(), timeout=self._timeout(),
                                            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S))
            return self._client

    def _ssl_context(self):
        """One SSL context for every async client of this client: building one (what ``httpx.AsyncClient()`` does
        by default, even for http URLs) took 57 ms of CPU on the shared CPU VM."""
        import httpx

        with self._lock:
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            return self._ssl

    def _async_client(self, n_shards: int = ASYNC_POOL_SHARDS):
        """One of this event loop's ``n_shards`` ``httpx.AsyncClient`` pools, in turn (reused, so
        requests released together leave together instead of each paying for a new connection pool; several, because
        httpcore's pool does work quadratic in the requests it holds each time one starts or ends)."""
        import httpx

        loop = asyncio.get_running_loop()
        shards = self._async_clients.get(id(loop))
        if shards is None or shards[0].is_closed:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=256,
                                  keepalive_expiry=KEEPALIVE_EXPIRY_S)
            verify = self._ssl_context()
            shards = [httpx.AsyncClient(headers=self._headers(), timeout=self._timeout(), limits=limits, verify=verify)
                      for _ in range(n_shards)]
            self._async_clients[id(loop)] = shards
        self._turn = (self._turn + 1) % len(shards)
        return shards[self._turn]

    async def aget(self, url: str, timeout: float = 10.0):
        """GET ``url`` (e.g. the server's ``/metrics``) with this event loop's ``httpx.AsyncClient`` for such reads,
        made once per loop (a new client per scrape built an SSL context each time, on the loop that was sending
        the group's requests). Its own pool, so a scrape never queues behind the group's requests; no
        ``Authorization`` header (the metrics page never needed one)."""
        import httpx

        key = (id(asyncio.get_running_loop()), "get")
        client = self._async_clients.get(key)
        if client is None or client.is_closed:
            client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
                                       verify=self._ssl_context())
            self._async_clients[key] = client
        return await client.get(url, timeout=timeout)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            loop_thread, self._loop_thread = self._loop_thread, None
        if loop_thread is not None:
            loop_thread.stop(self._async_clients.pop(id(loop_thread.loop), None) or [])

    def get(self, path: str, timeout: float = 10.0):
        return self.client().get(self.base_url + path, timeout=timeout)

    # -- the one retry core and its two shells -----------------------------------------------
    def _steps(self, payload: dict[str, Any], n: int, url: str) -> Generator[Step, Any, Outcome]:
        return request_steps(self.policy, payload, n, url=url, incarnation=self.incarnation, redact=self.redact,
                             log=self.log, recover=self.recover is not None)

    @staticmethod
    async def _post(client, url: str, payload: dict[str, Any], deadline: float) -> Any:
        """One POST within ``deadline`` seconds for the whole request: the response, or the exception raised."""
        try:
            return await asyncio.wait_for(client.post(url, json=payload), deadline)
        except Exception as exc:  # httpx errors, the deadline, anything the transport raises: the core judges
            return exc

    def _send_sync(self, url: str, payload: dict[str, Any], deadline: float) -> Any:
        with self._lock:
            if self._loop_thread is None:
                self._loop_thread = _LoopThread()
            loop_thread = self._loop_thread

        async def attempt():
            return await self._post(self._async_client(1), url, payload, deadline)  # one request at a time

        try:
            return loop_thread.call(attempt())
        except Exception as exc:  # cancelled by close(), or the loop is gone
            return exc

    def complete(self, payload: dict[str, Any], n: int) -> Outcome:
        """Send ``payload``; return the ``n`` choices ordered by ``index`` (sync shell)."""
        url = self.base_url + "/v1/completions"
        with closing(Steps(self._steps(payload, n, url))) as steps:
            for step in steps:
                if isinstance(step, Send):
                    steps.result = self._send_sync(url, payload, step.deadline)
                elif isinstance(step, Recover):
                    self.recover(step.failure, step.incarnation)
                else:
                    time.sleep(step.seconds)
            return steps.outcome

    async def acomplete(self, payload: dict[str, Any], n: int = 1) -> Outcome:
        """Like :meth:`complete` (async shell), with one of this event loop's ``httpx.AsyncClient`` pools."""
        url = self.base_url + "/v1/completions"
        client = self._async_client()
        with closing(Steps(self._steps(payload, n, url))) as steps:
            for step in steps:
                if isinstance(step, Send):
                    steps.result = await self._post(client, url, payload, step.deadline)
                elif isinstance(step, Recover):
                    await asyncio.to_thread(self.recover, step.failure, step.incarnation)
                else:
                    await asyncio.sleep(step.seconds)
            return steps.outcome
