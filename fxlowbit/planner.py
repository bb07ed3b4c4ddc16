"""Choose a stored form for every saved tensor: keep, recompute, 1-bit masks or b-bit quantization.

Works on the plain records of :mod:`fxlowbit.records` (made by :mod:`fxlowbit.passes.analyze`) and
never touches torch.fx graphs.

1. Forms a tensor may take (:func:`candidates`): aliases of graph inputs (the caller holds them
   anyway; a forward output saved for the backward is compressible like any activation),
   tensors under ``min_bytes``, integer tensors and tensors whose backward needs exact values are
   kept (or recomputed, when a cheap exact replay exists); bool tensors and float tensors the
   backward only compares with scalars get exact 1-bit masks; other float tensors get b-bit
   stochastic rounding at each allowed width, or a replay of their pointwise producers from
   values the backward has anyway. Unknown backward uses keep the tensor with one warning naming
   the op (strict mode raises).
2. Each form is one module of the registry :mod:`fxlowbit.forms`, which says where it applies and
   prices it with :mod:`fxlowbit.costmodel`'s figures: stored bytes, seconds added to the step and
   gradient variance added, in units of the minibatch gradient variance. The planner only sorts a
   tensor into a kind (:data:`fxlowbit.forms.KINDS`) and asks every form in turn.
3. :func:`solve` picks one form per tensor minimising ``time + w * step_time * variance`` under the
   memory budget: exact dynamic programming over the budget (in :func:`dp_unit` units, sizes
   rounded up, so a plan found is always within budget), a documented greedy beyond ``DP_LIMIT``
   cells. ``w`` starts at 1 (a variance ratio ``r`` costs about ``r`` more steps, i.e.
   ``r * step_time``) and is raised until the plan's variance ratio is within
   ``max_variance_ratio``; when the budget makes that impossible the plan with the least variance
   within budget is used and one warning gives the best achievable figures.

``bits=b`` instead asks for the fixed uniform rule (every compressible tensor at b bits), the
baseline the cost-model plans are measured against.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import sympy

from . import costmodel as cm
from . import forms as _forms
from .config import LowbitConfig
from .costmodel import Costs, stored_bytes
from .plan import Decision, Form, Plan
from .records import COMPARE, EXACT, Gemm, SavedTensor
from .state import STATE

log = logging.getLogger(__name__)
_warned: set[str] = STATE.warned  # warn-once keys (fxlowbit.state; reset() clears them)

__all__ = [
    "decide",
    "candidates",
    "solve",
    "stored_bytes",
    "UnsupportedOpError",
    "step_time",
    "canonical_keys",
]

DP_UNITS = 4096  # least budget resolution of the exact solver (finer when the instance is small)
DP_MAX_UNITS = 1 << 18
DP_LIMIT = 4_000_000  # items x units x choices beyond which the greedy solver is used
_W_MAX = 1e9
# Narrowest width a tensor gets on its prior sensitivity alone when the budget is the mode's (soft):
# the prior cannot tell which tensors tolerate 2 bits (uniform 2-bit wrecks transformer gradients,
# -27 to -0.3 dB, ../DESIGN.md section 4), and under it T5 and Qwen3-MoE fell to 13 and -11 dB at
# default options. A probe's measurement, or an explicit memory_budget, unlocks 2 bits.
PRIOR_MIN_BITS = 4


class UnsupportedOpError(NotImplementedError):
    """Raised in strict mode when a saved tensor meets an op the planner cannot reason about."""


def _warn_once(key: str, msg: str, stacklevel: int = 3) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=stacklevel)


def _warn_unknown(op: str, name: str, strict: bool) -> None:
    msg = (
        f"fxlowbit: saved tensor {name!r} stays in full precision: its backward use {op} "
        "is not known to tolerate a compressed value"
    )
    if strict:
        raise UnsupportedOpError(msg + " (strict mode)")
    _warn_once(op, msg + " (warned once per op)", stacklevel=4)


# -- what each tensor may become ------------------------------------------------------------------
def _exact_only(s: SavedTensor, cfg: LowbitConfig) -> str | None:
    """Why ``s`` must keep its exact value (None: it tolerates bounded noise)."""
    if not s.is_float:
        return f"{str(s.dtype)[6:]} tensor: kept exact"
    if not s.uses:
        return "no backward use found"
    if len(s.shape) >= 2 and s.shape[-1] == 1:
        # LayerNorm's mean and rstd, softmax's max/sum: 1/width of the rows they scale; one
        # rounding error would scale a whole row's gradient (errors correlated along the row)
        return "per-row statistic (keepdim reduction): kept exact, it scales a whole row"
    exact = [u.op for u in s.uses if u.role == EXACT]
    if exact:
        return f"backward use {exact[0]} needs it exact"
    unknown = [u.op for u in s.uses if u.role is None]
    if unknown:
        _warn_unknown(unknown[0], s.name, cfg.strict)
        return f"backward use {unknown[0]} not known to tolerate compression"
    compares = [u for u in s.uses if u.role == COMPARE]
    if compares and not (cfg.masks and all(u.direct for u in compares)):
        return "compared with a scalar (through a view): kept exact"
    return None


def canonical_keys(saved: Iterable[SavedTensor]) -> dict[str, tuple]:
    """Name-free keys of saved tensors, equal across two partitions of the same graph (node names
    differ between compilations): producer, shape, dtype and occurrence among equal ones."""
    seen: dict[tuple, int] = {}
    out = {}
    for s in saved:
        base = (s.producer, tuple(str(d) for d in s.shape), str(s.dtype))
        out[s.name] = (*base, seen.get(base, 0))
        seen[base] = seen.get(base, 0) + 1
    return out


def may_quantize(s: SavedTensor, cfg: LowbitConfig) -> bool:
    """Whether some plan may store ``s`` quantized (the tensors a probe measures)."""
    if _fixed(s, cfg) or not s.is_float or str(s.dtype) == "torch.bool" or _exact_only(s, cfg):
        return False
    if str(s.dtype) == "torch.float64":  # F64_KEPT
        return False
    return _n_masks(s) < len(s.uses)


# The quantizer computes in fp32: float64 values beyond its range would come back as Inf (1e100)
# or zero (1e-60), so float64 tensors are never quantized (exact masks and replays still apply):
# their kind is "float64" (F64_KEPT, forms/keep.py, is the reason a plan gives).


def _n_masks(s: SavedTensor) -> int:
    return len({(u.op, u.scalar) for u in s.uses if u.role == COMPARE})


def _batch(s: SavedTensor) -> bool:
    """Whether ``s`` aliases the user's batch (``data_input``; hand-built stand-ins for the records,
    as tests/test_defaults_in_the_wild.py makes, may lack the field: not the batch)."""
    return getattr(s, "data_input", False)


def _free(s: SavedTensor) -> bool:
    """Kept at no cost: an alias of a parameter, buffer or other input that is not the batch."""
    return s.input_alias and not _batch(s)


def _fixed(s: SavedTensor, cfg: LowbitConfig) -> str | None:
    """Why ``s`` has no choice at all (None: it has)."""
    if _batch(s):
        return "the user's batch: kept as it is (the training loop holds it), counted in the budget"
    if s.input_alias:
        return "alias of a graph input: costs no memory"
    if s.nbytes_hint < cfg.min_bytes:
        return f"below min_bytes={cfg.min_bytes}"
    return None


def _sensitivity(
    s: SavedTensor, sens: Mapping[str, float] | None, total_numel: float, numel: int
) -> tuple[float, str]:
    if sens and s.name in sens:
        return sens[s.name], "measured"
    return cm.prior_sensitivity(numel, total_numel), "prior"


def candidates(
    s: SavedTensor,
    cfg: LowbitConfig,
    profile: cm.HardwareProfile,
    *,
    subs: Mapping | None = None,
    sensitivity: Mapping[str, float] | None = None,
    total_numel: float = 1.0,
    lossy_names: frozenset[str] = frozenset(),
    row_stats: frozenset[str] = frozenset(),
    min_prior_bits: int = 0,
) -> tuple[list[Costs], list[str], int]:
    """The forms ``s`` may take with their costs, a reason per form, and the comparison masks a
    quantized form carries. ``lossy_names``: saved tensors a plan may store lossily (a replay that
    must be exact may not read them). ``row_stats``: per-row statistics (keepdim reductions such as
    RMSNorm's rsqrt); a replay that scales a lossy leaf by one multiplies the leaf's rounding error
    by 1/rms of each row (Qwen3's 16-wide per-head norms: 1e3x on small rows), an error no
    variance estimate of the leaf sees, so such replays are not offered. ``min_prior_bits``: the
    narrowest width offered on a prior sensitivity (no measurement yet)."""
    subs = subs or {}
    numel = int(sympy.sympify(s.numel).subs(subs))
    fixed = _fixed(s, cfg)
    exact = None if fixed else _exact_only(s, cfg)  # warns (or raises) on unknown backward uses
    n = _n_masks(s)
    if fixed:
        kind = "fixed"
    elif str(s.dtype) == "torch.bool":
        kind = "bool"
    elif exact:
        kind = "exact"
    elif n and n == len(s.uses):
        kind = "compared"
    elif str(s.dtype) == "torch.float64":
        kind = "float64"
    else:
        kind = "float"
    sens, source = _sensitivity(s, sensitivity, total_numel, numel)
    t = _forms.Tensor(
        s, cfg, profile, subs, kind, fixed, exact, numel,
        nbytes=0 if _free(s) else int(sympy.sympify(s.nbytes).subs(subs)),
        n_masks=n, sensitivity=sens, source=source, min_prior_bits=min_prior_bits,
        lossy_names=lossy_names, row_stats=row_stats,
    )  # fmt: skip
    out: list[Costs] = []
    why: list[str] = []
    for form in _forms.all_forms():
        if kind not in form.kinds:
            continue
        offered = form.offers(t)
        out += [c for c, _ in offered]
        why += [w for _, w in offered]
        if offered and form.exclusive(t):
            return out, why, 0
    return out, why, n if kind in ("compared", "float") else 0


# -- the solver -----------------------------------------------------------------------------------
def _cheapest(choices: Sequence[tuple[int, float]]) -> int:
    """The index of the least-cost ``(bytes, cost)`` choice (ties: the fewest bytes, then the first)."""
    return min(range(len(choices)), key=lambda k: (choices[k][1], choices[k][0]))


def solve(items: Sequence[Sequence[tuple[int, float]]], budget: int) -> list[int] | None:
    """Pick one ``(bytes, cost)`` choice per item minimising total cost with total bytes <= budget;
    None if no selection fits. Exact dynamic programming when ``items x units x choices`` is at
    most ``DP_LIMIT`` (bytes rounded up to units of :func:`dp_unit` bytes: exact whenever the
    sizes are multiples of the unit, and never over budget), otherwise :func:`solve_greedy`."""
    if budget < 0:
        return None
    cheapest = [_cheapest(c) for c in items]
    if sum(c[k][0] for c, k in zip(items, cheapest, strict=True)) <= budget:
        return cheapest  # the budget does not bind
    # items with a single choice only take their bytes off the budget (no rounding for them)
    free = [i for i, c in enumerate(items) if len(c) > 1]
    budget -= sum(c[0][0] for c in items if len(c) == 1)
    sub_items = [items[i] for i in free]
    # sizes rounded down relax the problem: its optimum, if it truly fits, is the exact optimum;
    # otherwise sizes rounded up give a plan that surely fits
    sub = _solve_dp(sub_items, budget, round_up=False)
    if sub is None or sum(c[k][0] for c, k in zip(sub_items, sub, strict=True)) > budget:
        sub = _solve_dp(sub_items, budget)
    if sub is None:
        return None
    pick = [0] * len(items)
    for i, k in zip(free, sub, strict=True):
        pick[i] = k
    return pick


def dp_unit(budget: int, items: Sequence[Sequence]) -> int:
    """Bytes per unit of the exact solver: a multiple of the sizes' greatest common divisor (sizes
    are then exact multiples whenever the budget allows), with the budget cut into as many units
    as ``DP_LIMIT`` cells allow for these items (at least ``DP_UNITS``, at most ``DP_MAX_UNITS``)."""
    width = max((len(c) for c in items), default=1)
    units = max(DP_UNITS, min(DP_MAX_UNITS, DP_LIMIT // max(1, len(items) * width)))
    g = math.gcd(*(int(b) for c in items for b, _ in c)) or 1
    return g * max(1, math.ceil(budget / (units * g)))


def _solve_dp(
    items: Sequence[Sequence[tuple[int, float]]], budget: int, round_up: bool = True
) -> list[int] | None:
    """Exact DP in :func:`dp_unit` units; sizes rounded up (never over budget) or, with
    ``round_up=False``, down (a relaxation: the caller checks the true bytes)."""
    if budget < 0:
        return None
    unit = dp_unit(budget, items)

    def units_of(nbytes) -> int:
        return -(-int(nbytes) // unit) if round_up else int(nbytes) // unit

    cap = budget // unit
    width = max((len(c) for c in items), default=1)
    if len(items) * (cap + 1) * width > DP_LIMIT:
        return solve_greedy(items, budget)
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    picks = []
    for choices in items:
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for k, (nbytes, cost) in enumerate(choices):
            w = units_of(nbytes)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = dp[: cap + 1 - w] + cost
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp = new
        picks.append(arg)
    if not np.isfinite(dp).any():
        return None
    used = int(np.argmin(dp))
    out = []
    for choices, arg in zip(reversed(items), reversed(picks), strict=True):
        k = int(arg[used])
        out.append(k)
        used -= units_of(choices[k][0])
    return out[::-1]


def solve_greedy(items: Sequence[Sequence[tuple[int, float]]], budget: int) -> list[int] | None:
    """Start from each item's cheapest choice; while over budget, take the move (to a smaller
    choice of one item) with the least added cost per byte freed. Not optimal in general (the
    classic multiple-choice knapsack greedy); used only beyond the exact solver's size."""
    pick = [_cheapest(c) for c in items]
    total = sum(c[k][0] for c, k in zip(items, pick, strict=True))
    while total > budget:
        best = None
        for i, c in enumerate(items):
            b0, c0 = c[pick[i]]
            for k, (b, cost) in enumerate(c):
                if b < b0:
                    rate = (cost - c0) / (b0 - b)
                    if best is None or rate < best[0]:
                        best = (rate, i, k)
        if best is None:
            return None
        _, i, k = best
        total -= items[i][pick[i]][0] - items[i][k][0]
        pick[i] = k
    return pick


