"""Per-group min/max affine quantization with stochastic rounding, packed into uint8.

Maths. The tensor is read in logical (row-major) order and cut into groups of ``G`` elements
(the last group is padded by repeating its last element, so padding never widens the range).
The decode is evaluated as ``(lo + q*scale/2) + q*scale/2`` so that groups whose range exceeds
fp32's maximum stay finite.
Per group: ``lo = min(x)``, ``hi = max(x)`` over finite values, ``L = 2**b - 1`` levels,
``scale = (hi - lo) / L``, and each code is ``q = floor((x - lo) / scale + u)`` with
``u ~ U[0, 1)``. Then ``E[lo + q * scale] = x`` exactly (unbiased) and
``|lo + q * scale - x| < scale = (hi - lo) / (2**b - 1)``; the rounding variance per element
is at most ``scale**2 / 4``. All arithmetic is fp32 whatever the input dtype.

Layout. ``codes``: uint8 ``(n_groups, G * b // 8)``; a byte holds ``8 // b`` codes from the
group's ``8 // b`` planes of ``W = G * b // 8`` elements, lowest bits first (2-bit: element
``j*W + k`` sits in bits ``2j .. 2j+1`` of byte ``k``). ``meta``: fp32
``(n_groups, 2)`` holding ``(lo, scale)``.

Non-finite values. A group holding NaN or +-Inf is flagged by the sign bit of its stored scale,
and the three lowest bits of the scale's bit pattern say which kinds it holds (1: +Inf, 2: -Inf,
4: NaN; the scale itself is truncated to those bits' resolution before the codes are computed, so
codes and decode use the same scale). The ``k`` kinds present take the top ``k`` codes, in the
order +Inf, -Inf, NaN from code ``L`` down (a group holding only NaN: ``L`` is NaN; +Inf and NaN:
``L`` is +Inf, ``L - 1`` NaN), and its finite values use levels ``0 .. L - k`` (a 2-bit group
holding all three kinds has one level left: its finite values decode to the group's minimum).
So NaN, +Inf and -Inf come back exactly as they went in, finite values never turn non-finite, and
all-finite groups are untouched by any of this. Constant groups have ``scale == 0`` and decode
exactly.
"""

from __future__ import annotations

import math

import torch

from ..dtypes import FLOATS

__all__ = [
    "BITS",
    "DTYPES",
    "quantize_pack_reference",
    "dequantize_unpack_reference",
    "quantize_pack_traceable",
    "dequantize_unpack_traceable",
    "hash_uniform",
    "packed_shapes",
]

BITS = (2, 4, 8)
DTYPES = FLOATS  # the Triton kernels'; references take any float
# kind bits of a special group, in the low bits of its scale; the kinds present take the top codes
# in this order (+Inf at L)
KIND_POSINF, KIND_NEGINF, KIND_NAN = 1, 2, 4
KIND_MASK = 7
SIGN_BIT = -(2**31)  # int32 bit pattern of the sign bit
_FP32_MAX = torch.finfo(torch.float32).max


