"""The fragility screen of a run directory for several score windows: the smallest top-1/top-2 margin over the first
N solo tokens (N = 1, 4, 8, 16, 32) and over all of them (evalhost's default).

    .venv/bin/python docs/results/screen-cpu/ablation.py RUN_DIR [RUN_DIR ...] [--tasks a,b]

``--tasks`` keeps only those tasks' records (e.g. the tasks an interrupted run finished).

Prints one row per (run, window): items, items whose text changed in some batch pair, ROC AUC (scipy Mann-Whitney
U / (n1 n0)), its one-sided p, items tested to catch 90 % of the changed ones (ties at the cut tested whole), and the
share of batching cost saved. Reads records only (evalhost.analysis_screen.screen_of)."""
from __future__ import annotations

import sys

from evalhost.analysis import pair
from evalhost.analysis_screen import screen_of
from evalhost.records import find_records, iter_records


def main(run_dirs: list[str], tasks: set[str] | None = None) -> None:
    print("| run | window | items | changed | AUC | p (one-sided) | tested for 90% recall | cost saved |")
    print("|---|---|---|---|---|---|---|---|")
    for run_dir in run_dirs:
        records = [r for r in iter_records(find_records(run_dir), checked=True) if not tasks or r["task"] in tasks]
        pairs = pair(records)
        for n in (1, 4, 8, 16, 32, None):
            o = screen_of(records, pairs, first_n=n)["overall"]
            auc = "n/a" if o["auc"] is None else f"{o['auc']:.3f}"
            p = "n/a" if o["p_value"] is None else f"{o['p_value']:.2g}"
            saved = "n/a" if o["saved"] is None else f"{100 * o['saved']:.1f}%"
            tested = "n/a" if o["tested"] is None else f"{o['tested']} of {o['items']}"
            print(f"| {run_dir.rstrip('/').split('/')[-1]} | {'all' if n is None else f'first {n}'} | {o['items']} "
                  f"| {o['changed']} | {auc} | {p} | {tested} | {saved} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    only = None
    if "--tasks" in args:
        i = args.index("--tasks")
        only = set(args[i + 1].split(","))
        args = args[:i] + args[i + 2:]
    main(args, only)
