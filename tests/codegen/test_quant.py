"""Numerics of codegen/kernels/quant.py: per-group min/max quantization with stochastic rounding.

Checks the error bound per group (range / (2**b - 1) with noise, half of it rounding to nearest),
unbiasedness of stochastic rounding over many noise draws, the bit layout of the packed codes,
non-finite and constant groups, odd / empty / non-contiguous inputs, strides and argument errors.
The oracle (group ranges, expected codes) is computed here from the logical element order, never
from the kernel's own intermediates.
"""

import math

import pytest
import torch

from fxlowbit.codegen.kernels.quant import (
    BITS,
    dequantize_unpack_reference,
    dequantize_unpack_traceable,
    hash_uniform,
    pack_codes,
    quantize_pack_reference,
    quantize_pack_traceable,
    unpack_codes,
)

from ._views import NONCONTIGUOUS

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUP_SIZES = (8, 64, 256)
SHAPES = ((1,), (255,), (257,), (4097,), (3, 5, 7))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed)) * 3 + 0.5).to(dtype)


def _noise(numel: int, group_size: int, seed=1) -> torch.Tensor:
    return torch.rand(-(-numel // group_size), group_size, generator=_gen(seed))


def _roundtrip(x, bits, group_size, noise, stride=None):
    codes, meta = quantize_pack_reference(x, bits, group_size, noise)
    return dequantize_unpack_reference(codes, meta, bits, group_size, x.shape, x.dtype, stride)


def _group_range(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per element: max - min over the finite values of its group (logical order), fp64."""
    flat = x.reshape(-1).double()
    n = flat.numel()
    g = torch.cat([flat, flat.new_full(((-n) % group_size,), math.nan)]).view(-1, group_size)
    fin = torch.isfinite(g)
    lo = torch.where(fin, g, math.inf).amin(1)
    hi = torch.where(fin, g, -math.inf).amax(1)
    rng = torch.where(fin.any(1), hi - lo, 0.0)
    return rng.repeat_interleave(group_size)[:n].view(x.shape)


def _bound(x, group_size, steps, half=False):
    """Allowed |x' - x| per element: one step ``range / steps`` (half a step rounding to nearest),
    plus fp32 slack for ``lo + q * scale`` (a few ulps of |x| + range; the stored scale also loses
    its three low mantissa bits in special groups), plus the final rounding of the decoded value to
    ``x.dtype``: at most eps(dtype)/2 relative to |x'| <= |x| + step."""
    rng = _group_range(x, group_size)
    step = rng / steps
    ax = x.double().abs()
    fp32_slack = 8 * torch.finfo(torch.float32).eps * (ax + rng)
    dtype_round = torch.finfo(x.dtype).eps / 2 * (ax + step)
    return (step / 2 if half else step) + fp32_slack + dtype_round


# ---------------------------------------------------------------- round trip error bound


@pytest.mark.parametrize("noise", ["rand", "nearest"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_roundtrip_error_within_one_step(bits, dtype, group_size, shape, noise):
    x = _rand(shape, dtype)
    u = _noise(x.numel(), group_size) if noise == "rand" else None
    y = _roundtrip(x, bits, group_size, u)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    err = (y.double() - x.double()).abs()
    bound = _bound(x, group_size, 2**bits - 1, half=u is None)
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("bits", BITS)
def test_roundtrip_error_bound_is_tight_enough_to_fail(bits):
    """The bound above is not vacuous: decoding with the scale doubled breaks it."""
    x = _rand((4096,))
    codes, meta = quantize_pack_reference(x, bits, 64, None)
    meta = meta * torch.tensor([1.0, 2.0])
    y = dequantize_unpack_reference(codes, meta, bits, 64, x.shape, x.dtype)
    assert not torch.all((y.double() - x.double()).abs() <= _bound(x, 64, 2**bits - 1))


@pytest.mark.parametrize("bits", BITS)
def test_all_codes_used_and_sqnr_floor(bits):
    """Uniform data spans all 2**b levels; round to nearest on uniform data has error variance
    scale**2 / 12 against signal variance range**2 / 12, so SQNR = 20 log10(2**b - 1) dB."""
    x = torch.rand(64 * 256, generator=_gen(3)) * 10 - 5
    codes, meta = quantize_pack_reference(x, bits, 256, None)
    q = unpack_codes(codes, bits)
    assert q.min() == 0 and q.max() == 2**bits - 1
    y = dequantize_unpack_reference(codes, meta, bits, 256, x.shape, x.dtype)
    sqnr = 20 * math.log10(x.norm() / (x - y).norm())
    assert sqnr >= 20 * math.log10(2**bits - 1) - 1  # 1 dB margin


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_rounding_is_unbiased(bits):
    levels, group, draws = 2**bits - 1, 64, 2000
    # One group with lo = 0 and hi = levels, so scale == 1 exactly; interior values at random
    # fractions of a step, and four at exactly 1/4 or 3/4 of a step.
    x = torch.rand(group, generator=_gen(0)) * levels
    x[0], x[1] = 0.0, float(levels)
    x[2:6] = torch.tensor([0.25, 1.25, levels - 0.75, levels - 0.25])
    # N independent draws = the same group repeated N times with independent noise.
    codes, meta = quantize_pack_reference(
        x.repeat(draws), bits, group, torch.rand(draws, group, generator=_gen(1))
    )
    assert torch.all(meta == torch.tensor([0.0, 1.0]))
    y = dequantize_unpack_reference(codes, meta, bits, group, (draws, group), torch.float32)
    bias = y.double().mean(0) - x.double()
    # Each draw is x + e with E[e] = 0 and Var[e] = f(1 - f) scale^2 <= scale^2 / 4 (f: fractional
    # position in the step), so the mean of N draws has sigma <= scale / (2 sqrt(N)). With k = 5 a
    # correct kernel exceeds the bound per element with probability < 6e-7 (CLT); the seeded
    # generator makes the test deterministic anyway. The bias averaged over the 64 independent
    # elements gets the same k with sigma / sqrt(64).
    scale = 1.0
    tol = 5 * scale / (2 * math.sqrt(draws))
    assert bias.abs().max() <= tol
    assert abs(bias.mean()) <= tol / math.sqrt(group)
    # The bound can fail: round to nearest is off by -scale/4 at 1/4 step (+scale/4 at 3/4).
    c, m = quantize_pack_reference(x, bits, group, None)
    rtn_bias = dequantize_unpack_reference(c, m, bits, group, x.shape, torch.float32) - x
    assert torch.equal(rtn_bias[2:6], torch.tensor([-0.25, -0.25, -0.25, 0.25]))
    assert torch.all(rtn_bias[2:6].abs() > tol)


def test_stochastic_rounding_only_picks_the_two_neighbours():
    """Probability of rounding up equals the fractional position (checked at 0.25 and 0.75)."""
    draws = 4000
    x = torch.tensor([0.0, 0.25, 0.75, 3.0] * 2)  # bits=2: lo=0, hi=3, scale=1
    codes, meta = quantize_pack_reference(x.repeat(draws), 2, 8, torch.rand(draws, 8, generator=_gen(2)))
    q = unpack_codes(codes, 2).view(draws, 8)[:, :4].double()
    assert torch.equal(q[:, 0], torch.zeros(draws)) and torch.equal(q[:, 3], torch.full((draws,), 3.0))
    assert set(q[:, 1].tolist()) == {0.0, 1.0} and set(q[:, 2].tolist()) == {0.0, 1.0}
    # Bernoulli(p) frequency: sigma = sqrt(p(1-p)/N) ~ 0.0068; 5 sigma.
    tol = 5 * math.sqrt(0.25 * 0.75 / draws)
    assert abs(q[:, 1].mean() - 0.25) <= tol and abs(q[:, 2].mean() - 0.75) <= tol


# ---------------------------------------------------------------- packing layout


@pytest.mark.parametrize("n,group_size", [(1, 8), (3, 64), (5, 256)])
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_codes_bit_exact(bits, n, group_size):
    q = torch.randint(0, 2**bits, (n, group_size), generator=_gen(0), dtype=torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (n, group_size * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), q)
    # Every byte value survives unpack -> pack.
    every = torch.arange(256, dtype=torch.uint8).view(1, 256)
    assert torch.equal(pack_codes(unpack_codes(every, bits), bits), every)


@pytest.mark.parametrize(
    "bits,codes,packed",
    [
        # 2-bit, W = 2 bytes: element 2j + k in bits 2j..2j+1 of byte k: 1 | 3<<2 | 3<<4 | 0<<6 = 61,
        # 2 | 0<<2 | 3<<4 | 1<<6 = 114
        (2, [1, 2, 3, 0, 3, 3, 0, 1], [61, 114]),
        # 4-bit, W = 4: element k in the low nibble of byte k, element 4 + k in its high nibble.
        (4, [0xA, 0x3, 0xF, 0x0, 1, 2, 3, 4], [0x1A, 0x23, 0x3F, 0x40]),
        (8, [0, 1, 2, 127, 128, 200, 254, 255], [0, 1, 2, 127, 128, 200, 254, 255]),
    ],
)
def test_pack_codes_planar_layout_lowest_bits_first(bits, codes, packed):
    q = torch.tensor([codes], dtype=torch.uint8)
    assert pack_codes(q, bits).tolist() == [packed]
    assert unpack_codes(torch.tensor([packed], dtype=torch.uint8), bits).tolist() == [codes]


def test_quantize_layout_end_to_end():
    """Known values -> known codes, bytes and meta (2-bit, round to nearest)."""
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0, 10.0, 10.0, 10.0, 16.0, 10.0, 10.0, 13.0, 12.1])
    codes, meta = quantize_pack_reference(x, 2, 8, None)
    # planar, W = 2: byte k holds elements k, 2 + k, 4 + k, 6 + k from the lowest bits up
    # group 0: lo 0, scale 1, codes 0 1 2 3 3 2 1 0 -> 0 | 2<<2 | 3<<4 | 1<<6 = 120, 1 | 3<<2 | 2<<4 = 45
    # group 1: lo 10, scale 2, codes 0 0 0 3 0 0 2 1 (12.1 -> 1.05 -> 1) -> 2<<6 = 128, 3<<2 | 1<<6 = 76
    assert codes.tolist() == [[120, 45], [128, 76]]
    assert meta.tolist() == [[0.0, 1.0], [10.0, 2.0]]


# ---------------------------------------------------------------- special values


NAN, INF = math.nan, math.inf
SPECIAL_GROUPS = [
    # (group of 8 inputs, what its non-finite elements decode to: exactly what went in)
    ([1.0, NAN, -2.0, 3.0, 0.5, 7.0, -1.0, 2.0], [NAN]),
    ([1.0, INF, -2.0, 3.0, 0.5, 7.0, -1.0, INF], [INF, INF]),
    ([-INF, 1.0, -2.0, 3.0, 0.5, 7.0, -1.0, 2.0], [-INF]),
    ([NAN] * 8, [NAN] * 8),
    ([INF] * 8, [INF] * 8),
    ([INF, -INF, 1.0, 2.0, 4.0, 5.0, -3.0, 0.25], [INF, -INF]),  # two kinds: two top codes
    ([NAN, INF, 1.0, 2.0, 4.0, 5.0, -3.0, 0.25], [NAN, INF]),
    ([-INF, 1.0, NAN, 2.0, 4.0, -INF, -3.0, 0.25], [-INF, NAN, -INF]),
    ([NAN, INF, -INF, 2.0, 4.0, 5.0, -3.0, 0.25], [NAN, INF, -INF]),  # three: one level left at 2 bits
    ([-INF, NAN, INF, -INF, INF, NAN, NAN, INF], [-INF, NAN, INF, -INF, INF, NAN, NAN, INF]),
    ([4.0, 4.0, 4.0, NAN, 4.0, 4.0, 4.0, 4.0], [NAN]),  # constant finite part + NaN
]


def _kinds(group) -> int:
    """How many kinds of non-finite values (+Inf, -Inf, NaN) a group holds."""
    return len({"nan" if math.isnan(v) else v for v in group if not math.isfinite(v)})


@pytest.mark.parametrize("noise", ["rand", "nearest"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_nonfinite_groups(bits, dtype, noise):
    # one ordinary group first, then every special group once
    rows = [[0.5, -1.5, 2.0, 3.25, -4.0, 1.0, 0.0, 2.5]] + [g for g, _ in SPECIAL_GROUPS]
    x = torch.tensor(rows).to(dtype)
    u = _noise(x.numel(), 8) if noise == "rand" else None
    y = _roundtrip(x, bits, 8, u)
    finite = torch.isfinite(x)
    assert torch.all(torch.isfinite(y[finite])), "a finite input decoded to NaN/Inf"
    expected = torch.tensor([v for _, kinds in SPECIAL_GROUPS for v in kinds])
    got = y[~finite].float()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(got), kind(expected))
    # Finite values: one step of range / (L - k) in a group holding k kinds (they take the top
    # codes), range / L else; with no level left but one (2 bits, k = 3) the whole range.
    usable = torch.tensor([float(2**bits - 1 - _kinds(row)) for row in rows])[:, None].expand(x.shape)
    steps = usable.clamp_min(1.0)
    bound = torch.where(usable > 0, _bound(x, 8, steps, half=u is None), _bound(x, 8, steps))
    assert (usable == 0).any() == (bits == 2)
    err = (y.double() - x.double()).abs()
    assert torch.all(err[finite] <= bound[finite])


@pytest.mark.parametrize("bits", BITS)
def test_special_group_flag_in_meta(bits):
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1.0, 2.0, NAN, 4.0, 5.0, 6.0, 7.0, 8.0])
    codes, meta = quantize_pack_reference(x, bits, 8, None)
    q = unpack_codes(codes, bits)
    assert not meta[0, 1].signbit() and meta[1, 1].signbit()
    assert q[1, 2] == 2**bits - 1 and q[1].tolist().count(2**bits - 1) == 1  # only the NaN


@pytest.mark.parametrize("value", [0.0, -3.5, 1e-30, 1.0 / 3, 65504.0, 3e38])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_decode_exactly(bits, dtype, value):
    if value > torch.finfo(dtype).max:
        pytest.skip("not representable")
    x = torch.full((3, 40), value).to(dtype)  # 120 elements = 15 groups of 8
    x[2, 32:] = 0.125  # the last group holds another constant
    codes, meta = quantize_pack_reference(x, bits, 8, _noise(120, 8))
    assert torch.all(meta[:, 1] == 0)  # scale 0, not flagged special
    y = dequantize_unpack_reference(codes, meta, bits, 8, x.shape, dtype)
    assert torch.equal(y, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_wide_finite_inputs_stay_finite(bits, dtype):
    big = torch.finfo(dtype).max / 4
    x = torch.cat([torch.randn(500, generator=_gen(4)) * 10.0**k for k in range(-6, 7)])
    x = torch.cat([x.clamp(-big, big), torch.tensor([big, -big, torch.finfo(dtype).tiny, 0.0])]).to(dtype)
    y = _roundtrip(x, bits, 64, _noise(x.numel(), 64))
    assert torch.all(torch.isfinite(y))


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_values_at_the_dtype_max_decode_finite_within_their_group(bits, dtype, special):
    """Groups spanning [-max, max] of the dtype (fp16: 65504, where a range computed in fp16 would
    overflow): the statistics are fp32, every decoded value is finite and inside its group's
    [min, max] (after rounding to the dtype), traced form and reference alike."""
    top = torch.finfo(dtype).max
    x = (torch.rand(64, 256, generator=_gen(5)) * 2 - 1) * top
    x[:, 0], x[:, 1] = top, -top
    x = x.to(dtype)
    if special:  # non-finite values take one, two or three top codes
        x[::2, 7], x[1::4, 9], x[::3, 11] = math.inf, math.nan, -math.inf
    y = _roundtrip(x, bits, 256, _noise(x.numel(), 256))
    seed = torch.tensor(77)
    codes, meta = quantize_pack_traceable(x, seed, bits, 256)
    y2 = dequantize_unpack_traceable(codes, meta, bits, 256, x.shape, dtype)
    finite = x.isfinite()
    lo = torch.where(finite, x, top).amin(1, keepdim=True)
    hi = torch.where(finite, x, -top).amax(1, keepdim=True)
    for out in (y, y2):
        assert torch.all(out[finite].isfinite())
        inside = (out >= lo) & (out <= hi)
        assert torch.all(inside | ~finite)
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(out), kind(x))


def test_finite_group_with_range_beyond_fp32_max_decodes_finite():
    x = torch.tensor([-3e38, 0.0, 3e38, 1.0, -1.0, 2.0, 5.0, 7.0])
    y = _roundtrip(x, 4, 8, None)
    assert torch.all(torch.isfinite(y))
    assert torch.all((y.double() - x.double()).abs() <= 6e38 / 15 / 2 * (1 + 1e-6))


# ---------------------------------------------------------------- shapes, strides, empty


@pytest.mark.parametrize("make", NONCONTIGUOUS.values(), ids=NONCONTIGUOUS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_noncontiguous_input_matches_contiguous(bits, dtype, make):
    x = make(_rand((33, 40), dtype))
    assert not x.is_contiguous()
    u = _noise(x.numel(), 64)
    c1, m1 = quantize_pack_reference(x, bits, 64, u)
    c2, m2 = quantize_pack_reference(x.contiguous(), bits, 64, u)
    assert torch.equal(c1, c2) and torch.equal(m1, m2)
    y = dequantize_unpack_reference(c1, m1, bits, 64, x.shape, dtype, x.stride())
    assert y.stride() == x.stride()
    assert torch.equal(y, dequantize_unpack_reference(c2, m2, bits, 64, x.shape, dtype))


@pytest.mark.parametrize(
    "shape,stride",
    [((3, 5), (1, 3)), ((2, 3, 4), (1, 2, 6)), ((4, 1), (1, 4)), ((6, 7), (7, 1)), ((5, 6), (12, 2))],
    ids=str,
)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_honours_stride(bits, shape, stride):
    x = _rand(shape)
    codes, meta = quantize_pack_reference(x, bits, 8, None)
    y = dequantize_unpack_reference(codes, meta, bits, 8, shape, torch.float16, stride)
    assert y.stride() == stride and y.shape == shape and y.dtype == torch.float16
    assert torch.equal(y, dequantize_unpack_reference(codes, meta, bits, 8, shape, torch.float16))


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 7)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_empty_tensor(bits, dtype, shape):
    x = torch.empty(shape, dtype=dtype)
    codes, meta = quantize_pack_reference(x, bits, 64, _noise(0, 64))
    assert codes.shape == (0, 64 * bits // 8) and codes.dtype == torch.uint8
    assert meta.shape == (0, 2) and meta.dtype == torch.float32
    y = dequantize_unpack_reference(codes, meta, bits, 64, shape, dtype)
    assert y.shape == shape and y.dtype == dtype


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_codes_empty(bits):
    assert pack_codes(torch.empty(0, 64, dtype=torch.uint8), bits).shape == (0, 64 * bits // 8)


@pytest.mark.parametrize("bits", [2, 4])
def test_unpack_codes_empty(bits):
    assert unpack_codes(torch.empty(0, 64 * bits // 8, dtype=torch.uint8), bits).shape == (0, 64)


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize("bits,group_size,bad", [(3, 64, "3"), (1, 64, "1"), (4, 0, "0"), (4, 12, "12")])
def test_bad_arguments_raise(bits, group_size, bad):
    x = torch.randn(64)
    with pytest.raises(ValueError, match=rf"got {bad}\b"):
        quantize_pack_reference(x, bits, group_size)
    codes, meta = torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(8, 2)
    with pytest.raises(ValueError, match=rf"got {bad}\b"):
        dequantize_unpack_reference(codes, meta, bits, group_size, (64,), torch.float32)


# ---------------------------------------------------------------- hash noise and traceable forms


def _seed(s: int) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.int64)


def test_hash_uniform_is_uniform_and_uncorrelated():
    u = hash_uniform(_seed(0x1234_5678_9ABC), 4096, 256).flatten()  # 1M samples
    assert u.min() >= 0 and u.max() < 1
    # U[0,1): mean 1/2, variance 1/12; 5-sigma bounds for 2^20 samples
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12) ** 0.5 / n**0.5
    assert abs(u.var().item() - 1 / 12) < 5 * (1 / 180) ** 0.5 / n**0.5
    # chi-square over 64 bins (63 dof: mean 63, sd ~11.2); 120 is beyond 5 sd
    counts = torch.histc(u, 64, 0, 1)
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum().item()
    assert chi2 < 120
    # neighbours and other seeds are uncorrelated
    v = hash_uniform(_seed(0x1234_5678_9ABD), 4096, 256).flatten()
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1]) < 0.01
    assert torch.equal(u, hash_uniform(_seed(0x1234_5678_9ABC), 4096, 256).flatten())  # deterministic


def test_hash_uniform_uses_both_seed_halves():
    a = hash_uniform(_seed(5), 4, 64)
    assert not torch.equal(a, hash_uniform(_seed(5 + (1 << 32)), 4, 64))
    assert not torch.equal(a, hash_uniform(_seed(6), 4, 64))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("special", [False, True])
def test_traceable_forms_equal_references(bits, special):
    x = torch.randn(37, 29, generator=_gen(3)) * 3
    if special:
        x[0, :5] = torch.tensor([math.nan, math.inf, -math.inf, 1e38, -1e38])
        x[10:12] = math.inf
    seed = _seed(987654321)
    codes, meta = quantize_pack_traceable(x, seed, bits, 64)
    rc, rm = quantize_pack_reference(x, bits, 64, hash_uniform(seed, codes.shape[0], 64))
    assert torch.equal(codes, rc)
    assert torch.equal(meta.view(torch.int32), rm.view(torch.int32))  # bit for bit, NaN payloads too
    got = dequantize_unpack_traceable(codes, meta, bits, 64, x.shape, torch.float32)
    ref = dequantize_unpack_reference(codes, meta, bits, 64, x.shape, torch.float32)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
