"""``evalhost import --from inspect SOLO.eval BATCH.eval -o RUN_DIR``: two inspect_ai logs (``.eval`` or ``.json``)
of one task paired sample by sample (sample ``id``, and ``epoch`` when a log has several epochs).

Each log is read with inspect_ai's own reader (``inspect_ai.log.read_eval_log``; inspect_ai is the optional extra
``evalhost[inspect]``). From each sample: ``input`` (its JSON is hashed into ``prompt_sha256``; its text goes to
``metadata.prompt``), ``output.completion`` (the text), ``output.stop_reason`` (``max_tokens`` becomes
``finish_reason: length``), ``error`` (an errored sample is a side with an error: not comparable), and the value of
ONE scorer (``--metric NAME``; default the first scorer of the log's first scored sample). The label is the score's
value as inspect names it: ``C`` / ``I`` (and 1 / 0, True / False) become ``correct`` / ``incorrect``, ``P``
``partial``, ``N`` ``noanswer``, any other string or number its text; the score is inspect's own
``value_to_float`` of it. A sample without that score is a side without a label (not comparable).

Model, task, the provider's batch size (``max_connections`` of the log's generate config: the batch size of
inspect's hf provider) and the package versions come from the log's ``eval`` header.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import UserError
from .import_bridge import Side, canonical, check_file, plain_name

WHAT = "an inspect_ai log (.eval or .json, as `inspect eval` writes it)"
_NAMES = {"C": "correct", "I": "incorrect", "P": "partial", "N": "noanswer"}


def _need_inspect() -> None:
    try:
        import inspect_ai  # noqa: F401
    except ImportError:
        raise UserError("inspect_ai is not installed; install the optional extra with "
                        "pip install 'evalhost[inspect]' to import inspect logs") from None


def read_log(path: Path) -> Any:
    _need_inspect()
    check_file(path, WHAT, (".eval", ".json"))
    from inspect_ai.log import read_eval_log

    try:
        log = read_eval_log(str(path))
    except Exception as exc:  # inspect raises zip, JSON and pydantic errors of many kinds
        raise UserError(f"{path.name} is not an inspect log inspect_ai can read ({type(exc).__name__}); pass "
                        f"{WHAT}") from None
    if not log.samples:
        raise UserError(f"{path.name} holds no samples (written without --log-samples, or header only); pass a "
                        f"log with its samples")
    return log


def label_of(value: Any) -> str | None:
    if isinstance(value, bool):
        return "correct" if value else "incorrect"
    if isinstance(value, str):
        return _NAMES.get(value.strip(), value.strip()) or None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return "correct" if value == 1 else "incorrect" if value == 0 else f"{value:g}"
    return None


def _score(value: Any) -> float | None:
    from inspect_ai.scorer import value_to_float

    try:
        x = value_to_float()(value)
    except Exception:  # a dict or list value: inspect gives no single number
        return None
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _prompt_text(inp: Any) -> str:
    if isinstance(inp, str):
        return inp
    parts = []
    for m in inp or []:
        parts.append(f"{getattr(m, 'role', '?')}: {getattr(m, 'text', '')}")
    return "\n".join(parts)


def _prompt(inp: Any) -> str:
    if isinstance(inp, str):
        return inp
    return canonical([m.model_dump(exclude={"id"}) for m in inp or []])


def _scorer(log: Any, path: Path, metric: str | None) -> str:
    names: list[str] = []
    for s in log.samples:
        for k in (s.scores or {}):
            if k not in names:
                names.append(k)
    if metric is not None:
        if metric not in names:
            raise UserError(f"{path.name} has no scorer {metric!r} (it has {', '.join(names) or 'none'}); pass one "
                            f"of those with --metric")
        return metric
    if not names:
        raise UserError(f"{path.name} has no scored sample; pass a log whose task has a scorer")
    return names[0]


def read_samples(path: Path, metric: str | None = None) -> tuple[dict[str, Side], str, Any]:
    """{row id: Side} of one inspect log, the scorer used, and the log (header facts)."""
    log = read_log(path)
    scorer = _scorer(log, path, metric)
    epochs = len({s.epoch for s in log.samples})
    task = plain_name(str(log.eval.task).replace("/", "."))
    out: dict[str, Side] = {}
    for order, s in enumerate(log.samples):
        rid = str(s.id) if epochs == 1 else f"{s.id}:e{s.epoch}"
        where = f"{path.name} sample {s.id} epoch {s.epoch}"
        if rid in out:
            raise UserError(f"{where} appears twice; pass a log as inspect wrote it")
        score = (s.scores or {}).get(scorer)
        value = None if score is None else score.value
        label = label_of(value)
        if score is not None and label is None:
            raise UserError(f"{where}: scorer {scorer!r} gives {type(value).__name__} values, not one label per "
                            f"sample; pass --metric with a scorer whose value is a string, a number or a bool")
        out_ = s.output
        text = out_.completion if out_ is not None else None
        stop = getattr(out_, "stop_reason", None) if out_ is not None else None
        err = None if s.error is None else str(getattr(s.error, "message", s.error))
        if err is None and score is None:
            err = f"no {scorer} score"
        out[rid] = Side(task=task, label=label, score=None if value is None else _score(value), text=text,
                        prompt=_prompt(s.input), prompt_text=_prompt_text(s.input),
                        finish_reason={"max_tokens": "length", "stop": "stop", "model_length": "length"}.get(
                            str(stop), str(stop or "unknown")),
                        error=err, where=where, order=order,
                        meta={"sample_id": s.id, "epoch": s.epoch, "target": s.target,
                              "answer": None if score is None else score.answer})
    return out, scorer, log


def _facts(log: Any, path: Path) -> dict[str, Any]:
    ev = log.eval
    gen = ev.model_generate_config
    facts: dict[str, Any] = {"file": path.name, "model": ev.model, "task": ev.task, "created": ev.created,
                             "run_id": ev.run_id, "status": log.status, "batch_size": _batch_size(log)}
    facts.update({f"packages.{k}": v for k, v in (ev.packages or {}).items()})
    facts.update({f"model_args.{k}": v for k, v in (ev.model_args or {}).items()
                  if isinstance(v, (str, int, float, bool))})
    if gen is not None:
        facts.update({f"generate_config.{k}": v for k, v in gen.model_dump(exclude_none=True).items()
                      if isinstance(v, (str, int, float, bool))})
    if ev.revision is not None:
        facts["revision"] = ev.revision.commit
    return facts


def _batch_size(log: Any) -> int:
    for cfg in (log.eval.model_generate_config, getattr(log.plan, "config", None)):
        n = getattr(cfg, "max_connections", None) if cfg is not None else None
        if isinstance(n, int) and n > 0:
            return n
    bs = (log.eval.model_args or {}).get("batch_size")
    return bs if isinstance(bs, int) and not isinstance(bs, bool) and bs > 0 else 0


def import_inspect(solo_path: Path, batch_path: Path, run_dir: Path, flip_on: str = "label",
                   study: str | None = None, metric: str | None = None) -> dict[str, Any]:
    """Import an inspect solo/batch pair of logs (see the module docstring)."""
    from .import_bridge import write_pair_run

    solo, scorer, ls = read_samples(solo_path, metric)
    batch, _, lb = read_samples(batch_path, scorer)
    ms, mb = str(ls.eval.model), str(lb.eval.model)
    if ms != mb:
        raise UserError(f"{solo_path.name} is model {ms} but {batch_path.name} is model {mb}; a batch study compares "
                        f"one model with itself - pass two runs of the same model")
    provider, _, name = ms.partition("/")
    info = {"source": "inspect", "mode": plain_name(f"inspect-{provider}" if name else "inspect"),
            "model": plain_name(Path(name.rstrip("/")).name if name else ms), "dispatcher": "inspect",
            "batch_size": _batch_size(lb), "scorer": plain_name(f"inspect:{scorer}"),
            "metric_note": f"inspect scorer {scorer} per sample (C/1/True = correct, I/0/False = incorrect)"}
    fingerprint = {"solo": _facts(ls, solo_path), "batch": _facts(lb, batch_path), "metric": scorer}
    return write_pair_run(solo, batch, run_dir, files=(solo_path, batch_path), info=info, fingerprint=fingerprint,
                          flip_on=flip_on, study=study)
