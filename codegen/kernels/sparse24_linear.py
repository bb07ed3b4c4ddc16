"""2:4 sparse linear for training (masks and MVUE from :mod:`.sparse24`).

``fxlowbit::sparse24_linear`` (custom op + fake + autograd, backward ``fxlowbit::sparse24_linear_bwd``):
``y = x (w*m)^T + b``; ``dx = g (w*m)``; ``dw = mvue24(g, dim=tokens)^T x``, then masked (pruned
weights get no update) unless ``masked_grad=False`` (dense, straight-through gradient);
``db = sum g`` (exact, from the dense ``g``). The mask must be transposable for ``dx``'s GEMM to be
2:4 (:func:`~.sparse24.transposable_mask`); a plain mask still gives the right values. On CUDA
(sm80+, fp16/bf16, shapes cuSPARSELt/CUTLASS accept) the forward and grad-input GEMMs run on
``torch.sparse`` semi-structured tensors (the masked weight is compressed on every call); anywhere
else, or if that raises, on the masked dense weight (``torch.where(m, w, 0)``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .sparse24 import _check_weight, masked_weight, mvue24

__all__ = ["sparse24_linear", "sparse24_linear_op", "sparse24_linear_bwd", "SEMI_STRUCTURED"]

SEMI_STRUCTURED = True  # set False to force the masked dense GEMMs on CUDA too

_warned: set[str] = set()


def _semi_structured_ok(w: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``F.linear(x, semi_structured(w))`` can run: CUDA sm80+, fp16/bf16, w's shape a
    multiple of the backend's minimum tile."""
    if not (SEMI_STRUCTURED and w.is_cuda and x.dtype == w.dtype in (torch.float16, torch.bfloat16)):
        return False
    if torch.cuda.get_device_capability(w.device) < (8, 0):
        return False
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUSPARSELT if _cusparselt() else SparseSemiStructuredTensorCUTLASS
    c = cls._DTYPE_SHAPE_CONSTRAINTS[w.dtype]
    return w.shape[0] % c.sparse_min_rows == 0 and w.shape[1] % c.sparse_min_cols == 0


def _cusparselt() -> bool:
    return bool(getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.is_available())


