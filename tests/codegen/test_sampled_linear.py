"""The sampled linear layer (codegen/kernels/sampled_linear.py and sampled_backward.py):
water-filled probabilities; each sampler unbiased, its measured variance equal to
:func:`added_variance`, its expected row count ``keep * N`` and zero rows never kept; keep 1
bit-identical to F.linear's autograd; the gathered GEMMs against the fp64 dense-masking reference
over odd shapes, dtypes and views; backward mm FLOPs falling with the keep ratio; torch.compile
(aot_eager, Inductor) equal to eager without recompiles.

Statistical tests run 2000 fixed seeds, so they are deterministic; the tolerances are 5 standard
errors computed from the exact per-element (or per-figure) variance of the Bernoulli sampler,
which a correct implementation exceeds with probability ~6e-7 per element under the CLT (each
checked quantity is a mean of 2000 independent draws; inclusion probabilities are >= 0.025 here, so
every row is kept ~50 times or more and the Poisson tail stays close to the normal one). Each such
test also asserts it has power: an estimator missing the 1/q reweighting would exceed the
Frobenius bound more than tenfold.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from fxlowbit.codegen.kernels.quant import hash_uniform
from fxlowbit.codegen.kernels.sampled_linear import (
    added_variance,
    flops,
    keep_probabilities,
    sampled_linear,
    sampled_linear_op,
    sampled_linear_reference,
)

bwd = torch.ops.fxlowbit.sampled_linear_backward
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# unit roundoff of each dtype (inputs exact, outputs rounded once)
UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
N_SEEDS = 2000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _t(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _problem(n, d_in, d_out, seed=0, zero_rows=False):
    """(g, x, w) fp32 with row norms spread over ~e^3 (so some rows clamp at q = 1 and some are
    rare), optionally with zero rows in g (every 5th) and in x (every 7th, from 1)."""
    gen = _gen(seed)
    g = torch.randn(n, d_out, generator=gen) * torch.randn(n, 1, generator=gen).mul(0.8).exp()
    x = torch.randn(n, d_in, generator=gen) * torch.randn(n, 1, generator=gen).mul(0.25).exp()
    w = torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in)
    if zero_rows:
        g[::5] = 0
        x[1::7] = 0
    return g, x, w


def _run(g, x, w, keep, which, seed, stats=None):
    """dx or dw of the backward op alone (only that GEMM), for seed ``seed``."""
    k, one = _t(keep), _t(1.0)
    ki, kw = (k, one) if which == "input" else (one, k)
    need = (which == "input", which == "weight", False)
    dx, dw, _ = bwd(g, x, w, ki, kw, torch.tensor(seed), stats, False, *need)
    return dx if which == "input" else dw


# ---------------------------------------------------------------- probabilities


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.9])
def test_keep_probabilities_water_filling(keep):
    s = torch.randn(301, generator=_gen(1)).mul(1.5).exp()
    s[::4] = 0  # 75 zero scores: T = 0.9 * 301 = 270.9 > 226 positive ones at keep 0.9
    q = keep_probabilities(s, keep).double()
    pos = s > 0
    assert torch.equal(q > 0, pos) and bool((q <= 1).all())
    assert torch.equal(q * 2**24, (q * 2**24).round())  # on the draws' grid: P(u < q) == q exactly
    if keep * s.numel() >= int(pos.sum()):
        assert torch.equal(q, pos.double())  # cannot reach T: every positive row kept
        return
    # sum q = T up to the upward rounding to the 2**-24 grid (< 2**-24 per row) and fp64 sums
    assert abs(float(q.sum()) - keep * s.numel()) <= s.numel() * 2.0**-24 + 1e-9
    free = pos & (q < 1)
    c = q[free] / s[free].double()  # one constant c, up to the grid rounding of q
    assert float((c.max() - c.min()) / c.min()) < 2.0**-24 / float(q[free].min()) + 1e-12
    # clamped rows are exactly those with c * s >= 1: the larger scores
    assert bool((s[q == 1].double() * c.min() >= 1 - 1e-9).all())
    # brute force: bisection on c for sum min(1, c s) = T
    lo, hi = 0.0, 1e9
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((mid * s.double()).clamp(max=1).sum()) < keep * s.numel() else (lo, mid)
    assert abs(float(c.min()) - lo) / lo < 2.0**-24 / float(q[free].min()) + 1e-9  # q rounds up


def test_keep_probabilities_doc_example_and_flops():
    q = keep_probabilities(torch.tensor([4.0, 1.0, 1.0, 0.0]), 0.5)
    assert q.tolist() == [1.0, 0.5, 0.5, 0.0]
    assert flops(4096, 512, 512, 0.5, 0.25) / flops(4096, 512, 512, 1, 1) == 0.375
    assert flops(10, 3, 5, 2.0, 1.0) == 2 * 3 * 5 * 10 * 2


# ---------------------------------------------------------------- statistics over seeds


def _contributions(g, x, w, which):
    """(a_i per row as (N, ...) fp64, scores, exact gradient fp64)."""
    g64, x64, w64 = g.double(), x.double(), w.double()
    if which == "input":
        a = g64 @ w64  # row i of dx
        scores = torch.linalg.vector_norm(g, dim=1)
        return a, scores, a
    a = g64[:, :, None] * x64[:, None, :]  # (N, out, in): g_i^T x_i
    scores = torch.linalg.vector_norm(g, dim=1) * torch.linalg.vector_norm(x, dim=1)
    return a, scores, a.sum(0)


@pytest.mark.parametrize("zero_rows", [False, True], ids=["dense_rows", "zero_rows"])
@pytest.mark.parametrize("which", ["input", "weight"])
def test_sampler_unbiased_variance_and_counts(which, zero_rows):
    g, x, w = _problem(48, 10, 8, seed=2, zero_rows=zero_rows)
    keep = 0.3
    a, scores, exact = _contributions(g, x, w, which)
    q = keep_probabilities(scores, float(_t(keep))).double()
    assert float(q[q > 0].min()) >= 0.025  # the CLT argument of the module docstring
    stats = torch.zeros(6, dtype=torch.float64)
    est, figs = [], []
    for s in range(N_SEEDS):
        est.append(_run(g, x, w, keep, which, s, stats).double())
        figs.append(stats.clone())
    est_t, figs_t = torch.stack(est), torch.stack(figs)  # (S, ...), (S, 6)
    inv = torch.where(q > 0, 1 / q - 1, 0.0)
    shape = (-1,) + (1,) * (a.dim() - 1)

    # unbiased: per element Var = sum_i (1/q_i - 1) a_i^2 (rows independent)
    var_el = (inv.view(shape) * a**2).sum(0) if which == "weight" else inv[:, None] * a**2
    tol = 5 * (var_el / N_SEEDS).sqrt() + 1e-5 * float(exact.abs().max())  # + fp32 GEMM rounding
    err = (est_t.mean(0) - exact).abs()
    assert bool((err <= tol).all()), f"max err/tol {float((err / tol).max()):.2f}"
    assert float((err**2).sum()) <= 2 * float(var_el.sum()) / N_SEEDS + 1e-8
    no_reweight = ((1 - q).view(shape) * a).sum(0) if which == "weight" else (1 - q)[:, None] * a
    assert float((no_reweight**2).sum()) > 10 * 2 * float(var_el.sum()) / N_SEEDS  # the test has power

    # measured variance = added_variance: ||e||^2 = sum_ij eps_i eps_j <a_i, a_j>, eps_i = B_i/q_i - 1,
    # Var(||e||^2) = sum_i (m4_i - v_i^2) G_ii^2 + 2 sum_{i!=j} v_i v_j G_ij^2 (dx rows are disjoint)
    sq = ((est_t - exact) ** 2).flatten(1).sum(1)  # (S,)
    v_in, v_w = added_variance(g, x, w, keep if which == "input" else 1.0, keep if which == "weight" else 1.0)
    expected = v_in if which == "input" else v_w
    flat = a.flatten(1)
    gram = flat @ flat.t() if which == "weight" else torch.diag((flat**2).sum(1))
    m4 = torch.where(q > 0, q * inv**4 + (1 - q), 0.0)
    off = 2 * (inv[:, None] * inv[None, :] * gram**2).fill_diagonal_(0).sum()
    var_sq = float(((m4 - inv**2) * gram.diag() ** 2).sum() + off)
    rel_tol = 5 * math.sqrt(var_sq / N_SEEDS) / expected
    assert rel_tol < 0.05  # stated: within 5 % (2.2-3.2 % here; measured 0.999-1.004 of expected)
    assert abs(float(sq.mean()) - expected) <= rel_tol * expected
    assert abs(expected - float((inv * gram.diag()).sum())) <= 1e-6 * expected  # formula; fp32 norms

    # row counts: E[kept] = sum q = keep * N (< N * 2**-24 above), Var = sum q (1 - q)
    col = 4 if which == "input" else 5
    kept = figs_t[:, col]
    assert abs(float(kept.mean()) - keep * 48) <= 5 * math.sqrt(float((q * (1 - q)).sum()) / N_SEEDS)
    if which == "input":  # the kept rows are exactly the nonzero rows of dx: zero rows never kept
        assert torch.equal((est_t.abs().sum(2) > 0).sum(1).double(), kept)
        # stats: Horvitz-Thompson estimates, unbiased for the variance and ||dx||^2
        for col, target in ((0, expected), (2, float((exact**2).sum()))):
            f = figs_t[:, col]
            assert abs(float(f.mean()) - target) <= 5 * float(f.std()) / math.sqrt(N_SEEDS)
    else:  # exact expectation, every seed
        torch.testing.assert_close(figs_t[:, 1], torch.full((N_SEEDS,), expected, dtype=torch.float64))


@pytest.mark.parametrize("which", ["input", "weight"])
def test_zero_rows_never_kept_when_keep_exceeds_them(which):
    """T = 0.9 * N exceeds the rows with a nonzero score: exactly those are kept, every seed."""
    g, x, w = _problem(40, 6, 5, seed=3, zero_rows=True)
    _, scores, exact = _contributions(g, x, w, which)
    stats = torch.zeros(6, dtype=torch.float64)
    for s in range(20):
        got = _run(g, x, w, 0.9, which, s, stats)
        assert stats[4 if which == "input" else 5] == int((scores > 0).sum()) < 36
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- keep 1: F.linear's bits

LAYOUTS = {
    "2d": lambda gen: torch.randn(17, 33, generator=gen),
    "2d_transposed": lambda gen: torch.randn(33, 17, generator=gen).t(),
    "2d_sliced": lambda gen: torch.randn(17, 66, generator=gen)[:, ::2],
    "3d": lambda gen: torch.randn(3, 7, 33, generator=gen),
    "3d_sliced": lambda gen: torch.randn(3, 7, 66, generator=gen)[..., 1::2],
    "3d_permuted": lambda gen: torch.randn(7, 3, 33, generator=gen).transpose(0, 1),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_one_is_bit_identical_to_f_linear(layout, bias, dtype):
    gen = _gen(4)
    x = LAYOUTS[layout](gen).to(dtype).requires_grad_()
    w = (torch.randn(19, 33, generator=gen) / 6).to(dtype).requires_grad_()
    b = torch.randn(19, generator=gen).to(dtype).requires_grad_() if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    one = _t(1.0)
    y = sampled_linear(x, w, b, one, one, torch.tensor(5))
    ref = F.linear(x, w, b)
    assert torch.equal(y, ref)
    go = torch.randn(ref.shape, generator=gen).to(dtype)
    for got, want in zip(
        torch.autograd.grad(y, leaves, go), torch.autograd.grad(ref, leaves, go), strict=True
    ):
        assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("frozen", ["weight", "input", "bias"])
def test_needs_input_grad_skips_gemms(frozen):
    gen = _gen(6)
    x = torch.randn(2, 9, 13, generator=gen).requires_grad_(frozen != "input")
    w = torch.randn(11, 13, generator=gen).requires_grad_(frozen != "weight")
    b = torch.randn(11, generator=gen).requires_grad_(frozen != "bias")
    one = _t(1.0)
    y = sampled_linear(x, w, b, one, one, torch.tensor(0))
    leaves = [t for t in (x, w, b) if t.requires_grad]
    go = torch.randn(y.shape, generator=gen)
    assert (y.grad_fn.saved_tensors[0] is None) == (frozen == "weight")  # like F.linear: no x kept
    with torch.profiler.profile(record_shapes=True) as prof:
        got = torch.autograd.grad(y, leaves, go)
    want = torch.autograd.grad(F.linear(x, w, b), leaves, go)
    assert all(torch.equal(a, e) for a, e in zip(got, want, strict=True))
    n_mm = sum(e.count for e in prof.key_averages() if e.key == "aten::mm")
    assert n_mm == (1 if frozen in ("weight", "input") else 2)


def test_non_finite_gradient_falls_back_to_dense():
    """A NaN/Inf output gradient has no meaningful row norm: both GEMMs run dense and propagate the
    non-finite values exactly as F.linear's backward does."""
    g, x, w = _problem(30, 7, 6, seed=13)
    g[4, 2], g[9, 0] = float("nan"), float("inf")
    h = _t(0.3)
    dx, dw, db = bwd(g, x, w, h, h, torch.tensor(0), None, False, True, True, True)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = torch.autograd.grad(F.linear(xl, wl), (xl, wl), g)
    for got, ref in ((dx, want[0]), (dw, want[1])):
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


