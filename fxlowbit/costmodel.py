"""The cost model: bytes, time and gradient variance of every stored form of a saved tensor.

Pure Python on plain numbers and sympy expressions (no torch.fx), so the planner and its tests run
in milliseconds. Three measures per choice:

- memory: exact stored bytes (codes, scales, masks) as a sympy expression of the symbolic sizes
  (:func:`stored_bytes`), evaluated at the example sizes for the solver;
- time: seconds added to a training step, from a :class:`HardwareProfile` (fxlowbit/hardware.py;
  measured by ``python -m fxlowbit.profile`` or a shipped default);
- variance: gradient variance added by stochastic rounding. Rounding an element of a group with
  range ``R`` to ``b`` bits adds variance ``p (1 - p) R^2 / (2^b - 1)^2 <= R^2 / (4 (2^b - 1)^2)``
  (``p``: its fractional position between two levels), so for a fixed tensor the gradient variance
  it causes scales as ``1 / (2^b - 1)^2``: ``variance = sensitivity / (2^b - 1)^2``, where the
  sensitivity (the variance at one level per range) is measured by probe backward passes
  (:mod:`fxlowbit.calibrate`) or, before any probe, taken from :func:`prior_sensitivity`.

The low-bit GEMMs' costs are in fxlowbit/gemm_cost.py; both modules' names are re-exported here.
"""

from __future__ import annotations

import dataclasses

from .gemm_cost import (  # noqa: F401  (re-exported: the cost model's public face)
    GEMM_TFLOPS_KEY,
    MIN_GEMM_GAIN,
    GemmChoice,
    gemm_choice,
    lowbit_gemm_time,
)
from .hardware import BUCKETS, HardwareProfile, bucket, load_profile  # noqa: F401

__all__ = [
    "HardwareProfile",
    "load_profile",
    "stored_bytes",
    "quant_variance",
    "sr_variance_bound",
    "prior_sensitivity",
    "Costs",
    "KEEP",
    "RECOMPUTE",
    "QUANT",
    "MASK",
    "CMP_MASK",
    "BUCKETS",
    "bucket",
    "GemmChoice",
    "gemm_choice",
    "lowbit_gemm_time",
    "GEMM_TFLOPS_KEY",
    "MIN_GEMM_GAIN",
]

# the built-in forms' names (fxlowbit.plan.Form; each form is a module of fxlowbit.forms)
KEEP, RECOMPUTE, QUANT, MASK, CMP_MASK, PACKED = "keep", "recompute", "quant", "mask", "cmp_mask", "packed"


# -- memory ---------------------------------------------------------------------------------------
def stored_bytes(form: str, numel, bits: int, group_size: int, itemsize: int, n_masks: int = 1):
    """Exact bytes of a stored form as a sympy expression of the symbolic sizes. Each form's
    formula lives in its module of :mod:`fxlowbit.forms` (quantized: per group of ``group_size``
    elements, ``group_size * bits / 8`` bytes of codes and 8 bytes of fp32 (lo, scale); masks: one
    bit per element, rounded up to bytes; packed integers: ``bits`` per element, rounded up)."""
    from . import forms  # the registry prices its forms with this module's figures

    return forms.get(form).stored_bytes(numel, bits, group_size, itemsize, n_masks)


PACKED_WIDTHS = (1, 2, 4, 8)  # field widths that tile a byte (codegen.kernels.bitmask.BIT_WIDTHS)


def packed_bits(lo: int, hi: int) -> int | None:
    """The narrowest packed field holding every integer in ``[lo, hi]``, or None."""
    return next((b for b in PACKED_WIDTHS if hi - lo < 1 << b), None)


# -- variance -------------------------------------------------------------------------------------
def sr_variance_bound(value_range: float, bits: int) -> float:
    """Largest variance stochastic rounding to ``bits`` adds to one element of a group whose
    values span ``value_range``: ``range^2 / (4 (2^b - 1)^2)``."""
    return value_range**2 / (4 * (2**bits - 1) ** 2)


def quant_variance(sensitivity: float, bits: int) -> float:
    """Gradient variance added by quantizing a tensor of the given sensitivity to ``bits``."""
    return sensitivity / (2**bits - 1) ** 2


# Before any probe has measured the model, every element of every compressible tensor is assumed
# equally sensitive, scaled so that quantizing *all* of them at 4 bits adds a gradient variance of
# PRIOR_RATIO_4BIT times the minibatch variance (ActNN and GACT train to full accuracy at 4 bits;
# at 2 bits the same prior gives 25x more, which is where they report losses).
PRIOR_RATIO_4BIT = 0.02


def prior_sensitivity(numel: float, total_numel: float) -> float:
    """Sensitivity (in units of the minibatch gradient variance) of a tensor before calibration."""
    return PRIOR_RATIO_4BIT * (2**4 - 1) ** 2 * numel / max(total_numel, 1.0)


@dataclasses.dataclass(frozen=True)
class Costs:
    """One stored form of one saved tensor, as the solver sees it."""

    form: str
    bits: int  # bits per element of the main form (0 for keep/recompute)
    nbytes: int  # stored bytes at the example sizes
    time_s: float  # seconds added to the step
    variance: float  # gradient variance added, in units of the minibatch gradient variance
    # a replay through a GEMM that reads leaves a plan may store lossily: those leaves, and the
    # replayed tensor's sensitivity (candidates.graph_candidates charges the noise the replay
    # carries to the leaves' lossy forms, at their widths)
    reads_lossy: tuple[str, ...] = ()
    sensitivity: float = 0.0
