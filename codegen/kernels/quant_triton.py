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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import _KIND_MASK, _KIND_NAN, _KIND_NEGINF, _KIND_POSINF, _SIGN, DTYPES, _check, packed_shapes

__all__ = ["quantize_pack_triton", "dequantize_unpack_triton"]

# 4096 elements (16 KB of fp32) per program, 4 warps: on an H100 (Triton 3.6, 2**26 elements,
# G=256) the best of 2048-8192 elements x 4-8 warps for both kernels, within 10% of the others.
_TILE = 4096
_NUM_WARPS = 4
_POSINF = tl.constexpr(_KIND_POSINF)
_NEGINF = tl.constexpr(_KIND_NEGINF)
_NAN_KIND = tl.constexpr(_KIND_NAN)
_KINDS = tl.constexpr(_KIND_MASK)
_SIGN_BIT = tl.constexpr(_SIGN)
_INF = tl.constexpr(float("inf"))
_FP32_MAX = tl.constexpr(3.4028234663852886e38)
_NAN_BITS = tl.constexpr(0x7FC00000)  # torch.nan; a NaN constexpr would never equal itself on relaunch


@triton.jit
def _hash32(x):
    """lowbias32 on uint32 (logical shifts, wrapping multiplies), as :func:`.quant._hash32`."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _bf16_bits(x):
    """fp32 -> bf16 bit pattern (int16), round to nearest even, NaN -> 0x7FC0: torch's conversion
    done in integers, so the interpreter (whose own cast truncates) and GPUs agree bit for bit."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, b).to(tl.int16)


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
    lo_t = tl.full([ROWS, BLOCK_W], _INF, tl.float32)
    hi_t = tl.full([ROWS, BLOCK_W], -_INF, tl.float32)
    kinds_t = tl.zeros([ROWS, BLOCK_W], tl.int32)
    for j in tl.static_range(P):
        x = _load_plane(x_ptr, base, offs + j * W, n_in_tile, last)  # (R, Wb)
        lo_t, hi_t, kinds_t = _plane_stats(x, lo_t, hi_t, kinds_t)
    lo, scale, usable, half, inv, kinds = _group_scales(lo_t, hi_t, kinds_t, LEVELS)

    # Pass 2: codes, plane by plane, ORed into the bytes.
    key = _seed_key(seed_ptr)
    packed = tl.zeros([ROWS, BLOCK_W], tl.uint32)
    for j in tl.static_range(P):
        x = _load_plane(x_ptr, base, offs + j * W, n_in_tile, last)  # (R, Wb)
        elem = base.to(tl.uint32) + (offs + j * W).to(tl.uint32)  # (R, Wb) element index mod 2**32
        q = _codes(x, elem, key, lo, half, inv, usable, kinds, LEVELS)  # (R, Wb)
        packed |= q.to(tl.uint32) << (j * BITS)
    _store_packed(codes_ptr, meta_ptr, pid, n_groups, packed, lo, scale, kinds, W, BLOCK_W, ROWS)


@triton.jit
def _plane_stats(x, lo_t, hi_t, kinds_t):
    """Fold a plane of values into the running per-lane min / max over finite values and the OR
    of the non-finite kinds seen (int32 bits, as :data:`.quant._KIND_POSINF` etc.)."""
    finite = tl.abs(x) < _INF  # False for NaN too
    lo_t = tl.minimum(lo_t, tl.where(finite, x, _INF))
    hi_t = tl.maximum(hi_t, tl.where(finite, x, -_INF))
    kind = tl.where(x == x, tl.where(x > 0, _POSINF, _NEGINF), _NAN_KIND)  # used where not finite
    return lo_t, hi_t, kinds_t | tl.where(finite, 0, kind)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _group_scales(lo_t, hi_t, kinds_t, LEVELS: tl.constexpr):
    """Per group (R,): lo, scale (truncated in special groups), usable levels, the half-range
    factor, 1 / (scale * half) and the kinds of non-finite values, as
    :func:`.quant._quantize_general` computes them."""
    lo = tl.min(lo_t, 1)
    hi = tl.max(hi_t, 1)
    kinds = tl.reduce(kinds_t, 1, _or)
    n_kinds = (kinds & 1) + ((kinds >> 1) & 1) + ((kinds >> 2) & 1)
    empty = lo == _INF  # no finite value in the group
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    usable = LEVELS - n_kinds.to(tl.float32)  # the kinds present take the top codes
    levels = tl.maximum(usable, 1.0)
    scale = tl.math.div_rn(hi - lo, levels)
    wide = tl.math.div_rn(hi, levels) - tl.math.div_rn(lo, levels)
    scale = tl.where(tl.abs(scale) == _INF, wide, scale)  # hi - lo overflowed
    scale = tl.minimum(scale, _FP32_MAX)  # one level above lo and a range beyond fp32's max
    scale = tl.where(usable > 0, scale, 0.0)  # no level above lo: every finite value decodes to lo
    sbits = scale.to(tl.int32, bitcast=True)
    scale = tl.where(kinds != 0, sbits & ~_KINDS, sbits).to(tl.float32, bitcast=True)  # room for kinds
    half = tl.where(tl.abs(hi - lo) == _INF, 0.5, 1.0)
    inv = tl.math.div_rn(tl.full(lo.shape, 1.0, tl.float32), tl.where(scale > 0, scale, 1.0) * half)
    return lo, scale, usable, half, inv, kinds


