"""What each actor asks Ray for: its backend's declared resources, as ``Actor.options`` keywords, and the refusal
of a request that no node of the cluster could ever hold (instead of waiting forever)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from evalhost.api import UserError, plugin_class, worker_context

RAY_KEYS = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}


def fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())) or "nothing"


def work_resources(work, registry=None) -> dict[str, float]:
    """What the work's backend declares (instantiated, not started, with a throw-away context)."""
    cls = registry.get("backend", work.backend.plugin) if registry else plugin_class("backend", work.backend.plugin)
    backend = cls(work.model, work.backend.options, worker_context(Path("."), log=lambda msg: None))
    out = {}
    for key, value in dict(backend.resources() or {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise UserError(f"backend '{work.backend.plugin}' declares resource {key}={value!r}; a resource must "
                            f"be a non-negative number (fix the plugin's resources())")
        if value:
            out[key] = value
    return out


def actor_options(resources: dict[str, float]) -> dict[str, Any]:
    """Backend resources -> ``Actor.options(...)`` keywords."""
    opts: dict[str, Any] = {}
    custom = {}
    for key, value in resources.items():
        if key in RAY_KEYS:
            opts[key] = value
        else:
            custom[key] = value
    if custom:
        opts["resources"] = custom
    return opts


def check_fits(ray, requests: dict[str, dict[str, float]]) -> None:
    """Refuse, instead of waiting forever, an actor that no node of the cluster could ever hold."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for label, req in requests.items():
        need = {RAY_KEYS.get(k, k): v for k, v in req.items()}
        if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
            have = "; ".join(fmt({k: v for k, v in node.items() if k in ("CPU", "GPU")}) for node in nodes)
            raise UserError(f"backend work '{label}' asks Ray for {fmt(req)}, which no node of the cluster "
                            f"has (nodes: {have or 'none'}); add a node that has it or run with --executor local")
