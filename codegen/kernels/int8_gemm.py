"""Low-bit GEMMs: row-wise INT8 and FP8 quantization, the scaled GEMM, block Hadamard rotation.

Maths (INT8). A 2-D operand ``x`` (R, C) is quantized along its rows (the GEMM's reduction dim):
``s_r = absmax_r / 127`` (fp32) and ``q_rc = clamp(round(x_rc / s_r), -127, 127)`` as int8 (zero
rows: ``s_r = 0``, ``q = 0``). Forward operands round to nearest (``torch.round``, ties to even);
gradient operands round stochastically, ``q = floor(x / s + u)`` with ``u ~ U[0, 1)`` drawn by
:func:`.quant.hash_uniform` from a seed (element ``(r, c)`` takes counter ``r*C + c``), so
``E[s q] = x`` (unbiased; the clamp can only bite on an absmax element whose ratio rounded past 127).
A GEMM ``a (M, K) @ b (N, K)^T`` of codes is accumulated exactly in int32 (``K <= MAX_K``), then
the epilogue, in this order and without FMA contraction: ``out = acc.float() * sa[:, None]``,
``out = out * sb[None, :]``, ``out = out + bias.float()``, cast to ``out_dtype``. The Triton kernel
(int8_gemm_triton.py) evaluates the same fp32 operations, so both agree bit for bit.

Maths (FP8). ``s_r = absmax_r / fmax`` (448 for e4m3, 57344 for e5m2), row-wise or per tensor;
codes ``x / s`` cast to ``float8_e4m3fn`` (forward operands, round to nearest even) or rounded
stochastically onto the ``float8_e5m2`` grid (gradients): with ``e`` the exponent of ``|v|``
(at least the smallest normal one) and ``ulp = 2**(e - mantissa_bits)``, ``q = floor(v / ulp + u)
* ulp``, exactly representable, unbiased. The GEMM runs through ``torch._scaled_mm`` on CUDA with
compute capability >= (8, 9); elsewhere it is emulated: codes widened to fp32, fp32 matmul, the
same epilogue.

Hadamard. :func:`hadamard_rotate` multiplies blocks of ``B`` (32 or 128) along the last dim by the
orthonormal Sylvester matrix ``H / sqrt(B)`` (symmetric, its own inverse), so rotating both GEMM
operands along K leaves ``x w^T`` unchanged (up to rounding) while spreading outliers over a block.

Non-finite values: a row holding Inf or NaN gets a non-finite scale and comes out NaN/Inf.
"""

from __future__ import annotations

import functools
import math

import torch

from ..dtypes import FLOATS
from .quant import hash_uniform

__all__ = [
    "FP8",
    "MAX_K",
    "quantize_int8_rowwise",
    "quantize_int8_sr_reference",
    "dequantize_int8_rowwise",
    "quantize_fp8",
    "dequantize_fp8",
    "int8_mm_reference",
    "fp8_mm_reference",
    "int8_mm",
    "fp8_mm",
    "hadamard_matrix",
    "hadamard_rotate",
    "rowwise_noise",
    "epilogue",
]

# (torch dtype, largest finite value, mantissa bits, exponent of the smallest normal)
FP8 = {
    "e4m3": (torch.float8_e4m3fn, 448.0, 3, -6),
    "e5m2": (torch.float8_e5m2, 57344.0, 2, -14),
}
MAX_K = (2**31 - 1) // (127 * 127)  # 133144: longest reduction whose int32 sum cannot overflow
_EMULATE_CHUNK = 1024  # fp32 sums of <= 1024 products of int8 codes are exact (< 2**24)


def rowwise_noise(seed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``U[0, 1)`` rounding noise for an (rows, cols) operand: :func:`.quant.hash_uniform` of
    ``seed`` (int64 scalar tensor), element ``(r, c)`` at counter ``r * cols + c``."""
    return hash_uniform(seed, rows, cols)


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"fxlowbit {what}: need a 2-D (rows, cols) tensor, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"fxlowbit {what}: need a floating-point tensor, got {x.dtype}")
    return x.float()


def _noise(noise: torch.Tensor | None, shape) -> torch.Tensor | None:
    if noise is not None and tuple(noise.shape) != tuple(shape):
        raise ValueError(f"fxlowbit: noise of shape {tuple(noise.shape)} for an operand {tuple(shape)}")
    return noise


def quantize_int8_rowwise(
    x: torch.Tensor, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (R, C) float -> (codes int8 (R, C) contiguous, scales fp32 (R,)). ``noise``: U[0, 1)
    (R, C) for stochastic rounding, None to round to nearest (see the module docstring).

        >>> x = torch.randn(4, 64)
        >>> q, s = quantize_int8_rowwise(x)
        >>> bool((dequantize_int8_rowwise(q, s) - x).abs().le(s[:, None] / 2 + 1e-7).all())
        True
    """
    v = _rows(x, "quantize_int8_rowwise")
    u = _noise(noise, v.shape)
    scale = v.abs().amax(1) / 127.0 if v.shape[1] else v.new_zeros(v.shape[0])
    v = v / torch.where(scale > 0, scale, 1.0)[:, None]
    # out of place: the CPU path traces this into the graphs Inductor compiles (passes/lower_linears.py)
    v = torch.round(v) if u is None else torch.floor(v + u)
    return v.clamp(-127, 127).nan_to_num(0.0).to(torch.int8, memory_format=torch.contiguous_format), scale


def quantize_int8_sr_reference(x: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_int8_rowwise` of ``x`` (R, C) rounded stochastically with
    :func:`rowwise_noise` of ``seed``: a gradient operand's int8 quantizer."""
    return quantize_int8_rowwise(x, rowwise_noise(seed, *x.shape))


def dequantize_int8_rowwise(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``q * scale[:, None]`` in fp32, cast to ``dtype``."""
    return (q.float() * scale[:, None]).to(dtype)


def _ulp_bits(e: torch.Tensor) -> torch.Tensor:
    """``2.0**e`` as fp32 for int32 exponents in [-126, 127], built from its bits (exact)."""
    return ((e + 127) << 23).view(torch.float32)


def quantize_fp8(
    x: torch.Tensor, fmt: str = "e4m3", noise: torch.Tensor | None = None, rowwise: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (R, C) float -> (codes float8 (R, C), scales fp32 (R,) or per tensor ()). ``fmt``:
    "e4m3" (forward operands) or "e5m2" (gradients); ``noise`` U[0, 1) (R, C): stochastic rounding
    onto the fp8 grid, None: round to nearest even (the cast)."""
    if fmt not in FP8:
        raise ValueError(f"fxlowbit quantize_fp8: fmt={fmt!r}; valid: {tuple(FP8)}")
    dtype, fmax, mbits, emin = FP8[fmt]
    v = _rows(x, "quantize_fp8")
    u = _noise(noise, v.shape)
    if v.numel() == 0:
        return v.to(dtype), v.new_zeros(v.shape[0] if rowwise else ())
    absmax = v.abs().amax(1) if rowwise else v.abs().amax()
    scale = absmax / fmax
    v = v / (torch.where(scale > 0, scale, 1.0)[:, None] if rowwise else torch.where(scale > 0, scale, 1.0))
    if u is not None:
        _, ex = torch.frexp(v)  # |v| = m 2**ex with m in [0.5, 1): leading bit at 2**(ex - 1)
        ulp = _ulp_bits(torch.clamp(ex - 1, min=emin) - mbits)
        v = torch.floor(v / ulp + u.float()) * ulp  # both products exact (powers of two)
    return v.clamp(-fmax, fmax).to(dtype, memory_format=torch.contiguous_format), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``q * scale`` (row-wise (R,) or per-tensor () scales) in fp32, cast to ``dtype``."""
    s = scale[:, None] if scale.dim() == 1 else scale
    return (q.float() * s).to(dtype)


def check_mm(a_q, b_q, sa, sb, bias, out_dtype, codes: tuple[torch.dtype, ...], what: str) -> None:
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(
            f"fxlowbit {what}: need a (M, K) and b (N, K), got {tuple(a_q.shape)} and {tuple(b_q.shape)}"
        )
    if a_q.dtype not in codes or b_q.dtype not in codes:
        raise ValueError(f"fxlowbit {what}: codes must be {codes}, got {a_q.dtype} and {b_q.dtype}")
    m, n = a_q.shape[0], b_q.shape[0]
    for name, s, size in (("sa", sa, m), ("sb", sb, n)):
        if s.dtype != torch.float32 or tuple(s.shape) != (size,):
            raise ValueError(
                f"fxlowbit {what}: {name} must be fp32 ({size},), got {s.dtype} {tuple(s.shape)}"
            )
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.dtype.is_floating_point):
        raise ValueError(f"fxlowbit {what}: bias must be float ({n},), got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in FLOATS:
        raise ValueError(f"fxlowbit {what}: out_dtype must be one of {FLOATS}, got {out_dtype}")
    if a_q.shape[1] > MAX_K and torch.int8 in codes:
        raise ValueError(f"fxlowbit {what}: K={a_q.shape[1]} > {MAX_K} could overflow the int32 accumulator")


def epilogue(acc: torch.Tensor, sa, sb, bias, out_dtype) -> torch.Tensor:
    """A low-bit GEMM's output from its accumulator: ``acc * sa[:, None] * sb[None, :] (+ bias)`` in
    fp32, cast to ``out_dtype`` (the references' and the benchmark's ``torch._int_mm`` path's)."""
    out = acc.float() * sa[:, None]
    out = out * sb[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _int32_product(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a_q @ b_q.T``: ``torch._int_mm`` on CPU; elsewhere, and for K = 1 (where
    torch 2.13's CPU ``_int_mm`` returns wrong sums: 342 of 361 odd shapes with K = 1 tried here,
    every other K right), fp32 matmuls over K chunks of 1024, summed in int32."""
    m, k = a_q.shape
    if k == 0 or a_q.shape[0] == 0 or b_q.shape[0] == 0:
        return torch.zeros((m, b_q.shape[0]), dtype=torch.int32, device=a_q.device)
    if a_q.device.type == "cpu" and k > 1:
        return torch._int_mm(a_q.contiguous(), b_q.contiguous().t())  # (its oneDNN path wants these)
    return _int32_emulated(a_q, b_q)


def _int32_emulated(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a_q @ b_q.T`` from fp32 matmuls (any device; ``torch._int_mm`` on CUDA wants
    M > 16 and K, N multiples of 8)."""
    acc = torch.zeros((a_q.shape[0], b_q.shape[0]), dtype=torch.int32, device=a_q.device)
    for k0 in range(0, a_q.shape[1], _EMULATE_CHUNK):
        ka, kb = a_q[:, k0 : k0 + _EMULATE_CHUNK].float(), b_q[:, k0 : k0 + _EMULATE_CHUNK].float()
        acc += (ka @ kb.t()).int()  # each partial sum is an integer below 2**24: exact in fp32
    return acc


def int8_mm_reference(
    a_q: torch.Tensor,
    b_q: torch.Tensor,
    sa: torch.Tensor,
    sb: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(a_q @ b_q^T) * sa[:, None] * sb[None, :] + bias`` -> (M, N) ``out_dtype``: a (M, K) and
    b (N, K) int8 codes, int32 accumulation (exact), the fp32 epilogue of the module docstring."""
    check_mm(a_q, b_q, sa, sb, bias, out_dtype, (torch.int8,), "int8_mm")
    return epilogue(_int32_product(a_q, b_q), sa, sb, bias, out_dtype)


def fp8_mm_reference(
    a_q: torch.Tensor,
    b_q: torch.Tensor,
    sa: torch.Tensor,
    sb: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The FP8 GEMM emulated: codes (any mix of e4m3/e5m2) widened to fp32, fp32 matmul, then the
    same epilogue as :func:`int8_mm_reference` (row-wise scales; expand per-tensor ones)."""
    check_mm(a_q, b_q, sa, sb, bias, out_dtype, tuple(d for d, *_ in FP8.values()), "fp8_mm")
    return epilogue(a_q.float() @ b_q.float().t(), sa, sb, bias, out_dtype)


def _use_triton(t: torch.Tensor) -> bool:
    from .. import ops  # FORCE_TRITON lives there (env FXLOWBIT_TRITON=1; tests set it)

    return t.is_cuda or ops.FORCE_TRITON


def int8_mm(a_q, b_q, sa, sb, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """:func:`int8_mm_reference`, run by the Triton kernel on CUDA (or anywhere with
    ``ops.FORCE_TRITON``, in the interpreter on CPU), bit for bit the same result."""
    if _use_triton(a_q):
        from .int8_gemm_triton import int8_mm_triton

        return int8_mm_triton(a_q, b_q, sa, sb, bias, out_dtype)
    return int8_mm_reference(a_q, b_q, sa, sb, bias, out_dtype)


def _scaled_mm_ok(a_q: torch.Tensor, b_q: torch.Tensor) -> bool:
    """``torch._scaled_mm`` needs CUDA sm89+, K and N multiples of 16 and not both e5m2."""
    if not a_q.is_cuda or torch.cuda.get_device_capability(a_q.device) < (8, 9):
        return False
    both_e5m2 = a_q.dtype == b_q.dtype == torch.float8_e5m2
    return a_q.shape[1] % 16 == 0 and b_q.shape[0] % 16 == 0 and not both_e5m2


@functools.cache
def _warn_scaled_mm(err: str) -> None:
    import warnings

    warnings.warn(f"fxlowbit fp8_mm: torch._scaled_mm failed ({err}); emulating the fp8 GEMM", stacklevel=3)


def fp8_mm(a_q, b_q, sa, sb, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """The FP8 GEMM: ``torch._scaled_mm`` with row-wise scales on CUDA sm89+ (fp32 accumulation,
    bf16 output, cuBLAS's epilogue order: results differ from the emulation by that rounding), else
    :func:`fp8_mm_reference`."""
    if _scaled_mm_ok(a_q, b_q):
        try:
            # row-wise scaling takes a bf16 output only; its 8 bits outdo the operands' 3-4
            out = torch._scaled_mm(
                a_q, b_q.t(), scale_a=sa[:, None], scale_b=sb[None, :], out_dtype=torch.bfloat16
            )
            out = out.to(out_dtype)
            return out if bias is None else out + bias.to(out_dtype)
        except RuntimeError as err:  # a layout or dtype mix this torch/cuBLAS does not take
            _warn_scaled_mm(str(err).split("\n")[0][:200])
    return fp8_mm_reference(a_q, b_q, sa, sb, bias, out_dtype)


@functools.cache
def _sylvester(block: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(block)).float()


def hadamard_matrix(block: int, device=None) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix (block, block) fp32: symmetric, ``H @ H = I``."""
    if block not in (32, 128):
        raise ValueError(f"fxlowbit hadamard: block must be 32 or 128, got {block}")
    return _sylvester(block).to(device)


def hadamard_rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` (..., K) -> fp32 (..., K) with each run of ``block`` along K multiplied by
    :func:`hadamard_matrix` (its own inverse: rotating twice gives ``x`` back up to rounding)."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"fxlowbit hadamard: last dim {k} is not a multiple of the block {block}")
    h = hadamard_matrix(block, x.device)
    return (x.float().reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)
