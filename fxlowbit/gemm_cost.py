"""Low-bit GEMM costs: the estimated time of an INT8/FP8 GEMM (quantization included) against the
plain one, and the format a GEMM gets under ``gemm="auto"`` (passes/lowbit_gemm.py asks per GEMM).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .codegen.dtypes import SHORT_NAMES
from .hardware import HardwareProfile, load_profile  # noqa: F401  (load_profile: the doctest's)

__all__ = ["GemmChoice", "gemm_choice", "lowbit_gemm_time", "GEMM_TFLOPS_KEY", "MIN_GEMM_GAIN"]

# The profile's matmul_tflops key timing each low-bit format's GEMM (its scale epilogue included).
GEMM_TFLOPS_KEY = {"int8": "int8", "fp8": "float8_e4m3fn"}
# A low-bit GEMM costs accuracy, so it must be estimated at least this much faster than plain.
MIN_GEMM_GAIN = 0.1
_NEEDS = {"int8": (8, 0), "fp8": (8, 9)}  # CUDA compute capability (int8 MMA in Triton; fp8 cuBLAS)


def lowbit_gemm_time(
    fmt: str, m: int, n: int, k: int, profile: HardwareProfile, *, gradient: bool = False
) -> float | None:
    """Seconds of an ``(m, k) x (n, k)^T`` GEMM in ``fmt`` ("int8" or "fp8"): the profile's GEMM
    time for the format plus quantizing both operands row-wise (``(m + n) k`` elements, read as
    fp32 bytes at ``gemm_quant_gbps``; ``gradient``: the (m, k) operand is a gradient, rounded
    stochastically) and two launches. None when the profile has no figures for ``fmt``."""
    table = profile.matmul_tflops.get(GEMM_TFLOPS_KEY[fmt])
    if not table:
        return None
    rates = profile.gemm_quant_gbps
    fallback = profile.pack_gbps[8]
    rtn = rates.get(fmt, fallback)
    first = rates.get(f"{fmt}_sr", rtn) if gradient else rtn
    quant = 4 * (m * k / first + n * k / rtn) / 1e9
    return profile.matmul_time(2.0 * m * n * k, GEMM_TFLOPS_KEY[fmt]) + quant + 2 * profile.launch_us * 1e-6


@dataclasses.dataclass(frozen=True)
class GemmChoice:
    fmt: str  # "int8", "fp8", or the plain dtype's name ("fp32", "bf16", "fp16")
    plain_s: float  # estimated seconds in the plain dtype
    lowbit_s: Mapping[str, float]  # estimated seconds per low-bit format the device can run
    reason: str


def gemm_choice(
    m: int,
    n: int,
    k: int,
    dtype: str,
    profile: HardwareProfile,
    capability: tuple[int, int] | None = None,
    *,
    gradient: bool = False,
) -> GemmChoice:
    """The fastest format for an ``(m, k) x (n, k)^T`` GEMM of ``dtype`` operands ("float32",
    "bfloat16", "float16"): plain unless a low-bit format is estimated :data:`MIN_GEMM_GAIN`
    faster, quantization included (:func:`lowbit_gemm_time`). ``capability``: the CUDA device's
    compute capability, None on a CPU; fp8 needs (8, 9) or more and a CUDA profile. Small GEMMs
    stay plain because the quantization passes and launches outweigh the faster arithmetic; where
    the crossover lies is the profile's (SwitchBack measured int8 slower at 8192x1024x4096 and
    1.49x faster at 131072x4096x16384 on an A100).

        >>> gemm_choice(64, 64, 64, "float32", load_profile("cpu")).fmt
        'fp32'
    """
    plain = SHORT_NAMES.get(dtype)
    if plain is None:
        raise ValueError(f"fxlowbit gemm_choice: dtype {dtype!r}; valid: {tuple(SHORT_NAMES)}")
    t_plain = profile.matmul_time(2.0 * m * n * k, dtype)
    options = {}
    for fmt, needs in _NEEDS.items():
        runs = capability >= needs if capability is not None else (fmt == "int8" and profile.kind == "cpu")
        t = lowbit_gemm_time(fmt, m, n, k, profile, gradient=gradient) if runs else None
        if t is not None:
            options[fmt] = t
    if not options:
        return GemmChoice(plain, t_plain, options, "no low-bit GEMM on this device / in this profile")
    best = min(options, key=options.__getitem__)
    if options[best] <= (1 - MIN_GEMM_GAIN) * t_plain:
        why = f"{best} {options[best] * 1e3:.3g} ms vs {plain} {t_plain * 1e3:.3g} ms"
        return GemmChoice(best, t_plain, options, why)
    why = f"{plain} {t_plain * 1e3:.3g} ms; {best} {options[best] * 1e3:.3g} ms: not {MIN_GEMM_GAIN:.0%} less"
    return GemmChoice(plain, t_plain, options, why)
