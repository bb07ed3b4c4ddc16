"""The cost model: bytes, time and gradient variance of every stored form of a saved tensor.

Pure Python on plain numbers and sympy expressions (no torch.fx), so the planner and its tests run
in milliseconds. Three measures per choice:

- memory: exact stored bytes (codes, scales, masks) as a sympy expression of the symbolic sizes
  (:func:`stored_bytes`), evaluated at the example sizes for the solver;
- time: seconds added to a training step, from a :class:`HardwareProfile` (measured by
  ``python -m fxlowbit.profile`` or a shipped default);
- variance: gradient variance added by stochastic rounding. Rounding an element of a group with
  range ``R`` to ``b`` bits adds variance ``p (1 - p) R^2 / (2^b - 1)^2 <= R^2 / (4 (2^b - 1)^2)``
  (``p``: its fractional position between two levels), so for a fixed tensor the gradient variance
  it causes scales as ``1 / (2^b - 1)^2``: ``variance = sensitivity / (2^b - 1)^2``, where the
  sensitivity (the variance at one level per range) is measured by probe backward passes
  (:mod:`fxlowbit.calibrate`) or, before any probe, taken from :func:`prior_sensitivity`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sympy

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
]

KEEP, RECOMPUTE, QUANT, MASK, CMP_MASK = "keep", "recompute", "quant", "mask", "cmp_mask"

# GEMM size buckets by FLOPs (2*M*N*K) of one call: small GEMMs lose to launch and quantization
# overheads, so throughput is measured per bucket.
BUCKETS: tuple[tuple[str, float], ...] = (
    ("tiny", 2e6),
    ("small", 2e8),
    ("medium", 2e10),
    ("large", math.inf),
)

# a representative size per bucket (geometric middle of its range; the profile measures near it)
_CENTRES = {"tiny": 2e5, "small": 2e7, "medium": 2e9, "large": 2e11}

_PROFILES_DIR = Path(__file__).with_name("profiles")


def bucket(flops: float) -> str:
    """The name of the GEMM size bucket holding a call of ``flops`` FLOPs."""
    return next(name for name, top in BUCKETS if flops < top)


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    """Measured (or estimated) throughputs of one machine. Bandwidths in GB/s (1e9 bytes/s) of
    full-precision bytes (the fp32 input of a pack, the fp32 output of an unpack), TFLOP/s per
    dtype and GEMM bucket, launch overhead in microseconds.

    ``measured`` is False for shipped estimates that no run on such a device has confirmed.
    """

    device: str  # "cpu" or the CUDA device name
    kind: str  # "cpu" | "cuda"
    measured: bool
    copy_gbps: float  # bytes read + written by a large device copy, per second
    pointwise_gbps: float  # bytes read + written by a fused pointwise kernel (recompute)
    pack_gbps: Mapping[int, float]  # quantize + pack at b bits, fp32 bytes in per second
    unpack_gbps: Mapping[int, float]  # unpack + dequantize at b bits, fp32 bytes out per second
    mask_gbps: float  # 1-bit mask pack + unpack, bytes of the (bool or float) input per second
    matmul_tflops: Mapping[str, Mapping[str, float]]  # dtype -> bucket -> TFLOP/s
    launch_us: float  # fixed cost of one extra kernel (or, on CPU, one extra op)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # versions, date, host

    def __post_init__(self) -> None:
        for key in ("copy_gbps", "pointwise_gbps", "mask_gbps"):
            if not getattr(self, key) > 0:
                raise ValueError(f"fxlowbit profile: {key} must be > 0, got {getattr(self, key)!r}")
        for key in ("pack_gbps", "unpack_gbps"):
            table = getattr(self, key)
            missing = {2, 4, 8} - set(table)
            if missing or not all(v > 0 for v in table.values()):
                raise ValueError(f"fxlowbit profile: {key} needs positive figures for bits 2, 4, 8: {table}")
        if not self.matmul_tflops:
            raise ValueError("fxlowbit profile: matmul_tflops is empty")
        if self.launch_us < 0:
            raise ValueError(f"fxlowbit profile: launch_us must be >= 0, got {self.launch_us}")

    # -- times in seconds -------------------------------------------------------------------------
    def pack_time(self, nbytes: float, bits: int) -> float:
        return nbytes / (self.pack_gbps[bits] * 1e9) + self.launch_us * 1e-6

    def unpack_time(self, nbytes: float, bits: int) -> float:
        return nbytes / (self.unpack_gbps[bits] * 1e9) + self.launch_us * 1e-6

    def mask_time(self, nbytes: float) -> float:
        return nbytes / (self.mask_gbps * 1e9) + 2 * self.launch_us * 1e-6

    def pointwise_time(self, nbytes: float) -> float:
        return nbytes / (self.pointwise_gbps * 1e9) + self.launch_us * 1e-6

    def matmul_time(self, flops: float, dtype: str = "float32") -> float:
        """Seconds of one GEMM. Between the buckets' centres the *time* is interpolated log-linearly
        (no jumps at bucket edges); each centre's time is at least the previous one's, since a
        measured throughput can grow faster than the FLOPs (launch-bound tiny GEMMs on a GPU take
        the same time as small ones) and a bigger GEMM is never faster. Beyond the outer centres
        the outer throughput holds."""
        table = self.matmul_tflops.get(dtype) or self.matmul_tflops.get("float32")
        table = table or next(iter(self.matmul_tflops.values()))
        points, floor = [], 0.0  # (log centre flops, log seconds), seconds non-decreasing
        for name, _ in BUCKETS:
            if table.get(name):
                floor = max(floor, _CENTRES[name] / (table[name] * 1e12))
                points.append((math.log(_CENTRES[name]), math.log(floor)))
        flops = max(flops, 1.0)
        x = math.log(flops)
        if x <= points[0][0] or len(points) == 1:
            seconds = flops * math.exp(points[0][1] - points[0][0])
        elif x >= points[-1][0]:
            seconds = flops * math.exp(points[-1][1] - points[-1][0])
        else:
            (x0, y0), (x1, y1) = next(
                (a, b) for a, b in zip(points, points[1:], strict=False) if a[0] <= x <= b[0]
            )
            seconds = math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
        return seconds + self.launch_us * 1e-6

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pack_gbps"] = {str(k): v for k, v in self.pack_gbps.items()}
        d["unpack_gbps"] = {str(k): v for k, v in self.unpack_gbps.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HardwareProfile:
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f for f in fields - set(d) if f != "meta")
        if missing:
            raise ValueError(f"fxlowbit profile: missing field(s) {missing}")
        d = {k: v for k, v in d.items() if k in fields}
        d["pack_gbps"] = {int(k): float(v) for k, v in d["pack_gbps"].items()}
        d["unpack_gbps"] = {int(k): float(v) for k, v in d["unpack_gbps"].items()}
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")


def load_profile(spec: str | os.PathLike | Mapping | HardwareProfile | None = None) -> HardwareProfile:
    """A profile from a path to a JSON file, a dict, a shipped name (``"cpu"``, ``"h100"``), or
    ``None`` for the shipped default of the device this process would train on."""
    if isinstance(spec, HardwareProfile):
        return spec
    if isinstance(spec, Mapping):
        return HardwareProfile.from_dict(spec)
    if spec is None:
        spec = _default_name()
    path = Path(spec)
    if not path.suffix and (_PROFILES_DIR / f"{spec}.json").exists():
        path = _PROFILES_DIR / f"{spec}.json"
    if not path.exists():
        shipped = sorted(p.stem for p in _PROFILES_DIR.glob("*.json"))
        raise ValueError(f"fxlowbit: profile {str(spec)!r} is neither a file nor a shipped profile {shipped}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"fxlowbit: profile {str(path)!r} is not valid JSON: {err}") from None
    return HardwareProfile.from_dict(data)


def _default_name() -> str:
    import torch

    return "h100" if torch.cuda.is_available() else "cpu"


# -- memory ---------------------------------------------------------------------------------------
def stored_bytes(form: str, numel, bits: int, group_size: int, itemsize: int, n_masks: int = 1):
    """Exact bytes of a stored form as a sympy expression of the symbolic sizes. Quantized: per
    group of ``group_size`` elements, ``group_size * bits / 8`` bytes of codes and 8 bytes of fp32
    (lo, scale); masks: one bit per element, rounded up to bytes."""
    if form == KEEP:
        return numel * itemsize
    if form == RECOMPUTE:
        return sympy.Integer(0)
    if form in (MASK, CMP_MASK):
        return n_masks * sympy.ceiling(numel / 8)
    if form == QUANT:
        groups = sympy.ceiling(numel / group_size)
        return groups * (group_size * bits // 8) + groups * 8
    raise ValueError(f"unknown form {form!r}")


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
