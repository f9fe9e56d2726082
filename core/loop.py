"""The process's one shared event loop, in a daemon thread (handed to plugins as :meth:`RunContext.run_async`).

Every group of every async dispatcher, and a backend's own async fan-out (the vLLM solo fleet), runs on it, so a
backend that keeps an ``httpx.AsyncClient`` between calls always sees the same loop (``asyncio.run`` per group
would close it under the client).
"""
from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def shared_loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started on first use (and again if it was closed)."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="evalhost-dispatch-loop", daemon=True)
            thread.start()
            _LOOP = loop
        return _LOOP


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run ``factory()`` on the shared loop and wait for its result (from any synchronous thread). An error or
    Ctrl-C in the caller cancels the coroutine, so a group's requests are not left running behind it."""
    future = asyncio.run_coroutine_threadsafe(factory(), shared_loop())  # type: ignore[arg-type]
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise
