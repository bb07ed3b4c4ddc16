"""The multiple-choice knapsack the planner solves: pick one ``(bytes, cost)`` choice per item
minimising the total cost with the total bytes within a budget.

Pure: plain tuples in, indices out (numpy for the tables); no torch, no planner records.
:func:`solve` is exact dynamic programming over the budget in :func:`dp_unit` units (sizes rounded
up, so a selection found is always within budget) up to ``DP_LIMIT`` cells, and the documented
greedy :func:`solve_greedy` beyond.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["solve", "solve_greedy", "dp_unit", "DP_UNITS", "DP_MAX_UNITS", "DP_LIMIT"]

DP_UNITS = 4096  # least budget resolution of the exact solver (finer when the instance is small)
DP_MAX_UNITS = 1 << 18
DP_LIMIT = 4_000_000  # items x units x choices beyond which the greedy solver is used


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
