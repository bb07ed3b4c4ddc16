"""Loss memory and time: output projection + cross-entropy, fused (lowbit's linear_ce) vs unfused.

One training step of the loss alone, ``F.cross_entropy(F.linear(h, w).float(), t)`` with h
(tokens, hidden) requiring grad: eager, Inductor (unfused), and ``backend="lowbit"`` (the pass
fuses it; Inductor compiles the rest), interleaved in one run. Prints a table and writes JSON:
ms per forward+backward (median), peak MB above the inputs (CUDA), saved MB, useful TFLOP/s
(6 tokens vocab hidden: forward and two backward matmuls; the fused op does one more).

    python benchmarks/linear_ce.py [--out results/linear_ce_<device>.json] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fxlowbit

SHAPES = {  # name: (tokens, hidden, vocab, dtype)
    "cuda": [
        ("gpt2", 8192, 768, 50257, torch.bfloat16),
        ("llama3-8b", 4096, 4096, 128256, torch.bfloat16),
        ("fp32", 4096, 1024, 32000, torch.float32),
    ],  # fmt: skip
    "cpu": [("small", 1024, 128, 8192, torch.float32)],
}


def loss_fn(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)


def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def measure(fn, h, w, t, reps: int) -> dict:
    dev = h.device.type
    for _ in range(2):  # compile + warm up
        torch.autograd.grad(fn(h, w, t), (h, w))
    _sync(dev)
    base = torch.cuda.memory_allocated() if dev == "cuda" else 0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = fn(h, w, t)
    saved = fxlowbit.saved_activation_bytes(loss, [h, w, t])
    torch.autograd.grad(loss, (h, w))
    del loss
    _sync(dev)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev == "cuda" else None
    times = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        torch.autograd.grad(fn(h, w, t), (h, w))
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "peak_mb": peak, "saved_mb": saved / 2**20}


def kernel_rows(shapes) -> list[dict]:
    """fwd / bwd op times on CUDA: the Triton kernels against the tiled torch (cuBLAS) path."""
    from fxlowbit.codegen.kernels import linear_ce as lce

    ops, rows = torch.ops.fxlowbit, []
    for name, n, hid, v, dtype in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        h = (torch.randn(n, hid, device="cuda", generator=g) * 0.5).to(dtype)
        w = (torch.randn(v, hid, device="cuda", generator=g) * hid**-0.5).to(dtype)
        t = torch.randint(0, v, (n,), device="cuda", generator=g)
        grad = torch.full((n,), 1.0 / n, device="cuda")
        for path in ("triton", "torch-tiles"):
            lce.FORCE_TRITON = path == "triton"
            if path == "triton":
                fwd = functools.partial(ops.linear_ce_fwd, h, w, None, t, -100, 1.0, 0.0)
                lse = fwd()[1]
                bwd = functools.partial(ops.linear_ce_bwd, grad, h, w, None, t, lse, -100, 1.0, 0.0, 0.0)
            else:
                fwd = functools.partial(lce.linear_cross_entropy_reference, h, w, None, t)
                lse = fwd()[1]
                bwd = functools.partial(lce.linear_cross_entropy_backward_reference, grad, h, w, None, t, lse)
            for phase, fn, mm in (("fwd", fwd, 1), ("bwd", bwd, 3)):
                ms = triton_bench(fn)
                rows.append(
                    {
                        "shape": name,
                        "path": path,
                        "phase": phase,
                        "ms": ms,
                        "tflops": mm * 2 * n * v * hid / ms / 1e9,
                    }
                )
        lce.FORCE_TRITON = False
    return rows


def triton_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=50)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="first shape only, fewer repetitions")
    ap.add_argument("--kernels", action="store_true", help="CUDA: also time the ops, Triton vs reference")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = SHAPES[dev][:1] if args.quick else SHAPES[dev]
    reps = 5 if args.quick else 20
    rows = []
    for name, n, hid, v, dtype in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        h = (torch.randn(n, hid, device=dev, generator=g) * 0.5).to(dtype).requires_grad_()
        w = (torch.randn(v, hid, device=dev, generator=g) * hid**-0.5).to(dtype).requires_grad_()
        t = torch.randint(0, v, (n,), device=dev, generator=g)
        t[::7] = -100
        torch._dynamo.reset()
        providers = {
            "eager": loss_fn,
            "inductor": torch.compile(loss_fn),
            "lowbit": torch.compile(loss_fn, backend="lowbit", options={"calibrate_every": 0}),
        }
        for prov, fn in providers.items():
            r = measure(fn, h, w, t, reps)
            flops = 6 * n * v * hid
            rows.append({"shape": name, "tokens": n, "hidden": hid, "vocab": v, "dtype": str(dtype)[6:],
                         "provider": prov, **r, "tflops": flops / r["ms"] / 1e9})  # fmt: skip
        base = next(r for r in rows if r["shape"] == name and r["provider"] == "inductor")
        for r in rows[-3:]:
            r["speedup_vs_inductor"] = base["ms"] / r["ms"]
    fused = fxlowbit.counters.get("linear_ce", 0)
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "linear_ce_fired": fused}  # fmt: skip
    print("| shape | provider | ms | TFLOP/s | peak MB | saved MB | speedup vs inductor |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['shape']} {r['tokens']}x{r['hidden']}x{r['vocab']} {r['dtype']} | {r['provider']} | "
              f"{r['ms']:.2f} | {r['tflops']:.2f} | {r['peak_mb'] or 0:.0f} | {r['saved_mb']:.1f} | "
              f"{r['speedup_vs_inductor']:.2f}x |")  # fmt: skip
    kernels = kernel_rows(shapes) if args.kernels and dev == "cuda" else []
    for r in kernels:
        print(f"| {r['shape']} op {r['phase']} | {r['path']} | {r['ms']:.2f} | {r['tflops']:.1f} | | | |")
    text = json.dumps(
        {"meta": meta, "rows": rows, "kernels": kernels}, indent=1, allow_nan=False, default=str
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text, file=sys.stderr if args.out is None else sys.stdout)


if __name__ == "__main__":
    main()
