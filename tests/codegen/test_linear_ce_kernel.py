"""The fused linear + cross-entropy ops: the recompute path's Triton kernels (interpreter on CPU,
``FORCE_TRITON``) against its chunked reference; the forward-gradient op over chunk sizes and its
chunk size from the cost model; opcheck of the torch.library ops, and torch.compile of the op.

Tiny odd shapes (vocab and hidden not multiples of the tiles) keep the interpreter fast. Both
paths accumulate in fp32, so fp32 results agree to float rounding: rtol 1e-5, atol 1e-5 of the
tensor's scale. The GPU test compares bf16 inputs with the reference on the same bf16 values.
"""

from __future__ import annotations

import pytest
import torch

import fxlowbit  # noqa: F401  (registers the fxlowbit:: ops)
from fxlowbit.codegen.kernels import linear_ce as lce
from fxlowbit.codegen.kernels import linear_ce_grad as lcg
from fxlowbit.costmodel import load_profile

pytest.importorskip("triton")
ops = torch.ops.fxlowbit


def _sample(n, hid, v, bias, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hid, generator=g)
    w = torch.randn(v, hid, generator=g) * 3 * hid**-0.5
    b = torch.randn(v, generator=g) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[1::5] = -100
    grad = torch.randn(n, generator=g)
    cast = lambda x: x.to(device, dtype) if x is not None else None  # noqa: E731
    return cast(h), cast(w), cast(b), t.to(device), grad.to(device)


def _close(got, ref, rtol=1e-5, atol=1e-5):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if ref.numel() == 0:  # db without a bias
        return
    torch.testing.assert_close(
        got.float(), ref.float(), rtol=rtol, atol=atol * max(ref.abs().max().item(), 1e-30)
    )


def _both(monkeypatch, args, bwd_extra):
    """(fwd, bwd) outputs of the ops on the reference path, then on the Triton path."""
    h, w, b, t, grad, ig, scale, cap = args
    out = []
    for force in (False, True):
        monkeypatch.setattr(lce, "FORCE_TRITON", force)
        loss, lse = ops.linear_ce_fwd(h, w, b, t, ig, scale, cap)
        out.append(((loss, lse), ops.linear_ce_bwd(grad, h, w, b, t, lse, ig, scale, cap, *bwd_extra)))
    return out


# (tokens, hidden, vocab): tails in every tile dimension (interpreter tiles 16 x 32 x 16)
@pytest.mark.parametrize("shape", [(37, 19, 101), (16, 16, 32), (3, 40, 70)], ids=str)
@pytest.mark.parametrize("bias,scale,softcap", [(True, 1.0, 0.0), (False, 0.7, 0.0), (True, 0.5, 3.0)])
def test_triton_interpreter_matches_reference(monkeypatch, shape, bias, scale, softcap):
    h, w, b, t, grad = _sample(*shape, bias)
    (ref_f, ref_b), (tri_f, tri_b) = _both(monkeypatch, (h, w, b, t, grad, -100, scale, softcap), (0.0,))
    for got, ref in zip((*tri_f, *tri_b), (*ref_f, *ref_b), strict=True):
        _close(got, ref)
    assert (tri_f[0][t == -100] == 0).all() and (tri_b[0][t == -100] == 0).all()


def test_triton_transposed_weight_and_filter(monkeypatch):
    """A strided (transposed-view) weight; gradient filtering skips near-zero blocks (approximate)."""
    h, w, b, t, grad = _sample(21, 17, 90, True, seed=1)
    wt = w.t().contiguous().t()  # (V, H) with strides (1, V)
    (ref_f, ref_b), (tri_f, tri_b) = _both(monkeypatch, (h, wt, b, t, grad, -100, 1.0, 0.0), (0.0,))
    for got, ref in zip((*tri_f, *tri_b), (*ref_f, *ref_b), strict=True):
        _close(got, ref)
    _, (_, filt_b) = _both(monkeypatch, (h, w, b, t, grad, -100, 1.0, 0.0), (1e-4,))
    for got, ref in zip(filt_b, ref_b, strict=True):
        _close(got, ref, rtol=1e-3, atol=1e-3)


