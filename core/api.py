"""``evalhost.api``: the whole plugin surface in one module. A plugin imports this and nothing else of evalhost.

What is here, by use:

* **Hooks**: :data:`hookimpl` marks a plugin's hook functions; the hooks (when each is called, what it gets and
  returns) are documented in :mod:`evalhost.hookspecs`.
* **Types** (:mod:`evalhost.types`): :class:`TaskItem`, :class:`Sampling`, :class:`Generation`, :class:`Member`,
  :class:`Group`, :class:`GroupResult`, :class:`Score`, :class:`ModelSpec`, :class:`RunContext`; the base classes
  :class:`Backend`, :class:`Dispatcher`, :class:`Scorer`, :class:`TaskSource`; backend capabilities
  :data:`PROMPT_LIST`, :data:`CONCURRENT`, :data:`CONTINUOUS`; :data:`DOMAINS`; :func:`sha256_text`.
* **Errors**: :class:`UserError` (bad input: one sentence naming the problem and the fix; exit 2),
  :class:`RunError` (the run cannot go on; exit 1), :class:`PluginError`; :func:`user_path` (a user's path, ``~``
  expanded, or one sentence).
* **Option helpers**: :func:`check_keys` (the one "has no option 'x' (did you mean 'y'?)" sentence),
  :func:`check_type`, :func:`check_choice`, :func:`did_you_mean`, :func:`closest`.
* **Item helpers**: :func:`item_from_dict` (validate one raw item and build a :class:`TaskItem`, as the ``jsonl``
  source does), :func:`load_items` (the items of another task source spec, e.g. for a source that wraps one),
  :data:`ITEM_FIELDS`.
* **Services** handed to backends and dispatchers through ``self.context`` (a :class:`RunContext`):
  ``context.resolve_model_path(path)``, ``context.load_items(spec)``, ``context.run_async(factory)`` (the shared
  event loop), ``context.log(message)``, ``context.run_dir``, ``context.cache_dir``. Engine state goes the other
  way, through a backend method: ``await backend.engine_metrics()``.
* **Executor contract**: :class:`Executor`; :func:`execute_work` (start a work's backend, run its groups, yield
  :class:`BackendStarted` and :class:`GroupDone` events for the driver); :class:`ItemLoader` (a picklable
  ``load_items`` for a worker process); :func:`worker_context`; :func:`plugin_class`; :func:`fleet_evidence` (a batch
  group's evidence on a batched fleet, :meth:`Backend.fleet`: its replica and whether its verdict is as planned).
* **Analysis vocabulary**: :func:`label_direction` (how a solo label changed in batch, e.g. ``refuse_to_comply``);
  the co-batching verdicts a dispatcher records in its evidence as ``cobatch`` (:func:`synchronized_verdict`,
  :func:`continuous_verdict`, :func:`prompt_list_verdict`; the rules are in :mod:`evalhost.cobatch`).
* **Records**: :data:`BACKEND_EXTRA_LIMIT` (bytes): a generation's ``extra`` is recorded as ``backend_extra``,
  made JSON-safe and cut to this size with a note (:mod:`evalhost.backend_extra`).
* **Testing a plugin** (:mod:`evalhost.testing`, for a plugin's own tests): :func:`register_module` (register a
  module without installing it), :func:`run_study_in` (run a study in a temp directory, get its records),
  :class:`FakeServer` and :func:`fake_server_argv` (a fake OpenAI-compatible server with fault switches).

Importing this module imports no torch, vllm or transformers, and not the run loop (the executor names load it on
first use).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import PluginError, RunError, UserError, user_path
from .hookspecs import hookimpl
from .models import check_model_path
from .rundir import MANIFEST, RunDir
from .options import check_choice, check_keys, check_type, closest, did_you_mean
from .types import (CONCURRENT, CONTINUOUS, DOMAINS, PROMPT_LIST, Backend, Dispatcher, Generation, Group,
                    GroupResult, Member, ModelSpec, RunContext, Sampling, Score, Scorer, TaskItem, TaskSource,
                    sha256_text)

__all__ = [
    "hookimpl",
    # types
    "TaskItem", "Sampling", "Generation", "Member", "Group", "GroupResult", "Score", "ModelSpec", "RunContext",
    "Backend", "Dispatcher", "Scorer", "TaskSource", "PROMPT_LIST", "CONCURRENT", "CONTINUOUS", "DOMAINS",
    "sha256_text",
    # errors
    "UserError", "RunError", "PluginError", "user_path",
    # options and items
    "check_keys", "check_type", "check_choice", "did_you_mean", "closest", "item_from_dict", "ITEM_FIELDS",
    "load_items",
    # models: what a study's model path will resolve to, checked without side effects (Backend.check_model)
    "check_model_path",
    # a run directory's files (read them through RunDir: size-limited, no links followed)
    "RunDir", "MANIFEST",
    # executors
    "Executor", "execute_work", "BackendStarted", "GroupDone", "ItemLoader", "worker_context", "plugin_class",
    "fleet_evidence",
    # analysis vocabulary: label changes, the co-batching verdicts dispatchers record (evalhost.cobatch)
    "label_direction", "synchronized_verdict", "continuous_verdict", "prompt_list_verdict",
    # records: the size limit of a generation's extra (recorded as backend_extra)
    "BACKEND_EXTRA_LIMIT",
    # testing a plugin (evalhost.testing; loaded on first use)
    "register_module", "run_study_in", "FakeServer", "fake_server_argv",
]


def load_items(source: str, base_dir: str | Path | None = None, task: str | None = None,
               scorer: str | None = None) -> list[TaskItem]:
    """The items of task source spec ``source`` (``"builtin:benign"``, ``"jsonl:path"``...), loaded through the
    registered task sources and validated like a study's task; a relative path is read from ``base_dir``.
    ``task`` names the task (default: the spec's last part), ``scorer`` is the task's scorer."""
    from .plan import load_task
    from .registry import get_registry
    from .study import TaskSpec

    name = task or source.split(":")[-1].split("/")[-1]
    return load_task(TaskSpec(name=name, source=source, scorer=scorer), get_registry(),
                     Path(base_dir) if base_dir is not None else None)


def plugin_class(kind: str, name: str) -> type:
    """The class registered as ``name`` for ``kind`` (``backend``, ``dispatcher``, ``scorer``, ``task_source``,
    ``executor``); an unknown or contested name is one sentence (:class:`UserError`)."""
    from .registry import get_registry

    return get_registry().get(kind, name)


def worker_context(run_dir: str | Path, log: Callable[[str], None] = print,
                   load_items: Callable[[str], list[TaskItem]] | None = None) -> RunContext:
    """A :class:`RunContext` for a worker process of an executor (this machine's cache directory)."""
    from .models import cache_dir

    return RunContext(run_dir=Path(run_dir), cache_dir=cache_dir(), log=log, load_items=load_items)


def label_direction(solo_label: Any, batch_label: Any, domain: str | None = None) -> str:
    """How a label changed from solo to batch (``refuse_to_comply``, ``correct_to_incorrect``, ... or
    ``unchanged``), in the vocabulary of :mod:`evalhost.analysis`."""
    from .analysis_pairs import direction

    return direction(solo_label, batch_label, domain)


_LAZY = {
    "Executor": ("executor", "Executor"),
    "execute_work": ("run_worker", "execute_work"),
    "BackendStarted": ("run_worker", "BackendStarted"),
    "GroupDone": ("run_worker", "GroupDone"),
    "fleet_evidence": ("group_fleet", "fleet_evidence"),
    "ItemLoader": ("plan", "ItemLoader"),
    "item_from_dict": ("items", "item_from_dict"),
    "ITEM_FIELDS": ("items", "FIELDS"),
    "synchronized_verdict": ("cobatch", "synchronized_verdict"),
    "continuous_verdict": ("cobatch", "continuous_verdict"),
    "prompt_list_verdict": ("cobatch", "prompt_list_verdict"),
    "BACKEND_EXTRA_LIMIT": ("backend_extra", "LIMIT"),
    "register_module": ("testing", "register_module"),
    "run_study_in": ("testing", "run_study_in"),
    "FakeServer": ("testing", "FakeServer"),
    "fake_server_argv": ("testing", "fake_server_argv"),
}


def __getattr__(name: str) -> Any:
    """The executor contract and item helpers load their modules on first use (the run loop is not light)."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'evalhost.api' has no attribute {name!r}")
