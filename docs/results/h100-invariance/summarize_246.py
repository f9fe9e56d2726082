"""Numbers for README.md's section on the 246-target run, from its records (run from the repository root):

    python docs/results/h100-invariance/summarize_246.py                  # run 3 (chat prompts everywhere)
    python docs/results/h100-invariance/summarize_246.py <run directory>  # e.g. run 2, h100_invariance_stress_246-20261124-071302

Per configuration: how prompts were rendered (chat template or raw; see README), pairs, text changes vs solo, the
same restricted to pairs whose solo output is not empty, solo repeat disagreements, and per dispatcher x size."""
from __future__ import annotations

import collections
import gzip
import hashlib
import json
import sys
from pathlib import Path

from evalhost.stats import wilson

RUN = Path(__file__).parent / "h100_invariance_stress_246-20261124-105711"


def main(run: Path = RUN) -> None:
    recs = [json.loads(line) for line in gzip.open(run / "records.jsonl.gz")]
    from evalhost.plan import load_task
    from evalhost.registry import get_registry
    from evalhost.study import TaskSpec

    raw = set()
    for task in sorted({r["task"] for r in recs}):
        for it in load_task(TaskSpec(name=task, source=f"builtin:{task}"), get_registry(), None):
            raw.add(hashlib.sha256(it.plain_text().encode()).hexdigest())
    solo = {(r["backend"], r["task"], r["item_id"], r["repeat"]): r for r in recs if r["condition"] == "solo"}
    rows = collections.defaultdict(lambda: collections.Counter())
    cells = collections.defaultdict(lambda: collections.Counter())
    for r in recs:
        b = r["backend"]
        if r["condition"] == "solo":
            rows[b]["raw_prompts" if r["prompt_sha256"] in raw else "chat_prompts"] += 1
            if r["repeat"] > 0:
                rows[b]["repeat_pairs"] += 1
                rows[b]["repeat_diff"] += r["output_sha256"] != solo[(b, r["task"], r["item_id"], 0)]["output_sha256"]
            continue
        s = solo[(b, r["task"], r["item_id"], 0)]
        changed = r["output_sha256"] != s["output_sha256"]
        rows[b]["pairs"] += 1
        rows[b]["changed"] += changed
        rows[b]["flips"] += r["label"] != s["label"]
        if s["output_token_ids"] and s["output_token_ids"] != [2]:  # 2 = end of text at once: an empty answer
            rows[b]["nonempty_pairs"] += 1
            rows[b]["nonempty_changed"] += changed
        key = (b, r["dispatcher"], r["batch_size"])
        cells[key]["pairs"] += 1
        cells[key]["changed"] += changed

    def rate(k, n):
        _, lo, hi = wilson(k, n)
        return f"{k}/{n} ({100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}])"

    print("| Configuration | Prompts | Pairs: text changes | Non-empty solo: text changes | Label flips | "
          "Solo repeats differing |")
    print("|---|---|---|---|---|---|")
    for b in sorted(rows):
        c = rows[b]
        prompts = "chat template" if c["raw_prompts"] == 0 else ("raw" if c["chat_prompts"] == 0 else "mixed")
        print(f"| {b} | {prompts} | {rate(c['changed'], c['pairs'])} | "
              f"{rate(c['nonempty_changed'], c['nonempty_pairs'])} | {c['flips']} | "
              f"{c['repeat_diff']}/{c['repeat_pairs']} |")
    print()
    print("| Configuration | " + " | ".join(f"{d} {s}" for d in ("prompt_list", "synchronized", "continuous")
                                          for s in (8, 64)) + " |")
    print("|---|" + "---|" * 6)
    for b in sorted(rows):
        vals = [cells[(b, d, s)] for d in ("prompt_list", "synchronized", "continuous") for s in (8, 64)]
        print(f"| {b} | " + " | ".join(f"{v['changed']}/{v['pairs']}" for v in vals) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else RUN)
