"""1-bit quantisation of a matrix: x ~= scale * sign(x), with one scale per row, per column or per matrix.

For fixed signs s = sign(x) the scale alpha minimising the squared error ||x - alpha * s||^2 over a group
is alpha = <x, s> / n = mean |x| over the group (set the derivative -2 * sum (x_i - alpha s_i) s_i to 0).
So mean |x| is the least-squares (L2-optimal) scale, which is what BitDelta initialises with; it is not the
L1-optimal one (that would be the median of |x|). Scale distillation then tunes it for the model's output.

Pure functions: no file I/O. Matrices are (rows, cols) = (out_features, in_features) for a Linear weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ownlm.bitdelta.pack import pack_signs, packed_nbytes, unpack_signs

# float16 keeps ~3 significant digits only between its smallest normal value and its largest value;
# scales outside that range are stored as float32 by scale_dtype='auto'.
FP16_NORMAL_MIN = 2.0**-14
FP16_MAX = 65504.0


def scale_shape(shape: tuple[int, int], granularity: str) -> tuple[int]:
    """Shape of the scales of a (rows, cols) matrix: (rows,), (cols,) or (1,)."""
    rows, cols = shape
    return {"row": (rows,), "col": (cols,), "matrix": (1,)}[granularity]


def init_scales(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """mean |x| per group of the (rows, cols) matrix `x` -> float32 scales of scale_shape(x.shape)."""
    a = x.detach().float().abs()
    if granularity == "row":
        return a.mean(dim=1)
    if granularity == "col":
        return a.mean(dim=0)
    if granularity == "matrix":
        return a.mean().reshape(1)
    raise ValueError(f"unknown scale granularity {granularity!r}")


def expand_scales(scales: torch.Tensor, granularity: str) -> torch.Tensor:
    """Scales -> a view that broadcasts against the (rows, cols) matrix: (rows, 1), (1, cols) or (1,)."""
    if granularity == "row":
        return scales[:, None]
    if granularity == "col":
        return scales[None, :]
    return scales


@dataclass
class QuantTensor:
    """One matrix at 1 bit per element.

    packed: uint8 (ceil(rows * cols / 8),), signs in pack.py's layout
    shape:  (rows, cols) of the original matrix
    scales: (rows,), (cols,) or (1,), float16 or float32 (the storage dtype; maths runs in float32)
    """

    packed: torch.Tensor
    shape: tuple[int, int]
    scales: torch.Tensor
    granularity: str

    @property
    def nbytes(self) -> int:
        """Bytes of payload: packed signs + scales."""
        return self.packed.numel() + self.scales.numel() * self.scales.element_size()

    def signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(rows, cols) of +1/-1."""
        return unpack_signs(self.packed, self.shape, dtype)


def quantise(x: torch.Tensor, granularity: str) -> QuantTensor:
    """(rows, cols) finite matrix -> QuantTensor with float32 scales mean |x| per group."""
    if x.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantise a matrix holding NaN or infinity")
    return QuantTensor(pack_signs(x), (int(x.shape[0]), int(x.shape[1])), init_scales(x, granularity), granularity)


def dequantise(q: QuantTensor) -> torch.Tensor:
    """QuantTensor -> float32 (rows, cols) matrix scale * sign."""
    return q.signs() * expand_scales(q.scales.float(), q.granularity)


def storage_dtype(scales: list[torch.Tensor], choice: str) -> torch.dtype:
    """Resolve scale_dtype 'auto' | 'float16' | 'float32' for these scales (see FP16_NORMAL_MIN)."""
    if choice == "float32":
        return torch.float32
    if choice == "float16":
        return torch.float16
    for s in scales:
        a = s.detach().float().abs()
        nonzero = a[a > 0]
        if nonzero.numel() and (nonzero.min() < FP16_NORMAL_MIN or nonzero.max() > FP16_MAX):
            return torch.float32
    return torch.float16


def payload_nbytes(entries: list[tuple[tuple[int, int], str]], scale_bytes: int = 2) -> int:
    """Bytes of signs + scales for matrices given as ((rows, cols), granularity): the size arithmetic,
    without building anything. scale_bytes: 2 for float16 scales, 4 for float32."""
    return sum(packed_nbytes(r * c) + scale_shape((r, c), g)[0] * scale_bytes for (r, c), g in entries)
