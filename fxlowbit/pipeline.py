"""The pipeline: one list of named steps, each ``run(ctx)`` on one :class:`Context`.

:data:`STEPS` is the whole compiler in order. The first four rewrite the Dynamo graph before
AOTAutograd traces it; the rest run on the partitioned forward/backward pair inside the custom
partitioner (fxlowbit/backend.py)::

    Dynamo graph   linear_ce      projection + cross-entropy -> fused op         passes/linear_ce.py
                   sparsity       linears -> 2:4 sparse (option sparsity="2:4")  passes/sparsity.py
                   lowbit_gemm    linears -> INT8/FP8 GEMMs where chosen         passes/lowbit_gemm.py
                   sampling       linears -> backward GEMMs on sampled rows      passes/sampling.py
    partition      saved_views    save a view's base, not the view               passes/saved_views.py
                   analyze        saved tensors, their sizes and backward uses   passes/analyze.py
                   plan           a form per saved tensor (cost model); weighs   fxlowbit/planner.py
                                  min-cut's own recompute partition against it
                   probes         keep copies of the pair for the probes         fxlowbit/calibrate.py
                   recompute      replay the tensors planned for recompute       passes/recompute.py
                   rewrite_saved  pack in the forward, decode in the backward    passes/rewrite_saved.py

Every step can be switched off with ``options={"passes": {name: False}}`` (a step whose input is
missing, e.g. ``plan`` after ``analyze`` was switched off, does not run either). Every step is
applied by :func:`apply` (fxlowbit/step.py), which times it, bumps ``counters["step.<name>"]``,
lints the graphs it touched, checks that every node still carries ``meta["val"]`` (counted as
``"step.<name>.nodes_without_val"``, an error under ``strict``), logs the saved bytes and node
counts before and after at DEBUG, and with ``FXLOWBIT_DUMP_DIR`` set writes the graphs after it.

Errors: a Dynamo-graph step and ``probes`` contain their own (one warning, counted; the compile
goes on without what they would have added); an error in any other partition step propagates, and
the partitioner falls back to the uncompressed pair (``fallback_internal_error``).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections import Counter

import torch
import torch.fx as fx

from . import passes, planner
from .codegen import rng
from .codegen.kernels import sampling_state
from .config import LowbitConfig
from .state import STATE
from .step import Context, Step, apply, one_line, run

log = logging.getLogger(__name__)

__all__ = ["Context", "Step", "STEPS", "DYNAMO_STEPS", "PARTITION_STEPS", "apply", "run", "keep_before"]

_GEMM_SALT = 0x6A09E667F3BCC909  # the GEMM noise stream's seed differs from the partitioner's
_SAMPLING_SALT = 0xBB67AE8584CAA73B  # and the sampling draws' from both


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


def keep_before(ctx: Context) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Copies of the pair as it is now (once: later calls return the same copies), taken before the
    first rewrite of the plan: the report's *before* graphs and the probes' pristine pair share them
    (neither is ever rewritten in place: probes and checks rewrite copies)."""
    if ctx.before is None:
        fw, bw = ctx.pair
        ctx.before = passes._graph.copy_module(fw, lazy=True), passes._graph.copy_module(bw, lazy=True)
    return ctx.before


def _before_rewriting(ctx: Context) -> None:
    """:func:`keep_before` for the rewrite steps: the copies failing costs the report its "before"
    graphs (and the probes, which need the same copies), never the rewrite."""
    try:
        keep_before(ctx)
    except Exception as err:
        if ctx.cfg.strict:
            raise
        log.warning("fxlowbit: graphs before rewriting not kept for the report (%s)", one_line(err))


def _probes(ctx: Context) -> None:
    ctx.pristine = (*keep_before(ctx), ctx.num_fwd_outputs)


def _analyze(ctx: Context) -> None:
    ctx.facts = passes.analyze.run(*ctx.pair, ctx.num_fwd_outputs, ctx.activations, ctx.data)


