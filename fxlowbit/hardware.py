"""The hardware profile: measured throughputs of one machine (GEMMs per size bucket and dtype,
pack/unpack and copy bandwidths, launch overhead), as the cost model reads them; loading, the
schema check, the per-process cache and the shipped defaults (fxlowbit/profiles/*.json).
``python -m fxlowbit.profile`` measures one (fxlowbit/profile.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .state import STATE

__all__ = [
    "HardwareProfile",
    "load_profile",
    "BUCKETS",
    "bucket",
    "machine_mismatch",
    "saved_profile_path",
    "default_source",
]

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
_QUANT_KEYS = ("int8", "int8_sr", "fp8", "fp8_sr")


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
    # row-wise quantizers of low-bit GEMM operands, fp32 bytes in per second: "int8" and "fp8"
    # (round to nearest: forward operands, weights), "int8_sr" and "fp8_sr" (stochastic rounding:
    # gradients). Optional: missing figures fall back to pack_gbps[8]. fxlowbit-profile times the
    # int8 ones on a CPU compiled, as the lowered CPU path runs them (passes/lower_linears.py);
    # profiles measured before 2026-12-06, the shipped CPU one among them, timed them eagerly
    gemm_quant_gbps: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # what a linear pays, in microseconds a step, for running as ``fxlowbit::lowbit_linear`` (its
    # forward and backward ops: dispatch, Python, copies) beyond the plain aten calls it replaces;
    # its low-bit GEMMs must save more (passes/lowbit_gemm.formats_for), unless the op is lowered
    # into the compiled graphs (the CPU path: passes/lower_linears.py). Optional: 0, not measured
    # (profiles before 2026-12-06, the shipped ones among them)
    linear_op_us: float = 0.0

    def __post_init__(self) -> None:
        # Schema first: a wrong type or an unknown key must fail here, with the field's name, not
        # later as a TypeError or a silent fallback in the planner.
        for key in ("device", "kind"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"fxlowbit profile: {key} must be a string, got {getattr(self, key)!r}")
        if self.kind not in ("cpu", "cuda"):
            raise ValueError(f"fxlowbit profile: kind must be 'cpu' or 'cuda', got {self.kind!r}")
        if not isinstance(self.measured, bool):
            raise ValueError(f"fxlowbit profile: measured must be true or false, got {self.measured!r}")
        for key in ("copy_gbps", "pointwise_gbps", "mask_gbps"):
            if not _positive(getattr(self, key)):
                raise ValueError(f"fxlowbit profile: {key} must be > 0, got {getattr(self, key)!r}")
        for key in ("pack_gbps", "unpack_gbps"):
            table = getattr(self, key)
            if (
                not isinstance(table, Mapping)
                or set(table) != {2, 4, 8}
                or not all(_positive(v) for v in table.values())
            ):
                raise ValueError(f"fxlowbit profile: {key} needs positive figures for bits 2, 4, 8: {table}")
        _check_tflops(self.matmul_tflops)
        if not _number(self.launch_us) or not 0 <= self.launch_us < math.inf:
            raise ValueError(f"fxlowbit profile: launch_us must be >= 0, got {self.launch_us!r}")
        if not _number(self.linear_op_us) or not 0 <= self.linear_op_us < math.inf:
            raise ValueError(f"fxlowbit profile: linear_op_us must be >= 0, got {self.linear_op_us!r}")
        if not isinstance(self.gemm_quant_gbps, Mapping):
            raise ValueError(f"fxlowbit profile: gemm_quant_gbps must be a mapping: {self.gemm_quant_gbps!r}")
        bad = {k: v for k, v in self.gemm_quant_gbps.items() if k not in _QUANT_KEYS or not _positive(v)}
        if bad:
            raise ValueError(
                f"fxlowbit profile: gemm_quant_gbps takes positive figures for {_QUANT_KEYS}, got {bad}"
            )
        if not isinstance(self.meta, Mapping):
            raise ValueError(f"fxlowbit profile: meta must be a mapping, got {self.meta!r}")

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
        if not isinstance(d, Mapping):
            raise ValueError(f"fxlowbit profile: expected a JSON object of fields, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f for f in fields - set(d) if f not in ("meta", "gemm_quant_gbps", "linear_op_us"))
        if missing:
            raise ValueError(f"fxlowbit profile: missing field(s) {missing}")
        d = {k: v for k, v in d.items() if k in fields}
        for key in ("pack_gbps", "unpack_gbps"):  # JSON object keys are strings: "2" -> 2
            table = d[key]
            keys = {str(k): k for k in table} if isinstance(table, Mapping) else {}
            if set(keys) != {"2", "4", "8"} or not all(_positive(v) for v in table.values()):
                raise ValueError(f"fxlowbit profile: {key} needs positive figures for bits 2, 4, 8: {table}")
            d[key] = {int(s): float(table[k]) for s, k in keys.items()}
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")


def load_profile(spec: str | os.PathLike | Mapping | HardwareProfile | None = None) -> HardwareProfile:
    """A profile from a path to a JSON file, a dict, a shipped name (``"cpu"``, ``"h100"``), or
    ``None``: this machine's own when ``fxlowbit-profile --save`` kept one (:func:`saved_profile_path`),
    else the shipped default of the device this process would train on. A file or dict that breaks
    the schema raises ``ValueError`` naming the field."""
    if isinstance(spec, HardwareProfile):
        return spec
    if isinstance(spec, Mapping):
        return HardwareProfile.from_dict(spec)
    if spec is None:
        spec = _default_name()
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        shipped = sorted(p.stem for p in _PROFILES_DIR.glob("*.json"))
        raise ValueError(
            f"fxlowbit: expected a JSON path, a shipped name {shipped}, a dict, a HardwareProfile or None "
            f"as the profile, got {type(spec).__name__} {spec!r}"
        )
    path = Path(spec)
    if not path.suffix and (_PROFILES_DIR / f"{spec}.json").exists():
        path = _PROFILES_DIR / f"{spec}.json"
    if not path.exists():
        shipped = sorted(p.stem for p in _PROFILES_DIR.glob("*.json"))
        raise ValueError(f"fxlowbit: profile {str(spec)!r} is neither a file nor a shipped profile {shipped}")
    key = (str(path.resolve()), path.stat().st_mtime_ns)  # an edited file is read again
    cached = STATE.profiles.get(key)
    if cached is not None:  # parsed once per process (the options' check, then every compile)
        return cached
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"fxlowbit: profile {str(path)!r} is not valid JSON: {err}") from None
    profile = STATE.profiles[key] = HardwareProfile.from_dict(data)
    return profile


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive(v: Any) -> bool:
    """A finite number > 0 (NaN, Inf, strings and booleans are not)."""
    return _number(v) and 0 < v < math.inf


def _check_tflops(tables: Any) -> None:
    """``matmul_tflops``: dtype name -> {bucket name: TFLOP/s > 0}, every table non-empty with
    buckets of :data:`BUCKETS` only (a misspelt bucket would otherwise be ignored, and an empty
    table fails in :meth:`HardwareProfile.matmul_time`)."""
    if not isinstance(tables, Mapping) or not tables:
        raise ValueError(f"fxlowbit profile: matmul_tflops is empty or not a mapping: {tables!r}")
    names = [name for name, _ in BUCKETS]
    for dtype, table in tables.items():
        where = f"fxlowbit profile: matmul_tflops[{dtype!r}]"
        if not isinstance(dtype, str) or not dtype:
            raise ValueError(f"{where}: dtype names are non-empty strings")
        if not isinstance(table, Mapping) or not table:
            raise ValueError(f"{where} must map some of the buckets {names} to TFLOP/s, got {table!r}")
        unknown = sorted(str(k) for k in table if k not in names)
        if unknown:
            raise ValueError(f"{where}: unknown bucket(s) {unknown}; valid: {names}")
        bad = {k: v for k, v in table.items() if not _positive(v)}
        if bad:
            raise ValueError(f"{where}: TFLOP/s must be finite and > 0, got {bad}")


@functools.cache
def _this_cpu() -> str | None:
    import torch

    from .profile_bench import machine

    return machine(torch.device("cpu"))["cpu_model"]


def machine_mismatch(profile: HardwareProfile) -> str | None:
    """One line when ``profile`` was measured on another processor than this process trains on
    (a CUDA profile: the GPU model; a CPU one: its model, or another torch thread count), else None: the
    planner's time estimates, and the choices it makes from them, are then that machine's. On this
    2-core AMD EPYC at 1 thread the shipped CPU profile (an Intel Xeon at 2 threads) puts an fp32
    GEMM at 0.35 TFLOP/s where it runs at 0.08-0.10 (``fxlowbit-profile --threads 1``,
    2026-12-06). A profile without a machine record (a hand-made one) is taken as meant."""
    import torch

    theirs = profile.meta.get("machine") if isinstance(profile.meta, Mapping) else None
    if not isinstance(theirs, Mapping):
        return None
    threads = profile.meta.get("threads")
    gpu = profile.kind == "cuda" and torch.cuda.is_available()
    mine: str | None
    n = torch.get_num_threads()
    if gpu:
        mine, model = torch.cuda.get_device_name(), theirs.get("gpu")
        differs = bool(model) and model != mine
        there, here = f"{model}", f"{mine}"
    else:
        mine, model = _this_cpu(), theirs.get("cpu_model")
        differs = (bool(model) and bool(mine) and model != mine) or (_number(threads) and threads != n)
        there = f"{model or 'a CPU'} at {threads} thread(s)" if _number(threads) else f"{model}"
        here = f"{mine or 'this CPU'} at {n} thread(s)"
    if not differs:
        return None
    hint = " --device cuda" if gpu else f" --threads {n}"
    return (
        f"fxlowbit: time estimates come from a profile of {there}; this process runs on {here}, so "
        f"est. times and the choices made from them may be off: `fxlowbit-profile{hint} --save` "
        "measures this machine once, and the default options plan with it from then on"
    )


PROFILE_DIR_ENV = "FXLOWBIT_PROFILE_DIR"
"""Environment variable naming the folder of profiles saved by ``fxlowbit-profile --save`` (default
``$XDG_CACHE_HOME/fxlowbit/profiles``, else ``~/.cache/fxlowbit/profiles``)."""


def saved_profiles_dir() -> Path:
    """The folder ``fxlowbit-profile --save`` writes to and the defaults read from."""
    env = os.environ.get(PROFILE_DIR_ENV)
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fxlowbit" / "profiles"


def _slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split()) or "unknown"


def saved_profile_path(kind: str | None = None, threads: int | None = None) -> Path:
    """Where this machine's own profile is saved: one file per GPU model (``kind="cuda"``) or per
    CPU model and torch thread count (``kind="cpu"``, the thread count as now when None), since a
    CPU's GEMM rates scale with the threads. ``kind`` None: the device this process trains on."""
    import torch

    kind = kind or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return saved_profiles_dir() / f"cuda-{_slug(torch.cuda.get_device_name())}.json"
    n = torch.get_num_threads() if threads is None else threads
    return saved_profiles_dir() / f"cpu-{_slug(_this_cpu() or '')}-{n}t.json"


def _default_name() -> str:
    """The profile ``profile=None`` means for this process: the one ``fxlowbit-profile --save``
    measured on this machine (this CPU model at this thread count, or this GPU model), when there
    is one; else the shipped one, "h100" on any CUDA device (the only GPU profile shipped), else
    "cpu" (measured on another machine: :func:`machine_mismatch` says so)."""
    import torch

    saved = saved_profile_path()
    if saved.is_file():
        return str(saved)
    return "h100" if torch.cuda.is_available() else "cpu"


def default_source() -> str:
    """One line naming the profile ``profile=None`` loads in this process, and why."""
    name = _default_name()
    if name in ("cpu", "h100"):
        return f"the shipped {name!r} profile (no profile of this machine saved at {saved_profile_path()})"
    return f"this machine's profile, saved at {name}"
