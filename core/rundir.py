"""One type that knows every file of a run directory: names, the lock, safe opens, atomic writes.

A run directory may come from someone else (a colleague's tarball, a committed result), so nothing in it is trusted:

* **no links followed**: every file is opened relative to the directory with ``O_NOFOLLOW`` (and ``plots/`` with
  ``O_DIRECTORY | O_NOFOLLOW``); a symbolic link, a FIFO or a device where a file belongs is refused with one
  sentence (:class:`~evalhost.errors.UserError`), never written through;
* **atomic writes**: :meth:`RunDir.write_atomic` writes a uniquely named temp file in the same directory, fsyncs
  it and renames it over the name (a rename replaces a link, it never writes through one); ``records.jsonl`` and
  ``adjudications.jsonl`` are the exception: they are appended to (:meth:`RunDir.open_append`, ``O_APPEND``);
* **bounded reads**: :meth:`RunDir.read_bytes` / :meth:`RunDir.read_json` refuse a file over a size limit;
* **one writer**: :meth:`RunDir.lock` takes an ``fcntl.flock`` on ``run.lock`` inside the directory and records the
  holder (PID, purpose, command, time) in it. A second process gets a UserError (exit 2) naming the holder. The
  kernel drops the lock when its process dies, so a lock left by ``kill -9`` is simply taken over.

Usage (``run``, ``--resume``, ``rescore``, ``adjudicate``, ``import``)::

    from evalhost.rundir import RunDir

    rd = RunDir(run_dir)
    with rd.lock(purpose="rescore"):
        rd.write_atomic("summary.json", text)          # str or bytes
        with rd.open_append("records.jsonl") as fh:    # binary, O_APPEND | O_NOFOLLOW
            fh.write(b"...\\n")
        manifest = rd.read_json("manifest.json")       # size-limited, regular files only
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import UserError

RECORDS = "records.jsonl"
ARCHIVED = "records.jsonl.gz"
MANIFEST = "manifest.json"
STUDY = "study.toml"
ADJUDICATIONS = "adjudications.jsonl"
REPORT = "report.md"
SUMMARY = "summary.json"
PLOTS = "plots"
LOCK = "run.lock"

MANIFEST_LIMIT = 64 * 2**20  # a manifest holds fingerprints and evidence: kilobytes, rarely a few MiB

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not hang; ignored for regular files


def _shown(text: Any, n: int = 160) -> str:
    """``text`` on one line (control characters escaped), at most ``n`` characters."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return s if len(s) <= n else s[: n - 3] + "..."