def _decide(ctx: Context, facts, budget: int | None = None):
    """The plan of ``facts`` (quiet: :func:`_plan` warns about the plan it keeps)."""
    sens = None
    if ctx.sensitivity is not None:
        keys = planner.canonical_keys(facts.saved)
        sens = {name: ctx.sensitivity[k] for name, k in keys.items() if k in ctx.sensitivity}
    return planner.decide(
        facts.saved, ctx.cfg, facts.hints, profile=ctx.profile, sensitivity=sens, gemms=facts.gemms,
        extra_bytes=ctx.extra_bytes, budget_bytes=budget, warn=False,
    )  # fmt: skip


def _plan(ctx: Context) -> None:
    facts, cfg = ctx.facts, ctx.cfg
    # a fused loss saves no logits: the budget's fraction is of the bytes saved without fxlowbit
    ctx.extra_bytes = passes.linear_ce.unfused_extra_bytes(ctx.pair[0])
    ctx.plan = _decide(ctx, facts)
    _weigh_mincut(ctx)
    planner.warn_status(ctx.plan.status)
    ctx.quantizable = [s.name for s in ctx.facts.saved if planner.may_quantize(s, cfg)]
    STATE.plans.append(ctx.plan)  # planner.decide logs it at INFO
    # one budget of added variance: sampling gets what the plan's compression leaves
    sampling_state.set_budget(ctx.sampling_keys, cfg.max_variance_ratio - ctx.plan.variance_ratio)


def _weigh_mincut(ctx: Context) -> None:
    """When the plan needs lossy forms or misses its budget, weigh it against PyTorch's own
    recompute: partition the joint graph again at ``activation_memory_budget`` = the budget's
    fraction (min-cut then recomputes what lowbit's replays cannot: reductions, softmax, attention,
    chains of GEMMs), plan that pair under the same budget in bytes, and keep the pair whose plan
    meets the budget, or both do and it costs less (:func:`fxlowbit.planner.objective`: GEMM time
    of both graphs, the plan's added time and its variance priced in steps), or neither does and
    it stores less (or as much, faster). Static sizes only; never a pair whose backward replays a
    random or fxlowbit op (min-cut redraws dropout masks, pytorch/pytorch#190758). A failure here
    keeps the default pair's plan, with one warning (``strict`` raises)."""
    plan, facts, cfg = ctx.planned, ctx.facts, ctx.cfg
    if ctx.repartition is None or not (cfg.recompute and cfg.mincut) or plan.budget is None:
        return
    if not planner.lossy(plan) and plan.bytes_after <= plan.budget:
        return  # exact and within budget: nothing min-cut could improve on
    if any(getattr(s.nbytes, "free_symbols", None) for s in facts.saved):
        return  # symbolic sizes: the budget's bytes move with them
    total = plan.bytes_before + planner.at_hints(ctx.extra_bytes, facts.hints)
    frac = plan.budget / max(total, 1)
    if frac >= 1:
        return
    ctx.counters["mincut_tried"] += 1
    try:
        _weigh_pair(ctx, frac)
    except Exception as err:
        if cfg.strict:
            raise
        ctx.counters["mincut_failed"] += 1
        msg = (
            f"fxlowbit: min-cut's re-partition failed ({one_line(err)}); the default partition's plan is kept"
        )
        warnings.warn(msg, stacklevel=4)


