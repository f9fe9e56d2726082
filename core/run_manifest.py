"""A run directory's ``manifest.json`` as the driver keeps it: what a new run writes (:func:`new_manifest`), what a
resume accepts (:func:`open_resume`), and how a started backend's fingerprint is recorded (:func:`note_backend`).

The driver (:func:`evalhost.runner.run_study`) is the only writer; it writes the manifest whole and atomically
(:func:`evalhost.records.write_json_atomic`) after each change, and its final ``status`` after the data.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import RunError, UserError
from .rundir import MANIFEST, RunDir
from .types import sha256_text

if TYPE_CHECKING:
    from .plan import Plan
    from .registry import Registry
    from .run_worker import BackendStarted
    from .study import Study

#: the manifest's containers and their types (a resume refuses a manifest edited into another shape)
MANIFEST_SHAPE = {"fingerprints": dict, "evidence": dict, "backend_fingerprints": dict, "resumes": list}
#: environment variables that change numerics or plugin loading, recorded in the manifest (by prefix)
ENV_PREFIXES = ("VLLM_BATCH_INVARIANT", "CUBLAS_", "VLLM_ATTENTION", "EVALHOST_PLUGINS")


def fingerprint_id(fp: dict[str, Any]) -> str:
    """The 16-hex-digit id of a fingerprint (a record's ``fingerprint_id``, a key of the manifest's
    ``fingerprints``)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]


def host_fingerprint() -> dict[str, Any]:
    """Facts of the driver's machine (the backend adds its own stack: versions, device, server args)."""
    return {"python": platform.python_version(), "platform": platform.platform(), "evalhost": __version__}


def new_manifest(study: "Study", registry: "Registry", plan: "Plan", limit: int | None) -> dict[str, Any]:
    """The manifest of a new run, before any backend has started."""
    return {
        "study": study.name, "study_file": str(study.path) if study.path else None,
        "study_sha256": sha256_text(study.text), "created": time.time(), "host": host_fingerprint(),
        "plugins": registry.plugins, "fingerprints": {}, "evidence": {}, "backend_fingerprints": {},
        "env": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)},
        "plan": {"generations": plan.n_generations(), "cells": len(plan.cells())}, "limit": limit,
        "flip_on": study.flip_on,
    }


def open_resume(study: "Study", run_dir: Path) -> dict[str, Any]:
    """The manifest of ``run_dir`` if ``study`` may resume it; one sentence (exit 2) if it is no run directory, its
    manifest was edited into another shape, or it was started from another study file."""
    manifest = RunDir(run_dir).read_json(MANIFEST, default=None) if run_dir.is_dir() else None
    if manifest is None:
        raise UserError(f"{run_dir} is not an evalhost run directory (no {MANIFEST}); pass the directory "
                        f"printed by `evalhost run`")
    for field, typ in MANIFEST_SHAPE.items():
        if not isinstance(manifest.setdefault(field, typ()), typ):
            raise UserError(f"{run_dir / MANIFEST} has a {type(manifest[field]).__name__} as '{field}', not a "
                            f"{typ.__name__}; the file was edited by hand - restore it from the run")
    if manifest.get("study_sha256") != sha256_text(study.text):
        raise UserError(f"{run_dir} was started from a different study file (its copy is {run_dir}/study.toml); "
                        f"resume with that file or start a new run without --resume")
    return manifest


def note_backend(manifest: dict[str, Any], event: "BackendStarted") -> str:
    """Record a started backend's fingerprint and evidence in ``manifest``; returns the fingerprint id. A resume
    whose stack changed since the run started (another engine, plugin version, server argument) stops the run."""
    fid = fingerprint_id(event.fingerprint)
    old = manifest["backend_fingerprints"].get(event.label)
    if old and old != fid:
        raise RunError(f"the stack of backend '{event.label}' changed since this run started (fingerprint "
                       f"{old} -> {fid}); start a new run instead of resuming this one")
    manifest["fingerprints"][fid] = event.fingerprint
    manifest["backend_fingerprints"][event.label] = fid
    if event.evidence:
        manifest["evidence"][event.label] = event.evidence
    return fid
