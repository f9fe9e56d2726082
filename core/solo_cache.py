"""Solo-result cache: the solo baseline (batch size 1, one prompt at a time) is most of a study's bill, and it does
not depend on the study. A solo generation is reused when the model, the backend's full stack fingerprint, the
exact prompt text and the sampling parameters are all the same; a changed fingerprint (new vLLM, other GPU, other
server args) changes the key, so stale entries are never used. Only repeat 0 is served from the cache: repeats exist
to measure run-to-run nondeterminism and always run.

The key's stack (:func:`solo_stack`) also holds the evalhost version and the backend plugin's distribution and
version (from the registry), so installing another version of a backend plugin never reuses the solos of the old
one, even when the plugin's own ``fingerprint()`` did not change. The other plugins a run uses (dispatchers,
scorers, task sources; :func:`plugins_in_use`) are named in the manifest's fingerprint but not in the key: a solo
generation does not depend on them, and studies that share a backend share its solos.

Entries live under ``$EVALHOST_SOLO_CACHE_DIR`` or ``$EVALHOST_CACHE/solo/`` (see :func:`evalhost.models.cache_dir`), one JSON file each, written
atomically. ``evalhost run --no-solo-cache`` (or ``EVALHOST_SOLO_CACHE=0``) turns it off.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .scoring import scorer_for
from .types import Generation, Sampling

if TYPE_CHECKING:
    from .plan import BackendWork
    from .registry import Registry


def enabled() -> bool:
    return os.environ.get("EVALHOST_SOLO_CACHE", "1") not in ("0", "false", "no")


def _named(registry: "Registry", kind: str, name: str | None) -> str | None:
    """``distribution==version`` of the plugin ``name`` (bare or ``distribution:name``) picks, else None."""
    if not name:
        return None
    find = getattr(registry, "find", None)
    entry = find(kind, name) if find is not None else registry.entries.get((kind, name))
    return f"{entry.distribution}=={entry.version}" if entry is not None else None


def _scheme(source: str, registry: "Registry") -> str | None:
    """The task-source name of ``scheme:location`` or ``distribution:scheme:location``."""
    parts = str(source or "").split(":")
    for n in (1, 2):
        if len(parts) > n and _named(registry, "task_source", ":".join(parts[:n])) is not None:
            return ":".join(parts[:n])
    return None


def plugins_in_use(registry: "Registry", work: "BackendWork") -> dict[str, str]:
    """``{"kind:name": "distribution==version"}`` for every plugin one backend's work uses: the backend, each
    dispatcher, each scorer that scores a target (:func:`evalhost.scoring.scorer_for`; fillers are not scored) and
    each task source (the scheme of ``source``). Computed from all the work's jobs, so a resume computes the same
    dict."""
    used: set[tuple[str, str]] = {("backend", work.backend.plugin)}
    for job in work.jobs:
        used.add(("dispatcher", job.dispatcher.plugin))
        used.add(("task_source", _scheme(job.task.source, registry) or ""))
        for item, role in job.members:
            cand = item.metadata.get("candidate") or {}
            if cand.get("task_source"):
                used.add(("task_source", _scheme(cand["task_source"], registry) or ""))
            scorer = scorer_for(job.task, item)[0] if role == "target" else None
            if scorer:
                used.add(("scorer", scorer))
    out = {}
    for kind, name in sorted(used):
        named = _named(registry, kind, name)
        if named is not None:
            out[f"{kind}:{name}"] = named
    return out


def solo_stack(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The part of a backend's fingerprint that keys its solo cache: everything except the plugins that do not
    touch a solo generation (only the ``backend:*`` entry of ``plugins`` stays), plus the evalhost version."""
    plugins = fingerprint.get("plugins") or {}
    stack = {k: v for k, v in fingerprint.items() if k != "plugins"}
    stack["plugins"] = {k: v for k, v in plugins.items() if k.startswith("backend:")}
    stack.setdefault("evalhost", __version__)
    return stack


class SoloCache:
    def __init__(self, root: Path, fingerprint: dict[str, Any]) -> None:
        override = os.environ.get("EVALHOST_SOLO_CACHE_DIR")
        self.root = Path(override) if override else Path(root) / "solo"
        self.stack = json.dumps(fingerprint, sort_keys=True, default=str)

    def key(self, prompt: str, sampling: Sampling) -> str:
        blob = json.dumps([self.stack, prompt, asdict(sampling)], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, prompt: str, sampling: Sampling) -> Generation | None:
        path = self._path(self.key(prompt, sampling))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return Generation(**data)

    def put(self, prompt: str, sampling: Sampling, gen: Generation) -> None:
        if gen.attempts > 1 or gen.restarted:
            return  # only clean first-attempt generations become baselines for other runs
        path = self._path(self.key(prompt, sampling))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        # the fields as they are (asdict deep-copied every token id: 0.2 ms of a solo request's host time)
        tmp.write_text(json.dumps({f.name: getattr(gen, f.name) for f in fields(gen)}), encoding="utf-8")
        os.replace(tmp, path)
