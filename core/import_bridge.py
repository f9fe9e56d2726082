"""What the lm-eval and inspect bridges of ``evalhost import`` share: two result files of one task (the first the
solo side, the second the batch side) paired sample by sample become one evalhost run directory.

A bridge (:mod:`evalhost.import_lmeval`, :mod:`evalhost.import_inspect`) reads each file into :class:`Side` rows
keyed by a row id (the document / sample id, plus the epoch where there are several) and hands both to
:func:`write_pair_run`, which

* checks every row with the existing importer's row checks (:func:`evalhost.importer.check_rows`: names, labels,
  scores, '#' in ids) and builds the records with its :func:`evalhost.importer.build_records`, so a bridged run is
  an imported run like any other (manifest ``imported``, one stack fingerprint that holds both files' facts);
* sets what the source files do say: each side's output text and its SHA-256, the SHA-256 of the prompt the side
  was given (so a pair whose prompts differ is ``prompt_mismatch``, not a flip), ``finish_reason`` when known, and
  the prompt text in ``metadata.prompt``;
* counts a sample found in only one file instead of dropping it: the missing side gets a placeholder record
  (``finish_reason: "missing"``, no label, score or text, ``scorer_error: "missing: ..."``), so the pair is formed
  and counted as not comparable with reason ``missing`` by the analysis (:func:`evalhost.analysis_pairs.
  not_comparable_reason`), and the manifest lists the ids under ``imported.only_solo`` / ``imported.only_batch``;
* adds the paired accuracy test to the manifest (``imported.paired``): each side's share of ``correct`` labels with
  its Wilson 95% CI and the exact McNemar p of the discordant pairs (correct solo / incorrect batch vs the
  reverse), computed with :mod:`evalhost.stats` over the comparable pairs of :func:`evalhost.analysis.pair`;
* writes the directory through :class:`evalhost.rundir.RunDir` and :class:`evalhost.records.RecordWriter` in a hidden
  temporary directory renamed into place at the end (an existing RUN_DIR is refused, nothing is left on failure).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import RunError, UserError

MAX_BYTES = 256 * 2**20
MISSING = "missing"  # the placeholder's finish_reason: evalhost.analysis_pairs.MISSING, reason "missing"


@dataclass
class Side:
    """One sample of one file: its label and score under the chosen metric, output text, prompt and facts."""
    task: str
    label: str | None
    score: float | None
    text: str | None
    prompt: str            # the canonical prompt (what was sent), hashed into prompt_sha256
    prompt_text: str | None = None  # a readable prompt for metadata.prompt
    finish_reason: str = "unknown"
    error: str | None = None
    where: str = ""        # FILE:LINE or FILE sample N
    order: int = 0         # position in its file
    meta: dict[str, Any] = field(default_factory=dict)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: Path, what: str, suffixes: tuple[str, ...]) -> None:
    if not path.is_file():
        raise UserError(f"{path} is not a file; pass {what}")
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{path.name} does not end in {' or '.join(suffixes)}; pass {what}")
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"{path.name} is larger than {MAX_BYTES // 2**20} MiB; split it into several imports")


def plain_name(text: str) -> str:
    """A model / task / backend name as evalhost's cells can hold it ('/' and '#' are separators there)."""
    out = "".join(c if c.isalnum() or c in "._+-:" else "_" for c in str(text).strip()).strip("_")
    return out[:100] or "unknown"


def binary_label(value: float) -> str | None:
    """``correct`` / ``incorrect`` for a 0/1 metric value, else None."""
    if value == 1:
        return "correct"
    if value == 0:
        return "incorrect"
    return None


