"""Low-bit GEMMs (codegen/kernels/int8_gemm*.py, lowbit_linear.py): the Triton INT8 GEMM bit for bit
against the reference given the same codes, the quantizers' error bounds and unbiasedness, the
whole quantized linear's SQNR against fp32, Hadamard exactness, the op's registrations, errors.

Without a GPU the Triton kernel runs in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Measured here (CPU, seed 0, 512x256 @ 128x256): int8 row-wise forward / grad-input / grad-weight
SQNR 42.5 / 39.0 / 36.7 dB; fp8 (e4m3 forward, e5m2 stochastic gradients, emulated) 32.0 / 22.3 /
21.6 dB. Floors: int8 30 dB everywhere (torchao's is 20 dB), fp8 28 dB forward and 18 dB gradients.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fxlowbit.codegen.ops as ops_module
from fxlowbit.codegen import rng
from fxlowbit.codegen.kernels import int8_gemm as ig
from fxlowbit.codegen.kernels.int8_gemm_triton import int8_mm_triton
from fxlowbit.codegen.kernels.lowbit_linear import lowbit_linear, lowbit_matmul
from fxlowbit.examples import sqnr_db

from ._views import NONCONTIGUOUS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ODD = (1, 17, 255, 257)
# (M, N, K): every odd size on every axis, plus a few mixed
SHAPES = (
    [(m, 17, 255) for m in ODD] + [(17, n, 257) for n in ODD] + [(255, 17, k) for k in ODD] + [(257, 255, 33)]
)
INT8_FLOOR_DB, FP8_FWD_FLOOR_DB, FP8_GRAD_FLOOR_DB = 30.0, 28.0, 18.0
_BITS = {4: torch.int32, 2: torch.int16}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(m: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-127, 128, (m, k), generator=_gen(seed), dtype=torch.int8)
    s = torch.rand(m, generator=_gen(seed + 1)) * 0.1
    return q.to(DEVICE), s.to(DEVICE)


def _same_bits(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert (got.dtype, got.shape) == (ref.dtype, ref.shape)
    view = _BITS[got.element_size()]
    assert torch.equal(got.view(view), ref.view(view)), f"max diff {(got.float() - ref.float()).abs().max()}"


# ---------------------------------------------------------------- the Triton GEMM, bit for bit


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_triton_int8_mm_matches_reference_bit_for_bit(m, n, k, dtype, bias):
    (a, sa), (b, sb) = _codes(m, k, 1), _codes(n, k, 2)
    bv = (torch.randn(n, generator=_gen(3)) * 4).to(dtype).to(DEVICE) if bias else None
    _same_bits(int8_mm_triton(a, b, sa, sb, bv, dtype), ig.int8_mm_reference(a, b, sa, sb, bv, dtype))


@pytest.mark.parametrize("view", list(NONCONTIGUOUS)[:3])
def test_triton_int8_mm_noncontiguous_inputs(view):
    base = torch.randint(-127, 128, (33, 40), generator=_gen(4), dtype=torch.int8).to(DEVICE)
    a = NONCONTIGUOUS[view](base)  # (M, K) view
    b = torch.randint(-127, 128, (a.shape[1], 23), generator=_gen(5), dtype=torch.int8).to(DEVICE).t()
    sa = torch.rand(2 * a.shape[0], generator=_gen(6)).to(DEVICE)[::2]
    sb = torch.rand(23, generator=_gen(7)).to(DEVICE)
    bias = torch.randn(46, generator=_gen(8)).to(DEVICE)[1::2]
    assert not (a.is_contiguous() and b.is_contiguous())
    for dtype in DTYPES:
        _same_bits(int8_mm_triton(a, b, sa, sb, bias, dtype), ig.int8_mm_reference(a, b, sa, sb, bias, dtype))


def test_triton_int8_mm_empty_and_extreme_codes():
    a = torch.full((19, 300), -127, dtype=torch.int8, device=DEVICE)  # |sum| = 300 * 127**2
    b = torch.full((5, 300), 127, dtype=torch.int8, device=DEVICE)
    ones = torch.ones(19, device=DEVICE), torch.ones(5, device=DEVICE)
    out = int8_mm_triton(a, b, *ones)
    assert torch.all(out == -300 * 127 * 127)  # exact: below 2**24, so also exact as fp32
    for m, n, k in ((0, 5, 8), (4, 0, 8), (4, 5, 0)):
        (qa, sa), (qb, sb) = _codes(m, k, 9), _codes(n, k, 10)
        bias = torch.ones(n, device=DEVICE)
        got, ref = int8_mm_triton(qa, qb, sa, sb, bias), ig.int8_mm_reference(qa, qb, sa, sb, bias)
        assert got.shape == ref.shape == (m, n) and torch.equal(got, ref)


def test_int8_mm_dispatches_to_triton_when_forced(monkeypatch):
    (a, sa), (b, sb) = _codes(40, 72, 11), _codes(24, 72, 12)
    calls = []
    import fxlowbit.codegen.kernels.int8_gemm_triton as kt

    real = kt.int8_mm_triton
    monkeypatch.setattr(kt, "int8_mm_triton", lambda *a_: calls.append(1) or real(*a_))
    monkeypatch.setattr(ops_module, "FORCE_TRITON", True)
    forced = ig.int8_mm(a, b, sa, sb, None, torch.bfloat16)
    monkeypatch.setattr(ops_module, "FORCE_TRITON", False)
    plain = ig.int8_mm(a, b, sa, sb, None, torch.bfloat16)
    assert calls == [1] or DEVICE == "cuda"
    _same_bits(forced, plain)


def test_int32_accumulation_is_exact():
    # products of extreme codes over K = 2500 (several 1024-chunks of the emulated path)
    a = torch.randint(-127, 128, (7, 2500), generator=_gen(13), dtype=torch.int8)
    a[0] = 127
    b = torch.randint(-127, 128, (9, 2500), generator=_gen(14), dtype=torch.int8)
    b[0] = 127
    exact = (a.long() @ b.long().t()).int()
    assert torch.equal(ig._int32_emulated(a, b), exact)
    assert torch.equal(ig._int32_product(a, b), exact)  # torch._int_mm on a CPU
    assert exact[0, 0] == 2500 * 127 * 127
    for m, n in ((255, 17), (3, 4), (1, 1)):  # K = 1: torch 2.13's CPU _int_mm gets it wrong
        a1, b1 = (
            torch.randint(-127, 128, (m, 1), dtype=torch.int8),
            torch.randint(-127, 128, (n, 1), dtype=torch.int8),
        )
        assert torch.equal(ig._int32_product(a1, b1), (a1.long() @ b1.long().t()).int())


# ---------------------------------------------------------------- quantizers


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_quantizer_error_bounds(dtype):
    x = (torch.randn(33, 257, generator=_gen(15)) * torch.logspace(-3, 3, 33)[:, None]).to(dtype)
    x[5] = 0  # a zero row: scale 0, codes 0, exact
    xf = x.float()
    q, s = ig.quantize_int8_rowwise(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.is_contiguous()
    assert torch.equal(s, xf.abs().amax(1) / 127) and q.abs().max() <= 127
    err = (ig.dequantize_int8_rowwise(q, s) - xf).abs()
    assert torch.all(err <= s[:, None] * (0.5 + 1e-5))  # round to nearest: half a step
    noise = ig.rowwise_noise(torch.tensor(7), *x.shape)
    qs, ss = ig.quantize_int8_rowwise(x, noise)
    assert torch.equal(ss, s)
    err_sr = (ig.dequantize_int8_rowwise(qs, ss) - xf).abs()
    assert torch.all((err_sr < s[:, None] * (1 + 1e-5)) | (err_sr == 0))  # less than a step
    assert torch.all(ig.dequantize_int8_rowwise(q, s)[5] == 0)


@pytest.mark.parametrize("fmt,half_ulp", [("e4m3", 2**-4), ("e5m2", 2**-3)])
def test_fp8_quantizer_error_bounds(fmt, half_ulp):
    x = torch.randn(17, 255, generator=_gen(16)) * torch.logspace(-2, 2, 17)[:, None]
    q, s = ig.quantize_fp8(x, fmt)
    assert q.dtype == ig.FP8[fmt][0] and s.shape == (17,)
    y = ig.dequantize_fp8(q, s)
    big = x.abs() >= s[:, None] * 2.0 ** ig.FP8[fmt][3]  # normal range of the fp8 format
    rel = ((y - x).abs() / x.abs())[big]
    assert rel.max() <= half_ulp * (1 + 1e-5)  # round to nearest: half an ulp, relative
    qs, ss = ig.quantize_fp8(x, fmt, ig.rowwise_noise(torch.tensor(3), *x.shape))
    rel_sr = ((ig.dequantize_fp8(qs, ss) - x).abs() / x.abs())[big]
    assert rel_sr.max() < 2 * half_ulp  # stochastic: less than one ulp
    qt, st = ig.quantize_fp8(x, fmt, rowwise=False)  # per-tensor scale
    assert st.dim() == 0 and torch.isclose(st, x.abs().max() / ig.FP8[fmt][1])


@pytest.mark.parametrize("quantize", ["int8", "e5m2", "e4m3"])
def test_stochastic_rounding_is_unbiased(quantize):
    """n = 4096 independent roundings of one row (each copy of the row draws its own noise).
    The mean of a rounded element has standard deviation <= step / (2 sqrt(n)); every element's
    mean must lie within 5 of them of the value (a false alarm on 255 elements: < 1e-4)."""
    n, x = 4096, torch.randn(1, 255, generator=_gen(17)) * 3
    rows = x.expand(n, -1)
    noise = ig.rowwise_noise(torch.tensor(123456789), n, x.shape[1])
    if quantize == "int8":
        q, s = ig.quantize_int8_rowwise(rows, noise)
        mean, step = ig.dequantize_int8_rowwise(q, s).double().mean(0), s[0].double()
    else:
        q, s = ig.quantize_fp8(rows, quantize, noise)
        mean = ig.dequantize_fp8(q, s).double().mean(0)
        _, ex = torch.frexp(x[0] / s[0])
        step = s[0].double() * 2.0 ** (ex.clamp(min=ig.FP8[quantize][3] + 1) - 1 - ig.FP8[quantize][2])
    tol = 5 * step / (2 * math.sqrt(n))
    assert torch.all((mean - x[0].double()).abs() <= tol), ((mean - x[0]).abs() / tol).max()
    rtn = ig.dequantize_int8_rowwise(*ig.quantize_int8_rowwise(x))[0] if quantize == "int8" else None
    if rtn is not None:  # round to nearest is biased: most elements sit off by far more
        assert ((rtn.double() - x[0]).abs() > tol).float().mean() > 0.5


# ---------------------------------------------------------------- the quantized linear


def _linear_grads(fmts, dtype, hadamard=0, force_triton=False, monkeypatch=None, seed=0):
    torch.manual_seed(0)  # the same data whatever the rounding noise's seed
    x = torch.randn(512, 256).to(dtype).requires_grad_()
    w = (torch.randn(128, 256) / 16).to(dtype).requires_grad_()
    b = torch.randn(128).to(dtype).requires_grad_()
    g = torch.randn(512, 128).to(dtype)
    if monkeypatch is not None:
        monkeypatch.setattr(ops_module, "FORCE_TRITON", force_triton)
    y = lowbit_linear(x, w, b, *fmts, hadamard=hadamard, stream=rng.new_stream(seed))
    y.backward(g)
    ref_in = [t.detach().float().requires_grad_() for t in (x, w, b)]
    ref = F.linear(*ref_in)
    ref.backward(g.float())
    return (y.detach(), x.grad, w.grad, b.grad), (ref.detach(), *(t.grad for t in ref_in))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_sqnr_against_fp32(dtype):
    got, ref = _linear_grads(("int8", "int8", "int8"), dtype)
    assert [t.dtype for t in got] == [dtype] * 4
    db = [sqnr_db(r, t) for r, t in zip(ref, got, strict=True)]
    assert min(db[:3]) >= INT8_FLOOR_DB, db  # forward, grad-input, grad-weight
    assert db[3] >= (INT8_FLOOR_DB if dtype != torch.float32 else math.inf), db  # bias grad: exact in fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_sqnr_against_fp32(dtype):
    got, ref = _linear_grads(("fp8", "fp8", "fp8"), dtype)
    db = [sqnr_db(r, t) for r, t in zip(ref, got, strict=True)]
    assert db[0] >= FP8_FWD_FLOOR_DB and min(db[1:3]) >= FP8_GRAD_FLOOR_DB, db


def test_mixed_formats_and_plain_grad_weight():
    got, ref = _linear_grads(("int8", "int8", "fp32"), torch.float32)
    db = [sqnr_db(r, t) for r, t in zip(ref, got, strict=True)]
    assert min(db) >= INT8_FLOOR_DB, db
    got, ref = _linear_grads(("fp32", "fp32", "fp32"), torch.float32)
    assert all(torch.equal(r, t) for r, t in zip(ref, got, strict=True))  # plain: exactly F.linear


def test_linear_with_triton_forced_equals_reference(monkeypatch):
    forced, _ = _linear_grads(
        ("int8", "int8", "int8"), torch.bfloat16, force_triton=True, monkeypatch=monkeypatch
    )
    plain, _ = _linear_grads(
        ("int8", "int8", "int8"), torch.bfloat16, force_triton=False, monkeypatch=monkeypatch
    )
    for a, b in zip(forced, plain, strict=True):
        _same_bits(a, b)


def test_stochastic_gradients_are_seeded():
    a, _ = _linear_grads(("int8", "int8", "int8"), torch.float32, seed=1)
    b, _ = _linear_grads(("int8", "int8", "int8"), torch.float32, seed=1)
    c, _ = _linear_grads(("int8", "int8", "int8"), torch.float32, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])  # forward: round to nearest


# ---------------------------------------------------------------- Hadamard


@pytest.mark.parametrize("block", [32, 128])
def test_hadamard_is_orthonormal_and_leaves_the_product(block):
    h = ig.hadamard_matrix(block)
    assert torch.allclose(h @ h, torch.eye(block), atol=1e-6) and torch.equal(h, h.t())
    x, w = torch.randn(17, 256, generator=_gen(18)), torch.randn(33, 256, generator=_gen(19))
    xr, wr = ig.hadamard_rotate(x, block), ig.hadamard_rotate(w, block)
    assert torch.allclose(xr @ wr.t(), x @ w.t(), atol=1e-4, rtol=1e-5)
    assert torch.allclose(ig.hadamard_rotate(xr, block), x, atol=1e-5)


def test_hadamard_spreads_outliers():
    """Four outlier channels (50x) inflate every row's int8 scale; rotating spreads them over a
    block. Measured: 31.3 dB plain, 38.6 (block 32) and 41.3 dB (block 128)."""
    x, w = torch.randn(256, 256, generator=_gen(0)), torch.randn(128, 256, generator=_gen(1))
    x[:, :4] *= 50
    ref, db = x @ w.t(), {}
    for block in (0, 32, 128):
        xr, wr = (ig.hadamard_rotate(x, block), ig.hadamard_rotate(w, block)) if block else (x, w)
        db[block] = sqnr_db(ref, lowbit_matmul(xr, wr, "int8"))
    assert db[128] > db[32] > db[0] + 5, db
    got, ref = _linear_grads(("int8", "int8", "int8"), torch.float32, hadamard=32)
    assert min(sqnr_db(r, t) for r, t in zip(ref, got, strict=True)) >= INT8_FLOOR_DB


# ---------------------------------------------------------------- registrations and errors


@pytest.mark.parametrize("fmts", [("int8", "int8", "int8"), ("fp8", "fp8", "fp32"), ("fp32", "int8", "int8")])
def test_opcheck(fmts):
    x, w, b = torch.randn(16, 64), torch.randn(32, 64), torch.randn(32)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), *fmts, 32, -1)
    torch.library.opcheck(torch.ops.fxlowbit.lowbit_linear.default, args)


def test_saved_copy_is_the_quantized_one():
    x, w = torch.randn(64, 128, requires_grad=True), torch.randn(32, 128, requires_grad=True)
    y = lowbit_linear(x, w, None, "int8", "int8", "int8")
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]  # the op's own node (no view after it)
    assert {t.dtype for t in saved} == {torch.int8, torch.float32}
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)
    assert sum(t.nbytes for t in saved if t.data_ptr() != w.data_ptr()) == 64 * 128 + 64 * 4


@pytest.mark.parametrize(
    "fmts", [("int8", "int8", "fp32"), ("fp8", "fp32", "fp32"), ("fp32", "fp32", "int8")]
)
def test_a_plain_grad_weight_gemm_reads_x_itself(fmts):
    """SwitchBack's split: when either the forward or the grad-weight GEMM is plain, the op saves x
    as is (no quantized copy; the planner may replay or round it like any saved tensor), and a plain
    grad-weight GEMM is exactly dy^T x, whatever the forward ran in. Before, a low-bit forward
    always saved its int8 copy and dw read it dequantized (about 40 dB from exact)."""
    x, w = torch.randn(64, 128, requires_grad=True), torch.randn(32, 128, requires_grad=True)
    y = lowbit_linear(x, w, None, *fmts)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert {t.dtype for t in saved} == {torch.float32}
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    g = torch.randn(64, 32, generator=_gen(5))
    y.backward(g)
    if fmts[2] == "fp32":
        torch.testing.assert_close(w.grad, g.t() @ x.detach(), rtol=1e-5, atol=1e-5)  # fp32 rounding only


def test_probe_replays_run_the_gradient_gemms_plain():
    """Within ``sampling_state.exact()`` (the probes' replays) the backward's GEMMs run plain: the
    replays measure saved tensors' sensitivities against the exact gradient, not one carrying the
    int8 GEMMs' own noise (and skip the quantizers: 14.2 s against 16.6-18.9 s for issue 18's
    Llama's probe step, machine profile, 2026-12-06)."""
    from fxlowbit.codegen.kernels import sampling_state

    x, w = torch.randn(64, 128, generator=_gen(6)), torch.randn(32, 128, generator=_gen(7))
    g = torch.randn(64, 32, generator=_gen(8))

    def grads(fmts, seed=0):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        lowbit_linear(xx, ww, None, *fmts, stream=rng.new_stream(seed)).backward(g)
        return xx.grad, ww.grad

    plain = grads(("int8", "fp32", "fp32"))
    with sampling_state.exact():
        probed = [grads(("int8", "int8", "int8"), seed) for seed in (0, 1)]
    assert torch.equal(probed[0][0], plain[0])  # dx = g w: plain, exactly
    assert all(torch.equal(a, b) for a, b in zip(*probed, strict=True))  # no noise drawn
    # dw = g^T x, plain, on the forward's int8 copy of x (what this format pair saves)
    assert sqnr_db(plain[1], probed[0][1]) >= INT8_FLOOR_DB
    noisy = grads(("int8", "int8", "int8"))
    assert not torch.equal(noisy[0], plain[0])  # control: outside, int8 with stochastic rounding


def test_errors():
    q = torch.zeros(4, 8, dtype=torch.int8)
    s4, s8 = torch.ones(4), torch.ones(8)
    with pytest.raises(ValueError, match=r"need a \(M, K\) and b \(N, K\)"):
        ig.int8_mm_reference(q, torch.zeros(4, 9, dtype=torch.int8), s4, s4)
    with pytest.raises(ValueError, match="codes must be"):
        ig.int8_mm_reference(q.float(), q, s4, s4)
    with pytest.raises(ValueError, match=r"sb must be fp32 \(4,\)"):
        ig.int8_mm_reference(q, q, s4, s8)
    with pytest.raises(ValueError, match="out_dtype must be"):
        ig.int8_mm_reference(q, q, s4, s4, None, torch.float64)
    big = torch.zeros(1, ig.MAX_K + 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="overflow the int32 accumulator"):
        ig.int8_mm_reference(big, big, torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match="need a 2-D"):
        ig.quantize_int8_rowwise(torch.randn(3))
    with pytest.raises(ValueError, match="fmt='e3m4'"):
        ig.quantize_fp8(torch.randn(2, 2), "e3m4")
    with pytest.raises(ValueError, match="block must be 32 or 128"):
        ig.hadamard_matrix(64)
    with pytest.raises(ValueError, match="not a multiple of the block"):
        ig.hadamard_rotate(torch.randn(2, 40), 32)
    x, w = torch.randn(4, 64), torch.randn(8, 64)
    with pytest.raises(ValueError, match="fwd_fmt='bf16' is invalid with torch.float32"):
        lowbit_linear(x, w, None, "bf16", "int8", "int8")
    with pytest.raises(ValueError, match="must share a dtype"):
        lowbit_linear(x, w.half(), None)
    with pytest.raises(ValueError, match="hadamard=64"):
        lowbit_linear(x, w, None, hadamard=64)


@pytest.mark.gpu
def test_fp8_scaled_mm_close_to_emulation():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 GEMMs need sm89+")
    x, w = torch.randn(256, 512, device="cuda"), torch.randn(128, 512, device="cuda")
    (xq, xs), (wq, ws) = ig.quantize_fp8(x), ig.quantize_fp8(w)
    got = ig.fp8_mm(xq, wq, xs, ws, None, torch.bfloat16)
    assert sqnr_db(ig.fp8_mm_reference(xq, wq, xs, ws, None, torch.float32), got) > 40
