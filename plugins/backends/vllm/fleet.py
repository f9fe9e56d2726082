"""The fleet: option ``replicas = N`` runs N independent servers for one ``vllm`` backend.

Replica 0 is the backend itself; replicas 1..N-1 are backends of the same class with their own label, port, GPU
(option ``devices``: replica i gets ``CUDA_VISIBLE_DEVICES`` = ``devices[i % len(devices)]``) and share of
``--gpu-memory-utilization`` (the configured value divided among the replicas on the same GPU), or, with ``urls``,
their own running server.  They start one after another (two engines must not profile memory at once on one GPU)
unless ``kv_cache_memory_bytes`` is set, when they start together once replica 0 is up.

Solo prompts: :meth:`Fleet.generate_solo_many` sends each prompt alone, strictly one request in flight per replica,
on the process's one event loop.  Batch groups: :meth:`Fleet.fleet` hands the host the N replicas
(:meth:`evalhost.api.Backend.fleet`), which runs one group at a time on each.
"""
from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import VLLMBackend


class Fleet:
    """Mixed into ``VLLMBackend``, which keeps replicas 1..N-1 in ``_replicas``."""

    def starts_alongside_others(self) -> bool:
        """An attached server is already up; with ``kv_cache_memory_bytes`` the engine sizes its KV cache without
        profiling free memory, so another engine starting on the same GPU cannot disturb it."""
        return not self.managed or bool(self.options.get("kv_cache_memory_bytes"))

    def _replica_options(self, i: int) -> dict[str, Any]:
        opts = {k: v for k, v in self.options.items() if k not in ("replicas", "urls", "devices")}
        opts["label"] = f"{self.label}-r{i}"
        if self.options.get("urls"):
            opts["url"] = str(self.options["urls"][i])
        else:
            opts["gpu_memory_utilization"] = self.util_share(i)
            if self.options.get("port") is not None:
                opts["port"] = int(self.options["port"]) + i
        return opts

    def _start_fleet(self) -> None:
        n = self.n_replicas()
        while len(self._replicas) < n - 1:
            i = len(self._replicas) + 1
            replica = type(self)(self.model, self._replica_options(i), self.context)
            replica._cuda_device = self.replica_device(i)  # its CUDA_VISIBLE_DEVICES (ServerConfig.server_env)
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

    def solo_parallelism(self) -> int:
        return self.n_replicas()

    def evidence(self) -> dict[str, Any]:
        """The provenance evidence plus, for a fleet, each replica's GPU (its ``CUDA_VISIBLE_DEVICES``, None where
        it inherits this process's) and what it runs."""
        out = super().evidence()
        if "solo_fleet" in out:
            out["solo_fleet"]["cuda_visible_devices"] = [r.server_env().get("CUDA_VISIBLE_DEVICES") if r.managed
                                                         else None for r in self.replicas()]
            out["solo_fleet"]["runs"] = "solo prompts one at a time per replica; batch groups one at a time per replica"
        return out

    def fleet(self) -> list["VLLMBackend"]:
        """The replicas, for batch groups (one group at a time on each; see :meth:`evalhost.api.Backend.fleet`)."""
        return self.replicas()

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
