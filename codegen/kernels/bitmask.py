"""Exact 1-bit masks: bool tensors packed eight per uint8, planar.

With ``W = ceil(numel / 8)`` bytes, element ``j*W + k`` of the flattened (logical, row-major)
mask is bit ``j`` of byte ``k`` (the padding past ``numel`` is zero). Each bit plane is a
contiguous slice, so packing is eight vectorised shifted ORs and unpacking eight shifted ANDs
(an interleaved layout needs a reduction over groups of eight). Unpacking restores the original
shape and strides bit for bit.
"""

from __future__ import annotations

import torch

__all__ = [
    "pack_mask_reference",
    "unpack_mask_reference",
    "pack_mask_traceable",
    "unpack_mask_traceable",
    "packed_mask_numel",
]


def packed_mask_numel(numel):
    """Bytes needed for ``numel`` bits (works with SymInts)."""
    return (numel + 7) // 8


def pack_mask_reference(mask: torch.Tensor) -> torch.Tensor:
    """``mask``: bool, any shape -> uint8 ``(ceil(numel / 8),)``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a bool tensor, got {mask.dtype}")
    return pack_mask_traceable(mask)


def pack_mask_traceable(mask: torch.Tensor) -> torch.Tensor:
    """Branch-free body of :func:`pack_mask_reference` (traceable with symbolic sizes)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    width = flat.numel() // 8
    out = flat[:width]
    for j in range(1, 8):
        out = out | (flat[j * width : (j + 1) * width] << j)
    return out


def unpack_mask_traceable(packed: torch.Tensor, shape) -> torch.Tensor:
    """Contiguous, branch-free :func:`unpack_mask_reference` (traceable with symbolic sizes)."""
    numel = 1
    for s in shape:
        numel *= s
    planes = torch.cat([(packed >> j) & 1 for j in range(8)])
    return planes[:numel].bool().view(shape)


def unpack_mask_reference(packed: torch.Tensor, shape, stride=None) -> torch.Tensor:
    """Inverse of :func:`pack_mask_reference`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_mask expects uint8 bytes, got {packed.dtype}")
    bits = unpack_mask_traceable(packed, shape)
    numel = bits.numel()
    if stride is not None and tuple(bits.stride()) != tuple(stride) and numel > 0:
        bits = torch.empty_strided(shape, stride, dtype=torch.bool, device=packed.device).copy_(bits)
    return bits
