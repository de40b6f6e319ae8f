"""Quantization-aware LoRA: train the factors A (r, in) and B (out, r) *as* the 1-bit tensors that ship.

Each LoRA factor keeps a latent fp32 weight W and a learned scale (per matrix, or per rank component). The
forward pass uses

    Q = sign(W) * fp16(scale)          sign(0) = +1, exactly bitdelta/pack.py's convention

so the model trained and evaluated here *is* the `lora1` artifact: packing sign(W) and the scale loses nothing
(tests/test_qat.py checks the served factors bit for bit). Gradients pass straight through the sign to W
(the straight-through estimator) and reach the scale as sum(sign * dL/dQ); the fp16 rounding of the scale is
straight-through as well. Scales start at mean |W| (the least-squares scale, see bitdelta/quant.py).

peft builds the LoRA layers; this module only puts a torch parametrization on their weights, and removes it
(leaving Q in place) before the adapter is saved: the saved adapter holds the dequantised factors, which the
post-hoc `lora1` compression reproduces exactly (mean |±s| = s, the signs are those of ±s).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ownlm.bitdelta.delta import LORA_A, LORA_B, entry_granularity
from ownlm.bitdelta.quant import expand_scales, init_scales


class SignTimesScale(nn.Module):
    """Parametrization W -> sign(W) * fp16(scale) with straight-through gradients (see module doc)."""

    def __init__(self, latent: torch.Tensor, granularity: str):
        super().__init__()
        self.granularity = granularity  # 'row' | 'col' | 'matrix' of the (rows, cols) factor
        self.scale = nn.Parameter(init_scales(latent, granularity))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        signs = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
        s = self.scale + (self.scale.to(torch.float16).float() - self.scale).detach()  # fp16 value, fp32 gradient
        q = signs * expand_scales(s, self.granularity)
        return q + (w - w.detach())  # value q; dQ/dW = 1 (straight through)


def quantize_lora(model: nn.Module, scales: str = "matrix") -> list[nn.Module]:
    """Put SignTimesScale on every LoRA factor weight of a peft model; returns the factor modules changed.

    `scales`: 'matrix' (one scale per factor) or 'rank' (one per rank component: rows of A, columns of B), as
    bitdelta's CompressConfig.scales. Call after any initial weights were loaded (the scale starts from them).
    """
    changed = []
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0].rpartition(".")[2]
        if parent in (LORA_A, LORA_B) and isinstance(module, nn.Linear):  # peft: ...lora_A.default
            key = f"x.{parent}"
            param = SignTimesScale(module.weight.detach(), entry_granularity(scales, key))
            parametrize.register_parametrization(module, "weight", param)
            changed.append(module)
    if not changed:
        raise ValueError("no LoRA factors found to quantize (is this a peft LoRA model?)")
    return changed


def freeze_quantized(modules: list[nn.Module]) -> None:
    """Replace each parametrized weight by its 1-bit value sign(W) * fp16(scale), as a plain parameter."""
    for module in modules:
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
