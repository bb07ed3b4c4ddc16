"""``python -m fxlowbit`` / ``fxlowbit``: train small models on bundled data with and without lowbit.

The demo trains the same model from the same initialisation on the same batches once uncompressed
and once per bit width, and prints saved-activation MB (walked from ``loss.grad_fn``), the
reduction against the uncompressed run, final losses, test accuracy (digits) and mean step time
(compile steps excluded). Data ships with the installation: the Python standard library's sources
(character-level LM) and scikit-learn's 8x8 digits.

    fxlowbit demo                        # TinyGPT on stdlib text + digits MLP: inductor, budget 0.1, 4 bits
    fxlowbit demo --quick                # ~30 s smoke run
    fxlowbit demo --model cnn --bits 4 --inner eager --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence

import torch

import fxlowbit  # noqa: F401  (registers the "lowbit" backend)
from fxlowbit.training import Result, digits_task, gpt_task, train

__all__ = ["main", "demo", "format_table", "parse_args"]


def format_table(results: Sequence[Result]) -> str:
    """Markdown table, one row per run."""
    head = [
        "model",
        "run",
        "saved MB",
        "reduction",
        "train loss",
        "eval loss",
        "test acc",
        "ms/step",
        "first step s",
    ]
    rows = [head, ["---"] * len(head)]
    for r in results:
        rows.append(
            [
                r.model,
                r.run,
                f"{r.saved_mb:.2f}",
                "-" if r.reduction is None else f"{r.reduction:.1f}x",
                f"{r.train_loss:.3f}",
                f"{r.eval_loss:.3f}",
                "-" if r.test_acc is None else f"{100 * r.test_acc:.1f}%",
                f"{r.step_ms:.1f}",
                f"{r.first_s:.1f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows
    )


def demo(args: argparse.Namespace) -> list[Result]:
    baseline = "inductor" if args.inner == "inductor" else "uncompressed"
    runs = [baseline] + [f"budget{b:g}" for b in args.budget] + [f"lowbit{b}" for b in args.bits]
    results: list[Result] = []
    for name in args.model:
        if name == "gpt":
            task = gpt_task(dim=args.dim, layers=args.layers, batch=args.batch, block=args.block)
            steps = args.steps or (60 if args.quick else 300)
        else:
            task = digits_task(name)
            steps = args.steps or (100 if args.quick else 400)
        base = None
        for run in runs:
            r = train(
                task,
                run,
                steps,
                inner=args.inner,
                seed=args.seed,
                warmup=args.warmup,
                progress=not args.no_progress,
            )
            base = base or r.saved_mb
            r.reduction = base / r.saved_mb if r.saved_mb else math.inf
            results.append(r)
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fxlowbit", description="Train small models on bundled data with and without lowbit."
    )
    d = p.add_subparsers(dest="command").add_parser("demo", help="train with and without lowbit (default)")
    arg = d.add_argument
    arg("--model", nargs="+", choices=("gpt", "mlp", "cnn"), help="models to train (default: gpt mlp)")
    arg("--budget", nargs="+", type=float, help="memory budgets for the planner, fractions (default: 0.1)")
    arg(
        "--bits",
        nargs="+",
        type=int,
        choices=(8, 4, 2),
        help="uniform bit widths to compare (default: 4; quick: 4 2)",
    )
    arg(
        "--inner",
        choices=("inductor", "eager"),
        help="lowbit's inner compiler (default inductor; quick: eager)",
    )
    arg("--steps", type=int, help="training steps per run (default gpt 300, digits 400; quick: 60, 100)")
    arg("--quick", action="store_true", help="small, fast run (~30 s): inner eager, TinyGPT dim 64")
    arg("--seed", type=int, default=0)
    arg("--warmup", type=int, default=5, help="leading steps left out of the step time")
    arg("--dim", type=int, help="TinyGPT width (default 128; quick: 64)")
    arg("--layers", type=int, default=2)
    arg("--batch", type=int, default=16)
    arg("--block", type=int, default=64)
    arg("--threads", type=int, default=1, help="torch threads (1: steady timings on shared CPUs; 0: default)")
    arg("--json", metavar="PATH", help="write the results (with loss curves) here")
    arg("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``demo`` when no command is given) and resolve --quick's defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "demo")
    args = _parser().parse_args(argv)
    q = args.quick
    args.model = args.model or ["gpt", "mlp"]
    # the full demo compares one uniform width (each run costs ~40 s here); --bits 4 2 adds 2-bit
    args.bits = args.bits or ([4, 2] if q else [4])
    args.budget = args.budget or [0.1]
    args.inner = args.inner or ("eager" if q else "inductor")
    args.dim = args.dim or (64 if q else 128)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``fxlowbit demo`` (the ``fxlowbit`` command itself is :func:`fxlowbit.cli.main`)."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = demo(args)
    print(format_table(results))
    print(
        f"\n{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}, "
        f"total {time.perf_counter() - start:.0f} s; saved MB walked from loss.grad_fn at step 1, "
        f"ms/step after {args.warmup} warm-up steps; first step s: compile and run of step 0.\n"
        "inductor: plain torch.compile; uncompressed: the lowbit pipeline with compression off; "
        "budgetF: the cost-model planner keeping saved activations within F of their size; "
        f"lowbitN: every compressible saved activation in N bits (inner={args.inner})."
    )
    if args.json:
        with open(args.json, "w") as f:
            config = {k: v for k, v in vars(args).items() if k != "json"}
            json.dump({"config": config, "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    from fxlowbit.cli import main as cli_main  # demo, profile, explain

    sys.exit(cli_main())
