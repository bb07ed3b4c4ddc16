"""``python -m fxlowbit.profile --out FILE``: measure this machine for the cost model.

Times the kernels a lowbit plan adds to a training step and writes them as a JSON
:class:`~fxlowbit.costmodel.HardwareProfile` (load it with ``load_profile(FILE)``), then prints a
summary table. Each figure is the median of several timed repeats after warm-up:

- copy / pointwise: ``dst.copy_(src)`` and a compiled LayerNorm-style ``(x - m) * r * w + b``
  (how recompute runs), fp32 bytes read + written per second;
- pack / unpack at 2, 4, 8 bits: the quantizer as the backend runs it under Inductor (the traceable
  pure-torch functions, compiled), fp32 bytes in (pack) / out (unpack) per second;
- mask: ``pack_mask(x > 0)`` plus ``unpack_mask``, fp32 input bytes per second of both;
- matmul: TFLOP/s per dtype and GEMM size bucket (one shape per bucket). ``int8`` and
  ``float8_e4m3fn`` time the low-bit GEMMs as ``fxlowbit::lowbit_linear`` runs them, on codes
  already quantized, scale epilogue included: ``int8_mm`` (Triton on CUDA, ``torch._int_mm`` on a
  CPU) and ``fp8_mm`` (``torch._scaled_mm`` with row-wise scales; CUDA sm89+ only). B is the
  (N, K) weight, i.e. column-major for the GEMM, as a linear layer hands it over;
- gemm_quant: the row-wise quantizers of low-bit GEMM operands (codegen/kernels/int8_gemm.py), fp32
  bytes in per second: ``int8`` / ``fp8`` round to nearest (forward operands), ``int8_sr`` /
  ``fp8_sr`` round stochastically (gradients, hash noise included);
- launch: one tiny op, in microseconds.

    fxlowbit-profile --out my.json     # 2-core CPU: ~40 s, ~1.5 min with a cold Inductor cache
    python -m fxlowbit.profile --quick --out /tmp/p.json     # ~5 s: small sizes, no compile
    python -m fxlowbit.profile --from-device-check DIR --out fxlowbit/profiles/   # <device>.json
    # ^ a benchmarks/device_check.py folder: this profile plus its kernel and GEMM figures
    #   (fxlowbit/profile_merge.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from fxlowbit.codegen.kernels import int8_gemm
from fxlowbit.codegen.kernels.bitmask import pack_mask_traceable, unpack_mask_traceable
from fxlowbit.codegen.kernels.quant import BITS, dequantize_unpack_traceable, quantize_pack_traceable
from fxlowbit.costmodel import BUCKETS, HardwareProfile

__all__ = ["measure", "main", "format_table", "GEMMS"]

GROUP_SIZE = 256  # LowbitConfig's default group size
HIDDEN = 1024  # last dimension of the pointwise input (its per-column weight and bias)

# fp32 elements per bandwidth figure: large enough to leave the caches (quick: small, for tests)
SIZES = {
    "cpu": {"copy": 1 << 25, "pointwise": 1 << 24, "quant": 1 << 24, "mask": 1 << 24, "gemm_quant": 1 << 22},
    "cuda": {"copy": 1 << 28, "pointwise": 1 << 27, "quant": 1 << 26, "mask": 1 << 27, "gemm_quant": 1 << 26},
    "quick": {"copy": 1 << 20, "pointwise": 1 << 18, "quant": 1 << 16, "mask": 1 << 18,
              "gemm_quant": 1 << 14},
}  # fmt: skip
# (M, N, K) per GEMM bucket, 2*M*N*K inside the bucket; the CPU's "large" stays near its floor
GEMMS = {
    "cpu": {"tiny": (64, 64, 128), "small": (256, 256, 512), "medium": (1024, 1024, 1024),
            "large": (2048, 2048, 2624)},
    "cuda": {"tiny": (64, 64, 128), "small": (256, 256, 512), "medium": (4096, 1024, 1024),
             "large": (8192, 8192, 8192)},
}  # fmt: skip
DTYPES = {
    "cpu": ("float32", "bfloat16", "int8"),
    "cuda": ("float32", "bfloat16", "float16", "int8", "float8_e4m3fn"),
}
GEMM_QUANT = ("int8", "int8_sr", "fp8", "fp8_sr")  # HardwareProfile.gemm_quant_gbps keys
BUDGET_S = {False: 1.0, True: 0.05}  # timed seconds per figure (quick: True)
MIN_SAMPLE_S = 2e-3  # a timed sample repeats the call until it lasts this long


def _timer(sync: Callable[[], None], budget: float) -> Callable[[Callable[[], object]], float]:
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


def _pointwise(x, m, r, w, b):
    # x: (rows, H); m, r: (rows, 1); w, b: (H,) -- a LayerNorm output recomputed in the backward
    return (x - m) * r * w + b


def _pack_cmp(x):
    return pack_mask_traceable(x > 0)  # cmp_mask: the comparison fuses into the packing


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


def _machine(device: torch.device) -> dict:
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


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def measure(
    device: str = "cpu",
    quick: bool = False,
    threads: int | None = None,
    progress: bool = True,
    compile: bool | None = None,
) -> HardwareProfile:
    """Measure ``device`` ("cpu" or "cuda") and return its profile (``measured=True``).

    ``quick``: small tensors and short timings (seconds; figures are noisy); ``threads``: CPU
    threads for the run (restored afterwards); ``compile``: run the pointwise, quantizer and mask
    functions through ``torch.compile`` as the backend does (default: not ``quick``; cold Inductor
    compilation alone takes ~30 s on 2 CPU cores). Example::

        profile = measure("cpu", quick=True, progress=False)
        profile.save("cpu.json")
    """
    from tqdm import tqdm

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("fxlowbit profile: device 'cuda' requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"fxlowbit profile: device must be 'cpu' or 'cuda', got {device!r}")
    kind = dev.type
    compile = not quick if compile is None else compile
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    sizes = SIZES["quick" if quick else kind]
    gemms = GEMMS[kind]
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    time_it = _timer(sync, BUDGET_S[quick])
    jit = (lambda fn: torch.compile(fn, fullgraph=True, dynamic=False)) if compile else (lambda fn: fn)
    results: dict = {}

    def rand(n: int) -> torch.Tensor:
        return torch.randn(n, device=dev)

    def copy():
        src = rand(sizes["copy"])
        dst = torch.empty_like(src)
        return 2 * src.nbytes / time_it(lambda: dst.copy_(src)) / 1e9

    def pointwise():
        x = rand(sizes["pointwise"]).view(-1, HIDDEN)
        m, r, w, b = rand(x.shape[0])[:, None], rand(x.shape[0])[:, None], rand(HIDDEN), rand(HIDDEN)
        fn = jit(_pointwise)
        return 2 * x.nbytes / time_it(lambda: fn(x, m, r, w, b)) / 1e9

    def quant(bits: int):
        x, seed = rand(sizes["quant"]), torch.tensor(12345, dtype=torch.int64, device=dev)
        pack, unpack = jit(quantize_pack_traceable), jit(dequantize_unpack_traceable)
        codes, qmeta = pack(x, seed, bits, GROUP_SIZE)
        t_pack = time_it(lambda: pack(x, seed, bits, GROUP_SIZE))
        t_unpack = time_it(lambda: unpack(codes, qmeta, bits, GROUP_SIZE, x.shape, torch.float32))
        results["pack_gbps", bits] = x.nbytes / t_pack / 1e9
        results["unpack_gbps", bits] = x.nbytes / t_unpack / 1e9

    def mask():
        x = rand(sizes["mask"])
        pack, unpack = jit(_pack_cmp), jit(unpack_mask_traceable)
        packed = pack(x)
        t = time_it(lambda: pack(x)) + time_it(lambda: unpack(packed, x.shape))
        return x.nbytes / t / 1e9

    def matmul(dtype: str, name: str):
        m, n, k = gemms[name]
        try:
            fn = _gemm(dtype, m, n, k, dev)
            fn()
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            return  # dtype or shape not supported on this device: skipped
        results.setdefault("matmul", {}).setdefault(dtype, {})[name] = 2 * m * n * k / time_it(fn) / 1e12

    def gemm_quant(key: str):
        # a (rows, HIDDEN) operand; stochastic rounding draws its hash noise from a seed
        x = rand(sizes["gemm_quant"]).view(-1, HIDDEN)
        seed = torch.tensor(12345, dtype=torch.int64, device=dev)
        noise = (lambda: int8_gemm.rowwise_noise(seed, *x.shape)) if key.endswith("_sr") else (lambda: None)
        if key.startswith("int8"):
            fn = lambda: int8_gemm.quantize_int8_rowwise(x, noise())  # noqa: E731
        else:
            fmt = "e5m2" if key.endswith("_sr") else "e4m3"
            fn = lambda: int8_gemm.quantize_fp8(x, fmt, noise())  # noqa: E731
        results.setdefault("gemm_quant", {})[key] = x.nbytes / time_it(fn) / 1e9

    def launch():
        a, b = torch.ones(1, device=dev), torch.ones(1, device=dev)
        return time_it(lambda: torch.add(a, b)) * 1e6

    steps: list[tuple[str, Callable]] = [("launch", launch), ("copy", copy), ("pointwise", pointwise)]
    steps += [(f"quant {b}-bit", lambda b=b: quant(b)) for b in BITS]
    steps += [("mask", mask)]
    steps += [(f"gemm quant {key}", lambda key=key: gemm_quant(key)) for key in GEMM_QUANT]
    steps += [
        (f"matmul {dt} {name}", lambda dt=dt, name=name: matmul(dt, name))
        for dt in DTYPES[kind]
        for name, _ in BUCKETS
    ]
    try:
        with torch.no_grad():
            bar = tqdm(steps, desc="profile", disable=not progress, file=sys.stderr, leave=False)
            for label, step in bar:
                bar.set_postfix_str(label)
                value = step()
                if value is not None:
                    results[label] = value
    finally:
        torch.set_num_threads(old_threads)

    sig = lambda v: float(f"{v:.4g}")  # noqa: E731
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "machine": _machine(dev),
        "threads": torch.get_num_threads() if threads is None else threads,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "quick": quick,
        "compiled": compile,  # pointwise, quantizer and mask run through torch.compile (Inductor)
        "command": f"fxlowbit.profile.measure(device={device!r}, quick={quick}, threads={threads})",
        # fp32 elements per bandwidth figure; (M, N, K) per matmul bucket
        "sizes": {
            **sizes,
            "group_size": GROUP_SIZE,
            "hidden": HIDDEN,
            "matmul": {k: list(v) for k, v in gemms.items()},
        },
        "mask_input": "float32: pack_mask(x > 0) then unpack_mask (bool); fp32 bytes / both times",
    }
    return HardwareProfile(
        device=torch.cuda.get_device_name(dev) if kind == "cuda" else "cpu",
        kind=kind,
        measured=True,
        copy_gbps=sig(results["copy"]),
        pointwise_gbps=sig(results["pointwise"]),
        pack_gbps={b: sig(results["pack_gbps", b]) for b in BITS},
        unpack_gbps={b: sig(results["unpack_gbps", b]) for b in BITS},
        mask_gbps=sig(results["mask"]),
        matmul_tflops={dt: {k: sig(v) for k, v in t.items()} for dt, t in results["matmul"].items()},
        launch_us=sig(results["launch"]),
        meta=meta,
        gemm_quant_gbps={k: sig(v) for k, v in results["gemm_quant"].items()},
    )


def format_table(profile: HardwareProfile) -> str:
    """The profile as two markdown tables (bandwidths, then matmul TFLOP/s per bucket)."""
    meta, names = profile.meta, [name for name, _ in BUCKETS]
    machine, sizes = meta.get("machine", {}), meta.get("sizes", {})
    where = machine.get("gpu") or machine.get("cpu_model") or machine.get("processor") or profile.kind

    def row(label: str, value: str, size: str = "") -> str:
        n = sizes.get(size)
        return f"| {label} | {value} | {f'{n / 2**20:g} Mi' if isinstance(n, int) else '-'} |"

    about = [
        where,
        f"{meta['threads']} threads" if "threads" in meta else "",
        f"torch {meta['torch']}" if "torch" in meta else "",
        "compiled" if meta.get("compiled") else "",
    ]
    lines = [
        f"fxlowbit profile: {profile.device}, {'measured' if profile.measured else 'ESTIMATED'}"
        f" {meta.get('date', '')}",
        ", ".join(a for a in about if a),
        "",
        "| figure | GB/s | fp32 elements |",
        "| --- | ---: | ---: |",
        row("copy", f"{profile.copy_gbps:.4g}", "copy"),
        row("pointwise", f"{profile.pointwise_gbps:.4g}", "pointwise"),
    ]
    for b in sorted(profile.pack_gbps):
        figures = f"{profile.pack_gbps[b]:.4g} / {profile.unpack_gbps[b]:.4g}"
        lines.append(row(f"pack {b}-bit / unpack", figures, "quant"))
    lines.append(row("mask (pack + unpack)", f"{profile.mask_gbps:.4g}", "mask"))
    for key, v in profile.gemm_quant_gbps.items():
        lines.append(row(f"GEMM operand quant {key}", f"{v:.4g}", "gemm_quant"))
    lines.append(row("launch (us)", f"{profile.launch_us:.3g}"))
    lines += ["", f"| matmul TFLOP/s | {' | '.join(names)} |", "| --- |" + " ---: |" * len(names)]
    for dtype, table in profile.matmul_tflops.items():
        cells = [f"{table[n]:.4g}" if n in table else "-" for n in names]
        lines.append(f"| {dtype} | {' | '.join(cells)} |")
    shapes = sizes.get("matmul", {})
    if shapes:
        lines.append(
            "M x N x K: " + ", ".join(f"{n} {'x'.join(map(str, shapes[n]))}" for n in names if n in shapes)
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fxlowbit-profile", description=__doc__.split("\n")[0].strip("`: "))
    p.add_argument("--out", required=True, help="JSON file to write the profile to (or a folder)")
    p.add_argument("--from-device-check", metavar="DIR", help="merge a device-check folder")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--quick", action="store_true", help="small sizes, short timings, no compile (tests)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile pointwise/quant/mask with Inductor (default: yes unless --quick)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.from_device_check:
        from fxlowbit.profile_merge import from_device_check, profile_path

        profile = from_device_check(args.from_device_check)
        out = profile_path(args.out, profile)
        profile.save(out)
        print(f"{format_table(profile)}\n\nwrote {out}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fxlowbit-profile: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    profile = measure(args.device, args.quick, args.threads, not args.no_progress, args.compile)
    meta = {**profile.meta, "command": shlex.join(["python", "-m", "fxlowbit.profile", *argv])}
    profile = dataclasses.replace(profile, meta=meta)
    profile.save(args.out)
    print(format_table(profile))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