def test_stats_reset_between_steps_and_retained_graph():
    """stats is written by the backward, so a caller resetting it (or a second backward through a
    retained graph) must not trip autograd's saved-tensor version check."""
    gen = _gen(12)
    x = torch.randn(40, 6, generator=gen, requires_grad=True)
    w = torch.randn(5, 6, generator=gen, requires_grad=True)
    stats = torch.zeros(6, dtype=torch.float64)
    y = sampled_linear(x, w, None, _t(0.5), _t(0.5), torch.tensor(1), stats)
    stats.fill_(-1.0)
    first = torch.autograd.grad(y.sum(), (x, w), retain_graph=True)
    assert bool((stats >= 0).all()) and 0 < stats[4] < 40 and 0 < stats[5] < 40
    saved = stats.clone()
    second = torch.autograd.grad(y.sum(), (x, w))  # same seed: same draws, same figures
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True)) and torch.equal(stats, saved)


def test_seeded_runs_reproduce_and_seeds_differ():
    g, x, w = _problem(64, 12, 10, seed=7)
    h = _t(0.4)
    runs = [bwd(g, x, w, h, h, torch.tensor(s), None, False, True, True, True) for s in (1, 1, 2)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not torch.equal(runs[0][0], runs[2][0]) and not torch.equal(runs[0][1], runs[2][1])
    assert torch.equal(runs[0][2], runs[2][2])  # the bias gradient is exact
    # unit rows: both samplers have q_i = 0.4 everywhere, yet draw different rows (two streams)
    gu, xu = F.normalize(g, dim=1), F.normalize(x, dim=1)
    dx, dw, _ = bwd(gu, xu, w, h, h, torch.tensor(3), None, False, True, True, False)
    kept_x = (dx.abs().sum(1) > 0).float()
    q = float(keep_probabilities(torch.ones(64), 0.4)[0])
    assert (dw - (gu * kept_x[:, None] / q).t() @ xu).abs().max() > 1e-3


# ---------------------------------------------------------------- gathered vs dense reference


def _masks(g, x, keep, seed):
    """Row weights ``m_i = kept_i / q_i`` (1 when dense) of the (grad-input, grad-weight) samplers,
    rebuilt from the public pieces: scores, :func:`keep_probabilities`, ``hash_uniform`` columns."""
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    gn = torch.linalg.vector_norm(g2, dim=1, dtype=torch.float32)
    xn = torch.linalg.vector_norm(x2, dim=1, dtype=torch.float32)
    u = hash_uniform(torch.tensor(seed), g2.shape[0], 2).double()
    out = []
    for col, scores in ((0, gn), (1, gn.double() * xn.double())):
        q = keep_probabilities(scores, float(_t(keep))).double()  # the fp32 ratio the op reads
        out.append(torch.ones_like(q) if keep >= 1 else torch.where(u[:, col] < q, 1 / q, 0.0))
    return out


@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["contiguous", "transposed", "step_slice", "3d", "3d_permuted"])
def test_gathered_matches_reference(n, dtype, view):
    """|got - ref| <= (K * 2**-24 + 4u) * (|m g| |w|) elementwise for dx (reduction K = out), and
    (K * 2**-24 + 4u) * (|m g|^T |x|) for dw (K = N): the inputs are exact in fp64; the GEMM
    accumulates K products in fp32 (Higham: error <= K * 2**-24 of the absolute product); the
    scaled operands (two), the fp32 reweighting and the output are each rounded once to the dtype
    (unit roundoff u each). The reference's draws are checked against masks rebuilt here."""
    d_in, d_out = 17, 5
    gen = _gen(n)
    base = torch.randn(3 * n + d_in, 3 * d_in, generator=gen)
    x = {
        "contiguous": lambda: base[:n, :d_in],
        "transposed": lambda: base[:d_in, :n].t(),
        "step_slice": lambda: base[:n, ::3],
        "3d": lambda: base[: 3 * n, :d_in].reshape(3, n, d_in),
        "3d_permuted": lambda: base[: 3 * n, :d_in].reshape(n, 3, d_in).transpose(0, 1),
    }[view]().to(dtype)
    w = (torch.randn(d_out, d_in, generator=gen) / 4).to(dtype)
    g = torch.randn(*x.shape[:-1], d_out, generator=gen) * torch.rand(*x.shape[:-1], 1, generator=gen)
    g = g.to(dtype)
    g2, x2, w64 = g.reshape(-1, d_out).double(), x.reshape(-1, d_in).double(), w.double()
    u = UNIT[dtype]
    for keep in (0.3, 0.6, 1.0):
        k = _t(keep)
        for seed in range(3):
            dx, dw, db = bwd(g, x, w, k, k, torch.tensor(seed), None, False, True, True, True)
            rdx, rdw, rdb = sampled_linear_reference(g, x, w, keep, keep, torch.tensor(seed))
            m_in, m_w = _masks(g, x, keep, seed)
            torch.testing.assert_close(rdx.reshape(-1, d_in), (m_in[:, None] * g2) @ w64)
            torch.testing.assert_close(rdw, (m_w[:, None] * g2).t() @ x2)
            bound_dx = (d_out * 2.0**-24 + 4 * u) * ((m_in[:, None] * g2.abs()) @ w64.abs())
            assert bool(((dx.double() - rdx).reshape(-1, d_in).abs() <= bound_dx).all())
            bound_dw = (g2.shape[0] * 2.0**-24 + 4 * u) * ((m_w[:, None] * g2.abs()).t() @ x2.abs())
            assert bool(((dw.double() - rdw).abs() <= bound_dw).all())
            assert (dx.shape, dx.dtype, dw.dtype) == ((*x.shape[:-1], d_in), dtype, dtype)
            assert torch.equal(db, g.reshape(-1, d_out).sum(0)) and torch.equal(rdb, g2.sum(0))


