"""Low-bit GEMMs against cuBLAS bf16, per shape, in one run: INT8 and FP8 GEMMs on codes, the same
with their operands' quantization, and a whole linear layer's forward + backward.

Providers per (M, N, K) = (tokens, out features, in features), ``x (M, K) @ w (N, K)^T``:

- ``bf16``: ``torch.mm`` in bf16 (cuBLAS), the baseline of every speedup;
- ``int8``: fxlowbit's Triton INT8 GEMM on int8 codes, row scales and bf16 output fused
  (``int8_gemm.int8_mm``); ``int8_int_mm``: ``torch._int_mm`` (cuBLAS int8; B column-major, as a
  linear's weight is) + the epilogue in torch;
- ``fp8``: ``torch._scaled_mm`` with row-wise scales (``int8_gemm.fp8_mm``; sm89+ only);
- ``int8+quant`` / ``fp8+quant``: both operands quantized row-wise first (round to nearest), as a
  forward GEMM of ``fxlowbit::lowbit_linear`` runs;
- ``linear_bf16`` / ``linear_int8`` / ``linear_int8_sb`` / ``linear_fp8``: forward + backward of
  ``F.linear`` vs ``lowbit_linear`` with every GEMM int8, SwitchBack's int8/int8/bf16, or fp8
  (FLOPs counted: 6 M N K).

Times are CUDA-event medians after warm-up (Triton autotuning included in the warm-up). Prints a
markdown table and JSON; ``--out`` writes it (``benchmarks/_common.write_json``).

    python benchmarks/gemm.py --out benchmarks/results/gemm_h100.json
    TRITON_INTERPRET=1 python benchmarks/gemm.py --cpu-smoke   # tiny shapes on a CPU, Triton
                                                                 # kernel in the interpreter: it runs
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from _common import meta, time_ms, write_json

from fxlowbit.codegen import ops, rng
from fxlowbit.codegen.kernels import int8_gemm as ig
from fxlowbit.codegen.kernels.lowbit_linear import lowbit_linear, lowbit_matmul
from fxlowbit.examples import sqnr_db

SHAPES = {  # (M, N, K)
    "cuda": [
        (1024, 1024, 1024),
        (8192, 1024, 4096),  # SwitchBack: int8 slower than bf16 here
        (8192, 4096, 4096),
        (16384, 14336, 4096),  # Llama-3-8B MLP up, 16k tokens
        (16384, 4096, 14336),  # and down
        (131072, 4096, 16384),  # SwitchBack: int8 1.49x faster here (A100)
    ],
    "cpu": [(64, 48, 96), (257, 129, 255)],
}
GEMM_PROVIDERS = ("bf16", "int8", "int8_int_mm", "fp8", "int8+quant", "fp8+quant")
LINEAR_PROVIDERS = ("linear_bf16", "linear_int8", "linear_int8_sb", "linear_fp8")


def _fp8_ok(device: str) -> bool:
    return device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)


def _providers(m: int, n: int, k: int, device: str):
    """(name, FLOPs, callable) per provider that runs on ``device``, plus accuracy checks."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(torch.bfloat16)
    (xq, xs), (wq, ws) = ig.quantize_int8_rowwise(x), ig.quantize_int8_rowwise(w)
    flops = 2 * m * n * k
    out = [
        ("bf16", flops, lambda: torch.mm(x, w.t())),
        ("int8", flops, lambda: ig.int8_mm(xq, wq, xs, ws, None, torch.bfloat16)),
        ("int8_int_mm", flops, lambda: ig.epilogue(torch._int_mm(xq, wq.t()), xs, ws, None, torch.bfloat16)),
        ("int8+quant", flops, lambda: lowbit_matmul(x, w, "int8")),
    ]
    fp8 = _fp8_ok(device) or device == "cpu"  # emulated on a CPU (smoke test only)
    if fp8:
        (fq, fs), (gq, gs) = ig.quantize_fp8(x), ig.quantize_fp8(w)
        out += [
            ("fp8", flops, lambda: ig.fp8_mm(fq, gq, fs, gs, None, torch.bfloat16)),
            ("fp8+quant", flops, lambda: lowbit_matmul(x, w, "fp8")),
        ]
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    stream = rng.new_stream(0)  # gradients stochastically rounded, as in training
    dy = torch.randn(m, n, device=device, generator=g, dtype=torch.bfloat16)

    def step(fmts):  # one forward + backward of the layer, formats (forward, grad-input, grad-weight)
        if fmts is None:
            return lambda: torch.autograd.grad(F.linear(xg, wg), (xg, wg), dy)
        return lambda: torch.autograd.grad(lowbit_linear(xg, wg, None, *fmts, stream=stream), (xg, wg), dy)

    linears = {"linear_bf16": None, "linear_int8": ("int8",) * 3, "linear_int8_sb": ("int8", "int8", "bf16")}
    if fp8:
        linears["linear_fp8"] = ("fp8",) * 3
    out += [(name, 3 * flops, step(fmts)) for name, fmts in linears.items()]
    ref = x.float() @ w.float().t()
    args = (xq, wq, xs, ws, None, torch.bfloat16)
    checks = {
        "int8_triton_equals_reference": torch.equal(ig.int8_mm(*args), ig.int8_mm_reference(*args)),
        "int8_sqnr_db": sqnr_db(ref, lowbit_matmul(x, w, "int8")),
        "bf16_sqnr_db": sqnr_db(ref, torch.mm(x, w.t())),
    }
    if fp8:
        checks["fp8_sqnr_db"] = sqnr_db(ref, lowbit_matmul(x, w, "fp8"))
    return out, checks


