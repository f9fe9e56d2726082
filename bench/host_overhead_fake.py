"""Host overhead on the CPU, isolated from the engine: evalhost's ``solo`` and ``synchronized`` dispatch vs a plain
httpx client, both against a fake OpenAI-compatible server that answers at once with ``--tokens`` tokens, so every
second measured is host time (the client's and the server's; the server's is the same for both clients).

    python bench/host_overhead_fake.py --prompts 288 --tokens 256 --batch-size 64 --reps 3 --label after \
        --out bench/results/cpu-host-overhead-fake-after-1.json
    python bench/host_overhead_fake.py --summarize bench/results/cpu-host-overhead-fake-*.json \
        --out bench/results/cpu-host-overhead-fake.json

Per repetition, alternating (so that background load hits both alike):

* plain solo: one ``httpx.Client``, each prompt one ``POST /v1/completions`` after the other;
* evalhost solo: :func:`evalhost.runner.run_study` on a generated study with no batched dispatcher (only the solo
  cell every study has), backend ``vllm`` attached with ``url``; a fresh private solo cache (misses and puts, as a
  first run on a new stack does);
* plain synchronized: one ``httpx.AsyncClient``; per group its prompts as concurrent requests (``asyncio.gather``),
  groups one after another; ``plain16``: the same over 16 clients in turn (the pool layout evalhost now uses);
* evalhost synchronized: the same study with dispatcher ``synchronized`` at ``--batch-size`` (groups of
  :func:`evalhost.plan.make_groups`, seed 42; ``/metrics`` sampled, the default); its solo cell is served from a
  private solo cache filled once before.

Host time per solo request and per group: the plain client's is its loop's time / requests (groups). evalhost's is
taken between the driver's consecutive ``GroupDone`` events of one cell (the bench wraps
``evalhost.runner.build_records``, which the driver calls once per group): each gap holds the previous group's
scoring, record writes and fsync and the next group's dispatch, as the GPU run pays them; the cell's first group and
the run's one-time setup (plugins, tokenizer, attach checks) are left out. As wall ms, as CPU ms of this process (all
threads: ``time.process_time``, which a loaded machine disturbs less), and as ``idle_ms``: from one request's (group's)
last recorded answer to the next one's first send, the time an engine would sit idle. ``ratio``: plain / evalhost
wall time (the issue's tokens/s ratio). ``--latency-ms`` makes the server answer after that long (concurrent
requests wait together, as on an engine), a GPU-like shape.

The fake server also keeps every distinct request body shape (keys and values other than ``prompt``), so the JSON
line says exactly what evalhost asks the server for beyond the plain client. ``--profile DIR`` runs one more
evalhost repetition of each mode under yappi (all threads; ``pip install yappi``) and writes the top functions.
Prints ONE JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fake_engine_server import MODEL_NAME, start_server  # noqa: E402
from common import attached_study  # noqa: E402

SEED = 42


# -- the plain client -----------------------------------------------------------------------------------------
def payload(prompt, max_tokens: int) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens,
            "seed": SEED, "return_token_ids": True}


def plain_solo(url: str, prompts: list[str], max_tokens: int) -> dict:
    import httpx

    tokens = 0
    with httpx.Client(timeout=600) as client:
        client.get(url + "/health")  # the connection is open before the clock starts, as evalhost's is
        spans = []
        w0, c0 = time.perf_counter(), time.process_time()
        for p in prompts:
            sent = time.time()
            r = client.post(url + "/v1/completions", json=payload(p, max_tokens))
            r.raise_for_status()
            tokens += len(r.json()["choices"][0]["token_ids"])
            spans.append((sent, time.time()))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"units": len(prompts), "tokens": tokens, "wall_ms": 1000 * wall / len(prompts),
            "cpu_ms": 1000 * cpu / len(prompts), "idle_ms": idle_ms(spans)}


def plain_synchronized(url: str, groups: list[list[str]], max_tokens: int, pools: int = 1) -> dict:
    """``pools`` > 1: the requests spread over that many ``httpx.AsyncClient`` in turn, as evalhost's async shell
    now does (httpcore's pool costs time quadratic in the requests it holds)."""
    import httpx

    async def run() -> dict:
        tokens = 0
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        clients = [httpx.AsyncClient(timeout=600, limits=limits) for _ in range(pools)]
        turn = iter(range(10**9))
        try:
            async def one(p: str) -> int:
                client = clients[next(turn) % pools]
                r = await client.post(url + "/v1/completions", json=payload(p, max_tokens))
                r.raise_for_status()
                return len(r.json()["choices"][0]["token_ids"])

            await asyncio.gather(*(one(p) for p in groups[0]))  # warm connections, untimed
            spans = []
            w0, c0 = time.perf_counter(), time.process_time()
            for prompts in groups:
                sent = time.time()
                tokens += sum(await asyncio.gather(*(one(p) for p in prompts)))
                spans.append((sent, time.time()))
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        finally:
            for client in clients:
                await client.aclose()
        return {"units": len(groups), "tokens": tokens, "wall_ms": 1000 * wall / len(groups),
                "cpu_ms": 1000 * cpu / len(groups), "idle_ms": idle_ms(spans)}

    return asyncio.run(run())


def idle_ms(spans: list[tuple[float, float]]) -> float:
    """Mean ms from one request's (group's) last answer to the next one's first send: the time a GPU would idle."""
    spans = sorted(spans)
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    return 1000 * statistics.fmean(gaps) if gaps else 0.0


# -- evalhost -------------------------------------------------------------------------------------------------
def write_study(root: Path, name: str, url: str, model_path: str, items, batch_size: int | None,
                max_tokens: int) -> Path:
    dispatcher = "" if batch_size is None else f"""
[[dispatchers]]
name = "synchronized"
batch_sizes = [{batch_size}]
"""
    return attached_study(root, name, url, model_path, items, max_tokens, dispatcher, SEED)


def evalhost_run(study_path: Path, dispatcher: str, cache_dir: Path) -> dict:
    """One run_study; host ms per group of ``dispatcher``'s cell, from the gaps between consecutive groups."""
    import evalhost.runner as runner
    from evalhost.study import load_study

    os.environ["EVALHOST_SOLO_CACHE_DIR"] = str(cache_dir)
    marks: list[tuple[str, float, float, int]] = []
    original = runner.build_records

    def marked(study, run_id, event, fid, scorers):
        marks.append((event.job.dispatcher.label, time.perf_counter(), time.process_time(),
                      sum(1 for _, role in event.job.members if role == "target")))
        return original(study, run_id, event, fid, scorers)

    runner.build_records = marked
    try:
        w0 = time.perf_counter()
        run_study = runner.run_study
        run_dir = run_study(load_study(study_path), progress=False, report=False, out=lambda s: None)
        wall = time.perf_counter() - w0
    finally:
        runner.build_records = original
    gaps = [(b[1] - a[1], b[2] - a[2]) for a, b in zip(marks, marks[1:]) if a[0] == b[0] == dispatcher]
    from evalhost.records import iter_records

    groups: dict[str, list[float]] = {}
    for r in iter_records(Path(run_dir) / "records.jsonl"):
        if r["dispatcher"] == dispatcher:
            g = groups.setdefault(r["group_id"], [float("inf"), 0.0])
            g[0], g[1] = min(g[0], r["timings"]["sent"]), max(g[1], r["timings"]["finished"])
    return {"units": len(gaps), "wall_ms": 1000 * statistics.fmean(g[0] for g in gaps),
            "cpu_ms": 1000 * statistics.fmean(g[1] for g in gaps), "idle_ms": idle_ms(list(map(tuple, groups.values()))),
            "run_wall_s": wall, "run_dir": str(run_dir)}


def profile(study: Path, dispatcher: str, cache: Path, out: Path, top: int = 40) -> list[dict]:
    import yappi

    yappi.set_clock_type("cpu")
    yappi.clear_stats()
    yappi.start(builtins=False)
    try:
        evalhost_run(study, dispatcher, cache)
    finally:
        yappi.stop()
    stats = yappi.get_func_stats()
    stats.sort("ttot", "desc")
    with open(out, "w") as fh:
        stats.print_all(out=fh, columns={0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 9), 3: ("ttot", 9)})
    rows = [{"function": f"{Path(s.module).name}:{s.lineno}({s.name})", "calls": s.ncall,
             "ttot_s": round(s.ttot, 4), "tsub_s": round(s.tsub, 4)} for s in stats[:top]]
    yappi.clear_stats()
    return rows


