"""The measurements behind ``python -m fxlowbit.profile``: one function per figure of a
:class:`~fxlowbit.costmodel.HardwareProfile`, each timing the kernels a lowbit plan adds to a
training step (:func:`fxlowbit.profile.measure` says which, in what order, and assembles them).
Each takes a :class:`Bench`: the device, the tensor sizes, the timer and whether to compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from fxlowbit.codegen.kernels import int8_gemm
from fxlowbit.codegen.kernels.bitmask import pack_mask_traceable, unpack_mask_traceable
from fxlowbit.codegen.kernels.quant import dequantize_unpack_traceable

__all__ = [
    "Bench",
    "timer",
    "launch_us",
    "copy_gbps",
    "pointwise_gbps",
    "quant_gbps",
    "mask_gbps",
    "gemm_quant_gbps",
    "linear_op_us",
    "matmul_tflops",
    "machine",
    "version",
]

GROUP_SIZE = 256  # LowbitConfig's default group size
HIDDEN = 1024  # last dimension of the pointwise input (its per-column weight and bias)
MIN_SAMPLE_S = 2e-3  # a timed sample repeats the call until it lasts this long


def timer(sync: Callable[[], None], budget: float) -> Callable[[Callable[[], object]], float]:
    """A function timing ``fn()``: seconds per call, median of samples after two warm-up calls."""

    def elapsed(fn, calls: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return time.perf_counter() - start

    def time_it(fn) -> float:
        for _ in range(2):  # compile, allocate, autotune
            fn()
        once = max(elapsed(fn, 1), 1e-7)
        calls = max(1, int(MIN_SAMPLE_S / once))  # tiny ops: many calls per sample
        samples = min(25, max(3, int(budget / (once * calls))))
        return statistics.median(elapsed(fn, calls) / calls for _ in range(samples))

    return time_it


@dataclasses.dataclass(frozen=True)
class Bench:
    """What every measurement shares."""

    device: torch.device
    sizes: dict[str, int]  # fp32 elements per bandwidth figure (profile.SIZES)
    time_it: Callable[[Callable[[], object]], float]  # seconds per call (:func:`timer`)
    compile: bool  # run pointwise, quantizer and mask functions through torch.compile

    def jit(self, fn: Callable) -> Callable:
        return torch.compile(fn, fullgraph=True, dynamic=False) if self.compile else fn

    def rand(self, n: int) -> torch.Tensor:
        return torch.randn(n, device=self.device)


def launch_us(b: Bench) -> float:
    """One tiny op, in microseconds."""
    x, y = torch.ones(1, device=b.device), torch.ones(1, device=b.device)
    return b.time_it(lambda: torch.add(x, y)) * 1e6


def copy_gbps(b: Bench) -> float:
    """``dst.copy_(src)``: fp32 bytes read + written per second."""
    src = b.rand(b.sizes["copy"])
    dst = torch.empty_like(src)
    return 2 * src.nbytes / b.time_it(lambda: dst.copy_(src)) / 1e9


def _pointwise(x, m, r, w, b):
    # x: (rows, H); m, r: (rows, 1); w, b: (H,) -- a LayerNorm output recomputed in the backward
    return (x - m) * r * w + b


def pointwise_gbps(b: Bench) -> float:
    """A LayerNorm-style ``(x - m) * r * w + b`` (how recompute runs): fp32 bytes read + written
    per second."""
    x = b.rand(b.sizes["pointwise"]).view(-1, HIDDEN)
    m, r, w, bias = b.rand(x.shape[0])[:, None], b.rand(x.shape[0])[:, None], b.rand(HIDDEN), b.rand(HIDDEN)
    fn = b.jit(_pointwise)
    return 2 * x.nbytes / b.time_it(lambda: fn(x, m, r, w, bias)) / 1e9


@contextlib.contextmanager
def _cpu_family(b: Bench, call: Callable[[], object]):
    """Within: a CPU op that runs a compiled kernel family (codegen/kernels/quant_cpu.py) runs it as
    the default path does, ``call`` having started its compile and loaded it; without ``compile``,
    the eager reference runs instead (as ``kernels="ops"`` runs it)."""
    from fxlowbit.codegen import ops
    from fxlowbit.codegen.kernels import quant_cpu

    with ops.reference_kernels() if not b.compile else contextlib.nullcontext():
        if b.compile:
            for _ in range(2):  # the first call starts the family's compile, the second loads it
                call()
                quant_cpu.wait()
        yield


def quant_gbps(b: Bench, bits: int) -> tuple[float, float]:
    """The quantizer at ``bits`` as the backend runs it at default options: (pack: fp32 bytes in
    per second, unpack: fp32 bytes out per second).

    The pack is ``fxlowbit::quantize_pack``, seed draw included: the Triton kernel on CUDA, the
    compiled CPU family on a CPU (its compile waited for first; without ``compile`` the eager
    reference). The unpack is the op on CUDA and, on a CPU, the traceable decode under
    ``torch.compile``, as the hybrid path traces it into the backward (there it fuses into its
    consumer, so this standalone figure is an upper bound on its cost)."""
    from fxlowbit.codegen import rng

    x = b.rand(b.sizes["quant"])
    stream = rng.reserved_stream(1, 12345)  # 0 is validate.py's
    on_cpu = b.device.type == "cpu"

    def pack():
        return torch.ops.fxlowbit.quantize_pack(x, bits, GROUP_SIZE, stream)

    with _cpu_family(b, pack) if on_cpu else contextlib.nullcontext():
        codes, qmeta = pack()
        t_pack = b.time_it(pack)
        if on_cpu:
            decode = b.jit(dequantize_unpack_traceable)
            t_unpack = b.time_it(lambda: decode(codes, qmeta, bits, GROUP_SIZE, x.shape, torch.float32))
        else:
            shape, stride = list(x.shape), list(x.stride())
            t_unpack = b.time_it(
                lambda: torch.ops.fxlowbit.dequantize_unpack(
                    codes, qmeta, bits, GROUP_SIZE, shape, stride, torch.float32
                )
            )
    return x.nbytes / t_pack / 1e9, x.nbytes / t_unpack / 1e9


def _pack_cmp(x):
    return pack_mask_traceable(x > 0)  # cmp_mask: the comparison fuses into the packing


def mask_gbps(b: Bench) -> float:
    """``pack_mask(x > 0)`` plus ``unpack_mask``: fp32 input bytes per second of both."""
    x = b.rand(b.sizes["mask"])
    pack, unpack = b.jit(_pack_cmp), b.jit(unpack_mask_traceable)
    packed = pack(x)
    t = b.time_it(lambda: pack(x)) + b.time_it(lambda: unpack(packed, x.shape))
    return x.nbytes / t / 1e9


def gemm_quant_gbps(b: Bench, key: str) -> float:
    """The row-wise quantizer of a low-bit GEMM operand (``int8`` / ``fp8`` round to nearest,
    ``*_sr`` stochastically, hash noise included): fp32 bytes in per second. On a CPU the int8
    quantizers run as the default path runs them: the ops ``fxlowbit::quantize_int8`` and
    ``quantize_int8_sr``, which the lowered graphs call (passes/lower_linears.py), on their compiled
    CPU family (its compile waited for first; without ``compile``: the eager reference, as
    ``kernels="ops"`` runs it); fp8, and every quantizer on CUDA, run eagerly inside the op."""

    # a (rows, HIDDEN) operand; stochastic rounding draws its hash noise from a seed
    x = b.rand(b.sizes["gemm_quant"]).view(-1, HIDDEN)
    seed = torch.tensor(12345, dtype=torch.int64, device=b.device)
    sr = key.endswith("_sr")
    on_cpu = b.device.type == "cpu"
    if key.startswith("int8") and on_cpu:

        def fn(x, seed):
            if sr:
                return torch.ops.fxlowbit.quantize_int8_sr(x, seed)
            return torch.ops.fxlowbit.quantize_int8(x)

        with _cpu_family(b, lambda: fn(x, seed)):
            return x.nbytes / b.time_it(lambda: fn(x, seed)) / 1e9
    if key.startswith("int8"):

        def fn(x, seed):
            return int8_gemm.quantize_int8_rowwise(x, int8_gemm.rowwise_noise(seed, *x.shape) if sr else None)

    else:
        fmt = "e5m2" if sr else "e4m3"

        def fn(x, seed):
            return int8_gemm.quantize_fp8(x, fmt, int8_gemm.rowwise_noise(seed, *x.shape) if sr else None)

    return x.nbytes / b.time_it(lambda: fn(x, seed)) / 1e9


def linear_op_us(b: Bench) -> float:
    """Microseconds a linear pays for running as ``fxlowbit::lowbit_linear``: its forward op and
    its backward op (as a compiled graph calls them, no autograd around them) against the aten calls
    they replace (``F.linear``; ``mm``, ``mm`` and ``sum`` in the backward), every GEMM plain, on a
    (512, 256) x (256, 256) linear (the size where "auto" weighs int8 on a CPU): the difference is
    the ops' dispatch, Python and copies. Never below 0."""
    import torch.nn.functional as F

    m, n = 512, 256
    x, w, g = (
        torch.randn(m, n, device=b.device),
        torch.randn(n, n, device=b.device),
        torch.randn(m, n, device=b.device),
    )
    bias = torch.randn(n, device=b.device)
    empty_q, empty_s = x.new_empty((0,), dtype=torch.int8), x.new_empty((0,))
    ops = torch.ops.fxlowbit

    def op() -> None:
        ops.lowbit_linear(x, w, bias, "fp32", "fp32", "fp32", 0, -1)
        ops.lowbit_linear_backward(g, x, empty_q, empty_s, w, "fp32", "fp32", "fp32", 0, -1, True, True, True)

    def plain() -> None:
        F.linear(x, w, bias)
        g.mm(w), g.t().mm(x), g.sum(0)

    with torch.no_grad():
        return max(0.0, (b.time_it(op) - b.time_it(plain)) * 1e6)


