"""``fxlowbit::lowbit_linear``: a linear layer whose three GEMMs each run in their own format.

``y = x w^T + b`` (forward), ``dx = dy w`` (grad-input) and ``dw = dy^T x`` (grad-weight), each
"int8", "fp8" or plain (named by the inputs' dtype: "fp32", "bf16", "fp16"); ``db = sum dy``.
Low-bit GEMMs quantize both operands row-wise along the reduction dim (:mod:`.int8_gemm`):
forward operands and the weight round to nearest (fp8: e4m3), gradient operands round
stochastically (fp8: e5m2) with noise from the next seed of random stream ``stream`` (negative:
round to nearest, deterministic). Memory: with a low-bit forward and a low-bit grad-weight GEMM,
the forward's quantized copy of ``x`` (int8 codes, or e4m3 codes stored as uint8 bits, plus fp32
row scales: about 1/4 of fp32 ``x``) is the only copy of ``x`` saved for the backward; the
grad-weight GEMM reads it dequantized and requantizes it along the tokens. Otherwise (a plain
forward, or a plain grad-weight GEMM: SwitchBack's split) ``x`` is saved as is, and the planner may
replay or compress it like any saved tensor (its one backward use is the grad-weight GEMM).
``hadamard`` (0, 32 or 128): the forward GEMM's operands are rotated along K by block Hadamard
matrices first (:func:`.int8_gemm.hadamard_rotate`); the saved copy is rotated back for the
grad-weight GEMM.

Registered as ``custom_op`` + ``register_fake`` + ``register_autograd`` (DESIGN.md: opaque ops
compile on CPU and CUDA), so Dynamo and AOTAutograd trace it as one forward and one backward node.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ...state import STATE
from .. import rng
from ..dtypes import FLOAT_NAMES
from . import linear_flops
from .int8_gemm import (
    dequantize_fp8,
    dequantize_int8_rowwise,
    fp8_mm,
    hadamard_rotate,
    int8_mm,
    quantize_fp8,
    quantize_int8_rowwise,
    quantize_int8_sr_reference,
    rowwise_noise,
)

__all__ = [
    "lowbit_linear",
    "lowbit_matmul",
    "forward",
    "backward",
    "draws_seed",
    "saves_codes",
    "LOWBIT",
    "PLAIN",
    "FORMATS",
    "plain_format",
    "HADAMARD",
]

LOWBIT = ("int8", "fp8")
PLAIN = {name: dtype for dtype, name in FLOAT_NAMES.items()}  # "fp32" -> torch.float32, ...
FORMATS = (*PLAIN, *LOWBIT)
HADAMARD = (0, 32, 128)
_CODES = {"int8": torch.int8, "fp8": torch.uint8}  # saved copy of x: fp8 codes kept as their bits


def plain_format(dtype: torch.dtype) -> str:
    """The plain format name of a float dtype ("fp32", "bf16", "fp16")."""
    for name, d in PLAIN.items():
        if d == dtype:
            return name
    raise ValueError(
        f"fxlowbit lowbit_linear: no GEMM format for {dtype}; supported: {tuple(PLAIN.values())}"
    )


def _check(x, w, bias, fwd, gi, gw, hadamard) -> None:
    if x.dim() < 1 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"fxlowbit lowbit_linear: need x (..., K) and w (N, K), got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if x.dtype != w.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(
            f"fxlowbit lowbit_linear: x, w and bias must share a dtype, got {x.dtype}, {w.dtype}, "
            f"{None if bias is None else bias.dtype}"
        )
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"fxlowbit lowbit_linear: bias must be ({w.shape[0]},), got {tuple(bias.shape)}")
    plain = plain_format(x.dtype)
    for role, fmt in (("fwd_fmt", fwd), ("gi_fmt", gi), ("gw_fmt", gw)):
        if fmt not in LOWBIT and fmt != plain:
            raise ValueError(
                f"fxlowbit lowbit_linear: {role}={fmt!r} is invalid with {x.dtype}; valid: {(plain, *LOWBIT)}"
            )
    if hadamard not in HADAMARD:
        raise ValueError(f"fxlowbit lowbit_linear: hadamard={hadamard!r}; valid: {HADAMARD}")
    if hadamard and x.shape[-1] % hadamard:
        raise ValueError(f"fxlowbit lowbit_linear: K={x.shape[-1]} is not a multiple of hadamard={hadamard}")


@torch.library.custom_op("fxlowbit::quantize_int8", mutates_args=())
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (R, C), scales fp32 (R,)) of ``x`` (R, C) rounded to nearest: a forward operand's
    or a weight's quantizer as the lowered CPU graphs call it (passes/lower_linears.py), one
    compiled kernel per (C, dtype) reused by every graph and layer (codegen/kernels/quant_cpu.py).
    Traced into the graphs instead, Inductor fused it into each producer (a LayerNorm, a GELU), and
    generated and compiled C++ for each such pair: TinyGPT's first step with int8 linears took
    22.2-25.8 s traced (4 runs) against 18.4-18.5 s through this op (2 runs; Inductor's 14.1-14.9 s;
    2-core AMD EPYC, 1 thread, empty Inductor cache, 2026-12-07). Same bits as
    :func:`.int8_gemm.quantize_int8_rowwise`."""
    from .. import ops

    if x.device.type == "cpu" and ops.CPU_COMPILED:
        from . import quant_cpu

        return quant_cpu.quantize_int8_rn(x)
    return quantize_int8_rowwise(x)