class RunDir:
    """The files of one run directory (the directory itself is the path the user gave)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- the directory ---------------------------------------------------------------------------------------
    def _dir_fd(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        except FileNotFoundError:
            raise UserError(f"run directory {_shown(self.path)} does not exist; pass the directory "
                            f"`evalhost run` printed") from None
        except NotADirectoryError:
            raise UserError(f"{_shown(self.path)} is not a directory; pass the run directory "
                            f"`evalhost run` printed") from None
        except OSError as exc:
            raise UserError(f"run directory {_shown(self.path)} cannot be opened ({exc.strerror})") from None

    def require(self) -> "RunDir":
        """Raise UserError unless the path is an existing directory."""
        os.close(self._dir_fd())
        return self

    def kind(self, name: str) -> str | None:
        """``"file"``, ``"dir"``, ``"link"``, ``"other"`` or None (absent) for ``name``, without following links."""
        try:
            st = os.lstat(self.path / name)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return "link"
        if stat.S_ISREG(st.st_mode):
            return "file"
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        return "other"

    def exists(self, name: str) -> bool:
        """True when ``name`` is a regular file; a link or other non-file there is refused with one sentence."""
        k = self.kind(name)
        if k in ("link", "other", "dir"):
            self._refuse(name, k)
        return k == "file"

    def _refuse(self, name: str, kind: str | None) -> None:
        what = {"link": "a symbolic link", "dir": "a directory", "other": "not a regular file"}.get(kind or "", kind)
        raise UserError(f"{_shown(self.path / name)} is {what}; evalhost never follows links or opens special "
                        f"files in a run directory - replace it with a regular file or remove it")

    # -- opening ---------------------------------------------------------------------------------------------
    def _open(self, name: str, flags: int, mode: int = 0o644, dir_fd: int | None = None) -> int:
        """``os.open`` of one name inside the directory, never through a link; the result is a regular file."""
        own = dir_fd is None
        dfd = self._dir_fd() if own else dir_fd
        try:
            try:
                fd = os.open(name, flags | _NOFOLLOW | _CLOEXEC | _NONBLOCK, mode, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EISDIR):
                    st = os.lstat(name, dir_fd=dfd)
                    self._refuse(name, "link" if stat.S_ISLNK(st.st_mode) else
                                 "dir" if stat.S_ISDIR(st.st_mode) else "other")
                if isinstance(exc, FileNotFoundError):
                    raise
                raise UserError(f"{_shown(self.path / name)} cannot be opened ({exc.strerror})") from None
        finally:
            if own:
                os.close(dfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._refuse(name, "other")
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return fd

    def open_read(self, name: str) -> IO[bytes]:
        """A regular file of the directory opened for reading (binary); FileNotFoundError when absent."""
        return os.fdopen(self._open(name, os.O_RDONLY), "rb")

    def open_append(self, name: str) -> IO[bytes]:
        """``name`` opened ``O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW`` (binary, unbuffered writes go out whole)."""
        return os.fdopen(self._open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab", buffering=0)

    def open_update(self, name: str) -> IO[bytes]:
        """``name`` opened for reading and writing (no create, no link): for repairing a torn tail."""
        return os.fdopen(self._open(name, os.O_RDWR), "r+b", buffering=0)

    def read_bytes(self, name: str, limit: int) -> bytes:
        """The bytes of a regular file, refused with one sentence when longer than ``limit``."""
        with self.open_read(name) as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise UserError(f"{_shown(self.path / name)} is larger than {limit // 2**20} MiB, far more than evalhost "
                            f"writes; it is not a file of an evalhost run")
        return data

    def read_json(self, name: str = MANIFEST, limit: int = MANIFEST_LIMIT, default: Any = ...,
                  kind: type = dict) -> Any:
        """Parse a JSON file of the directory (size-limited, regular files only). Absent: ``default`` if given,
        else UserError. Invalid JSON or a top-level value that is not ``kind``: UserError."""
        try:
            data = self.read_bytes(name, limit)
        except FileNotFoundError:
            if default is not ...:
                return default
            raise UserError(f"{_shown(self.path)} has no {name}; pass a run directory made by `evalhost run`") \
                from None
        try:
            value = json.loads(data)
        except UnicodeDecodeError:
            raise UserError(f"{_shown(self.path / name)} is not UTF-8 text; restore it from the run") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{_shown(self.path / name)} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                            f"restore it from the run") from None
        except RecursionError:
            raise UserError(f"{_shown(self.path / name)} is nested too deeply to be an evalhost file") from None
        if kind is not None and not isinstance(value, kind):
            raise UserError(f"{_shown(self.path / name)} holds a JSON {type(value).__name__}, not an "
                            f"{'object' if kind is dict else kind.__name__}; restore it from the run")
        return value

    # -- writing ---------------------------------------------------------------------------------------------
    def write_atomic(self, name: str, data: bytes | str, subdir: str | None = None) -> Path:
        """Replace ``name`` (in ``subdir``, e.g. ``plots``) by ``data`` atomically: unique temp file in the same
        directory, fsync, rename. An existing link or non-file at ``name`` is refused, never written through."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        dfd = self._target_dir_fd(name, subdir)
        try:
            tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            with contextlib.suppress(OSError):
                os.fsync(dfd)
        finally:
            os.close(dfd)
        return self.path / subdir / name if subdir else self.path / name

    def write_json(self, name: str, data: Any) -> Path:
        text = json.dumps(data, indent=2, sort_keys=True, default=str)
        return self.write_atomic(name, text + "\n")

    def _target_dir_fd(self, name: str, subdir: str | None) -> int:
        """A descriptor of the directory ``name`` is to be written in (the run directory, or its ``subdir``), after
        refusing a link or non-file already at ``name``. The caller closes it."""
        dfd = self._dir_fd()
        try:
            if subdir is not None:
                sub = self._subdir_fd(subdir, dfd)
                os.close(dfd)
                dfd = sub
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                self._refuse(f"{subdir}/{name}" if subdir else name,
                             "link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "other")
        except BaseException:
            os.close(dfd)
            raise
        return dfd

    def _subdir_fd(self, name: str, dfd: int) -> int:
        try:
            os.mkdir(name, 0o755, dir_fd=dfd)
        except FileExistsError:
            pass
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dfd)
        except OSError:
            st = os.lstat(name, dir_fd=dfd)
            self._refuse(name, "link" if stat.S_ISLNK(st.st_mode) else "other")
            raise

    def move_in(self, src: str | os.PathLike[str], name: str, subdir: str | None = None) -> Path:
        """Rename the file ``src`` (made in a private temp directory inside this one, e.g. a plot) to ``name``
        (in ``subdir``); a link or non-file already at ``name`` is refused, never written through."""
        dfd = self._target_dir_fd(name, subdir)
        try:
            os.replace(src, name, dst_dir_fd=dfd)
        finally:
            os.close(dfd)
        return self.path / subdir / name if subdir else self.path / name

    def subdir(self, name: str = PLOTS) -> Path:
        """Make ``name`` (a real directory, not a link) inside the run directory and return its path."""
        dfd = self._dir_fd()
        try:
            os.close(self._subdir_fd(name, dfd))
        finally:
            os.close(dfd)
        return self.path / name

    # -- the lock --------------------------------------------------------------------------------------------
    def holder(self) -> dict[str, Any]:
        """What the lock file says about its last holder ({} when nothing readable)."""
        try:
            return json.loads(self.read_bytes(LOCK, 64 * 1024) or b"{}")
        except (OSError, ValueError, UserError):
            return {}

    def _live_holder(self, tries: int = 40, wait_s: float = 0.025) -> dict[str, Any]:
        """The holder as written by the process that holds the lock now. A holder that has just taken the lock
        may not have written its name yet (the file is empty, or still names a killed predecessor): read again for
        up to about a second before settling for what is there."""
        info: dict[str, Any] = {}
        for _ in range(tries):
            info = self.holder()
            pid = info.get("pid")
            if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and _alive(pid):
                return info
            time.sleep(wait_s)
        return info

    @contextlib.contextmanager
    def lock(self, purpose: str = "run") -> Iterator["RunDir"]:
        """Hold the run directory's lock for the ``with`` block (one writer at a time).

        Raises UserError (exit 2) naming the holder when another process holds it. Not re-entrant within one
        process: a second ``lock()`` while the first is held is refused too."""
        import fcntl

        fd = self._open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._live_holder()
                who = f"pid {info['pid']}" if isinstance(info.get("pid"), int) else "another process"
                what = f" ({_shown(info.get('purpose'), 20)}: {_shown(info.get('command'), 120)})" \
                    if info.get("command") else ""
                raise UserError(f"{_shown(self.path)} is in use by {who}{what}; wait for it to finish (or stop "
                                f"it) and try again") from None
            info = {"pid": os.getpid(), "purpose": purpose, "command": _shown(" ".join(sys.argv), 300),
                    "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
            yield self
        finally:
            os.close(fd)  # closing the descriptor releases the flock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
