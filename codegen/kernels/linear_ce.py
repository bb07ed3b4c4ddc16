"""Linear + cross-entropy without materialised logits: the public op and its recompute path.

:func:`linear_cross_entropy` forms the gradients in the forward, chunk by chunk
(:mod:`.linear_ce_grad`, the default). This module keeps the recompute path (Cut Cross-Entropy's
scheme), used for ``reduction="none"`` when the weight needs a gradient: ``linear_ce_fwd`` saves
only the log-sum-exps, ``linear_ce_bwd`` rebuilds the logits.

Maths. Row ``i`` of ``h`` (N, H) against ``w`` (V, H), optional bias ``b`` (V,): ``y = h w^T + b``,
logits ``z = scale * y`` or, with a softcap ``c > 0``, ``z = c * tanh(scale * y / c)``. Forward:
``lse_i = logsumexp_v z_iv`` (online over vocab blocks) and ``loss_i = lse_i - z_{i,t_i}``, 0 where
``t_i == ignore_index``. Backward for per-token loss gradients ``g``: ``dz = (softmax(z) - onehot(t))
* g`` (rows with ``t_i == ignore_index`` zero), ``dy = dz * dz/dy`` (``scale``, or ``scale * (1 -
(z/c)^2)`` with a softcap), ``dh = dy w``, ``dw = dy^T h``, ``db = sum_i dy``, logit blocks recomputed.
Everything accumulates in fp32 whatever the input dtype, and no path holds an (N, V) tensor: the
torch path works on (token chunk, vocab block) tiles, the Triton kernels (linear_ce_triton.py) on
(BLOCK_N, BLOCK_V) tiles. Dispatch: torch on CPU and, with cuBLAS-sized tiles, on CUDA (the
Triton kernels are slower there so far: ``TRITON_FORWARD`` / ``TRITON_BACKWARD``, measured);
``FORCE_TRITON`` runs the kernels anywhere (the interpreter on CPU).
The recompute ops return per-token losses; autograd hands their backward per-token ``g``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .linear_ce_grad import check_inputs
from .linear_ce_grad_op import linear_ce_fwd_grad  # noqa: F401  (registers fxlowbit::linear_ce_fwd_grad)
from .linear_ce_logits import linear_logits  # noqa: F401  (registers fxlowbit::linear_logits)

__all__ = [
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_cross_entropy_backward_reference",
    "linear_ce_fwd",
    "linear_ce_bwd",
    "FORCE_TRITON",
    "TRITON_FORWARD",
    "TRITON_BACKWARD",
    "FILTER_EPS",
]

FORCE_TRITON = False  # tests set it to run the Triton kernels on CPU tensors (TRITON_INTERPRET=1)
# CUDA: the Triton kernels are opt-in. Measured on an H100 (benchmarks/results/linear_ce_h100.json):
# the backward kernel (dh read-modify-write per vocab block, dw by atomics) is 6-32x slower than the
# tiled torch path with cuBLAS GEMMs; the forward kernel is 1.5x faster on GPT-2's head (bf16) but
# 3.6x slower on Llama-3's and 7x on fp32 (IEEE fp32 dots). Neither path saves logits.
TRITON_FORWARD = False
TRITON_BACKWARD = False
# Backward skips vocab blocks whose every |dy| is below this (CCE's gradient filtering; 0: exact).
FILTER_EPS = 0.0
BLOCK_V = 1024  # reference: vocab columns per tile (the last tile may be shorter)
CHUNK_N = 2048  # reference: tokens per tile, so a tile is at most CHUNK_N x BLOCK_V fp32 (8 MiB)
CUDA_BLOCK_V, CUDA_CHUNK_N = 4096, 8192  # CUDA backward tiles: 128 MiB fp32, GEMMs large enough
_REDUCTIONS = ("mean", "sum", "none")


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32, products of the operands' own dtype accumulated in fp32 (cuBLAS's
    bf16 -> fp32 GEMM on CUDA; an upcast elsewhere)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # torch without mm(out_dtype=)
            pass
    return a.float() @ b.float()


def _logits(hc, wb, bb, scale, softcap):
    """fp32 logits of a tile: hc (n, H), wb (bv, H), bb (bv,) or None -> (n, bv)."""
    z = _mm32(hc, wb.T)
    if bb is not None:
        z = z + bb.float()
    z = z * scale
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


def linear_cross_entropy_reference(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int = -100,
    scale: float = 1.0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses and log-sum-exps, both fp32 (N,), tile by tile (never (N, V)). Targets
    outside ``[0, V)`` other than ``ignore_index`` raise on CPU (unchecked on CUDA: no host sync)."""
    check_inputs(h, w, b, target)
    n, v = h.shape[0], w.shape[0]
    mm_dtype, block_v, chunk_n = _tiling(h, w)
    valid = target != ignore_index
    if not h.is_cuda and not bool(((target >= 0) & (target < v) | ~valid).all()):
        raise ValueError(f"fxlowbit linear_ce: a target is outside [0, {v}) and not ignore_index")
    loss = torch.empty(n, dtype=torch.float32, device=h.device)
    lse = torch.empty_like(loss)
    for n0 in range(0, n, chunk_n):
        hc, tc = h[n0 : n0 + chunk_n].to(mm_dtype), target[n0 : n0 + chunk_n]
        m = torch.full((hc.shape[0],), -torch.inf, device=h.device)  # running max
        s = torch.zeros_like(m)  # running sum of exp(z - m)
        zt = torch.zeros_like(m)  # target logit
        for v0 in range(0, v, block_v):
            v1 = min(v0 + block_v, v)
            z = _logits(hc, w[v0:v1].to(mm_dtype), b[v0:v1] if b is not None else None, scale, softcap)
            m_new = torch.maximum(m, z.amax(1))
            s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
            m = m_new
            inside = (tc >= v0) & (tc < v1)
            picked = z.gather(1, (tc - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            zt = torch.where(inside, picked, zt)
        lse[n0 : n0 + chunk_n] = m + torch.log(s)
        loss[n0 : n0 + chunk_n] = torch.where(valid[n0 : n0 + chunk_n], lse[n0 : n0 + chunk_n] - zt, 0.0)
    return loss, lse


def _tiling(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.dtype, int, int]:
    """(GEMM operand dtype, vocab block, token chunk): all fp32 on CPU; on CUDA the inputs' dtype
    (tensor cores, fp32 accumulation and output) and tiles large enough for cuBLAS."""
    if h.is_cuda:
        return torch.promote_types(h.dtype, w.dtype), CUDA_BLOCK_V, CUDA_CHUNK_N
    return torch.float32, BLOCK_V, CHUNK_N


def linear_cross_entropy_backward_reference(
    grad: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int = -100,
    scale: float = 1.0,
    softcap: float = 0.0,
    filter_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dw, db) for per-token loss gradients ``grad`` (N,); db is empty (0,) without a bias.
    Outputs are contiguous, in h's, w's and b's dtypes. Vocab blocks outside, token chunks inside,
    so dw is accumulated one fp32 block at a time. On CUDA the GEMMs run in the inputs' dtype with
    fp32 accumulation (``dy`` rounded to it, as in CCE) and larger tiles; on CPU all in fp32."""
    check_inputs(h, w, b, target)
    (n, hid), v = h.shape, w.shape[0]
    mm_dtype, block_v, chunk_n = _tiling(h, w)
    g = torch.where(target != ignore_index, grad.float(), 0.0) * scale  # where: 1/0 counts stay out
    hm = h.to(mm_dtype)
    dh = torch.zeros((n, hid), dtype=torch.float32, device=h.device)
    dw = torch.empty((v, hid), dtype=w.dtype, device=h.device)
    db = torch.zeros(v if b is not None else 0, dtype=torch.float32, device=h.device)
    for v0 in range(0, v, block_v):
        v1 = min(v0 + block_v, v)
        wb, bb = w[v0:v1].to(mm_dtype), (b[v0:v1] if b is not None else None)
        dwb = torch.zeros((v1 - v0, hid), dtype=torch.float32, device=h.device)
        for n0 in range(0, n, chunk_n):
            n1 = min(n0 + chunk_n, n)
            tc, gc = target[n0:n1], g[n0:n1]
            z = _logits(hm[n0:n1], wb, bb, scale, softcap)  # (n, bv) fp32
            # in place, a few passes over the tile: dy = (exp(z - lse) - onehot) * g * dz/dy
            dy = torch.sub(z, lse[n0:n1, None]).exp_().mul_(gc[:, None])
            hit = ((tc >= v0) & (tc < v1)).nonzero().squeeze(1)
            dy[hit, tc[hit] - v0] -= gc[hit]
            if softcap > 0:
                dy.mul_(1 - (z / softcap) ** 2)
            del z
            if filter_eps > 0 and not bool((dy.abs() >= filter_eps).any()):
                continue
            if b is not None:
                db[v0:v1] += dy.sum(0)
            dyc = dy.to(mm_dtype)
            dh[n0:n1] += _mm32(dyc, wb)
            dwb += _mm32(dyc.T, hm[n0:n1])
        dw[v0:v1] = dwb
    return dh.to(h.dtype), dw, db.to(b.dtype if b is not None else torch.float32)


def _use_triton(h: torch.Tensor, backward: bool = False) -> bool:
    return FORCE_TRITON or (h.is_cuda and (TRITON_BACKWARD if backward else TRITON_FORWARD))


@torch.library.custom_op("fxlowbit::linear_ce_fwd", mutates_args=())
def linear_ce_fwd(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    scale: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse), fp32 (N,) each: per-token cross-entropy of ``h w^T + b`` without the logits."""
    if _use_triton(h):
        from .linear_ce_triton import linear_ce_fwd_triton

        return linear_ce_fwd_triton(h, w, b, target, ignore_index, scale, softcap)
    return linear_cross_entropy_reference(h, w, b, target, ignore_index, scale, softcap)


@linear_ce_fwd.register_fake
def _(h, w, b, target, ignore_index, scale, softcap):
    check_inputs(h, w, b, target)
    n = h.shape[0]
    return h.new_empty((n,), dtype=torch.float32), h.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("fxlowbit::linear_ce_bwd", mutates_args=())
def linear_ce_bwd(
    grad: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    scale: float,
    softcap: float,
    filter_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dw, db) of :func:`linear_ce_fwd` given per-token loss gradients; db is (0,) without b."""
    if _use_triton(h, backward=True):
        from .linear_ce_triton import linear_ce_bwd_triton

        return linear_ce_bwd_triton(grad, h, w, b, target, lse, ignore_index, scale, softcap, filter_eps)
    return linear_cross_entropy_backward_reference(
        grad, h, w, b, target, lse, ignore_index, scale, softcap, filter_eps
    )


@linear_ce_bwd.register_fake
def _(grad, h, w, b, target, lse, ignore_index, scale, softcap, filter_eps):
    db = b.new_empty(b.shape) if b is not None else h.new_empty((0,), dtype=torch.float32)
    return h.new_empty(h.shape), w.new_empty(w.shape), db


def _setup_context(ctx, inputs, output) -> None:
    h, w, b, target, ignore_index, scale, softcap = inputs
    ctx.save_for_backward(h, w, b, target, output[1])
    ctx.args = (ignore_index, scale, softcap)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_lse):
    h, w, b, target, lse = ctx.saved_tensors
    dh, dw, db = torch.ops.fxlowbit.linear_ce_bwd(grad_loss, h, w, b, target, lse, *ctx.args, FILTER_EPS)
    return dh, dw, (db if b is not None else None), None, None, None, None


linear_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


# Matmul FLOPs for torch's flop counter (and so for passes/analyze's GEMM list and the benchmarks):
# the forward builds every logit once, the backward rebuilds them and forms dh and dw.
@register_flop_formula(torch.ops.fxlowbit.linear_ce_fwd)
def _fwd_flops(h_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * h_shape[0] * w_shape[0] * h_shape[1]


@register_flop_formula(torch.ops.fxlowbit.linear_ce_bwd)
def _bwd_flops(grad_shape, h_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 6 * h_shape[0] * w_shape[0] * h_shape[1]


def linear_cross_entropy(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    scale: float = 1.0,
    softcap: float = 0.0,
    out_dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(logits(h, w, b).view(-1, V), target.view(-1), ignore_index=...,
    reduction=..., label_smoothing=...)`` without the logits (see the module docstring for ``scale``
    and ``softcap``). ``h`` (..., H) is flattened to rows; ``out_dtype`` defaults to h's dtype (what
    the unfused loss would return). Mean over zero non-ignored targets is NaN, as in PyTorch.

    The gradients of the inputs that need one are formed in the forward, chunk by chunk
    (:mod:`.linear_ce_grad`), and the backward scales them; without grad mode or inputs needing
    gradients only the loss is computed. ``logits`` (..., V), optional: ``h w^T + b`` when the
    caller computes them anyway (a model returning them); read instead of rebuilt, not saved, not
    differentiated through (h, w and b get the loss's gradients). ``reduction="none"`` with a
    weight or bias needing a gradient takes the recompute path instead (``linear_ce_fwd`` /
    ``linear_ce_bwd``: the logits are rebuilt in the backward), and with label smoothing too the
    plain unfused loss. Not twice differentiable.

        >>> h, w, t = torch.randn(6, 8), torch.randn(11, 8), torch.tensor([0, 3, -100, 10, 2, 2])
        >>> loss = linear_cross_entropy(h, w, None, t)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fxlowbit linear_ce: reduction={reduction!r}; valid: {_REDUCTIONS}")
    h2, t = h.reshape(-1, h.shape[-1]), target.reshape(-1)
    eps = float(label_smoothing)
    on = torch.is_grad_enabled()
    gh, gw, gb = (on and x is not None and x.requires_grad for x in (h2, w, b))
    if reduction == "none" and (gw or gb):
        if eps:  # the recompute path has no label smoothing: the plain loss, logits and all
            z = F.linear(h2, w, b) * scale
            z = softcap * torch.tanh(z / softcap) if softcap > 0 else z
            kw: dict[str, Any] = dict(ignore_index=ignore_index, reduction="none", label_smoothing=eps)
            loss = F.cross_entropy(z.float(), t, **kw)
        else:
            args: tuple[int | float | str | bool, ...] = (ignore_index, float(scale), float(softcap))
            loss, _ = torch.ops.fxlowbit.linear_ce_fwd(h2, w, b, t, *args)
    else:
        y = logits.detach().reshape(-1, w.shape[0]) if logits is not None else None
        args = (ignore_index, float(scale), float(softcap), eps, reduction, gh, gw, gb)
        loss = torch.ops.fxlowbit.linear_ce_fwd_grad(h2, w, b, t, y, *args)[0]
    return loss.to(out_dtype or h.dtype)