def _gemm(dtype: str, m: int, n: int, k: int, device: torch.device) -> Callable[[], object]:
    # a: (M, K) @ b: (K, N); int8 and float8 as fxlowbit::lowbit_linear calls them: codes a (M, K)
    # and b (N, K) (the weight), row scales, the scale epilogue, bf16 out
    if dtype in ("int8", "float8_e4m3fn"):
        sa, sb = torch.rand(m, device=device), torch.rand(n, device=device)
        if dtype == "int8":
            a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
            b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
            return lambda: int8_gemm.int8_mm(a, b, sa, sb, None, torch.bfloat16)
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise NotImplementedError("fp8 GEMMs need CUDA sm89+ (elsewhere they are emulated)")
        a = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device=device).to(torch.float8_e4m3fn)
        return lambda: int8_gemm.fp8_mm(a, b, sa, sb, None, torch.bfloat16)
    a = torch.randn(m, k, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(k, n, device=device, dtype=getattr(torch, dtype))
    return lambda: torch.mm(a, b)


def matmul_tflops(b: Bench, dtype: str, m: int, n: int, k: int) -> float | None:
    """TFLOP/s of an (M, K) x (K, N) GEMM in ``dtype`` (``int8`` and ``float8_e4m3fn`` as
    ``fxlowbit::lowbit_linear`` runs them); None where this device does not run it."""
    try:
        fn = _gemm(dtype, m, n, k, b.device)
        fn()
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None  # dtype or shape not supported on this device: skipped
    return 2 * m * n * k / b.time_it(fn) / 1e12


def machine(device: torch.device) -> dict:
    """What the figures were measured on, without the host name."""
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {
        "system": platform.system(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_model": model or None,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def version(name: str) -> str | None:
    """The installed version of package ``name``, None if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
