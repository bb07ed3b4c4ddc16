"""The ``lowbit`` torch.compile backend: AOTAutograd with our partition function.

Dynamo graph (linear_ce: projection + cross-entropy fused; lowbit_gemm: linears with INT8/FP8
GEMMs where chosen) -> AOTAutograd joint graph -> min-cut
partition -> our pipeline (``config.PASSES``: saved_views, analyze, plan, recompute, rewrite_saved)
-> inner compiler (Inductor by default, ``options={"inner": "eager"}`` for fast runs). With the
cost-model planner the compiled graph is wrapped so that probes re-plan it as training goes
(:class:`_Adaptive`). Registered through the ``torch_dynamo_backends`` entry point and on
``import fxlowbit``.

    >>> model = torch.compile(torch.nn.Linear(4, 4), backend="lowbit", options={"memory_budget": 0.25})
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from . import (
    calibrate,
    codegen,  # noqa: F401  (registers the fxlowbit:: ops)
    forms,
    passes,
    pipeline,
    planner,
    record,
    state,
    validate,
)
from .codegen import rng
from .codegen.kernels import sampling_state
from .config import LowbitConfig
from .costmodel import HardwareProfile, load_profile
from .plan import Plan
from .state import STATE

log = logging.getLogger(__name__)

__all__ = ["lowbit", "last_plans", "last_graphs", "reset", "counters", "LowbitPartitioner"]

# in fxlowbit.state.STATE, the one home of run-time state (reset() clears them)
_last_plans: list[Plan] = STATE.plans
_last_graphs: list[tuple[fx.GraphModule, fx.GraphModule]] = STATE.graphs
counters: Counter = STATE.counters  # what the rewrites did; tests assert it (expected zeros included)


def last_plans() -> list[Plan]:
    """Plans of every graph compiled since the last :func:`reset`, in compilation order (a model
    with graph breaks has several)."""
    return list(_last_plans)


def last_graphs() -> list[tuple[fx.GraphModule, fx.GraphModule]]:
    """(forward, backward) GraphModules after rewriting, as handed to the inner compiler, one pair
    per compiled graph since the last :func:`reset` (same order as :func:`last_plans`)."""
    return list(_last_graphs)


def reset(kernels: bool = True) -> None:
    """Release everything fxlowbit holds (:func:`fxlowbit.state.reset`): recorded plans, graphs and
    reports, counters, warn-once keys, random-stream state, 2:4 masks and, with ``kernels``, the
    compiled CPU kernel families. ``torch._dynamo.reset()`` does none of this."""
    state.reset(kernels=kernels)


class LowbitPartitioner(CustomPartitionerFn):
    """Min-cut partition, then the pipeline's partition steps (:data:`fxlowbit.pipeline.PARTITION_STEPS`:
    store each saved tensor in the form the planner chose)."""

    def __init__(
        self,
        cfg: LowbitConfig,
        seed: int,
        sensitivity: dict | None = None,
        activations: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset()),
        profile: HardwareProfile | None = None,
        sampling_keys: Sequence[int] = (),
    ) -> None:
        self.cfg = cfg
        self.sampling_keys = list(sampling_keys)  # the graph's sampled linears (their variance share)
        # indices of graph inputs that are activations of earlier graphs, and of the user's batch
        self.activations = activations
        # measured sensitivities by planner.canonical_keys (names change between partitions)
        self.sensitivity = sensitivity
        self.stream = rng.new_stream(seed)
        self.profile = profile if profile is not None else load_profile(cfg.profile)
        self.plan: Plan | None = None
        self.facts: passes.analyze.GraphFacts | None = None  # of the last partition
        self.extra_bytes = 0  # saved bytes of the losses linear_ce fused, unfused (the budget counts them)
        self.quantizable: list[str] = []  # saved tensors a plan may quantize (probed)
        self.pristine: tuple[fx.GraphModule, fx.GraphModule, int] | None = None  # for probes
        self.timings: dict[str, float] = {}  # step -> seconds, of the last partition

    def uuid(self) -> Any | None:
        return None  # plans and random streams are per compilation: never reuse cached code

    # Inductor's FX graph cache pickles its config, this partitioner included, into each graph's
    # key: leave out what varies between identical compiles (step timings, the report record), or
    # a second process could never hit the cache, and the seed, which the compiled code never
    # sees (it names a stream; the stream's generator is seeded at run time), so another seed
    # reuses the code and still draws its own noise.
    _NOT_IN_CACHE_KEY = ("timings", "record")

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in self._NOT_IN_CACHE_KEY}
        state["cfg"] = dataclasses.replace(self.cfg, seed=None)
        return state

    def __call__(
        self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        kwargs.pop("compiler", None)

        def partition(joint: fx.GraphModule, inputs: Sequence[object]) -> tuple[fx.GraphModule, ...]:
            return min_cut_rematerialization_partition(joint, inputs, compiler="inductor", **kwargs)

        fw, bw = partition(gm, joint_inputs)
        n = kwargs["num_fwd_outputs"]
        before, fallback = (record.snapshot(fw), record.snapshot(bw)), None  # for fxlowbit.last_report()
        acts, data = (self._placeholder_names(fw, which) for which in self.activations)
        ctx = pipeline.Context(
            self.cfg, self.profile, label=f"graph{len(STATE.records)}", fw=fw, bw=bw, num_fwd_outputs=n,
            stream=self.stream, activations=acts, data=data, sensitivity=self.sensitivity,
            sampling_keys=self.sampling_keys,
        )  # fmt: skip
        try:
            pipeline.run(pipeline.PARTITION_STEPS, ctx)
        except Exception as err:  # never lose the user's training step to a bug of ours
            if self.cfg.strict:
                raise
            why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"  # one line, no graph dump
            warnings.warn(
                f"fxlowbit: internal error while compressing saved tensors ({why}); "
                "this graph runs uncompressed",
                stacklevel=2,
            )
            counters["fallback_internal_error"] += 1
            fw, bw = partition(gm, joint_inputs)
            fallback = f"{type(err).__name__}: {err}"
        self.pristine, self.facts, self.plan = ctx.pristine, ctx.facts, ctx.plan
        self.extra_bytes, self.quantizable, self.timings = ctx.extra_bytes, ctx.quantizable, ctx.timings
        _last_graphs.append((fw, bw))
        record.add(self, before, (fw, bw), fallback)
        return fw, bw

    @staticmethod
    def _placeholder_names(fw: fx.GraphModule, indices: frozenset[int]) -> frozenset[str]:
        """Forward placeholders of the graph inputs ``indices`` (AOTAutograd names the i-th flat
        input ``primals_{i+1}``)."""
        names = {f"primals_{i + 1}" for i in indices}
        return frozenset(p.name for p in fw.graph.find_nodes(op="placeholder") if p.name in names)


def _devices(args) -> list:
    flat = args[0] if len(args) == 1 and isinstance(args[0], list) else args
    return sorted({a.device.index or 0 for a in flat if isinstance(a, torch.Tensor) and a.is_cuda})


def _seed(cfg: LowbitConfig) -> int:
    # Without an explicit seed, derive one from torch's initial seed (so torch.manual_seed makes
    # runs reproducible) without drawing from the user's generator.
    base = cfg.seed if cfg.seed is not None else torch.initial_seed()
    return (base + 0x9E3779B97F4A7C15 * (STATE.next_id("graph") if cfg.seed is None else 0)) % (2**63)


def _activation_inputs(gm: fx.GraphModule, example_inputs, grad: bool = True) -> frozenset[int]:
    """Indices of the Dynamo graph's tensor inputs that are activations handed over from an earlier
    graph (at a graph break: tensors that require grad and are neither parameters nor buffers).
    Their saved aliases are memory the budget counts and a plan may compress. The user's batch
    (no grad) stays as it is: the training loop holds it anyway, and it is the data itself, but it
    is memory the walk from the loss counts: ``grad=False`` lists those inputs, which the budget
    counts and no plan changes."""
    out = set()
    phs = gm.graph.find_nodes(op="placeholder")
    for i, (ph, x) in enumerate(zip(phs, example_inputs, strict=False)):
        if not isinstance(x, torch.Tensor) or isinstance(x, torch.nn.Parameter) or x.requires_grad != grad:
            continue
        arg = ph.meta.get("grapharg")
        source = getattr(getattr(arg, "source", None), "name", None)
        name = source() if callable(source) else str(source or "")
        if "_buffers" in name or "_parameters" in name or ph.meta.get("is_buffer", False):
            continue
        out.add(i)
    return frozenset(out)


def lowbit(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """torch.compile backend entry point (``backend="lowbit"``): the pipeline's Dynamo-graph steps
    (:data:`fxlowbit.pipeline.DYNAMO_STEPS`), then AOTAutograd with :class:`LowbitPartitioner`."""
    cfg = LowbitConfig.from_options(options)
    profile = load_profile(cfg.profile)  # once per compile: every step and re-plan shares it
    activations = _activation_inputs(gm, example_inputs), _activation_inputs(gm, example_inputs, grad=False)
    dynamo = pipeline.Context(cfg, profile, label=f"graph{len(STATE.records)}", gm=gm)
    keys = pipeline.run(pipeline.DYNAMO_STEPS, dynamo).sampling_keys
    # probes and re-plans need a plan to revisit: the planner on, with the analysis it plans from
    steps = ("analyze", "plan", "probes")
    if cfg.bits is not None or not cfg.calibrate_every or not all(map(cfg.enabled, steps)):
        partitioner = LowbitPartitioner(
            cfg, _seed(cfg), activations=activations, profile=profile, sampling_keys=keys
        )
        return _compile(gm, example_inputs, cfg, partitioner, mode)
    return _Adaptive(gm, example_inputs, cfg, mode, activations, profile, keys)


def _compile(gm: fx.GraphModule, example_inputs, cfg: LowbitConfig, partitioner, mode: str | None):
    if cfg.inner == "eager":
        importlib.import_module("torch._inductor.lowering")  # its max_pool2d decomposition reads it
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop
        from torch._inductor.decomposition import select_decomp_table

        return aot_autograd(
            fw_compiler=boxed_nop,
            bw_compiler=boxed_nop,
            partition_fn=partitioner,
            decompositions=select_decomp_table(),
            keep_inference_input_mutations=True,
        )(gm, example_inputs)

    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode)) if mode else {}
    patches["custom_partitioner_fn"] = partitioner
    # FXLOWBIT_DUMP_DIR: also keep and write Inductor's generated code (fxlowbit/record.py)
    extra = {"inner_compile": record.inner_compile(partitioner)} if record.dump_dir() else {}
    # AOTAutograd's cache would hand back a previous process's graphs without calling our
    # partitioner (no plan, a stale random stream id): plans are per compilation, so bypass it.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, config_patches=patches, **extra)


class _Adaptive:
    """The compiled graph plus its re-planning: every ``calibrate_every`` training steps (the
    first at ``min(10, calibrate_every)``) a probe measures each saved tensor's sensitivity
    (:mod:`fxlowbit.calibrate`), the planner re-plans with it, and a changed plan switches to
    another compiled variant of the same graph: one already compiled, a new one while fewer than
    ``max_variants`` exist, else the current one stays (recompiles are bounded)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs,
        cfg: LowbitConfig,
        mode: str | None,
        activations: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset()),
        profile: HardwareProfile | None = None,
        sampling_keys: Sequence[int] = (),
    ):
        self.source = copy.deepcopy(gm)  # compile_fx may transform gm in place
        # no reference to example_inputs: a re-plan compiles with the batch that triggers it
        self.cfg, self.mode = cfg, mode
        self.activations = activations
        self.partitioner = LowbitPartitioner(
            cfg, _seed(cfg), activations=activations, profile=profile, sampling_keys=sampling_keys
        )
        self.current = _compile(gm, example_inputs, cfg, self.partitioner, mode)
        self._boxed_call = getattr(self.current, "_boxed_call", False)
        self.variants = {self._signature(self.partitioner): self.current}
        self.plan = self.partitioner.plan  # the plan in force, on the first partition's names
        self.steps = 0
        self.first = min(10, cfg.calibrate_every)
        self.pending: calibrate.Probe | None = None  # a probe waiting for the next batch's gradient
        self.sensitivity: dict[str, float] | None = None
        self.failed = False
        self.unsafe = False  # the last probe found the plan in force far over the variance limit
        if self.partitioner.pristine is not None and torch.is_grad_enabled():
            try:  # the first batch checks the prior's plan before the first step trains on it
                with torch.random.fork_rng(devices=_devices(example_inputs)):
                    with sampling_state.exact():  # replays need the exact gradient
                        self._check_prior(list(example_inputs))
            except Exception as err:
                if cfg.strict:
                    raise
                self.failed = True
                counters["probes_disabled"] += 1
                log.warning("fxlowbit: probes disabled for this graph (%s: %s)", type(err).__name__, err)

    def _check_prior(self, args: list) -> None:
        """The runtime guard's first look: measure the prior plan's whole gradient error on the first
        batch (:func:`fxlowbit.validate.plan_error`, one eager forward and backward). Over the variance
        limit (the gradient's power stands in for the minibatch variance, one batch being at hand),
        probe every tensor on that batch and re-plan before the first step, so no step trains on a
        prior that is wrong for this model (ResNet at default options: 12 dB on the prior)."""
        p, limit = self.partitioner, self.cfg.max_variance_ratio
        measured = None if self.plan is None else self._joint_ratio(self.plan, args, math.inf)
        if measured is None or measured <= limit:
            return
        counters["prior_misses"] += 1
        log.warning(
            "fxlowbit: the prior plan adds %.3g of the first batch's gradient power (limit %g): probing "
            "each saved tensor now and re-planning before the first step", measured, limit,
        )  # fmt: skip
        probe = calibrate.probe_sensitivity(p.pristine, args, p.quantizable, self.cfg.group_size, seed=0)
        var = max(calibrate.gradient_power(probe.grad), 1e-30)
        self.sensitivity = {k: v / var for k, v in probe.sensitivity.items()}
        counters["probes"] += 1
        self._check_jointly(args, var)
        self._guard()
        self.unsafe = True  # the plan in force was measured over the limit
        self._replan(args)

    def _still_good(self, new: Plan) -> bool:
        """Hysteresis against plan churn (each new variant is a compilation): keep the current plan
        while, re-costed with the new measurements, it is within the variance limit and the new
        plan would not save more than 5% of the estimated step time."""
        old = self.plan
        if old is None or old.signature() == new.signature():
            return True
        if self.unsafe:  # measured over the limit: never kept for hysteresis' sake
            return False
        variance = sum(self._measured_variance(old).values())
        return variance <= self.cfg.max_variance_ratio and old.time_s - new.time_s <= 0.05 * new.step_time_s

    @staticmethod
    def _signature(p: LowbitPartitioner):
        return p.plan.signature() if p.plan is not None else None

    def __call__(self, *args):
        if torch.is_grad_enabled() and not self.failed and self.partitioner.pristine is not None:
            self.steps += 1
            due = self.steps >= self.first and (self.steps - self.first) % self.cfg.calibrate_every == 0
            if due or self.pending is not None:
                try:
                    # probes replay the forward (dropout included): leave the user's RNG untouched
                    boxed = len(args) == 1 and isinstance(args[0], list)  # boxed calling convention
                    with torch.random.fork_rng(devices=_devices(args)):
                        with sampling_state.exact():  # replays need the exact gradient
                            self._calibrate(list(args[0] if boxed else args), due)
                except Exception as err:  # a probe must never cost the user's step
                    if self.cfg.strict:
                        raise
                    self.failed = True
                    counters["probes_disabled"] += 1
                    log.warning("fxlowbit: probes disabled for this graph (%s: %s)", type(err).__name__, err)
        return self.current(*args)

    def _calibrate(self, args: list, due: bool) -> None:
        p = self.partitioner
        if self.pending is not None:
            probe, self.pending = self.pending, None
            g2, _, _ = calibrate.exact_gradient(p.pristine, args)
            # The unit of added variance: SGD's own noise, but never more than the gradient's power.
            # With small batches the minibatch variance is many times ||g||^2 (T5 in the matrix),
            # and a plan at 0.05 of it wrecked the gradient (6 dB); capped, 0.05 keeps >= 13 dB.
            power = calibrate.gradient_power(probe.grad)
            var = min(calibrate.minibatch_variance(probe.grad, g2), max(power, 1e-30))
            self.sensitivity = {k: v / var for k, v in probe.sensitivity.items()}
            counters["probes"] += 1
            self.unsafe = False
            self._check_in_force(args, var)
            self._check_jointly(args, var)
            self._guard()
            self._replan(args)
        elif due:
            self.pending = calibrate.probe_sensitivity(
                p.pristine, args, p.quantizable, self.cfg.group_size, seed=self.steps
            )

    GUARD_FACTOR = 10.0  # a measured error this many times the plan's estimate re-plans at once

    def _measured_variance(self, plan: Plan) -> dict[str, float]:
        """Each probed (lossy) tensor's added gradient variance under ``plan``, from the last probe."""
        sens = self.sensitivity or {}
        return {
            d.name: forms.get(d.form).measured_variance(sens[d.name], d)
            for d in plan.decisions
            if forms.get(d.form).probed and d.name in sens
        }

    JOINT_ROUNDS = 3  # re-plans with rescaled sensitivities while a plan's joint error misses
    JOINT_SLACK = 1.25  # over the limit, a measured joint error this close to the estimate: the sum holds

    def _decide(self) -> Plan:
        """The plan for the first partition's records under the current sensitivities."""
        p = self.partitioner
        assert p.facts is not None  # the first partition ran (compiled in __init__)
        return planner.decide(
            p.facts.saved, self.cfg, p.facts.hints, profile=p.profile, sensitivity=self.sensitivity,
            gemms=p.facts.gemms, extra_bytes=p.extra_bytes,
        )  # fmt: skip

    def _joint_ratio(self, plan: Plan, args: list, var: float) -> float | None:
        """``plan``'s gradient error with all its tensors rounded together on the batch ``args``
        (:func:`fxlowbit.validate.plan_error`), in units of ``var`` capped at this batch's own
        gradient power (the probe's batch may have had a larger one: CLIP's contrastive gradient
        changes several-fold between batches); None when the plan rounds nothing."""
        if not any(forms.get(d.form).probed for d in plan.decisions):
            return None
        p = self.partitioner
        err, power = validate.plan_error(p.pristine, args, plan, p.facts, self.cfg, seed=self.steps)
        return err / max(min(var, power), 1e-30)

    def _check_in_force(self, args: list, var: float) -> None:
        """The plan in force, measured as a whole on this batch: over the limit, it is not kept
        (hysteresis) and may be replaced past ``max_variants``. Its first-step figure can drift as
        training moves the weights (CLIP at default options: 25 dB on the first step, 10 dB at
        step 11 under the same plan)."""
        measured = None if self.plan is None else self._joint_ratio(self.plan, args, var)
        if measured is not None and measured > self.cfg.max_variance_ratio:
            self.unsafe = True
            counters["guard_replans"] += 1
            log.warning(
                "fxlowbit: step %d: the plan in force adds %.3g of the gradient variance (limit %g), "
                "measured with all its tensors rounded together; re-planning now",
                self.steps, measured, self.cfg.max_variance_ratio,
            )  # fmt: skip

    def _check_jointly(self, args: list, var: float) -> None:
        """Measure the plan the probes lead to with all its tensors rounded together
        (:func:`fxlowbit.validate.plan_error`); when that error exceeds the sum of the single-tensor
        estimates (errors compound through the backward), scale every sensitivity by the miss and
        plan again, so the plan that gets compiled meets ``max_variance_ratio`` as measured."""
        limit = self.cfg.max_variance_ratio
        for _ in range(self.JOINT_ROUNDS):
            plan = self._decide()
            measured, estimated = self._joint_ratio(plan, args, var), plan.variance_ratio
            if measured is None or measured <= max(limit, self.JOINT_SLACK * estimated):
                return  # within the limit, or (a hard budget over it) as close as the sum said
            scale = measured / max(estimated, 1e-12)
            self.sensitivity = {k: v * scale for k, v in (self.sensitivity or {}).items()}
            counters["joint_rescales"] += 1
            log.warning(
                "fxlowbit: step %d: the plan's tensors rounded together add %.3g of the gradient variance "
                "against %.3g estimated from one at a time; sensitivities scaled by %.3g and re-planned",
                self.steps, measured, estimated, scale,
            )  # fmt: skip

    def _guard(self) -> None:
        """The runtime guard: when a probe measures a tensor's gradient error far above what the
        plan in force assumed (a prior wrong for an op kind), say so; the re-plan that follows then
        may compile past ``max_variants`` (see :meth:`_replan`)."""
        if self.plan is None:
            return
        estimated = {d.name: d.variance for d in self.plan.decisions}
        measured = self._measured_variance(self.plan)
        ratios = ((v / max(estimated.get(k, 0.0), 1e-12), k) for k, v in measured.items())
        worst = max(ratios, default=(0.0, ""))
        total = sum(measured.values())
        if worst[0] > self.GUARD_FACTOR and total > self.cfg.max_variance_ratio:
            self.unsafe = True
            counters["guard_replans"] += 1
            log.warning(
                "fxlowbit: step %d: the probe measured %.3g x the estimated gradient error of %r (the plan "
                "adds %.3g of the minibatch variance, limit %g); re-planning now",
                self.steps, worst[0], worst[1], total, self.cfg.max_variance_ratio,
            )  # fmt: skip

    def _replan(self, args: list) -> None:
        p = self.partitioner
        plan = self._decide()
        sig = plan.signature()
        log.info("fxlowbit re-plan at step %d (the plan is logged by fxlowbit.planner)", self.steps)
        if self._still_good(plan):
            return
        self.plan = plan
        if sig in self.variants:
            self.current = self.variants[sig]
            return
        if len(self.variants) >= self.cfg.max_variants and not self.unsafe:
            log.info(
                "fxlowbit: %d plan variants compiled already; keeping the current one", len(self.variants)
            )
            return
        assert p.facts is not None and self.sensitivity is not None  # re-plans follow a probe
        keys = planner.canonical_keys(p.facts.saved)
        by_key = {keys[name]: v for name, v in self.sensitivity.items() if name in keys}
        q = LowbitPartitioner(
            self.cfg, _seed(self.cfg), sensitivity=by_key, activations=self.activations, profile=p.profile,
            sampling_keys=p.sampling_keys,
        )  # fmt: skip
        fn = _compile(copy.deepcopy(self.source), args, self.cfg, q, self.mode)
        self.variants[sig] = fn
        self.current = fn
        counters["plan_variants"] += 1