def test_fp16_reweighting_does_not_overflow():
    """|g| ~ 1e3 and q ~ 0.01: g / q alone overflows fp16 (> 65504), the estimates do not; they meet
    the same elementwise bound as above."""
    gen, n, keep = _gen(11), 1000, 0.01
    g = (torch.randn(n, 8, generator=gen) * 1000).half()
    x = (torch.randn(n, 8, generator=gen) * 1e-3).half()
    w = (torch.randn(8, 8, generator=gen) * 1e-3).half()
    k = _t(keep)
    dx, dw, _ = bwd(g, x, w, k, k, torch.tensor(0), None, False, True, True, False)
    rdx, rdw, _ = sampled_linear_reference(g, x, w, keep, keep, torch.tensor(0))
    m_in, m_w = _masks(g, x, keep, 0)
    assert bool((m_w[:, None] * g.double()).half().isinf().any())  # what scaling g alone would give
    assert bool(dx.isfinite().all() and dw.isfinite().all()) and int((m_w > 0).sum()) > 3
    g2, x2, u = g.double(), x.double(), UNIT[torch.float16]
    bound_dx = (8 * 2.0**-24 + 4 * u) * ((m_in[:, None] * g2.abs()) @ w.double().abs())
    bound_dw = (n * 2.0**-24 + 4 * u) * ((m_w[:, None] * g2.abs()).t() @ x2.abs())
    assert bool(((dx.double() - rdx).abs() <= bound_dx).all())
    assert bool(((dw.double() - rdw).abs() <= bound_dw).all())


