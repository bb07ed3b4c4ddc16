"""``python -m fxlowbit.profile --out FILE``: measure this machine for the cost model.

Times the kernels a lowbit plan adds to a training step and writes them as a JSON
:class:`~fxlowbit.costmodel.HardwareProfile` (load it with ``load_profile(FILE)``), then prints a
summary table. Each figure is the median of several timed repeats after warm-up:

- copy / pointwise: ``dst.copy_(src)`` and a compiled LayerNorm-style ``(x - m) * r * w + b``
  (how recompute runs), fp32 bytes read + written per second;
- pack / unpack at 2, 4, 8 bits: the quantizer as the backend runs it at default options
  (``fxlowbit::quantize_pack``: Triton on CUDA, the compiled CPU kernel on a CPU; the unpack the op on
  CUDA, the traced decode under Inductor on a CPU), fp32 bytes in (pack) / out (unpack) per second;
- mask: ``pack_mask(x > 0)`` plus ``unpack_mask``, fp32 input bytes per second of both;
- matmul: TFLOP/s per dtype and GEMM size bucket (one shape per bucket). ``int8`` and
  ``float8_e4m3fn`` time the low-bit GEMMs as ``fxlowbit::lowbit_linear`` runs them, on codes
  already quantized, scale epilogue included: ``int8_mm`` (Triton on CUDA, ``torch._int_mm`` on a
  CPU) and ``fp8_mm`` (``torch._scaled_mm`` with row-wise scales; CUDA sm89+ only). B is the
  (N, K) weight, i.e. column-major for the GEMM, as a linear layer hands it over;
- gemm_quant: the row-wise quantizers of low-bit GEMM operands (codegen/kernels/int8_gemm.py), fp32
  bytes in per second: ``int8`` / ``fp8`` round to nearest (forward operands), ``int8_sr`` /
  ``fp8_sr`` round stochastically (gradients, hash noise included);
- launch: one tiny op, in microseconds;
- linear op: what a linear pays for running as ``fxlowbit::lowbit_linear`` (its forward and
  backward ops against the aten calls they replace, every GEMM plain, on a 512x256x256 linear), in
  microseconds; ``gemm="auto"`` weighs it against what the low-bit GEMMs save.

One function per figure measures it (fxlowbit/profile_bench.py); :func:`measure` runs them in turn.

    fxlowbit-profile --save            # this machine's profile, which the default options then use
    fxlowbit-profile --out my.json     # 2-core CPU: ~40 s, ~1.5 min with a cold Inductor cache
    # (35 s at --threads 1 with the pack kernels already compiled, 2026-12-06; a machine's first
    # run also compiles its three CPU pack kernels, about 16 s each on 2 cores, 2026-12-05)
    python -m fxlowbit.profile --quick --out /tmp/p.json     # ~5 s: small sizes, no compile
    python -m fxlowbit.profile --from-device-check DIR --out fxlowbit/profiles/   # <device>.json
    # ^ a benchmarks/device_check.py folder: this profile plus its kernel and GEMM figures
    #   (fxlowbit/profile_merge.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fxlowbit import hardware
from fxlowbit import profile_bench as bench
from fxlowbit.codegen.kernels.quant import BITS
from fxlowbit.costmodel import BUCKETS, HardwareProfile

__all__ = ["measure", "main", "format_table", "GEMMS"]

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
    sizes, gemms = SIZES["quick" if quick else kind], GEMMS[kind]
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    b = bench.Bench(dev, sizes, bench.timer(sync, BUDGET_S[quick]), compile)
    # (progress label, the figure's place in the profile, its measurement), in measuring order
    steps: list[tuple[str, tuple, Callable[[], object]]] = [
        ("launch", ("launch_us",), lambda: bench.launch_us(b)),
        ("linear op", ("linear_op_us",), lambda: bench.linear_op_us(b)),
        ("copy", ("copy_gbps",), lambda: bench.copy_gbps(b)),
        ("pointwise", ("pointwise_gbps",), lambda: bench.pointwise_gbps(b)),
        *((f"quant {n}-bit", ("quant", n), lambda n=n: bench.quant_gbps(b, n)) for n in BITS),
        ("mask", ("mask_gbps",), lambda: bench.mask_gbps(b)),
        *((f"gemm quant {key}", ("gemm_quant_gbps", key), lambda key=key: bench.gemm_quant_gbps(b, key))
          for key in GEMM_QUANT),
        *((f"matmul {dt} {name}", ("matmul_tflops", dt, name),
           lambda dt=dt, name=name: bench.matmul_tflops(b, dt, *gemms[name]))
          for dt in DTYPES[kind] for name, _ in BUCKETS),
    ]  # fmt: skip
    figures: dict[tuple, Any] = {}
    try:
        with torch.no_grad():
            bar = tqdm(steps, desc="profile", disable=not progress, file=sys.stderr, leave=False)
            for label, key, step in bar:
                bar.set_postfix_str(label)
                value = step()
                if value is not None:  # None: not supported on this device
                    figures[key] = value
    finally:
        torch.set_num_threads(old_threads)
    command = f"fxlowbit.profile.measure(device={device!r}, quick={quick}, threads={threads})"
    return _profile(dev, _nested(figures), _meta(dev, sizes, gemms, quick, threads, compile, command))


def _meta(
    dev: torch.device, sizes: dict, gemms: dict, quick: bool, threads: int | None, compile: bool, command: str
) -> dict:
    """What the figures were measured on and how (the profile's ``meta``)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": bench.version("triton"),
        "python": platform.python_version(),
        "machine": bench.machine(dev),
        "threads": torch.get_num_threads() if threads is None else threads,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "quick": quick,
        "compiled": compile,  # pointwise, quantizer and mask run through torch.compile (Inductor)
        "command": command,
        # fp32 elements per bandwidth figure; (M, N, K) per matmul bucket
        "sizes": {
            **sizes,
            "group_size": bench.GROUP_SIZE,
            "hidden": bench.HIDDEN,
            "matmul": {k: list(v) for k, v in gemms.items()},
        },
        "mask_input": "float32: pack_mask(x > 0) then unpack_mask (bool); fp32 bytes / both times",
    }


