"""The output projection of a fused loss whose logits have other users (a model that returns them).

``fxlowbit::linear_logits`` is ``F.linear(h, w, b)``; the fused loss reads its output and forms the
loss's gradients itself. What differs is the backward: the logits' own gradient is, in a training
step that only returns them, all zeros (autograd materialises zeros for an output nobody
differentiated), and a plain linear would still run its two GEMMs on it; the unfused loss pays
only an addition there, since it shares the projection. ``fxlowbit::linear_logits_backward``
checks for that first (one read of the gradient) and then returns zeros without a GEMM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

__all__ = ["linear_logits"]


@torch.library.custom_op("fxlowbit::linear_logits", mutates_args=())
def linear_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(h, w, b)``: h (..., H), w (V, H), b (V,) or None -> (..., V)."""
    return F.linear(h, w, b)


@linear_logits.register_fake
def _(h, w, b):
    return h.new_empty((*h.shape[:-1], w.shape[0]), dtype=torch.promote_types(h.dtype, w.dtype))


@torch.library.custom_op("fxlowbit::linear_logits_backward", mutates_args=())
def linear_logits_backward(
    grad: torch.Tensor, h: torch.Tensor, w: torch.Tensor, bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dw, db) of :func:`linear_logits` for the output gradient ``grad``; zeros without a GEMM
    when ``grad`` is all zeros (one host sync on CUDA); db is (0,) without a bias."""
    g2, h2 = grad.reshape(-1, grad.shape[-1]), h.reshape(-1, h.shape[-1])
    db_shape = (w.shape[0],) if bias else (0,)
    if not bool(g2.any()):
        return torch.zeros_like(h), torch.zeros_like(w), grad.new_zeros(db_shape)
    db = g2.sum(0) if bias else grad.new_zeros(db_shape)
    return (g2 @ w).reshape(h.shape).to(h.dtype), (g2.T @ h2).to(w.dtype), db


@linear_logits_backward.register_fake
def _(grad, h, w, bias):
    return torch.empty_like(h), torch.empty_like(w), grad.new_empty((w.shape[0],) if bias else (0,))


def _setup_context(ctx, inputs, output) -> None:
    h, w, b = inputs
    ctx.save_for_backward(h, w)
    ctx.bias = b is not None
    ctx.bias_dtype = b.dtype if b is not None else None


def _backward(ctx, grad):
    h, w = ctx.saved_tensors
    dh, dw, db = torch.ops.fxlowbit.linear_logits_backward(grad, h, w, ctx.bias)
    return dh, dw, (db.to(ctx.bias_dtype) if ctx.bias else None)


linear_logits.register_autograd(_backward, setup_context=_setup_context)


# Matmul FLOPs for torch's flop counter: the projection, and its backward's two GEMMs (an upper
# bound: they are skipped for an all-zero gradient).
@register_flop_formula(torch.ops.fxlowbit.linear_logits)
def _flops(h_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(h_shape) * w_shape[0]


@register_flop_formula(torch.ops.fxlowbit.linear_logits_backward)
def _bwd_flops(grad_shape, h_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * math.prod(h_shape) * w_shape[0]
