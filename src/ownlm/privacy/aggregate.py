"""Aggregating a person's devices' LoRA updates: pure maths on one flat float32 vector per device.

Three ways to turn each device's trained adapter into a vector and the mean vector back into one adapter
(the LoRA delta of a module is (alpha / r) * B @ A, A (r, in), B (out, r); alpha and r are the same on every
device, so the scaling is left out of the maths):

- `factors`: FedAvg of A and B separately. Cheap (the vector is the adapter itself) but mean(B) @ mean(A) is
  *not* mean(B @ A): the cross terms B_i @ A_j of different devices enter the product.
- `product`: average the products B_i @ A_i (an (out, in) matrix per module), then re-factorise the mean to
  rank r with a truncated SVD: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T. Exact when r is at least the rank of the
  mean (at most the sum of the devices' ranks), otherwise the best rank-r approximation (Eckart-Young).
  The vector is out * in per module: 13.3 M floats (53 MB) for r=8 on q/v of the 135M base.
- `latent`: quantization-aware training (learn/qat.py) keeps a latent fp32 weight W and a learned scale s per
  factor, and ships sign(W) * fp16(s). Average the latents and the scales; the merged factor is
  sign(mean W) * fp16(mean s).

Every method then re-quantizes the merged factors to the 1-bit `lora1` artifact (`to_delta`).

The sum is the only step that sees more than one device, and it is a plain sum: a device sends
`weighted(vector, weight)` = weight * vector and its weight; the aggregator adds the payloads (`PlainSum`);
whoever may see the result divides by the summed weight (`finish`). A secure aggregator (privacy/secure_agg.py,
TenSEAL CKKS) replaces PlainSum by one that adds ciphertexts of the same weighted vectors and hands back the
encrypted sum for the person's key to decrypt; nothing else here changes (see `SumAggregator`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ownlm.bitdelta.delta import LORA_A, LORA_B, Delta, entry_granularity
from ownlm.bitdelta.quant import expand_scales
from ownlm.errors import InvalidInput

METHODS = ("factors", "product", "latent")
SCALE = ".scale"  # suffix of a latent factor's learned scale in the `latent` method's tensors
DELTA = ".delta"  # suffix of a module's B @ A in the `product` method's tensors

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, in), B (out, r))


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InvalidInput(f"aggregation method {method!r} does not exist", hint=f"use one of {', '.join(METHODS)}")
    return method


# --- one vector per device --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the tensors laid end to end in a flat vector (sorted by name: every device agrees)."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> "Layout":
        return cls(tuple((name, tuple(tensors[name].shape)) for name in sorted(tensors)))

    @property
    def dim(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.entries)

    @property
    def sha256(self) -> str:
        """Binds an update to its layout: two devices' vectors are summed only if their layouts are equal."""
        return hashlib.sha256(json.dumps([[n, list(s)] for n, s in self.entries]).encode()).hexdigest()

    def to_json(self) -> list:
        return [[n, list(s)] for n, s in self.entries]

    @classmethod
    def from_json(cls, doc: list) -> "Layout":
        try:
            return cls(tuple((str(n), tuple(int(x) for x in s)) for n, s in doc))
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"an update's layout is malformed ({e})", hint="send updates made by ownlm federate") from None

    def flatten(self, tensors: dict[str, torch.Tensor]) -> np.ndarray:
        if set(tensors) != {n for n, _ in self.entries}:
            raise InvalidInput("the tensors do not match the layout", hint="train every device with the same LoRA settings")
        parts = []
        for name, shape in self.entries:
            t = tensors[name].detach().to(torch.float32).cpu()
            if tuple(t.shape) != shape:
                raise InvalidInput(f"{name} has shape {tuple(t.shape)}, the layout says {shape}",
                                   hint="train every device with the same LoRA settings")
            parts.append(t.reshape(-1).numpy())
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    def unflatten(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        vector = np.asarray(vector)
        if vector.ndim != 1 or vector.shape[0] != self.dim:
            raise InvalidInput(f"a vector of {vector.shape} does not fit a layout of {self.dim} floats",
                               hint="send updates made by ownlm federate")
        out, at = {}, 0
        for name, shape in self.entries:
            n = int(np.prod(shape))
            out[name] = torch.from_numpy(np.array(vector[at:at + n], dtype=np.float32)).reshape(shape)
            at += n
        return out


def tensors_for(method: str, factors: Factors, latent: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """What a device contributes under `method`: its factors, their products, or (latent) its QAT latents + scales.

    `latent` ('latent' only): '<module>.lora_A' / '.lora_B' -> latent W, and the same + '.scale' -> learned scale.
    """
    check_method(method)
    if method == "factors":
        return {k: v for p, (a, b) in factors.items() for k, v in ((f"{p}.{LORA_A}", a), (f"{p}.{LORA_B}", b))}
    if method == "product":
        return {f"{p}{DELTA}": b.float() @ a.float() for p, (a, b) in factors.items()}
    if latent is None:
        raise InvalidInput("the latent method needs the quantization-aware latent weights",
                           hint="train with qat on (personalization.qat), or use --method factors")
    return dict(latent)


# --- the sum: the only step that sees several devices -----------------------------------------------------------


def weighted(vector: np.ndarray, weight: float) -> np.ndarray:
    """A device's payload for a sum aggregator: weight * vector (float32). weight: its training example count."""
    if not weight > 0:
        raise InvalidInput(f"an update's weight must be positive, not {weight!r}", hint="train on at least one example")
    return (np.asarray(vector, dtype=np.float32) * np.float32(weight)).astype(np.float32)


class SumAggregator(Protocol):
    """What the federation server needs of an aggregator: add payloads, hand back their sum.

    PlainSum adds float vectors in the clear. privacy/secure_agg.py adds CKKS ciphertexts of the same weighted
    vectors instead (`add` takes the ciphertext bytes, `total` returns the encrypted sum, which only the person's
    key decrypts into the vector `finish` expects)."""

    def add(self, payload, weight: float) -> None: ...

    def total(self) -> tuple[object, float]: ...


class PlainSum:
    """Σ weight_i * vector_i and Σ weight_i, in float64 (so the order of the devices does not matter)."""

    def __init__(self, dim: int):
        self.sum, self.weight, self.count = np.zeros(dim, np.float64), 0.0, 0

    def add(self, payload: np.ndarray, weight: float) -> None:
        payload = np.asarray(payload)
        if payload.shape != self.sum.shape:
            raise InvalidInput(f"a payload of {payload.shape} cannot be added to a sum of {self.sum.shape}",
                               hint="every device must train the same LoRA settings")
        self.sum += payload
        self.weight += float(weight)
        self.count += 1

    def total(self) -> tuple[np.ndarray, float]:
        return self.sum, self.weight


def finish(total: np.ndarray, weight: float) -> np.ndarray:
    """The weighted mean from a (decrypted) sum: Σ w_i v_i / Σ w_i, float32."""
    if not weight > 0:
        raise InvalidInput("no update was aggregated", hint="at least one device must send a valid update")
    return (np.asarray(total, dtype=np.float64) / weight).astype(np.float32)


def weighted_mean(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The whole plaintext path in one call (what the server does with PlainSum)."""
    agg = PlainSum(len(vectors[0]))
    for v, w in zip(vectors, weights):
        agg.add(weighted(v, w), w)
    return finish(*agg.total())


# --- the mean back into one adapter -----------------------------------------------------------------------------


def refactor(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with B @ A the best rank-r approximation of `delta` (out, in): truncated SVD,
    the singular values split evenly between the factors (sqrt on each side) so A and B have like magnitudes."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(r, s.shape[0])
    root = s[:k].sqrt()
    a = torch.zeros(r, delta.shape[1], dtype=torch.float64)
    b = torch.zeros(delta.shape[0], r, dtype=torch.float64)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root[None, :]
    return a.float(), b.float()


def from_latent(latent: torch.Tensor, scale: torch.Tensor, granularity: str) -> torch.Tensor:
    """sign(W) * fp16(s), learn/qat.py's forward (sign(0) = +1)."""
    signs = torch.where(latent >= 0, 1.0, -1.0)
    return signs * expand_scales(scale.to(torch.float16).float(), granularity)


def to_factors(method: str, tensors: dict[str, torch.Tensor], r: int, qat_scales: str = "matrix") -> Factors:
    """The mean tensors of `method` -> one adapter's factors (A, B) per module."""
    check_method(method)
    if method == "product":
        return {name.removesuffix(DELTA): refactor(t, r) for name, t in sorted(tensors.items())}
    factors: Factors = {}
    for path in sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith((f".{LORA_A}", f".{LORA_B}"))}):
        a, b = tensors[f"{path}.{LORA_A}"], tensors[f"{path}.{LORA_B}"]
        if method == "latent":
            a = from_latent(a, tensors[f"{path}.{LORA_A}{SCALE}"], entry_granularity(qat_scales, f"{path}.{LORA_A}"))
            b = from_latent(b, tensors[f"{path}.{LORA_B}{SCALE}"], entry_granularity(qat_scales, f"{path}.{LORA_B}"))
        factors[path] = (a.float(), b.float())
    return factors


def to_delta(factors: Factors, r: int, alpha: float, base_sha256: str) -> Delta:
    """The merged factors as the 1-bit lora1 artifact (signs + mean |x| scale per factor, bitdelta/lora1.py)."""
    from ownlm.bitdelta import CompressConfig, compress_lora
    from ownlm.bitdelta.lora1 import LoraAdapter

    return compress_lora(LoraAdapter(r=r, alpha=float(alpha), factors=factors), CompressConfig(mode="lora1"), base_sha256)


def aggregate(method: str, layout: Layout, vectors: list[np.ndarray], weights: list[float], r: int,
              qat_scales: str = "matrix") -> Factors:
    """Devices' vectors (all of `layout`) and example counts -> the merged adapter's factors (plaintext path)."""
    return to_factors(method, layout.unflatten(weighted_mean(vectors, weights)), r, qat_scales)
