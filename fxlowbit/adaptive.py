"""Re-planning a compiled graph as training goes: the first-batch check, probes, re-plans, the guard.

:func:`fxlowbit.backend.lowbit` returns an :class:`Adaptive` when the cost-model planner plans the
graph and ``calibrate_every`` is set: it calls the compiled graph and, every ``calibrate_every``
steps, replays the step eagerly to measure each saved tensor's sensitivity
(:mod:`fxlowbit.calibrate`), re-plans with the measurements (:func:`fxlowbit.planner.decide`),
checks the plans with all their tensors rounded together (:func:`fxlowbit.validate.plan_error`)
and switches to a compiled variant of the graph for a changed plan.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.fx as fx

from . import calibrate, forms, planner, validate
from .codegen import rng
from .codegen.kernels import sampling_state
from .config import LowbitConfig
from .plan import Plan
from .state import STATE
from .step import gc_paused

if TYPE_CHECKING:
    from .backend import LowbitPartitioner

# the backend's logger: its warnings and re-plan lines have always come from "fxlowbit.backend"
log = logging.getLogger("fxlowbit.backend")

__all__ = ["Adaptive", "CompileVariant"]

counters = STATE.counters


class CompileVariant(Protocol):
    """Compiles a variant of the graph (``fxlowbit.backend.lowbit`` makes one per graph):
    ``sensitivity`` None for the first compile (the planner's prior), else the measured
    sensitivities by :func:`fxlowbit.planner.canonical_keys`; returns the variant's partitioner
    (after the compile: its plan, facts and pristine pair) and the compiled graph."""

    def __call__(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], sensitivity: dict[tuple, float] | None, /
    ) -> tuple[LowbitPartitioner, Callable[..., Any]]: ...


def _devices(args) -> list:
    flat = args[0] if len(args) == 1 and isinstance(args[0], list) else args
    return sorted({a.device.index or 0 for a in flat if isinstance(a, torch.Tensor) and a.is_cuda})


class Adaptive:
    """The compiled graph plus its re-planning: every ``calibrate_every`` training steps (the
    first at ``min(10, calibrate_every)``) a probe measures each saved tensor's sensitivity
    (:mod:`fxlowbit.calibrate`), the planner re-plans with it, and a changed plan switches to
    another compiled variant of the same graph: one already compiled, a new one while fewer than
    ``max_variants`` exist, else the current one stays (recompiles are bounded). A plan that keeps
    every saved tensor as it is within its budget is never probed (:meth:`_settled`). ``gm`` is
    compiled here, with ``compile_variant``, as is each new variant (from a copy of ``gm``)."""

    def __init__(
        self, gm: fx.GraphModule, example_inputs, cfg: LowbitConfig, compile_variant: CompileVariant
    ):
        self.source = copy.deepcopy(gm)  # compile_fx may transform gm in place
        # no reference to example_inputs: a re-plan compiles with the batch that triggers it
        self.cfg, self.compile_variant = cfg, compile_variant
        self.partitioner, self.current = compile_variant(gm, example_inputs, None)
        self._boxed_call = getattr(self.current, "_boxed_call", False)
        self.variants = {self._signature(self.partitioner): self.current}
        self.plan = self.partitioner.plan  # the plan in force, on the first partition's names
        self.steps = 0
        self.first = min(10, cfg.calibrate_every)
        self.pending: calibrate.Probe | None = None  # a probe waiting for the next batch's gradient
        self.sensitivity: dict[str, float] | None = None
        self.failed = False
        self.unsafe = False  # the last probe found the plan in force far over the variance limit
        # plan_error's (error, power) by plan signature on the batch being checked (cleared for each
        # batch): a plan is measured once per batch
        self._joint: dict[Any, tuple[float, float]] = {}
        # a plan that stores every tensor as it is within its budget: no probe can better it (every
        # other form adds time or variance), so none runs (TinyGPT under min-cut's pair, Inductor
        # inner, 1 CPU thread: step 10 took 68-70 ms against 24-27 ms for the others, 2026-12-06)
        self.settled = self._settled()
        if self.settled:
            counters["probes_not_needed"] += 1
            log.info("fxlowbit: the plan keeps every saved tensor as it is within its budget: no probes")
        if self.partitioner.prior_checked():
            # a cache hit: the process that compiled this plan checked it on its first batch
            counters["prior_checks_kept"] += 1
        elif self.partitioner.probed and torch.is_grad_enabled():
            try:  # the first batch checks the prior's plan before the first step trains on it
                with torch.random.fork_rng(devices=_devices(example_inputs)), rng.fork(), gc_paused():
                    with sampling_state.exact():  # replays need the exact gradient
                        if self._check_prior(list(example_inputs)):
                            self.partitioner.keep_prior_check()
            except Exception as err:
                if cfg.strict:
                    raise
                self.failed = True
                counters["probes_disabled"] += 1
                log.warning("fxlowbit: probes disabled for this graph (%s: %s)", type(err).__name__, err)

    def _settled(self) -> bool:
        """Whether the plan in force adds neither time nor variance and meets its budget, with no
        sampled linear in the graph (their keep ratios share the variance budget)."""
        plan = self.plan
        return (
            plan is not None
            and plan.budget is not None
            and plan.bytes_after <= plan.budget
            and not self.partitioner.sampling_keys
            and all(d.time_s == 0 and d.variance == 0 for d in plan.decisions)
        )

    def _check_prior(self, args: list) -> bool:
        """The runtime guard's first look: measure the prior plan's whole gradient error on the first
        batch (:func:`fxlowbit.validate.plan_error`, one eager forward and backward). Over the variance
        limit (the gradient's power stands in for the minibatch variance, one batch being at hand),
        probe every tensor on that batch and re-plan before the first step, so no step trains on a
        prior that is wrong for this model (ResNet at default options: 12 dB on the prior). True when
        the prior passed."""
        p, limit = self.partitioner, self.cfg.max_variance_ratio
        self._joint.clear()
        measured = None if self.plan is None else self._joint_ratio(self.plan, args, math.inf)
        if measured is None or measured <= limit:
            return True
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
        self.replan(args)
        return False

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
        if torch.is_grad_enabled() and not self.failed and not self.settled and self.partitioner.probed:
            self.steps += 1
            due = self.steps >= self.first and (self.steps - self.first) % self.cfg.calibrate_every == 0
            if due or self.pending is not None:
                try:
                    # probes replay the forward (dropout included): leave the user's RNG untouched
                    boxed = len(args) == 1 and isinstance(args[0], list)  # boxed calling convention
                    with torch.random.fork_rng(devices=_devices(args)), rng.fork(), gc_paused():
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
        self._joint.clear()  # another batch
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
            self.replan(args)
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
            # a re-partitioned pair (min-cut's recompute) keeps the budget the default pair's bytes set
            budget_bytes=p.plan.budget if p.plan is not None and p.plan.partition else None,
        )  # fmt: skip

    def _joint_ratio(self, plan: Plan, args: list, var: float) -> float | None:
        """``plan``'s gradient error with all its tensors rounded together on the batch ``args``
        (:func:`fxlowbit.validate.plan_error`), in units of ``var`` capped at this batch's own
        gradient power (the probe's batch may have had a larger one: CLIP's contrastive gradient
        changes several-fold between batches); None when the plan rounds nothing."""
        if not planner.lossy(plan):
            return None
        p, key = self.partitioner, plan.signature()
        if key not in self._joint:  # the plan in force and the re-plan are often one plan
            self._joint[key] = validate.plan_error(p.pristine, args, plan, p.facts, self.cfg, seed=self.steps)
        err, power = self._joint[key]
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
        may compile past ``max_variants`` (see :meth:`replan`)."""
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

    def replan(self, args: list) -> None:
        """Plan again from the sensitivities measured so far and compile the plan as a new variant
        (or reuse the one whose plan it equals); called by the probes and the guard, and wrapped by
        benchmarks/calibration.py to time it."""
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
        _, fn = self.compile_variant(copy.deepcopy(self.source), args, by_key)
        self.variants[sig] = fn
        self.current = fn
        counters["plan_variants"] += 1
