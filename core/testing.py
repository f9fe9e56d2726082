"""Helpers for testing evalhost plugins (``evalhost.testing``), used by evalhost's own tests too.

* :func:`register_module`: make evalhost see a plugin module for the length of a ``with`` block, without installing
  it (no distribution, no entry point): ``evalhost run`` in this process, :func:`run_study_in` and
  :func:`evalhost.registry.get_registry` find its backends, dispatchers, scorers, task sources and report sections.
* :func:`run_study_in`: run a study (TOML text) in a temporary directory and get its records back.
* :func:`run_cli`: ``evalhost ARGS`` in this process: its exit code, stdout and stderr.
* :class:`FakeServer`: a fake OpenAI-compatible server with fault switches (a request that kills the server, HTTP
  500, a hang, malformed answers), for backends that talk to a server; its options are those of
  :mod:`evalhost.testing_server`.

A pytest test of a scorer plugin, from its own repository::

    import my_plugin
    from evalhost.testing import register_module, run_study_in

    def test_my_scorer_labels_a_run(tmp_path):
        with register_module(my_plugin):
            records = run_study_in(tmp_path, STUDY_TOML)
        assert {r["label"] for r in records} <= {"shout", "calm"}

Nothing here imports torch or starts anything until it is called.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError

__all__ = ["FakeServer", "StudyRecords", "fake_server_argv", "free_port", "register_module", "run_cli", "run_study_in"]


# -- registering a module without installing it ------------------------------------------------------------------
def _distribution_of(module: types.ModuleType) -> tuple[str, str]:
    """(distribution, version) of an installed module; ``("<module> (not installed)", __version__ or unknown)``."""
    top = module.__name__.split(".")[0]
    try:
        dists = md.packages_distributions().get(top) or []
    except Exception:  # noqa: BLE001 - a broken site-packages must not stop a test
        dists = []
    for dist in dists:
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    return f"{module.__name__} (not installed)", str(getattr(module, "__version__", "unknown"))


_ACTIVE: list[tuple[types.ModuleType, str]] = []  # the modules of the open register_module blocks, outermost first


def _add_module(registry: Any, module: types.ModuleType, name: str) -> None:
    """Register ``module`` as ``name`` in ``registry`` (skipped when already registered, e.g. by its entry point);
    a module that cannot be registered raises :class:`evalhost.errors.PluginError`."""
    from . import registry as reg_mod
    from .errors import PluginError

    if registry.pm.is_registered(module):
        return
    before = len(registry.problems)
    dist, version = _distribution_of(module)
    reg_mod._register(registry, registry.pm, module, name, dist)
    for row in registry.plugins:  # a module that is not installed still names its __version__
        if row["name"] == name and row["version"] == "unknown":
            row["version"] = version
    for entry in registry.entries.values():
        if entry.plugin == name and entry.version == "unknown":
            entry.version = version
    if not registry.pm.is_registered(module):
        raise PluginError("; ".join(registry.problems[before:]) or f"module {module.__name__} was not registered")


@contextlib.contextmanager
def register_module(module: types.ModuleType | str, name: str | None = None) -> Iterator[Any]:
    """Within the ``with`` block, the registry evalhost uses (:func:`evalhost.registry.get_registry`) is the
    built-ins, the installed entry points, the modules of enclosing ``register_module`` blocks and ``module`` (a
    module or its dotted name), registered under ``name`` (default: the module's name). Yields that registry.
    Blocks nest: inside ``with register_module(a): with register_module(b):`` both ``a`` and ``b`` are seen, and
    leaving the inner block restores the registry with ``a`` only. A module already loaded (e.g. through its own
    entry point) is not registered twice. A module that cannot be registered (a misspelled hook) raises
    :class:`evalhost.errors.PluginError` naming the problem, rather than being listed quietly as ``evalhost run``
    does; a name another plugin also registers follows evalhost's collision rule (a study must then qualify it,
    e.g. ``MODULE_NAME:refusal``). The previous registry is restored at the end."""
    from . import registry as reg_mod

    if isinstance(module, str):
        module = importlib.import_module(module)
    saved = reg_mod._REGISTRY
    registry = reg_mod.build_registry()
    for outer, outer_name in _ACTIVE:
        _add_module(registry, outer, outer_name)
    _add_module(registry, module, name or module.__name__)
    mine = (module, name or module.__name__)
    _ACTIVE.append(mine)
    reg_mod._REGISTRY = registry
    try:
        yield registry
    finally:
        _ACTIVE.remove(mine)
        reg_mod._REGISTRY = saved


# -- running a study in a temporary directory --------------------------------------------------------------------
class StudyRecords(list):
    """The records of a run (a list of dicts, in the order they were written), with ``run_dir`` (Path) and
    ``manifest`` (dict) of the run."""

    run_dir: Path
    manifest: dict[str, Any]


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_study_in(tmp_path: str | os.PathLike[str], study_toml: str, *, plugins: Iterable[types.ModuleType] = (),
                 solo_cache: bool = True, report: bool = False, **run_kwargs: Any) -> StudyRecords:
    """Write ``study_toml`` to ``tmp_path/study.toml``, run it in this process and return its records.

    Relative paths in the study (task files) are read from ``tmp_path``; the run directory goes under
    ``tmp_path/runs`` unless the study sets ``output_dir``. The solo cache, when on, lives in
    ``tmp_path/solo-cache`` (a second call with the same ``tmp_path`` can hit it; the user's cache is never
    touched). ``plugins``: modules to register for this run (:func:`register_module`). ``report=True`` also
    writes report.md / summary.json. Other keywords go to :func:`evalhost.runner.run_study` (``limit``,
    ``executor``, ``executor_options``, ``resume``). A bad study raises :class:`evalhost.errors.UserError`."""
    from .runner import run_study
    from .study import parse_study

    tmp = Path(tmp_path)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "study.toml"
    path.write_text(study_toml, encoding="utf-8")
    study = parse_study(study_toml, path)
    if "output_dir" not in _study_table(study_toml):
        study.output_dir = tmp / "runs"
    cache_env = {"EVALHOST_SOLO_CACHE": "1" if solo_cache else "0",
                 "EVALHOST_SOLO_CACHE_DIR": str(tmp / "solo-cache")}
    with contextlib.ExitStack() as stack:
        for module in plugins:
            stack.enter_context(register_module(module))
        stack.enter_context(_env(**cache_env))
        run_dir = run_study(study, progress=False, report=report, out=lambda _line: None, **run_kwargs)
    if run_dir is None:  # dry_run=True
        raise UserError("run_study_in ran nothing (dry_run); call evalhost.runner.run_study for a dry run")
    return _read_run(Path(run_dir))


def _study_table(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return dict(tomllib.loads(text).get("study") or {})


def _read_run(run_dir: Path) -> StudyRecords:
    from .records import find_records, read_records
    from .rundir import RunDir

    out = StudyRecords(read_records(find_records(run_dir)))
    out.run_dir = run_dir
    out.manifest = RunDir(run_dir).read_json(default={})
    return out


# -- the fake OpenAI-compatible server -------------------------------------------------------------------------
FAULTS = ("die_on", "fail_500_on", "hang_on", "short_on", "omit_index_on", "repeat_index_on",
          "index_out_of_range_on", "bad_token_ids_on", "drip_on")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and that this process has not handed out before."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1")


def fake_server_argv(port: int, state: str | os.PathLike[str], **faults: Any) -> list[str]:
    """The command line of a fake server on ``port`` counting its requests in the file ``state``. ``faults``:
    ``die_on``, ``fail_500_on``, ``hang_on``, ``short_on``, ``omit_index_on``, ``repeat_index_on``,
    ``index_out_of_range_on``, ``bad_token_ids_on``, ``drip_on`` (request numbers, 1-based, counted across
    restarts), ``drip_seconds``, ``startup_delay`` (s), ``latency`` (s, every completions answer),
    ``exit_at_start`` (bool), ``require_key`` (str)."""
    argv = [sys.executable, "-m", "evalhost.testing_server", "--port", str(port), "--state", str(state)]
    for key, value in faults.items():
        flag = "--" + key.replace("_", "-")
        if key in FAULTS:
            numbers = [value] if isinstance(value, int) else list(value)
            if numbers:
                argv += [flag, ",".join(str(int(n)) for n in numbers)]
        elif key == "exit_at_start":
            argv += [flag] if value else []
        elif key in ("drip_seconds", "startup_delay", "require_key", "latency"):
            argv += [flag, str(value)]
        else:
            raise TypeError(f"unknown fake server option {key!r}; known: {', '.join(FAULTS)}, drip_seconds, "
                            f"startup_delay, latency, exit_at_start, require_key")
    return argv


class FakeServer:
    """A fake OpenAI-compatible server in its own process on 127.0.0.1, for fault injection::

        with FakeServer(tmp_path, fail_500_on=[1, 2]) as server:
            backend = MyBackend(model, {"base_url": server.url}, context)

    ``requests`` counts the completions requests it got; ``log`` is its output file. The fault options are those
    of :func:`fake_server_argv`."""

    def __init__(self, workdir: str | os.PathLike[str], startup_timeout_s: float = 30.0, **faults: Any) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.state = self.workdir / f"fake-server-{self.port}.count"
        self.log = self.workdir / f"fake-server-{self.port}.log"
        self.argv = fake_server_argv(self.port, self.state, **faults)
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> int:
        try:
            return int(self.state.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def start(self) -> "FakeServer":
        import httpx

        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the fake server exited with code {self.proc.returncode} at start; see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the fake server did not answer /health within {self.startup_timeout_s} s; see {self.log}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> "FakeServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()



def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``evalhost ARGV`` in this process, as a user would run it: ``(exit code, stdout, stderr)``. Bad input shows
    as code 2 and one ``error:`` line on stderr; an exception that escapes (a traceback for the user) propagates."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from .cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()
