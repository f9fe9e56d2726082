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

from evalhost.api import TaskItem, TaskSource, UserError, hookimpl, label_direction, load_items, user_path

REQUIRED = ("task", "task_source", "item_id", "peers", "position", "dispatcher", "batch_size")
MAX_GROUP = 4096  # members of one group (the study's largest batch size)
REGENERATE = "regenerate the file with `evalhost candidates RUN_DIR -o FILE`"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_row(row: Any, where: str) -> None:
    """One UserError sentence (naming ``file:line``) for a row that cannot name a target in a group; a row that
    would silently lose its batch cell (a position outside the group) is refused too."""
    if not isinstance(row, dict):
        raise UserError(f"{where} is a JSON {type(row).__name__ if row is not None else 'null'}, not an object; "
                        f"{REGENERATE}")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise UserError(f"{where} lacks '{missing[0]}'; {REGENERATE}")
    for key in ("task", "task_source", "dispatcher"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise UserError(f"{where}: '{key}' must be a non-empty string; {REGENERATE}")
    if row["task_source"].strip().lower().startswith("candidates:"):
        raise UserError(f"{where}: 'task_source' is itself a candidates file; name the original task set (e.g. "
                        f"\"builtin:benign\"); {REGENERATE}")
    item_id, peers, position = row["item_id"], row["peers"], row["position"]
    if not (isinstance(item_id, str) or _is_int(item_id)) or not str(item_id).strip():
        raise UserError(f"{where}: 'item_id' must be a non-empty string; {REGENERATE}")
    if not isinstance(peers, list) or not all(isinstance(i, str) or _is_int(i) for i in peers):
        raise UserError(f"{where}: 'peers' must be a list of item ids; {REGENERATE}")
    if len(peers) >= MAX_GROUP:
        raise UserError(f"{where}: 'peers' lists {len(peers)} items, more than a group of {MAX_GROUP} holds; "
                        f"{REGENERATE}")
    if not _is_int(position) or not 0 <= position <= len(peers):
        shown = str(position)[:20]
        raise UserError(f"{where}: 'position' is {shown}, not a place in its group of {len(peers) + 1} (0 to "
                        f"{len(peers)}); {REGENERATE}")
    if not _is_int(row["batch_size"]) or not 1 <= row["batch_size"] <= MAX_GROUP:
        raise UserError(f"{where}: 'batch_size' must be an integer from 1 to {MAX_GROUP}; {REGENERATE}")
    for key in ("group_id", "scorer", "solo_label", "batch_label", "direction", "original_direction", "domain",
                "kind", "phase"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise UserError(f"{where}: '{key}' must be a string or null; {REGENERATE}")
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where} holds a lone surrogate escape (e.g. \\ud800), which is not text; "
                        f"{REGENERATE}") from None


class CandidatesSource(TaskSource):
    options_known: tuple[str, ...] = ()  # a study's [[tasks]] options: none

    def load(self, location: str, options: dict[str, Any]) -> list[TaskItem]:
        path = user_path(location, "the candidates file")
        if not path.is_file():
            raise UserError(f"candidates file {path} does not exist; make it with `evalhost candidates RUN_DIR -o FILE`")
        rows = []
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"candidates file {path} is not UTF-8 text; {REGENERATE}") from None
        except OSError as exc:
            raise UserError(f"candidates file {path} cannot be read ({exc.strerror}); check the path") from None
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, a 5000-digit number, nesting thousands deep
                raise UserError(f"{path}:{n} is not JSON; regenerate the file with `evalhost candidates`") from None
            check_row(row, f"{path}:{n}")
            rows.append(row)
        sources: dict[tuple[str, str], dict[str, TaskItem]] = {}
        out = []
        for row in rows:
            key = (row["task"], row["task_source"])
            if key not in sources:
                items = load_items(row["task_source"], path.parent, task=row["task"], scorer=row.get("scorer"))
                sources[key] = {it.id: it for it in items}
            items = sources[key]
            ids = [str(i) for i in row["peers"]]  # item ids are strings (a JSON number is read as its text)
            ids.insert(row["position"], str(row["item_id"]))
            missing = [i for i in ids if i not in items]
            if missing:
                raise UserError(f"candidate {str(row['item_id'])[:60]} names item '{missing[0][:60]}', which task "
                                f"'{row['task'][:60]}' does not have; use the same task files as the original run")
            target = items[str(row["item_id"])]
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
    if row.get("original_direction"):
        return str(row["original_direction"])
    solo, batch = row.get("solo_label"), row.get("batch_label")
    if solo is None and batch is None:
        return row.get("direction")
    d = label_direction(solo, batch) if solo != batch else (row.get("direction") or "unchanged")
    dom = row.get("domain") or domain
    s, b = row.get("solo_score"), row.get("batch_score")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    fell = (b < s) if number(s) and number(b) and s != b else None

    def refusal(label) -> bool:
        return (label_direction(label, "comply") == "refuse_to_comply"
                or label_direction(label, "refuse") == "comply_to_refuse")

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