def _weigh_pair(ctx: Context, frac: float) -> None:
    plan, facts = ctx.planned, ctx.facts
    assert ctx.repartition is not None and plan.budget is not None
    fw, bw = ctx.repartition(frac)
    if _replays_state(bw, ctx.pair[1]):
        ctx.counters["mincut_unsafe"] += 1
        log.info("min-cut at %.3g recomputes a random or fxlowbit op in the backward: not used", frac)
        return
    other = dataclasses.replace(ctx, fw=fw, bw=bw, counters=Counter())  # its counters count if kept
    _saved_views(other)
    _analyze(other)
    alt_facts = other.facts
    with warnings.catch_warnings(record=True) as caught:  # shown if this pair is kept
        warnings.simplefilter("always")
        alt = _decide(other, alt_facts, budget=plan.budget)
    t_ref = plan.step_time_s
    here = planner.objective(plan, facts.gemms, ctx.profile, t_ref)
    there = planner.objective(alt, alt_facts.gemms, ctx.profile, t_ref)
    fits, alt_fits = plan.bytes_after <= plan.budget, alt.bytes_after <= plan.budget
    if alt_fits != fits:  # meeting the budget comes first, then the time
        better = alt_fits
    elif fits:
        better = there < here
    else:  # neither can: the one closer to it, then the faster
        better = (alt.bytes_after, there) < (plan.bytes_after, here)
    log.info("min-cut at activation_memory_budget=%.3g: est. %.3f ms, %d bytes against %.3f ms, "
             "%d bytes (%s)", frac, there * 1e3, alt.bytes_after, here * 1e3, plan.bytes_after,
             "used" if better else "not used")  # fmt: skip
    if not better:
        return
    flops = sum(g.flops for g in alt_facts.gemms) - sum(g.flops for g in facts.gemms)
    why = (
        f"min-cut partition at activation_memory_budget={frac:.3g} (recompute +{flops / 1e6:.1f} MFLOP; "
        f"est. {there * 1e3:.3f} ms against {here * 1e3:.3f} ms on the default partition)"
    )
    ctx.fw, ctx.bw, ctx.facts, ctx.repartitioned = fw, bw, alt_facts, True
    ctx.plan = dataclasses.replace(alt, partition=why, bytes_default=plan.bytes_before, partition_flops=flops)
    ctx.counters.update(other.counters)
    ctx.counters["mincut_used"] += 1
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _replays_state(bw: fx.GraphModule, base: fx.GraphModule) -> bool:
    """Whether ``bw`` calls a random op or an fxlowbit op more often than ``base`` does (a forward
    op min-cut moved into the backward: a redrawn mask, a stream or registry advanced twice)."""

    def stateful(gm: fx.GraphModule) -> Counter:
        out: Counter = Counter()
        for n in gm.graph.nodes:
            t = n.target
            if passes._ops.draws_random(n) or getattr(t, "namespace", None) == "fxlowbit":
                out[t] += 1
        return out

    mine, theirs = stateful(bw), stateful(base)
    extra = {str(t): k - theirs[t] for t, k in mine.items() if k > theirs[t]}
    if extra:
        log.debug("backward ops a re-partition adds: %s", extra)
    return bool(extra)


def _recompute(ctx: Context) -> None:
    _before_rewriting(ctx)
    recipes = {s.name: s.recompute for s in ctx.facts.saved if s.recompute is not None}
    passes.recompute.run(
        *ctx.pair, ctx.planned, recipes, num_fwd_outputs=ctx.num_fwd_outputs, counters=ctx.counters
    )


def _rewrite_saved(ctx: Context) -> None:
    _before_rewriting(ctx)
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
    ctx.counters["saved_bytes_before"] += plan.bytes_uncompressed
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
    Step("analyze", _analyze, "partition"),
    Step("plan", _plan, "partition", when=lambda ctx: ctx.facts is not None),
    Step(
        "probes", _probes, "partition",
        when=lambda ctx: (  # probes revisit a plan: the planner and its analysis on
            bool(ctx.cfg.calibrate_every) and ctx.cfg.bits is None and ctx.cfg.enabled("analyze")
            and ctx.cfg.enabled("plan")
        ),
        contained="it is compressed under the prior sensitivities",
        error_counter="probes_disabled",
    ),
    Step("recompute", _recompute, "partition", when=lambda ctx: ctx.plan is not None),
    Step("rewrite_saved", _rewrite_saved, "partition", when=lambda ctx: ctx.plan is not None),
)  # fmt: skip
STEPS: tuple[Step, ...] = DYNAMO_STEPS + PARTITION_STEPS