# ---------------------------------------------------------------- the GEMMs really shrink


def test_backward_mm_flops_fall_with_keep():
    """aten::mm FLOPs of the backward op (profiler, shapes recorded) follow keep * N rows; no mm
    ever runs on all N rows when sampling (no dense GEMM on a zero-filled matrix)."""
    n, d = 512, 64
    g, x, w = _problem(n, d, d, seed=8)
    measured = {}
    for keep in (1.0, 0.5, 0.25):
        k = _t(keep)
        with torch.profiler.profile(record_shapes=True) as prof:
            bwd(g, x, w, k, k, torch.tensor(1), None, False, True, True, False)
        mms = [e.input_shapes for e in prof.events() if e.name == "aten::mm"]
        assert len(mms) == 2
        total = sum(2 * a[0] * a[1] * b[1] for a, b in mms)
        if keep < 1:  # every mm has the sampled rows as its M (dx) or K (dw) dimension, < N
            assert all(min(a[0], a[1]) < n for a, _ in mms)
        measured[keep] = total
    dense = flops(n, d, d, 1, 1)
    assert measured[1.0] == dense
    for keep in (0.5, 0.25):  # binomial: sd of the kept count <= sqrt(N / 4) = 11 rows of 512
        assert abs(measured[keep] / dense - keep) < 0.07, measured
        assert abs(measured[keep] - flops(n, d, d, keep, keep)) < 0.07 * dense


