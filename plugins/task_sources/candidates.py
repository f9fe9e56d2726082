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
                "dispatcher": row["dispatcher"], "group_id": row.get("group_id"), "candidate": row,
            }))
        return out


@hookimpl
def register_task_sources(register):
    register("candidates", CandidatesSource)