def _nested(figures: dict[tuple, Any]) -> dict[str, Any]:
    """``{("a", "b"): v}`` as ``{"a": {"b": v}}``, in measuring order."""
    out: dict = {}
    for path, value in figures.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _profile(dev: torch.device, figures: dict[str, Any], meta: dict) -> HardwareProfile:
    """The profile of the measured ``figures``, each to 4 significant digits."""
    sig = lambda v: float(f"{v:.4g}")  # noqa: E731
    return HardwareProfile(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        kind=dev.type,
        measured=True,
        copy_gbps=sig(figures["copy_gbps"]),
        pointwise_gbps=sig(figures["pointwise_gbps"]),
        pack_gbps={n: sig(figures["quant"][n][0]) for n in BITS},
        unpack_gbps={n: sig(figures["quant"][n][1]) for n in BITS},
        mask_gbps=sig(figures["mask_gbps"]),
        matmul_tflops={dt: {k: sig(v) for k, v in t.items()} for dt, t in figures["matmul_tflops"].items()},
        launch_us=sig(figures["launch_us"]),
        meta=meta,
        gemm_quant_gbps={k: sig(v) for k, v in figures["gemm_quant_gbps"].items()},
        linear_op_us=sig(figures.get("linear_op_us", 0.0)),
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
    lines.append(row("lowbit_linear op call (us)", f"{profile.linear_op_us:.3g}"))
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
    p.add_argument("--out", help="JSON file to write the profile to (or a folder, with --from-device-check)")
    p.add_argument(
        "--save",
        action="store_true",
        help="also keep it as this machine's profile, which the default options (profile=None) then "
        f"plan with (folder: ${hardware.PROFILE_DIR_ENV} or ~/.cache/fxlowbit/profiles)",
    )
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
    args = p.parse_args(argv)
    if not args.out and not args.save:
        p.error("say where the profile goes: --out FILE, --save, or both")
    if args.save and (args.quick or args.from_device_check):
        p.error(
            "--save keeps the profile the default options plan with on this machine: measure it "
            "in full here (not --quick, not --from-device-check)"
        )
    return args


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
    print(format_table(profile))
    if args.out:
        profile.save(args.out)
        print(f"\nwrote {args.out}")
    if args.save:
        path = hardware.saved_profile_path(args.device, profile.meta.get("threads"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        profile.save(tmp)
        tmp.replace(path)  # a process reading the folder never sees half a file
        threads = "" if args.device == "cuda" else f" at {profile.meta.get('threads')} torch thread(s)"
        print(f"\nsaved {path}: the default options plan with it on this machine{threads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
