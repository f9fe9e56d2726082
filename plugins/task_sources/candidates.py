"""``candidates:PATH``: the flip rows exported by ``evalhost candidates RUN_DIR -o PATH`` (Study A -> Study D).

Each row names a target item, the task source it came from and its dispatch group (the other members' item ids in
order, and the target's position). This source reloads those items from their original task sources and returns
one item per row, whose ``metadata`` carries the reconstructed group (``group_members``, ``position``), the original
``dispatcher`` and the row itself, so the plan runs each candidate solo and in its original group.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from evalhost.errors import UserError, user_path
from evalhost.hookspecs import hookimpl
from evalhost.types import TaskItem, TaskSource

REQUIRED = ("task", "task_source", "item_id", "peers", "position", "dispatcher", "batch_size")


class CandidatesSource(TaskSource):
    def load(self, location: str, options: dict[str, Any]) -> list[TaskItem]:
        from evalhost.plan import load_task
        from evalhost.registry import get_registry
        from evalhost.study import TaskSpec

        path = user_path(location, "the candidates file")
        if not path.is_file():
            raise UserError(f"candidates file {path} does not exist; make it with `evalhost candidates RUN_DIR -o FILE`")
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not JSON; regenerate the file with `evalhost candidates`")
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise UserError(f"{path}:{n} lacks '{missing[0]}'; regenerate the file with `evalhost candidates`")
            rows.append(row)
        sources: dict[tuple[str, str], dict[str, TaskItem]] = {}
        out = []
        for row in rows:
            key = (row["task"], row["task_source"])
            if key not in sources:
                spec = TaskSpec(name=row["task"], source=row["task_source"], scorer=row.get("scorer"))
                sources[key] = {it.id: it for it in load_task(spec, get_registry(), path.parent)}
            items = sources[key]
            ids = list(row["peers"])
            ids.insert(int(row["position"]), row["item_id"])
            missing = [i for i in ids if i not in items]
            if missing:
                raise UserError(f"candidate {row['item_id']} names item '{missing[0]}', which task '{row['task']}' "
                                f"({row['task_source']}) does not have; use the same task files as the original run")
            target = items[row["item_id"]]
            cid = f"{row['item_id']}@{row['dispatcher']}/bs{row['batch_size']}/{row.get('group_id', '')}"
            members = tuple(items[i] for i in ids)
            out.append(replace(target, id=cid, scorer=target.scorer or row.get("scorer"), metadata={
                **target.metadata, "group_members": members, "position": int(row["position"]),
                "dispatcher": row["dispatcher"], "group_id": row.get("group_id"),
                "candidate": {**row, "original_direction": original_direction(row, target.domain)},
            }))
        return out


ORIGINAL_DIRECTIONS = ("refuse_to_comply", "comply_to_refuse", "safety_weakened", "safety_strengthened",
                       "incorrect_to_correct", "correct_to_incorrect")


def original_direction(row: dict[str, Any], domain: str | None = None) -> str | None:
    """A candidate row's discovery direction in the vocabulary of the Study D addendum (section 5.3, 8.8).

    A row that has ``original_direction`` keeps it. Otherwise, from the row's labels (``solo_label`` ->
    ``batch_label``, evalhost's ``direction``), its scores when it has them (``solo_score`` / ``batch_score``;
    every shipped scorer gives the safer or the correct answer the higher score) and its ``domain``:
    refusal labels -> ``refuse_to_comply`` / ``comply_to_refuse`` (a score-only change of a refusal, e.g. a full
    refusal 1.0 -> a partial 0.5, counts as toward compliance); other safety-domain rows (bbq, truthfulqa) ->
    ``safety_weakened`` when the score fell (else, without scores: correct -> incorrect, or a change to the
    ``stereotyped`` answer) and ``safety_strengthened`` the other way; capability rows -> ``correct_to_incorrect``
    / ``incorrect_to_correct`` (by label, else by score). A change none of these describe (e.g. a label turning
    ``unparsed``) keeps evalhost's own direction (``refuse_to_unparsed``); a row without a label change and
    without a score change is ``unchanged``.
    """
    from evalhost.analysis import direction

    if row.get("original_direction"):
        return str(row["original_direction"])
    solo, batch = row.get("solo_label"), row.get("batch_label")
    if solo is None and batch is None:
        return row.get("direction")
    d = direction(solo, batch) if solo != batch else (row.get("direction") or "unchanged")
    dom = row.get("domain") or domain
    s, b = row.get("solo_score"), row.get("batch_score")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    fell = (b < s) if number(s) and number(b) and s != b else None

    def refusal(label) -> bool:
        return direction(label, "comply") == "refuse_to_comply" or direction(label, "refuse") == "comply_to_refuse"

    if d in ("refuse_to_comply", "comply_to_refuse"):
        return d
    if refusal(solo) and refusal(batch) and fell is not None:
        return "refuse_to_comply" if fell else "comply_to_refuse"
    if dom == "safety":
        if fell is not None:
            return "safety_weakened" if fell else "safety_strengthened"
        if d == "correct_to_incorrect" or (batch == "stereotyped" and solo != batch):
            return "safety_weakened"
        if d == "incorrect_to_correct" or (solo == "stereotyped" and solo != batch):
            return "safety_strengthened"
    else:
        if d in ("correct_to_incorrect", "incorrect_to_correct"):
            return d
        if fell is not None:
            return "correct_to_incorrect" if fell else "incorrect_to_correct"
    return d


@hookimpl
def register_task_sources(register):
    register("candidates", CandidatesSource)
