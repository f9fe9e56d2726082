"""The executor interface: how the driver hands :class:`~evalhost.plan.BackendWork` to workers.

An executor calls :func:`evalhost.api.execute_work` for every work item (in process, or inside a Ray actor, ...)
and passes each event it yields to ``on_event`` *in the driver*; the driver alone writes the run directory.
Executors are plugins (hook ``register_executors``; they import :class:`Executor` from :mod:`evalhost.api`);
``local`` is the default. ``__init__`` checks the options (a :class:`~evalhost.errors.UserError` sentence): the host
builds the executor before the plan, so ``--dry-run`` refuses a bad ``--parallel`` as it does other plugins' options.
"""
from __future__ import annotations

from typing import Any, Callable

from .plan import BackendWork, Plan
from .types import RunContext, Sampling


class Executor:
    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})

    def describe(self, plan: Plan) -> str:
        """A line per work item for ``--dry-run`` (what runs where, with which resources)."""
        return ""

    def run(self, works: list[BackendWork], sampling: Sampling, context: RunContext, skip: set[str],
            on_event: Callable[[Any], None]) -> dict[str, Any]:
        """Run every job not fully in ``skip``; call ``on_event`` in the driver for each event. Returns facts for
        the manifest (executor name, versions, where each work item ran)."""
        raise NotImplementedError
