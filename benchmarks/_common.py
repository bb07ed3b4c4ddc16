"""Helpers shared by the benchmark scripts: seeded models, flat gradients, matmul FLOPs of FX graphs,
a min-cut partitioner that keeps the graphs it made, run metadata / strict JSON, and the one timer
(:func:`time_ms`) every benchmark measures with.

The scripts run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from fxlowbit.passes import flops


@dataclasses.dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]  # seeded: every call builds identical weights
    inputs: dict[str, torch.Tensor]
    loss: Callable[[nn.Module, dict], torch.Tensor]


# ---------------------------------------------------------------------------------------------- models


class Classify(nn.Module):
    """Puts the cross-entropy into the compiled graph, as a training step would."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # dtype names on the command lines


def seeded(fn):
    """``fn`` under ``torch.manual_seed(0)``: every call builds identical weights."""

    def make():
        torch.manual_seed(0)
        return fn()

    return make


def causal_lm(name: str, **config) -> nn.Module:
    """A ``transformers`` causal LM, ``"llama"`` (LlamaForCausalLM) or ``"gpt2"`` (GPT2LMHeadModel), from
    ``config`` (its config class's keywords), built under ``torch.manual_seed(0)`` in train mode: every
    dropout 0 (recompute with dropout redraws masks in PyTorch), no KV cache, and the loss type set
    (without it transformers warns in forward: a graph break before the loss)."""
    import transformers as tf

    from fxlowbit import examples

    tf.logging.set_verbosity_error()
    model_cls, config_cls = {
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config),
    }[name]
    torch.manual_seed(0)
    defaults = {"use_cache": False, **dict.fromkeys(examples._HF_DROPOUT_KEYS[name], 0.0)}
    model = model_cls(config_cls(**{**defaults, **config}))
    model.loss_type = "ForCausalLM"
    return model.train()


