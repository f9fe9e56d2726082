"""The hooks an evalhost plugin implements, each documented as pytest documents its hooks: when it is called, what
it gets, what it returns.

A plugin is a module (or any object) whose functions are marked with :data:`hookimpl` (import it from
:mod:`evalhost.api`). Built-in plugins (:data:`evalhost.registry.DEFAULT_PLUGINS`) and installed ones (entry-point
group ``evalhost``) load the same way. An implementation names only the arguments it uses (pluggy passes just
those). A misspelled hook name makes the plugin a *problem* listed by ``evalhost plugins``, and it is left out.

The ``register_*`` hooks share one shape: called **once per process, when the registry is built** (the first
command that needs a plugin; every Ray worker builds its own), before any study is read. They get ``register``, a
callable ``register(name, cls)``; calling it adds ``cls`` under ``name`` for that kind. They return nothing. When
two plugins register the same name for one kind, a study that uses the bare name is refused and must write
``distribution:name`` (see :mod:`evalhost.registry`).

When the registered classes are used, for one study: at plan time (also ``evalhost run --dry-run``) every used
class's ``check_options(options)`` classmethod runs (a :class:`~evalhost.api.UserError` stops the study with one
sentence, before a run directory or server exists) and every task source's ``load``; then per backend
configuration: ``Backend(model, options, context)``, ``preflight()``, ``start()``; per group
``Dispatcher.run_group``; per output ``Scorer.score``; finally ``Backend.close()``.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("evalhost")
hookimpl = pluggy.HookimplMarker("evalhost")


@hookspec
def register_backends(register):
    """Register backends: how prompts reach a model.

    **When**: once, when the registry is built. **Gets** ``register(name, cls)``; ``cls`` subclasses
    :class:`evalhost.api.Backend`, ``name`` is what a study's ``[[backends]] name`` says. **Returns** nothing.

    The host builds one instance per (model, backend configuration) of a run as ``cls(model, options, context)``
    (a :class:`~evalhost.api.ModelSpec`, the ``[[backends]] options`` with one point of its ``matrix``, a
    :class:`~evalhost.api.RunContext`), calls ``preflight()`` and ``start()`` once, then ``render(item)`` per item
    and ``generate`` / ``agenerate`` / ``generate_solo_many`` through the dispatchers, ``fingerprint()`` and
    ``evidence()`` for the manifest, and ``close()`` at the end (also after an error). ``capabilities`` (a set of
    ``PROMPT_LIST``, ``CONCURRENT``, ``CONTINUOUS``) must cover each dispatcher's ``requires``.

    Fleets (optional): ``solo_parallelism()`` > 1 lets ``generate_solo_many`` run that many solo prompts at once,
    each alone on its own engine replica. ``fleet()``, called once after ``start()``, returns one backend object per
    engine replica (this object first; default ``[self]``): the host then runs batch groups on them side by side,
    ONE group at a time per replica (a group is never mixed with another group's or a solo prompt's requests in an
    engine), in a thread per replica with a dispatcher object of its own, and yields their results in plan order;
    each group's evidence gets ``fleet`` (its replica, and ``cobatch_as_planned``: false when its co-batching
    verdict is not ``verified``, see :func:`evalhost.api.fleet_evidence`).
    """


@hookspec
def register_dispatchers(register):
    """Register dispatchers: how a group of prompts is sent through a backend (solo, one batch, released together,
    joining a running batch).

    **When**: once, when the registry is built. **Gets** ``register(name, cls)``; ``cls`` subclasses
    :class:`evalhost.api.Dispatcher`, ``name`` is what ``[[dispatchers]] name`` says. **Returns** nothing.

    The host builds ``cls(options, context)`` once per dispatcher configuration and backend, then calls
    ``run_group(backend, group, sampling)`` for each group and records the :class:`~evalhost.api.GroupResult`'s
    evidence with every member. A dispatcher reaches the engine only through the backend's methods
    (``generate``, ``agenerate``, ``engine_metrics``) and runs async work with ``context.run_async``. The
    classmethod ``group_size_for(options)``, when defined, fixes the group size (``continuous``).
    """


@hookspec
def register_scorers(register):
    """Register scorers: output text -> discrete label.

    **When**: once, when the registry is built. **Gets** ``register(name, cls)``; ``cls`` subclasses
    :class:`evalhost.api.Scorer`, ``name`` is what a task's ``scorer`` (or an item's) says. **Returns** nothing.

    At plan time ``cls.check_options(scorer_options)`` runs (by default it builds ``cls(options)`` once, so checks
    in ``__init__`` run then). During the run, ``cls(options)`` is built once per (name, options) and
    ``score(item, text)`` returns a :class:`~evalhost.api.Score` per output; an exception becomes that record's
    ``scorer_error`` and the run goes on (``evalhost rescore`` labels it later).
    """


@hookspec
def register_task_sources(register):
    """Register task sources: where a task's items come from.

    **When**: once, when the registry is built. **Gets** ``register(scheme, cls)``; ``cls`` subclasses
    :class:`evalhost.api.TaskSource`, and a task's ``source = "scheme:location"`` picks it. **Returns** nothing.

    At plan time ``cls.check_options(options)`` gets the study's ``[[tasks]] options`` (refuse keys outside
    ``options_known``), then ``cls().load(location, options)`` returns the items, with the host's keys ``task``,
    ``domain`` and ``scorer`` added to ``options``. Build items with :func:`evalhost.api.item_from_dict` to get
    the host's validation and its one-sentence errors; :func:`evalhost.api.load_items` loads another source.
    """


@hookspec
def register_executors(register):
    """Register executors: where the backends' work runs (``evalhost run --executor NAME``).

    **When**: once, when the registry is built. **Gets** ``register(name, cls)``; ``cls`` subclasses
    :class:`evalhost.api.Executor`. **Returns** nothing.

    The host builds ``cls(executor_options)`` before the plan (its ``__init__`` checks the options), prints
    ``describe(plan)`` on ``--dry-run``, and otherwise calls ``run(works, sampling, context, skip, on_event)``: for
    each work item it must call :func:`evalhost.api.execute_work` somewhere (a thread, a Ray actor) and hand each
    event (:class:`~evalhost.api.BackendStarted`, :class:`~evalhost.api.GroupDone`) to ``on_event`` in the
    driver's process; it returns facts for the manifest. A worker elsewhere builds its context with
    :func:`evalhost.api.worker_context` and :class:`evalhost.api.ItemLoader`.
    """


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
