"""The in-memory delta: what compress produces, format.py stores and apply.py merges into a base.

Keys of `quantised`:
- mode 'dense': the parameter name of a target weight, e.g. 'model.layers.0.self_attn.q_proj.weight';
  the delta of that weight is dequantise(q).
- mode 'lora1': '<module path>.lora_A' (r, in_features) and '<module path>.lora_B' (out_features, r), e.g.
  'model.layers.0.self_attn.q_proj.lora_A'; the delta of '<module path>.weight' is
  (lora_alpha / lora_r) * dequantise(B) @ dequantise(A), exactly as peft merges plain LoRA.
`full` (dense only): parameter name -> W_ft - W_base in full precision, for parameters outside the 1-bit path
(embeddings, norms, biases, an untied LM head) that changed.
`param_shapes`: every base parameter the delta changes -> the shape it must have in the base.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ownlm.bitdelta.quant import QuantTensor, storage_dtype

LORA_A, LORA_B = "lora_A", "lora_B"


def entry_granularity(granularity: str, key: str) -> str:
    """Granularity of one quantised entry: 'rank' means rows of A (r, in) and columns of B (out, r), i.e.
    one scale per rank component; the others apply to every matrix alike."""
    if granularity != "rank":
        return granularity
    return "row" if key.endswith(f".{LORA_A}") else "col"


@dataclass
class Delta:
    mode: str  # 'lora1' | 'dense'
    granularity: str  # 'row' | 'col' | 'matrix'
    base_sha256: str
    target_modules: tuple[str, ...]
    quantised: dict[str, QuantTensor]
    param_shapes: dict[str, tuple[int, ...]]
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_r: int | None = None
    lora_alpha: float | None = None

    @property
    def bits(self) -> int:
        return 1

    @property
    def lora_scaling(self) -> float:
        """peft's scaling of plain LoRA: alpha / r."""
        assert self.lora_r is not None and self.lora_alpha is not None, "lora1 delta without r/alpha"
        return float(self.lora_alpha) / self.lora_r

    @property
    def nbytes(self) -> int:
        """Bytes of tensor payload: packed signs + scales + full-precision entries."""
        return sum(q.nbytes for q in self.quantised.values()) + sum(
            t.numel() * t.element_size() for t in self.full.values()
        )

    def lora_pairs(self) -> dict[str, tuple[QuantTensor, QuantTensor]]:
        """lora1: '<module path>.weight' -> (A, B)."""
        pairs = {}
        for key in self.quantised:
            module, _, factor = key.rpartition(".")
            if factor == LORA_A:
                pairs[f"{module}.weight"] = (self.quantised[key], self.quantised[f"{module}.{LORA_B}"])
        return pairs

    def with_scales(self, scales: dict[str, torch.Tensor]) -> Delta:
        """A copy whose quantised entries carry these scales (same keys, same shapes), signs shared."""
        quantised = {k: replace(q, scales=scales.get(k, q.scales)) for k, q in self.quantised.items()}
        return replace(self, quantised=quantised)


def cast_scales(delta: Delta, choice: str) -> Delta:
    """Round every scale to its storage dtype ('auto' | 'float16' | 'float32') now, so that what is measured
    before saving is exactly what is stored."""
    dtype = storage_dtype([q.scales for q in delta.quantised.values()], choice)
    return delta.with_scales({k: q.scales.to(dtype) for k, q in delta.quantised.items()})