def paired_test(pairs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Each side's share of ``correct`` labels (Wilson 95% CI) and the exact McNemar p over the comparable pairs;
    None values when the labels are not correct/incorrect."""
    from . import stats as st

    comp = [p for p in pairs if p["comparable"]]
    labels = {p["solo_label"] for p in comp} | {p["batch_label"] for p in comp}
    if not comp or not labels <= {"correct", "incorrect"}:
        return {"pairs": len(comp), "solo_correct": None, "batch_correct": None, "solo_only": None,
                "batch_only": None, "mcnemar_p": None,
                "note": "labels are not correct/incorrect: no paired accuracy test (see the flip rates)"}
    solo_only = sum(1 for p in comp if p["solo_label"] == "correct" and p["batch_label"] != "correct")
    batch_only = sum(1 for p in comp if p["batch_label"] == "correct" and p["solo_label"] != "correct")
    n = len(comp)
    return {"pairs": n,
            "solo_correct": st.proportion(sum(p["solo_label"] == "correct" for p in comp), n),
            "batch_correct": st.proportion(sum(p["batch_label"] == "correct" for p in comp), n),
            "solo_only": solo_only, "batch_only": batch_only,
            "mcnemar_p": st.mcnemar_exact(solo_only, batch_only),
            "note": "exact McNemar test of correct-solo-only vs correct-batch-only pairs (comparable pairs)"}


def _row(rid: str, solo: Side | None, batch: Side | None, info: Mapping[str, Any]) -> dict[str, Any]:
    some = solo or batch
    assert some is not None
    row: dict[str, Any] = {"row_id": rid, "mode": info["mode"], "model": info["model"], "task": some.task,
                           "domain": info.get("domain", "capability"), "dispatcher": info["dispatcher"],
                           "batch_size": info["batch_size"], "phase": "", "original_direction": "",
                           "scorer": info["scorer"]}
    for name, side in (("solo", solo), ("batch", batch)):
        text = "" if side is None or side.text is None else side.text
        label = MISSING if side is None or side.label is None else side.label
        row.update({f"{name}_label": label, f"{name}_score": None if side is None else side.score,
                    f"{name}_text": text, f"{name}_text_sha256": ""})
    return row


def write_pair_run(solo: dict[str, Side], batch: dict[str, Side], run_dir: str | Path, *, files: tuple[Path, Path],
                   info: Mapping[str, Any], fingerprint: dict[str, Any], flip_on: str = "label",
                   study: str | None = None) -> dict[str, Any]:
    """Write the run directory of a solo/batch file pair; returns what the CLI prints (see the module docstring).

    ``info``: ``source`` (``lm-eval`` / ``inspect``), ``mode`` (the backend label), ``model``, ``dispatcher``,
    ``batch_size`` (0: unknown), ``scorer`` (the metric's name), ``metric_note`` (how labels were made)."""
    from .analysis import pair
    from .importer import FLIP_ON, build_records, check_rows
    from .runner import fingerprint_id, host_fingerprint

    run_dir = Path(run_dir)
    if flip_on not in FLIP_ON:
        raise UserError(f"--flip-on is {flip_on!r}; use label (a label change is a flip) or score (a score change "
                        f"is a flip)")
    if os.path.lexists(run_dir):
        raise UserError(f"{run_dir} already exists; choose a new directory (an import never overwrites one)")
    for rid in set(solo) & set(batch):
        if solo[rid].task != batch[rid].task:
            raise UserError(f"sample {rid} is task {solo[rid].task!r} in {files[0].name} but {batch[rid].task!r} in "
                            f"{files[1].name}; import two runs of the same task")
    ids = sorted(set(solo) | set(batch), key=lambda r: (r not in solo, (solo.get(r) or batch[r]).order))
    if not set(solo) & set(batch):
        raise UserError(f"{files[0].name} and {files[1].name} share no sample id; pass two runs of the same task "
                        f"(the solo run first, then the batch run)")
    for rid in ids:
        if "#" in rid or not rid.strip():
            raise UserError(f"sample id {rid[:60]!r} ({(solo.get(rid) or batch[rid]).where}) is empty or contains "
                            f"'#', which evalhost record keys use as a separator; give the samples plain ids")
    rows = [_row(rid, solo.get(rid), batch.get(rid), info) for rid in ids]
    checked = check_rows(f"{files[0].name}+{files[1].name}", [(n, r) for n, r in enumerate(rows, 1)])
    sources = f"{files[0].name} + {files[1].name}"
    fp = {"imported": True, "backend": info["mode"], "backend_plugin": "imported", "source": info["source"],
          **fingerprint}
    fid = fingerprint_id(fp)
    study = study or plain_name(f"{info['source']}-{checked[0]['task']}")
    records = build_records(checked, study, run_dir.name, sources, {info["mode"]: fid})
    for rec in records:
        cond = rec["condition"]
        side = (solo if cond == "solo" else batch).get(rec["item_id"])
        path = files[0] if cond == "solo" else files[1]
        other = (batch if cond == "solo" else solo).get(rec["item_id"])
        rec["imported"] = {"source": path.name, "format": info["source"], "where": side.where if side else None}
        rec["scorer"] = info["scorer"]
        rec["rationale"] = f"imported from {info['source']}: {info['metric_note']}"
        if side is None:  # counted as a pair that is not comparable, never dropped
            rec.update(label=None, score=None, output_text=None, output_sha256="", finish_reason=MISSING,
                       prompt_sha256=sha256_text(other.prompt), metadata={"missing": True},
                       scorer_error=f"missing: sample {rec['item_id']} is not in {path.name}")
            continue
        rec.update(output_text=side.text, output_sha256=sha256_text(side.text or ""),
                   prompt_sha256=sha256_text(side.prompt), finish_reason=side.finish_reason,
                   metadata={**side.meta, "prompt": side.prompt_text})
        if side.error is not None:
            rec.update(label=None, score=None, scorer_error=f"error: {side.error}"[:500], finish_reason="error")
    pairs = pair(records, flip_on)
    only_solo = sorted(set(solo) - set(batch))
    only_batch = sorted(set(batch) - set(solo))
    now = time.time()
    paired = paired_test(pairs)
    manifest = {
        "study": study, "study_file": None, "created": now, "finished": now, "status": "complete",
        "imported": {"source": sources, "format": info["source"], "solo_file": files[0].name,
                     "batch_file": files[1].name, "sha256": {files[0].name: file_sha256(files[0]),
                                                             files[1].name: file_sha256(files[1])},
                     "rows": len(checked), "label": info["metric_note"], "only_solo": only_solo,
                     "only_batch": only_batch, "paired": paired},
        "flip_on": flip_on, "host": host_fingerprint(), "plugins": [], "fingerprints": {fid: fp},
        "backend_fingerprints": {f"{info['model']}/{info['mode']}": fid}, "evidence": {}, "env": {}, "limit": None,
        "plan": {"generations": len(records), "cells": len({r["cell"] for r in records})},
    }
    publish_run(run_dir, records, manifest)
    comp = [p for p in pairs if p["comparable"]]
    return {"run_dir": run_dir, "rows": len(checked), "records": len(records), "pairs": len(pairs),
            "comparable": len(comp), "flips": sum(p["flip"] for p in comp),
            "text_changes": sum(p["text_change"] for p in comp), "only_solo": only_solo, "only_batch": only_batch,
            "paired": paired, "label": info["metric_note"], "flip_on": flip_on}


def describe(result: Mapping[str, Any], files: tuple[Path, Path]) -> list[str]:
    """The lines ``evalhost import`` prints for a bridged pair."""
    r = result
    lines = [f"imported {r['rows']} samples ({files[0].name} as solo, {files[1].name} as batch) -> {r['records']} "
             f"records in {r['run_dir']} (flip_on = {r['flip_on']}; label = {r['label']})",
             f"{r['pairs']} pairs, {r['comparable']} comparable: {r['flips']} flips, {r['text_changes']} text changes"]
    for name, ids, path in (("only in", r["only_solo"], files[0]), ("only in", r["only_batch"], files[1])):
        if ids:
            shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
            lines.append(f"{len(ids)} samples {name} {path.name} (counted as not comparable): {shown}")
    p = r["paired"]
    if p["mcnemar_p"] is not None:
        s, b = p["solo_correct"], p["batch_correct"]
        lines.append(f"correct: solo {s['k']}/{s['n']} ({s['rate']:.1%}, 95% CI {s['lo']:.1%}-{s['hi']:.1%}), "
                     f"batch {b['k']}/{b['n']} ({b['rate']:.1%}, 95% CI {b['lo']:.1%}-{b['hi']:.1%}); "
                     f"correct only solo {p['solo_only']}, only batch {p['batch_only']}: exact McNemar "
                     f"p = {p['mcnemar_p']:.3g}")
    else:
        lines.append(p["note"])
    return lines


def canonical(value: Any) -> str:
    """JSON text of a prompt structure with sorted keys (what its SHA-256 is taken of)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def publish_run(run_dir: Path, records: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    """Write an imported run whole or not at all: records and manifest into a hidden sibling directory, fsynced,
    then renamed to ``run_dir`` (refused if it appeared meanwhile). Shared by the single-file import
    (:mod:`evalhost.importer`) and the lm-eval / inspect bridges."""
    from .records import RecordWriter
    from .rundir import MANIFEST, RECORDS, RunDir

    parent = run_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.importing-", dir=parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a run directory is as readable as one `run` makes
        writer = RecordWriter(tmp / RECORDS)
        try:
            writer.write_many(records)
        finally:
            writer.close()
        RunDir(tmp).write_json(MANIFEST, manifest)
        if os.path.lexists(run_dir):
            raise UserError(f"{run_dir} appeared while importing; choose a new directory")
        os.rename(tmp, run_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"could not write {run_dir} ({exc.strerror or exc}); nothing was written - free space or "
                       f"choose another place and import again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
