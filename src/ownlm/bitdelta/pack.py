"""Signs packed 8 per byte: the 1 bit of BitDelta.

Convention: sign(x) = +1 for x >= 0 and -1 for x < 0, so sign(0) = +1 (a zero delta quantises to +scale;
this costs nothing in expectation and keeps the code a single comparison). Bit 1 means +1, bit 0 means -1.
Bits are packed little-endian within each byte (element 0 is bit 0 of byte 0), flattened in row-major (C)
order; the last byte is zero-padded when the element count is not a multiple of 8.

Pure functions on CPU tensors; numpy's packbits/unpackbits do the bit work.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def packed_nbytes(numel: int) -> int:
    """Bytes needed to hold `numel` signs: ceil(numel / 8)."""
    return (numel + 7) // 8


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Signs of `x` (any shape, any real dtype) -> uint8 tensor of shape (ceil(x.numel() / 8),).

    NaN has no sign: the caller must pass finite values (quantise() checks).
    """
    bits = (x.detach() >= 0).flatten().cpu().numpy()  # sign(0) := +1, see module doc
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of pack_signs: uint8 (ceil(prod(shape) / 8),) -> tensor of `shape` holding +1/-1 in `dtype`.

    Raises ValueError when `packed` is not uint8 or its length does not match `shape`.
    """
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(numel):
        raise ValueError(
            f"packed signs of dtype {packed.dtype} and shape {tuple(packed.shape)} do not hold {numel} signs "
            f"(expected uint8 of shape ({packed_nbytes(numel)},))"
        )
    bits = np.unpackbits(packed.cpu().numpy(), count=numel, bitorder="little")
    # bit b -> 2b - 1: 1 -> +1, 0 -> -1
    return torch.from_numpy(bits).to(dtype).mul_(2).sub_(1).reshape(shape)
