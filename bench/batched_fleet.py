"""Batch groups on an engine fleet: the same study run with 1, 2, 4 ... replicas, each running one group at a time
(issue 20, goal 2). Every run goes through ``evalhost.runner.run_study`` like ``evalhost run``; prints ONE JSON line.

CPU (fake engines: ``evalhost.testing.FakeServer`` with a fixed per-request latency, attached with ``urls``; this
measures evalhost's dispatch of groups over a fleet, not an engine):

    python bench/batched_fleet.py --fake --replicas 1,2,4 --latency 0.2 --items 64 --reps 3 \
        --out bench/results/cpu-batched-fleet.json

GPU (managed vLLM servers, option ``replicas = N`` and ``devices``; the Study-A-shaped run of issue 20: the 246
shipped items, solo + synchronized at 2, 4, 8, 16, 32 + prompt_list at 8, 32, 256 tokens, 1968 generations):

    python bench/batched_fleet.py --replicas 1,4 --study-a --model /tmp/models/smollm2-135m-instruct \
        --dtype float16 --max-tokens 256 --kv-cache-memory-bytes 2147483648 --gpu-util \
        --out bench/results/h200-batched-fleet.json

Per replica count: ``generation_s`` (first request sent to last answer, from the records' own timings),
``generations_per_hour`` over that span, ``batch_groups_per_s`` (batch groups / the batch records' span),
``wall_s`` (the whole run_study call) and ``startup_s`` (the servers' /health waits, from the manifest's evidence),
replicas used, groups whose co-batching verdict was not ``verified``, and ``identical_to_first``: records whose
content (text, token ids, labels, positions, peers; not timings or evidence) equals the first replica count's run
(``solo_identical`` for the solo records alone, which are deterministic on every engine). ``--gpu-util`` samples
``nvidia-smi`` every 500 ms and reports the mean utilisation during generation.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import TASKS, add_server_args, emit, log, machine, server_options

SKIP = ("run_id", "timings", "dispatch_evidence", "fingerprint_id", "backend_extra", "backend_config")


def study_toml(args, tasks: list[tuple[str, str]], backend_options: dict, out: Path) -> str:
    opts = "\n".join(f"{k} = {json.dumps(v)}" for k, v in backend_options.items())
    if args.study_a:
        dispatchers = ('[[dispatchers]]\nname = "synchronized"\nbatch_sizes = [2, 4, 8, 16, 32]\n\n'
                       '[[dispatchers]]\nname = "prompt_list"\nbatch_sizes = [8, 32]\n')
    else:
        bs = json.dumps([int(b) for b in args.batch_sizes.split(",")])
        dispatchers = (f'[[dispatchers]]\nname = "prompt_list"\nbatch_sizes = {bs}\n\n'
                       f'[[dispatchers]]\nname = "synchronized"\nbatch_sizes = {bs}\n')
    model = args.model
    if args.fake:  # a checkpoint directory the fake engines never read (chat_template = false)
        (out.parent / "model").mkdir(parents=True, exist_ok=True)
        (out.parent / "model" / "config.json").write_text("{}")
        model = out.parent / "model"
    task_blocks = "\n".join(f'[[tasks]]\nname = "{name}"\nsource = "{source}"\n' for name, source in tasks)
    return f"""
[study]
name = "batched_fleet"
seed = 42
output_dir = "{out}"

[sampling]
temperature = 0.0
max_tokens = {args.max_tokens}

[[models]]
name = "smollm2-135m-instruct"
path = "{model}"

[[backends]]
name = "vllm"
[backends.options]
{opts}

{dispatchers}
{task_blocks}
"""


def fake_tasks(path: Path, n: int) -> list[tuple[str, str]]:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"q{i:04d}", "prompt": f"Q{i:04d} tell me something.", "domain": "safety",
                                 "scorer": "refusal"}) + "\n")
    return [("fake", f"jsonl:{path}")]


class GpuSampler:
    """``nvidia-smi`` utilisation every 500 ms in a background process (none on a machine without it)."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "500"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            vals = [float(x) for x in line.split(",") if x.strip()]
            if vals:
                self.rows.append((time.time(), statistics.mean(vals)))

    def mean(self, start: float, end: float) -> float | None:
        xs = [u for t, u in self.rows if start <= t <= end]
        return round(statistics.mean(xs), 1) if xs else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def comparable(rec: dict) -> str:
    return json.dumps({k: v for k, v in rec.items() if k not in SKIP}, sort_keys=True)


