"""The multiple-choice knapsack solvers (fxlowbit/knapsack.py) against exhaustive search: exact DP,
its budget rounding, and the greedy fallback."""

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxlowbit import knapsack

choice = st.tuples(st.integers(0, 50), st.floats(0, 10, allow_nan=False, allow_infinity=False))
instances = st.lists(st.lists(choice, min_size=1, max_size=5), min_size=1, max_size=6)
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True)


def brute_force(items, budget):
    """The exhaustive reference: (least total cost, its pick) over every selection within
    ``budget``, or None when none fits."""
    best = None
    for pick in itertools.product(*(range(len(c)) for c in items)):
        b = sum(items[i][k][0] for i, k in enumerate(pick))
        if b <= budget:
            cost = sum(items[i][k][1] for i, k in enumerate(pick))
            if best is None or cost < best[0]:
                best = (cost, list(pick))
    return best


def _bytes(items, pick):
    return sum(items[i][k][0] for i, k in enumerate(pick))


def _cost(items, pick):
    return sum(items[i][k][1] for i, k in enumerate(pick))


@SETTINGS
@given(items=instances, budget=st.integers(0, 150))
def test_dp_matches_brute_force(items, budget):
    best = brute_force(items, budget)
    pick = knapsack.solve(items, budget)
    if best is None:
        assert pick is None
        return
    assert pick is not None and len(pick) == len(items)
    assert all(0 <= k < len(c) for k, c in zip(pick, items, strict=True))
    assert _bytes(items, pick) <= budget
    assert _cost(items, pick) == pytest.approx(best[0], rel=1e-9, abs=1e-9)


@SETTINGS
@given(items=instances, budget=st.integers(0, 150))
def test_greedy_is_within_budget_when_feasible(items, budget):
    pick = knapsack.solve_greedy(items, budget)
    best = brute_force(items, budget)
    if best is None:
        assert pick is None
        return
    assert pick is not None and _bytes(items, pick) <= budget
    assert _cost(items, pick) >= best[0] - 1e-9  # never better than the optimum


big_choice = st.tuples(st.integers(0, 40_000), st.floats(0, 10, allow_nan=False, allow_infinity=False))
big_instances = st.lists(st.lists(big_choice, min_size=1, max_size=4), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(items=big_instances, budget=st.integers(knapsack.DP_UNITS + 1, 120_000))
def test_rounded_dp_never_exceeds_budget(items, budget):
    """The budget is cut into units of at most ``ceil(budget / DP_UNITS)`` bytes (finer for small
    instances, :func:`knapsack.dp_unit`) and sizes are rounded up (except when the budget does not
    bind, and for single-choice items, which only take their bytes off the budget): a plan found is
    within budget and at least as good as the optimum for sizes rounded to the coarsest unit."""
    unit = math.ceil(budget / knapsack.DP_UNITS)
    pick = knapsack.solve(items, budget)
    exact = brute_force(items, budget)
    rounded_items = [[(-(-b // unit), c) for b, c in it] for it in items]
    rounded = brute_force(rounded_items, budget // unit)
    if exact is None:
        assert pick is None
        return
    if pick is not None:
        assert _bytes(items, pick) <= budget
        assert _cost(items, pick) >= exact[0] - 1e-9
    if rounded is not None:  # never worse than the optimum of the rounded sizes
        assert pick is not None
        assert _cost(items, pick) <= rounded[0] + 1e-9


def test_dp_is_exact_when_sizes_are_multiples_of_the_unit():
    unit = 3
    budget = knapsack.DP_UNITS * unit
    items = [[(unit * 1000, 0.0), (unit * 10, 5.0)], [(unit * 3000, 0.0), (unit * 100, 1.0)]]
    items.append([(budget - unit * 4000, 0.0), (0, 2.0)])
    best = brute_force(items, budget)
    pick = knapsack.solve(items, budget)
    assert _cost(items, pick) == pytest.approx(best[0]) == 0.0


def test_greedy_beyond_dp_limit(monkeypatch):
    monkeypatch.setattr(knapsack, "DP_LIMIT", 0)  # every instance goes to the greedy solver
    items = [[(10, 0.0), (4, 1.0), (1, 3.0)], [(20, 0.0), (2, 2.0)], [(5, 0.0)]]
    for budget in range(8, 36):
        pick = knapsack.solve(items, budget)
        assert pick is not None and _bytes(items, pick) <= budget
    assert knapsack.solve(items, 7) is None  # smallest plan stores 1 + 2 + 5 bytes


def test_edge_cases():
    assert knapsack.solve([], 0) == []
    assert knapsack.solve([[(1, 0.0)]], -1) is None
    assert knapsack.solve([[(0, 1.0), (0, 0.5)]], 0) == [1]
    assert brute_force([[(5, 0.0)]], 4) is None


def test_a_budget_equal_to_a_plans_bytes_fits_that_plan():
    """lowbit at exactly uniform 4-bit's bytes must be able to choose uniform 4-bit: sizes rounded
    up to coarse units would not fit it (one tensor shaved to 2 bits). Units are multiples of the
    sizes' gcd, and a relaxation (sizes rounded down) is tried first and kept when it truly fits."""
    items = [[(16_777_216, 0.0), (2_228_224, 1.0)], [(4_194_304, 0.0), (557_000, 1.0)]]
    items.append([(8_388_608, 0.0), (1_114_112, 1.0)])
    items.append([(40_964, 0.0), (5_444, 0.5)])
    budget = 2_228_224 + 557_000 + 1_114_112 + 5_444
    assert sum(
        -(-b // math.ceil(budget / knapsack.DP_UNITS)) for b in (2_228_224, 557_000, 1_114_112, 5_444)
    ) > (budget // math.ceil(budget / knapsack.DP_UNITS))  # coarse rounding up does not fit it
    assert knapsack.solve(items, budget) == [1, 1, 1, 1]
    many = [[(1000, 0.0), (100, 1.0)]] * 5000
    assert knapsack.dp_unit(10**9, many) >= math.ceil(10**9 / knapsack.DP_UNITS)  # bounded work
