"""The hooks evalhost plugins implement. Each ``register_*`` hook is called once, when the plugin manager is built
(:func:`evalhost.registry.get_registry`), with a ``register(name, cls)`` callable; it returns nothing."""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("evalhost")
hookimpl = pluggy.HookimplMarker("evalhost")


@hookspec
def register_backends(register):
    """Called once at plugin loading. Call ``register(name, cls)`` for each :class:`evalhost.types.Backend`
    subclass the plugin provides (``name`` is what a study's ``[[backends]] name`` uses). Returns nothing."""


@hookspec
def register_dispatchers(register):
    """Called once at plugin loading. Call ``register(name, cls)`` for each :class:`evalhost.types.Dispatcher`
    subclass. Returns nothing."""


@hookspec
def register_scorers(register):
    """Called once at plugin loading. Call ``register(name, cls)`` for each :class:`evalhost.types.Scorer`
    subclass. Returns nothing."""


@hookspec
def register_task_sources(register):
    """Called once at plugin loading. Call ``register(scheme, cls)`` for each :class:`evalhost.types.TaskSource`;
    a task's ``source = "scheme:location"`` picks it. Returns nothing."""


@hookspec
def register_executors(register):
    """Called once at plugin loading. Call ``register(name, cls)`` for each executor (``evalhost run --executor``);
    see :mod:`evalhost.executor` for the interface. Returns nothing."""


@hookspec
def report_sections(summary, records, run_dir, manifest, study):
    """Called by ``evalhost report`` (and at the end of ``evalhost run``) once per report, after the core tables
    are computed; a section that raises becomes a line under the report's Notes, never a failed report.

    Name only the arguments you use: pluggy passes an implementation just the ones it names, so
    ``def report_sections(summary):`` keeps working.

    * ``summary``: the summary dict that also becomes ``summary.json``; its keys are listed in
      :mod:`evalhost.analysis`'s module docstring ("Summary keys"), plus ``run`` (run directory name, study,
      status, fingerprints, evidence, plugins);
    * ``records``: the run's records, re-iterable (one dict per record, the fields of docs/architecture.md);
    * ``run_dir``: the run directory as an :class:`evalhost.rundir.RunDir` (``run_dir.path`` is its Path; read
      files through it, e.g. ``run_dir.read_json("manifest.json")``; write nothing there);
    * ``manifest``: ``manifest.json`` as a dict (plugins with versions, stack fingerprints, evidence, status);
    * ``study``: the run's ``study.toml`` parsed into a dict (``{"study": {...}, "tasks": [...], ...}``), or
      None when the file is missing or does not parse.

    Return a markdown string (a section starting with ``## ``) to append, or None."""
