"""Seeded training runs the demo and the parity tests share: a :class:`Task` (model factory,
batches, loss, evaluation), :func:`compile_run` (the compiled model for a run name: "inductor",
"uncompressed", "lowbit<bits>", "budget<fraction>", ...) and :func:`train`, which measures
saved-activation bytes walked from ``loss.grad_fn``, losses, accuracy and step time.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

import fxlowbit  # noqa: F401  (registers the "lowbit" backend)
from fxlowbit.examples import MLP, SmallCNN, TinyGPT, char_batches, digits, stdlib_text
from fxlowbit.memory import saved_activation_bytes

__all__ = ["Result", "Task", "train", "gpt_task", "digits_task", "compile_run"]

TEST_FRACTION = 0.2  # digits: the last 20% of the bundled set is the test split
MB = 1e6


@dataclasses.dataclass(frozen=True)
class Task:
    """A model factory, its training batches and its evaluation, all seeded."""

    name: str
    make_model: Callable[[], torch.nn.Module]
    batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # steps -> (x, y) pairs
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[torch.nn.Module], dict[str, float]]  # on the eager module, eval mode
    lr: float


@dataclasses.dataclass
class Result:
    model: str
    run: str
    saved_mb: float
    train_loss: float  # mean over the last ``tail`` training steps
    eval_loss: float
    test_acc: float | None
    step_ms: float  # mean over the steps after ``warmup``
    steps: int
    losses: list[float] = dataclasses.field(repr=False)
    reduction: float | None = None  # uncompressed saved bytes / these saved bytes
    first_s: float = 0.0  # the first step: compile (Dynamo, fxlowbit's passes, Inductor) and run


def gpt_task(
    dim: int = 128,
    layers: int = 2,
    batch: int = 16,
    block: int = 64,
    seed: int = 0,
    lr: float = 3e-3,
    eval_batches: int = 8,
) -> Task:
    """TinyGPT on the standard-library corpus; the last 10% of the text is held out."""
    data = stdlib_text()
    split = int(0.9 * data.numel())
    train_data, held_out = data[:split], data[split:]

    def evaluate(model):
        losses = [model(x, y).item() for x, y in char_batches(held_out, batch, block, eval_batches, seed=1)]
        return {"eval_loss": sum(losses) / len(losses)}

    return Task(
        name="gpt",
        make_model=lambda: TinyGPT(vocab=128, dim=dim, layers=layers, heads=4, block=block),
        batches=lambda steps: char_batches(train_data, batch, block, steps, seed=seed),
        loss=lambda model, x, y: model(x, y),
        evaluate=evaluate,
        lr=lr,
    )


def digits_task(kind: str = "mlp", batch: int = 64, seed: int = 0, lr: float = 2e-3) -> Task:
    """MLP or SmallCNN on scikit-learn's digits; fixed split, seeded batch order (full batches)."""
    x, y = digits()
    n_test = int(TEST_FRACTION * len(y))
    x_train, y_train, x_test, y_test = x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:]
    shape = (-1, 1, 8, 8) if kind == "cnn" else (-1, 64)

    def batches(steps):
        gen = torch.Generator().manual_seed(seed)
        per_epoch = len(y_train) // batch  # drop the ragged last batch: one compiled shape
        order = torch.randperm(len(y_train), generator=gen)
        for step in range(steps):
            if step and step % per_epoch == 0:
                order = torch.randperm(len(y_train), generator=gen)
            idx = order[(step % per_epoch) * batch :][:batch]
            yield x_train[idx].view(shape), y_train[idx]

    def evaluate(model):
        logits = model(x_test.view(shape))
        return {
            "eval_loss": F.cross_entropy(logits, y_test).item(),
            "test_acc": (logits.argmax(1) == y_test).float().mean().item(),
        }

    return Task(
        name=kind,
        make_model=(lambda: SmallCNN()) if kind == "cnn" else (lambda: MLP()),
        batches=batches,
        loss=lambda model, x, y: F.cross_entropy(model(x), y),
        evaluate=evaluate,
        lr=lr,
    )


def compile_run(
    model: torch.nn.Module, run: str, inner: str = "inductor", seed: int = 0, options: dict | None = None
):
    """``run``: "eager", "inductor", "aot_eager", "uncompressed" (the lowbit pipeline with
    ``plan`` and low-bit GEMMs off: same decompositions, partition and RNG use), "lowbit<bits>"
    (every compressible tensor at that width) or "budget<fraction>" (the cost-model planner under
    that memory budget). ``options``: more lowbit options for the lowbit runs (e.g. ``{"gemm": "int8"}``)."""
    if run == "eager":
        return model
    if run in ("inductor", "aot_eager"):
        return torch.compile(model, backend=run)
    options = {"inner": inner, "seed": seed, **(options or {})}
    if run == "uncompressed":
        off = {"plan": False, "sparsity": False, "lowbit_gemm": False}
        options["passes"] = {**off, **options.get("passes", {})}
    elif run.startswith("lowbit"):
        options["bits"] = int(run.removeprefix("lowbit"))
    elif run.startswith("budget"):
        options["memory_budget"] = float(run.removeprefix("budget"))
        # a probe's re-plan compiles a new variant (minutes of Inductor on a CPU): in runs of a few
        # hundred steps that would dominate the timing, so the demo plans from the prior only
        options["calibrate_every"] = 0
    else:
        raise ValueError(f"unknown run {run!r}")
    return torch.compile(model, backend="lowbit", options=options)


def train(
    task: Task,
    run: str,
    steps: int,
    *,
    inner: str = "inductor",
    seed: int = 0,
    warmup: int = 5,
    tail: int = 20,
    progress: bool = True,
    options: dict | None = None,
) -> Result:
    """Train ``task``'s model from seed ``seed`` for ``steps`` AdamW steps under ``run``.

    Every run of a task sees the same initial weights, batches and dropout masks. Saved bytes are
    measured at step 1 (after compilation); step time averages the steps after ``warmup``.
    ``options``: more lowbit options (see :func:`compile_run`)."""
    from tqdm import tqdm

    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = task.make_model()
    compiled = compile_run(model, run, inner, seed, options)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr)
    # cosine decay to 10%: a calmer end point, so runs compare by their models, not by the last steps' noise
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    losses, times, saved = [], [], 0
    bar = tqdm(
        task.batches(steps),
        total=steps,
        desc=f"{task.name} {run}",
        leave=False,
        disable=not progress,
        file=sys.stderr,
    )
    for step, (x, y) in enumerate(bar):
        start = time.perf_counter()
        loss = task.loss(compiled, x, y)
        if step == min(1, steps - 1):
            saved = saved_activation_bytes(loss, model.parameters())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model)  # the eager module: no recompilation for eval mode
    model.train()
    timed = times[warmup:] if len(times) > warmup else times[-1:]
    return Result(
        model=task.name,
        run=run,
        saved_mb=saved / MB,
        train_loss=statistics.fmean(losses[-tail:]),
        eval_loss=metrics["eval_loss"],
        test_acc=metrics.get("test_acc"),
        step_ms=1000 * statistics.fmean(timed),
        steps=steps,
        first_s=times[0],
        losses=losses,
    )
