"""``fxlowbit::sampled_linear``: a linear layer whose backward GEMMs run on sampled token rows (VCAS).

Forward: exactly ``F.linear(x, w, b)``. Backward: ``fxlowbit::sampled_linear_backward``, which
runs :func:`.sampled_backward.backward` (the maths, the sampler and its reference are described
there) at the keep ratios the op was given. The ratios are 0-dim tensors the backward reads on the
host (one sync each on CUDA), so they change every step without a recompile.

Registered as ``custom_op`` + ``register_fake`` + ``register_autograd`` (DESIGN.md, Style): opaque
to Dynamo, AOTAutograd and Inductor. The sampler's public names (:data:`STATS`,
:func:`keep_probabilities`, :func:`added_variance`, :func:`flops`, :func:`sampled_linear_reference`)
are re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from . import linear_flops
from .sampled_backward import (
    STATS,
    added_variance,
    backward,
    fake_grads,
    flops,
    keep_probabilities,
    sampled_linear_reference,
)

__all__ = [
    "sampled_linear",
    "sampled_linear_reference",
    "keep_probabilities",
    "added_variance",
    "flops",
    "STATS",
]


def _keep_value(t: torch.Tensor, name: str) -> float:
    v = float(t)
    if not v > 0:  # NaN too
        raise ValueError(f"fxlowbit sampled_linear: {name} must be in (0, 1], got {v}")
    return v


def _check(x, w, bias, keep_input, keep_weight, seed, stats) -> None:
    if x.dim() < 2 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"fxlowbit sampled_linear: need x (..., in) with at least 2 dims and weight (out, in), got "
            f"{tuple(x.shape)} and {tuple(w.shape)}"
        )
    if x.dtype != w.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError("fxlowbit sampled_linear: x, weight and bias must share a dtype")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"fxlowbit sampled_linear: bias must be ({w.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("keep_input", keep_input), ("keep_weight", keep_weight)):
        if t.dim() != 0 or t.dtype != torch.float32:
            raise ValueError(f"fxlowbit sampled_linear: {name} must be a 0-dim float32 tensor")
    if seed.dim() != 0 or seed.dtype != torch.int64:
        raise ValueError("fxlowbit sampled_linear: seed must be a 0-dim int64 tensor")
    if stats is not None and (stats.dtype != torch.float64 or tuple(stats.shape) != (6,)):
        raise ValueError("fxlowbit sampled_linear: stats must be a float64 tensor of 6 elements")


@torch.library.custom_op("fxlowbit::sampled_linear", mutates_args=())
def sampled_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep_input: torch.Tensor,
    keep_weight: torch.Tensor,
    seed: torch.Tensor,
    stats: torch.Tensor | None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, contiguous; the other inputs only steer the backward."""
    _check(x, weight, bias, keep_input, keep_weight, seed, stats)
    return F.linear(x, weight, bias).contiguous()


@sampled_linear_op.register_fake
def _(x, weight, bias, keep_input, keep_weight, seed, stats):
    _check(x, weight, bias, keep_input, keep_weight, seed, stats)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fxlowbit::sampled_linear_backward", mutates_args=("stats",))
def sampled_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    keep_input: torch.Tensor,
    keep_weight: torch.Tensor,
    seed: torch.Tensor,
    stats: torch.Tensor | None,
    x_colmajor: bool,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (..., in), dw (out, in), db (out,)) for ``grad`` (..., out); each (0,) when not needed.
    ``x``: the forward input (None when the weight needs no gradient); ``x_colmajor``: whether it was
    a column-major matrix (F.linear's grad-input then multiplies transposed: same bits)."""
    ki = _keep_value(keep_input, "keep_input") if need_input else 1.0
    kw = _keep_value(keep_weight, "keep_weight") if need_weight else 1.0
    dx, dw, db, fig = backward(
        grad, x, weight, ki, kw, seed, stats is not None, x_colmajor, need_input, need_weight, need_bias
    )
    if stats is not None:
        stats.copy_(torch.tensor(fig[:6], dtype=torch.float64))
    return dx, dw, db


@sampled_linear_backward.register_fake
def _(grad, x, weight, keep_input, keep_weight, seed, stats, x_colmajor, need_input, need_weight, need_bias):
    return fake_grads(grad, weight, need_input, need_weight, need_bias)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, keep_input, keep_weight, seed, stats = inputs
    # like F.linear's autograd: x is saved only for the weight's gradient
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, keep_input, keep_weight, seed)
    # an attribute, not a saved tensor: the backward's own write (and a caller's reset between
    # steps) would otherwise trip autograd's version check on a second backward
    ctx.stats = stats
    ctx.x_colmajor = x.dim() == 2 and x.stride(0) == 1 and x.stride(1) == x.shape[0]


def _backward(ctx, grad):
    x, weight, keep_input, keep_weight, seed = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.fxlowbit.sampled_linear_backward(
        grad, x, weight, keep_input, keep_weight, seed, ctx.stats, ctx.x_colmajor, *need
    )
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None, None, None, None)


sampled_linear_op.register_autograd(_backward, setup_context=_setup_context)


register_flop_formula(torch.ops.fxlowbit.sampled_linear)(linear_flops)


def sampled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep_input: torch.Tensor,
    keep_weight: torch.Tensor,
    seed: torch.Tensor,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose backward samples token rows (:mod:`.sampled_backward`).

    ``keep_input`` / ``keep_weight``: 0-dim fp32 tensors in (0, 1], the expected fraction of rows
    the grad-input / grad-weight GEMM keeps (>= 1: exact, F.linear's bits); runtime data, so new
    values need no recompile. ``seed``: 0-dim int64 (``fxlowbit::draw_seed``). ``stats``: float64
    (6,), overwritten by each backward with, in :data:`STATS` order:

    0. expected added variance of dx: unbiased Horvitz-Thompson estimate from the kept rows,
       ``sum_kept (1/q - 1) ||g_i w||^2 / q`` (an estimate: dense ``g w`` would cost the saving);
    1. expected added variance of dw, ``sum_i (1/q_i - 1) ||g_i||^2 ||x_i||^2``: exact;
    2. ``||dx||_F^2`` of the exact dx: exact when dense, else the unbiased estimate
       ``sum_kept ||g_i w||^2 / q_i``;
    3. ``||dw||_F^2`` of the exact dw: exact when dense, else ``max(0, ||dw_hat||^2 - [1])`` (unbiased
       before the clamp);
    4-5. rows the dx / dw GEMM ran on (N when dense). Figures of a gradient not needed are 0.

        >>> x, w = torch.randn(64, 32, requires_grad=True), torch.randn(16, 32, requires_grad=True)
        >>> half, seed = torch.tensor(0.5), torch.tensor(7)
        >>> sampled_linear(x, w, None, half, half, seed).square().sum().backward()
    """
    return torch.ops.fxlowbit.sampled_linear(x, weight, bias, keep_input, keep_weight, seed, stats)
