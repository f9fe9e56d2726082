"""Solo-result cache: the solo baseline (batch size 1, one prompt at a time) is most of a study's bill, and it does
not depend on the study. A solo generation is reused when the model, the backend's full stack fingerprint, the
exact prompt text and the sampling parameters are all the same; a changed fingerprint (new vLLM, other GPU, other
server args) changes the key, so stale entries are never used. Only repeat 0 is served from the cache: repeats exist
to measure run-to-run nondeterminism and always run.

Entries live under ``$EVALHOST_SOLO_CACHE_DIR`` or ``$EVALHOST_CACHE/solo/`` (see :func:`evalhost.models.cache_dir`), one JSON file each, written
atomically. ``evalhost run --no-solo-cache`` (or ``EVALHOST_SOLO_CACHE=0``) turns it off.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .types import Generation, Sampling


def enabled() -> bool:
    return os.environ.get("EVALHOST_SOLO_CACHE", "1") not in ("0", "false", "no")


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
        tmp.write_text(json.dumps(asdict(gen)), encoding="utf-8")
        os.replace(tmp, path)