def _i32(c: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 hash on int32 tensors holding uint32 bits (wrapping multiplies; right
    shifts masked to be logical)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _i32(0x7FEB352D)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _i32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


def hash_uniform(seed: torch.Tensor, n_groups, group_size: int) -> torch.Tensor:
    """Counter-based ``U[0, 1)`` noise, fp32 ``(n_groups, G)``: element ``i`` gets
    ``hash32(i + key) >> 8`` scaled by ``2**-24`` (uint32 arithmetic, ``i`` taken mod ``2**32``),
    with ``key = hash32(s_lo ^ hash32(s_hi))`` computed once per call from
    ``seed = s_hi << 32 | s_lo``: one hash round per element (the seed is mixed once, so adjacent
    seeds give unrelated streams).

    Pure integer arithmetic, so eager, Inductor and Triton kernels draw identical bits. The 24-bit
    resolution biases stochastic rounding by at most ``2**-24`` of a step, below fp32's own rounding.
    """
    return noise_columns(seed_key(seed), n_groups, group_size, slice(0, group_size))


def seed_key(seed: torch.Tensor) -> torch.Tensor:
    s_lo = (seed & 0xFFFFFFFF).to(torch.int32)  # wraps to the same 32 bits
    s_hi = ((seed >> 32) & 0xFFFFFFFF).to(torch.int32)
    return _hash32(s_lo ^ _hash32(s_hi))  # 0-dim: once per call


def noise_columns(key: torch.Tensor, n_groups, group_size: int, cols: slice) -> torch.Tensor:
    """Columns ``cols`` of :func:`hash_uniform`'s noise, computed from their own element indices
    (a slice of the full noise would make Inductor materialise all of it)."""
    rows = torch.arange(n_groups, device=key.device, dtype=torch.int32)[:, None] * group_size
    i = rows + torch.arange(cols.start, cols.stop, device=key.device, dtype=torch.int32)[None, :]
    x = _hash32(i + key)
    return ((x >> 8) & 0xFFFFFF).to(torch.float32) * 2.0**-24


def check_format(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size}")


def packed_shapes(numel, bits: int, group_size: int):
    """Shapes of ``(codes, meta)`` for ``numel`` elements (works with SymInts)."""
    n_groups = (numel + group_size - 1) // group_size
    return (n_groups, group_size * bits // 8), (n_groups, 2)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    # x: any shape -> (n_groups, G) fp32, logical order, last group padded with its last element
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % group_size
    flat = torch.cat([flat, flat[-1:].expand(pad)])  # no branch: traceable with symbolic sizes
    return flat.view(-1, group_size)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, G) integer codes < 2**bits -> (n, G*bits//8) uint8, planar: with ``W = G*bits//8``
    bytes per group, element ``j*W + k`` sits in bits ``j*bits .. j*bits + bits-1`` of byte ``k``
    (lowest bits hold the first plane). Every plane is a contiguous slice, so packing and
    unpacking are vectorised loads, ORs and shifts (an interleaved layout needs strided loads)."""
    return pack_planes(lambda sl: q[:, sl], bits, q.shape[1])


def pack_planes(plane, bits: int, group_size: int) -> torch.Tensor:
    """:func:`pack_codes` of the codes ``plane(slice)`` gives for each plane's columns. Computing
    each plane from its own slice of the inputs keeps Inductor from materialising the full-size
    fp32 codes (it realises a value read through several slices): one pass reads x, writes codes."""
    per = 8 // bits
    width = group_size // per
    out = plane(slice(0, width)).to(torch.uint8, copy=True)  # never an alias of the input
    for j in range(1, per):
        out = out | (plane(slice(j * width, (j + 1) * width)).to(torch.uint8) << (j * bits))
    return out


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (n, G*bits//8) uint8 -> (n, G) uint8."""
    if bits == 8:
        return codes
    # column j*W + k is plane j of byte k: tile the bytes and shift each column by its plane's
    # offset. One pointwise expression (Inductor reads byte k of the tile by index and fuses the
    # unpacking into the decode's consumer); a cat of the planes is a buffer it materialises
    per = 8 // bits
    shift = (torch.arange(codes.shape[1] * per, device=codes.device) // codes.shape[1] * bits).to(torch.uint8)
    return (codes.repeat(1, per) >> shift) & ((1 << bits) - 1)


def _scale(lo: torch.Tensor, hi: torch.Tensor, levels) -> torch.Tensor:
    scale = (hi - lo) / levels
    return torch.where(torch.isinf(scale), hi / levels - lo / levels, scale)  # hi - lo overflowed


def group_affine(lo, hi, usable):
    """Per group: ``scale``, and the ``half`` factor and ``inv`` multiplier :func:`codes_of` uses."""
    scale = _scale(lo, hi, usable)
    return (scale, *_half_inv(lo, hi, scale))


def _half_inv(lo, hi, scale):
    # groups spanning more than fp32's max work at half scale so that x - lo cannot overflow
    half = torch.where(torch.isinf(hi - lo), 0.5, 1.0)[:, None]
    inv = 1.0 / (torch.where(scale > 0, scale, 1.0)[:, None] * half)  # per group: multiply below
    return half, inv


def codes_of(g, u, lo, half, inv, usable):
    """Stochastically rounded codes, fp32 in ``[0, usable]``, of values ``g`` with noise ``u``."""
    v = (g * half - lo[:, None] * half) * inv
    return torch.minimum(torch.floor(v + u).clamp_min(0), usable[:, None])


def _codes(g, u, lo, hi, usable):
    """Stochastically rounded codes (n, G) fp32 in ``[0, usable]`` and the per-group scale."""
    scale, half, inv = group_affine(lo, hi, usable)
    return codes_of(g, u, lo, half, inv, usable), scale


def _quantize_general(g: torch.Tensor, noise, finite: torch.Tensor, bits: int):
    """Branch-free quantization of groups ``g`` (n, G), NaN/Inf handled; ``noise(cols)`` gives the
    rounding noise of columns ``cols``."""
    levels = (1 << bits) - 1
    lo = torch.where(finite, g, torch.inf).amin(1)
    hi = torch.where(finite, g, -torch.inf).amax(1)
    # the kinds of non-finite values each group holds, as counts: fp32 sums fuse with the min and
    # max into one vectorised pass (isnan and any() do not vectorise in Inductor's CPU code)
    pinf = torch.where(g == torch.inf, 1.0, 0.0).sum(1).gt(0).to(torch.int32)
    ninf = torch.where(g == -torch.inf, 1.0, 0.0).sum(1).gt(0).to(torch.int32)
    nan = torch.where(g != g, 1.0, 0.0).sum(1).gt(0).to(torch.int32)
    kinds = pinf * KIND_POSINF + ninf * KIND_NEGINF + nan * KIND_NAN
    special = kinds != 0
    empty = torch.isinf(lo)  # no finite value at all
    lo = torch.where(empty, 0.0, lo)
    hi = torch.where(empty, 0.0, hi)
    usable = levels - (pinf + ninf + nan).float()  # the kinds present take the top codes
    # one level above lo (2 bits, two kinds) cannot span a range beyond fp32's max: the largest
    # finite scale then (values stay finite and inside [lo, hi]); none (three kinds): lo only
    scale = _scale(lo, hi, usable.clamp_min(1.0)).clamp_max(_FP32_MAX)
    scale = torch.where(usable > 0, scale, 0.0)
    # special groups: sign bit set, kinds in the low bits; the codes use the truncated scale
    sbits = scale.view(torch.int32)
    sbits = torch.where(special, (sbits & ~KIND_MASK) | kinds | SIGN_BIT, sbits)
    scale = torch.where(special, sbits & ~KIND_MASK & ~SIGN_BIT, sbits).view(torch.float32)
    half, inv = _half_inv(lo, hi, scale)
    # top codes of the non-finite values: +Inf at L, then -Inf, then NaN (only the kinds present)
    code_ninf = float(levels) - pinf.float()
    code_nan = code_ninf - ninf.float()

    def plane(sl):
        gs, fs = g[:, sl], finite[:, sl]
        q = codes_of(torch.where(fs, gs, lo[:, None]), noise(sl), lo, half, inv, usable)
        top = torch.where(gs == gs, torch.where(gs > 0, float(levels), code_ninf[:, None]), code_nan[:, None])
        return torch.where(fs, q, top)

    return pack_planes(plane, bits, g.shape[1]), torch.stack([lo, sbits.view(torch.float32)], 1)


def quantize_pack_traceable(x: torch.Tensor, seed: torch.Tensor, bits: int, group_size: int):
    """:func:`quantize_pack_reference` with :func:`hash_uniform` noise and no data-dependent
    branches, so it can be traced into a graph and fused by Inductor (same results)."""
    g = _grouped(x, group_size)
    key = seed_key(seed)
    noise = lambda cols: noise_columns(key, g.shape[0], group_size, cols)  # noqa: E731
    return _quantize_general(g, noise, torch.isfinite(g), bits)


def quantize_pack_reference(
    x: torch.Tensor, bits: int, group_size: int = 256, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to ``bits`` per element; returns ``(codes, meta)`` (see module docstring).

    ``noise`` is the ``U[0,1)`` rounding noise, shape ``(n_groups, G)`` fp32; ``None`` rounds to
    nearest (deterministic, biased). Example::

        codes, meta = quantize_pack_reference(torch.randn(1000), 4, 256, torch.rand(4, 256))
    """
    check_format(bits, group_size)
    levels = (1 << bits) - 1
    g = _grouped(x, group_size)  # (n, G) fp32
    u = torch.full_like(g, 0.5) if noise is None else noise.reshape(g.shape).float()
    finite = torch.isfinite(g)
    if bool(finite.all()):  # the common case: no NaN/Inf anywhere, no special groups
        lo, hi = g.amin(1), g.amax(1)
        q, scale = _codes(g, u, lo, hi, torch.full_like(lo, levels))
        return pack_codes(q, bits), torch.stack([lo, scale], 1)
    return _quantize_general(g, lambda cols: u[:, cols], finite, bits)


def decode_groups(codes: torch.Tensor, meta: torch.Tensor, bits: int, specials: bool) -> torch.Tensor:
    """(n, G) fp32 values from codes and meta; ``specials=False`` skips the NaN/Inf decoding."""
    levels = (1 << bits) - 1
    q = unpack_codes(codes, bits).float()  # (n, G)
    lo, scale = meta[:, 0:1], meta[:, 1:2]
    if specials:
        sbits = scale.contiguous().view(torch.int32)
        special = sbits < 0
        scale = torch.where(special, sbits & ~KIND_MASK & ~SIGN_BIT, sbits).view(torch.float32)
    half = q * (scale * 0.5)
    x = (lo + half) + half  # lo + q * scale without overflowing when the range exceeds fp32's max
    # rounding of scale can carry the top code a few ulps past hi: never past fp32's max into Inf
    x = x.clamp(-_FP32_MAX, _FP32_MAX)
    if specials:
        kinds = torch.where(special, sbits & KIND_MASK, 0)  # (n, 1)
        pinf, ninf, nan = ((kinds & k) != 0 for k in (KIND_POSINF, KIND_NEGINF, KIND_NAN))
        usable = levels - (pinf.float() + ninf.float() + nan.float())
        # per group, the values of codes L and L - 1 (L - 2 is only ever NaN): +Inf, -Inf, NaN in
        # that order, of the kinds present
        first = torch.where(pinf, torch.inf, torch.where(ninf, -torch.inf, torch.nan))
        second = torch.where(pinf & ninf, -torch.inf, torch.nan)
        top = torch.where(q == levels, first, torch.where(q == levels - 1, second, torch.nan))
        x = torch.where(q > usable, top, x)
    return x


def dequantize_unpack_traceable(
    codes: torch.Tensor, meta: torch.Tensor, bits: int, group_size: int, shape, dtype: torch.dtype
) -> torch.Tensor:
    """Branch-free :func:`dequantize_unpack_reference` (contiguous result), for tracing."""
    x = decode_groups(codes, meta, bits, specials=True)
    return x.reshape(-1)[: math.prod(shape)].to(dtype).view(shape)


def dequantize_unpack_reference(
    codes: torch.Tensor,
    meta: torch.Tensor,
    bits: int,
    group_size: int,
    shape,
    dtype: torch.dtype,
    stride=None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_pack_reference`: returns a ``dtype`` tensor of ``shape``
    (with ``stride`` if given, else contiguous)."""
    check_format(bits, group_size)
    specials = bool((meta[:, 1].contiguous().view(torch.int32) < 0).any())
    x = decode_groups(codes, meta, bits, specials)
    numel = math.prod(shape)
    out = x.reshape(-1)[:numel].to(dtype).view(shape)
    if stride is not None and tuple(out.stride()) != tuple(stride) and numel > 0:
        out = torch.empty_strided(shape, stride, dtype=dtype, device=out.device).copy_(out)
    return out
