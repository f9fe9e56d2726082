"""``evalhost run STUDY --screen K``: batch-test only the K most fragile items of each task.

1. **Items, written once.** Every task of the study is loaded through its task source (its ``limit`` and
   ``--limit`` applied) and written as a JSONL task file into a new *screen folder*,
   ``OUTPUT_DIR/NAME-screen-TIMESTAMP/tasks/``; the files are read back and must give the same items (else the
   task is refused), so the screening and the screened run render the very same prompts.
2. **Screening run** (``screen.toml`` in that folder, run into it as ``screen-TIMESTAMP/``): the study's models,
   backends and sampling, no dispatcher (solo only, repeat 0 only), ``top_logprobs`` raised to at least 2.
3. **Selection** (``selection.json``): per item its fragility (:func:`evalhost.analysis_screen.fragility`: the
   smallest top-1/top-2 margin over its solo output; the smallest over the study's models and backends); per task
   the K items of smallest fragility, ties by the task's order, items without a score first (unknown fragility is
   tested, not skipped); all of them when a task has K or fewer.
4. **The screened run** (``study.toml`` in the folder, tasks from ``selected/``): the given study unchanged except
   for its tasks and ``top_logprobs`` (set to the screening's), run into the study's own ``output_dir`` by the
   ordinary runner (:func:`evalhost.runner.run_file`).  Its manifest gets ``screen`` (K, the folder, the screening
   run, the items chosen, the solo cache hits) and its report says it was screened.

**The solo cache.** Its key (:class:`evalhost.solo_cache.SoloCache`) is the solo stack, the prompt text and the
whole :class:`~evalhost.types.Sampling`, ``top_logprobs`` included.  So the screened run asks for the screening's
``top_logprobs``: its solos then have the screening's key and are served from the cache (no solo is generated twice;
the manifest counts the hits), at the cost of top-k logprobs in its records (k entries per output token; the margins
section of its report uses them).  Had it kept ``top_logprobs = 0``, every selected item would be generated solo
again: K solo generations per task and backend configuration.  With the cache off (``--no-solo-cache``) they are
generated again anyway.

``--screen`` with ``--resume`` or ``--dry-run`` is refused (a screened run is resumed with the derived study:
``evalhost run SCREEN_FOLDER/study.toml --resume RUN_DIR``, as the runner's message says).
"""
from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import RunError, UserError
from .rundir import MANIFEST, RunDir

MIN_TOP = 2  # a margin needs the top two
_PATH_SCHEMES = ("jsonl", "csv", "candidates", "hf-disk")


# -- TOML out (tomllib only reads) ------------------------------------------------------------------------------
def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _string(k)


def _string(s: str) -> str:
    # JSON's escapes (\" \\ \n \t \uXXXX for other controls) are TOML's; DEL must be escaped too
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + "}"
    raise RunError(f"cannot write a {type(v).__name__} into the derived study TOML")


def toml_dumps(data: Mapping[str, Any]) -> str:
    """A study dict as TOML: tables as ``[name]``, lists of tables as ``[[name]]``, nested values inline."""
    lines: list[str] = []
    for name, value in data.items():
        blocks = [value] if isinstance(value, Mapping) else value
        for block in blocks:
            lines.append(f"[{_key(name)}]" if isinstance(value, Mapping) else f"[[{_key(name)}]]")
            lines += [f"{_key(str(k))} = {_value(v)}" for k, v in block.items()]
            lines.append("")
    return "\n".join(lines)


# -- inputs -----------------------------------------------------------------------------------------------------
def check_request(k: Any, resume: Any = None, dry_run: bool = False) -> int:
    """``--screen K``'s value and the options it cannot go with, each refused in one sentence."""
    if resume is not None:
        raise UserError("--screen starts a new screened run and cannot resume one; resume a screened run with its "
                        "derived study: evalhost run SCREEN_FOLDER/study.toml --resume RUN_DIR")
    if dry_run:
        raise UserError("--screen runs a solo screening pass before it can plan the screened run; drop --dry-run "
                        "(or dry-run the study without --screen)")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UserError(f"--screen {k} is not a number of items per task; give a positive integer, e.g. --screen 20")
    return k


