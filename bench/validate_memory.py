"""Peak resident memory of ``evalhost validate`` (or ``report``) on a generated run of N records (issue 18).

Writes a run directory of ``--records`` records shaped like the run loop's (items each in a solo cell and
``prompt_list`` cells of batch 2, 4, 8 and 16, so 1,000,000 records = 200,000 items x 5 cells; outputs of ~200
characters with their token ids; ``--changed`` of the batch outputs differ from their solo output), then runs the real CLI as a child process and reads the child's peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``). Prints one JSON line.

    python bench/validate_memory.py --records 1000000
    python bench/validate_memory.py --records 1000000 --command report --out bench/results/report-memory-1m.json
    python bench/validate_memory.py --records 150000 --pythonpath "$(/tmp/tools/old-evalhost.sh)"   # old code
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCHES = (2, 4, 8, 16)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _text(i: int, bs: int, item: str, cell: str) -> str:
    return ("Sure: " if (i * bs) % 7 else "I'm sorry, I can't help with that. ") + _sha(item + cell) * 3


def write_run(run_dir: Path, records: int, changed: float = 1.0) -> int:
    """A run directory with ``records`` records (whole items only) and a matching manifest; returns the count.
    ``changed``: the share of batch outputs that differ from their solo output (the rest repeat it exactly)."""
    run_dir.mkdir(parents=True)
    fp = {"toy": "1"}
    fid = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    (run_dir / "manifest.json").write_text(json.dumps({"study": "bench", "status": "complete",
                                                       "fingerprints": {fid: fp}}))
    items = records // (1 + len(BATCHES))
    n = 0
    with (run_dir / "records.jsonl").open("w", encoding="utf-8") as fh:
        for cond, bs in [("solo", 1)] + [("batch", b) for b in BATCHES]:
            disp = "solo" if cond == "solo" else "prompt_list"
            cell = f"m/toy/bench/{disp}/bs{bs}"
            for i in range(items):
                item = f"item-{i:07d}"
                prompt = _sha(item)
                if cond == "batch" and int(_sha(item + cell)[:8], 16) >= changed * 2**32:
                    text = _text(i, 1, item, "m/toy/bench/solo/bs1")  # the same output as its solo
                else:
                    text = _text(i, bs, item, cell)
                g = i // bs
                peers = [f"item-{j:07d}" for j in range(g * bs, g * bs + bs) if j != i]
                rec = {"schema": 1, "key": f"{cell}#{item}#r0", "study": "bench", "phase": None, "run_id": "bench",
                       "cell": cell, "model": "m", "alignment_type": None, "backend": "toy", "backend_plugin": "toy",
                       "backend_config": {}, "dispatcher": disp, "dispatcher_plugin": disp, "arm": None,
                       "batch_size": bs, "condition": cond, "repeat": 0, "task": "bench", "task_source": "bench",
                       "item_id": item, "domain": "safety", "group_id": f"{cell}#g{g}", "position": i % bs,
                       "peers": peers, "prompt_sha256": prompt, "output_text": text,
                       "output_token_ids": [ord(c) for c in text[:48]], "output_sha256": _sha(text),
                       "finish_reason": "stop", "logprobs": None, "scorer": "toy_refusal",
                       "label": "refuse" if "sorry" in text else "comply", "score": 0.0, "rationale": "toy",
                       "timings": {"sent": 1.0 + i, "finished": 1.5 + i, "latency_s": 0.5}, "attempts": 1,
                       "restarted": False, "dispatch_evidence": {"mode": disp}, "fingerprint_id": fid,
                       "candidate_kind": None}
                fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
                n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--command", choices=("validate", "report"), default="validate")
    ap.add_argument("--changed", type=float, default=0.05,
                    help="share of batch outputs that differ from their solo output (default 0.05: the committed "
                         "H100 runs changed 1.8%%-7.2%% of their pairs; 1 = every pair changed, the shape before)")
    ap.add_argument("--pythonpath", default="", help="prepended to PYTHONPATH of the child (e.g. the old code)")
    ap.add_argument("--dir", default=None, help="where to write the run (default: a temp dir, removed after)")
    ap.add_argument("--out", default=None, help="also write the JSON line to this file")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="evalhost-bench-"))
    run_dir = base / "run"
    try:
        t0 = time.monotonic()
        n = write_run(run_dir, args.records, args.changed)
        size = (run_dir / "records.jsonl").stat().st_size
        print(f"wrote {n} records ({size / 2**20:.0f} MiB) in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        env = dict(os.environ)
        if args.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (args.pythonpath, env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "evalhost.cli", args.command, str(run_dir)]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.monotonic() - t0
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        result = {"command": args.command, "records": n, "changed": args.changed, "file_mib": round(size / 2**20, 1),
                  "exit": proc.returncode, "max_rss_mib": round(peak_kib / 1024, 1), "wall_s": round(wall, 1),
                  "last_line": (proc.stdout.strip() or proc.stderr.strip()).splitlines()[-1][:200],
                  "old_code": bool(args.pythonpath), "python": platform.python_version(),
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"}
        line = json.dumps(result)
        print(line)
        if args.out:
            Path(args.out).write_text(line + "\n")
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