def flat_grad(model: nn.Module) -> torch.Tensor:
    """All parameter gradients, concatenated (zeros where a parameter got none)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
            for p in model.parameters()
        ]
    )


# ----------------------------------------------------------------------------------------------- FLOPs


def node_flops(node: fx.Node) -> int:
    """Matmul FLOPs of one call (the package's count, :func:`fxlowbit.passes.flops.node_flops`);
    0 for every other node."""
    return flops.node_flops(node) or 0


def matmul_flops(graphs: Iterable[fx.GraphModule]) -> int:
    """Sum of :func:`node_flops` over every node of ``graphs``."""
    return flops.matmul_flops(graphs)


# ------------------------------------------------------------------------------------------ partitions


class RecordingPartitioner(CustomPartitionerFn):
    """PyTorch's min-cut partition under ``activation_memory_budget=budget`` (None: the default),
    keeping every (forward, backward) pair it made in ``graphs``.

    Usable as Inductor's ``custom_partitioner_fn`` and as ``aot_autograd``'s ``partition_fn``. The
    budget is patched around the partitioner call itself, so it holds whenever Dynamo compiles.
    """

    def __init__(self, budget: float | None = None) -> None:
        self.budget = budget
        self.graphs: list[tuple[fx.GraphModule, fx.GraphModule]] = []

    def uuid(self) -> Any | None:
        return None  # never serve cached code: the graphs would not be recorded

    def __call__(
        self, joint: fx.GraphModule, joint_inputs, **kwargs
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        kwargs.pop("compiler", None)
        patch = (
            contextlib.nullcontext()
            if self.budget is None
            else torch._functorch.config.patch(activation_memory_budget=self.budget)
        )
        with patch:
            fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, compiler="inductor", **kwargs)
        self.graphs.append((fw, bw))
        return fw, bw


def eager_mincut(rec: RecordingPartitioner):
    """A backend running min-cut (``rec``) through aot_autograd without Inductor: fast, for smoke
    runs and tests (``--inner eager``)."""
    import importlib

    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._inductor.decomposition import select_decomp_table

    importlib.import_module("torch._inductor.lowering")  # its max_pool2d decomposition reads it
    return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=rec,
                        decompositions=select_decomp_table(),
                        keep_inference_input_mutations=True)  # fmt: skip


# ----------------------------------------------------------------------------------- metadata and JSON


def jsonable(v):
    """Strict JSON: infinite SQNR (exact gradients) becomes the string "inf"."""
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def error_text(err: BaseException) -> str:
    """A row's error: the exception's type and the first line of its message."""
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"


def md_path(json_path: str) -> str:
    """Where a result JSON's markdown table goes: ``x.json`` -> ``x.md``."""
    return json_path.removesuffix(".json") + ".md"


def write_json(path: str | None, result: dict, table: Callable[[dict], str] | None = None) -> None:
    """Write ``result`` as strict JSON (see :func:`jsonable`) when ``path`` is given, creating its
    folder; with ``table``, also its markdown ``table(result)`` next to it (:func:`md_path`)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(jsonable(result), f, indent=1)
            f.write("\n")
        if table is not None:
            with open(md_path(path), "w") as f:
                f.write(table(jsonable(result)))


def table_from_json(path: str, table: Callable[[dict], str]) -> None:
    """Write the markdown ``table`` of the result JSON at ``path`` next to it (a script's ``--table``)."""
    with open(path) as f:
        result = json.load(f)
    with open(md_path(path), "w") as f:
        f.write(table(result))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout


def git(*cmd: str) -> subprocess.CompletedProcess | None:
    """``git cmd`` run in the checkout (None where git cannot run)."""
    try:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return None


def git_commit(short: bool = False) -> str | None:
    """The checkout's HEAD commit, abbreviated if ``short`` (None where git cannot tell)."""
    out = git("rev-parse", *(["--short"] if short else []), "HEAD")
    return (out.stdout.strip() or None) if out is not None else None


def meta(args, setup: str, command: list[str] | None = None) -> dict:
    """Machine, versions, date, git commit (and whether the package has uncommitted changes), the
    command line (``command``: script and arguments, default ``sys.argv``) and the parsed arguments."""
    import transformers

    # uncommitted changes to the package itself make the commit an approximate label
    diff = git("diff", "--quiet", "HEAD", "--", "fxlowbit", "passes", "codegen")
    dirty = None if diff is None else diff.returncode == 1
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return {
        "device": "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu: {cpu}",
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "package_dirty": dirty,
        "command": shlex.join(["python", *(sys.argv if command is None else command)]),
        "args": vars(args),
        "setup": setup,
    }


# ---------------------------------------------------------------------------------------------- timing


def sync(device: str | torch.device = "cpu") -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing to wait for on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


_REDUCE: dict[str, Callable[[list[float]], float]] = {
    "median": statistics.median,
    "mean": statistics.fmean,
    "min": min,
}


def time_ms(
    fn: Callable[[], Any] | Mapping[Any, Callable[[], Any]],
    reps: int = 1,
    *,
    warmup: int = 0,
    reduce: str | None = "median",
    device: str | torch.device = "cpu",
    before: Callable[[], Any] | None = None,
    per_visit: int | None = None,
    order: str = "rotate",
    flush_l2: bool = False,
) -> Any:
    """Milliseconds per call of ``fn``: ``warmup`` untimed calls, then ``reps`` timed ones, reduced by
    ``reduce``: ``"median"``, ``"mean"``, ``"min"``, or None for the list of times in call order. The
    defaults time one call (a compile, a first step).

    On CUDA (``device``) each call is timed with CUDA events and the device synchronised after it,
    so every call gives its own figure and none overlaps the next; on a CPU with
    ``time.perf_counter``. ``before`` runs untimed before every call, warm-up ones included (e.g.
    dropping gradients). ``flush_l2`` (CUDA): zero a 256 MB buffer before each timed call, so no call
    finds its operands in L2 (as ``triton.testing.do_bench`` does).

    A mapping ``{key: fn}`` is timed in interleaved rounds, so drift in the machine's speed falls on
    all of its entries alike: each round visits every entry once, ``order`` ``"rotate"`` (round r
    starts at the r-th entry) or ``"shuffle"`` (a new order per round, ``random.Random(0)``); a visit
    makes ``warmup`` untimed calls, then ``per_visit`` timed ones (default 1; fewer where ``reps`` is
    reached), until every entry has ``reps``. Returns ``{key: reduced times}``. A single ``fn`` is
    one visit of all its ``reps``.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, not {reps}")
    if reduce is not None and reduce not in _REDUCE:
        raise ValueError(f"reduce must be one of {list(_REDUCE)} or None, not {reduce!r}")
    if order not in ("rotate", "shuffle"):
        raise ValueError(f"order must be 'rotate' or 'shuffle', not {order!r}")
    fns = fn if isinstance(fn, Mapping) else {None: fn}
    per_visit = per_visit or (1 if isinstance(fn, Mapping) else reps)
    cuda = torch.device(device).type == "cuda"
    l2 = torch.empty(256 << 20, dtype=torch.int8, device=device) if flush_l2 and cuda else None

    def timed(f: Callable[[], Any]) -> float:
        if before is not None:
            before()
        if l2 is not None:
            l2.zero_()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        f()
        return (time.perf_counter() - t0) * 1e3

    keys, times = list(fns), {k: [] for k in fns}
    rng = random.Random(0)
    rounds = 0
    while any(len(ts) < reps for ts in times.values()):
        if order == "shuffle":
            rng.shuffle(keys)
            visits = keys
        else:
            visits = keys[rounds % len(keys) :] + keys[: rounds % len(keys)]
        for k in visits:
            n = min(per_visit, reps - len(times[k]))
            for _ in range(warmup if n > 0 else 0):
                if before is not None:
                    before()
                fns[k]()
            times[k] += [timed(fns[k]) for _ in range(n)]
        rounds += 1
    out = {k: ts if reduce is None else _REDUCE[reduce](ts) for k, ts in times.items()}
    return out if isinstance(fn, Mapping) else out[None]


def quartiles(xs: list[float], method: str = "inclusive") -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``xs`` (``statistics.quantiles``' ``method``);
    one value is all three."""
    if len(xs) == 1:
        return (xs[0],) * 3
    q1, q2, q3 = statistics.quantiles(xs, n=4, method=method)
    return q1, q2, q3
