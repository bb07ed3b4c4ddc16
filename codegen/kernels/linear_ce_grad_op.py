"""``fxlowbit::linear_ce_fwd_grad``: the op of the fused-gradient path (:mod:`.linear_ce_grad`).

Its forward returns the loss and the gradients :func:`.linear_ce_grad.linear_ce_grad_reference`
forms chunk by chunk; its backward only scales the stored gradients by the loss's output
gradient. Registered as ``custom_op`` + ``register_fake`` + ``register_autograd``, with a flop
formula for torch's flop counter.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from .linear_ce_grad import check_inputs, linear_ce_grad_reference

__all__ = ["linear_ce_fwd_grad"]


@torch.library.custom_op("fxlowbit::linear_ce_fwd_grad", mutates_args=())
def linear_ce_fwd_grad(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    logits: torch.Tensor | None,
    ignore_index: int,
    scale: float,
    softcap: float,
    label_smoothing: float,
    reduction: str,
    grad_h: bool,
    grad_w: bool,
    grad_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dh, dw, db) as :func:`linear_ce_grad_reference`; differentiable in h, w, b for the
    gradients asked for (the backward scales the stored ones by the loss's output gradient)."""
    args = (ignore_index, scale, softcap, label_smoothing, reduction, grad_h, grad_w, grad_b)
    return linear_ce_grad_reference(h, w, b, target, logits, *args)


@linear_ce_fwd_grad.register_fake
def _(h, w, b, target, logits, ignore_index, scale, softcap, smoothing, reduction, grad_h, grad_w, grad_b):
    check_inputs(h, w, b, target)
    acc = torch.float64 if torch.promote_types(h.dtype, w.dtype) == torch.float64 else torch.float32
    loss = h.new_empty((h.shape[0],) if reduction == "none" else (), dtype=acc)
    dh = h.new_empty(h.shape if grad_h else (0,))
    dw = w.new_empty(w.shape if grad_w else (0,))
    db = b.new_empty(b.shape) if grad_b and b is not None else h.new_empty((0,), dtype=acc)
    return loss, dh, dw, db


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output[1:])
    ctx.asked = inputs[10:13]  # grad_h, grad_w, grad_b
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fxlowbit linear_ce: double backward is not supported (the gradients were formed in the "
            "forward); compute the loss unfused for create_graph=True"
        )
    for i, name in enumerate(("h", "w", "b")):
        if ctx.needs_input_grad[i] and not ctx.asked[i]:
            raise RuntimeError(f"fxlowbit linear_ce: {name} needs a gradient the forward did not form")
    # a scalar (mean / sum), or one per token (none: dh rows only). Plain multiplications: Inductor
    # fuses them with their consumers, and the planner may store dh / dw compressed (they are
    # linear in the gradients) when a budget needs it, as it may the unfused loss's logits
    g = grad_loss if grad_loss.dim() == 0 else grad_loss[:, None]
    saved = zip(ctx.saved_tensors, ctx.asked, strict=True)
    grads = [(x * g).to(x.dtype) if asked else None for x, asked in saved]
    return (*grads, *([None] * 10))


linear_ce_fwd_grad.register_autograd(_backward, setup_context=_setup_context)


# Matmul FLOPs for torch's flop counter (passes/analyze's GEMM list, the benchmarks): the logits
# (unless given), then one GEMM per weight-sized gradient asked for; the backward's scaling has none.
@register_flop_formula(torch.ops.fxlowbit.linear_ce_fwd_grad)
def _fwd_grad_flops(h_shape, w_shape, b_shape, t_shape, logits_shape, *args, out_shape=None, **kwargs) -> int:
    grad_h, grad_w = args[-3], args[-2]
    gemms = (logits_shape is None) + bool(grad_h) + bool(grad_w)
    return 2 * h_shape[0] * w_shape[0] * h_shape[1] * gemms
