"""The pipeline: one list of named steps, each ``run(ctx)`` on one :class:`Context`.

:data:`STEPS` is the whole compiler in order. The first four rewrite the Dynamo graph before
AOTAutograd traces it; the rest run on the partitioned forward/backward pair inside the custom
partitioner (fxlowbit/backend.py)::

    Dynamo graph   linear_ce      projection + cross-entropy -> fused op         passes/linear_ce.py
                   sparsity       linears -> 2:4 sparse (option sparsity="2:4")  passes/sparsity.py
                   lowbit_gemm    linears -> INT8/FP8 GEMMs where chosen         passes/lowbit_gemm.py
                   sampling       linears -> backward GEMMs on sampled rows      passes/sampling.py
    partition      saved_views    save a view's base, not the view               passes/saved_views.py
                   probes         keep copies of the pair for the probes         fxlowbit/calibrate.py
                   analyze        saved tensors, their sizes and backward uses   passes/analyze.py
                   plan           a form per saved tensor (cost model)           fxlowbit/planner.py
                   recompute      replay the tensors planned for recompute       passes/recompute.py
                   rewrite_saved  pack in the forward, decode in the backward    passes/rewrite_saved.py

Every step can be switched off with ``options={"passes": {name: False}}`` (a step whose input is
missing, e.g. ``plan`` after ``analyze`` was switched off, does not run either). Every step is
applied by :func:`apply`, which times it, bumps ``counters["step.<name>"]``, lints the graphs it
touched, checks that every node still carries ``meta["val"]`` (counted as
``"step.<name>.nodes_without_val"``, an error under ``strict``), logs the saved bytes and node
counts before and after at DEBUG, and with ``FXLOWBIT_DUMP_DIR`` set writes the graphs after it.

Errors: a Dynamo-graph step and ``probes`` contain their own (one warning, counted; the compile
goes on without what they would have added); an error in any other partition step propagates, and
the partitioner falls back to the uncompressed pair (``fallback_internal_error``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from . import passes, planner, record
from .codegen import rng
from .codegen.kernels import sampling_state
from .config import LowbitConfig
from .costmodel import HardwareProfile
from .plan import Plan
from .state import STATE

log = logging.getLogger(__name__)

__all__ = ["Context", "Step", "STEPS", "DYNAMO_STEPS", "PARTITION_STEPS", "apply", "run"]

_GEMM_SALT = 0x6A09E667F3BCC909  # the GEMM noise stream's seed differs from the partitioner's
_SAMPLING_SALT = 0xBB67AE8584CAA73B  # and the sampling draws' from both


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
    pristine: tuple[fx.GraphModule, fx.GraphModule, int] | None = None
    facts: Any = None  # passes.analyze.GraphFacts
    plan: Plan | None = None
    extra_bytes: Any = 0  # saved bytes of the losses linear_ce fused, unfused (the budget counts them)
    quantizable: list[str] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # step -> seconds

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


# -- the steps -------------------------------------------------------------------------------------
def _linear_ce(ctx: Context) -> None:
    cfg = ctx.cfg
    passes.linear_ce.run(
        ctx.dynamo,
        budget_binding=cfg.memory_budget is not None and cfg.memory_budget != 1,  # binding: smaller heads too
        compressing=cfg.enabled("plan") and cfg.enabled("rewrite_saved"),
        profile=ctx.profile,
        counters=ctx.counters,
    )


def _dynamo_stream(cfg: LowbitConfig, salt: int) -> int:
    """A random stream for a Dynamo-graph rewrite: from ``seed`` (or torch's, plus a per-compile
    ordinal), salted so it differs from the partitioner's and the other rewrites' streams."""
    base = cfg.seed if cfg.seed is not None else torch.initial_seed() + STATE.next_id("gemm")
    return rng.new_stream((base ^ salt) % (2**63))


def _gemm_stream(ctx: Context) -> int:
    """The one stream of a graph's sparse and low-bit linears (drawn by whichever step runs first)."""
    if ctx.gemm_stream is None:
        ctx.gemm_stream = _dynamo_stream(ctx.cfg, _GEMM_SALT)
    return ctx.gemm_stream


def _sparsity(ctx: Context) -> None:
    passes.sparsity.run(ctx.dynamo, ctx.cfg, stream=_gemm_stream(ctx), counters=ctx.counters)


def _lowbit_gemm(ctx: Context) -> None:
    stream = _gemm_stream(ctx)
    passes.lowbit_gemm.run(ctx.dynamo, ctx.cfg, stream=stream, profile=ctx.profile, counters=ctx.counters)


def _sampling(ctx: Context) -> None:
    cfg = ctx.cfg
    stream = _dynamo_stream(cfg, _SAMPLING_SALT)
    ctx.sampling_keys = passes.sampling.run(
        ctx.dynamo, cfg, stream=stream, profile=ctx.profile, counters=ctx.counters
    )
    sampling_state.set_budget(ctx.sampling_keys, cfg.max_variance_ratio)  # until a plan takes its share


