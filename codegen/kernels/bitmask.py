"""Exact bit packing: bool masks eight per uint8, and small integers (max-pool window offsets,
pooling indices) ``bits`` per field, planar.

With ``P = 8 // bits`` fields per byte and ``W = ceil(numel / P)`` bytes, element ``j*W + k`` of
the flattened (logical, row-major) tensor is field ``j`` (bits ``j*bits .. j*bits+bits-1``) of
byte ``k``; the padding past ``numel`` is zero. Each plane is a contiguous slice, so packing is
``P`` vectorised shifted ORs and unpacking ``P`` shifted ANDs (an interleaved layout needs a
reduction over groups). Integers are stored as ``x - lo`` (``lo`` the smallest value the producer
can return), so ``bits`` need only cover the range. Unpacking restores shape, strides and dtype
bit for bit. A 1-bit mask is the case ``bits=1, lo=0`` of a bool tensor.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "BIT_WIDTHS",
    "pack_bits_reference",
    "unpack_bits_reference",
    "pack_bits_traceable",
    "unpack_bits_traceable",
    "packed_bits_numel",
    "pack_mask_reference",
    "unpack_mask_reference",
    "pack_mask_traceable",
    "unpack_mask_traceable",
    "packed_mask_numel",
]


BIT_WIDTHS = (1, 2, 4, 8)  # field widths that tile a byte (the planner picks one: costmodel.packed_bits)


def check_bits(bits: int) -> int:
    if bits not in BIT_WIDTHS:
        raise ValueError(f"bits must be one of {BIT_WIDTHS}, got {bits}")
    return 8 // bits  # fields per byte


def packed_bits_numel(numel, bits: int):
    """Bytes holding ``numel`` fields of ``bits`` bits (works with SymInts)."""
    per = check_bits(bits)
    return (numel + per - 1) // per


def packed_mask_numel(numel):
    """Bytes needed for ``numel`` bits (works with SymInts)."""
    return packed_bits_numel(numel, 1)


def pack_bits_traceable(x: torch.Tensor, bits: int, lo: int = 0) -> torch.Tensor:
    """Branch-free body of :func:`pack_bits_reference` (traceable with symbolic sizes)."""
    per = check_bits(bits)
    flat = x.reshape(-1)
    flat = (flat if lo == 0 else flat - lo).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per)])
    width = flat.numel() // per
    out = flat[:width]
    for j in range(1, per):
        out = out | (flat[j * width : (j + 1) * width] << (j * bits))
    return out


def unpack_bits_traceable(
    packed: torch.Tensor, bits: int, lo: int, shape, dtype: torch.dtype
) -> torch.Tensor:
    """Contiguous, branch-free :func:`unpack_bits_reference` (traceable with symbolic sizes)."""
    per = check_bits(bits)
    numel = math.prod(shape)  # SymInts multiply too
    field = (1 << bits) - 1
    planes = torch.cat([(packed >> (j * bits)) & field for j in range(per)]) if per > 1 else packed
    values = planes[:numel]
    if dtype == torch.bool:
        return values.bool().view(shape)
    values = values.to(dtype)
    return (values if lo == 0 else values + lo).view(shape)


def pack_bits_reference(x: torch.Tensor, bits: int, lo: int = 0) -> torch.Tensor:
    """``x``: integer or bool tensor, any shape and strides, every value in ``[lo, lo + 2**bits)``
    -> uint8 ``(ceil(numel * bits / 8),)``. Values outside the range are not checked here (the
    caller knows the range from the producing op); they would wrap."""
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"pack_bits expects an integer or bool tensor, got {x.dtype}")
    if x.dtype == torch.bool and lo != 0:
        raise ValueError(f"pack_bits: a bool tensor takes lo=0, got lo={lo}")
    return pack_bits_traceable(x, bits, lo)


def unpack_bits_reference(
    packed: torch.Tensor, bits: int, lo: int, shape, dtype: torch.dtype, stride=None
) -> torch.Tensor:
    """Inverse of :func:`pack_bits_reference`: ``dtype`` values of ``shape`` (and ``stride``)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects uint8 bytes, got {packed.dtype}")
    if dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"unpack_bits restores integer or bool tensors, not {dtype}")
    numel = math.prod(shape)
    if packed.numel() < packed_bits_numel(numel, bits):
        raise ValueError(
            f"{packed.numel()} bytes cannot hold {numel} {bits}-bit values of shape {tuple(shape)}"
        )
    out = unpack_bits_traceable(packed, bits, lo, list(shape), dtype)
    if stride is not None and tuple(out.stride()) != tuple(stride) and out.numel() > 0:
        out = torch.empty_strided(shape, stride, dtype=dtype, device=packed.device).copy_(out)
    return out


def pack_mask_reference(mask: torch.Tensor) -> torch.Tensor:
    """``mask``: bool, any shape -> uint8 ``(ceil(numel / 8),)``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a bool tensor, got {mask.dtype}")
    return pack_mask_traceable(mask)


def pack_mask_traceable(mask: torch.Tensor) -> torch.Tensor:
    """Branch-free body of :func:`pack_mask_reference` (traceable with symbolic sizes)."""
    return pack_bits_traceable(mask, 1)


def unpack_mask_traceable(packed: torch.Tensor, shape) -> torch.Tensor:
    """Contiguous, branch-free :func:`unpack_mask_reference` (traceable with symbolic sizes)."""
    return unpack_bits_traceable(packed, 1, 0, shape, torch.bool)


def unpack_mask_reference(packed: torch.Tensor, shape, stride=None) -> torch.Tensor:
    """Inverse of :func:`pack_mask_reference`."""
    return unpack_bits_reference(packed, 1, 0, shape, torch.bool, stride)
