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
def report_sections(summary, records):
    """Called by ``evalhost report`` after the core tables are computed, with the summary dict and the list of
    record dicts. Return a markdown string (a section starting with ``## ``) to append, or None."""
