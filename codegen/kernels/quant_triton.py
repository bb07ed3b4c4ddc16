"""Triton kernels for :mod:`.quant`: per-group quantize + pack and unpack + dequantize, one pass each.

Same maths, layout, noise and non-finite handling as :func:`.quant.quantize_pack_traceable` and
:func:`.quant.dequantize_unpack_reference` (see :mod:`.quant`'s docstring), bit for bit: the
arithmetic is written in the reference's order, divisions are IEEE-rounded (``div_rn``) and the
kernels are compiled without FMA contraction, so a GPU rounds exactly as torch's eager kernels do.

Tiling. A program owns ``ROWS`` whole groups and walks their ``P = 8 // bits`` planes of
``W = G * bits // 8`` elements as ``(ROWS, W)`` tiles (plane ``j`` holds positions ``j*W + k``):
the ``P`` codes of byte ``k`` then sit in the same thread at the same tile position, so packing is
an in-register OR, with no plane axis for the compiler to spread across warps. Quantizing walks
the planes twice, statistics then codes; the second read hits L1/L2, so every input byte comes
from DRAM once and every byte goes to it once, coalesced and vectorised along ``k``.

The device functions the kernels are built from (group statistics and scales, codes, packing,
decoding) are in :mod:`.quant_triton_lib`, shared with the generated fusions; this module holds
the two kernels, their launch configuration (:func:`launch_config`) and their host wrappers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import DTYPES, check_format, packed_shapes
from .quant_triton_lib import (
    INF,
    bf16_bits,
    decode_plane,
    group_scales,
    load_meta,
    plane_codes,
    plane_stats,
    seed_key,
    store_packed,
)

__all__ = ["quantize_pack_triton", "dequantize_unpack_triton", "launch_config"]

# 4096 elements (16 KB of fp32) per program, 4 warps: on an H100 (Triton 3.6, 2**26 elements,
# G=256) the best of 2048-8192 elements x 4-8 warps for both kernels, within 10% of the others.
_TILE = 4096
_NUM_WARPS = 4


@triton.jit
def _load_plane(x_ptr, base, offs, n_in_tile, last):
    """fp32 values at tile offsets ``offs`` (ROWS, Wb); past the tensor's end, ``last``."""
    inside = offs < n_in_tile
    x = tl.load(x_ptr + base + offs, mask=inside, other=0).to(tl.float32)
    return tl.where(inside, x, last)  # pads the last group with the last element


@triton.jit
def _quantize_pack_kernel(
    x_ptr,
    seed_ptr,
    codes_ptr,
    meta_ptr,  # int32 view of the fp32 meta: (lo, scale) bit patterns
    numel,
    n_groups,
    BITS: tl.constexpr,
    G: tl.constexpr,
    W: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ROWS: tl.constexpr,
):
    P: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (ROWS * G)  # the tile's first element; int32 offsets inside it
    n_in_tile = tl.minimum(numel - base, ROWS * G).to(tl.int32)
    last = tl.load(x_ptr + numel - 1).to(tl.float32)
    kk = tl.arange(0, BLOCK_W)  # (Wb,) byte in the group
    if W != BLOCK_W:  # lanes past W repeat byte W-1's elements, which leaves every reduction as is
        kk = tl.minimum(kk, W - 1)
    offs = tl.arange(0, ROWS)[:, None] * G + kk[None, :]  # (R, Wb), plane 0

    # Pass 1: per-group statistics, reduced across planes elementwise, then once along k.
    lo_t = tl.full([ROWS, BLOCK_W], INF, tl.float32)
    hi_t = tl.full([ROWS, BLOCK_W], -INF, tl.float32)
    kinds_t = tl.zeros([ROWS, BLOCK_W], tl.int32)
    for j in tl.static_range(P):
        x = _load_plane(x_ptr, base, offs + j * W, n_in_tile, last)  # (R, Wb)
        lo_t, hi_t, kinds_t = plane_stats(x, lo_t, hi_t, kinds_t)
    lo, scale, usable, half, inv, kinds = group_scales(lo_t, hi_t, kinds_t, LEVELS)

    # Pass 2: codes, plane by plane, ORed into the bytes.
    key = seed_key(seed_ptr)
    packed = tl.zeros([ROWS, BLOCK_W], tl.uint32)
    for j in tl.static_range(P):
        x = _load_plane(x_ptr, base, offs + j * W, n_in_tile, last)  # (R, Wb)
        elem = base.to(tl.uint32) + (offs + j * W).to(tl.uint32)  # (R, Wb) element index mod 2**32
        q = plane_codes(x, elem, key, lo, half, inv, usable, kinds, LEVELS)  # (R, Wb)
        packed |= q.to(tl.uint32) << (j * BITS)
    store_packed(codes_ptr, meta_ptr, pid, n_groups, packed, lo, scale, kinds, W, BLOCK_W, ROWS)


