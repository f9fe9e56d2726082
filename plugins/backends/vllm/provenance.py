"""What the records say about a ``vllm`` backend's stack.

:meth:`Provenance.fingerprint` identifies the stack (versions, device, server arguments without the port, attention
backend, environment flags, token-id source, chat template, replicas); it keys the solo cache and must survive
``--resume``, so nothing that changes from one start to the next belongs in it.  :meth:`Provenance.evidence` holds
exactly that: this run's port, startup times and restarts, and per replica for a solo fleet.
"""
from __future__ import annotations

import importlib.metadata as md
import platform
from typing import Any

from .probe import device_name, vllm_version


def without_port(args) -> list[str]:
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


class Provenance:
    """Mixed into ``VLLMBackend``."""

    def fingerprint(self) -> dict[str, Any]:
        found = vllm_version()
        fp: dict[str, Any] = {
            "backend": self.plugin_name,
            "python": platform.python_version(),
            "vllm": f"{found[0]}=={found[1]}" if found else None,
            "server_version": self._server_version,
            "mode": "managed" if self.managed else "attached",
            "served_model": self.served_model,
            "server_args": without_port(self._server_args) if self.managed else None,
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
        fp["device"] = device_name()
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