def _sparse_linear(x: torch.Tensor, wm: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, wm, bias)`` with ``wm`` 2:4 along rows: semi-structured on CUDA when it can,
    else dense; a failing sparse call warns once (with the reason) and falls back."""
    if _semi_structured_ok(wm, x):
        from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

        try:
            ws = (
                to_sparse_semi_structured(wm.contiguous())
                if _cusparselt()
                else SparseSemiStructuredTensorCUTLASS.from_dense(wm.contiguous())
            )
            return F.linear(x.contiguous(), ws, bias)
        except (RuntimeError, NotImplementedError) as e:
            key = f"{type(e).__name__}: {e}".splitlines()[0]
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"fxlowbit sparse24: semi-structured GEMM failed ({key}); dense fallback", stacklevel=3
                )
    return F.linear(x, wm, bias)


def _check_linear(x, w, bias, mask) -> None:
    _check_weight(w, "sparse24_linear")
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"fxlowbit sparse24_linear: x must be (tokens, {w.shape[1]}) for w {tuple(w.shape)}, "
            f"got {tuple(x.shape)}"
        )
    if mask.shape != w.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"fxlowbit sparse24_linear: mask must be bool {tuple(w.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"fxlowbit sparse24_linear: bias must be ({w.shape[0]},), got {tuple(bias.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"fxlowbit sparse24_linear: x is {x.dtype} but w is {w.dtype}")


@torch.library.custom_op("fxlowbit::sparse24_linear", mutates_args=())
def sparse24_linear_op(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    seed: torch.Tensor | None,
    mvue: bool,
    masked_grad: bool,
) -> torch.Tensor:
    """``x (w*mask)^T + bias`` for 2-D ``x`` (``seed``, ``mvue``, ``masked_grad``: the backward's)."""
    _check_linear(x, w, bias, mask)
    return _sparse_linear(x, masked_weight(w, mask), bias)


@sparse24_linear_op.register_fake
def _(x, w, bias, mask, seed, mvue, masked_grad):
    _check_linear(x, w, bias, mask)
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("fxlowbit::sparse24_linear_bwd", mutates_args=())
def sparse24_linear_bwd(
    g: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    mask: torch.Tensor,
    seed: torch.Tensor | None,
    mvue: bool,
    masked_grad: bool,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw, db)`` of :func:`sparse24_linear_op`; a gradient not needed is an empty (0,)."""

    def empty():  # one per output: outputs may not alias each other
        return g.new_empty((0,))

    wm = masked_weight(w, mask)
    # g @ (w*m) = F.linear(g, (w*m)^T): (w*m)^T is 2:4 along its rows because the mask is transposable
    dx = _sparse_linear(g, wm.t(), None) if need_x else empty()
    dw = empty()
    if need_w:
        gs = mvue24(g, seed, dim=0) if mvue else g  # (tokens, out), 2:4 along tokens
        dw = gs.t() @ x
        dw = masked_weight(dw, mask) if masked_grad else dw
    db = g.sum(0) if need_b else empty()
    return dx, dw, db


@sparse24_linear_bwd.register_fake
def _(g, x, w, mask, seed, mvue, masked_grad, need_x, need_w, need_b):
    return (
        x.new_empty(x.shape if need_x else (0,)),
        w.new_empty(w.shape if need_w else (0,)),
        g.new_empty((g.shape[1],) if need_b else (0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, w, bias, mask, seed, mvue, masked_grad = inputs
    ctx.save_for_backward(x, w, mask, seed)
    ctx.args = (mvue, masked_grad, bias is not None)


def _backward(ctx, g):
    x, w, mask, seed = ctx.saved_tensors
    mvue, masked_grad, has_bias = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.fxlowbit.sparse24_linear_bwd(
        g, x, w, mask, seed, mvue, masked_grad, need_x, need_w, need_b and has_bias
    )
    return (dx if need_x else None, dw if need_w else None, db if need_b and has_bias else None) + (None,) * 4


sparse24_linear_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.fxlowbit.sparse24_linear)
def _fwd_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * w_shape[0] * w_shape[1]  # dense-equivalent FLOPs


@register_flop_formula(torch.ops.fxlowbit.sparse24_linear_bwd)
def _bwd_flops(g_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * x_shape[0] * w_shape[0] * w_shape[1]


def sparse24_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    seed: torch.Tensor | int | None = None,
    mvue: bool = True,
    masked_grad: bool = True,
) -> torch.Tensor:
    """``F.linear(x, w*mask, bias)`` for ``x`` (..., in), with the 2:4 backward of the module
    docstring. ``mask``: bool (out, in), transposable for a sparse grad-input GEMM (see
    :func:`transposable_mask`). ``seed``: the MVUE noise (int or int64 scalar tensor); None draws
    one from torch's default generator. ``mvue=False``: dense ``g`` in the grad-weight GEMM.
    ``masked_grad=False``: pruned weights get their dense gradient too.

    >>> from fxlowbit.codegen.kernels.sparse24 import transposable_mask
    >>> w = torch.randn(8, 12, requires_grad=True)
    >>> y = sparse24_linear(torch.randn(5, 12), w, None, transposable_mask(w), seed=0)
    >>> y.sum().backward()
    """
    if mvue and seed is None:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
    elif seed is not None and not isinstance(seed, torch.Tensor):
        seed = torch.tensor(seed, dtype=torch.int64, device=x.device)
    if x.dim() < 1 or x.shape[-1] != w.shape[-1]:
        raise ValueError(
            f"fxlowbit sparse24_linear: x's last size must equal w's in-features; "
            f"got x {tuple(x.shape)}, w {tuple(w.shape)}"
        )
    x2 = x.reshape(-1, x.shape[-1])
    _check_linear(x2, w, bias, mask)
    y = torch.ops.fxlowbit.sparse24_linear(x2, w, bias, mask, seed, mvue, masked_grad)
    return y.view(*x.shape[:-1], w.shape[0])
