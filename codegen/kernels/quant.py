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

Layout. ``codes``: uint8 ``(n_groups, G * b // 8)``; a byte holds ``8 // b`` codes, lowest bits
first (2-bit: element ``4k + j`` sits in bits ``2j .. 2j+1`` of byte ``k``). ``meta``: fp32
``(n_groups, 2)`` holding ``(lo, scale)``.

Non-finite values. A group holding NaN or +-Inf is flagged by the sign bit of its scale; its top
code ``L`` then means "non-finite" and its finite values use levels ``0 .. L-1``. Which non-finite
value it decodes to sits in the two lowest mantissa bits of the stored scale (0: NaN, 1: +Inf,
2: -Inf; a group mixing kinds decodes all of them to NaN). Finite values therefore never turn
into NaN, and Inf/NaN come back as they went in. Constant groups have ``scale == 0`` and decode
exactly.
"""

from __future__ import annotations

import torch

__all__ = [
    "BITS",
    "quantize_pack_reference",
    "dequantize_unpack_reference",
    "packed_shapes",
]

BITS = (2, 4, 8)
_KIND_NAN, _KIND_POSINF, _KIND_NEGINF = 0, 1, 2
_SIGN = -(2**31)  # int32 bit pattern of the sign bit


def _check(bits: int, group_size: int) -> None:
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
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, G) integer codes < 2**bits -> (n, G*bits//8) uint8, lowest bits first."""
    q = q.to(torch.uint8)
    if bits == 8:
        return q
    per = 8 // bits
    q = q.view(q.shape[0], q.shape[1] // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
    return (q << shifts).sum(-1, dtype=torch.uint8)


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (n, G*bits//8) uint8 -> (n, G) uint8."""
    if bits == 8:
        return codes
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    mask = (1 << bits) - 1
    return ((codes.unsqueeze(-1) >> shifts) & mask).view(codes.shape[0], codes.shape[1] * (8 // bits))


def _scale(lo: torch.Tensor, hi: torch.Tensor, levels) -> torch.Tensor:
    scale = (hi - lo) / levels
    return torch.where(torch.isinf(scale), hi / levels - lo / levels, scale)  # hi - lo overflowed


def _normalise(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x - lo) / scale per group, 0 for constant groups, without overflowing x - lo."""
    safe = torch.where(scale > 0, scale, 1.0)[:, None]
    v = (x - lo[:, None]) / safe
    # groups spanning more than fp32's max: halve both sides so x - lo cannot overflow
    return torch.where(torch.isinf(v), (x * 0.5 - lo[:, None] * 0.5) / (safe * 0.5), v)


def quantize_pack_reference(
    x: torch.Tensor, bits: int, group_size: int = 256, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to ``bits`` per element; returns ``(codes, meta)`` (see module docstring).

    ``noise`` is the ``U[0,1)`` rounding noise, shape ``(n_groups, G)`` fp32; ``None`` rounds to
    nearest (deterministic, biased). Example::

        codes, meta = quantize_pack_reference(torch.randn(1000), 4, 256, torch.rand(4, 256))
    """
    _check(bits, group_size)
    levels = (1 << bits) - 1
    g = _grouped(x, group_size)  # (n, G) fp32
    u = torch.full_like(g, 0.5) if noise is None else noise.reshape(g.shape).float()
    finite = torch.isfinite(g)
    if bool(finite.all()):  # the common case: no NaN/Inf anywhere, no special groups
        lo, hi = g.amin(1), g.amax(1)
        scale = _scale(lo, hi, levels)
        q = torch.minimum(torch.floor(_normalise(g, lo, scale) + u).clamp_min(0), torch.tensor(levels))
        return pack_codes(q, bits), torch.stack([lo, scale], 1)
    lo = torch.where(finite, g, torch.inf).amin(1)
    hi = torch.where(finite, g, -torch.inf).amax(1)
    special = ~finite.all(1)  # (n,) groups holding NaN/Inf
    all_special = torch.isinf(lo)  # no finite value at all
    lo = torch.where(all_special, 0.0, lo)
    hi = torch.where(all_special, 0.0, hi)
    usable = levels - special.to(torch.int32)  # special groups keep the top code for non-finite
    scale = _scale(lo, hi, usable)
    q = torch.floor(_normalise(torch.where(finite, g, lo[:, None]), lo, scale) + u)
    q = torch.minimum(q.clamp_min(0), usable[:, None].float())
    q = torch.where(finite, q, float(levels))
    # Encode the special flag and non-finite kind into the stored scale's bit pattern.
    has_nan = torch.isnan(g).any(1)
    has_pos = (g == torch.inf).any(1)
    has_neg = (g == -torch.inf).any(1)
    kind = torch.where(
        has_nan | (has_pos & has_neg),
        _KIND_NAN,
        torch.where(has_pos, _KIND_POSINF, _KIND_NEGINF),
    ).to(torch.int32)
    sbits = scale.view(torch.int32)
    sbits = torch.where(special, (sbits & ~3) | kind | _SIGN, sbits)
    meta = torch.stack([lo, sbits.view(torch.float32)], 1)
    return pack_codes(q, bits), meta


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
    _check(bits, group_size)
    levels = (1 << bits) - 1
    q = unpack_codes(codes, bits).float()  # (n, G)
    lo = meta[:, 0:1]
    sbits = meta[:, 1:2].contiguous().view(torch.int32)
    special = sbits < 0
    any_special = bool(special.any())
    scale = (
        torch.where(special, (sbits & ~3 & ~_SIGN), sbits).view(torch.float32)
        if any_special
        else meta[:, 1:2]
    )
    half = q * (scale * 0.5)
    x = (lo + half) + half  # lo + q * scale without overflowing when the range exceeds fp32's max
    if any_special:
        kind = sbits & 3
        nonfinite = torch.where(
            kind == _KIND_POSINF, torch.inf, torch.where(kind == _KIND_NEGINF, -torch.inf, torch.nan)
        )
        x = torch.where(special & (q == levels), nonfinite, x)
    numel = 1
    for s in shape:
        numel *= s
    out = x.reshape(-1)[:numel].to(dtype).view(shape)
    if stride is not None and tuple(out.stride()) != tuple(stride) and numel > 0:
        out = torch.empty_strided(shape, stride, dtype=dtype, device=out.device).copy_(out)
    return out