@quantize_int8.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fxlowbit::quantize_int8_sr", mutates_args=())
def quantize_int8_sr(x: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (R, C), scales fp32 (R,)) of ``x`` (R, C) rounded stochastically with
    ``rowwise_noise(seed)``: a gradient operand's quantizer as the lowered CPU backward calls it
    (passes/lower_linears.py), one compiled kernel per (C, dtype) reused by every graph
    (codegen/kernels/quant_cpu.py), so Inductor never generates C++ for the noise hash (the
    traced hash took minutes of Inductor's code generation). Same bits as the reference."""
    from .. import ops

    if x.device.type == "cpu" and ops.CPU_COMPILED:
        from . import quant_cpu

        return quant_cpu.quantize_int8_sr(x, seed)
    return quantize_int8_sr_reference(x, seed)


@quantize_int8_sr.register_fake
def _(x, seed):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


def _quantize(
    t: torch.Tensor, fmt: str, seed: torch.Tensor | None, quant_op: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise codes and scales of ``t`` (R, C); ``seed``: stochastic rounding (a gradient
    operand: fp8 e5m2), None: round to nearest (fp8 e4m3). ``quant_op``: int8 through the opaque
    ops ``fxlowbit::quantize_int8`` / ``quantize_int8_sr`` (same bits)."""
    if quant_op and fmt == "int8":
        if seed is None:
            return torch.ops.fxlowbit.quantize_int8(t)
        return torch.ops.fxlowbit.quantize_int8_sr(t, seed)
    noise = rowwise_noise(seed, *t.shape) if seed is not None else None
    if fmt == "int8":
        return quantize_int8_rowwise(t, noise)
    return quantize_fp8(t, "e5m2" if seed is not None else "e4m3", noise)


def lowbit_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    fmt: str,
    *,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    a_seed: torch.Tensor | None = None,
    b_seed: torch.Tensor | None = None,
    quant_op: bool = False,
) -> torch.Tensor:
    """``a (M, K) @ b (N, K)^T (+ bias)`` in ``fmt``: plain (``F.linear`` in a's dtype), or both
    operands quantized row-wise along K (``*_seed``: stochastic rounding of that operand) and
    multiplied by :func:`.int8_gemm.int8_mm` / :func:`.int8_gemm.fp8_mm` (``quant_op``: see
    :func:`_quantize`)."""
    out_dtype = out_dtype or a.dtype
    if fmt not in LOWBIT:
        return F.linear(a.to(out_dtype), b.to(out_dtype), bias).to(out_dtype)
    aq, sa = _quantize(a, fmt, a_seed, quant_op)
    bq, sb = _quantize(b, fmt, b_seed, quant_op)
    mm = int8_mm if fmt == "int8" else fp8_mm
    return mm(aq, bq, sa, sb, bias, out_dtype)


def _dequantize(xq: torch.Tensor, xs: torch.Tensor, fmt: str, hadamard: int, dtype) -> torch.Tensor:
    """The forward's saved copy of x back in ``dtype`` (rotated back when the forward rotated it)."""
    x = dequantize_int8_rowwise(xq, xs) if fmt == "int8" else dequantize_fp8(xq.view(torch.float8_e4m3fn), xs)
    return (hadamard_rotate(x, hadamard) if hadamard else x).to(dtype)


@torch.library.custom_op("fxlowbit::lowbit_linear", mutates_args=())
def lowbit_linear_op(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    fwd_fmt: str,
    gi_fmt: str,
    gw_fmt: str,
    hadamard: int,
    stream: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (..., N), saved codes of x (M, K) int8/uint8 or (0,), row scales (M,) fp32 or (0,)) of
    ``x (..., K) @ w (N, K)^T + bias`` with the forward in ``fwd_fmt`` (see the module docstring;
    M: the product of x's leading sizes). Any rank, so the graph calls the op itself (a Python
    wrapper in the graph makes AOTAutograd's cache bypass it)."""
    _check(x, w, bias, fwd_fmt, gi_fmt, gw_fmt, hadamard)
    return forward(x, w, bias, fwd_fmt, hadamard)


def forward(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    fwd_fmt: str,
    hadamard: int,
    quant_op: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of ``fxlowbit::lowbit_linear`` (arguments checked): pure torch, also what the CPU
    path traces into the forward graph in the op's place (passes/lower_linears.py; ``quant_op``:
    its int8 quantizers stay opaque ops, see :func:`_quantize`)."""
    if fwd_fmt not in LOWBIT:
        empty = x.new_empty((0,))
        return F.linear(x, w, bias), empty.to(torch.int8), empty.float()
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    xr, wr = (hadamard_rotate(x, hadamard), hadamard_rotate(w, hadamard)) if hadamard else (x, w)
    xq, xs = _quantize(xr, fwd_fmt, None, quant_op)
    wq, ws = _quantize(wr, fwd_fmt, None, quant_op)
    y = (int8_mm if fwd_fmt == "int8" else fp8_mm)(xq, wq, xs, ws, bias, x.dtype)
    return y.view(*lead, w.shape[0]), xq.view(_CODES[fwd_fmt]), xs


@lowbit_linear_op.register_fake
def _(x, w, bias, fwd_fmt, gi_fmt, gw_fmt, hadamard, stream):
    _check(x, w, bias, fwd_fmt, gi_fmt, gw_fmt, hadamard)
    k, n = x.shape[-1], w.shape[0]
    m = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], n))
    if fwd_fmt not in LOWBIT:  # nothing but x itself saved
        return y, x.new_empty((0,), dtype=torch.int8), x.new_empty((0,), dtype=torch.float32)
    codes = x.new_empty((m, k), dtype=_CODES[fwd_fmt])
    return y, codes, x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("fxlowbit::lowbit_linear_backward", mutates_args=())
def lowbit_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor | None,
    xq: torch.Tensor | None,
    xs: torch.Tensor | None,
    w: torch.Tensor,
    fwd_fmt: str,
    gi_fmt: str,
    gw_fmt: str,
    hadamard: int,
    stream: int,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, K), dw (N, K), db (N,)) for ``grad`` (M, N); each (0,) when not needed. ``x``: the
    saved input (None when :func:`saves_codes`: then ``xq``/``xs`` hold its saved copy, else
    None). Within :func:`.sampling_state.exact` (the probes' replays) both gradient GEMMs run
    plain and draw no seed: the replays measure against the exact gradient (``exact(gemms=False)``:
    as planned, to measure their noise)."""
    if STATE.sampling_paused and STATE.sampling_paused[-1]:
        gi_fmt = gw_fmt = plain_format(grad.dtype)
    seed = rng.draw_seed(stream, grad.device) if draws_seed(gi_fmt, gw_fmt, stream) else None
    return backward(grad, x, xq, xs, w, seed, fwd_fmt, gi_fmt, gw_fmt, hadamard, need_dx, need_dw, need_db)


def saves_codes(fwd_fmt: str, gw_fmt: str) -> bool:
    """Whether the backward reads the forward's quantized copy of x (else x itself)."""
    return fwd_fmt in LOWBIT and gw_fmt in LOWBIT


def draws_seed(gi_fmt: str, gw_fmt: str, stream: int) -> bool:
    """Whether the backward rounds stochastically: it then draws one seed of ``stream`` a call."""
    return stream >= 0 and (gi_fmt in LOWBIT or gw_fmt in LOWBIT)


def backward(
    grad: torch.Tensor,
    x: torch.Tensor | None,
    xq: torch.Tensor | None,
    xs: torch.Tensor | None,
    w: torch.Tensor,
    seed: torch.Tensor | None,
    fwd_fmt: str,
    gi_fmt: str,
    gw_fmt: str,
    hadamard: int,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    quant_op: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of ``fxlowbit::lowbit_linear_backward`` given its ``seed`` (None: round to nearest):
    pure torch, also what the CPU path traces into the backward graph (passes/lower_linears.py;
    ``quant_op``: its int8 quantizers stay opaque ops, see :func:`_quantize`)."""
    dx, dw, db = (grad.new_empty((0,)) for _ in range(3))  # distinct tensors: outputs may not alias
    if need_dx:  # dx = dy (M, N) @ w^T(K, N)^T: reduction over N
        dx = lowbit_matmul(grad, w.t(), gi_fmt, out_dtype=grad.dtype, a_seed=seed, quant_op=quant_op)
    if need_dw:  # dw = dy^T (N, M) @ x^T (K, M)^T: reduction over the tokens
        if x is not None:
            xhat = x
        else:  # saves_codes(fwd_fmt, gw_fmt)
            assert xq is not None and xs is not None
            xhat = _dequantize(xq, xs, fwd_fmt, hadamard, grad.dtype)
        gw_seed = seed + 1 if seed is not None else None  # a stream unrelated to grad-input's noise
        dw = lowbit_matmul(grad.t(), xhat.t(), gw_fmt, out_dtype=w.dtype, a_seed=gw_seed, quant_op=quant_op)
    if need_db:
        db = grad.sum(0)
    return dx, dw, db


@lowbit_linear_backward.register_fake
def _(grad, x, xq, xs, w, fwd_fmt, gi_fmt, gw_fmt, hadamard, stream, need_dx, need_dw, need_db):
    m, (n, k) = grad.shape[0], w.shape
    dx = grad.new_empty((m, k)) if need_dx else grad.new_empty((0,))
    dw = w.new_empty((n, k)) if need_dw else grad.new_empty((0,))
    db = grad.new_empty((n,)) if need_db else grad.new_empty((0,))
    return dx, dw, db


def _setup_context(ctx, inputs, output) -> None:
    x, w, bias, fwd_fmt, gi_fmt, gw_fmt, hadamard, stream = inputs
    _, xq, xs = output
    # the quantized copy of x when both the forward and the grad-weight GEMM are low-bit, else x
    if saves_codes(fwd_fmt, gw_fmt):
        ctx.save_for_backward(None, xq, xs, w)
    else:
        ctx.save_for_backward(x, None, None, w)
    ctx.args = (fwd_fmt, gi_fmt, gw_fmt, hadamard, stream)
    ctx.x_shape = x.shape
    ctx.mark_non_differentiable(xq, xs)


def _backward(ctx, grad_y, _grad_xq, _grad_xs):
    x, xq, xs, w = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    k = w.shape[1]
    dx, dw, db = torch.ops.fxlowbit.lowbit_linear_backward(
        grad_y.reshape(-1, w.shape[0]), None if x is None else x.reshape(-1, k), xq, xs, w, *ctx.args,
        need_dx, need_dw, need_db,
    )  # fmt: skip
    dx = dx.view(ctx.x_shape) if need_dx else None
    return (dx, dw if need_dw else None, db if need_db else None, *(None,) * 5)


lowbit_linear_op.register_autograd(_backward, setup_context=_setup_context)


register_flop_formula(torch.ops.fxlowbit.lowbit_linear)(linear_flops)


@register_flop_formula(torch.ops.fxlowbit.lowbit_linear_backward)
def _bwd_flops(grad_shape, x_shape, xq_shape, xs_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * grad_shape[0] * w_shape[0] * w_shape[1]


def lowbit_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    fwd_fmt: str = "int8",
    gi_fmt: str = "int8",
    gw_fmt: str = "int8",
    hadamard: int = 0,
    stream: int = -1,
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for ``x`` (..., K) with its forward, grad-input and grad-weight
    GEMMs in the given formats (see the module docstring); returns (..., N) in x's dtype.

        >>> x, w = torch.randn(8, 64, requires_grad=True), torch.randn(32, 64, requires_grad=True)
        >>> y = lowbit_linear(x, w, None, "int8", "int8", "fp32")
        >>> y.sum().backward()
    """
    return torch.ops.fxlowbit.lowbit_linear(x, w, bias, fwd_fmt, gi_fmt, gw_fmt, hadamard, stream)[0]
