"""Host overhead: generated tokens/s of evalhost's dispatch path vs a plain httpx client, same server, same prompts,
same groups, same sampling. Goal: evalhost within 3% of the plain client.

    python bench/host_overhead.py --url http://127.0.0.1:8000          # a running vLLM server
    python bench/host_overhead.py --max-model-len 512                  # or let the vllm backend start one

Per repetition (``--reps``, interleaved so that background load hits both alike):

* plain ``prompt_list``: for each group, ONE ``/v1/completions`` request whose ``prompt`` is the group's list
  (``httpx.Client``), groups one after another;
* plain ``synchronized``: for each group, its prompts as concurrent single-prompt requests (``httpx.AsyncClient``,
  ``asyncio.gather``), groups one after another;
* evalhost: ``evalhost.runner.run_study`` on a generated study (the same prompts as a jsonl task, dispatchers
  ``prompt_list`` and ``synchronized`` at ``--batch-size``, backend ``vllm`` attached with ``url``). Its solo cell
  (every study has one) is served from a private solo cache filled by an untimed warm-up run.

The groups are evalhost's own (:func:`evalhost.plan.make_groups`, study seed 42). Throughput = generated tokens /
(last group's ``finished`` - first group's ``sent``) per cell, so it includes evalhost's work between groups
(scoring, records, fsync, evidence, the /metrics sampler, off with ``--no-metrics``); the end-to-end figure adds
the run's one-time setup (study parsing, plugin loading, tokenizer, attach checks, manifest). ``--profile`` runs
one more evalhost repetition under cProfile and lists the top functions. Prints ONE JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

from common import (add_server_args, attached_study, bench_items, context, emit, log, machine, median, model_spec,
                    server_options)

SEED = 42


def payload(model: str, prompt, max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens,
            "seed": SEED, "return_token_ids": True}


def plain_prompt_list(url: str, model: str, groups: list[list[str]], max_tokens: int) -> tuple[int, float]:
    import httpx

    tokens, first, last = 0, None, None
    with httpx.Client(timeout=600) as client:
        for prompts in groups:
            sent = time.time()
            r = client.post(url + "/v1/completions", json=payload(model, prompts, max_tokens))
            r.raise_for_status()
            last = time.time()
            first = first or sent
            tokens += sum(len(c["token_ids"]) for c in r.json()["choices"])
    return tokens, last - first


def plain_synchronized(url: str, model: str, groups: list[list[str]], max_tokens: int) -> tuple[int, float]:
    import httpx

    async def run() -> tuple[int, float]:
        tokens, first, last = 0, None, None
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            async def one(p: str):
                r = await client.post(url + "/v1/completions", json=payload(model, p, max_tokens))
                r.raise_for_status()
                return len(r.json()["choices"][0]["token_ids"])

            for prompts in groups:
                sent = time.time()
                counts = await asyncio.gather(*(one(p) for p in prompts))
                last = time.time()
                first = first or sent
                tokens += sum(counts)
        return tokens, last - first

    return asyncio.run(run())


def write_study(root: Path, url: str, model_path: str, items, batch_size: int, max_tokens: int,
                metrics: bool = True) -> Path:
    dispatchers = f"""
[[dispatchers]]
name = "prompt_list"
batch_sizes = [{batch_size}]

