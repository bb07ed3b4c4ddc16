"""One pipeline step: the :class:`Context` steps read and write, the :class:`Step` record, and
:func:`apply`, the one helper through which every step runs (switch, time, counters, lint,
``meta["val"]`` check, DEBUG log of saved bytes and node counts, graph dumps). The list of steps
is :data:`fxlowbit.pipeline.STEPS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx

from . import record
from .config import LowbitConfig
from .costmodel import HardwareProfile
from .plan import Plan
from .state import STATE

log = logging.getLogger(__name__)

__all__ = ["Context", "Step", "apply", "run", "one_line"]


@dataclasses.dataclass(eq=False)
class Context:
    """What the steps read and write. The Dynamo-graph steps see ``gm``; the partition steps see
    ``fw``, ``bw`` and ``num_fwd_outputs`` and fill ``facts``, ``plan``, ``pristine``, ...."""

    cfg: LowbitConfig
    profile: HardwareProfile  # loaded once per compile (the backend's entry point)
    counters: Counter = dataclasses.field(default_factory=lambda: STATE.counters)
    label: str = ""  # "graph<k>" (k: the record the graph gets): names the dumped files
    # the Dynamo graph
    gm: fx.GraphModule | None = None
    sampling_keys: list[int] = dataclasses.field(default_factory=list)  # sampled linears' registry keys
    gemm_stream: int | None = None  # random stream of the sparse and low-bit linears (drawn once)
    # the partitioned pair
    fw: fx.GraphModule | None = None
    bw: fx.GraphModule | None = None
    num_fwd_outputs: int = 0
    stream: int = -1  # random stream of the saved tensors' stochastic rounding
    activations: frozenset[str] = frozenset()  # forward placeholders: an earlier graph's activations
    data: frozenset[str] = frozenset()  # forward placeholders: the user's batch
    sensitivity: dict[Any, float] | None = None  # measured, by planner.canonical_keys
    # what the partition steps produce
    # copies of the pair before the plan's rewrites (after saved_views, a lossless re-pointing): the
    # report's "before" graphs and the probes' pristine pair, one copy for both (pipeline.keep_before)
    before: tuple[fx.GraphModule, fx.GraphModule] | None = None
    pristine: tuple[fx.GraphModule, fx.GraphModule, int] | None = None
    facts: Any = None  # passes.analyze.GraphFacts
    plan: Plan | None = None
    extra_bytes: Any = 0  # saved bytes of the losses linear_ce fused, unfused (the budget counts them)
    quantizable: list[str] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # step -> seconds
    # the joint graph partitioned again at PyTorch's activation_memory_budget=f (min-cut's own
    # recompute: reductions, attention, any GEMM): the plan step weighs that pair against this one
    repartition: Callable[[float], tuple[fx.GraphModule, fx.GraphModule]] | None = None
    repartitioned: bool = False  # the plan step swapped ``fw``/``bw`` for a re-partitioned pair

    @property
    def dynamo(self) -> fx.GraphModule:
        assert self.gm is not None, "a Dynamo-graph step without the Dynamo graph"
        return self.gm

    @property
    def pair(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        assert self.fw is not None and self.bw is not None, "a partition step without the pair"
        return self.fw, self.bw

    @property
    def planned(self) -> Plan:
        assert self.plan is not None, "a step after the plan without a plan"
        return self.plan

    def graphs(self) -> dict[str, fx.GraphModule]:
        pairs = {"gm": self.gm, "fw": self.fw, "bw": self.bw}
        return {k: g for k, g in pairs.items() if g is not None}

    def device_type(self) -> str:
        """ "cuda" if any input of the forward lives on a CUDA device, else "cpu"."""
        g = self.fw if self.fw is not None else self.dynamo
        vals = (p.meta.get("val", p.meta.get("example_value")) for p in g.graph.find_nodes(op="placeholder"))
        return "cuda" if any(isinstance(v, torch.Tensor) and v.is_cuda for v in vals) else "cpu"


@dataclasses.dataclass(frozen=True)
class Step:
    """One named step: ``run(ctx)`` edits the graphs in place and/or fills the context. ``when``:
    whether it applies to this context (besides being switched on). ``contained``: what its
    failure costs (a warning ending in this text and ``error_counter``), or None: it propagates."""

    name: str
    run: Callable[[Context], None]
    stage: str  # "dynamo" or "partition"
    when: Callable[[Context], bool] = lambda ctx: True
    contained: str | None = None
    error_counter: str = "fallback_internal_error"


def _saved_bytes(ctx: Context) -> int | None:
    """Bytes of the forward's saved outputs (None: no partitioned pair, or symbolic sizes)."""
    if ctx.fw is None:
        return None
    outputs = ctx.fw.graph.find_nodes(op="output")[0].args[0]
    total = 0
    for n in outputs[ctx.num_fwd_outputs :]:
        v = n.meta.get("val") if isinstance(n, fx.Node) else None
        if isinstance(v, torch.Tensor):
            if not all(isinstance(d, int) for d in v.shape):
                return None  # no int() of a symbolic size here: it would add a guard
            total += v.numel() * v.element_size()
    return total


