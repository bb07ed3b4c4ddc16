"""Fused linear + cross-entropy: the chunked reference against the unfused loss, the pattern pass
on transformers' GPT-2 and Llama and on hand-written variants, and the fuse-or-not choice.

Accuracy rule (fp32, odd shapes): for the loss and the gradients of h, w and b,
``|fused - fp64| <= |unfused - fp64| + TOL * max|fp64|`` elementwise, TOL = 1e-5 (the largest
excess measured here was 6.4e-7 of the tensor's max, so TOL leaves ~15x margin).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxlowbit
from fxlowbit import examples
from fxlowbit.codegen.kernels import linear_ce as lce
from fxlowbit.costmodel import load_profile
from fxlowbit.memory import saved_tensors
from fxlowbit.passes.linear_ce import MIN_FUSE_BYTES, choose

TOL = 1e-5
UNFUSED = {"inner": "eager", "passes": {"plan": False, "linear_ce": False}}
FUSED = {"inner": "eager", "passes": {"plan": False}, "memory_budget": 0.5}  # a budget binds: fuse


def _unfused(h, w, b, t, reduction, scale, softcap):
    z = F.linear(h, w, b) * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, t, reduction=reduction)


def _fused(h, w, b, t, reduction, scale, softcap):
    return lce.linear_cross_entropy(h, w, b, t, reduction=reduction, scale=scale, softcap=softcap)


def _value_and_grads(fn, inputs, dtype, t, reduction, scale, softcap):
    xs = [x.to(dtype).requires_grad_() if x is not None else None for x in inputs]
    out = fn(*xs, t, reduction, scale, softcap)
    go = (
        torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
        if out.dim()
        else torch.ones((), dtype=dtype)
    )
    grads = torch.autograd.grad(out, [x for x in xs if x is not None], go)
    return [out.detach(), *grads]


def _sample(n, hid, v, bias, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hid, generator=g)
    w = torch.randn(v, hid, generator=g) * 3 * hid**-0.5  # logits of std ~3: a peaked softmax
    b = torch.randn(v, generator=g) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[::ignore_every] = -100
    return h, w, b, t


# (tokens, hidden, vocab, reference vocab block, token chunk): vocab never a multiple of the block
SHAPES = [(37, 19, 101, 16, 8), (5, 7, 1030, 1024, 2048), (130, 33, 257, 64, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias,scale,softcap", [(True, 1.0, 0.0), (False, 0.9, 0.0), (True, 0.5, 4.0)])
def test_reference_vs_unfused_fp64_rule(monkeypatch, shape, reduction, bias, scale, softcap):
    n, hid, v, block_v, chunk = shape
    monkeypatch.setattr(lce, "BLOCK_V", block_v)
    monkeypatch.setattr(lce, "CHUNK_N", chunk)
    h, w, b, t = _sample(n, hid, v, bias, seed=n)
    args = (t, reduction, scale, softcap)
    exact = _value_and_grads(_unfused, (h, w, b), torch.float64, *args)
    unfused = _value_and_grads(_unfused, (h, w, b), torch.float32, *args)
    fused = _value_and_grads(_fused, (h, w, b), torch.float32, *args)
    for name, r, u, f in zip(("loss", "dh", "dw", "db"), exact, unfused, fused, strict=False):
        assert f.dtype == torch.float32 and f.shape == r.shape, name
        bound = (u.double() - r).abs() + TOL * r.abs().max()
        excess = ((f.double() - r).abs() - bound).max().item()
        assert excess <= 0, f"{name}: fused error exceeds the unfused one by {excess:.3g}"


def test_ignored_rows_and_all_ignored():
    h, w, b, t = _sample(9, 5, 13, True)
    t[:] = -100
    t[2] = 4
    for red in ("mean", "sum", "none"):
        ref = _value_and_grads(_unfused, (h, w, b), torch.float32, t, red, 1.0, 0.0)
        got = _value_and_grads(_fused, (h, w, b), torch.float32, t, red, 1.0, 0.0)
        for r, g in zip(ref, got, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
        dh = got[1]
        assert (dh[t == -100] == 0).all()  # ignored rows get no gradient
    t[:] = 7
    t[:] = -100  # every row ignored: mean is NaN (0/0) and gradients zero, as in PyTorch
    ref = _value_and_grads(_unfused, (h, w, b), torch.float32, t, "mean", 1.0, 0.0)
    got = _value_and_grads(_fused, (h, w, b), torch.float32, t, "mean", 1.0, 0.0)
    assert ref[0].isnan() and got[0].isnan()
    for r, g in zip(ref[1:], got[1:], strict=True):
        torch.testing.assert_close(g, r)


def test_bad_target_raises():
    h, w, b, t = _sample(4, 3, 5, False)
    t[1] = 5
    with pytest.raises(ValueError, match="outside"):
        lce.linear_cross_entropy(h, w, b, t)
    with pytest.raises(ValueError, match="w \\(V, H\\)"):
        lce.linear_cross_entropy(h, w[:, :2], b, t)


# -- the choice ------------------------------------------------------------------------------------
def test_choice_direction():
    cpu = load_profile("cpu")
    big = choose(8192, 50257, 768, 4, cpu)
    assert big.fuse and big.saved_bytes == 8192 * 50257 * 4 >= MIN_FUSE_BYTES
    small = choose(16, 11, 8, 4, cpu)
    assert not small.fuse and small.extra_s > 0
    assert choose(16, 88, 8, 4, cpu, budget_binding=True).fuse  # vocab 11 x hidden
    # a classifier head (10 classes on 512 features): its exact input costs more than its logits,
    # unless nothing is compressed (the input is then saved exact either way)
    assert not choose(1024, 10, 512, 4, cpu, budget_binding=True).fuse
    assert choose(1024, 10, 512, 4, cpu, budget_binding=True, compressing=False).fuse
    # the extra matmul doubles when the logits are kept for other users
    kept = choose(16, 11, 8, 4, cpu, logits_kept=True)
    assert kept.extra_s == pytest.approx(2 * small.extra_s)
    # recompute cheaper than writing + reading the logits: fuse even when small
    instant = {"float32": dict.fromkeys(("tiny", "small", "medium", "large"), 1e6)}
    fast = load_profile({**cpu.to_dict(), "launch_us": 0.0, "matmul_tflops": instant})
    assert choose(16, 11, 8, 4, fast).fuse


# -- the pass -------------------------------------------------------------------------------------
class Heads(nn.Module):
    """Four losses in the shapes the pass knows: x @ W.T -> float -> view -> cross_entropy;
    matmul(x, W.t()) / 2 -> softcap 30 -> log_softmax -> view -> nll_loss(sum); linear with bias,
    logits[:, :-1] label shift -> CrossEntropyLoss(ignore_index=3); addmm -> to(fp32) ->
    torch.log_softmax -> nll_loss(none).sum()."""

    def __init__(self, hid=8, vocab=11):
        super().__init__()
        self.w = nn.Parameter(torch.randn(vocab, hid) * 0.5)
        self.lin = nn.Linear(hid, vocab)
        self.v = vocab

    def forward(self, x, t):
        v = self.v
        a = F.cross_entropy((x @ self.w.T).float().view(-1, v), t.view(-1))
        z = torch.tanh(torch.matmul(x, self.w.t()) / 2.0 / 30.0) * 30.0
        b = F.nll_loss(F.log_softmax(z, dim=-1).view(-1, v), t.view(-1), reduction="sum")
        lg = self.lin(x)[:, :-1, :].contiguous()
        c = nn.CrossEntropyLoss(ignore_index=3)(lg.reshape(-1, v), t[:, 1:].reshape(-1))
        e = torch.log_softmax(
            torch.addmm(self.lin.bias, x.view(-1, x.shape[-1]), self.lin.weight.t()).to(dtype=torch.float32),
            -1,
        )
        return a + b + c + F.nll_loss(e, t.view(-1), reduction="none").sum()


class NotThePattern(nn.Module):
    """Losses the pass must leave alone: label smoothing, class weights, a tensor added to the
    logits, log_softmax over the wrong dim."""

    def __init__(self, hid=8, vocab=11):
        super().__init__()
        self.lin = nn.Linear(hid, vocab)
        self.register_buffer("cw", torch.rand(vocab) + 0.5)

    def forward(self, x, t):
        z = self.lin(x)
        a = F.cross_entropy(z, t, label_smoothing=0.1)
        b = F.cross_entropy(z, t, weight=self.cw)
        c = F.cross_entropy(z + x[:, :1], t)
        d = F.nll_loss(F.log_softmax(z, dim=0), t)
        return a + b + c + d


def _compare(model, inputs, options, rtol=1e-5, atol=1e-6):
    torch._dynamo.reset()
    fxlowbit.reset()
    ref = model(*inputs)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    out = torch.compile(model, backend="lowbit", options=options)(*inputs)
    grads = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)
    return dict(fxlowbit.counters)


def test_pass_fuses_every_known_shape():
    torch.manual_seed(0)
    x, t = torch.randn(2, 5, 8), torch.randint(0, 11, (2, 5))
    counters = _compare(Heads(), (x, t), FUSED, rtol=1e-4, atol=1e-5)
    assert counters.get("linear_ce") == 4 and not counters.get("fallback_internal_error")


def test_pass_leaves_other_graphs_alone():
    torch.manual_seed(0)
    x, t = torch.randn(6, 8), torch.randint(0, 11, (6,))
    counters = _compare(NotThePattern(), (x, t), FUSED)
    assert counters.get("linear_ce", 0) == 0 and not counters.get("fallback_internal_error")
    # switched off, or too small to pay without a binding budget
    heads = (Heads(), (x.view(2, 3, 8), t.view(2, 3)))
    off = {**FUSED, "passes": {"plan": False, "linear_ce": False}}
    assert _compare(*heads, off, rtol=1e-4, atol=1e-5).get("linear_ce", 0) == 0
    counters = _compare(*heads, {"inner": "eager", "passes": {"plan": False}}, rtol=1e-4, atol=1e-5)
    assert counters.get("linear_ce", 0) == 0 and counters.get("linear_ce_declined") == 4


# -- transformers ---------------------------------------------------------------------------------
BATCH, SEQ = 4, examples.HF_SEQ


def _hf_step(name: str, options: dict):
    torch._dynamo.reset()
    fxlowbit.reset()
    torch.manual_seed(0)
    model = examples.hf_model(name, dropout=0.0)
    model.loss_type = "ForCausalLM"  # no warning in forward, so no graph break before the loss
    idx = next(examples.char_batches(examples.stdlib_text(), BATCH, SEQ, steps=1, seed=0))[0]
    out = torch.compile(model, backend="lowbit", options=options)(**examples.hf_batch(name, idx))
    shapes = [t.numel() for t in saved_tensors(out.loss)]
    nbytes = fxlowbit.saved_activation_bytes(out.loss, model.parameters())
    out.loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.loss.detach(), grad, shapes, nbytes, dict(fxlowbit.counters), model.config.vocab_size


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_transformers_loss_without_saved_logits(name):
    pytest.importorskip("transformers")
    loss0, grad0, numels0, bytes0, _, vocab = _hf_step(name, UNFUSED)
    loss1, grad1, numels1, bytes1, counters, _ = _hf_step(name, FUSED)
    logits = {BATCH * SEQ * vocab, BATCH * (SEQ - 1) * vocab}
    assert logits & set(numels0), "the unfused step should save a tokens x vocab tensor"
    assert not logits & set(numels1), "a tokens x vocab tensor is still saved"
    assert counters.get("linear_ce") == 1 and not counters.get("fallback_internal_error")
    assert bytes0 - bytes1 >= BATCH * SEQ * vocab * 4  # measured: 2462468 -> 2330120 (GPT-2)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad1, grad0, rtol=1e-4, atol=1e-6)
