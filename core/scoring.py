"""Which scorer scores an output, written once: :func:`scorer_for`; and the run's scorer instances (:class:`Scorers`).

The rule, first match wins:

1. an **override**: ``evalhost rescore RUN_DIR --scorer NAME`` names one scorer for every record;
2. the **task's** ``scorer`` (the study's ``[[tasks]] scorer = "..."``);
3. the **item's own** ``scorer`` (a field of the task file's item; a task source may fill it in for items without
   one, e.g. ``jsonl`` with the task's scorer, ``candidates`` with the discovery row's scorer).

The task's ``scorer_options`` go with the scorer the study picks for an item (2, or 3 when the task names none), also
when an override names that same scorer; an override that names any other scorer gets no options.

Every place that needs the answer asks this module: the driver and ``evalhost rescore`` (:class:`Scorers`), the
plan's checks (:func:`task_scorers`), and the fingerprint's list of plugins in use
(:func:`evalhost.solo_cache.plugins_in_use`). ``tests/test_scorer_precedence.py`` pins each case.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from .registry import Registry
    from .study import TaskSpec
    from .types import Score, TaskItem


def scorer_for(task: "TaskSpec", item: "TaskItem | None" = None,
               override: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """(scorer name, options) that score ``item`` of ``task`` (see the module docstring for the rule); ``item``
    None asks what the task alone decides. The name is None when nothing names a scorer."""
    chosen = task.scorer or (item.scorer if item is not None else None)
    name = override or chosen
    if name is None:
        return None, {}
    return name, dict(task.scorer_options) if name == chosen else {}


def task_scorers(task: "TaskSpec", items: Iterable["TaskItem"]) -> dict[str | None, dict[str, Any]]:
    """``{name: options}`` of every scorer that scores some item of ``task``; the key None means that an item has no
    scorer at all."""
    out: dict[str | None, dict[str, Any]] = {}
    for item in items:
        name, options = scorer_for(task, item)
        out.setdefault(name, options)
    return out


def one_line_error(exc: BaseException) -> str:
    """``"ExcType: message"`` on one line, at most 500 characters (stored in a record's ``scorer_error``)."""
    text = f"{type(exc).__name__}: {exc}".replace("\r", " ").replace("\n", " ")
    return text if len(text) <= 500 else text[:497] + "..."


class Scorers:
    """Scorer instances by (name, options), built on first use. A scorer that raises on one output does not stop the
    run: the record gets ``label = score = None`` and ``scorer_error = "ExcType: message"`` (fix the scorer, then
    ``evalhost rescore RUN_DIR``). ``override`` names one scorer for every item (``evalhost rescore --scorer NAME``).
    ``errors`` counts the outputs a scorer raised on."""

    def __init__(self, registry: "Registry", override: str | None = None) -> None:
        self.registry, self.override, self.errors = registry, override, 0
        self.cache: dict[tuple[str, str], Any] = {}

    def score_item(self, task: "TaskSpec", item: "TaskItem", text: str) -> tuple[str, "Score | None", str | None]:
        """(scorer name, Score or None, error or None) for one output of ``item`` under task spec ``task``."""
        name, options = scorer_for(task, item, self.override)
        if name is None:  # the plan refuses such a task; a rescore of an edited study may still meet one
            from .errors import UserError

            raise UserError(f"task '{task.name}' item '{item.id}' has no scorer; set scorer = \"...\" in the task's "
                            f"[[tasks]] entry (or pass --scorer NAME to evalhost rescore)")
        key = (name, json.dumps(options, sort_keys=True))
        if key not in self.cache:
            self.cache[key] = self.registry.get("scorer", name)(options)
        try:
            return name, self.cache[key].score(item, text), None
        except Exception as exc:  # noqa: BLE001 - any scorer failure is this record's, not the run's
            self.errors += 1
            return name, None, one_line_error(exc)

    def score(self, job: Any, item: "TaskItem", text: str) -> tuple[str, "Score | None", str | None]:
        """:meth:`score_item` for one output of ``job`` (a :class:`evalhost.plan.Job`)."""
        return self.score_item(job.task, item, text)