def _without_val(gm: fx.GraphModule) -> list[str]:
    """Nodes that produce a value but carry no ``meta["val"]`` (the Dynamo graph names it
    ``example_value``)."""
    out = []
    for n in gm.graph.nodes:
        if n.op in ("output", "get_attr") or n.meta.get("val", n.meta.get("example_value")) is not None:
            continue
        if n.op == "call_function" and n.type is type(None):
            continue
        out.append(n.name)
    return out


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cycle collector off for a burst of graph work (the partition and its journal, a
    probe and the checks after it): they allocate graph copies by the hundred thousand objects.
    Collections during the burst promote the copies still alive, and once enough did, a full
    collection scans every object of the process (the model, Dynamo's and Inductor's state):
    0.85 s of T5's 4.8 s partition, 0.53-0.58 s in 2 of 4 of Mixtral's post-probe checks, whose
    step otherwise took 159-165 ms (CPU, 2026-12-07). Off, the copies are garbage by the end and
    the next young collection frees them."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def one_line(err: BaseException) -> str:
    """``err`` as the one line a warning quotes: its type and its message's first line (no graph
    dump)."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def apply(step: Step, ctx: Context) -> bool:
    """Apply ``step`` to ``ctx`` if it is switched on and applies; True if it ran."""
    if not ctx.cfg.enabled(step.name) or not step.when(ctx):
        return False
    sizes = {k: len(g.graph.nodes) for k, g in ctx.graphs().items()}
    before = _saved_bytes(ctx)
    t0 = time.perf_counter()
    try:
        step.run(ctx)
    except Exception as err:
        if step.contained is None or ctx.cfg.strict:
            raise
        ctx.counters[step.error_counter] += 1
        what = "probes disabled for this graph" if step.name == "probes" else f"{step.name} pass failed"
        warnings.warn(f"fxlowbit: {what} ({one_line(err)}); {step.contained}", stacklevel=4)
        return False
    finally:
        ctx.timings[step.name] = ctx.timings.get(step.name, 0.0) + time.perf_counter() - t0
    ctx.counters[f"step.{step.name}"] += 1
    for part, g in ctx.graphs().items():
        g.graph.lint()
        missing = _without_val(g) if part != "gm" else []  # Dynamo's own nodes may lack it
        if missing:
            ctx.counters[f"step.{step.name}.nodes_without_val"] += len(missing)
            msg = f"fxlowbit: step {step.name} left {len(missing)} node(s) without meta['val']: {missing[:5]}"
            if ctx.cfg.strict:
                raise RuntimeError(msg)
            log.warning(msg)
    after = _saved_bytes(ctx)
    now = {k: len(g.graph.nodes) for k, g in ctx.graphs().items()}
    log.debug(
        "fxlowbit %s step %s: %.1f ms, saved bytes %s -> %s, nodes %s -> %s",
        ctx.label, step.name, ctx.timings[step.name] * 1e3, before, after, sizes, now,
    )  # fmt: skip
    if record.dump_dir():
        for part, g in ctx.graphs().items():
            record.write(f"{ctx.label}_{step.name}_{part}.py", g.print_readable(print_output=False))
    return True


def run(steps: tuple[Step, ...], ctx: Context) -> Context:
    """Apply ``steps`` in order (see :func:`apply`)."""
    for step in steps:
        apply(step, ctx)
    return ctx