def _saved_views(ctx: Context) -> None:
    passes.saved_views.run(*ctx.pair, num_fwd_outputs=ctx.num_fwd_outputs, counters=ctx.counters)


def _probes(ctx: Context) -> None:
    fw, bw = ctx.pair
    ctx.pristine = passes._graph.copy_module(fw), passes._graph.copy_module(bw), ctx.num_fwd_outputs


def _analyze(ctx: Context) -> None:
    ctx.facts = passes.analyze.run(*ctx.pair, ctx.num_fwd_outputs, ctx.activations, ctx.data)


def _plan(ctx: Context) -> None:
    facts, cfg = ctx.facts, ctx.cfg
    sens = None
    if ctx.sensitivity is not None:
        keys = planner.canonical_keys(facts.saved)
        sens = {name: ctx.sensitivity[k] for name, k in keys.items() if k in ctx.sensitivity}
    # a fused loss saves no logits: the budget's fraction is of the bytes saved without fxlowbit
    ctx.extra_bytes = passes.linear_ce.unfused_extra_bytes(ctx.pair[0])
    ctx.plan = planner.decide(
        facts.saved, cfg, facts.hints, profile=ctx.profile, sensitivity=sens, gemms=facts.gemms,
        extra_bytes=ctx.extra_bytes,
    )  # fmt: skip
    ctx.quantizable = [s.name for s in facts.saved if planner.may_quantize(s, cfg)]
    STATE.plans.append(ctx.plan)  # planner.decide logs it at INFO
    # one budget of added variance: sampling gets what the plan's compression leaves
    sampling_state.set_budget(ctx.sampling_keys, cfg.max_variance_ratio - ctx.plan.variance_ratio)


def _recompute(ctx: Context) -> None:
    recipes = {s.name: s.recompute for s in ctx.facts.saved if s.recompute is not None}
    passes.recompute.run(
        *ctx.pair, ctx.planned, recipes, num_fwd_outputs=ctx.num_fwd_outputs, counters=ctx.counters
    )


def _rewrite_saved(ctx: Context) -> None:
    cfg, plan, device = ctx.cfg, ctx.planned, ctx.device_type()
    passes.rewrite_saved.run(
        *ctx.pair,
        plan,
        num_fwd_outputs=ctx.num_fwd_outputs,
        group_size=cfg.group_size,
        stream=ctx.stream,
        counters=ctx.counters,
        inline=cfg.inline_kernels(device),
        quant_op=cfg.quant_op(device),
        fuse=cfg.fuse,
    )
    ctx.counters["graphs_rewritten"] += 1
    ctx.counters["saved_bytes_before"] += plan.bytes_before
    ctx.counters["saved_bytes_after"] += plan.bytes_after


DYNAMO_STEPS: tuple[Step, ...] = (
    Step(
        "linear_ce", _linear_ce, "dynamo",
        when=lambda ctx: torch.is_grad_enabled(),  # inference saves no logits: leave it
        contained="loss left unfused",
    ),
    Step(
        "sparsity", _sparsity, "dynamo",
        when=lambda ctx: ctx.cfg.sparsity_active and torch.is_grad_enabled(),
        contained="linears left dense",
    ),
    Step(
        "lowbit_gemm", _lowbit_gemm, "dynamo",
        when=lambda ctx: ctx.cfg.gemm_active and torch.is_grad_enabled(),
        contained="linears left as they are",
    ),
    Step(
        "sampling", _sampling, "dynamo",
        when=lambda ctx: ctx.cfg.sampling_active and torch.is_grad_enabled(),
        contained="linears left exact",
    ),
)  # fmt: skip
PARTITION_STEPS: tuple[Step, ...] = (
    Step("saved_views", _saved_views, "partition"),
    Step(
        "probes", _probes, "partition",
        when=lambda ctx: (  # probes revisit a plan: the planner and its analysis on
            bool(ctx.cfg.calibrate_every) and ctx.cfg.bits is None and ctx.cfg.enabled("analyze")
            and ctx.cfg.enabled("plan")
        ),
        contained="it is compressed under the prior sensitivities",
        error_counter="probes_disabled",
    ),
    Step("analyze", _analyze, "partition"),
    Step("plan", _plan, "partition", when=lambda ctx: ctx.facts is not None),
    Step("recompute", _recompute, "partition", when=lambda ctx: ctx.plan is not None),
    Step("rewrite_saved", _rewrite_saved, "partition", when=lambda ctx: ctx.plan is not None),
)  # fmt: skip
STEPS: tuple[Step, ...] = DYNAMO_STEPS + PARTITION_STEPS


# -- applying them ---------------------------------------------------------------------------------
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
        why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        warnings.warn(f"fxlowbit: {what} ({why}); {step.contained}", stacklevel=4)
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
