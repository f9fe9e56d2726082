"""How ``evalhost preflight`` sizes its study to the time budget, and the study file it writes.

Sizing (:func:`size_plan`) starts from two timed requests to the server: one solo request (``t1`` seconds) and one
prompt list of 4 (``t4``). A batch of ``b`` prompts is modelled as ``t1 * (1 + alpha * (b - 1))`` with
``alpha = (t4 / t1 - 1) / 3`` clamped to [0.02, 1] (about 0.02 on a GPU that batches for free, 1 on a machine that
is already saturated by one request). The study's cost is the sum over its conditions:

* solo: ``items * solo_repeats * t1``;
* prompt_list and synchronized: for every batch size ``b``, ``ceil(items_of_task / b)`` groups of cost ``t(b)``;
* continuous: ``ceil(items_of_task / targets)`` groups, each ``delay_s + 1.5 * t(batch)`` (the targets decode while
  fillers with ``filler_max_tokens`` tokens churn, then the fillers in flight drain).

It takes the largest rung of :data:`LADDER` (items, drawn from the probe set first and then the other shipped task
sets) whose cost fits in 80 % of what is left of the budget. With every item in, it adds batch sizes
(:data:`GROW`: each size groups the items differently, so its pairs are new compositions), then repeats of the
batched conditions (a repeat replays the same groups, so it is the last resort), and a third solo run, while they
still fit. When even the smallest rung does not fit, it runs that rung and says how long it is expected to take.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

PROBES = "preflight_probes"
# (task set, items) in the order preflight uses them; every set is shipped with evalhost (tasks/README.md)
TASK_ORDER = (("preflight_probes", 24), ("benign", 42), ("truthfulqa_style", 42), ("mmlu_style", 50),
              ("bbq_style", 64), ("jailbreak_amplification", 48))
LADDER = (4, 8, 12, 16, 24, 48, 96, 144, 200, 270)
MAX_REPEATS = 8
# batch sizes added once every item is in ("batch": prompt_list and synchronized; "continuous": its batch size)
GROW = (("batch", 32), ("continuous", 32), ("batch", 2), ("continuous", 8), ("batch", 12), ("batch", 24),
        ("continuous", 24), ("batch", 6), ("batch", 3), ("batch", 48), ("continuous", 48), ("batch", 64))
BUDGET_SHARE = 0.8
FILLER_MAX_TOKENS = 4


@dataclass
class Timing:
    t1: float  # seconds for one solo request of max_tokens
    t4: float  # seconds for one prompt list of 4

    @property
    def alpha(self) -> float:
        if self.t1 <= 0:
            return 1.0
        return min(1.0, max(0.02, (self.t4 / self.t1 - 1.0) / 3.0))

    def batch(self, b: int) -> float:
        return self.t1 * (1.0 + self.alpha * (b - 1))


@dataclass
class PreflightPlan:
    tasks: list[tuple[str, int]]
    batch_sizes: list[int]
    continuous_batches: list[int]
    continuous_targets: int
    delay_s: float
    repeats: int = 1
    solo_repeats: int = 2
    estimate_s: float = 0.0
    budget_s: float = 0.0
    fits: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def items(self) -> int:
        return sum(n for _, n in self.tasks)

    def describe(self, timing: Timing, max_tokens: int) -> str:
        return (f"one solo request ({max_tokens} tokens) took {timing.t1:.2f} s and a prompt list of 4 took "
                f"{timing.t4:.2f} s, so a batch of b is modelled as {timing.t1:.2f} s x (1 + {timing.alpha:.2f} "
                f"(b - 1)); picked {self.items} items ({', '.join(f'{t} {n}' for t, n in self.tasks)}), batch sizes "
                f"{', '.join(map(str, self.batch_sizes))}, continuous batch "
                f"{', '.join(map(str, self.continuous_batches))} with "
                f"{self.continuous_targets} target(s) per group, {self.solo_repeats} solo runs, {self.repeats} "
                f"run(s) of each batched condition: about {self.estimate_s / 60:.1f} min of the "
                f"{self.budget_s / 60:.1f} min left for generation ({int(BUDGET_SHARE * 100)} % of the budget)")


def tasks_for(items: int) -> list[tuple[str, int]]:
    out, left = [], items
    for name, size in TASK_ORDER:
        if left <= 0:
            break
        take = min(size, left)
        out.append((name, take))
        left -= take
    return out


def shape_for(items: int, max_num_seqs: int | None) -> tuple[list[int], int, int]:
    """(batch sizes, continuous batch size, continuous targets per group) for a rung of ``items``."""
    if items >= 16:
        sizes, cont, targets = [4, 8, 16], 16, 4
    elif items >= 8:
        sizes, cont, targets = [2, 4, 8], 8, 2
    else:
        sizes, cont, targets = [2, 4], 4, 1
    if max_num_seqs:
        sizes = sorted({min(b, max_num_seqs) for b in sizes if min(b, max_num_seqs) >= 2}) or [2]
        cont = max(2, min(cont, max_num_seqs))
        targets = max(1, min(targets, cont - 1))
    return sizes, cont, targets


def estimate(plan: PreflightPlan, timing: Timing) -> float:
    per_task = [n for _, n in plan.tasks]
    solo = sum(per_task) * plan.solo_repeats * timing.t1
    batched = sum(math.ceil(n / b) * timing.batch(b) for n in per_task for b in plan.batch_sizes)
    cont = sum(math.ceil(n / plan.continuous_targets) * (plan.delay_s + 1.5 * timing.batch(c))
               for n in per_task for c in plan.continuous_batches)
    return solo + plan.repeats * (2 * batched + cont)


def size_plan(timing: Timing, budget_s: float, max_num_seqs: int | None = None) -> PreflightPlan:
    """The largest plan whose estimate fits ``BUDGET_SHARE * budget_s`` (see the module docstring)."""
    budget = BUDGET_SHARE * budget_s
    delay = round(min(1.0, max(0.05, timing.t1 / 4)), 3)
    best = None
    for items in LADDER:
        sizes, cont, targets = shape_for(items, max_num_seqs)
        plan = PreflightPlan(tasks_for(items), sizes, [cont], targets, delay, budget_s=budget)
        plan.estimate_s = estimate(plan, timing)
        if best is None or plan.estimate_s <= budget:
            best = plan
        if plan.estimate_s > budget:
            break
    assert best is not None
    best.fits = best.estimate_s <= budget
    if not best.fits:
        best.notes.append(f"the budget is too small for the smallest preflight; it runs anyway and should take "
                          f"about {best.estimate_s / 60:.1f} min")
        return best
    if best.items == LADDER[-1]:
        for kind, size in GROW:
            if max_num_seqs and size > max_num_seqs:
                continue
            field_ = "batch_sizes" if kind == "batch" else "continuous_batches"
            if size in getattr(best, field_):
                continue
            trial = PreflightPlan(**{**best.__dict__, field_: sorted([*getattr(best, field_), size]), "notes": []})
            trial.estimate_s = estimate(trial, timing)
            if trial.estimate_s <= budget:
                best = trial
        while best.repeats < MAX_REPEATS:
            trial = PreflightPlan(**{**best.__dict__, "repeats": best.repeats + 1, "notes": []})
            trial.estimate_s = estimate(trial, timing)
            if trial.estimate_s > budget:
                break
            best = trial
    trial = PreflightPlan(**{**best.__dict__, "solo_repeats": 3, "notes": []})
    trial.estimate_s = estimate(trial, timing)
    if trial.estimate_s <= budget:
        best = trial
    return best


# ------------------------------------------------------------------------------------------------ the study
def toml_value(value: Any) -> str:
    """A TOML literal for the values a study holds (strings, numbers, bools, lists, tables as inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _table(header: str, values: dict[str, Any]) -> list[str]:
    return [header] + [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None] + [""]


def study_text(name: str, output_dir: str, model: dict[str, Any], backend: dict[str, Any], plan: PreflightPlan,
               max_tokens: int, metrics: bool, continuous: bool, seed: int = 42) -> str:
    """The study file of a preflight run (written to the run directory as ``study.toml`` like any study's)."""
    lines = ["# written by `evalhost preflight` (see docs/preflight.md)", ""]
    lines += _table("[study]", {"name": name, "seed": seed, "output_dir": output_dir, "phase": "preflight",
                                "repeats": plan.repeats, "solo_repeats": plan.solo_repeats,
                                "description": "batch-invariance preflight of a served stack"})
    lines += _table("[sampling]", {"temperature": 0.0, "max_tokens": max_tokens})
    lines += _table("[[models]]", model)
    lines += _table("[[backends]]", backend)
    lines += _table("[[dispatchers]]", {"name": "prompt_list", "batch_sizes": plan.batch_sizes})
    lines += _table("[[dispatchers]]", {"name": "synchronized", "batch_sizes": plan.batch_sizes,
                                        "options": {"metrics": metrics}})
    if continuous:
        lines += _table("[[dispatchers]]", {
            "name": "continuous", "batch_sizes": plan.continuous_batches,
            "options": {"targets": plan.continuous_targets, "phase": "decode", "delay_s": plan.delay_s,
                        "fillers": f"builtin:{PROBES}", "filler_max_tokens": FILLER_MAX_TOKENS,
                        "arm": "prefill churn (short and long probes)", "metrics": metrics}})
    for task, n in plan.tasks:
        lines += _table("[[tasks]]", {"name": task, "source": f"builtin:{task}", "limit": n})
    return "\n".join(lines)
