"""Task sources backed by the ``datasets`` library: ``hf:owner/name[:config]`` and ``hf-disk:DIR``.

``hf:`` loads a hub dataset with ``datasets.load_dataset`` (a location that is an existing local directory is read
with ``load_from_disk`` instead, which is how to use it without network). ``hf-disk:DIR`` reads a directory written
by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``. ``datasets`` is imported only inside ``load``.

Options (the task's table in the study, besides ``task`` / ``domain`` / ``scorer`` from the host):

* ``split`` (default ``"test"``), ``config`` (or ``owner/name:config``), ``revision``;
* ``preset``: ``"mmlu"``, ``"bbq"`` or ``"truthfulqa_mc1"`` fill in ``fields`` (and the rest) for those layouts;
* ``fields``: item field -> column. Item fields: ``id``, ``prompt`` (the question), ``context`` (text put before the
  question), ``choices`` (a column holding a list, a dotted path such as ``"mc1_targets.choices"``, or a list of
  columns such as ``["ans0", "ans1", "ans2"]``), ``answer`` (an index, a letter, the text of a choice, or a list of
  0/1 labels; the first 1 wins), ``targets`` (a column holding the targets dict);
* ``metadata_fields``: columns copied into ``metadata``; ``where``: ``{column: value}`` rows to keep;
* ``limit``: keep the first N items (after ``where``); ``shuffle_choices``: a seed to shuffle option order per item
  (deterministic; TruthfulQA lists the true answer first);
* ``bbq_targets``: derive ``targets`` from BBQ's ``answer_info``, ``additional_metadata.stereotyped_groups`` and
  ``question_polarity`` (for a negative question the stereotyped answer is the stereotyped group, for a non-negative
  one it is the other person; ``unknown`` is the answer whose group is ``unknown``);
* ``prompt_template``: with ``{context}``, ``{question}``, ``{options}``; the default shows the lettered options and
  asks for the letter.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from evalhost.api import TaskItem, TaskSource, UserError, check_keys, hookimpl, item_from_dict, user_path
from .files import check_options

DEFAULT_TEMPLATE = "{context}{question}\n\n{options}\n\nAnswer with the letter of the correct option."

PRESETS: dict[str, dict[str, Any]] = {
    "mmlu": {
        "fields": {"prompt": "question", "choices": "choices", "answer": "answer"},
        "metadata_fields": ["subject"],
    },
    "bbq": {
        "fields": {"context": "context", "prompt": "question", "choices": ["ans0", "ans1", "ans2"], "answer": "label"},
        "bbq_targets": True,
        "metadata_fields": ["category", "context_condition", "question_polarity"],
    },
    "truthfulqa_mc1": {
        "fields": {"prompt": "question", "choices": "mc1_targets.choices", "answer": "mc1_targets.labels"},
        "shuffle_choices": 0,
    },
}

KNOWN_OPTIONS = (
    "task", "domain", "scorer", "split", "config", "revision", "preset", "fields", "metadata_fields", "where",
    "limit", "shuffle_choices", "bbq_targets", "prompt_template", "name", "source",
)
ITEM_FIELDS = ("id", "prompt", "context", "choices", "answer", "targets")


def _check(options: dict[str, Any], where: str) -> dict[str, Any]:
    check_keys(options, KNOWN_OPTIONS, where)  # "WHERE has no option 'x' (did you mean 'y'?); its options are: ..."
    types = {"preset": str, "where": dict, "metadata_fields": list, "prompt_template": str, "split": str,
             "config": str, "revision": str, "bbq_targets": bool, "fields": dict}
    for key, typ in types.items():
        if options.get(key) is not None and not isinstance(options[key], typ):
            kind = {str: "a string", dict: "a table", list: "a list", bool: "true or false"}[typ]
            raise UserError(f"{where}: option '{key}' must be {kind}, not {type(options[key]).__name__}")
    if not all(isinstance(c, str) for c in options.get("metadata_fields") or []):
        raise UserError(f"{where}: 'metadata_fields' must list column names (strings)")
    template = options.get("prompt_template")
    if template is not None:
        import string

        try:
            names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as exc:  # a lone "{" or "}"
            raise UserError(f"{where}: prompt_template cannot be filled ({exc}); write {{{{ and }}}} for braces") from None
        bad = [f for f in names if f not in ("context", "question", "options")]
        if bad:
            raise UserError(f"{where}: prompt_template cannot be filled ('{{{bad[0][:40]}}}'); use only {{context}}, "
                            f"{{question}}, {{options}} (write {{{{ and }}}} for braces)")
    preset = options.get("preset")
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"{where}: unknown preset '{preset}'; use one of: {', '.join(PRESETS)}")
        merged.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[preset].items()})
    for key, value in options.items():
        if key == "fields" and isinstance(value, dict):
            merged.setdefault("fields", {}).update(value)
        else:
            merged[key] = value
    fields = merged.setdefault("fields", {"prompt": "question"})
    if not isinstance(fields, dict):
        raise UserError(f"{where}: 'fields' must be a table mapping item fields to columns, e.g. {{prompt = \"question\"}}")
    bad = [k for k in fields if k not in ITEM_FIELDS]
    if bad:
        raise UserError(f"{where}: 'fields' names '{bad[0]}', which is not an item field; use: {', '.join(ITEM_FIELDS)}")
    if not all(isinstance(c, str) or (isinstance(c, list) and all(isinstance(x, str) for x in c))
               for c in fields.values()):
        raise UserError(f"{where}: 'fields' must map item fields to column names (or a list of them for choices)")
    if "prompt" not in fields:
        raise UserError(f"{where}: 'fields' has no 'prompt' column; add e.g. fields = {{prompt = \"question\"}}")
    limit = merged.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise UserError(f"{where}: 'limit' must be a positive whole number")
    return merged


def _get(row: dict[str, Any], path: str, where: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            columns = ", ".join(sorted(row)) if isinstance(row, dict) else ""
            raise UserError(f"{where}: the dataset has no column '{path}'; fix 'fields' (columns: {columns})")
        value = value[part]
    return value


def _letter(i: int) -> str:
    return chr(ord("A") + i)


def _answer_index(value: Any, choices: list[str] | None, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise UserError(f"{where}: the answer column holds a boolean; map 'answer' to an index, letter or labels column")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        for i, flag in enumerate(value):
            if flag in (1, True, "1"):
                return i
        return None
    text = str(value).strip()
    if len(text) == 1 and text.isascii() and text.isalpha():  # "ß".upper() is two letters: ASCII only
        return ord(text.upper()) - ord("A")
    if text.isascii() and text.isdigit() and len(text) <= 9:  # "²".isdigit() is true, int("²") fails
        return int(text)
    if choices and text in choices:
        return choices.index(text)
    raise UserError(f"{where}: cannot read answer {text[:60]!r} as an index, letter or choice text; fix 'fields.answer'")


def _bbq_targets(row: dict[str, Any], n: int, where: str) -> dict[str, int]:
    info = row.get("answer_info")
    meta = row.get("additional_metadata") or {}
    if not isinstance(info, dict):
        raise UserError(f"{where}: bbq_targets needs the BBQ column 'answer_info'; turn bbq_targets off or fix the data")
    stereotyped = {str(g).lower() for g in (meta.get("stereotyped_groups") or [])}
    groups, texts = [], []
    for i in range(n):
        entry = info.get(f"ans{i}") or []
        groups.append(str(entry[-1]).lower() if entry else "")
        texts.append(" ".join(str(e) for e in entry).lower())
    unknown = [i for i, g in enumerate(groups) if g == "unknown"]
    if len(unknown) != 1:
        raise UserError(f"{where}: cannot find the single 'unknown' answer in answer_info; check the BBQ rows")
    others = [i for i in range(n) if i != unknown[0]]
    in_group = [i for i in others if groups[i] in stereotyped]
    if len(in_group) != 1:  # e.g. group "black" vs stereotyped "african american": match whole words in the texts
        in_group = [
            i for i in others
            if any(s and re.search(r"(?<![a-z])" + re.escape(s) + r"(?![a-z])", texts[i]) for s in stereotyped)
        ]
    if len(in_group) != 1 or len(others) != 2:
        return {"unknown": unknown[0]}  # the group is not identifiable from the metadata: only the unknown target
    target = in_group[0]
    other = next(i for i in others if i != target)
    negative = str(row.get("question_polarity", "neg")).lower().startswith("neg")
    stereo, anti = (target, other) if negative else (other, target)
    return {"stereotyped": stereo, "anti_stereotyped": anti, "unknown": unknown[0]}


def rows_to_items(rows: Any, name: str, options: dict[str, Any]) -> list[TaskItem]:
    """Turn dataset rows (dicts) into validated task items according to ``options``."""
    opts = _check(options, name)
    task, domain, scorer = check_options(opts, name)
    fields = opts["fields"]
    where_filter = opts.get("where") or {}
    template = opts.get("prompt_template", DEFAULT_TEMPLATE)
    seed = opts.get("shuffle_choices")
    items, seen = [], set()
    for index, row in enumerate(rows):
        where = f"{name} row {index}"
        if any(row.get(col) != val for col, val in where_filter.items()):
            continue
        question = str(_get(row, fields["prompt"], where))
        context = str(_get(row, fields["context"], where)).strip() + "\n\n" if "context" in fields else ""
        choice_spec = fields.get("choices")
        choices: list[str] | None = None
        if choice_spec is not None:
            if isinstance(choice_spec, (list, tuple)):
                choices = [str(_get(row, c, where)) for c in choice_spec]
            else:
                raw_choices = _get(row, choice_spec, where)
                if not isinstance(raw_choices, (list, tuple)):
                    raise UserError(f"{where}: column '{choice_spec}' is not a list; map 'choices' to a list column")
                choices = [str(c) for c in raw_choices]
        answer_i = _answer_index(_get(row, fields["answer"], where), choices, where) if "answer" in fields else None
        targets_i = _bbq_targets(row, len(choices or []), where) if opts.get("bbq_targets") else None
        item_id = str(_get(row, fields["id"], where)) if "id" in fields else f"{task}-{index:05d}"
        order = list(range(len(choices or [])))
        if choices and seed is not None:
            random.Random(f"{seed}:{item_id}").shuffle(order)
        raw: dict[str, Any] = {"id": item_id}
        metadata = {col: row.get(col) for col in opts.get("metadata_fields", []) if col in row}
        metadata["source_index"] = index
        if choices:
            new_pos = {old: new for new, old in enumerate(order)}
            lettered = {_letter(new): choices[old] for new, old in enumerate(order)}
            raw["choices"] = lettered
            if answer_i is not None:
                if not 0 <= answer_i < len(choices):
                    raise UserError(f"{where}: the answer index {answer_i} is outside the {len(choices)} choices")
                raw["answer"] = _letter(new_pos[answer_i])
            if targets_i:
                raw["targets"] = {k: _letter(new_pos[v]) for k, v in targets_i.items()}
            options_text = "\n".join(f"{k}. {v}" for k, v in lettered.items())
        else:
            options_text = ""
            if answer_i is not None:
                raw["answer"] = str(_get(row, fields["answer"], where))
        if "targets" in fields:
            raw["targets"] = _get(row, fields["targets"], where)
        try:
            raw["prompt"] = template.format(context=context, question=question, options=options_text).strip()
        except (KeyError, IndexError, AttributeError, ValueError) as exc:  # {x}, {0}, {question.y}, a lone "{"
            raise UserError(f"{name}: prompt_template cannot be filled ({type(exc).__name__}: {str(exc)[:60]}); use "
                            f"only {{context}}, {{question}}, {{options}} (write {{{{ and }}}} for braces)") from None
        raw["metadata"] = metadata
        item = item_from_dict(raw, where, task, domain, scorer)
        if item.id in seen:
            raise UserError(f"{where}: id '{item.id}' repeats; map 'fields.id' to a unique column or leave it out")
        seen.add(item.id)
        items.append(item)
        if opts.get("limit") and len(items) >= opts["limit"]:
            break
    if not items:
        raise UserError(f"{name}: no rows left to use; check 'split' and 'where'")
    return items


def _pick_split(dataset: Any, split: str, name: str) -> Any:
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UserError(f"{name} has no split '{split}'; use split = one of: {', '.join(dataset)}")
        return dataset[split]
    return dataset


def _load_disk(path: Path, split: str, name: str) -> Any:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise UserError("the hf task sources need the 'datasets' package; install it with `pip install datasets`") from None
    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise UserError(f"{name} is not a directory written by save_to_disk ({exc}); save the dataset with "
                        f"Dataset.save_to_disk and point hf-disk: at that directory") from None
    return _pick_split(dataset, split, name)


class HFDiskSource(TaskSource):
    """``hf-disk:DIR``: a dataset saved with ``save_to_disk``."""

    def load(self, location: str, options: dict[str, Any]) -> list[TaskItem]:
        path = user_path(location, "the dataset directory")
        name = f"hf-disk:{location}"
        if not path.is_dir():
            raise UserError(f"the dataset directory {path} does not exist; check source = \"hf-disk:...\"")
        opts = dict(options)
        split = opts.get("split", "test")
        return rows_to_items(_load_disk(path, split, name), name, opts)


class HFSource(TaskSource):
    """``hf:owner/name[:config]`` from the hub (or a local ``save_to_disk`` directory)."""

    def load(self, location: str, options: dict[str, Any]) -> list[TaskItem]:
        name = f"hf:{location}"
        opts = dict(options)
        split = opts.get("split", "test")
        if location and user_path(location, "the dataset").is_dir():
            return rows_to_items(_load_disk(user_path(location, "the dataset"), split, name), name, opts)
        dataset_name, _, config = location.partition(":")
        config = config or opts.get("config")
        if not dataset_name or dataset_name.count("/") != 1:
            raise UserError(f"{name}: write the dataset as \"hf:owner/name\" or \"hf:owner/name:config\"")
        try:
            import datasets
        except ImportError:
            raise UserError("the hf task sources need the 'datasets' package; install it with `pip install datasets`") from None
        try:
            dataset = datasets.load_dataset(dataset_name, config, split=split, revision=opts.get("revision"))
        except Exception as exc:  # network, missing config, missing split: one sentence for the user
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"could not load {name} split '{split}' ({type(exc).__name__}: {first[:200]}); check the name, config "
                f"and split, or save it with save_to_disk where there is network and use source = \"hf-disk:DIR\""
            ) from None
        return rows_to_items(dataset, name, opts)


@hookimpl
def register_task_sources(register):
    register("hf", HFSource)
    register("hf-disk", HFDiskSource)