def test_opcheck():
    h, w, b, t, grad = _sample(9, 5, 13, True)
    torch.library.opcheck(ops.linear_ce_fwd, (h.requires_grad_(), w.requires_grad_(), b, t, -100, 1.0, 0.0))
    loss, lse = ops.linear_ce_fwd(h, w, b, t, -100, 1.0, 0.0)
    torch.library.opcheck(
        ops.linear_ce_bwd, (grad, h.detach(), w.detach(), None, t, lse.detach(), -100, 1.0, 0.0, 0.0)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk", [None, 4])
def test_opcheck_forward_gradient_op(monkeypatch, dtype, chunk):
    """The fake kernel's shapes, dtypes and (contiguous) strides, one chunk or several."""
    monkeypatch.setattr(lcg, "CHUNK_ROWS", chunk)
    h, w, b, t, _ = _sample(9, 5, 13, True, dtype=dtype)
    y = torch.nn.functional.linear(h, w, b)
    for logits, red, asked in ((None, "mean", (True, True, True)), (y, "sum", (False, True, True)),
                               (None, "none", (True, False, False))):  # fmt: skip
        xs = [x.clone().requires_grad_(a) for x, a in zip((h, w, b), asked, strict=True)]
        args = (*xs, t, logits, -100, 0.8, 2.0, 0.1, red, *asked)
        torch.library.opcheck(ops.linear_ce_fwd_grad, args)
        assert all(o.is_contiguous() for o in ops.linear_ce_fwd_grad(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunks_agree(monkeypatch, dtype, chunk):
    """Any chunk size (tokens not a multiple of it, one token, the cost model's) gives the one-chunk
    result: fp32 to float rounding; bf16/fp16 up to dw's chunk products, rounded to the GEMM dtype
    before their fp32 sum (a few epsilons of dw's max)."""
    h, w, b, t, _ = _sample(37, 19, 101, True, dtype=dtype)
    args = (t, None, -100, 1.0, 0.0, 0.0, "mean", True, True, True)
    monkeypatch.setattr(lcg, "CHUNK_ROWS", 37)
    ref = lcg.linear_ce_grad_reference(h, w, b, *args)
    monkeypatch.setattr(lcg, "CHUNK_ROWS", chunk)
    got = lcg.linear_ce_grad_reference(h, w, b, *args)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}[dtype]
    for x, r in zip(got, ref, strict=True):
        _close(x, r, rtol=tol, atol=tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_ignored_tokens_as_on_cuda(monkeypatch, reduction):
    """CUDA masks ignored tokens instead of dropping them (no host sync): the same results, also
    when every token is ignored (mean NaN, gradients zero)."""
    h, w, b, t, _ = _sample(37, 19, 101, True)
    monkeypatch.setattr(lcg, "CHUNK_ROWS", 8)
    grads = (True, reduction != "none", reduction != "none")
    for targets in (t, torch.full_like(t, -100)):
        args = (targets, None, -100, 0.7, 3.0, 0.1, reduction, *grads)
        monkeypatch.setattr(lcg, "MASK_IGNORED", False)
        ref = lcg.linear_ce_grad_reference(h, w, b, *args)
        monkeypatch.setattr(lcg, "MASK_IGNORED", True)
        got = lcg.linear_ce_grad_reference(h, w, b, *args)
        for x, r in zip(got, ref, strict=True):
            torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_linear_logits_skips_a_zero_gradient():
    """The kept projection: F.linear's values and gradients; an all-zero output gradient (what
    autograd hands an output nobody differentiated) gives zeros without a GEMM."""
    h, w, b, _, _ = _sample(2 * 7, 9, 23, True)
    h, w, b = (x.requires_grad_() for x in (h.view(2, 7, 9), w, b))
    torch.library.opcheck(ops.linear_logits, (h, w, b))
    torch.library.opcheck(ops.linear_logits_backward, (torch.randn(2, 7, 23), h.detach(), w.detach(), True))
    y = ops.linear_logits(h, w, b)
    torch.testing.assert_close(y, torch.nn.functional.linear(h, w, b))
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (h, w, b), g)
    ref = torch.autograd.grad(torch.nn.functional.linear(h, w, b), (h, w, b), g)
    for x, r in zip(got, ref, strict=True):
        torch.testing.assert_close(x, r)
    for grad, gemms in ((torch.zeros_like(y), 0), (g, 2)):
        with torch.profiler.profile() as prof:
            out = ops.linear_logits_backward(grad, h.detach(), w.detach(), True)
        assert sum(e.name == "aten::mm" for e in prof.events()) == gemms
        assert [x.shape for x in out] == [h.shape, w.shape, b.shape]
    assert not any(x.any() for x in ops.linear_logits_backward(torch.zeros_like(y), h, w, True))


def test_chunk_rows_from_the_cost_model():
    cpu, h100 = load_profile("cpu"), load_profile("h100")
    # small GEMMs waste throughput and every chunk streams the weight and dw: a few big chunks,
    # on CPU within glibc's reused blocks unless that costs more than fresh pages
    assert lcg.chunk_rows(8192, 50257, 768, torch.float32, cpu) == 512
    assert lcg.chunk_rows(8192, 50257, 768, torch.bfloat16, cpu) == 2048
    assert lcg.chunk_rows(1016, 16384, 128, torch.float32, cpu) * 16384 * 4 <= lcg.FRESH_BYTES
    assert lcg.chunk_rows(8192, 50257, 768, torch.bfloat16, h100) == 8192
    assert lcg.chunk_rows(3, 50257, 768, torch.float32, cpu) == 3  # never more than the tokens
    tokens = (64, 1024, 65536)
    sizes = [lcg.chunk_rows(n, 32000, 512, torch.float32, cpu) for n in tokens]
    assert sizes == sorted(sizes) and all(
        s & (s - 1) == 0 or s == n for s, n in zip(sizes, tokens, strict=True)
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles(backend):
    h, w, b, t, _ = _sample(12, 9, 23, True)
    h, w = h.requires_grad_(), w.requires_grad_()
    fn = lambda h, w, b, t: lce.linear_cross_entropy(h, w, b, t, reduction="sum", softcap=2.0)  # noqa: E731
    ref = fn(h, w, b, t)
    got = torch.compile(fn, backend=backend, fullgraph=True)(h, w, b, t)
    torch.testing.assert_close(got, ref)
    for g, r in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(ref, (h, w)), strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("triton", [False, True])
def test_cuda_matches_cpu_reference(monkeypatch, dtype, triton):
    """CUDA (cuBLAS-tiled torch path, or the Triton kernels) against the fp32 CPU reference on the
    same (bf16-rounded) values. bf16: dy is rounded to bf16 for the tensor-core GEMMs."""
    monkeypatch.setattr(lce, "TRITON_FORWARD", triton)
    monkeypatch.setattr(lce, "TRITON_BACKWARD", triton)
    h, w, b, t, grad = _sample(1000, 257, 5003, True, dtype=dtype, device="cuda")
    loss, lse = ops.linear_ce_fwd(h, w, b, t, -100, 1.0, 30.0)
    got = ops.linear_ce_bwd(grad, h, w, b, t, lse, -100, 1.0, 30.0, 0.0)
    cpu = [x.cpu().float() for x in (h, w, b)]
    ref_loss, ref_lse = lce.linear_cross_entropy_reference(*cpu, t.cpu(), -100, 1.0, 30.0)
    ref = lce.linear_cross_entropy_backward_reference(grad.cpu(), *cpu, t.cpu(), ref_lse, -100, 1.0, 30.0)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for x, exp in zip((loss, lse, *got), (ref_loss, ref_lse, *ref), strict=True):
        _close(x.cpu().float(), exp, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_gradient_matches_cpu(dtype):
    """The forward-gradient op on CUDA (masked ignored rows, cuBLAS GEMMs, dw summed in fp32)
    against the CPU op on the same values (CPU: fp32 GEMMs for fp32, bf16 for bf16)."""
    h, w, b, t, _ = _sample(1000, 257, 5003, True, dtype=dtype, device="cuda")
    args = (t, None, -100, 1.0, 30.0, 0.1, "mean", True, True, True)
    got = lcg.linear_ce_grad_reference(h, w, b, *args)
    ref = lcg.linear_ce_grad_reference(h.cpu(), w.cpu(), b.cpu(), t.cpu(), *args[1:])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for x, exp in zip(got, ref, strict=True):
        _close(x.cpu(), exp, rtol=tol, atol=tol)