def one_run(args, replicas: int, work: Path, rep: int) -> tuple[dict, list[dict]]:
    from evalhost.testing import FakeServer, run_study_in

    servers = []
    out = work / f"r{replicas}-{rep}"
    try:
        if args.fake:
            servers = [FakeServer(work / "servers", latency=args.latency).start() for _ in range(replicas)]
            tasks = fake_tasks(work / "tasks.jsonl", args.items)
            opts = {"urls": [s.url for s in servers], "chat_template": False}
        else:
            tasks = [(t, f"builtin:{t}") for t in TASKS]
            opts = {**server_options(args), "replicas": replicas, "prefix_caching": False}
            if args.devices:
                opts["devices"] = [int(d) for d in args.devices.split(",")]
        toml = study_toml(args, tasks, opts, out / "runs")
        t0 = time.time()
        records = run_study_in(out, toml, solo_cache=False)
        wall = time.time() - t0
    finally:
        for s in servers:
            s.stop()
    sent = [r["timings"]["sent"] for r in records if "sent" in r["timings"]]
    done = [r["timings"]["finished"] for r in records if "finished" in r["timings"]]
    batch = [r for r in records if r["condition"] == "batch"]
    groups = {(r["cell"], r["group_id"], r["repeat"]) for r in batch}
    b_sent = [r["timings"]["sent"] for r in batch]
    b_done = [r["timings"]["finished"] for r in batch]
    evidence = next(iter(records.manifest.get("evidence", {}).values()), {}) if records.manifest else {}
    starts = (evidence.get("solo_fleet") or {}).get("startup_seconds") or [(evidence.get("server") or {})
                                                                              .get("startup_seconds")]
    row = {
        "replicas": replicas, "records": len(records), "wall_s": round(wall, 2),
        "generation_s": round(max(done) - min(sent), 3),
        "generations_per_hour": round(len(records) / (max(done) - min(sent)) * 3600),
        "batch_groups": len(groups), "batch_span_s": round(max(b_done) - min(b_sent), 3),
        "batch_groups_per_s": round(len(groups) / (max(b_done) - min(b_sent)), 2),
        "replicas_used": sorted({r["dispatch_evidence"].get("fleet", {}).get("replica", 0) for r in batch}),
        "not_verified_groups": len({(r["cell"], r["group_id"]) for r in batch
                                    if (r["dispatch_evidence"].get("cobatch") or {}).get("verdict") != "verified"}),
        "startup_s": [sum(s) if isinstance(s, list) else s for s in starts if s is not None],
        "_window": (min(sent), max(done)),
    }
    return row, list(records)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--fake", action="store_true", help="fake engines with a fixed latency (CPU)")
    ap.add_argument("--latency", type=float, default=0.2, help="--fake: seconds per request")
    ap.add_argument("--items", type=int, default=64, help="--fake: items of the one task")
    ap.add_argument("--batch-sizes", default="8", help="without --study-a: prompt_list and synchronized sizes")
    ap.add_argument("--study-a", action="store_true", help="the Study-A-shaped run (246 shipped items)")
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--devices", default=None, help="vLLM option devices, e.g. 0,1 (default: all visible GPUs)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--gpu-util", action="store_true")
    args = ap.parse_args()
    work = Path(args.run_dir or tempfile.mkdtemp(prefix="bench-batched-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    sampler = GpuSampler() if args.gpu_util else None
    rows, first = [], None
    try:
        if args.fake:  # one untimed run first: imports, HTTP clients and the fake servers' start are not measured
            one_run(args, 1, work, -1)
        for replicas in [int(x) for x in args.replicas.split(",")]:
            reps = []
            for rep in range(args.reps):
                row, records = one_run(args, replicas, work, rep)
                start, end = row.pop("_window")
                if sampler is not None:
                    row["gpu_util_mean"] = sampler.mean(start, end)
                if first is None:
                    first = {r["key"]: comparable(r) for r in records}
                    first_solo = {r["key"] for r in records if r["condition"] == "solo"}
                row["identical_to_first"] = sum(first.get(r["key"]) == comparable(r) for r in records)
                row["solo_identical"] = sum(first.get(r["key"]) == comparable(r) for r in records
                                            if r["key"] in first_solo)
                log(f"replicas {replicas} rep {rep}: {json.dumps(row)}")
                reps.append(row)
            med = statistics.median(r["batch_groups_per_s"] for r in reps)
            rows.append({"replicas": replicas, "batch_groups_per_s_median": med,
                         "generations_per_hour_median": statistics.median(r["generations_per_hour"] for r in reps),
                         "reps": reps})
    finally:
        if sampler is not None:
            sampler.stop()
    base = rows[0]["batch_groups_per_s_median"]
    for r in rows:
        r["speedup_vs_first"] = round(r["batch_groups_per_s_median"] / base, 2)
    emit({"bench": "batched_fleet", "engine": "fake" if args.fake else "vllm", "latency_s": args.latency
          if args.fake else None, "study_a": args.study_a, "max_tokens": args.max_tokens, "machine": machine(),
          "argv": sys.argv[1:], "results": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
