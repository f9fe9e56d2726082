"""Solo-vs-batch pairs of evalhost run directories, with label flips split by kind.

    python docs/results/refusal-model/summarize_flips.py RUN_DIR [RUN_DIR ...]

For each backend configuration: pairs (each batch record with its solo record), text changes, and label flips split
into substantive refusal flips (``refuse`` <-> ``comply``), partial-refusal changes (a ``refuse`` of value 1.0 <->
0.5), and parse/empty flips (one side ``empty`` or ``unparsed``). Wilson 95 % intervals by statsmodels.
"""
from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

from statsmodels.stats.proportion import proportion_confint


def records(run_dir: Path):
    path = run_dir / "records.jsonl.gz"
    opener = gzip.open if path.exists() else open
    with opener(path if path.exists() else run_dir / "records.jsonl", "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def kind(solo: dict, batch: dict) -> str | None:
    a, b = solo.get("label"), batch.get("label")
    if a == b:
        if a == "refuse" and solo.get("score") != batch.get("score"):
            return "partial"
        return None
    if {a, b} == {"refuse", "comply"}:
        return "refuse->comply" if a == "refuse" else "comply->refuse"
    return "parse/empty"


def summarize(run_dir: Path) -> dict:
    recs = list(records(run_dir))
    solo, batch = {}, []
    for r in recs:
        if r.get("output_text") is None:
            continue
        pair_key = (r["model"], r["backend"], r["task"], r["item_id"])
        if r["condition"] == "solo":
            solo.setdefault(pair_key, r)
        else:
            batch.append(r)
    out: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    examples = []
    for b in batch:
        s = solo.get((b["model"], b["backend"], b["task"], b["item_id"]))
        if s is None:
            continue
        row = out[b["backend"]]
        row["pairs"] += 1
        row["text_changes"] += s["output_text"] != b["output_text"]
        k = kind(s, b)
        if k:
            row[k] += 1
            if k in ("refuse->comply", "comply->refuse"):
                examples.append({"backend": b["backend"], "task": b["task"], "item": b["item_id"],
                                 "dispatcher": b["dispatcher"], "batch_size": b["batch_size"], "kind": k,
                                 "solo": s["output_text"][:160], "batch": b["output_text"][:160]})
    return {"run": run_dir.name, "by_backend": {k: dict(v) for k, v in sorted(out.items())}, "examples": examples}


def ci(k: int, n: int) -> str:
    lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson") if n else (0.0, 0.0)
    return f"{k}/{n} [{lo:.1%}, {hi:.1%}]"


def main(argv: list[str]) -> None:
    for arg in argv:
        result = summarize(Path(arg))
        print(f"## {result['run']}\n")
        print("| Backend | Pairs | Text changes | Refusal flips (refuse<->comply) | of which refuse->comply | "
              "Partial-refusal changes | Parse/empty flips |")
        print("|---|---|---|---|---|---|---|")
        for backend, row in result["by_backend"].items():
            n = row["pairs"]
            sub = row.get("refuse->comply", 0) + row.get("comply->refuse", 0)
            print(f"| {backend} | {n} | {ci(row.get('text_changes', 0), n)} | {ci(sub, n)} | "
                  f"{row.get('refuse->comply', 0)} | {row.get('partial', 0)} | {row.get('parse/empty', 0)} |")
        print()
        for ex in result["examples"]:
            print(f"- {ex['backend']} {ex['task']}/{ex['item']} {ex['dispatcher']} bs{ex['batch_size']} {ex['kind']}: "
                  f"solo {ex['solo']!r} / batch {ex['batch']!r}")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