@triton.jit
def _dequantize_unpack_kernel(
    codes_ptr,
    meta_ptr,  # int32 view of the fp32 meta
    out_ptr,  # int16 view of the output when OUT_BF16
    numel,
    n_groups,
    BITS: tl.constexpr,
    G: tl.constexpr,
    W: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ROWS: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    P: tl.constexpr = 8 // BITS
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (R,)
    kk = tl.arange(0, BLOCK_W)  # (Wb,)
    row_ok = rows < n_groups
    byte_ok = row_ok[:, None] & (kk < W)[None, :]  # (R, Wb)
    packed = tl.load(codes_ptr + rows[:, None] * W + kk[None, :], mask=byte_ok, other=0)  # (R, Wb)
    lo, scale, kinds = load_meta(meta_ptr, rows, row_ok)  # (R,) each

    base = pid.to(tl.int64) * (ROWS * G)
    offs = tl.arange(0, ROWS)[:, None] * G + kk[None, :]  # (R, Wb), plane 0
    n_in_tile = tl.minimum(numel - base, ROWS * G).to(tl.int32)
    for j in tl.static_range(P):
        x = decode_plane(packed, j, lo, scale, kinds, BITS)  # (R, Wb) plane j
        if OUT_BF16:
            x = bf16_bits(x)
        ok = byte_ok & (offs + j * W < n_in_tile)
        tl.store(out_ptr + base + offs + j * W, x.to(out_ptr.dtype.element_ty), mask=ok)


def launch_config(numel: int, bits: int, group_size: int):
    """Grid, constexprs and num_warps of these kernels and of the generated fusions: ``ROWS`` groups
    of ``P x BLOCK_W`` lanes fill a ~``_TILE`` tile (fewer for small tensors, where a full tile
    would mostly idle), with no more warps than keep the plane axis inside each thread (a warp
    spans 32 threads x 8 lanes of 16-bit data)."""
    width = group_size * bits // 8
    block_w = triton.next_power_of_2(width)
    n_groups = -(-numel // group_size)
    rows = min(max(1, _TILE // (8 // bits * block_w)), triton.next_power_of_2(n_groups))
    grid = (triton.cdiv(n_groups, rows),)
    warps = max(1, min(_NUM_WARPS, rows * block_w // 256))
    return grid, dict(BITS=bits, G=group_size, W=width, BLOCK_W=block_w, ROWS=rows, num_warps=warps)


def quantize_pack_triton(
    x: torch.Tensor, bits: int, group_size: int, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.quant.quantize_pack_traceable` as one kernel: ``x`` (any shape, fp32/bf16/fp16;
    non-contiguous inputs are copied to contiguous first) and an int64 scalar ``seed`` tensor on
    ``x``'s device -> ``codes`` uint8 ``(n_groups, G*bits//8)``, ``meta`` fp32 ``(n_groups, 2)``.
    Example::

        codes, meta = quantize_pack_triton(torch.randn(1000, device="cuda"), 4, 256,
                                           torch.tensor(7, device="cuda"))
    """
    check_format(bits, group_size)
    if x.dtype not in DTYPES:
        raise TypeError(f"quantize_pack_triton supports {DTYPES}, got {x.dtype}")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"seed must be an int64 scalar tensor, got {seed.dtype} {tuple(seed.shape)}")
    cshape, mshape = packed_shapes(x.numel(), bits, group_size)
    codes = torch.empty(cshape, dtype=torch.uint8, device=x.device)
    meta = torch.empty(mshape, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return codes, meta
    grid, consts = launch_config(x.numel(), bits, group_size)
    _quantize_pack_kernel[grid](
        x.contiguous(),
        seed.to(x.device),
        codes,
        meta.view(torch.int32),
        x.numel(),
        cshape[0],
        **consts,
        enable_fp_fusion=False,
    )
    return codes, meta


def dequantize_unpack_triton(
    codes: torch.Tensor,
    meta: torch.Tensor,
    bits: int,
    group_size: int,
    shape,
    stride,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of :func:`quantize_pack_triton`, equal to :func:`.quant.dequantize_unpack_reference`:
    a ``dtype`` tensor of ``shape``. The kernel writes it contiguous; ``stride`` (``None``:
    contiguous) other than that costs one extra copy."""
    check_format(bits, group_size)
    if dtype not in DTYPES:
        raise TypeError(f"dequantize_unpack_triton supports {DTYPES}, got {dtype}")
    if codes.dtype != torch.uint8 or meta.dtype != torch.float32:
        raise TypeError(f"expected uint8 codes and fp32 meta, got {codes.dtype} and {meta.dtype}")
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    numel = out.numel()
    (n_groups, width), _ = packed_shapes(numel, bits, group_size)
    if codes.dim() != 2 or codes.shape[1] != width or len(codes) < n_groups or meta.shape != (len(codes), 2):
        raise ValueError(
            f"codes {tuple(codes.shape)} and meta {tuple(meta.shape)} do not hold {bits}-bit groups of "
            f"{group_size} for shape {tuple(shape)}"
        )
    if numel == 0:
        return out
    grid, consts = launch_config(numel, bits, group_size)
    _dequantize_unpack_kernel[grid](
        codes.contiguous(),
        meta.contiguous().view(torch.int32),
        out.view(torch.int16) if dtype == torch.bfloat16 else out,
        numel,
        len(codes),
        **consts,
        OUT_BF16=dtype == torch.bfloat16,
        enable_fp_fusion=False,
    )
    if stride is not None and tuple(out.stride()) != tuple(stride):
        out = torch.empty_strided(shape, stride, dtype=dtype, device=out.device).copy_(out)
    return out
