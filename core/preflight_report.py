"""``preflight.md`` and ``preflight.json``: what ``evalhost preflight`` found, short enough to attach to an eval."""
from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .preflight_stack import FACT_NAMES, FACTS


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(run_dir: Path, target, plan, timing, results: Sequence, warnings: Sequence[dict[str, str]],
                    note: str | None, started: float, finished: float, minutes: float, max_tokens: int) -> str:
    facts, sources = target.stack["facts"], target.stack["sources"]
    broken = [v for v in results if v.status == "broken"]
    head = "broken" if broken else "invariant held in every condition measured"
    lines = [f"# Preflight: {facts.get('served_model', 'unknown')} at {target.url}", "",
             f"**{head}** — {target.origin}; temperature 0, max_tokens {max_tokens}; run directory "
             f"`{run_dir.name}`.", ""]
    lines += [f"- {v.line()}" for v in results] + [""]
    lines += ["## Stack", "", "| fact | value | where it was read |", "|---|---|---|"]
    for key in FACTS:
        lines.append(f"| {FACT_NAMES[key]} | {_cell(facts.get(key))} | {_cell(sources.get(key, '-'))} |")
    lines += ["", "Facts the server does not expose are `unknown`; give them with `--stack KEY=VALUE` to have the "
              "known-bad table check them.", ""]
    lines += ["## Known-bad combinations", ""]
    if warnings:
        for w in warnings:
            how = ("**matches**" if w["match"] == "match" else
                   f"**may match** (unknown: {', '.join(w.get('unknown') or [])})")
            lines.append(f"- {how} {w['issue']}: {w['summary']}. Versions: {w['versions']}. Fix: {w['fix']}.")
    else:
        lines.append("- none of the shipped table's entries (docs/preflight.md) match this stack.")
    if note:
        lines.append(f"- note: {note}.")
    for n in target.notes:
        lines.append(f"- note: {n}.")
    lines += ["", "## What ran", "", f"Sizing: {plan.describe(timing, max_tokens)}.", ""]
    lines += ["| condition | batch sizes | pairs | changed | 95 % upper bound | first divergent token | example |",
              "|---|---|---|---|---|---|---|"]
    for v in results:
        ub = "-" if v.upper is None else f"{100 * v.upper:.2g} %"
        ex = "-" if not v.example else f"{v.example.get('task')}/{v.example.get('item_id')} ({v.example['where']})"
        lines.append(f"| {v.condition} | {', '.join(map(str, v.batch_sizes)) or '-'} | {v.n} | {v.k} | {ub} | "
                     f"{'-' if v.first_token is None else v.first_token} | {_cell(ex)} |")
    lines += ["", "A pair changed when the batched (or repeated) output differs from the first solo output in text or "
              "token ids. The upper bound is the Wilson 95 % interval's; with 0 changes a bound of 1 % needs 381 "
              "pairs.", ""]
    took = finished - started
    if target.start_s is None:
        spent = f"{took / 60:.1f} min of the {minutes:g} min budget"
    else:  # --config: the managed server's start is not counted in the budget
        spent = (f"{took / 60:.1f} min in all: starting the server took {target.start_s / 60:.1f} min (not counted "
                 f"in the budget), the check {(took - target.start_s) / 60:.1f} min of the {minutes:g} min budget")
    lines += ["## Time", "", f"Started {_when(started)}, finished {_when(finished)}: {spent} (generation estimated "
              f"at {plan.estimate_s / 60:.1f} min).", ""]
    lines += ["## Inspect", "", f"`evalhost report {run_dir}` and `evalhost validate {run_dir}` work on this "
              "directory like on any run; `study.toml` here is the study preflight ran.", ""]
    return "\n".join(lines)


def write_outputs(run_dir: Path, target, plan, timing, results, warnings, note, started: float, minutes: float,
                  max_tokens: int, out: Callable[[str], None]) -> Path:
    from .rundir import RunDir

    try:  # the ordinary report; a failure there must not hide the verdicts
        from .report import write_report

        write_report(run_dir)
    except Exception as exc:  # noqa: BLE001
        out(f"warning: report.md could not be written ({type(exc).__name__}: {exc}); run evalhost report {run_dir}")
    finished = time.time()
    rd = RunDir(run_dir)
    text = render_markdown(run_dir, target, plan, timing, results, warnings, note, started, finished, minutes,
                           max_tokens)
    rd.write_atomic("preflight.json", json.dumps({
        "url": target.url, "origin": target.origin, "stack": target.stack, "known_bad": list(warnings),
        "note": note, "notes": target.notes, "timing": {"t1_s": timing.t1, "t4_s": timing.t4, "alpha": timing.alpha},
        "plan": {"tasks": plan.tasks, "batch_sizes": plan.batch_sizes, "continuous_batches": plan.continuous_batches,
                 "continuous_targets": plan.continuous_targets, "repeats": plan.repeats,
                 "solo_repeats": plan.solo_repeats, "estimate_s": plan.estimate_s},
        "verdicts": [v.as_dict() for v in results], "started": started, "finished": finished,
        "server_start_s": target.start_s,
        "budget_minutes": minutes, "max_tokens": max_tokens}, indent=2, default=str))
    path = rd.write_atomic("preflight.md", text)
    out(f"preflight: {path}")
    return path
