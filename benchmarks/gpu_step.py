"""One training step of a GPT-2-small-sized model on a GPU: Inductor, PyTorch's min-cut recompute
budget and lowbit, side by side in one process.

Model: ``transformers`` GPT2LMHeadModel (n_embd 768, 12 layers, 12 heads, vocab 50257, seq 1024;
``--size medium``: n_embd 1024, 24 layers, 16 heads; ``--size tiny`` / ``micro`` for smoke runs), fp32 master
weights, forward and loss under bf16 autocast (``--dtype fp32`` for none), dropout 0 (recompute
with dropout redraws masks in PyTorch), random tokens, batch ``--batch``. A step is
``zero_grad(set_to_none) + forward + loss + backward`` (no optimizer: it is the same for every
row). Per row:

- ``compile_s``: the first step (compiles);
- ``saved_MB``: saved-activation bytes walked from the loss (:func:`fxlowbit.saved_activation_bytes`,
  parameters excluded) and their ratio to Inductor's;
- ``peak_MB``: ``torch.cuda.max_memory_allocated`` during one step above what was allocated before
  it (parameters, other rows' models), and its ratio to Inductor's;
- ``step_ms``: median over ``--steps`` steps timed with CUDA events, rows interleaved in shuffled
  rounds so clock drift spreads over all of them; ``ratio`` to Inductor's;
- ``grad_sqnr_db``: whole-gradient SQNR against an eager fp32 step on the same batch (the bf16 rows'
  floor is Inductor's own figure).

Settings are built in the order given; with ``--max-build-s`` the rows not built by then are
recorded as skipped and the built ones are still timed (a slow compile costs rows, not the run).
``--device cpu --inner eager`` is the smoke run (CPU, no Inductor: min-cut through aot_autograd,
lowbit ``inner="eager"``; wall-clock timing, no peak memory): it checks the script runs.

    python benchmarks/gpu_step.py --out benchmarks/results/gpu_step_h100.json
    python benchmarks/gpu_step.py --device cpu --inner eager --size micro --batch 2 --steps 1
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
from _common import (
    DTYPES,
    RecordingPartitioner,
    causal_lm,
    eager_mincut,
    error_text,
    flat_grad,
    meta,
    sync,
    time_ms,
    write_json,
)

import fxlowbit
from fxlowbit.examples import sqnr_db

SIZES = {
    "small": dict(n_embd=768, n_layer=12, n_head=12, vocab=50257, seq=1024),
    "medium": dict(n_embd=1024, n_layer=24, n_head=16, vocab=50257, seq=1024),
    "tiny": dict(n_embd=128, n_layer=2, n_head=4, vocab=1000, seq=128),
    "micro": dict(n_embd=64, n_layer=1, n_head=2, vocab=256, seq=64),  # CPU smoke runs
}
SETTINGS = "inductor,mincut:0.1,lowbit:bits=4,lowbit:budget=0.1"


def make_model(s: dict) -> nn.Module:
    return causal_lm("gpt2", vocab_size=s["vocab"], n_embd=s["n_embd"], n_layer=s["n_layer"],
                     n_head=s["n_head"], n_positions=s["seq"])  # fmt: skip


def parse_setting(text: str) -> tuple[str, dict]:
    """``inductor`` | ``mincut:B`` | ``lowbit:key=value,...`` (values parsed as JSON)."""
    kind, _, rest = text.partition(":")
    if kind == "inductor":
        return "inductor", {}
    if kind == "mincut":
        return f"min-cut {rest}", {"budget": float(rest)}
    if kind == "lowbit":
        opts = {}
        for item in filter(None, rest.split("+")):
            k, _, v = item.partition("=")
            opts["memory_budget" if k == "budget" else k] = json.loads(v)
        opts.setdefault("calibrate_every", 0)  # a re-plan compiles a variant: not inside the timing
        label = "lowbit " + " ".join(f"{k}={v}" for k, v in opts.items() if k != "calibrate_every")
        return label if opts.keys() - {"calibrate_every"} else "lowbit defaults", {"lowbit": opts}
    raise ValueError(f"unknown setting {text!r}: inductor | mincut:B | lowbit:key=value+key=value")


def compile_row(model: nn.Module, spec: dict, inner: str = "inductor"):
    if "lowbit" in spec:
        opts = {**spec["lowbit"], **({"inner": "eager"} if inner == "eager" else {})}
        fxlowbit.LowbitConfig.from_options(opts)  # bad options raise here, not in Dynamo
        return torch.compile(model, backend="lowbit", options=opts)
    rec = RecordingPartitioner(spec.get("budget"))
    if inner == "eager":  # min-cut through aot_autograd, no Inductor (smoke run)
        return torch.compile(model, backend=eager_mincut(rec))
    return torch.compile(model, backend="inductor", options={"custom_partitioner_fn": rec})


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--settings", default=SETTINGS, help=f"comma-separated (default {SETTINGS}); "
                    "lowbit options joined with '+', e.g. lowbit:bits=4+kernels=\"triton\"")  # fmt: skip
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", help="write JSON here")
    ap.add_argument(
        "--max-build-s", type=float, help="build no further rows after this many seconds; the built are timed"
    )
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the smoke run")
    ap.add_argument(
        "--inner",
        choices=("inductor", "eager"),
        default="inductor",
        help="eager: no Inductor (aot_autograd min-cut, lowbit inner=eager); smoke runs",
    )
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("gpu_step.py needs a CUDA device (--device cpu --inner eager checks that it runs)")
    dev = torch.device(args.device)
    started = time.perf_counter()
    setup = f"GPT-2 {args.size} {SIZES[args.size]}, batch {args.batch}, {args.dtype}"
    if not cuda:
        setup = f"CPU smoke run, inner {args.inner}: {setup}; timings meaningless, no peak memory"
    s = SIZES[args.size]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, s["vocab"], (args.batch, s["seq"]), generator=g).to(dev)
    batch = {"input_ids": ids, "labels": ids}
    amp = torch.autocast(args.device, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")

    def step(fn, model) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with amp:
            loss = fn(**batch).loss
        loss.backward()
        return loss

    ref_model = make_model(s).to(dev)
    ref_loss = ref_model(**batch).loss  # eager fp32: the gradient reference
    ref_loss.backward()
    ref_grad = flat_grad(ref_model).double()
    del ref_model
    if cuda:
        torch.cuda.empty_cache()

    rows, live = [], []
    for text in args.settings.split(","):
        label, spec = parse_setting(text)
        row = {"label": label, "setting": text}
        rows.append(row)
        if args.max_build_s is not None and time.perf_counter() - started > args.max_build_s:
            row["skipped"] = f"not built: --max-build-s {args.max_build_s:g} s passed"
            print(f"  skipped {label}: {row['skipped']}", flush=True)
            continue
        try:
            model = make_model(s).to(dev)
            fn = compile_row(model, spec, args.inner)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row["compile_s"] = round(time_ms(functools.partial(step, fn, model), device=dev) / 1e3, 1)
                for _ in range(args.warmup):
                    step(fn, model)
            model.zero_grad(set_to_none=True)
            sync(dev)
            base = torch.cuda.memory_allocated() if cuda else 0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with amp:
                loss = fn(**batch).loss
            row["saved_MB"] = fxlowbit.saved_activation_bytes(loss, model.parameters()) / 2**20
            loss.backward()
            sync(dev)
            row["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
            row["loss"] = loss.item()
            row["grad_sqnr_db"] = sqnr_db(ref_grad, flat_grad(model).double())
            model.zero_grad(set_to_none=True)
            live.append((row, model, fn))
        except Exception as err:  # a row that fails is a row saying why
            row["error"] = error_text(err)
        print(f"  built {label}: {row}", flush=True)
        # kept if the run is stopped before the timing (a caller's timeout): the rows built so far
        write_json(args.out, {"meta": meta(args, setup + "; PARTIAL: stopped before timing"), "rows": rows})

    # every row once per round, in a new random order each round, so clock drift spreads over all
    steps = {i: functools.partial(step, fn, model) for i, (_, model, fn) in enumerate(live)}
    times = time_ms(steps, args.steps, reduce=None, device=dev, order="shuffle")
    for i, (row, model, _) in enumerate(live):
        row["step_ms"] = statistics.median(times[i])
        row["step_ms_spread"] = [min(times[i]), max(times[i])]
        model.zero_grad(set_to_none=True)
    base = next((r for r in rows if r["label"] == "inductor" and "step_ms" in r), None)
    for r in rows:
        if base and "step_ms" in r:
            r["step_ratio"] = r["step_ms"] / base["step_ms"]
            r["saved_ratio"] = base["saved_MB"] / r["saved_MB"] if r["saved_MB"] else float("inf")
            r["peak_ratio"] = r["peak_MB"] / base["peak_MB"] if cuda else None
    result = {"meta": meta(args, setup), "rows": rows}
    print(f"\n{'setting':<34} {'compile s':>9} {'step ms':>8} {'ratio':>6} {'saved MB':>9} {'x less':>6} "
          f"{'peak MB':>8} {'ratio':>6} {'SQNR dB':>8}")  # fmt: skip
    for r in rows:
        if "error" in r or "skipped" in r:
            print(f"{r['label']:<34} {'ERROR ' + r['error'] if 'error' in r else r['skipped']}")
            continue
        print(f"{r['label']:<34} {r['compile_s']:>9.1f} {r['step_ms']:>8.2f} {r.get('step_ratio', 0):>6.3f} "
              f"{r['saved_MB']:>9.1f} {r.get('saved_ratio', 0):>6.2f} {r['peak_MB'] or 0:>8.1f} "
              f"{r.get('peak_ratio') or 0:>6.3f} {r['grad_sqnr_db']:>8.1f}")  # fmt: skip
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
