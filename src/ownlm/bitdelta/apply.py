"""Decompress a delta to dense weight deltas, and merge it into (or out of) a base model in place.

`apply` and `unapply` validate everything first (base hash, every parameter present with the right shape,
every merged weight finite) and only then write, so on any error the model is left exactly as it was.

Tolerance of the round trip: unapply(apply(W)) computes (W + D) - D in float32, so each element may differ
from W by at most one rounding of each operation: |W' - W| <= 2 * eps(float32) * (|W| + |D|) with eps =
2^-23 (in bf16/fp16 models the final cast adds that dtype's rounding). With fp32 it is ~1e-7 relative.
"""

from __future__ import annotations

import torch
from torch import nn

from ownlm.bitdelta.delta import Delta
from ownlm.bitdelta.quant import dequantise
from ownlm.errors import DeltaMismatch

HINT = "apply the delta to the base it was made from (see `ownlm inspect`)"


def weight_deltas(delta: Delta) -> dict[str, torch.Tensor]:
    """Decompress: parameter name -> float32 dense delta of the parameter's shape."""
    out: dict[str, torch.Tensor] = {}
    if delta.mode == "lora1":
        scaling = delta.lora_scaling
        for name, (a, b) in delta.lora_pairs().items():
            out[name] = scaling * (dequantise(b) @ dequantise(a))  # (out, r) @ (r, in) -> (out, in)
    else:
        out.update({name: dequantise(q) for name, q in delta.quantised.items()})
    out.update({name: t.float() for name, t in delta.full.items()})
    return out


def check_fits(model: nn.Module, delta: Delta, base_sha256: str | None = None) -> dict[str, nn.Parameter]:
    """Raise DeltaMismatch unless the delta fits this model; return the parameters it changes, by name."""
    if base_sha256 is not None and base_sha256 != delta.base_sha256:
        raise DeltaMismatch(f"the delta was made for base {delta.base_sha256[:12]}…, not {base_sha256[:12]}…",
                            hint=HINT)
    params = dict(model.named_parameters())
    missing = [name for name in delta.param_shapes if name not in params]
    if missing:
        raise DeltaMismatch(f"the model has no parameter {missing[0]}" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), hint=HINT)
    for name, shape in delta.param_shapes.items():
        if tuple(params[name].shape) != tuple(shape):
            raise DeltaMismatch(f"parameter {name} is {tuple(params[name].shape)} in the model but "
                                f"{tuple(shape)} in the delta", hint=HINT)
    return {name: params[name] for name in delta.param_shapes}


def _merge(model: nn.Module, delta: Delta, sign: float, base_sha256: str | None) -> None:
    params = check_fits(model, delta, base_sha256)
    deltas = weight_deltas(delta)
    merged = {}
    with torch.no_grad():
        # Compute every new weight before writing any, so that an error (a non-finite result, a shape bug)
        # leaves the model untouched. Costs one extra copy of the changed parameters.
        for name, p in params.items():
            d = deltas[name].to(p.device)
            if tuple(d.shape) != tuple(p.shape):
                raise DeltaMismatch(f"delta for {name} is {tuple(d.shape)}, the parameter {tuple(p.shape)}",
                                    hint=HINT)
            new = p.float() + sign * d
            if not torch.isfinite(new).all():
                raise DeltaMismatch(f"merging the delta makes {name} non-finite; nothing was changed",
                                    hint="the delta or the base holds NaN/inf or overflows; recompress it")
            merged[name] = new.to(p.dtype)
        for name, new in merged.items():
            params[name].copy_(new)


def apply(model: nn.Module, delta: Delta, base_sha256: str | None = None) -> None:
    """Add the decompressed delta to the model's weights in place (W <- W + D), all or nothing.

    base_sha256: the fingerprint of the model's base (basemodel.base_sha256); checked when given.
    """
    _merge(model, delta, +1.0, base_sha256)


def unapply(model: nn.Module, delta: Delta, base_sha256: str | None = None) -> None:
    """Inverse of apply (W <- W - D), within the tolerance in the module doc; all or nothing."""
    _merge(model, delta, -1.0, base_sha256)
