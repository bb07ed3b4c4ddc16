"""Choose a stored form for every saved tensor: keep, recompute, 1-bit masks or b-bit quantization.

Works on the plain records of :mod:`fxlowbit.records` (made by :mod:`fxlowbit.passes.analyze`) and
never touches torch.fx graphs.

1. :mod:`fxlowbit.candidates` lists the forms a tensor may take (:func:`candidates`): it sorts the
   tensor into a kind (:data:`fxlowbit.forms.KINDS`) and asks every form of the registry
   :mod:`fxlowbit.forms`, which says where it applies and prices it with
   :mod:`fxlowbit.costmodel`'s figures: stored bytes, seconds added to the step and gradient
   variance added, in units of the minibatch gradient variance.
2. :func:`decide` picks one form per tensor minimising ``time + w * step_time * variance`` under
   the memory budget with :func:`fxlowbit.knapsack.solve` (exact dynamic programming over the
   budget, sizes rounded up, so a plan found is always within budget; a documented greedy beyond
   ``DP_LIMIT`` cells). ``w`` starts at 1 (a variance ratio ``r`` costs about ``r`` more steps,
   i.e. ``r * step_time``) and is raised until the plan's variance ratio is within
   ``max_variance_ratio``; when the budget makes that impossible the plan with the least variance
   within budget is used and one warning gives the best achievable figures.

``bits=b`` instead asks for the fixed uniform rule (every compressible tensor at b bits), the
baseline the cost-model plans are measured against.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping, Sequence

import sympy

from . import costmodel as cm
from . import forms as _forms
from .candidates import (
    UnsupportedOpError,
    _fixed,
    _free,
    candidates,
    canonical_keys,
    graph_candidates,
    may_quantize,
)
from .config import LowbitConfig
from .costmodel import Costs, stored_bytes
from .knapsack import solve
from .plan import Decision, Form, Plan
from .records import Gemm, SavedTensor
from .state import STATE

log = logging.getLogger(__name__)
_warned: set[str] = STATE.warned  # warn-once keys (fxlowbit.state; reset() clears them)

__all__ = [
    "decide",
    "objective",
    "lossy",
    "at_hints",
    "warn_status",
    "candidates",
    "solve",
    "stored_bytes",
    "UnsupportedOpError",
    "step_time",
    "canonical_keys",
    "may_quantize",
]

_W_MAX = 1e9
# Narrowest width a tensor gets on its prior sensitivity alone when the budget is the mode's (soft):
# the prior cannot tell which tensors tolerate 2 bits (uniform 2-bit wrecks transformer gradients,
# -27 to -0.3 dB, ../DESIGN.md section 4), and under it T5 and Qwen3-MoE fell to 13 and -11 dB at
# default options. A probe's measurement, or an explicit memory_budget, unlocks 2 bits.
PRIOR_MIN_BITS = 4


def _warn_once(key: str, msg: str, stacklevel: int = 3) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=stacklevel)


def step_time(gemms: Sequence[Gemm], profile: cm.HardwareProfile, activation_bytes: float) -> float:
    """Rough seconds of one uncompressed step: every GEMM at the profile's throughput, plus the
    saved activations written, read back and their gradients formed at copy bandwidth."""
    t = sum(profile.matmul_time(g.flops, g.dtype) for g in gemms)
    return t + 4 * activation_bytes / (profile.copy_gbps * 1e9)


def at_hints(expr: int | sympy.Expr, subs: Mapping) -> int:
    """A byte count (int or sympy expression of the sizes) at the example sizes."""
    return int(sympy.sympify(expr).subs(subs))


def lossy(plan: Plan) -> bool:
    """Whether the plan stores any tensor in a lossy form (one the probes measure)."""
    return any(_forms.get(d.form).probed for d in plan.decisions)


def objective(plan: Plan, gemms: Sequence[Gemm], profile: cm.HardwareProfile, t_ref: float) -> float:
    """Estimated seconds of a step of one partition under ``plan``: every GEMM of its forward and
    backward at the profile's throughput (a partition that recomputes GEMMs has them in its
    backward), the seconds the plan adds, and its variance ratio priced as that many steps of
    ``t_ref`` seconds (the objective :func:`decide` minimises at weight 1). Compares two
    partitions of one graph."""
    return step_time(gemms, profile, 0) + plan.time_s + t_ref * plan.variance_ratio


def _budget(cfg: LowbitConfig, total: int) -> int:
    b = cfg.budget
    return int(b * total) if b <= 1 else int(b)


# -- the plan -------------------------------------------------------------------------------------
def decide(
    saved: Sequence[SavedTensor],
    cfg: LowbitConfig,
    subs: dict | None = None,
    *,
    profile: cm.HardwareProfile | None = None,
    sensitivity: Mapping[str, float] | None = None,
    gemms: Sequence[Gemm] = (),
    extra_bytes: int | sympy.Expr = 0,
    budget_bytes: int | None = None,
    warn: bool = True,
) -> Plan:
    """Plan for a tuple of :class:`~fxlowbit.records.SavedTensor` records: the cost-model
    plan, or the uniform rule when ``cfg.bits`` is set. ``sensitivity``: measured sensitivities by
    saved-tensor name (units of the minibatch gradient variance, see :mod:`fxlowbit.calibrate`).
    ``extra_bytes``: saved bytes the model holds without fxlowbit beyond ``saved`` (the logits a
    fused loss no longer saves, :func:`fxlowbit.passes.linear_ce.unfused_extra_bytes`), a sympy
    expression of the sizes: a fractional budget is a fraction of the uncompressed bytes with them.
    ``budget_bytes``: the budget in bytes, given (another partition of the same graph, planned
    under the budget the default partition's bytes set). ``warn``: warn when the status says the
    budget or the variance limit was missed (else the caller does, with :func:`warn_status`)."""
    subs = subs or {}
    if cfg.bits is not None:
        plan = _uniform(saved, cfg, subs)
        log.info("plan (uniform %d-bit rule):\n%s", cfg.bits, plan)
        return plan
    profile = profile or cm.load_profile(cfg.profile)
    min_prior_bits = PRIOR_MIN_BITS if cfg.memory_budget is None else 0
    forms = graph_candidates(
        saved, cfg, profile, subs, sensitivity=sensitivity, min_prior_bits=min_prior_bits
    )
    options = forms(subs)
    total = sum(c[0].nbytes for c, _, _ in options)  # uncompressed saved-activation bytes
    budget = _budget(cfg, total + at_hints(extra_bytes, subs)) if budget_bytes is None else budget_bytes
    t_step = step_time(gemms, profile, total)
    pick, _, status = _choose(
        [c for c, _, _ in options], budget, t_step, cfg.max_variance_ratio, soft=cfg.memory_budget is None
    )
    if warn:
        warn_status(status)
    pick, status = _hold_when_sizes_grow(
        saved, cfg, subs, forms, options, pick, status, budget, t_step, extra_bytes
    )
    decisions = []
    for s, (costs, why, n), k in zip(saved, options, pick, strict=True):
        c = costs[k]
        decisions.append(_decision(s, c, why[k], n if _forms.get(c.form).carries_masks else 0, subs))
    plan = Plan(
        tuple(decisions),
        budget=budget,
        step_time_s=t_step,
        variance_ratio=sum(costs[k].variance for (costs, _, _), k in zip(options, pick, strict=True)),
        status=status,
    )
    log.info("plan (budget %d bytes, %s sensitivity):\n%s", budget, "measured" if sensitivity else "prior",
             plan)  # fmt: skip
    return plan


GROWTH_CHECKS = 3  # re-solves allowed to keep a symbolic plan within budget at grown sizes


def _hold_when_sizes_grow(saved, cfg, subs, forms, options, pick, status, budget, t_step, extra_bytes=0):
    """A plan over symbolic sizes runs at other sizes too (later batch sizes and sequence lengths
    reuse the graph), where its stored fraction of the bytes shifts (T^2 attention terms, constant
    tensors). Check it with every size doubled; if the fraction exceeds a fractional budget there,
    solve again with the budget scaled down by the overshoot (at most ``GROWTH_CHECKS`` times)."""
    extra = sympy.sympify(extra_bytes)
    free = {sym for s in saved for sym in sympy.sympify(s.nbytes).free_symbols} | extra.free_symbols
    frac = cfg.budget
    if not free or frac > 1 or pick is None or "cannot be met" in status or "yields" in status:
        return pick, status
    at = {**subs, **{sym: 2 * int(subs.get(sym, 1)) for sym in free}}
    grown = forms(at)
    total2 = sum(c[0].nbytes for c, _, _ in grown) + int(extra.subs(at))
    scaled = budget
    for _ in range(GROWTH_CHECKS):
        used2 = sum(c[k].nbytes for (c, _, _), k in zip(grown, pick, strict=True))
        if used2 <= frac * total2:
            return pick, status
        scaled = int(scaled * frac * total2 / used2) - 1
        new_pick, _, new_status = _choose([c for c, _, _ in options], scaled, t_step, cfg.max_variance_ratio)
        if new_pick is None or "cannot be met" in new_status:
            break
        pick, status = new_pick, new_status
    return pick, status


def _choose(
    items: list[list[Costs]],
    budget: int,
    t_step: float,
    max_ratio: float,
    soft: bool = False,
):
    """(choice per item, variance weight used, status line; :func:`warn_status` warns when it
    says the budget or the variance limit was missed). ``soft``: the budget came from ``mode``,
    not from the user, so the variance limit wins: when no plan within the budget meets it, the
    smallest plan that does is used and the status says by how much the budget was missed."""

    def run(w: float, at: int = budget):
        pick = solve([[(c.nbytes, c.time_s + w * t_step * c.variance) for c in it] for it in items], at)
        ratio = None if pick is None else sum(it[k].variance for it, k in zip(items, pick, strict=True))
        return pick, ratio

    pick, ratio = run(1.0)
    if all(len(it) == 1 for it in items):
        return [0] * len(items), 1.0, "nothing to choose: every saved tensor has one form"
    if soft and (pick is None or ratio > max_ratio):
        best_pick, best_ratio = run(_W_MAX)
        if best_pick is None or best_ratio > max_ratio:  # the mode's budget yields to the variance limit
            least = _least_bytes_within(items, max_ratio)
            if least > budget:
                pick, weight, _ = _choose(items, least, t_step, max_ratio)
                msg = (
                    f"fxlowbit: the mode's memory budget of {budget} saved bytes needs more gradient "
                    f"variance than max_variance_ratio={max_ratio:g}, so the budget yields to the variance "
                    f"limit: storing {least} bytes ({least / max(budget, 1):.2f}x the budget)"
                )
                return pick, weight, msg
    if pick is None:  # even the smallest forms exceed the budget
        pick = [_smallest(it) for it in items]
        least = sum(it[k].nbytes for it, k in zip(items, pick, strict=True))
        msg = (
            f"fxlowbit: memory budget of {budget} saved bytes cannot be met: the smallest plan "
            f"stores {least} bytes; using it"
        )
        over = sum(it[k].variance for it, k in zip(items, pick, strict=True))
        if over > max_ratio:  # never silent: the smallest forms can wreck the gradient
            msg += (
                f", at an est. gradient variance ratio of {over:.3g} > max_variance_ratio={max_ratio:g} "
                f"(expect degraded training; within the limit the smallest plan stores "
                f"{_least_bytes_within(items, max_ratio)} bytes)"
            )
        return pick, math.inf, msg
    if ratio <= max_ratio:
        return pick, 1.0, "ok"
    lo, hi = 1.0, _W_MAX
    best_pick, best_ratio = run(hi)
    if best_ratio > max_ratio:
        least_bytes = _least_bytes_within(items, max_ratio)
        msg = (
            f"fxlowbit: memory budget of {budget} saved bytes needs a gradient variance ratio of "
            f"{best_ratio:.3g} > max_variance_ratio={max_ratio:g}; using the least-variance plan within "
            f"budget. Within the variance limit the smallest plan stores {least_bytes} bytes"
        )
        return best_pick, hi, msg
    for _ in range(40):  # smallest weight meeting the limit: the fastest plan that does
        mid = math.sqrt(lo * hi)
        p, r = run(mid)
        if r is not None and r <= max_ratio:
            hi, best_pick = mid, p
        else:
            lo = mid
        if hi / lo < 1.05:
            break
    return best_pick, hi, "ok"


_STATUS_KEYS = {  # a phrase of the status line -> its warn-once key
    "budget yields": "soft-budget",
    "cannot be met": "budget",
    "needs a gradient variance": "variance",
}


def warn_status(status: str) -> None:
    """Warn once per kind when a plan's status says a budget or the variance limit was missed."""
    key = next((k for text, k in _STATUS_KEYS.items() if text in status), None)
    if key is not None:
        _warn_once(key, status, stacklevel=4)


def _smallest(choices: Sequence[Costs]) -> int:
    """The index of the fewest-bytes choice (ties: the least variance, then the first)."""
    return min(range(len(choices)), key=lambda k: (choices[k].nbytes, choices[k].variance))


def _least_bytes_within(items: list[list[Costs]], max_ratio: float) -> int:
    """Smallest stored bytes of a plan whose variance ratio is within ``max_ratio`` (bisection on
    the budget with the least-variance solver)."""
    hi = sum(it[0].nbytes for it in items)
    lo = 0
    while hi - lo > max(1, hi // 200):
        mid = (lo + hi) // 2
        pick = solve([[(c.nbytes, c.variance) for c in it] for it in items], mid)
        ok = pick is not None and sum(it[k].variance for it, k in zip(items, pick, strict=True)) <= max_ratio
        lo, hi = (lo, mid) if ok else (mid, hi)
    return hi


def _decision(s: SavedTensor, c: Costs, reason: str, masks: int, subs) -> Decision:
    return Decision(
        name=s.name,
        producer=s.producer,
        shape=tuple(d if isinstance(d, int) else str(d) for d in s.shape),
        dtype=str(s.dtype).replace("torch.", ""),
        form=c.form,
        bits=_forms.get(c.form).decision_bits(c, masks, s.itemsize),
        bytes_before=0 if _free(s) else int(sympy.sympify(s.nbytes).subs(subs)),
        bytes_after=c.nbytes,
        reason=reason,
        masks=masks,
        time_s=c.time_s,
        variance=c.variance,
    )


# -- the uniform rule (baseline) ------------------------------------------------------------------
def _uniform(saved: Sequence[SavedTensor], cfg: LowbitConfig, subs) -> Plan:
    """Every compressible tensor at ``cfg.bits`` (masks where exact), no budget; the only recompute is
    of tensors that are functions of graph inputs alone (weight casts), which are not activations."""
    assert cfg.bits is not None  # decide() takes the uniform rule only when bits is set
    profile = None
    decisions = []
    for s in saved:
        fixed = _fixed(s, cfg)
        r = s.recompute
        if fixed:
            c, why, n = Costs(Form.KEEP, 0, 0 if _free(s) else _at(s.nbytes, subs), 0.0, 0.0), fixed, 0
        elif cfg.recompute and r is not None and r.from_inputs and not r.flops:
            # not an activation (e.g. autocast's bf16 copy of a weight): replayed exactly, never rounded
            c, n = Costs(Form.RECOMPUTE, 0, 0, 0.0, 0.0), 0
            why = f"a function of graph inputs only: replayed in the backward ({len(r.nodes)} op(s))"
        else:
            profile = profile or cm.load_profile(cfg.profile)
            uni = dataclasses.replace(cfg, bits=None, allowed_bits=(cfg.bits,), recompute=False)
            costs, whys, n = candidates(s, uni, profile, subs=subs)
            k = len(costs) - 1  # the most compressed of keep / mask / quant at cfg.bits
            c, why = costs[k], whys[k]
            if veto := _forms.get(c.form).uniform_veto(c, n, cfg):
                c, why = costs[0], veto
            elif k > 0 and c.nbytes >= costs[0].nbytes:
                # tiny tensors (min_bytes=0, large groups): codes of a whole group plus its (lo,
                # scale) would store more than the tensor itself
                c, why = costs[0], f"kept: {c.form} would store {c.nbytes} >= {costs[0].nbytes} bytes"
        decisions.append(_decision(s, c, why, n if _forms.get(c.form).carries_masks else 0, subs))
    return Plan(tuple(decisions), status=f"uniform {cfg.bits}-bit")


def _at(expr, subs) -> int:
    return int(sympy.sympify(expr).subs(subs))
