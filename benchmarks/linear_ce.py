"""Loss memory and time: output projection + cross-entropy, fused (lowbit's linear_ce) vs unfused.

One training step of the head and loss alone, ``F.cross_entropy(F.linear(h, w).float(), t)`` with
h (tokens, hidden) and w (vocab, hidden) requiring grad and every 7th target ignored
(``--ignore-every``; the fused op skips ignored tokens' GEMM rows, the unfused loss cannot): eager,
Inductor (unfused), and ``backend="lowbit"`` with the planner off (the pass fuses the loss, Inductor
compiles the rest), rows interleaved in one run. Prints a table and writes JSON: ms per forward +
backward (median and interquartile range), the paired ratio to Inductor's time (median and IQR of
the per-round ratios), saved MB and how many times fewer than Inductor, peak MB above the inputs
(CUDA), useful TFLOP/s (6 tokens vocab hidden: the forward and two backward matmuls). CPU runs
use one thread (``--threads``).

``--llama``: the issue's model check instead: a ``transformers`` Llama (2 layers, hidden 128, vocab
16384, batch 8 x 128) training step at default options (Inductor inner) against the same with
``passes={"linear_ce": False}``; the largest saved tensor and the step time ratio.

    python benchmarks/linear_ce.py [--out results/linear_ce_<device>.json] [--quick] [--reps 7]
    python benchmarks/linear_ce.py --llama [--out results/linear_ce_llama_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys

import torch
import torch.nn.functional as F
from _common import causal_lm, git_commit, quartiles, sync, table_from_json, time_ms, write_json

import fxlowbit
from fxlowbit.memory import saved_tensors

SHAPES = {  # name: (tokens, hidden, vocab, dtype)
    "cuda": [
        ("gpt2", 8192, 768, 50257, torch.bfloat16),
        ("llama3-8b", 4096, 4096, 128256, torch.bfloat16),
        ("small", 8192, 128, 8192, torch.bfloat16),
        ("fp32", 4096, 1024, 32000, torch.float32),
    ],  # fmt: skip
    "cpu": [
        ("small", 8192, 128, 8192, torch.float32),
        ("small", 8192, 128, 8192, torch.bfloat16),
        ("llama2", 8192, 256, 32000, torch.float32),
        ("llama2", 8192, 256, 32000, torch.bfloat16),
        ("gpt2", 8192, 768, 50257, torch.float32),
        ("gpt2", 8192, 768, 50257, torch.bfloat16),
    ],
}
LOWBIT = {"calibrate_every": 0, "passes": {"plan": False}}  # the fusion alone


def loss_fn(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)


def _memory(fn, args, exclude) -> tuple[float | None, float]:
    """(peak MB above the inputs on CUDA, else None; MB saved for the backward)."""
    dev = args[0].device.type
    sync(dev)
    base = torch.cuda.memory_allocated() if dev == "cuda" else 0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = fn(*args)
    saved = fxlowbit.saved_activation_bytes(loss, exclude)
    loss.backward()
    del loss
    sync(dev)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev == "cuda" else None
    return peak, saved / 2**20


def _summary(times: dict[str, list[float]], base: str) -> dict[str, dict]:
    out = {}
    for k, ts in times.items():
        q1, med, q3 = quartiles(ts)
        r1, rmed, r3 = quartiles([a / b for a, b in zip(ts, times[base], strict=True)])
        out[k] = {"ms": med, "ms_q1": q1, "ms_q3": q3, "ratio_vs_" + base: rmed,
                  "ratio_q1": r1, "ratio_q3": r3, "times_ms": ts}  # fmt: skip
    return out


def head_rows(
    shapes, reps: int, ignore_every: int = 7, providers=("eager", "inductor", "lowbit")
) -> list[dict]:
    rows = []
    for name, n, hid, v, dtype in shapes:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator(device=dev).manual_seed(0)
        h = (torch.randn(n, hid, device=dev, generator=g) * 0.5).to(dtype).requires_grad_()
        w = (torch.randn(v, hid, device=dev, generator=g) * hid**-0.5).to(dtype).requires_grad_()
        t = torch.randint(0, v, (n,), device=dev, generator=g)
        if ignore_every:
            t[::ignore_every] = -100
        torch._dynamo.reset()
        fxlowbit.reset()
        fns = {"eager": loss_fn, "inductor": torch.compile(loss_fn),
               "lowbit": torch.compile(loss_fn, backend="lowbit", options=LOWBIT)}  # fmt: skip
        fns = {k: fn for k, fn in fns.items() if k in providers or k == "inductor"}
        steps = {k: functools.partial(_step, fn, h, w, t) for k, fn in fns.items()}
        mem = {}
        for k in fns:  # compile, warm up, then the memory of one more step
            for _ in range(2):
                steps[k]()
            mem[k] = _memory(fns[k], (h, w, t), [h, w, t])
        # ms of each step, one of each per round, the order rotating between rounds
        summary = _summary(time_ms(steps, reps, device=dev, reduce=None), "inductor")
        for k in fns:
            peak, saved = mem[k]
            s = summary[k]
            rows.append({"shape": name, "tokens": n, "hidden": hid, "vocab": v, "dtype": str(dtype)[6:],
                         "provider": k, **s, "speedup_vs_inductor": 1 / s["ratio_vs_inductor"],
                         "peak_mb": peak, "saved_mb": saved,
                         "saved_fewer_than_inductor": mem["inductor"][1] / saved,
                         "tflops": 6 * n * v * hid / s["ms"] / 1e9})  # fmt: skip
        rows[-1]["linear_ce_fused"] = fxlowbit.counters.get("linear_ce", 0)
        for r in rows[-len(fns) :]:
            r["ignored_every"] = ignore_every
        _print_rows(rows[-len(fns) :], header=len(rows) == len(fns))
        del h, w, t, fns, steps
    return rows


def _step(fn, h, w, t):
    h.grad = w.grad = None
    fn(h, w, t).backward()


HEAD_COLUMNS = (
    "| shape | provider | ms (IQR) | vs inductor (IQR) | TFLOP/s | peak MB | saved MB | fewer saved |"
)
LLAMA_COLUMNS = (
    "| model | run | ms (IQR) | vs linear_ce off (IQR) | saved MB | largest saved numel "
    "| tokens x vocab saved |"
)


def _head_line(r: dict) -> str:
    peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
    return (f"| {r['shape']} {r['tokens']}x{r['hidden']}x{r['vocab']} {r['dtype']} | {r['provider']} | "
            f"{r['ms']:.1f} ({r['ms_q1']:.1f}-{r['ms_q3']:.1f}) | {r['ratio_vs_inductor']:.3f}x "
            f"({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}) | {r['tflops']:.3f} | {peak} | "
            f"{r['saved_mb']:.1f} | {r['saved_fewer_than_inductor']:.1f}x |")  # fmt: skip


def _llama_line(r: dict) -> str:
    ratio = r["ratio_vs_lowbit linear_ce off"]
    return (f"| llama {r['tokens']} tokens | {r['provider']} | "
            f"{r['ms']:.1f} ({r['ms_q1']:.1f}-{r['ms_q3']:.1f}) | {ratio:.3f}x "
            f"({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}) | {r['saved_mb']:.2f} | {r['largest_saved_numel']} | "
            f"{r['tokens_x_vocab_saved']} |")  # fmt: skip


def _print_rows(rows, header: bool) -> None:
    if header:
        print(HEAD_COLUMNS + "\n" + "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(_head_line(r), flush=True)


def table(result: dict) -> str:
    """Markdown of a result: how it was measured, then the table."""
    m = result["meta"]
    lines = [f"`{m['command']}`: commit {m['commit']}, {m['date']}, {m['device']}, torch {m['torch']}, "
             f"{m['threads']} thread(s), {m['reps']} interleaved rounds; medians, interquartile ranges "
             "in brackets, ratios paired per round.", ""]  # fmt: skip
    llama = "model" in result["rows"][0]
    lines += [LLAMA_COLUMNS if llama else HEAD_COLUMNS, "| --- | --- | ---: | ---: | ---: | ---: | --- |"
              if llama else "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    lines += [(_llama_line if llama else _head_line)(r) for r in result["rows"]]
    return "\n".join(lines) + "\n"


def kernel_rows(shapes) -> list[dict]:
    """fwd / bwd op times on CUDA (mean ms of 10 calls after 3, L2 flushed before each): the recompute
    path's Triton kernels against its tiled torch (cuBLAS) path, and the forward-gradient op (the
    default)."""
    from fxlowbit.codegen.kernels import linear_ce as lce
    from fxlowbit.codegen.kernels import linear_ce_grad as lcg

    ops, rows = torch.ops.fxlowbit, []
    bench = functools.partial(time_ms, reps=10, warmup=3, reduce="mean", device="cuda", flush_l2=True)
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
                ms = bench(fn)
                rows.append({"shape": name, "path": path, "phase": phase, "ms": ms,
                             "tflops": mm * 2 * n * v * hid / ms / 1e9})  # fmt: skip
        lce.FORCE_TRITON = False
        fg = functools.partial(lcg.linear_ce_grad_reference, h, w, None, t)
        ms = bench(fg)
        rows.append({"shape": name, "path": "forward-gradient", "phase": "fwd+grads", "ms": ms,
                     "tflops": 3 * 2 * n * v * hid / ms / 1e9})  # fmt: skip
    return rows


LLAMA = dict(vocab_size=16384, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, intermediate_size=512, max_position_embeddings=128,
             use_cache=False)  # fmt: skip


WARMUP = 15
LLAMA_VARIANTS = {"lowbit defaults": {}, "lowbit linear_ce off": {"passes": {"linear_ce": False}}}


def llama_rows(reps: int, batch: int = 8, seq: int = 128) -> list[dict]:
    """The Llama step at default options, with and without the fusion (Inductor inner)."""
    from fxlowbit import examples

    data = examples.stdlib_text()
    batches = list(examples.char_batches(data, batch, seq, steps=4, seed=0))
    variants = LLAMA_VARIANTS
    steps, info = {}, {}
    for k, opts in variants.items():
        model = causal_lm("llama", **LLAMA)
        torch._dynamo.reset()
        fxlowbit.reset()
        compiled = torch.compile(model, backend="lowbit", options=opts)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        state = {"i": 0}

        def step(compiled=compiled, opt=opt, state=state):
            idx = batches[state["i"] % len(batches)][0]
            state["i"] += 1
            compiled(input_ids=idx, labels=idx).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(WARMUP):  # compile, and the first probe and re-plan (step 10) before timing
            step()
        idx = batches[0][0]
        loss = compiled(input_ids=idx, labels=idx).loss
        shapes = [tuple(s.shape) for s in saved_tensors(loss)]
        info[k] = {"saved_mb": fxlowbit.saved_activation_bytes(loss, model.parameters()) / 2**20,
                   "largest_saved_numel": max(int(torch.Size(s).numel()) for s in shapes),
                   "tokens_x_vocab_saved": any(torch.Size(s).numel() in (batch * seq * 16384,
                                                                           batch * (seq - 1) * 16384)
                                               for s in shapes),
                   "linear_ce_fused": fxlowbit.counters.get("linear_ce", 0)}  # fmt: skip
        loss.backward()
        opt.zero_grad(set_to_none=True)
        steps[k] = step
    summary = _summary(time_ms(steps, reps, reduce=None), "lowbit linear_ce off")
    rows = []
    for k in variants:
        rows.append(
            {"model": "llama", "tokens": batch * seq, **LLAMA, "provider": k, **summary[k], **info[k]}
        )
        print(_llama_line(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="first shape only, fewer repetitions")
    ap.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 7; 3 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--only", default=None, help="comma-separated shape names")
    ap.add_argument("--ignore-every", type=int, default=7, help="every n-th target ignored (0: none)")
    ap.add_argument("--providers", default="eager,inductor,lowbit", help="inductor is always timed")
    ap.add_argument("--llama", action="store_true", help="the transformers Llama check instead of the heads")
    ap.add_argument("--kernels", action="store_true", help="CUDA: also time the ops")
    ap.add_argument("--table", default=None, help="write the .md table of this result JSON and stop")
    args = ap.parse_args(argv)
    if args.table:
        table_from_json(args.table, table)
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 7)
    shapes = [s for s in SHAPES[dev] if args.only is None or s[0] in args.only.split(",")]
    shapes = shapes[:1] if args.quick else shapes
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "reps": reps, "commit": git_commit(short=True),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/linear_ce.py", *(argv or sys.argv[1:])]),
            "lowbit_options": LLAMA_VARIANTS if args.llama else LOWBIT}  # fmt: skip
    if args.llama:
        print(LLAMA_COLUMNS + "\n| --- | --- | ---: | ---: | ---: | ---: | --- |")
        result = {"meta": meta, "rows": llama_rows(reps)}
    else:
        rows = head_rows(shapes, reps, args.ignore_every, args.providers.split(","))
        kernels = kernel_rows(shapes) if args.kernels and dev == "cuda" else []
        for r in kernels:
            print(
                f"| {r['shape']} op {r['phase']} | {r['path']} | {r['ms']:.2f} | {r['tflops']:.1f} | | | | |"
            )
        result = {"meta": meta, "rows": rows, "kernels": kernels}
    if args.out:
        write_json(args.out, result, table)
    else:
        print(json.dumps(result, indent=1, allow_nan=False, default=str), file=sys.stderr)


if __name__ == "__main__":
    main()
