"""Triton device functions of the packed quantize format (:mod:`.quant`), the parts that
:mod:`.quant_triton`'s kernels and the generated fusions (:mod:`..fusion_source`) are built from:
per-plane statistics, group scales, the noise key, stochastically rounded codes, storing a tile's
bytes and metadata, and reading them back. Public because the generated kernels import them by
name; each rounds exactly as the reference does (see :mod:`.quant_triton`'s docstring).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .quant import KIND_MASK, KIND_NAN, KIND_NEGINF, KIND_POSINF, SIGN_BIT

__all__ = [
    "INF",
    "bf16_bits",
    "plane_stats",
    "group_scales",
    "seed_key",
    "plane_codes",
    "store_packed",
    "load_meta",
    "decode_plane",
]

_POSINF = tl.constexpr(KIND_POSINF)
_NEGINF = tl.constexpr(KIND_NEGINF)
_NAN_KIND = tl.constexpr(KIND_NAN)
_KINDS = tl.constexpr(KIND_MASK)
_SIGN_BIT = tl.constexpr(SIGN_BIT)
INF = tl.constexpr(float("inf"))
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
def bf16_bits(x):
    """fp32 -> bf16 bit pattern (int16), round to nearest even, NaN -> 0x7FC0: torch's conversion
    done in integers, so the interpreter (whose own cast truncates) and GPUs agree bit for bit."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, b).to(tl.int16)


@triton.jit
def plane_stats(x, lo_t, hi_t, kinds_t):
    """Fold a plane of values into the running per-lane min / max over finite values and the OR
    of the non-finite kinds seen (int32 bits, as :data:`.quant.KIND_POSINF` etc.)."""
    finite = tl.abs(x) < INF  # False for NaN too
    lo_t = tl.minimum(lo_t, tl.where(finite, x, INF))
    hi_t = tl.maximum(hi_t, tl.where(finite, x, -INF))
    kind = tl.where(x == x, tl.where(x > 0, _POSINF, _NEGINF), _NAN_KIND)  # used where not finite
    return lo_t, hi_t, kinds_t | tl.where(finite, 0, kind)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def group_scales(lo_t, hi_t, kinds_t, LEVELS: tl.constexpr):
    """Per group (R,): lo, scale (truncated in special groups), usable levels, the half-range
    factor, 1 / (scale * half) and the kinds of non-finite values, as
    :func:`.quant._quantize_general` computes them."""
    lo = tl.min(lo_t, 1)
    hi = tl.max(hi_t, 1)
    kinds = tl.reduce(kinds_t, 1, _or)
    n_kinds = (kinds & 1) + ((kinds >> 1) & 1) + ((kinds >> 2) & 1)
    empty = lo == INF  # no finite value in the group
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    usable = LEVELS - n_kinds.to(tl.float32)  # the kinds present take the top codes
    levels = tl.maximum(usable, 1.0)
    scale = tl.math.div_rn(hi - lo, levels)
    wide = tl.math.div_rn(hi, levels) - tl.math.div_rn(lo, levels)
    scale = tl.where(tl.abs(scale) == INF, wide, scale)  # hi - lo overflowed
    scale = tl.minimum(scale, _FP32_MAX)  # one level above lo and a range beyond fp32's max
    scale = tl.where(usable > 0, scale, 0.0)  # no level above lo: every finite value decodes to lo
    sbits = scale.to(tl.int32, bitcast=True)
    scale = tl.where(kinds != 0, sbits & ~_KINDS, sbits).to(tl.float32, bitcast=True)  # room for kinds
    half = tl.where(tl.abs(hi - lo) == INF, 0.5, 1.0)
    inv = tl.math.div_rn(tl.full(lo.shape, 1.0, tl.float32), tl.where(scale > 0, scale, 1.0) * half)
    return lo, scale, usable, half, inv, kinds


@triton.jit
def seed_key(seed_ptr):
    """The per-call noise key from the int64 seed on the device (no host sync)."""
    seed = tl.load(seed_ptr)
    return _hash32((seed & 0xFFFFFFFF).to(tl.uint32) ^ _hash32(((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)))


@triton.jit
def plane_codes(x, elem, key, lo, half, inv, usable, kinds, LEVELS: tl.constexpr):
    """Stochastically rounded codes (fp32) of a plane ``x`` at element indices ``elem``;
    non-finite values take the top codes: +Inf at ``LEVELS``, then -Inf, then NaN (kinds present)."""
    finite = tl.abs(x) < INF
    u = (_hash32(elem + key) >> 8).to(tl.float32) * 2.0**-24  # U[0, 1)
    g = tl.where(finite, x, lo[:, None])
    v = (g * half[:, None] - (lo * half)[:, None]) * inv[:, None]
    q = tl.minimum(tl.maximum(tl.floor(v + u), 0.0), usable[:, None])
    code_ninf = LEVELS - (kinds & _POSINF).to(tl.float32)  # (R,)
    code_nan = code_ninf - ((kinds >> 1) & 1).to(tl.float32)
    top = tl.where(x == x, tl.where(x > 0, LEVELS, code_ninf[:, None]), code_nan[:, None])
    return tl.where(finite, q, top)


@triton.jit
def store_packed(codes_ptr, meta_ptr, pid, n_groups, packed, lo, scale, kinds, W, BLOCK_W: tl.constexpr,
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
def load_meta(meta_ptr, rows, row_ok):
    """Per group: lo, scale (flag bits cleared) and the kinds of non-finite values (0: none)."""
    lo = tl.load(meta_ptr + rows * 2, mask=row_ok, other=0).to(tl.float32, bitcast=True)
    sbits = tl.load(meta_ptr + rows * 2 + 1, mask=row_ok, other=0)
    special = sbits < 0
    scale = tl.where(special, sbits & ~_KINDS & ~_SIGN_BIT, sbits).to(tl.float32, bitcast=True)
    return lo, scale, tl.where(special, sbits & _KINDS, 0)


@triton.jit
def decode_plane(packed, j: tl.constexpr, lo, scale, kinds, BITS: tl.constexpr):
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
    first = tl.where(pinf, INF, tl.where(ninf, -INF, nan_value))  # the value of code L, L - 1
    second = tl.where(pinf & ninf, -INF, nan_value)
    top = tl.where(q == LEVELS - 1, second[:, None], nan_value[:, None])
    top = tl.where(q == LEVELS, first[:, None], top)
    return tl.where(q > usable[:, None], top, x)