@triton.jit
def _seed_key(seed_ptr):
    """The per-call noise key from the int64 seed on the device (no host sync)."""
    seed = tl.load(seed_ptr)
    return _hash32((seed & 0xFFFFFFFF).to(tl.uint32) ^ _hash32(((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)))


@triton.jit
def _codes(x, elem, key, lo, half, inv, usable, kinds, LEVELS: tl.constexpr):
    """Stochastically rounded codes (fp32) of a plane ``x`` at element indices ``elem``;
    non-finite values take the top codes: +Inf at ``LEVELS``, then -Inf, then NaN (kinds present)."""
    finite = tl.abs(x) < _INF
    u = (_hash32(elem + key) >> 8).to(tl.float32) * 2.0**-24  # U[0, 1)
    g = tl.where(finite, x, lo[:, None])
    v = (g * half[:, None] - (lo * half)[:, None]) * inv[:, None]
    q = tl.minimum(tl.maximum(tl.floor(v + u), 0.0), usable[:, None])
    code_ninf = LEVELS - (kinds & _POSINF).to(tl.float32)  # (R,)
    code_nan = code_ninf - ((kinds >> 1) & 1).to(tl.float32)
    top = tl.where(x == x, tl.where(x > 0, LEVELS, code_ninf[:, None]), code_nan[:, None])
    return tl.where(finite, q, top)


@triton.jit
def _store_packed(codes_ptr, meta_ptr, pid, n_groups, packed, lo, scale, kinds, W, BLOCK_W: tl.constexpr,
                  ROWS: tl.constexpr):  # fmt: skip
    """Write a tile's bytes and each group's (lo, scale bits) with the non-finite flag and kinds."""
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (R,) group index
    row_ok = rows < n_groups
    kk = tl.arange(0, BLOCK_W)
    byte_ok = row_ok[:, None] & (kk < W)[None, :]
    tl.store(codes_ptr + rows[:, None] * W + kk[None, :], packed.to(tl.uint8), mask=byte_ok)
    sbits = scale.to(tl.int32, bitcast=True)  # low bits already cleared in special groups
    sbits = tl.where(kinds != 0, sbits | kinds | _SIGN_BIT, sbits)
    tl.store(meta_ptr + rows * 2, lo.to(tl.int32, bitcast=True), mask=row_ok)
    tl.store(meta_ptr + rows * 2 + 1, sbits, mask=row_ok)


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
    lo, scale, kinds = _load_meta(meta_ptr, rows, row_ok)  # (R,) each

    base = pid.to(tl.int64) * (ROWS * G)
    offs = tl.arange(0, ROWS)[:, None] * G + kk[None, :]  # (R, Wb), plane 0
    n_in_tile = tl.minimum(numel - base, ROWS * G).to(tl.int32)
    for j in tl.static_range(P):
        x = _decode_plane(packed, j, lo, scale, kinds, BITS)  # (R, Wb) plane j
        if OUT_BF16:
            x = _bf16_bits(x)
        ok = byte_ok & (offs + j * W < n_in_tile)
        tl.store(out_ptr + base + offs + j * W, x.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _load_meta(meta_ptr, rows, row_ok):
    """Per group: lo, scale (flag bits cleared) and the kinds of non-finite values (0: none)."""
    lo = tl.load(meta_ptr + rows * 2, mask=row_ok, other=0).to(tl.float32, bitcast=True)
    sbits = tl.load(meta_ptr + rows * 2 + 1, mask=row_ok, other=0)
    special = sbits < 0
    scale = tl.where(special, sbits & ~_KINDS & ~_SIGN_BIT, sbits).to(tl.float32, bitcast=True)
    return lo, scale, tl.where(special, sbits & _KINDS, 0)


@triton.jit
def _decode_plane(packed, j: tl.constexpr, lo, scale, kinds, BITS: tl.constexpr):
    """fp32 values of plane ``j`` of the packed bytes (R, Wb)."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    q = ((packed >> (j * BITS)) & LEVELS).to(tl.float32)
    half = q * (scale * 0.5)[:, None]
    x = (lo[:, None] + half) + half  # lo + q * scale without overflow
    x = tl.minimum(tl.maximum(x, -_FP32_MAX), _FP32_MAX)  # as the reference: never rounds into Inf
    pinf = (kinds & _POSINF) != 0  # (R,)
    ninf = (kinds & _NEGINF) != 0
    nan = (kinds & _NAN_KIND) != 0
    usable = LEVELS - (pinf.to(tl.float32) + ninf.to(tl.float32) + nan.to(tl.float32))
    nan_value = tl.full(lo.shape, _NAN_BITS, tl.int32).to(tl.float32, bitcast=True)  # (R,)
    first = tl.where(pinf, _INF, tl.where(ninf, -_INF, nan_value))  # the value of code L, L - 1
    second = tl.where(pinf & ninf, -_INF, nan_value)
    top = tl.where(q == LEVELS - 1, second[:, None], nan_value[:, None])
    top = tl.where(q == LEVELS, first[:, None], top)
    return tl.where(q > usable[:, None], top, x)


def _launch(numel: int, bits: int, group_size: int):
    """Grid, constexprs and num_warps: ``ROWS`` groups of ``P x BLOCK_W`` lanes fill a ~``_TILE``
    tile (fewer for small tensors, where a full tile would mostly idle), with no more warps than
    keep the plane axis inside each thread (a warp spans 32 threads x 8 lanes of 16-bit data)."""
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
    _check(bits, group_size)
    if x.dtype not in DTYPES:
        raise TypeError(f"quantize_pack_triton supports {DTYPES}, got {x.dtype}")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"seed must be an int64 scalar tensor, got {seed.dtype} {tuple(seed.shape)}")
    cshape, mshape = packed_shapes(x.numel(), bits, group_size)
    codes = torch.empty(cshape, dtype=torch.uint8, device=x.device)
    meta = torch.empty(mshape, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return codes, meta
    grid, consts = _launch(x.numel(), bits, group_size)
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
    _check(bits, group_size)
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
    grid, consts = _launch(numel, bits, group_size)
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
