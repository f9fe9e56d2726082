"""``evalhost export --format inspect RUN_DIR -o FILE.eval``: a run directory as an inspect_ai evaluation log.

The log is built with inspect_ai's own types (``EvalLog``, ``EvalSpec``, ``EvalSample``, ``ModelOutput``,
``Score``) and written with its ``write_eval_log``, so ``inspect_ai.log.read_eval_log`` loads it and ``inspect view``
browses it. inspect_ai is an optional extra (``pip install 'evalhost[inspect]'``), imported only here.

One sample per solo/batch pair of :func:`evalhost.analysis.pair` (comparable or not; the pair's
``not_comparable`` reason says why not), in record order:

* ``id``: the batch record's key (``cell#item#rN``) with every run of characters other than letters, digits and
  ``_ . + = -`` replaced by ``_`` (a '/' or '#' in an id breaks inspect's sample file names and viewer URLs; a
  suffix keeps ids unique; ``metadata.key`` is the key itself), ``epoch`` 1;
* ``input``: the prompt when the records carry it (``metadata.prompt``, as the lm-eval and inspect bridges store
  it), else a line naming the task and item (evalhost records keep only the prompt's SHA-256);
* ``messages``: the input, then the solo output and the batch output as two assistant messages (each message's
  metadata names its condition); ``output``: the batch output;
* ``scores``: ``flip`` (1 when the pair is a flip under the run's ``flip_on``, answer ``"SOLO -> BATCH"`` labels,
  explanation the direction or the reason it is not comparable), ``text_change`` (1 when the output texts differ),
  ``solo`` and ``batch`` (the side's score, or its label when it has no numeric score);
* ``metadata``: the pair (labels, scores, flip kind, direction, batch size, dispatcher, group, position, peers,
  ...), both texts, and the batch side's stack fingerprint (its id and scalar facts).

The log's ``eval.metadata`` holds the manifest essentials (study, run id, status, flip_on, host, every stack
fingerprint, the import source when imported) and ``results`` the flip and text-change rates with their Wilson 95%
CIs from :func:`evalhost.analysis.rates`. The file is written next to its target and renamed into place, so an
existing ``-o`` file is replaced only with ``--force`` and a failed export leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError

FORMATS = ("inspect",)
SUFFIXES = (".eval", ".json")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+=-]+")
_PAIR_FIELDS = ("key", "solo_key", "cell", "model", "backend", "backend_plugin", "task", "item_id", "domain",
                "dispatcher", "batch_size", "repeat", "group_id", "position", "peers", "solo_label", "batch_label",
                "solo_score", "batch_score", "label_flip", "score_flip", "flip", "flip_kind", "flip_on",
                "text_change", "truncated", "first_divergent_token", "direction", "comparable", "not_comparable",
                "cobatch", "scorer", "scorer_error", "phase", "arm")
_MANIFEST_FIELDS = ("study", "study_file", "status", "flip_on", "created", "finished", "host", "imported", "plan",
                    "limit", "fingerprints", "backend_fingerprints")


def _need_inspect() -> None:
    try:
        import inspect_ai  # noqa: F401
    except ImportError:
        raise UserError("inspect_ai is not installed; install the optional extra with "
                        "pip install 'evalhost[inspect]' to write inspect logs") from None


def _check_output(output: Path, force: bool) -> str:
    suffix = output.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{output.name} does not end in .eval or .json; name the inspect log FILE.eval (inspect's "
                        f"compressed log) or FILE.json")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"the folder of {str(output)[:120]!r} does not exist; create it first or write the log "
                        f"elsewhere")
    if output.is_symlink() or (output.exists() and not output.is_file()):
        raise UserError(f"{output} is not a regular file; choose another file name for the inspect log")
    if output.exists() and not force:
        raise UserError(f"{output} exists; choose another file name or pass --force to replace it")
    return suffix[1:]


def _scalars(d: Any) -> dict[str, Any]:
    """The top-level str/number/bool entries of a fingerprint dict (versions, device, plugin names, ...)."""
    if not isinstance(d, Mapping):
        return {}
    return {str(k): v for k, v in d.items() if isinstance(v, (str, int, float, bool)) or v is None}


def _iso(ts: Any) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(ts), tz=_dt.timezone.utc).isoformat()
    except (TypeError, ValueError, OverflowError, OSError):
        return _dt.datetime.now(tz=_dt.timezone.utc).isoformat()


def _sample_id(key: Any, seen: set[str]) -> str:
    """The batch key as a sample id that is safe in inspect's zip member names and `inspect view`'s URLs ('/' and
    '#' are not), unique in the log (the key itself stays in the sample's metadata)."""
    sid = _UNSAFE.sub("_", str(key)).strip("_")[:200] or "pair"
    base, n = sid, 1
    while sid in seen:
        n += 1
        sid = f"{base}_{n}"
    seen.add(sid)
    return sid


def _text(rec: Mapping[str, Any] | None) -> str:
    t = (rec or {}).get("output_text")
    return t if isinstance(t, str) else ""


def _side_score(label: Any, score: Any) -> Any:
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        return score
    return "" if label is None else str(label)


def _input(solo: Mapping[str, Any] | None, batch: Mapping[str, Any], p: Mapping[str, Any]) -> str:
    for rec in (solo, batch):
        meta = (rec or {}).get("metadata")
        if isinstance(meta, Mapping) and isinstance(meta.get("prompt"), str) and meta["prompt"]:
            return meta["prompt"]
    return f"(prompt not stored in evalhost records) task {p.get('task')}, item {p.get('item_id')}"


def build_log(run_dir: str | Path) -> Any:
    """The inspect_ai ``EvalLog`` of a run directory (see the module docstring)."""
    _need_inspect()
    from inspect_ai.log import (EvalConfig, EvalDataset, EvalLog, EvalMetric, EvalResults, EvalSample, EvalScore,
                                EvalSpec)
    from inspect_ai.model import ChatMessageAssistant, ChatMessageUser, ModelOutput
    from inspect_ai.scorer import Score

    from . import __version__
    from .analysis import pair, rates
    from .records import find_records, read_records
    from .rundir import RunDir

    rd = RunDir(run_dir).require()
    manifest = rd.read_json(default={}) or {}
    records = read_records(find_records(rd.path), checked=True)
    flip_on = manifest.get("flip_on") if manifest.get("flip_on") in ("label", "score") else "label"
    by_key = {r.get("key"): r for r in records}
    pairs = pair(records, flip_on)
    if not pairs:
        raise UserError(f"{rd.path} holds no solo/batch pair to export; export a run with batch records and their "
                        f"solo baselines")
    fps = manifest.get("fingerprints") if isinstance(manifest.get("fingerprints"), Mapping) else {}
    samples = []
    ids: set[str] = set()
    for p in pairs:
        batch, solo = by_key.get(p["key"], {}), by_key.get(p["solo_key"])
        fid = batch.get("fingerprint_id")
        sl, bl = p["solo_label"], p["batch_label"]
        why = p["not_comparable"] and f"not comparable: {p['not_comparable']}"
        flip_note = why or (f"{p['direction']} ({p['flip_kind']})" if p["flip"] else "no flip")
        model = str(p.get("model") or "unknown")
        meta = {f: p.get(f) for f in _PAIR_FIELDS}
        meta.update(solo_text=(solo or {}).get("output_text"), batch_text=batch.get("output_text"),
                    solo_finish_reason=(solo or {}).get("finish_reason"),
                    batch_finish_reason=batch.get("finish_reason"),
                    fingerprint_id=fid, stack=_scalars(fps.get(fid)))
        prompt = _input(solo, batch, p)
        samples.append(EvalSample(
            id=_sample_id(p["key"], ids), epoch=1, input=prompt, target="",
            messages=[ChatMessageUser(content=prompt),
                      ChatMessageAssistant(content=_text(solo), metadata={"condition": "solo"}),
                      ChatMessageAssistant(content=_text(batch), metadata={"condition": "batch"})],
            output=ModelOutput.from_content(model=model, content=_text(batch),
                                            stop_reason="max_tokens" if batch.get("finish_reason") == "length"
                                            else "stop"),
            scores={
                "flip": Score(value=int(bool(p["flip"])), answer=f"{sl} -> {bl}", explanation=flip_note),
                "text_change": Score(value=int(bool(p["text_change"])),
                                     explanation=("first divergent token "
                                                  f"{p['first_divergent_token']}") if p["text_change"] else "same"),
                "solo": Score(value=_side_score(sl, p["solo_score"]), answer=None if sl is None else str(sl)),
                "batch": Score(value=_side_score(bl, p["batch_score"]), answer=None if bl is None else str(bl)),
            },
            metadata=meta))
    r = rates(pairs)

    def metric(name: str, row: Mapping[str, Any]) -> dict[str, Any]:
        return {f"{name}_rate": EvalMetric(name=f"{name}_rate", value=row["rate"]),
                f"{name}_ci_lo": EvalMetric(name=f"{name}_ci_lo", value=row["lo"]),
                f"{name}_ci_hi": EvalMetric(name=f"{name}_ci_hi", value=row["hi"])}

    n_comp = r["pairs"]
    results = EvalResults(total_samples=len(samples), completed_samples=len(samples), scores=[
        EvalScore(name="flip", scorer="flip", scored_samples=n_comp, unscored_samples=len(samples) - n_comp,
                  metrics=metric("flip", r["label_flips"])),
        EvalScore(name="text_change", scorer="text_change", scored_samples=n_comp,
                  unscored_samples=len(samples) - n_comp, metrics=metric("text_change", r["text_changes"]))])
    models = sorted({str(p.get("model")) for p in pairs})
    study = str(manifest.get("study") or records[0].get("study") or rd.path.name)
    status = manifest.get("status")
    spec = EvalSpec(
        created=_iso(manifest.get("created")), task=f"evalhost/{study}", run_id=rd.path.name,
        dataset=EvalDataset(name=study, location=str(rd.path), samples=len(samples),
                            sample_ids=[s.id for s in samples]),
        model=models[0] if len(models) == 1 else "evalhost/" + "+".join(models)[:200], config=EvalConfig(),
        packages={"evalhost": __version__},
        metadata={"evalhost": {f: manifest.get(f) for f in _MANIFEST_FIELDS if f in manifest},
                  "run_dir": rd.path.name, "pairs": len(samples), "comparable_pairs": n_comp,
                  "not_comparable": r["not_comparable"],
                  "note": "one sample per evalhost solo/batch pair; scores: flip, text_change, solo, batch"})
    return EvalLog(status="success" if status == "complete" else "cancelled", eval=spec, results=results,
                   samples=samples)


def export_inspect(run_dir: str | Path, output: str | Path, force: bool = False) -> tuple[Path, int]:
    """Write RUN_DIR as an inspect log at ``output`` (``.eval`` or ``.json``); returns (path, samples)."""
    _need_inspect()
    output = Path(output)
    fmt = _check_output(output, force)
    log = build_log(run_dir)
    from inspect_ai.log import write_eval_log

    folder = output.parent if str(output.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{output.stem[:40]}.", suffix=output.suffix, dir=folder)
    os.close(fd)
    try:
        write_eval_log(log, tmp, format=fmt)
        os.chmod(tmp, 0o644)
        if force:
            os.replace(tmp, output)
        else:
            try:
                os.link(tmp, output)  # fails instead of replacing a file created meanwhile
            except FileExistsError:
                raise UserError(f"{output} exists; choose another file name or pass --force to replace it") \
                    from None
    except OSError as exc:
        raise UserError(f"cannot write {str(output)[:120]!r} ({exc.strerror or exc}); choose a folder you may "
                        f"write to") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return output, len(log.samples or [])