def summarize(paths: list[str]) -> dict:
    """Medians over every repetition of the result files given, per ``label`` (e.g. before / after) and
    ``latency_ms``: the A/B summary committed as ``bench/results/cpu-host-overhead-fake.json``."""
    by: dict[tuple, dict] = {}
    for path in paths:
        r = json.loads(Path(path).read_text())
        for mode in ("solo", "synchronized"):
            if mode not in r:
                continue
            cell = by.setdefault((r["latency_ms"], mode, r["label"]), {"files": [], "load_avg_1m": []})
            cell["files"].append(Path(path).name)
            cell["load_avg_1m"].append(r["load_avg_1m"])
            for fig in ("wall_ms", "cpu_ms", "idle_ms"):
                for plain, ours in r[mode][fig]["per_rep"]:
                    cell.setdefault(fig, {"plain": [], "evalhost": []})
                    cell[fig]["plain"].append(plain)
                    cell[fig]["evalhost"].append(ours)
                if "plain16" in r[mode]:
                    cell[fig].setdefault("plain16", []).extend(r[mode]["plain16"][fig]["per_rep"])
    out: dict = {"bench": "host_overhead_fake summary", "unit": {"solo": "ms per request", "synchronized":
                 "ms per group"}, "cells": []}
    for (latency, mode, label), cell in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]))):
        row = {"latency_ms": latency, "mode": mode, "label": label, "files": cell["files"],
               "reps": len(cell["wall_ms"]["plain"]), "load_avg_1m": cell["load_avg_1m"]}
        for fig in ("wall_ms", "cpu_ms", "idle_ms"):
            row[fig] = {k: round(statistics.median(v), 3) for k, v in cell[fig].items()}
        for ref in ("plain", "plain16"):
            if ref in cell["wall_ms"]:
                row["ratio" if ref == "plain" else "ratio_vs_plain16"] = round(statistics.median(
                    p / o for p, o in zip(cell["wall_ms"][ref], cell["wall_ms"]["evalhost"])), 4)
        out["cells"].append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256, help="tokens per answer (and max_tokens)")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="the fake server answers after this long (an engine's time; 0: at once, all host time)")
    ap.add_argument("--prompts", type=int, default=288)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--modes", default="solo,synchronized", help="which passes to run (comma-separated)")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct", help="model path (its tokenizer renders)")
    ap.add_argument("--profile", default=None, help="directory for one yappi profile per mode")
    ap.add_argument("--label", default=None, help="a name for this code state (e.g. before / after)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize", nargs="+", default=None, metavar="RESULT.json",
                    help="no run: medians over the repetitions of these result files, per label and latency")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if args.summarize:
        line = json.dumps(summarize(args.summarize), sort_keys=True)
        print(line)
        if args.out:
            Path(args.out).write_text(line + "\n", encoding="utf-8")
        return 0

    from common import bench_items, context, emit, log, machine, median, model_spec

    from evalhost.plan import make_groups
    from evalhost.plugins.backends.vllm import VLLMBackend

    root = Path(tempfile.mkdtemp(prefix="bench-host-fake-"))
    proc, url = start_server(args.tokens, root, args.latency_ms)
    try:
        ctx = context(root)
        attached = VLLMBackend(model_spec(args.model), {"url": url}, ctx)
        attached.start()
        items = bench_items(args.prompts)
        rendered = [attached.render(it) for it in items]
        by_id = dict(zip((it.id for it in items), rendered))
        groups = [[by_id[it.id] for it, _ in g] for g in make_groups(items, args.batch_size, SEED, "bench")]
        model_path = attached.model_path()
        attached.close()
        solo_study = write_study(root, "solo_only", url, model_path, items, None, args.tokens)
        sync_study = write_study(root, "synchronized", url, model_path, items, args.batch_size, args.tokens)
        sync_cache = root / "cache-sync"

        log("warm-up: each pass once (fills the synchronized study's solo cache)")
        evalhost_run(sync_study, "synchronized", sync_cache)
        passes = {"plain_solo": lambda rep: plain_solo(url, rendered, args.tokens),
                  "evalhost_solo": lambda rep: evalhost_run(solo_study, "solo", root / f"cache-solo-{rep}"),
                  "plain_synchronized": lambda rep: plain_synchronized(url, groups, args.tokens),
                  "evalhost_synchronized": lambda rep: evalhost_run(sync_study, "synchronized", sync_cache),
                  "plain16_synchronized": lambda rep: plain_synchronized(url, groups, args.tokens, pools=16)}
        passes = {k: f for k, f in passes.items() if k.split("_", 1)[1] in modes}
        for name, run in passes.items():
            if name != "evalhost_synchronized":
                run("warm")
        import httpx

        httpx.get(url + "/bodies")  # (reset is not needed: the shapes are what counts)

        rows = []
        for rep in range(args.reps):
            row = {name: run(rep) for name, run in passes.items()}
            rows.append(row)
            log(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{k} {v['wall_ms']:.2f} ms wall {v['cpu_ms']:.2f} cpu {v['idle_ms']:.2f} idle" for k, v in row.items()))
        bodies = httpx.get(url + "/bodies").json()
        profiles = None
        if args.profile:
            pdir = Path(args.profile)
            pdir.mkdir(parents=True, exist_ok=True)
            profiles = {}
            if "solo" in modes:
                profiles["solo"] = profile(solo_study, "solo", root / "cache-profile", pdir / "solo.txt")
            if "synchronized" in modes:
                profiles["synchronized"] = profile(sync_study, "synchronized", sync_cache, pdir / "synchronized.txt")
    finally:
        proc.kill()
        proc.wait()

    result = {"bench": "host_overhead_fake", "label": args.label, **machine(), "latency_ms": args.latency_ms,
              "prompts": args.prompts,
              "tokens": args.tokens, "batch_size": args.batch_size, "groups": len(groups), "reps": args.reps,
              "load_avg_1m_end": round(os.getloadavg()[0], 2)}
    for mode, unit in (("solo", "request"), ("synchronized", "group")):
        if mode not in modes:
            continue
        res = {"unit": unit,
               # tokens/s of evalhost / the plain client's, the goal figure (>= 0.97 on the GPU)
               "ratio": round(median([r[f"plain_{mode}"]["wall_ms"] / r[f"evalhost_{mode}"]["wall_ms"] for r in rows]),
                              4)}
        for fig in ("wall_ms", "cpu_ms", "idle_ms"):
            plain = median([r[f"plain_{mode}"][fig] for r in rows])
            ours = median([r[f"evalhost_{mode}"][fig] for r in rows])
            res[fig] = {"plain": round(plain, 3), "evalhost": round(ours, 3), "extra": round(ours - plain, 3),
                        "per_rep": [[round(r[f"plain_{mode}"][fig], 3), round(r[f"evalhost_{mode}"][fig], 3)]
                                    for r in rows]}
        if f"plain16_{mode}" in rows[0]:  # the plain client with evalhost's 16 pools: the tighter reference
            res["plain16"] = {fig: {"median": round(median([r[f"plain16_{mode}"][fig] for r in rows]), 3),
                                    "per_rep": [round(r[f"plain16_{mode}"][fig], 3) for r in rows]}
                              for fig in ("wall_ms", "cpu_ms", "idle_ms")}
            res["ratio_vs_plain16"] = round(median([r[f"plain16_{mode}"]["wall_ms"] / r[f"evalhost_{mode}"]["wall_ms"]
                                                    for r in rows]), 4)
        result[mode] = res
    plain_keys = set(payload("x", args.tokens))
    shapes = [dict(json.loads(k), count=v) for k, v in bodies.items()]
    result["request_bodies"] = shapes
    result["evalhost_keys_beyond_plain"] = sorted({k for s in shapes for k in s if k != "count"} - plain_keys)
    if profiles is not None:
        result["profile_top"] = profiles
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
