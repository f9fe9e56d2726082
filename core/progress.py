"""Progress of a run on stderr (:class:`Progress`): a bar on a terminal, periodic lines otherwise."""
from __future__ import annotations

import os
import sys
import threading
import time


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress on stderr: a bar on a terminal; otherwise (a log file, a pipe, CI) one line every
    ``EVALHOST_PROGRESS_S`` seconds (default 5), e.g. ``generations 120/480 (25%), 3 of 24 cells done, elapsed
    1:02, eta 3:05``, and a last line when the run stops. ``left_by_cell``: generations still to make per cell."""

    def __init__(self, total: int, done: int, enabled: bool, left_by_cell: dict[str, int] | None = None) -> None:
        self.bar = None
        self.total, self.done, self.done0 = total, done, done
        self.left = dict(left_by_cell or {})
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._lines = 0
        if not (enabled and total):
            return
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("generations", total=total, completed=done)
            self.bar.start()
            return
        try:
            self.interval = max(0.05, float(os.environ.get("EVALHOST_PROGRESS_S", "5")))
        except ValueError:
            self.interval = 5.0
        self._thread = threading.Thread(target=self._tick, name="evalhost-progress", daemon=True)
        self._thread.start()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        made = self.done - self.done0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = clock((self.total - self.done) * elapsed / made) if made > 0 else "unknown"
        cells = f"{sum(1 for v in self.left.values() if v <= 0)} of {len(self.left)} cells done, " if self.left else ""
        return (f"generations {self.done}/{self.total} ({pct:.0f}%), {cells}elapsed {clock(elapsed)}, "
                f"eta {eta}")

    def _print(self, msg: str) -> None:
        with self._lock:
            print(msg, file=sys.stderr, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._lines += 1
            self._print(self.line())

    def log(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.console.print(msg)
        else:
            self._print(msg)

    def advance(self, n: int, what: str = "") -> None:
        self.done += n
        if what in self.left:
            self.left[what] -= n
        if self.bar is not None:
            self.bar.update(self.task, advance=n, description=what or "generations")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if self._lines:
                self._print(self.line())