# ---------------------------------------------------------------- registration and torch.compile


def test_opcheck():
    gen = _gen(9)
    x = torch.randn(2, 7, 5, generator=gen, requires_grad=True)
    w = torch.randn(3, 5, generator=gen, requires_grad=True)
    b = torch.randn(3, generator=gen, requires_grad=True)
    stats = torch.zeros(6, dtype=torch.float64)
    torch.library.opcheck(sampled_linear_op, (x, w, b, _t(0.5), _t(0.5), torch.tensor(3), stats))
    g = torch.randn(2, 7, 3, generator=gen)
    args = (g, x.detach(), w.detach(), _t(0.5), _t(0.5), torch.tensor(3), stats, False, True, True, True)
    torch.library.opcheck(bwd, args)


def test_bad_inputs():
    x, w = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="0-dim float32"):
        sampled_linear(x, w, None, torch.tensor(0.5, dtype=torch.float64), _t(0.5), torch.tensor(0))
    with pytest.raises(ValueError, match="at least 2 dims"):
        sampled_linear(torch.randn(3), w, None, _t(0.5), _t(0.5), torch.tensor(0))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        bwd(torch.randn(4, 2), x, w, _t(0.0), _t(0.5), torch.tensor(0), None, False, True, True, False)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager_without_recompiles(backend):
    def layer(x, w, b, ki, kw, seed, stats):
        return sampled_linear(x, w, b, ki, kw, seed, stats) * 2.0  # exact: same grad_output bits

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    gen = _gen(10)
    for keep_i, keep_w in ((0.5, 0.25), (0.3, 0.8), (1.0, 0.6)):
        x = torch.randn(4, 16, 24, generator=gen).requires_grad_()
        w = torch.randn(12, 24, generator=gen).requires_grad_()
        b = torch.randn(12, generator=gen).requires_grad_()
        go = torch.randn(4, 16, 12, generator=gen)
        args = (_t(keep_i), _t(keep_w), torch.tensor(keep_i * 100, dtype=torch.int64))
        sc, se = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
        got = torch.autograd.grad(compiled(x, w, b, *args, sc), (x, w, b), go)
        want = torch.autograd.grad(layer(x, w, b, *args, se), (x, w, b), go)
        assert all(torch.equal(a, e) for a, e in zip(got, want, strict=True))
        assert torch.equal(sc, se) and (sc[4] == 64) == (keep_i >= 1)  # stats mutated in the backward
    assert counter.frame_count == 1  # new keep values and seeds: runtime data, no recompile
