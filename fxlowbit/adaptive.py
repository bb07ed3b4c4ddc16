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
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.fx as fx

from . import calibrate, forms, planner, validate
from .codegen import rng
from .codegen.kernels import sampling_state
from .codegen.kernels.lowbit_linear import LOWBIT, plain_format
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
    sensitivities by :func:`fxlowbit.planner.canonical_keys`; ``limit``: the ``max_variance_ratio``
    its compression plans with (None: the option's); returns the variant's partitioner
    (after the compile: its plan, facts and pristine pair) and the compiled graph."""

    def __call__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        sensitivity: dict[tuple, float] | None,
        limit: float | None = None,
        /,
    ) -> tuple[LowbitPartitioner, Callable[..., Any]]: ...


def lowbit_gradient_linears(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``fxlowbit::lowbit_linear`` calls of a Dynamo graph whose grad-input or grad-weight GEMM
    is low-bit: their stochastic rounding adds gradient variance (args: x, w, bias, fwd_fmt,
    gi_fmt, gw_fmt, hadamard, stream)."""
    calls = gm.graph.find_nodes(op="call_function", target=torch.ops.fxlowbit.lowbit_linear.default)
    return [n for n in calls if n.args[4] in LOWBIT or n.args[5] in LOWBIT]


def plain_gradient_gemms(gm: fx.GraphModule) -> int:
    """Make the gradient GEMMs of ``gm``'s low-bit linears plain (in place; the forward GEMMs keep
    their formats, which add no gradient variance); returns how many linears changed."""
    from .passes import linears

    nodes = lowbit_gradient_linears(gm)
    for n in nodes:
        x = linears.value(n.args[0])
        assert x is not None  # the pass that made the node read it
        plain = plain_format(x.dtype)
        n.args = (*n.args[:4], plain, plain, *n.args[6:])
    if nodes:
        gm.recompile()
    return len(nodes)


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
        self.current_key: tuple[Any, bool] = (self._signature(self.partitioner.plan), False)
        self.variants = {self.current_key: self.current}
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
        # the low-bit gradient GEMMs' added variance (stochastic rounding of the output gradient),
        # measured on the first batch and at each probe; over the limit, every variant runs them plain
        self.gemm_linears = len(lowbit_gradient_linears(self.source))
        self.gemm_noise: float | None = None
        self.gemms_plain = False
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
            # the first batch checks the prior's plan before the first step trains on it
            self._guarded(self._check_prior_and_keep, list(example_inputs))
        if self.gemm_linears and self.partitioner.probed and torch.is_grad_enabled() and not self.failed:
            self._guarded(self._check_gemms, list(example_inputs), None, None)

    def _check_prior_and_keep(self, args: list) -> None:
        """:meth:`_check_prior`, and a passed check kept with the partition (for cache hits)."""
        if self._check_prior(args):
            self.partitioner.keep_prior_check()

    @property
    def limit(self) -> float:
        """The added variance the plan's compression may use: ``max_variance_ratio`` less what the
        low-bit gradient GEMMs were last measured to add (one budget for both; sampling's targets
        get what the plan leaves, fxlowbit/pipeline.py)."""
        return max(self.cfg.max_variance_ratio - (self.gemm_noise or 0.0), 1e-9)

    def _plan_cfg(self) -> LowbitConfig:
        """The options the compression plans with: :attr:`limit` as ``max_variance_ratio``."""
        if self.limit == self.cfg.max_variance_ratio:
            return self.cfg
        return dataclasses.replace(self.cfg, max_variance_ratio=self.limit)

    def _guarded(self, check: Callable[..., None], args: list, *more: Any) -> None:
        """Run a probe or check on ``args`` with the user's RNG and the random streams untouched,
        gradients exact unless it asks otherwise; a failure disables the probes of this graph with
        one warning (``strict`` raises): a probe must never cost the user's step."""
        try:
            with torch.random.fork_rng(devices=_devices(args)), rng.fork(), gc_paused():
                with sampling_state.exact():  # replays need the exact gradient
                    check(args, *more)
        except Exception as err:
            if self.cfg.strict:
                raise
            self.failed = True
            counters["probes_disabled"] += 1
            log.warning("fxlowbit: probes disabled for this graph (%s: %s)", type(err).__name__, err)

    def _check_gemms(self, args: list, exact: torch.Tensor | None, var: float | None) -> None:
        """Measure what the low-bit gradient GEMMs add to the gradient on the batch ``args``: the
        pristine pair replayed with them as planned against the exact replay (the same forward, its
        low-bit forward GEMMs included, which round to nearest and add no variance), one draw of
        their noise, in units of ``var`` capped by the gradient's power (the power alone on the
        first batch). Over ``max_variance_ratio`` they leave the limit nothing: warn, and compile
        the graph again with those GEMMs plain before the next step trains on them."""
        p, limit = self.partitioner, self.cfg.max_variance_ratio
        if exact is None:
            exact, _, _ = calibrate.exact_gradient(p.pristine, args)
        with sampling_state.exact(gemms=False):
            noisy, _, _ = calibrate.exact_gradient(p.pristine, args, seed=0)
        power = calibrate.gradient_power(exact)
        unit = max(min(var, power) if var is not None else power, 1e-30)
        self.gemm_noise = float(((noisy - exact) ** 2).sum()) / unit
        counters["gemm_noise_checks"] += 1
        plain = self.gemm_noise > limit
        unit_name = "gradient power" if var is None else "minibatch variance"
        STATE.gemm_noise.append(
            {"graph": id(self), "step": self.steps, "linears": self.gemm_linears, "ratio": self.gemm_noise,
             "limit": limit, "unit": unit_name, "plain": plain}
        )  # fmt: skip
        log.info(
            "fxlowbit: step %d: the low-bit gradient GEMMs of %d linear(s) add %.3g of the gradient "
            "variance (limit %g)", self.steps, self.gemm_linears, self.gemm_noise, limit,
        )  # fmt: skip
        if not plain:
            return
        counters["gemm_noise_fallbacks"] += 1
        log.warning(
            "fxlowbit: step %d: the int8/fp8 gradient GEMMs of %d linear(s) add %.3g of the gradient "
            "variance on their own (limit max_variance_ratio=%g): they run plain from now on (a "
            "recompile; the forward GEMMs stay low-bit)",
            self.steps, self.gemm_linears, self.gemm_noise, limit,
        )  # fmt: skip
        self.gemms_plain = True
        self.gemm_noise = 0.0
        if var is None:  # the first batch or a settled plan; a probe's re-plan compiles it below
            self._compile(self.plan, args)

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
        return variance <= self.limit and old.time_s - new.time_s <= 0.05 * new.step_time_s

    @staticmethod
    def _signature(plan: Plan | None):
        return plan.signature() if plan is not None else None

    def __call__(self, *args):
        gemms = self.gemm_linears and not self.gemms_plain
        live = torch.is_grad_enabled() and not self.failed and self.partitioner.probed
        if live and (gemms or not self.settled):
            self.steps += 1
            due = self.steps >= self.first and (self.steps - self.first) % self.cfg.calibrate_every == 0
            # probes replay the forward (dropout included): the user's RNG is left untouched
            boxed = len(args) == 1 and isinstance(args[0], list)  # boxed calling convention
            if self.settled and due:  # nothing to probe but the gradient GEMMs' noise
                self._guarded(self._check_gemms, list(args[0] if boxed else args), None, None)
            elif not self.settled and (due or self.pending is not None):
                self._guarded(self._calibrate, list(args[0] if boxed else args), due)
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
            if self.gemm_linears and not self.gemms_plain:
                self._check_gemms(args, g2, var)
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
            p.facts.saved, self._plan_cfg(), p.facts.hints, profile=p.profile, sensitivity=self.sensitivity,
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
        if measured is not None and measured > self.limit:
            self.unsafe = True
            counters["guard_replans"] += 1
            log.warning(
                "fxlowbit: step %d: the plan in force adds %.3g of the gradient variance (limit %g), "
                "measured with all its tensors rounded together; re-planning now",
                self.steps, measured, self.limit,
            )  # fmt: skip

    def _check_jointly(self, args: list, var: float) -> None:
        """Measure the plan the probes lead to with all its tensors rounded together
        (:func:`fxlowbit.validate.plan_error`); when that error exceeds the sum of the single-tensor
        estimates (errors compound through the backward), scale every sensitivity by the miss and
        plan again, so the plan that gets compiled meets its :attr:`limit` as measured."""
        limit = self.limit
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
        if worst[0] > self.GUARD_FACTOR and total > self.limit:
            self.unsafe = True
            counters["guard_replans"] += 1
            log.warning(
                "fxlowbit: step %d: the probe measured %.3g x the estimated gradient error of %r (the plan "
                "adds %.3g of the minibatch variance, limit %g); re-planning now",
                self.steps, worst[0], worst[1], total, self.limit,
            )  # fmt: skip

    def replan(self, args: list) -> None:
        """Plan again from the sensitivities measured so far and compile the plan as a new variant
        (or reuse the one whose plan it equals); called by the probes and the guard, and wrapped by
        benchmarks/calibration.py to time it."""
        plan = self._decide()
        log.info("fxlowbit re-plan at step %d (the plan is logged by fxlowbit.planner)", self.steps)
        if not self._still_good(plan):
            self._compile(plan, args)
        elif self.current_key[1] != self.gemms_plain:
            self._compile(self.plan, args)  # the plan in force, its gradient GEMMs now plain

    def _compile(self, plan: Plan | None, args: list) -> None:
        """Switch to the variant of ``plan`` (with the gradient GEMMs as :attr:`gemms_plain` says):
        one already compiled, else a new one, past ``max_variants`` only when the plan in force was
        measured over the limit or the gradient GEMMs turned plain."""
        p = self.partitioner
        key = (self._signature(plan), self.gemms_plain)
        self.plan = plan
        if key in self.variants:
            self.current, self.current_key = self.variants[key], key
            return
        gemms_changed = key[1] != self.current_key[1]
        if len(self.variants) >= self.cfg.max_variants and not self.unsafe and not gemms_changed:
            log.info(
                "fxlowbit: %d plan variants compiled already; keeping the current one", len(self.variants)
            )
            return
        by_key = None
        if self.sensitivity is not None:  # None: the first batch turned the gradient GEMMs plain
            assert p.facts is not None
            keys = planner.canonical_keys(p.facts.saved)
            by_key = {keys[name]: v for name, v in self.sensitivity.items() if name in keys}
        source = copy.deepcopy(self.source)
        if self.gemms_plain:
            plain_gradient_gemms(source)
        _, fn = self.compile_variant(source, args, by_key, self.limit)
        self.variants[key] = fn
        self.current, self.current_key = fn, key
        counters["plan_variants"] += 1
