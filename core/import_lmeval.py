"""``evalhost import --from lm-eval SOLO.jsonl BATCH.jsonl -o RUN_DIR``: two lm-evaluation-harness ``--log_samples``
outputs of one task (``samples_<task>_<date>.jsonl``, e.g. the same task at ``--batch_size 1`` and
``--batch_size 8``) paired document by document.

What is read from each line (lm-eval 0.4's sample log, ``lm_eval/evaluator.py`` and
``lm_eval/loggers/evaluation_tracker.py``): ``doc_id``, ``filter`` (the filter pipeline; a task with several filters,
such as gsm8k's ``strict-match`` and ``flexible-extract``, has one line per document and filter: each filter becomes
its own task ``TASK:FILTER``), ``arguments`` (the request: its SHA-256 is the records' ``prompt_sha256``, its first
prompt text goes to ``metadata.prompt``), ``resps`` / ``filtered_resps`` (the output: the first filtered response of
a ``generate_until`` task, or the JSON of the filtered responses otherwise, e.g. log-likelihoods), ``metrics``
(the names of the per-sample metrics) and the metric's value.

The label is the value of ONE per-sample metric (``--metric``; default the line's first in ``metrics``): a 0/1
metric (acc, exact_match) gives ``correct`` / ``incorrect``, any other number ``NAME=VALUE``; the score is the value.
The task name comes from the file name; the model, lm-eval's model type, batch size and library versions come
from the ``results_<date>.json`` lm-eval writes beside the samples file, when it is there (else: unknown, batch
size 0).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .errors import UserError
from .import_bridge import Side, binary_label, canonical, check_file, plain_name

_SAMPLES = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T[\d\-.:]+)\.jsonl$")
_RESERVED = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash",
             "prompt_hash", "target_hash"}
WHAT = "an lm-eval --log_samples file (samples_<task>_<date>.jsonl)"


def task_of(path: Path) -> tuple[str, str | None]:
    """(task, date id) from an lm-eval samples file name; the stem when the name has another form."""
    m = _SAMPLES.match(path.name)
    return (m["task"], m["date"]) if m else (path.stem, None)


def results_of(path: Path) -> dict[str, Any]:
    """The ``results_<date>.json`` lm-eval wrote beside a samples file (empty when absent or unreadable)."""
    _, date = task_of(path)
    if date is None:
        return {}
    res = path.parent / f"results_{date}.json"
    if not res.is_file() or res.stat().st_size > 64 * 2**20:
        return {}
    try:
        data = json.loads(res.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _metric(obj: dict[str, Any], where: str, metric: str | None) -> str:
    names = obj.get("metrics")
    if metric is not None:
        if metric not in obj:
            have = [k for k in obj if k not in _RESERVED]
            raise UserError(f"{where} has no metric {metric!r} (it has {', '.join(have) or 'none'}); pass one of "
                            f"those with --metric")
        return metric
    if isinstance(names, list) and names and isinstance(names[0], str) and names[0] in obj:
        return names[0]
    numeric = [k for k, v in obj.items() if k not in _RESERVED and isinstance(v, (int, float))]
    if len(numeric) == 1:
        return numeric[0]
    raise UserError(f"{where} does not say which per-sample metric to use; pass --metric NAME (e.g. exact_match "
                    f"or acc)")


def _text(obj: dict[str, Any]) -> str:
    filt = obj.get("filtered_resps")
    if isinstance(filt, list) and len(filt) == 1 and isinstance(filt[0], str):
        return filt[0]
    resps = obj.get("resps")
    if filt is None and isinstance(resps, list) and resps and isinstance(resps[0], list) and resps[0] \
            and isinstance(resps[0][0], str):
        return resps[0][0]
    return canonical(filt if filt is not None else resps)


def _prompt_text(args: Any) -> str | None:
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": prompt, "arg_1": ...}}
        first = args.get("gen_args_0")
        if isinstance(first, dict) and isinstance(first.get("arg_0"), str):
            return first["arg_0"]
    if isinstance(args, list) and args and isinstance(args[0], list) and args[0] and isinstance(args[0][0], str):
        return args[0][0]  # an older log: [[prompt, gen_kwargs], ...]
    return None


def read_samples(path: Path, metric: str | None = None) -> tuple[dict[str, Side], str]:
    """{row id: Side} of one samples file and the metric used; one sentence (UserError) for a bad line."""
    check_file(path, WHAT, (".jsonl",))
    task, _ = task_of(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path.name} is not UTF-8 text; pass {WHAT}") from None
    lines: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise UserError(f"{path.name}:{n} is not valid JSON; pass {WHAT} as lm-eval wrote it") from None
        if not isinstance(obj, dict) or "doc_id" not in obj:
            raise UserError(f"{path.name}:{n} has no doc_id; pass {WHAT} (written by lm-eval --log_samples)")
        lines.append((n, obj))
    if not lines:
        raise UserError(f"{path.name} holds no samples; pass {WHAT}")
    filters = sorted({str(o.get("filter", "none")) for _, o in lines})
    metric = _metric(lines[0][1], f"{path.name}:{lines[0][0]}", metric)
    out: dict[str, Side] = {}
    for order, (n, obj) in enumerate(lines):
        where = f"{path.name}:{n}"
        doc = obj["doc_id"]
        if isinstance(doc, bool) or not isinstance(doc, (int, str)) or not str(doc).strip():
            raise UserError(f"{where}: doc_id is {json.dumps(doc)[:40]}; lm-eval writes a whole number there")
        filt = str(obj.get("filter", "none"))
        rid = str(doc) if len(filters) == 1 else f"{doc}:{filt}"
        if rid in out:
            raise UserError(f"{where} repeats doc_id {doc} (filter {filt}, first at {out[rid].where}); pass one "
                            f"run's samples file, not several appended together")
        if metric not in obj:
            raise UserError(f"{where} has no value for metric {metric!r}; pass --metric with a metric every line has")
        value = obj[metric]
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{where}: metric {metric!r} is {json.dumps(value, default=str)[:40]}, not a number per "
                            f"sample; pass --metric with a per-sample number (e.g. exact_match or acc)")
        label = binary_label(value) or f"{metric}={value:g}"
        args = obj.get("arguments")
        out[rid] = Side(task=plain_name(task if len(filters) == 1 else f"{task}:{filt}"), label=label,
                        score=float(value), text=_text(obj), prompt=canonical(args), prompt_text=_prompt_text(args),
                        where=where, order=order,
                        meta={"doc_id": doc, "filter": filt, "target": obj.get("target"), metric: value,
                              "doc_hash": obj.get("doc_hash"), "prompt_hash": obj.get("prompt_hash")})
    return out, metric


def _facts(results: dict[str, Any]) -> dict[str, Any]:
    cfg = results.get("config") if isinstance(results.get("config"), dict) else {}
    keep = ("lm_eval_version", "transformers_version", "model_name", "model_source", "git_hash", "date",
            "upper_git_hash", "chat_template_sha", "system_instruction_sha", "fewshot_as_multiturn")
    facts = {k: results[k] for k in keep if isinstance(results.get(k), (str, int, float, bool))}
    for k, v in cfg.items():
        if k in ("model", "model_args", "model_dtype", "batch_size", "device", "random_seed", "numpy_seed",
                 "torch_seed", "fewshot_seed", "limit", "gen_kwargs"):
            if isinstance(v, dict):  # lm-eval 0.4.9+ logs model_args as a dict
                facts.update({f"config.{k}.{a}": b for a, b in v.items() if isinstance(b, (str, int, float, bool))})
            elif isinstance(v, (str, int, float, bool)):
                facts[f"config.{k}"] = v
    return facts


def _batch_size(results: dict[str, Any]) -> int:
    cfg = results.get("config") if isinstance(results.get("config"), dict) else {}
    bs = cfg.get("batch_size")
    if isinstance(bs, int) and not isinstance(bs, bool) and bs > 0:
        return bs
    return int(bs) if isinstance(bs, str) and bs.strip().isdigit() else 0


def _model(results: dict[str, Any]) -> str | None:
    name = results.get("model_name")
    if not isinstance(name, str) or not name.strip():
        cfg = results.get("config") if isinstance(results.get("config"), dict) else {}
        args = cfg.get("model_args")
        if isinstance(args, dict):
            name = args.get("pretrained") if isinstance(args.get("pretrained"), str) else None
        else:
            m = re.search(r"pretrained=([^,]+)", args) if isinstance(args, str) else None
            name = m.group(1) if m else None
    return plain_name(Path(name.rstrip("/")).name) if name else None


def import_lmeval(solo_path: Path, batch_path: Path, run_dir: Path, flip_on: str = "label",
                  study: str | None = None, metric: str | None = None) -> dict[str, Any]:
    """Import an lm-eval solo/batch pair of samples files (see the module docstring)."""
    from .import_bridge import write_pair_run

    solo, metric = read_samples(solo_path, metric)
    batch, _ = read_samples(batch_path, metric)
    rs, rb = results_of(solo_path), results_of(batch_path)
    ms, mb = _model(rs), _model(rb)
    if ms and mb and ms != mb:
        raise UserError(f"{solo_path.name} is model {ms} but {batch_path.name} is model {mb}; a batch study "
                        f"compares one model with itself - pass two runs of the same model")
    cfg = rs.get("config") if isinstance(rs.get("config"), dict) else {}
    kind = cfg.get("model") if isinstance(cfg.get("model"), str) else None
    binary = all(s.label in ("correct", "incorrect") for s in [*solo.values(), *batch.values()])
    note = (f"lm-eval per-sample {metric} (1 = correct, 0 = incorrect)" if binary
            else f"lm-eval per-sample {metric} (label {metric}=VALUE)")
    info = {"source": "lm-eval", "mode": plain_name(f"lm-eval-{kind}" if kind else "lm-eval"),
            "model": ms or mb or "unknown", "dispatcher": "lm-eval", "batch_size": _batch_size(rb),
            "scorer": plain_name(f"lm-eval:{metric}"), "metric_note": note}
    fingerprint = {"solo": {"file": solo_path.name, "batch_size": _batch_size(rs), **_facts(rs)},
                   "batch": {"file": batch_path.name, "batch_size": _batch_size(rb), **_facts(rb)},
                   "metric": metric}
    return write_pair_run(solo, batch, run_dir, files=(solo_path, batch_path), info=info, fingerprint=fingerprint,
                          flip_on=flip_on, study=study)
