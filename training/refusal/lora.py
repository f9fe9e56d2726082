"""A hand-written LoRA for the attention projections (plain torch; no peft at training or run time).

The adapter file is safetensors with, per adapted linear layer ``PREFIX`` (e.g. ``model.layers.3.self_attn.q_proj``),
``PREFIX.lora_A`` (rank x in) and ``PREFIX.lora_B`` (out x rank); the header's metadata holds ``format``
(``evalhost-lora-v1``), ``rank``, ``alpha``, ``targets`` and ``base``. Merging is ``W += (alpha / rank) * B @ A``,
which is what ``evalhost.models.merge_adapter`` does at load time.
"""
from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FORMAT = "evalhost-lora-v1"


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T`` with A (rank x in), B (out x rank); B starts at zero, so training starts at base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        bound = 1.0 / math.sqrt(base.in_features)  # the bound of kaiming_uniform_(a=sqrt(5)), as in nn.Linear
        with torch.no_grad():
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def inject(model: nn.Module, rank: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    """Wrap every target projection in place (in module order, so the init is fixed by ``seed``); freeze the rest."""
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    wrapped: dict[str, LoRALinear] = {}
    for name, module in list(model.named_modules()):
        for child in TARGETS:
            layer = getattr(module, child, None)
            if isinstance(layer, nn.Linear):
                lora = LoRALinear(layer, rank, alpha, generator).to(layer.weight.device)
                setattr(module, child, lora)
                wrapped[f"{name}.{child}"] = lora
    if not wrapped:
        raise ValueError(f"no {TARGETS} linear layers found")
    return wrapped


def adapter_tensors(wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, lora in sorted(wrapped.items()):
        out[f"{prefix}.lora_A"] = lora.lora_A.detach().to("cpu", torch.float32).contiguous()
        out[f"{prefix}.lora_B"] = lora.lora_B.detach().to("cpu", torch.float32).contiguous()
    return out


def save_adapter(path, tensors: dict[str, torch.Tensor], rank: int, alpha: float, base: str) -> None:
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "rank": str(rank), "alpha": str(alpha), "targets": ",".join(TARGETS), "base": base}
    save_file(tensors, str(path), metadata=meta)