def step_time(gemms: Sequence[Gemm], profile: cm.HardwareProfile, activation_bytes: float) -> float:
    """Rough seconds of one uncompressed step: every GEMM at the profile's throughput, plus the
    saved activations written, read back and their gradients formed at copy bandwidth."""
    t = sum(profile.matmul_time(g.flops, g.dtype) for g in gemms)
    return t + 4 * activation_bytes / (profile.copy_gbps * 1e9)


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
) -> Plan:
    """Plan for a tuple of :class:`~fxlowbit.records.SavedTensor` records: the cost-model
    plan, or the uniform rule when ``cfg.bits`` is set. ``sensitivity``: measured sensitivities by
    saved-tensor name (units of the minibatch gradient variance, see :mod:`fxlowbit.calibrate`).
    ``extra_bytes``: saved bytes the model holds without fxlowbit beyond ``saved`` (the logits a
    fused loss no longer saves, :func:`fxlowbit.passes.linear_ce.unfused_extra_bytes`), a sympy
    expression of the sizes: a fractional budget is a fraction of the uncompressed bytes with them."""
    subs = subs or {}
    if cfg.bits is not None:
        plan = _uniform(saved, cfg, subs)
        log.info("plan (uniform %d-bit rule):\n%s", cfg.bits, plan)
        return plan
    profile = profile or cm.load_profile(cfg.profile)
    quantizable = [s for s in saved if not _fixed(s, cfg) and s.is_float]
    total_numel = float(sum(int(sympy.sympify(s.numel).subs(subs)) for s in quantizable)) or 1.0
    lossy_names = frozenset(s.name for s in quantizable)
    row_stats = frozenset(s.name for s in saved if len(s.shape) >= 2 and str(s.shape[-1]) == "1")

    def forms(at: Mapping) -> list:
        options = [
            candidates(
                s,
                cfg,
                profile,
                subs=at,
                sensitivity=sensitivity,
                total_numel=total_numel,
                lossy_names=lossy_names,
                row_stats=row_stats,
                min_prior_bits=PRIOR_MIN_BITS if cfg.memory_budget is None else 0,
            )  # fmt: skip
            for s in saved
        ]
        # A replay reads its leaves' stored values: they must exist (no comparison-only masks, no
        # replays of replays).
        leaves = {leaf for s, (c, _, _) in zip(saved, options, strict=True) for leaf in _replay_leaves(s, c)}
        for i, s in enumerate(saved):
            if s.name in leaves:
                c, why, n = options[i]
                keep = [k for k, x in enumerate(c) if _forms.get(x.form).replay_leaf]
                options[i] = ([c[k] for k in keep], [why[k] for k in keep], n)
        return options

    options = forms(subs)
    total = sum(c[0].nbytes for c, _, _ in options)  # uncompressed saved-activation bytes
    budget = _budget(cfg, total + int(sympy.sympify(extra_bytes).subs(subs)))
    t_step = step_time(gemms, profile, total)
    pick, weight, status = _choose(
        [c for c, _, _ in options], budget, t_step, cfg.max_variance_ratio, soft=cfg.memory_budget is None
    )
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
        new_pick, _, new_status = _choose(
            [c for c, _, _ in options], scaled, t_step, cfg.max_variance_ratio, warn=False
        )
        if new_pick is None or "cannot be met" in new_status:
            break
        pick, status = new_pick, new_status
    return pick, status


