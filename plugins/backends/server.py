"""A managed server process (e.g. vLLM's OpenAI-compatible api_server) that evalhost starts and always stops.

* The command is an argv list (never a shell); the process gets its own session (``start_new_session=True``) so
  the whole process group (api server + engine workers) can be signalled, and so a Ctrl-C in the terminal does not
  reach it before we shut it down cleanly.
* It binds 127.0.0.1 on a free port, or on a port the user chose (a port in use is a :class:`UserError`).
* ``start()`` waits for ``GET /health`` (with a timeout), logs progress every ~15 s, and notices early death
  (raising :class:`RunError` that quotes the last lines of the server log).
* ``stop()``: SIGTERM to the process group, wait, then SIGKILL. Every live server is also stopped at interpreter
  exit (atexit) and on SIGTERM/SIGINT, so no server outlives evalhost.
"""
from __future__ import annotations

import atexit
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from evalhost.api import RunError, UserError

HOST = "127.0.0.1"

_LIVE: "set[ManagedServer]" = set()
_LIVE_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False


_HANDED_OUT: dict[int, float] = {}  # port -> when free_port returned it
_HANDED_OUT_LOCK = threading.Lock()
_PORT_HOLD_S = 600.0  # a server may take minutes to bind the port it was given
_LOWEST_PORT = 20000


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel gives to outgoing connections (Linux's ip_local_port_range; its default elsewhere)."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = HOST) -> int:
    """A port nothing listens on, below the kernel's ephemeral range, that this process has not handed out in the
    last ten minutes. Below the ephemeral range: a server may take minutes to bind its port, and meanwhile any
    outgoing connection (e.g. a health poll of another replica) could be given the same port by the kernel (CI saw
    two servers starting together collide this way). Not handed out before: servers starting at the same time each
    get their own port."""
    import random

    low, _ = ephemeral_range()
    candidates = range(_LOWEST_PORT, low) if low - _LOWEST_PORT >= 1000 else None
    with _HANDED_OUT_LOCK:
        now = time.monotonic()
        for port, when in list(_HANDED_OUT.items()):
            if now - when > _PORT_HOLD_S:
                del _HANDED_OUT[port]
        for _ in range(200):
            if candidates is not None:
                port = random.choice(candidates)
            else:  # an unusual ephemeral range: let the kernel pick
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, 0))
                    port = s.getsockname()[1]
            if port not in _HANDED_OUT and not port_in_use(port, host):
                _HANDED_OUT[port] = now
                return port
    raise RunError(f"could not find a free TCP port on {host}; stop some servers or give the backend option port")


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when something already listens on ``host:port`` (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _open_log(path: Path):
    """The server log, opened for appending without following a symbolic link: a run directory received from
    someone else may hold a link named like a log, and a resume must not append through it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise UserError(f"the server log {path} is a symbolic link; evalhost never writes through one - "
                            f"remove the link and run again") from None
        raise UserError(f"cannot open the server log {path} ({exc.strerror}); check the run directory") from None
    return os.fdopen(fd, "ab")


def tail_lines(path: Path, n: int = 20, start: int = 0) -> list[str]:
    """The last ``n`` lines of a log file (from byte offset ``start``)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            lines = deque(fh, maxlen=n)
    except OSError:
        return []
    return [line.decode("utf-8", "replace").rstrip("\n") for line in lines]


def stop_all() -> None:
    """Stop every live managed server (atexit and signal path)."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        try:
            server.stop()
        except Exception:  # best effort at exit
            pass


def _install_handlers() -> None:
    """Once: atexit, plus SIGTERM/SIGINT handlers that stop the servers and then behave as before."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(stop_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)

        def handler(sig, frame, _previous=previous):
            stop_all()
            if callable(_previous):
                _previous(sig, frame)
            elif _previous == signal.SIG_IGN:
                return
            else:  # SIG_DFL: die of the signal, as we would have
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)

        try:
            signal.signal(signum, handler)
        except (ValueError, OSError):  # not the main thread of the main interpreter
            pass



def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the process that started the server dies, even by
    SIGKILL, so a killed evalhost (or a killed Ray actor) never leaves an orphaned server holding the GPU. The server
    runs in its own session so a terminal's Ctrl-C reaches evalhost, which then stops it in order."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass

