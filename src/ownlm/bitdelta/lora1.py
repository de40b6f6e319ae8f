"""Mode `lora1`: a peft LoRA adapter's factors A (r, in) and B (out, r) as packed signs + scales.

The loop's default, r=1 on all seven linear layers of the 135M base, is 305,280 parameters: 38,160 bytes of signs
at 1 bit, plus the scales (q/v r=8, the default before 2026-12-03: 460,800 parameters, 57,600 bytes).
Only plain LoRA is accepted (no DoRA, rsLoRA, per-module ranks, biases or fully saved modules): for it the
weight delta is exactly (alpha / r) * B @ A, which is what apply.py rebuilds. Anything else would be
silently mis-merged, so it is refused with a message naming the adapter_config.json field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ownlm.bitdelta.config import CompressConfig
from ownlm.bitdelta.delta import LORA_A, LORA_B, Delta, cast_scales, entry_granularity
from ownlm.bitdelta.quant import payload_nbytes, quantise
from ownlm.errors import InvalidInput

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraAdapter:
    """A plain LoRA adapter read from disk. factors: '<module path>' -> (A (r, in), B (out, r)), float32."""

    r: int
    alpha: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({path.rpartition(".")[2] for path in self.factors}))

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """The exact (uncompressed) deltas: '<module path>.weight' -> (alpha / r) * B @ A, (out, in)."""
        s = self.alpha / self.r
        return {f"{p}.weight": s * (b.float() @ a.float()) for p, (a, b) in self.factors.items()}


def _refuse(directory: Path, what: str, hint: str) -> InvalidInput:
    return InvalidInput(f"adapter {directory}: {what}", hint=hint)


def read_adapter(directory: str | Path) -> LoraAdapter:
    """Read adapter_config.json and adapter_model.safetensors of a peft LoRA adapter directory."""
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise _refuse(directory, f"no {ADAPTER_CONFIG}", "pass the directory written by peft's save_pretrained")
    if not weights_path.is_file():
        hint = "re-save it with safe_serialization=True" if (directory / "adapter_model.bin").exists() else (
            "pass the directory written by peft's save_pretrained")
        raise _refuse(directory, f"no {ADAPTER_WEIGHTS} (pickled weights are never loaded)", hint)
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise _refuse(directory, f"unreadable {ADAPTER_CONFIG}: {e}", "re-save the adapter") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _refuse(directory, f"peft_type is {cfg.get('peft_type')!r}", "only LoRA adapters can be compressed")
    unsupported = {
        "use_dora": "DoRA", "use_rslora": "rsLoRA", "fan_in_fan_out": "fan_in_fan_out", "rank_pattern": "per-module ranks",
        "alpha_pattern": "per-module alphas", "modules_to_save": "fully saved modules", "lora_bias": "LoRA biases",
    }
    for key, label in unsupported.items():
        if cfg.get(key):
            raise _refuse(directory, f"{label} ({key}={cfg[key]!r}) is not supported", "train plain LoRA")
    if cfg.get("bias", "none") != "none":
        raise _refuse(directory, f"bias={cfg['bias']!r} is not supported", "train with bias='none'")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise _refuse(directory, f"r={r!r}, lora_alpha={alpha!r}", "r must be a positive integer, lora_alpha a number")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise _refuse(directory, f"unreadable {ADAPTER_WEIGHTS}: {e}", "re-save the adapter") from None
    return LoraAdapter(r=r, alpha=float(alpha), factors=_pair_factors(directory, tensors, r))


def _pair_factors(directory: Path, tensors: dict[str, torch.Tensor], r: int) -> dict:
    """peft keys 'base_model.model.<path>.lora_A.weight' / '.lora_B.weight' -> {path: (A, B)}, checked."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        inner = key.removeprefix(PEFT_PREFIX)
        path, _, suffix = inner.rpartition(".")
        module, _, factor = path.rpartition(".")
        if suffix != "weight" or factor not in (LORA_A, LORA_B) or not module:
            raise _refuse(directory, f"unexpected tensor {key!r}", "only plain LoRA A/B weights are supported")
        halves.setdefault(module, {})[factor] = t
    if not halves:
        raise _refuse(directory, "holds no LoRA weights", "train the adapter before compressing it")
    factors = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {LORA_A, LORA_B}:
            raise _refuse(directory, f"module {module} lacks one of lora_A/lora_B", "re-save the adapter")
        a, b = pair[LORA_A], pair[LORA_B]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise _refuse(directory, f"module {module}: A {tuple(a.shape)}, B {tuple(b.shape)} do not have rank {r}",
                          "re-save the adapter")
        factors[module] = (a.float(), b.float())
    return factors


def compress_lora(adapter: LoraAdapter, config: CompressConfig, base_sha256: str) -> Delta:
    """Each factor -> QuantTensor (signs + mean |x| scales per config.scales), scales in their storage dtype."""
    if config.mode != "lora1":
        raise ValueError("compress_lora needs a CompressConfig with mode='lora1'")
    quantised, shapes = {}, {}
    for module, (a, b) in adapter.factors.items():
        for key, x in ((f"{module}.{LORA_A}", a), (f"{module}.{LORA_B}", b)):
            quantised[key] = quantise(x, entry_granularity(config.scales, key))
        shapes[f"{module}.weight"] = (b.shape[0], a.shape[1])  # (out, in) of the base weight
    delta = Delta(
        mode="lora1", granularity=config.scales, base_sha256=base_sha256, target_modules=adapter.target_modules,
        quantised=quantised, param_shapes=shapes, lora_r=adapter.r, lora_alpha=adapter.alpha,
    )
    return cast_scales(delta, config.scale_dtype)



def lora1_nbytes(weight_shapes: list[tuple[int, int]], r: int, granularity: str, scale_bytes: int = 2) -> int:
    """Payload bytes of a lora1 delta for LoRA rank r on weights of these (out, in) shapes: per weight,
    A (r, in) and B (out, r) as signs + scales. E.g. r=8 on q/v of the 135M base (30 x [(576, 576),
    (192, 576)]) holds 57,600 bytes of signs."""
    entries = []
    for out_f, in_f in weight_shapes:
        entries.append(((r, in_f), entry_granularity(granularity, f"x.{LORA_A}")))
        entries.append(((out_f, r), entry_granularity(granularity, f"x.{LORA_B}")))
    return payload_nbytes(entries, scale_bytes)