def _replay_leaves(s: SavedTensor, costs: list[Costs]) -> set[str]:
    """Saved tensors whose stored values some form offered for ``s`` would read."""
    return {leaf for c in costs for leaf in _forms.get(c.form).reads(s)}


def _choose(
    items: list[list[Costs]],
    budget: int,
    t_step: float,
    max_ratio: float,
    warn: bool = True,
    soft: bool = False,
):
    """(choice per item, variance weight used, status line); ``warn``: warn once when the budget
    or the variance limit cannot be met. ``soft``: the budget came from ``mode``, not from the user,
    so the variance limit wins: when no plan within the budget meets it, the smallest plan that
    does is used and the status says by how much the budget was missed."""

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
                pick, weight, _ = _choose(items, least, t_step, max_ratio, warn=False)
                msg = (
                    f"fxlowbit: the mode's memory budget of {budget} saved bytes needs more gradient "
                    f"variance than max_variance_ratio={max_ratio:g}, so the budget yields to the variance "
                    f"limit: storing {least} bytes ({least / max(budget, 1):.2f}x the budget)"
                )
                if warn:
                    _warn_once("soft-budget", msg)
                return pick, weight, msg
    if pick is None:  # even the smallest forms exceed the budget
        pick = [_smallest(it) for it in items]
        least = sum(it[k].nbytes for it, k in zip(items, pick, strict=True))
        msg = (
            f"fxlowbit: memory budget of {budget} saved bytes cannot be met: the smallest plan "
            f"stores {least} bytes; using it"
        )
        if warn:
            _warn_once("budget", msg)
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
        if warn:
            _warn_once("variance", msg)
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
        elif cfg.recompute and r is not None and r.from_inputs:
            # not an activation (e.g. autocast's bf16 copy of a weight): replayed exactly, never rounded
            c, n = Costs(Form.RECOMPUTE, 0, 0, 0.0, 0.0), 0
            why = f"a function of graph inputs only: replayed in the backward ({len(r.nodes)} op(s))"
        else:
            profile = profile or cm.load_profile(cfg.profile)
            uni = LowbitConfig(
                **{**_fields(cfg), "bits": None, "allowed_bits": (cfg.bits,), "recompute": False}
            )
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


def _fields(cfg: LowbitConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
