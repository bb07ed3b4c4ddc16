"""Numerics of codegen/kernels/sparse24.py and sparse24_state.py: 2:4 masks, MVUE, the sparse linear.

Oracles are computed here independently: the valid 4x4 patterns by filtering all 2**16 binary
matrices, the best pattern by brute force, top-2 by sorting, MVUE probabilities by hand-worked
cases and its expectation and variance from the closed forms ``E = x`` and
``Var_i = x_i^2 (1/p_i - 1)``.
"""

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from fxlowbit.codegen.kernels import sparse24_linear as s24l
from fxlowbit.codegen.kernels.quant import hash_uniform
from fxlowbit.codegen.kernels.sparse24 import (
    PATTERNS,
    is_24,
    masked_weight,
    mvue24,
    mvue24_probabilities,
    mvue24_reference,
    plain_mask,
    transposable_mask,
)
from fxlowbit.codegen.kernels.sparse24_linear import sparse24_linear
from fxlowbit.codegen.kernels.sparse24_state import Sparse24State

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((4, 4), (12, 20), (20, 12), (8, 4), (4, 8), (64, 36))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """(out, in) -> (out/4 * in/4, 4, 4) blocks, row-major over blocks."""
    o, i = t.shape
    return t.reshape(o // 4, 4, i // 4, 4).transpose(1, 2).reshape(-1, 4, 4)


def _valid_patterns() -> torch.Tensor:
    """All 4x4 0/1 matrices with row and column sums 2, from all 2**16 matrices: (90, 4, 4)."""
    bits = torch.tensor(list(itertools.product((0, 1), repeat=16)), dtype=torch.float32).view(-1, 4, 4)
    ok = (bits.sum(2) == 2).all(1) & (bits.sum(1) == 2).all(1)
    return bits[ok]


# ---------------------------------------------------------------------------------------- masks


def test_patterns_are_exactly_the_90_doubly_2_of_4_matrices():
    oracle = _valid_patterns()
    assert len(oracle) == 90 and PATTERNS.shape == (90, 16)
    assert {tuple(p) for p in PATTERNS.int().tolist()} == {
        tuple(p) for p in oracle.view(90, 16).int().tolist()
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_masks_are_2_of_4_in_w_and_wt(shape, dtype):
    w = _randn(*shape, dtype=dtype)
    m = transposable_mask(w)
    assert m.dtype == torch.bool and m.shape == w.shape
    # exactly two per group of 4 along rows and along columns
    assert torch.all(m.view(shape[0], -1, 4).sum(-1) == 2)
    assert torch.all(m.t().reshape(shape[1], -1, 4).sum(-1) == 2)
    assert is_24(masked_weight(w, m)) and is_24(masked_weight(w, m).t())
    p = plain_mask(w)
    assert p.dtype == torch.bool and torch.all(p.view(shape[0], -1, 4).sum(-1) == 2)


@pytest.mark.parametrize(
    "view",
    [lambda b: b.t(), lambda b: b[::2, 4:24], lambda b: b.view(2, 8, 40)[:, :, :20].transpose(1, 2)[0]],
    ids=["transposed", "sliced", "permuted"],
)
def test_masks_of_noncontiguous_weights_equal_contiguous(view):
    w = view(_randn(16, 40))
    assert not w.is_contiguous()
    assert torch.equal(transposable_mask(w), transposable_mask(w.contiguous()))
    assert torch.equal(plain_mask(w), plain_mask(w.contiguous()))


def test_transposable_mask_is_optimal_by_brute_force():
    w = _randn(24, 40, seed=3) * torch.rand(24, 40, generator=_gen(4)) ** 3  # skewed: fewer near-ties
    pats = _valid_patterns()  # the oracle's own enumeration, not the module's
    blocks = _blocks(w.abs().double())  # (60, 4, 4)
    chosen = (blocks * _blocks(transposable_mask(w)).double()).sum((1, 2))
    every = (blocks[:, None] * pats[None].double()).sum((2, 3))  # (60, 90): kept by each pattern
    # equal to the best pattern's up to fp32 rounding of the scores (8 terms)
    assert torch.all(chosen >= every.max(1).values * (1 - 1e-6))
    # and no valid transposable pattern keeps more, over the whole weight either
    assert chosen.sum() >= every.max(1).values.sum() * (1 - 1e-6)


def test_plain_mask_is_top2_and_keeps_at_least_the_transposable():
    w = _randn(32, 48, seed=5)
    a = w.abs().view(32, 12, 4)
    kth = a.sort(-1, descending=True).values[..., 1:2]  # second largest per group
    p = plain_mask(w).view(32, 12, 4)
    assert torch.all(a[p].view(32, 12, 2).min(-1).values >= kth[..., 0])
    t = transposable_mask(w)
    kept_p = _blocks(w.abs() * plain_mask(w)).sum((1, 2))
    kept_t = _blocks(w.abs() * t).sum((1, 2))
    assert torch.all(kept_p >= kept_t * (1 - 1e-6))  # per 4x4 block: plain is a relaxation
    # and strictly more overall on Gaussian weights (the transposable constraint costs something)
    assert kept_p.sum() > kept_t.sum()


def test_transposable_mask_ties_and_zeros_stay_valid():
    for w in (torch.zeros(8, 8), torch.ones(8, 8), torch.eye(8), torch.full((4, 4), float("inf"))):
        m = transposable_mask(w)
        assert torch.all(m.view(8 if len(w) == 8 else 4, -1, 4).sum(-1) == 2) and is_24(m.t())
    # identity blocks: the diagonal is always kept (one pattern keeps all 4 diagonal entries)
    assert torch.all(transposable_mask(torch.eye(8) + 0.01).diagonal())


@pytest.mark.parametrize("fn", [transposable_mask, plain_mask])
@pytest.mark.parametrize("shape", [(6, 8), (8, 6), (8,), (2, 4, 4), (0, 3)], ids=str)
def test_masks_reject_bad_shapes_naming_them(fn, shape):
    with pytest.raises(ValueError, match=re_shape(shape)):
        fn(torch.randn(shape))


def re_shape(shape) -> str:
    return "shape " + str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_masks_reject_integer_weights():
    with pytest.raises(ValueError, match="floating-point"):
        transposable_mask(torch.ones(4, 4, dtype=torch.int32))


# ----------------------------------------------------------------------------------------- MVUE


@pytest.mark.parametrize(
    "a,p",
    [
        ([1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]),
        ([3.0, 1.0, 1.0, 1.0], [1.0, 1 / 3, 1 / 3, 1 / 3]),  # 2*3 >= 6: capped, rest share one slot
        ([10.0, 1.0, 1.0, 0.0], [1.0, 0.5, 0.5, 0.0]),
        ([2.0, 1.0, 1.0, 0.0], [1.0, 0.5, 0.5, 0.0]),  # 2*2 == 4: capped exactly at the boundary
        ([1.0, 2.0, 3.0, 4.0], [0.2, 0.4, 0.6, 0.8]),
        ([5.0, 0.0, 1e-30, 0.0], [1.0, 0.0, 1.0, 0.0]),  # two non-zeros: both kept
        ([0.0, 7.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]),
        ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),
        ([3.4e38, 3.4e38, 3.4e38, 1.0], [2 / 3, 2 / 3, 2 / 3, 0.0]),  # sum overflows fp32 unless normalised
    ],
)
def test_mvue_probabilities_hand_worked(a, p):
    got = mvue24_probabilities(torch.tensor([a]))[0]
    assert torch.allclose(got, torch.tensor(p), rtol=1e-6, atol=1e-7), got


def test_mvue_keeps_exactly_min_2_nnz_and_rescales():
    # one group for every zero pattern of 4 elements, many noise values each
    pats = torch.tensor(list(itertools.product((0, 1), repeat=4)), dtype=torch.float32)  # (16, 4)
    mags = torch.rand(16, 4, generator=_gen(0)) * 10 + 0.1
    signs = torch.where(torch.rand(16, 4, generator=_gen(1)) < 0.5, -1.0, 1.0)
    x = (pats * mags * signs).repeat(200, 1)  # (3200, 4)
    y = mvue24_reference(x, torch.rand(len(x), generator=_gen(2)))
    kept = y != 0
    assert torch.equal(kept.sum(1), (x != 0).sum(1).clamp(max=2))
    assert torch.all(~kept | (x != 0)) and torch.all(torch.sign(y[kept]) == torch.sign(x[kept]))
    p = mvue24_probabilities(x.abs())
    assert torch.allclose(y[kept], x[kept] / p[kept], rtol=1e-5)


def test_mvue_keeps_exactly_two_at_the_noise_extremes():
    """U = 0 and U = 2**24 - 1 sit at the ends of the keep intervals: exactly 2 survive only if the
    integer probabilities of every group sum to exactly 2 * 2**24 (fp32 rounding of p would lose or
    add a unit in about half of the groups)."""
    x = torch.randn(20000, 4, generator=_gen(8))
    for u in (0.0, 1 - 2**-24):
        y = mvue24_reference(x, torch.full((20000,), u))
        assert torch.all((y != 0).sum(1) == 2)


def _skewed(n: int, seed: int = 0) -> torch.Tensor:
    """Gradient-like values: log-normal magnitudes (sigma 1.5), random signs."""
    mag = torch.exp(1.5 * torch.randn(n, generator=_gen(seed)))
    return mag * torch.where(torch.rand(n, generator=_gen(seed + 1)) < 0.5, -1.0, 1.0)


def test_mvue_is_unbiased_statistically():
    draws = 4000
    x = _skewed(64)  # 16 groups
    y = mvue24_reference(x.repeat(draws), torch.rand(draws * 16, generator=_gen(7))).view(draws, 64)
    p = mvue24_probabilities(x.view(16, 4).abs()).view(64).double()
    x = x.double()
    bias = y.double().mean(0) - x
    # Each draw is x_i / p_i w.p. p_i, else 0: variance x_i^2 (1/p_i - 1) (0 when p_i = 1), so the
    # mean of N draws has sigma_i = |x_i| sqrt((1/p_i - 1) / N). With k = 5, a correct sampler
    # exceeds the bound per element with probability < 6e-7 (CLT, N = 4000 draws of a two-point
    # variable with p >= 0.05); seeded noise makes the test deterministic anyway. The fp32 slack
    # covers the rounding of x / p.
    sigma = x.abs() * torch.sqrt((1 / p - 1) / draws)
    assert torch.all(bias.abs() <= 5 * sigma + 1e-6 * x.abs()), (bias.abs() / sigma).max()
    # The empirical variance matches the closed form: the sample variance of N draws has relative
    # SE sqrt((kappa - 1) / N), kappa = 3 + (1 - 6 q) / q with q = p (1 - p) (a two-point variable's
    # kurtosis): 2% at p = 1/2, 14% at p = 0.012. Again 5 SE; elements with p = 1 are exact.
    var, closed = y.double().var(0), x**2 * (1 / p - 1)
    q = p * (1 - p)
    exact = p == 1
    rel_se = torch.sqrt((2 + (1 - 6 * q) / q.clamp(min=1e-12)) / draws)
    assert torch.all((var - closed).abs()[~exact] <= 5 * rel_se[~exact] * closed[~exact])
    assert torch.all(var[exact] == 0)


def test_mvue_keep_frequencies_on_stratified_noise():
    """Deterministic: M evenly spaced noise values hit each keep interval (total length p_i, at
    most two pieces) within 2/M of p_i, so E[out] = x up to |x_i| * 2/(M p_i)."""
    m = 4096
    x = _skewed(32, seed=11)
    noise = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    noise = noise.float().repeat_interleave(8)  # group-major: each of the 8 groups sees every value
    y = mvue24_reference(x.repeat(m), noise).view(m, 32)
    p = mvue24_probabilities(x.view(8, 4).abs()).view(32)
    freq = (y != 0).float().mean(0)
    assert torch.all((freq - p).abs() <= 2 / m + 1e-7)
    assert torch.all(
        (y.double().mean(0) - x.double()).abs() <= x.abs().double() * (2 / (m * p.double())) + 1e-5
    )


def test_mvue_variance_lower_than_uniform_2_of_4():
    draws, n = 2000, 256
    x = _skewed(n, seed=21)
    y = mvue24_reference(x.repeat(draws), torch.rand(draws * n // 4, generator=_gen(22))).view(draws, n)
    # uniform random 2 of 4, scaled by 2: unbiased, variance x_i^2 per element
    keys = torch.rand(draws, n // 4, 4, generator=_gen(23))
    keep = torch.zeros_like(keys, dtype=torch.bool).scatter_(-1, keys.topk(2, -1).indices, True)
    yu = torch.where(keep.view(draws, n), 2 * x, 0.0)
    v_mvue, v_unif = y.double().var(0).sum(), yu.double().var(0).sum()
    closed = (x.double() ** 2 * (1 / mvue24_probabilities(x.view(-1, 4).abs()).view(n).double() - 1)).sum()
    assert v_mvue < 0.5 * v_unif  # closed-form ratio 0.082 here (0.03-0.08 on log-normal(1.5), 0.47 Gaussian)
    assert abs(v_mvue / closed - 1) < 0.1 and abs(v_unif / (x.double() ** 2).sum() - 1) < 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mvue_seeded_along_dims_ragged_and_noncontiguous(dtype):
    x = _randn(10, 7, seed=3, dtype=dtype)  # 10 tokens: groups of 4 along dim 0 end ragged
    a, b = mvue24(x, 5, dim=0), mvue24(x, 5, dim=0)
    assert torch.equal(a, b) and a.dtype == dtype and a.shape == x.shape and a.is_contiguous()
    assert not torch.equal(a, mvue24(x, 6, dim=0))
    ref = mvue24_reference(x, hash_uniform(torch.tensor(5), 7 * 3, 1), dim=0)
    assert torch.equal(a, ref)
    assert torch.equal(a, mvue24_reference(x.t().contiguous(), hash_uniform(torch.tensor(5), 21, 1)).t())
    assert torch.equal(a, mvue24(x.t().contiguous().t(), 5, dim=0))  # non-contiguous input
    g = (a != 0).view(torch.uint8)
    assert torch.all(F.pad(g.t(), (0, 2)).reshape(7, 3, 4).sum(-1) <= 2)
    assert torch.equal((a != 0).sum(0), torch.full((7,), 6))  # 2 + 2 + 2 (last group: 2 real)


def test_mvue_passes_nonfinite_groups_through():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan"), 1.0, 2.0, 3.0, float("inf"), 0.0, 1.0, 1.0])
    y = mvue24(x, 0)
    assert (y[:4] != 0).sum() == 2
    assert torch.isnan(y[4]) and torch.equal(y[5:], x[5:])  # NaN and Inf groups unchanged


def test_mvue_rejects_bad_input():
    with pytest.raises(ValueError, match="floating-point"):
        mvue24(torch.ones(8, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="noise"):
        mvue24_reference(torch.ones(8), torch.rand(3))


# ---------------------------------------------------------------------------------- the linear


def _case(n=16, out=8, inp=12, dtype=torch.float32, bias=True, lead=()):
    w = _randn(out, inp, seed=1, dtype=dtype).requires_grad_()
    b = _randn(out, seed=2, dtype=dtype).requires_grad_() if bias else None
    x = _randn(*lead, n, inp, seed=3, dtype=dtype).requires_grad_()
    g = _randn(*lead, n, out, seed=4, dtype=dtype)
    return x, w, b, transposable_mask(w), g


@pytest.mark.parametrize("lead", [(), (2,)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_matches_masked_dense_reference_exactly(dtype, lead):
    x, w, b, m, g = _case(dtype=dtype, lead=lead)
    y = sparse24_linear(x, w, b, m, seed=0, mvue=False)
    wm = masked_weight(w.detach(), m)
    assert torch.equal(y, F.linear(x.detach(), wm, b.detach()))
    y.backward(g)
    g2, x2 = g.reshape(-1, 8), x.detach().reshape(-1, 12)
    assert torch.equal(x.grad, (g2 @ wm).view(x.shape))
    assert torch.equal(w.grad, torch.where(m, g2.t() @ x2, 0))  # masked: pruned weights get none
    assert torch.equal(b.grad, g2.sum(0))


def test_linear_dense_grad_option_and_mvue_formula():
    x, w, b, m, g = _case(bias=False)
    sparse24_linear(x, w, None, m, seed=9, mvue=False, masked_grad=False).backward(g)
    assert torch.equal(w.grad, g.t() @ x.detach())
    w.grad = None
    sparse24_linear(x, w, None, m, seed=9).backward(g)
    gs = mvue24(g, 9, dim=0)
    assert torch.equal(w.grad, torch.where(m, gs.t() @ x.detach(), 0))
    assert is_24(gs, dim=0) and not torch.equal(gs, g)


def test_linear_grad_weight_is_unbiased():
    x, w, b, m, g = _case(n=16, out=8, inp=8)
    draws = []
    for seed in range(400):
        w.grad = None
        sparse24_linear(x, w, None, m, seed=seed, masked_grad=False).backward(g)
        draws.append(w.grad.double())
    d = torch.stack(draws)
    exact = g.double().t() @ x.detach().double()
    # Per element: the mean of 400 independent estimates; 5 empirical standard errors bounds a
    # correct estimator's deviation with probability ~6e-7 per element (CLT; the SE estimate from
    # 400 draws is good to ~4%, the margin absorbs it); fp32 GEMM rounding adds < 1e-4.
    se = d.std(0) / math.sqrt(len(d))
    assert torch.all((d.mean(0) - exact).abs() <= 5 * se + 1e-4)
    assert se.max() > 0.01  # the estimates are really random (the bound above is not vacuous)


def test_linear_skips_gradients_not_needed():
    x, w, b, m, g = _case()
    x.requires_grad_(False)
    y = sparse24_linear(x, w.detach(), b, m, seed=0)
    y.backward(g)
    assert x.grad is None and b.grad is not None


def test_linear_compiles_without_graph_breaks():
    x, w, b, m, g = _case(lead=(2,))
    seed = torch.tensor(123)

    def step(x, w, b, m, seed):
        return sparse24_linear(torch.relu(x), w, b, m, seed).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # raises on a graph break
    grads = []
    for fn in (step, compiled):
        for t in (x, w, b):
            t.grad = None
        loss = fn(x, w, b, m, seed)
        loss.backward()
        grads.append((loss.detach(), x.grad, w.grad, b.grad))
    for eager, comp in zip(*grads, strict=True):
        assert torch.equal(eager, comp)


@pytest.mark.parametrize("lead", [(), (2,)], ids=["2d", "3d"])
def test_linear_op_registration_passes_opcheck(lead):
    x, w, b, m, g = _case(lead=lead)  # the op takes x of any rank (the sparsity pass calls it)
    args = (
        x.detach().requires_grad_(),
        w.detach().requires_grad_(),
        b.detach(),
        m,
        torch.tensor(3),
        True,
        True,
    )
    torch.library.opcheck(torch.ops.fxlowbit.sparse24_linear.default, args)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda x, w, b, m: (x[..., :8], w, b, m), "in-features"),
        (lambda x, w, b, m: (x[:, :6], w[:, :6], b, m[:, :6]), r"shape \(8, 6\)"),
        (lambda x, w, b, m: (x, w, b, m.float()), "mask must be bool"),
        (lambda x, w, b, m: (x, w, b, m[:4]), "mask must be bool"),
        (lambda x, w, b, m: (x, w, b[:4], m), "bias must be"),
        (lambda x, w, b, m: (x.double(), w, b, m), "float64 but w is"),
    ],
    ids=["x_in", "w_shape", "mask_dtype", "mask_shape", "bias", "dtype"],
)
def test_linear_rejects_bad_arguments(change, match):
    x, w, b, m, _ = _case()
    with pytest.raises(ValueError, match=match):
        sparse24_linear(*change(x.detach(), w.detach(), b.detach(), m), seed=0)


def test_linear_op_needs_a_seed_for_mvue():
    x, w, b, m, _ = _case()
    with pytest.raises(ValueError, match="needs a seed"):
        torch.ops.fxlowbit.sparse24_linear(x, w, b, m, None, True, True)


def _fake_semi_structured(monkeypatch, compress):
    """Run the CUDA dispatch logic on CPU: every GEMM 'can' be sparse, masks are checked as on CUDA
    and ``compress`` stands in for the semi-structured conversion."""
    monkeypatch.setattr(s24l, "_semi_structured_ok", lambda w, x: True)
    monkeypatch.setattr(s24l, "_rows_cols_24", s24l._mask_24)
    monkeypatch.setattr(s24l, "_compress", compress)


def test_dispatch_compresses_only_2_of_4_operands(monkeypatch):
    calls = []
    _fake_semi_structured(monkeypatch, lambda wm: calls.append(tuple(wm.shape)) or wm)
    x, w, b, m, g = _case()
    sparse24_linear(x, w, b, m, seed=0).backward(g)
    assert calls == [(8, 12), (12, 8)]  # forward w*m and grad-input (w*m)^T
    plain = plain_mask(w)
    assert not is_24(plain.t())
    calls.clear()
    sparse24_linear(x, w, b, plain, seed=0).backward(g)
    assert calls == [(8, 12)]  # (w*m)^T is not 2:4: compression would prune it, so dense


def test_dispatch_mask_check_follows_in_place_refresh():
    w = _randn(8, 12)
    m = transposable_mask(w)
    assert s24l._mask_24(m) == (True, True)
    m.copy_(plain_mask(w))  # in place: same tensor, new version
    assert s24l._mask_24(m) == (True, False)


def test_dispatch_falls_back_to_dense_with_one_warning(monkeypatch):
    def broken(wm):
        raise RuntimeError("cuSPARSELt not available here")

    _fake_semi_structured(monkeypatch, broken)
    monkeypatch.setattr(s24l, "_warned", set())
    x, w, b, m, g = _case()
    with pytest.warns(UserWarning, match="semi-structured GEMM failed .*cuSPARSELt not available"):
        y = sparse24_linear(x, w, b, m, seed=0, mvue=False)
    assert torch.equal(y, F.linear(x.detach(), masked_weight(w.detach(), m), b.detach()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y.backward(g)  # the same failure again: no second warning
    assert torch.equal(x.grad, g @ masked_weight(w.detach(), m))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_semi_structured_matches_dense_on_cuda(dtype):
    x, w, b, m, g = (t.cuda() if t is not None else None for t in _case(n=128, out=128, inp=128, dtype=dtype))
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = sparse24_linear(x, w, b, m, seed=0, mvue=False)
    y.backward(g)
    wm = masked_weight(w.detach(), m)
    # bf16/fp16 outputs of ~8 in magnitude: a few ulps of rounding apart (accumulation order differs)
    torch.testing.assert_close(y, F.linear(x.detach(), wm, b.detach()), rtol=2e-2, atol=0.1)
    torch.testing.assert_close(x.grad, g @ wm, rtol=2e-2, atol=0.1)


# ---------------------------------------------------------------------------------------- state


def test_state_refresh_schedule_in_place_and_flip_rates():
    w = torch.nn.Parameter(_randn(8, 12))
    st = Sparse24State({"fc": w}, refresh_every=3)
    mask = st.masks["fc"]
    first = mask.clone()
    assert torch.equal(first, transposable_mask(w))
    with torch.no_grad():
        w.copy_(_randn(8, 12, seed=99))
    for _ in range(2):
        st.advance()
    assert torch.equal(st.masks["fc"], first)  # steps 1, 2: no refresh
    st.advance()  # step 3: refresh from the new weights, in the same tensor
    assert st.masks["fc"] is mask and torch.equal(mask, transposable_mask(w))
    assert (
        st.flip_rates["fc"] == pytest.approx((first != mask).float().mean().item())
        and st.flip_rates["fc"] > 0
    )


def test_state_dense_switch_and_plain_masks():
    lin = torch.nn.Linear(12, 8)
    st = Sparse24State([("fc", lin.weight)], refresh_every=1, dense_after_step=2, transposable=False)
    assert torch.equal(st.masks["fc"], plain_mask(lin.weight))
    x = _randn(5, 12)
    y = st.linear("fc", x, lin.weight, lin.bias)
    assert torch.equal(y, F.linear(x, masked_weight(lin.weight.detach(), st.masks["fc"]), lin.bias))
    st.advance()
    st.advance()
    assert st.dense and torch.equal(st.linear("fc", x, lin.weight, lin.bias), lin(x))
    # entering the dense phase zeroed the pruned weights: it starts from the sparse model's function
    assert torch.equal(lin.weight != 0, st.masks["fc"]) and torch.equal(lin(x), y)
    before = st.masks["fc"].clone()
    with torch.no_grad():
        lin.weight.mul_(-3).add_(1)
    st.advance()
    assert torch.equal(st.masks["fc"], before)  # no refresh in the dense phase


def test_state_dense_switch_can_keep_pruned_weights():
    w = torch.nn.Parameter(_randn(8, 12))
    before = w.detach().clone()
    st = Sparse24State({"fc": w}, dense_after_step=1, prune_at_dense=False)
    st.advance()
    assert st.dense and torch.equal(w, before)


def test_state_seeds_reproduce_and_differ_between_weights():
    def grads(seed):
        w1 = torch.nn.Parameter(_randn(8, 12, seed=1))
        w2 = torch.nn.Parameter(_randn(8, 12, seed=1))
        st = Sparse24State({"a": w1, "b": w2}, seed=seed)
        x = _randn(16, 12)
        (st.linear("a", x, w1) + st.linear("b", x, w2)).square().sum().backward()
        return w1.grad, w2.grad

    a1, b1 = grads(0)
    a2, b2 = grads(0)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1)  # same weight and input, independent noise
    assert not torch.equal(a1, grads(1)[0])


def test_state_compiles_without_graph_breaks_and_keeps_graphs_across_refresh():
    lin = torch.nn.Linear(12, 8)
    st = Sparse24State({"fc": lin.weight}, refresh_every=1)
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm

    def step(x):
        return st.linear("fc", x, lin.weight, lin.bias).sum()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    x = _randn(4, 12)
    compiled(x).backward()
    with torch.no_grad():
        lin.weight.copy_(_randn(8, 12, seed=5))
    st.advance()  # refresh in place
    y = compiled(x)
    assert counts["n"] == 1
    assert torch.equal(
        y.detach(), F.linear(x, masked_weight(lin.weight.detach(), st.masks["fc"]), lin.bias).sum()
    )


def test_state_dict_roundtrip_prune_and_errors():
    w = torch.nn.Parameter(_randn(8, 12))
    st = Sparse24State({"fc": w}, refresh_every=2)
    st.advance()
    saved = st.state_dict()
    st2 = Sparse24State({"fc": torch.nn.Parameter(_randn(8, 12, seed=4))})
    st2.load_state_dict(saved)
    assert st2.step == 1 and torch.equal(st2.masks["fc"], st.masks["fc"])
    with pytest.raises(ValueError, match="expected"):
        Sparse24State({"other": w}).load_state_dict(saved)
    st.prune_()
    assert is_24(w) and is_24(w.t()) and torch.equal(w != 0, st.masks["fc"])
    with pytest.raises(ValueError, match="refresh_every"):
        Sparse24State({"fc": w}, refresh_every=-1)
    with pytest.raises(ValueError, match=r"shape \(6, 8\)"):
        Sparse24State({"fc": torch.randn(6, 8)})
