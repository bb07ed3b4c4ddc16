"""Triton kernels for :mod:`.bitmask`: small integers packed ``bits`` per field in planes, one pass
each; bool masks are the case ``bits=1, lo=0``.

Same layout as :func:`.bitmask.pack_bits_reference` (see :mod:`.bitmask`'s docstring): with
``P = 8 // bits`` fields per byte and ``W = ceil(numel / P)``, element ``j*W + k`` of the
flattened tensor, minus ``lo``, is field ``j`` of byte ``k``. A program owns ``BLOCK`` consecutive
bytes as a ``(P, BLOCK)`` element tile, one contiguous row per plane, so every byte is read or
written once, coalesced.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bitmask import check_bits, packed_bits_numel

__all__ = ["pack_bits_triton", "unpack_bits_triton", "pack_mask_triton", "unpack_mask_triton"]

_BLOCK = 2048  # bytes per program: a (P, 2048) tile; for 1-bit masks 16 KB, 1024-4096 measure alike
_NUM_WARPS = 4
_NO_FUSION = dict(enable_fp_fusion=False)  # no float maths here; stated so Triton 3.9 does not warn


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _pack_bits_kernel(x_ptr, out_ptr, numel, width, lo, BITS: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (B,) byte index
    planes = tl.arange(0, 8 // BITS)  # (P,); P = 1 for 8 bits, a plain offset copy
    elem = planes.to(tl.int64)[:, None] * width + k[None, :]  # (P, B)
    inside = elem < numel
    x = tl.load(x_ptr + elem, mask=inside, other=0)
    # uint8 wrap of x - lo, as the reference's .to(torch.uint8); the padding is 0, not -lo
    field = tl.where(inside, x - lo, 0).to(tl.uint8).to(tl.int32)
    # or, not sum: a value outside [lo, lo + 2**BITS) spills into the next field as in the reference
    packed = tl.reduce(field << (planes * BITS)[:, None], 0, _or)  # (B,)
    tl.store(out_ptr + k, packed.to(tl.uint8), mask=k < width)


@triton.jit
def _unpack_bits_kernel(
    packed_ptr, out_ptr, numel, width, lo, BITS: tl.constexpr, TO_BOOL: tl.constexpr, BLOCK: tl.constexpr
):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (B,)
    planes = tl.arange(0, 8 // BITS)  # (P,)
    elem = planes.to(tl.int64)[:, None] * width + k[None, :]  # (P, B)
    packed = tl.load(packed_ptr + k, mask=k < width, other=0)  # (B,) uint8
    field = (packed[None, :] >> (planes * BITS)[:, None].to(tl.uint8)) & ((1 << BITS) - 1)  # (P, B)
    if TO_BOOL:  # out is a bool tensor viewed as uint8; like Tensor.bool(), any set bit is True
        values = (field != 0).to(tl.uint8)
    else:  # cast first, then add in the output type: wraps as the reference's .to(dtype) + lo
        dtype = out_ptr.dtype.element_ty
        values = (field.to(dtype) + lo).to(dtype)
    # lanes k >= width alias the next plane's elements: they must not store
    tl.store(out_ptr + elem, values, mask=(elem < numel) & (k < width)[None, :])


def _launch(width: int):
    """Grid, BLOCK and num_warps. A warp spans 32 threads x 16 bytes of a plane; with no more warps
    than ``BLOCK / 512``, each thread holds all ``P`` planes of its bytes and packs in registers
    (measured on an H100 for 1-bit masks: 5x faster than a tile whose plane axis spans warps)."""
    block = min(_BLOCK, triton.next_power_of_2(width))  # small tensors: no idle lanes
    return (triton.cdiv(width, block),), block, max(1, min(_NUM_WARPS, block // 512))


def _pack(x: torch.Tensor, bits: int, lo: int, name: str) -> torch.Tensor:
    check_bits(bits)
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} expects an integer or bool tensor, got {x.dtype}")
    if x.dtype == torch.bool and lo != 0:
        raise ValueError(f"{name} packs a bool tensor with lo=0, got lo={lo}")
    numel = x.numel()
    width = packed_bits_numel(numel, bits)
    out = torch.empty(width, dtype=torch.uint8, device=x.device)
    if numel == 0:
        return out
    grid, block, warps = _launch(width)
    flat = x.contiguous()
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool else flat  # bool bytes are 0 or 1
    args = (flat, out, numel, width, lo)
    _pack_bits_kernel[grid](*args, BITS=bits, BLOCK=block, num_warps=warps, **_NO_FUSION)
    return out


def _unpack(packed: torch.Tensor, bits: int, lo: int, shape, dtype: torch.dtype, stride, name: str):
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"{name} expects uint8 bytes, got {packed.dtype}")
    if dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"{name} restores an integer or bool dtype, got {dtype}")
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    numel = out.numel()
    width = packed.numel()
    if width < packed_bits_numel(numel, bits):
        raise ValueError(f"{width} bytes cannot hold {bits}-bit fields of shape {tuple(shape)}")
    if numel == 0:
        return out
    grid, block, warps = _launch(width)
    to_bool = dtype == torch.bool
    args = (packed.contiguous(), out.view(torch.uint8) if to_bool else out, numel, width, lo)
    _unpack_bits_kernel[grid](*args, BITS=bits, TO_BOOL=to_bool, BLOCK=block, num_warps=warps, **_NO_FUSION)
    if stride is not None and tuple(out.stride()) != tuple(stride):
        out = torch.empty_strided(shape, stride, dtype=dtype, device=out.device).copy_(out)
    return out


def pack_bits_triton(x: torch.Tensor, bits: int, lo: int = 0) -> torch.Tensor:
    """``x``: integer or bool tensor, any shape (non-contiguous: copied to contiguous first), values
    in ``[lo, lo + 2**bits)`` -> uint8 ``(ceil(numel * bits / 8),)``, equal to
    :func:`.bitmask.pack_bits_reference` (also where values wrap). Example::

        offsets = torch.randint(0, 9, (1000,), dtype=torch.int8, device="cuda")  # 3x3 window
        packed = pack_bits_triton(offsets, 4)  # (500,) uint8
    """
    return _pack(x, bits, lo, "pack_bits")


def unpack_bits_triton(
    packed: torch.Tensor, bits: int, lo: int, shape, dtype: torch.dtype, stride=None
) -> torch.Tensor:
    """Inverse of :func:`pack_bits_triton`: a ``dtype`` tensor of ``shape``, written contiguous by
    the kernel; a ``stride`` other than that costs one extra copy. Like the reference, the plane
    width is ``packed.numel()``."""
    return _unpack(packed, bits, lo, shape, dtype, stride, "unpack_bits")


def pack_mask_triton(mask: torch.Tensor) -> torch.Tensor:
    """``mask``: bool, any shape -> uint8 ``(ceil(numel / 8),)``, equal to
    :func:`.bitmask.pack_mask_reference`: :func:`pack_bits_triton` at 1 bit."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a bool tensor, got {mask.dtype}")
    return _pack(mask, 1, 0, "pack_mask")


def unpack_mask_triton(packed: torch.Tensor, shape, stride=None) -> torch.Tensor:
    """Inverse of :func:`pack_mask_triton`: a bool tensor of ``shape`` (and ``stride``)."""
    return _unpack(packed, 1, 0, shape, torch.bool, stride, "unpack_mask")