[[dispatchers]]
name = "synchronized"
batch_sizes = [{batch_size}]
[dispatchers.options]
metrics = {"true" if metrics else "false"}
"""
    return attached_study(root, "host_overhead", url, model_path, items, max_tokens, dispatchers, SEED)


def evalhost_run(study_path: Path) -> tuple[dict, float]:
    """One run_study; per dispatcher: (tokens, span from first sent to last finished); and the run's wall time."""
    from evalhost.records import read_records
    from evalhost.runner import run_study
    from evalhost.study import load_study

    t0 = time.monotonic()
    run_dir = run_study(load_study(study_path), progress=False, report=False, out=lambda s: None)
    wall = time.monotonic() - t0
    cells: dict[str, dict] = {}
    for r in read_records(run_dir / "records.jsonl"):
        if r["condition"] != "batch":
            continue
        c = cells.setdefault(r["dispatcher"], {"tokens": 0, "sent": [], "finished": []})
        c["tokens"] += len(r["output_token_ids"])
        c["sent"].append(r["timings"]["sent"])
        c["finished"].append(r["timings"]["finished"])
    return {d: (c["tokens"], max(c["finished"]) - min(c["sent"])) for d, c in cells.items()}, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--url", default=None, help="a running vLLM server (else one is started)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="one more evalhost repetition under cProfile")
    ap.add_argument("--no-metrics", action="store_true",
                    help="synchronized dispatcher option metrics = false (no /metrics sampling while a group runs)")
    args = ap.parse_args()

    from evalhost.plan import make_groups
    from evalhost.plugins.backends.vllm import VLLMBackend

    root = Path(args.run_dir or tempfile.mkdtemp(prefix="bench-host-overhead-"))
    ctx = context(root)
    os.environ["EVALHOST_SOLO_CACHE_DIR"] = str(root / "solo-cache")  # private: never the user's cache
    os.environ.setdefault("EVALHOST_SOLO_CACHE", "1")
    model = model_spec(args.model)
    managed = None
    url = args.url
    try:
        if url is None:
            managed = VLLMBackend(model, {**server_options(args), "label": "host-overhead"}, ctx)
            managed.start()
            url = managed.base_url
        attached = VLLMBackend(model, {"url": url}, ctx)
        attached.start()
        served = attached.served_model
        items = bench_items(args.prompts)
        rendered = {it.id: attached.render(it) for it in items}
        groups = [[rendered[it.id] for it, _ in g] for g in make_groups(items, args.batch_size, SEED, "bench")]
        study = write_study(root, url.rstrip("/"), attached.model_path(), items, args.batch_size, args.max_tokens,
                            metrics=not args.no_metrics)
        attached.close()

        log("warm-up: one evalhost run (fills the private solo cache) and one plain pass of each kind")
        evalhost_run(study)
        plain_prompt_list(url, served, groups, args.max_tokens)
        plain_synchronized(url, served, groups, args.max_tokens)

        rows = []
        for rep in range(args.reps):
            pl = plain_prompt_list(url, served, groups, args.max_tokens)
            sy = plain_synchronized(url, served, groups, args.max_tokens)
            cells, wall = evalhost_run(study)
            row = {"plain_prompt_list": pl, "plain_synchronized": sy, "evalhost_prompt_list": cells["prompt_list"],
                   "evalhost_synchronized": cells["synchronized"], "evalhost_wall": wall}
            rows.append(row)
            log(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{k} {v[0] / v[1]:.1f} tok/s" for k, v in row.items() if isinstance(v, tuple)))

        profile_top = None
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            evalhost_run(study)
            prof.disable()
            buf = io.StringIO()
            stats = pstats.Stats(prof, stream=buf).sort_stats("cumulative")
            stats.print_stats(25)
            print(buf.getvalue(), file=sys.stderr)
            profile_top = [{"function": f"{Path(fn[0]).name}:{fn[1]}({fn[2]})", "cumtime_s": round(v[3], 3),
                            "tottime_s": round(v[2], 3), "calls": v[1]}
                           for fn, v in sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:15]]
    finally:
        if managed is not None:
            managed.close()

    def tok_s(key: str) -> float:
        return median([row[key][0] / row[key][1] for row in rows])

    result = {"bench": "host_overhead", **machine(), "url_given": args.url is not None, "prompts": args.prompts,
              "max_tokens": args.max_tokens, "batch_size": args.batch_size, "groups": len(groups), "reps": args.reps,
              "tokens_per_pass": rows[0]["plain_prompt_list"][0],
              "synchronized_metrics_sampling": not args.no_metrics}
    for mode in ("prompt_list", "synchronized"):
        plain, ours = tok_s(f"plain_{mode}"), tok_s(f"evalhost_{mode}")
        result[mode] = {"plain_tok_s": round(plain, 2), "evalhost_tok_s": round(ours, 2),
                        "ratio": round(ours / plain, 4),
                        "per_rep_ratio": [round((r[f"evalhost_{mode}"][0] / r[f"evalhost_{mode}"][1])
                                                / (r[f"plain_{mode}"][0] / r[f"plain_{mode}"][1]), 4) for r in rows]}
    # end to end: the whole run_study (one-time setup, the cached solo cell, both cells) vs the plain passes
    result["end_to_end"] = {
        "evalhost_wall_s": round(median([r["evalhost_wall"] for r in rows]), 3),
        "plain_s": round(median([r["plain_prompt_list"][1] + r["plain_synchronized"][1] for r in rows]), 3),
        "evalhost_outside_cells_s": round(median([r["evalhost_wall"] - r["evalhost_prompt_list"][1]
                                                  - r["evalhost_synchronized"][1] for r in rows]), 3),
    }
    result["within_3_percent"] = all(result[m]["ratio"] >= 0.97 for m in ("prompt_list", "synchronized"))
    if profile_top is not None:
        result["profile_top"] = profile_top
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