def run(device: str, shapes, reps: int) -> list[dict]:
    rows = []
    for m, n, k in shapes:
        providers, checks = _providers(m, n, k, device)
        base = {}
        for name, flops, fn in providers:
            try:
                ms = time_ms(fn, reps, warmup=3 if device == "cuda" else 1, device=device)
            except Exception as err:  # a provider this device / torch cannot run: reported, not fatal
                rows.append(
                    {"shape": [m, n, k], "provider": name, "error": f"{type(err).__name__}: {err}"[:200]}
                )
                continue
            kind = "linear" if name.startswith("linear") else "gemm"
            if name in ("bf16", "linear_bf16"):
                base[kind] = ms
            row = {"shape": [m, n, k], "provider": name, "ms": ms, "tflops": flops / ms / 1e9}
            row["speedup_vs_bf16"] = base[kind] / ms if kind in base else None
            rows.append({**row, "checks": checks} if name == "bf16" else row)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| M x N x K | provider | ms | TFLOP/s | vs bf16 |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        if "error" in r:
            lines.append(f"| {shape} | {r['provider']} | - | - | {r['error'][:40]} |")
            continue
        speed = f"{r['speedup_vs_bf16']:.2f}x" if r["speedup_vs_bf16"] else "-"
        lines.append(f"| {shape} | {r['provider']} | {r['ms']:.3f} | {r['tflops']:.1f} | {speed} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on a CPU: the script runs")
    p.add_argument("--reps", type=int, default=None, help="timed repeats per figure (default 50; smoke 3)")
    args = p.parse_args(argv)
    device = "cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.cpu_smoke:
        p.error("no CUDA device: this benchmark is for GPUs (use --cpu-smoke to check it runs)")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        ops.FORCE_TRITON = True  # the int8 provider runs the Triton kernel in the interpreter
    rows = run(device, SHAPES[device], args.reps or (3 if args.cpu_smoke else 50))
    setup = "CUDA events, median; bf16 inputs; int8 codes via fxlowbit's Triton kernel (autotuned)"
    if device == "cpu":
        setup = "CPU smoke run: tiny shapes, fp8 emulated, timings meaningless"
    result = {"meta": meta(args, setup), "rows": rows}
    print(table(rows))
    print(
        json.dumps(
            {"checks": {"x".join(map(str, r["shape"])): r["checks"] for r in rows if "checks" in r}},
            default=str,
        )
    )
    write_json(args.out, result)
    failed = [r for r in rows if r.get("checks", {}).get("int8_triton_equals_reference") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