class _Spawner:
    """Starts child processes from ONE long-lived daemon thread. Linux sends the parent-death signal when the
    *thread* that forked the child ends, not the process: a server started from a short-lived thread (a fleet's
    replicas starting together, a restart inside a request pool) would be stopped as soon as that thread returned.
    The spawner thread lives as long as the process, so the signal still fires exactly when evalhost dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._jobs: "queue.Queue[tuple[dict, threading.Event, dict]]" = queue.Queue()

    def popen(self, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="evalhost-spawner", daemon=True)
                self._thread.start()
        done, box = threading.Event(), {}
        self._jobs.put((kwargs, done, box))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["proc"]

    def _loop(self) -> None:
        while True:
            kwargs, done, box = self._jobs.get()
            try:
                box["proc"] = subprocess.Popen(**kwargs)  # noqa: S603 - argv list, no shell
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()


_SPAWNER = _Spawner()


class ManagedServer:
    """One server process. ``argv`` must already contain the host/port arguments (see :attr:`port`)."""

    def __init__(
        self,
        argv: list[str],
        *,
        port: int,
        log_path: Path,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 900.0,
        stop_timeout_s: float = 30.0,
        log: Callable[[str], None] = print,
        label: str = "server",
        health_path: str = "/health",
        progress_every_s: float = 15.0,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.port = int(port)
        self.host = HOST
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.startup_timeout_s = float(startup_timeout_s)
        self.stop_timeout_s = float(stop_timeout_s)
        self.log = log
        self.label = label
        self.health_path = health_path
        self.progress_every_s = progress_every_s
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.starts = 0  # how many times the process was started (1 + restarts)
        self.log_offset = 0  # byte offset in the log where the current incarnation's output starts
        self.startup_seconds: list[float] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------
    def check_port(self) -> None:
        if port_in_use(self.port, self.host):
            raise UserError(
                f"port {self.port} on {self.host} is already in use by another process; stop that process, "
                f"or set the backend option port to a free port (or leave port out to let evalhost pick one)"
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the process and wait until it answers ``/health``; RunError if it dies or times out."""
        import httpx

        if self.alive():
            return
        # A previous incarnation may still be releasing the port for a moment.
        deadline = time.monotonic() + (10.0 if self.starts else 0.0)
        while port_in_use(self.port, self.host):
            if time.monotonic() >= deadline:
                self.check_port()
            time.sleep(0.5)
        _install_handlers()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in self.env.items()})
        with _open_log(self.log_path) as fh:
            self.log_offset = fh.tell()
            fh.write(f"=== evalhost: starting {self.label} (start #{self.starts + 1}) at {time.ctime()}\n".encode())
            fh.flush()
            self.proc = _SPAWNER.popen(
                args=self.argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                close_fds=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        self.pgid = self.proc.pid  # new session => the child leads its own process group
        self.starts += 1
        with _LIVE_LOCK:
            _LIVE.add(self)
        t0 = time.monotonic()
        last_progress = t0
        health = self.url + self.health_path
        while True:
            code = self.proc.poll()
            if code is not None:
                lines = tail_lines(self.log_path, 15, self.log_offset)
                self.stop()
                raise RunError(
                    f"{self.label} exited with code {code} during startup (log: {self.log_path}); last lines:\n"
                    + "\n".join(lines)
                )
            try:
                if httpx.get(health, timeout=5.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            now = time.monotonic()
            if now - t0 > self.startup_timeout_s:
                lines = tail_lines(self.log_path, 15, self.log_offset)
                self.stop()
                raise RunError(
                    f"{self.label} did not answer {self.health_path} within {self.startup_timeout_s:.0f} s "
                    f"(raise the backend option startup_timeout_s; log: {self.log_path}); last lines:\n"
                    + "\n".join(lines)
                )
            if now - last_progress >= self.progress_every_s:
                last_progress = now
                self.log(f"{self.label}: starting on {self.url}, waiting for {self.health_path} "
                         f"({now - t0:.0f} s of at most {self.startup_timeout_s:.0f} s)")
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        self.startup_seconds.append(round(elapsed, 1))
        self.log(f"{self.label}: ready on {self.url} after {elapsed:.0f} s")

    def stop(self) -> None:
        """SIGTERM the process group, wait, then SIGKILL what is left. Safe to call twice."""
        proc, pgid = self.proc, self.pgid
        if proc is None:
            return
        if proc.poll() is None or _group_alive(pgid):
            _signal_group(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + 5.0
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if proc.poll() is None or _group_alive(pgid):
                _signal_group(pgid, signal.SIGKILL)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        else:
            proc.wait()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def restart(self) -> None:
        self.stop()
        self.start()


def _signal_group(pgid: int | None, sig: int) -> None:
    if pgid is None:
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int | None) -> bool:
    """True while any process of the group exists (zombies of our own child included until reaped)."""
    if pgid is None:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
