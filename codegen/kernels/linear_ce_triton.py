"""Triton kernels for :mod:`.linear_ce`: fused linear + cross-entropy, forward and backward.

Same maths as :func:`.linear_ce.linear_cross_entropy_reference` (see :mod:`.linear_ce`). One
program per BLOCK_N tokens loops over vocab blocks; a logit tile (BLOCK_N, BLOCK_V) is built with
``tl.dot`` over BLOCK_H slices of the hidden size, in fp32. Forward keeps an online max / sum of
exp and the target logit per row (outputs fp32 loss and lse). Backward recomputes each tile, forms
``dy`` and adds ``dy w`` into the program's own rows of an fp32 dh (no other program touches them)
and ``dy^T h`` / ``sum dy`` into fp32 dw / db with atomics (on a GPU their summation order, hence
the last bits of dw, varies between runs). Kept apart from .linear_ce so Triton stays optional.
Untuned: on an H100 the tiled cuBLAS path beats them (forward except on GPT-2's head, backward
always), so CUDA uses them only with ``linear_ce.TRITON_FORWARD`` / ``TRITON_BACKWARD``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_ce_grad import check_inputs

__all__ = ["linear_ce_fwd_triton", "linear_ce_bwd_triton"]


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits +-1 at +-inf, absolute error ~1 ulp of 1
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, s_hn, s_hh, s_wv, s_wh, scale, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """fp32 logits of rows x cols: (BLOCK_N, BLOCK_V)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < H
        h = tl.load(h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hh, rmask[:, None] & kmask[None, :], 0.0)
        w = tl.load(w_ptr + cols[:, None] * s_wv + ks[None, :] * s_wh, cmask[:, None] & kmask[None, :], 0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, cmask, 0.0).to(tl.float32)[None, :]
    acc = acc * scale
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _linear_ce_fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, loss_ptr, lse_ptr, N, V, H, s_hn, s_hh, s_wv, s_wh,
                          ignore_index, scale, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                          PRECISION: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, rmask, ignore_index)
    m = tl.full((BLOCK_N,), -float("inf"), tl.float32)  # running max
    s = tl.zeros((BLOCK_N,), tl.float32)  # running sum of exp(z - m)
    zt = tl.zeros((BLOCK_N,), tl.float32)  # target logit
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, s_hn, s_hh, s_wv, s_wh, scale,
                        softcap, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)  # fmt: skip
        z = tl.where(cmask[None, :], z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    lse = m + tl.log(s)
    loss = tl.where(tgt != ignore_index, lse - zt, 0.0)
    tl.store(lse_ptr + rows, lse, rmask)
    tl.store(loss_ptr + rows, loss, rmask)


@triton.jit
def _linear_ce_bwd_kernel(g_ptr, h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, dh_ptr, dw_ptr, db_ptr, N, V, H,
                          s_hn, s_hh, s_wv, s_wh, ignore_index, scale, softcap, filter_eps,
                          HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, rmask, ignore_index)
    lse = tl.load(lse_ptr + rows, rmask, 0.0)
    g = tl.load(g_ptr + rows, rmask, 0.0).to(tl.float32)
    g = tl.where(rmask & (tgt != ignore_index), g, 0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, s_hn, s_hh, s_wv, s_wh, scale,
                        softcap, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)  # fmt: skip
        p = tl.exp(z - lse[:, None])
        dy = (p - (cols[None, :] == tgt[:, None]).to(tl.float32)) * g[:, None]  # (BN, BV)
        if SOFTCAP:
            dy = dy * (scale * (1.0 - (z / softcap) * (z / softcap)))
        else:
            dy = dy * scale
        dy = tl.where(rmask[:, None] & cmask[None, :], dy, 0.0)
        if tl.max(tl.max(tl.abs(dy), 1), 0) >= filter_eps:
            if HAS_BIAS:
                tl.atomic_add(db_ptr + cols, tl.sum(dy, 0), cmask)
            dyc = dy.to(h_ptr.dtype.element_ty)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                kmask = ks < H
                w = tl.load(
                    w_ptr + cols[:, None] * s_wv + ks[None, :] * s_wh, cmask[:, None] & kmask[None, :], 0.0
                )
                h = tl.load(
                    h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hh, rmask[:, None] & kmask[None, :], 0.0
                )
                dh_at = dh_ptr + rows[:, None] * H + ks[None, :]
                dmask = rmask[:, None] & kmask[None, :]
                dh = tl.load(dh_at, dmask, 0.0) + tl.dot(dyc, w, input_precision=PRECISION)
                tl.store(dh_at, dh, dmask)
                dw = tl.dot(tl.trans(dyc), h, input_precision=PRECISION)  # (BV, BH)
                tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], dw, cmask[:, None] & kmask[None, :])


def _config(h: torch.Tensor) -> dict:
    """Tile sizes and dot precision: small tiles under the interpreter (CPU), fp32 products exact
    (IEEE, as torch's default matmul) on a GPU."""
    precision = "ieee" if h.dtype == torch.float32 else "tf32"
    if not h.is_cuda:
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, PRECISION=precision)
    return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=64, PRECISION=precision, num_warps=4)


def _prepare(h, w, b):
    check_inputs(h, w, b, torch.empty(h.shape[0], dtype=torch.long))
    dtype = torch.promote_types(h.dtype, w.dtype)  # tl.dot wants one operand dtype
    if dtype == torch.float64:
        raise ValueError("fxlowbit linear_ce: the Triton kernels take fp32/bf16/fp16, not fp64")
    return h.to(dtype), w.to(dtype), b


def linear_ce_fwd_triton(h, w, b, target, ignore_index, scale, softcap):
    """(loss, lse) fp32 (N,), as :func:`.linear_ce.linear_cross_entropy_reference`."""
    h, w, b = _prepare(h, w, b)
    (n, hid), v = h.shape, w.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=h.device)
    lse = torch.empty_like(loss)
    cfg = _config(h)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _linear_ce_fwd_kernel[grid](h, w, b if b is not None else h, target.contiguous(), loss, lse, n, v, hid,
                                h.stride(0), h.stride(1), w.stride(0), w.stride(1), ignore_index, scale,
                                softcap, HAS_BIAS=b is not None, SOFTCAP=softcap > 0, **cfg)  # fmt: skip
    return loss, lse


def linear_ce_bwd_triton(grad, h, w, b, target, lse, ignore_index, scale, softcap, filter_eps):
    """(dh, dw, db) as :func:`.linear_ce.linear_cross_entropy_backward_reference`."""
    h_in, w_in, b_in = h, w, b
    h, w, b = _prepare(h, w, b)
    (n, hid), v = h.shape, w.shape[0]
    dh = torch.zeros((n, hid), dtype=torch.float32, device=h.device)
    dw = torch.zeros((v, hid), dtype=torch.float32, device=h.device)
    db = torch.zeros(v if b is not None else 0, dtype=torch.float32, device=h.device)
    cfg = _config(h)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _linear_ce_bwd_kernel[grid](grad.float().contiguous(), h, w, b if b is not None else h,
                                target.contiguous(), lse.contiguous(), dh, dw, db if b is not None else dh,
                                n, v, hid, h.stride(0), h.stride(1), w.stride(0), w.stride(1), ignore_index,
                                scale, softcap, filter_eps, HAS_BIAS=b is not None, SOFTCAP=softcap > 0,
                                **cfg)  # fmt: skip
    db = db.to(b_in.dtype) if b_in is not None else db
    return dh.to(h_in.dtype), dw.to(w_in.dtype), db
