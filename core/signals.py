"""Signals during a run: SIGTERM stops it like Ctrl-C (the driver then keeps every record written, marks the
manifest ``interrupted`` and says how to resume)."""
from __future__ import annotations

import signal
from typing import Callable


def sigterm_as_interrupt() -> Callable[[], None]:
    """From now on SIGTERM raises :class:`KeyboardInterrupt`; returns the function that puts the previous handler
    back. Off the main thread (where Python cannot set a handler) nothing changes and the function does nothing."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old)