def _absolute(value: Any, base: Path) -> Any:
    """``value`` with every string that names a file relative to the study's folder (``jsonl:x.jsonl``,
    ``csv:x.csv``, ``x.jsonl``...) made absolute, so the derived studies (in another folder) read the same files.
    A path that exists from the working directory is left alone, as the runner reads it from there first."""
    if isinstance(value, Mapping):
        return {k: _absolute(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if not isinstance(value, str):
        return value
    scheme, sep, loc = value.partition(":")
    if not (sep and scheme in _PATH_SCHEMES):
        scheme, loc = "", value
        if not value.lower().endswith((".jsonl", ".csv", ".json")) and not value.startswith("."):
            return value
    p = Path(loc)
    if p.is_absolute() or p.exists() or not (base / p).exists():
        return value
    return (f"{scheme}:" if scheme else "") + str((base / p).resolve())


def item_dict(item: Any) -> dict[str, Any]:
    """A :class:`~evalhost.types.TaskItem` as one JSONL task line (the fields of ``evalhost.items.FIELDS``)."""
    out: dict[str, Any] = {"id": item.id}
    if item.prompt is not None:
        out["prompt"] = item.prompt
    if item.messages is not None:
        out["messages"] = [dict(m) for m in item.messages]
    out["domain"] = item.domain
    for f in ("choices", "answer", "targets", "scorer"):
        if getattr(item, f) is not None:
            out[f] = getattr(item, f)
    if item.metadata:
        out["metadata"] = item.metadata
    return out


def _task_file(rd: Any, sub: str, i: int, task: Any, items: list, registry: Any) -> str:
    """Write ``items`` as ``sub/NN.jsonl`` in the screen folder, read them back (they must be the same items) and
    return the ``jsonl:`` source."""
    from .plan import load_task
    from .study import TaskSpec

    try:
        text = "".join(json.dumps(item_dict(it), ensure_ascii=False, allow_nan=False) + "\n" for it in items)
    except (TypeError, ValueError):
        raise UserError(f"task '{task.name}' has items whose metadata is not plain JSON; --screen writes items as "
                        f"JSONL, so run this task without --screen") from None
    rd.subdir(sub)
    path = rd.write_atomic(f"{i:02d}.jsonl", text, subdir=sub)
    source = f"jsonl:{path}"
    back = load_task(TaskSpec(task.name, source, domain=task.domain, scorer=task.scorer), registry)
    if back != items:
        bad = next((a.id for a, b in zip(items, back) if a != b), items[0].id)
        raise UserError(f"task '{task.name}' item '{bad}' does not read back the same from JSONL; --screen cannot "
                        f"restrict this task, run it without --screen")
    return source


def _folder(output_dir: Path, name: str) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = output_dir / (f"{name}-screen-{stamp}" + (f"-{n}" if n else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a screen folder under {output_dir}")


def _task_entry(t: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A ``[[tasks]]`` entry reading ``source``: the task's name, domain, scorer and scorer options kept; ``limit``
    (already applied) and the task source's ``options`` (already used to load the items) dropped."""
    return {**{k: v for k, v in t.items() if k in ("name", "domain", "scorer", "scorer_options")}, "source": source}


# -- the screen -------------------------------------------------------------------------------------------------
def fragility_by_item(run_dir: Path) -> tuple[dict[tuple[str, str], float | None], int]:
    """(task, item id) -> the smallest fragility over the screening run's solo records of repeat 0 (None when none
    has a score), and how many records carried top-k logprobs."""
    from .analysis_screen import fragility
    from .records import find_records, iter_records

    scores: dict[tuple[str, str], float | None] = {}
    with_top = 0
    for r in iter_records(find_records(run_dir), checked=True):
        if r.get("condition") != "solo" or r.get("repeat", 0) != 0:
            continue
        with_top += isinstance(r.get("top_logprobs"), list)
        key = (str(r.get("task")), str(r.get("item_id")))
        f = fragility(r)
        old = scores.get(key)
        scores[key] = f if old is None else (old if f is None else min(old, f))
    return scores, with_top


def select(items: list, scores: Mapping[tuple[str, str], float | None], task: str, k: int) -> list:
    """The ``k`` most fragile of ``items`` (smallest score; no score first; ties in the task's order)."""
    order = sorted(range(len(items)), key=lambda i: (scores.get((task, str(items[i].id))) is not None,
                                                      scores.get((task, str(items[i].id))) or 0.0, i))
    keep = set(order[:k])
    return [it for i, it in enumerate(items) if i in keep]


def _cache_hits(run_dir: Path) -> tuple[int, int]:
    from .records import find_records, iter_records

    hits = solos = 0
    for r in iter_records(find_records(run_dir)):
        if r.get("condition") == "solo" and r.get("repeat", 0) == 0:
            solos += 1
            ev = r.get("dispatch_evidence")
            hits += isinstance(ev, Mapping) and ev.get("solo_cache") == "hit"
    return hits, solos


def mark_manifest(run_dir: Path, info: Mapping[str, Any]) -> None:
    """Add ``screen`` to the run's manifest under the run directory's lock (a resume keeps it)."""

    rd = RunDir(run_dir)
    with rd.lock(purpose="screen"):
        manifest = rd.read_json(MANIFEST, default={})
        if isinstance(manifest, dict):
            manifest["screen"] = dict(info)
            rd.write_json(MANIFEST, manifest)


def run_screened(study_path: Path, k: Any, *, resume: Any = None, dry_run: bool = False, limit: int | None = None,
                 executor: str = "local", executor_options: Mapping[str, Any] | None = None, progress: bool = True,
                 report: bool = True, out: Callable[[str], None] = print) -> Path:
    """The screening run, the selection and the screened run (module docstring); returns the screened run's
    directory."""
    import tomllib

    from .plan import load_task
    from .registry import get_registry
    from .rundir import RunDir
    from .runner import run_file
    from .study import load_study

    k = check_request(k, resume, dry_run)
    study = load_study(study_path)
    registry = get_registry()
    base = Path(study_path).resolve().parent
    data = tomllib.loads(study.text)
    given_top = study.sampling.top_logprobs
    top = max(given_top, MIN_TOP)
    tasks = {}
    for spec in study.tasks:
        items = load_task(spec, registry, base)
        items = items[:limit] if limit else items
        if any(it.metadata.get("group_members") for it in items):
            raise UserError(f"task '{spec.name}' reruns fixed groups (a candidates file); --screen picks items of "
                            f"ordinary tasks, so run this study without --screen")
        tasks[spec.name] = items

    folder = _folder(study.output_dir, study.name)
    rd = RunDir(folder)
    all_sources = {t.name: _task_file(rd, "tasks", i, t, tasks[t.name], registry) for i, t in enumerate(study.tasks)}
    common = {"models": [{**m, "path": _absolute(m["path"], base)} for m in data["models"]],
              "backends": _absolute(data["backends"], base)}
    screen = {"study": {**{k2: v for k2, v in data["study"].items() if k2 in ("seed", "flip_on")},
                        "name": "screen", "output_dir": str(folder), "repeats": 1, "solo_repeats": 1,
                        "description": f"solo screening pass of study {study.name} for --screen {k}"},
              "sampling": {**data.get("sampling", {}), "top_logprobs": top}, **common,
              "tasks": [_task_entry(t, all_sources[t["name"]]) for t in data["tasks"]]}
    rd.write_atomic("screen.toml", "# written by evalhost run --screen: the solo screening pass\n" + toml_dumps(screen))
    n_items = sum(len(v) for v in tasks.values())
    out(f"screen: solo pass over {n_items} items of {len(tasks)} task(s) with top_logprobs = {top}, in {folder}")
    screen_run = run_file(folder / "screen.toml", executor=executor, executor_options=dict(executor_options or {}),
                          progress=progress, report=False, out=out)

    scores, with_top = fragility_by_item(screen_run)
    if not with_top:
        raise UserError(f"the screening run {screen_run} recorded no top-k logprobs (its backends do not return "
                        f"them); --screen needs a backend that does (hf, vllm, openai)")
    picked = {t.name: select(tasks[t.name], scores, t.name, k) for t in study.tasks}
    selection = {"k": k, "screen_run_dir": str(screen_run), "top_logprobs": top, "score": "min top-1/top-2 margin",
                 "tasks": {name: [{"id": it.id, "fragility": scores.get((name, str(it.id))),
                                   "selected": it in picked[name]} for it in tasks[name]] for name in tasks}}
    rd.write_json("selection.json", selection)
    sel_sources = {t.name: _task_file(rd, "selected", i, t, picked[t.name], registry)
                   for i, t in enumerate(study.tasks)}
    note = f" (screened: the {k} most fragile items per task, by the solo screening run {screen_run})"
    derived = {**{name: v for name, v in data.items() if name not in ("models", "backends", "tasks", "sampling")},
               "study": {**data["study"], "output_dir": str(study.output_dir),
                         "description": (data["study"].get("description", "") + note).strip()},
               "sampling": {**data.get("sampling", {}), "top_logprobs": top}, **common,
               "tasks": [_task_entry(t, sel_sources[t["name"]]) for t in data["tasks"]]}
    if "dispatchers" in derived:
        derived["dispatchers"] = _absolute(derived["dispatchers"], base)
    rd.write_atomic("study.toml", f"# written by evalhost run --screen {k} from {study.path}\n" + toml_dumps(derived))
    out("screen: picked " + ", ".join(f"{n} {len(picked[n])} of {len(tasks[n])}" for n in tasks)
        + f" items (selection.json in {folder})")

    info: dict[str, Any] = {"k": k, "screen_dir": str(folder), "screen_run_dir": str(screen_run),
                            "top_logprobs": top, "top_logprobs_given": given_top,
                            "items": {n: len(tasks[n]) for n in tasks},
                            "selected": {n: [it.id for it in picked[n]] for n in tasks}}
    seen: list[str] = []

    def echo(line: str) -> None:
        if line.startswith("run directory: "):
            seen.append(line[len("run directory: "):].split("  (")[0])
        out(line)

    run_dir = None
    try:
        run_dir = run_file(folder / "study.toml", executor=executor, executor_options=dict(executor_options or {}),
                           progress=progress, report=False, out=echo)
    finally:
        where = run_dir or (Path(seen[0]) if seen else None)
        if where is not None and RunDir(where).exists(MANIFEST):
            hits, solos = _cache_hits(where)
            info["solo_cache"] = f"{hits} of {solos} solo generations served from the solo cache"
            mark_manifest(where, info)
    if report:
        from .report import write_report

        out(f"report: {write_report(run_dir)}")
    return run_dir
