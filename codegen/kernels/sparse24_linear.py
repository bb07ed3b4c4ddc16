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

from ... import state
from . import linear_flops
from .sparse24 import check_weight, is_24, masked_weight, mvue24

__all__ = ["sparse24_linear", "sparse24_linear_op", "sparse24_linear_bwd", "SEMI_STRUCTURED"]

SEMI_STRUCTURED = True  # set False to force the masked dense GEMMs on CUDA too

_warned: set[str] = state.STATE.warned  # warn-once keys (fxlowbit.state; reset() clears them)


def _semi_structured_ok(w: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``F.linear(x, semi_structured(w))`` can run: CUDA sm80+, fp16/bf16, w's shape a
    multiple of the backend's minimum tile."""
    if not (SEMI_STRUCTURED and w.is_cuda and x.dtype == w.dtype):
        return False
    if w.dtype not in (torch.float16, torch.bfloat16) or torch.cuda.get_device_capability(w.device) < (8, 0):
        return False
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUSPARSELT if _cusparselt() else SparseSemiStructuredTensorCUTLASS
    c = cls._DTYPE_SHAPE_CONSTRAINTS[w.dtype]
    return w.shape[0] % c.sparse_min_rows == 0 and w.shape[1] % c.sparse_min_cols == 0


def _cusparselt() -> bool:
    return bool(getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.is_available())


def _compress(wm: torch.Tensor) -> torch.Tensor:
    """``wm`` (2:4 along rows) as a semi-structured sparse tensor (cuSPARSELt, else CUTLASS)."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

    wm = wm.contiguous()
    return (
        to_sparse_semi_structured(wm) if _cusparselt() else SparseSemiStructuredTensorCUTLASS.from_dense(wm)
    )


_mask_checks = state.STATE.mask_checks  # weak: mask -> (its _version, 2:4 along rows, along columns)


def _mask_24(mask: torch.Tensor) -> tuple[bool, bool]:
    """Whether ``mask`` is 2:4 along rows and along columns. Compression silently prunes whatever
    it is given to 2:4, so a mask that is not (a plain mask's columns) must take the dense GEMM.
    Checked once per mask version (the check syncs the device; masks change only on refresh)."""
    hit = _mask_checks.get(mask)
    if hit is None or hit[0] != mask._version:
        hit = (mask._version, is_24(mask), is_24(mask.t()))
        _mask_checks[mask] = hit
    return hit[1], hit[2]


def _sparse_linear(
    x: torch.Tensor, wm: torch.Tensor, bias: torch.Tensor | None, rows_24: bool
) -> torch.Tensor:
    """``F.linear(x, wm, bias)``: semi-structured on CUDA when ``wm`` is 2:4 along rows (``rows_24``)
    and the backend takes it, else dense; a failing sparse call warns once (with the reason)."""
    if rows_24 and _semi_structured_ok(wm, x):
        try:
            return F.linear(x.contiguous(), _compress(wm), bias)
        except (RuntimeError, NotImplementedError) as e:
            key = f"{type(e).__name__}: {e}".splitlines()[0]
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"fxlowbit sparse24: semi-structured GEMM failed ({key}); dense fallback", stacklevel=3
                )
    return F.linear(x, wm, bias)


def _rows_cols_24(mask: torch.Tensor) -> tuple[bool, bool]:
    """:func:`_mask_24` where a sparse GEMM could run at all (no check, no sync elsewhere)."""
    return _mask_24(mask) if SEMI_STRUCTURED and mask.is_cuda else (False, False)


def _check_linear(x, w, bias, mask) -> None:
    check_weight(w, "sparse24_linear")
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"fxlowbit sparse24_linear: x's last size must equal w's in-features: x must be "
            f"(..., {w.shape[1]}) for w {tuple(w.shape)}, got {tuple(x.shape)}"
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
    """``x (w*mask)^T + bias`` for ``x`` (..., in) (``seed``, ``mvue``, ``masked_grad``: the
    backward's). Any rank, so the sparsity pass calls the op itself: a Python wrapper in the graph
    makes AOTAutograd's cache bypass it."""
    _check_linear(x, w, bias, mask)
    if mvue and seed is None:
        raise ValueError("fxlowbit sparse24_linear: mvue=True needs a seed")
    y = _sparse_linear(x.reshape(-1, x.shape[-1]), masked_weight(w, mask), bias, _rows_cols_24(mask)[0])
    return y.view(*x.shape[:-1], w.shape[0])


@sparse24_linear_op.register_fake
def _(x, w, bias, mask, seed, mvue, masked_grad):
    _check_linear(x, w, bias, mask)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


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
    dx = _sparse_linear(g, wm.t(), None, _rows_cols_24(mask)[1]) if need_x else empty()
    dw = empty()
    if need_w:
        # mvue has a seed (sparse24_linear checks it): (tokens, out), 2:4 along tokens
        gs = mvue24(g, seed, dim=0) if mvue else g  # type: ignore[arg-type]
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
        g.reshape(-1, w.shape[0]), x.reshape(-1, w.shape[1]), w, mask, seed, mvue, masked_grad,
        need_x, need_w, need_b and has_bias,
    )  # fmt: skip
    dx = dx.view(x.shape) if need_x else None
    return (dx, dw if need_w else None, db if need_b and has_bias else None) + (None,) * 4


sparse24_linear_op.register_autograd(_backward, setup_context=_setup_context)


register_flop_formula(torch.ops.fxlowbit.sparse24_linear)(linear_flops)  # dense-equivalent FLOPs


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
    return torch.ops.fxlowbit.sparse24_linear(x, w, bias, mask, seed, mvue, masked_grad)
