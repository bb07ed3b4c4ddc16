"""The cost-model planner on hand-built records: budgets, the memory/variance frontier, the
profile's pull between recompute and quantization, measured sensitivities, warnings, the uniform
rule and the new options' validation."""

import dataclasses
import itertools
import warnings

import pytest
import sympy
import torch

from fxlowbit import LowbitConfig, knapsack, planner
from fxlowbit import costmodel as cm
from fxlowbit.records import Gemm, Recompute, Use

from .test_planner import LE0, MM, saved

EXACT = Use("aten._scaled_dot_product_flash_attention_for_cpu_backward.default", "exact")
CPU = cm.load_profile("cpu")
_FAST = {b: 1e6 for b in (2, 4, 8)}
# Packing, unpacking and replays cost no time: only memory and variance matter.
FREE = dataclasses.replace(
    CPU, pointwise_gbps=1e6, pack_gbps=_FAST, unpack_gbps=_FAST, mask_gbps=1e6, launch_us=0.0
)
GEMMS = (Gemm("aten.mm.default", 2 * 128 * 512 * 512, "float32", "fw"),) * 3


@pytest.fixture(autouse=True)
def _fresh_warnings():
    planner._warned.clear()
    yield
    planner._warned.clear()


def _replay(numel, *leaves, ops=("aten.gelu.default",)):
    return Recompute(tuple(ops), tuple(leaves), 2 * numel * 4)


MUL_ADD = _replay(131072, "x0", ops=("aten.mul.Tensor", "aten.add.Tensor"))


def mixed():
    """One of each kind of saved tensor, some with replays."""
    return (
        saved("x0", numel=8192, input_alias=True, producer="placeholder"),
        saved("h1", numel=65536),
        saved("g1", numel=65536, recompute=_replay(65536, "h1")),
        saved("m1", dtype=torch.bool, numel=16384),
        saved("r1", numel=16384, uses=(MM, LE0)),
        saved("c1", numel=16384, uses=(LE0,)),
        saved("s1", numel=512),
        saved("n1", numel=32768, uses=(MM, EXACT), recompute=_replay(32768, "primals_1")),
        saved("i1", dtype=torch.int64, numel=4096, uses=()),
        saved("h2", numel=131072, recompute=MUL_ADD),
    )


def plan_of(records, profile=CPU, sensitivity=None, gemms=GEMMS, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = LowbitConfig(**options)
        return planner.decide(tuple(records), cfg, profile=profile, sensitivity=sensitivity, gemms=gemms)


def _smallest_bytes(records, cfg, profile=CPU):
    return sum(min(c.nbytes for c in planner.candidates(s, cfg, profile)[0]) for s in records)


# -- the budget ------------------------------------------------------------------------------------
FRACTIONS = [0.01, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0]


@pytest.mark.parametrize("profile", [CPU, FREE], ids=["cpu", "free"])
def test_plans_stay_within_budget(profile):
    records = mixed()
    total = plan_of(records, profile).bytes_before
    smallest = _smallest_bytes(records, LowbitConfig(), profile)
    assert 0 < smallest < 0.1 * total
    budgets = [*FRACTIONS, smallest, smallest + 1, 60_000, 10**9]
    for budget in budgets:
        plan = plan_of(records, profile, memory_budget=budget)
        expected = int(budget * total) if budget <= 1 else budget
        assert plan.budget == expected
        if expected >= smallest + 2 * len(records) * (expected // knapsack.DP_UNITS + 1):
            assert "cannot be met" not in plan.status, (budget, plan.status)  # room for rounding
        if "cannot be met" in plan.status:
            assert plan.bytes_after == smallest
        else:
            assert plan.bytes_after <= plan.budget, (budget, str(plan))
        assert plan.variance_ratio == pytest.approx(sum(d.variance for d in plan.decisions))


def test_modes_set_the_default_budget():
    records = mixed()
    total = plan_of(records).bytes_before
    for mode, fraction in (("memory", 0.1), ("balanced", 0.2), ("speed", 0.5)):
        assert plan_of(records, mode=mode).budget == int(fraction * total)
    assert plan_of(records, mode="memory", memory_budget=0.7).budget == int(0.7 * total)


def test_forms_each_record_may_take():
    by_name = {s.name: s for s in mixed()}
    cfg = LowbitConfig()

    def forms(name, cfg=cfg):
        return {(c.form, c.bits) for c in planner.candidates(by_name[name], cfg, CPU)[0]}

    assert forms("x0") == forms("s1") == forms("i1") == {("keep", 0)}
    assert forms("h1") == {("keep", 0), ("quant", 2), ("quant", 4), ("quant", 8)}
    assert forms("g1") == forms("h1") | {("recompute", 0)}
    assert forms("m1") == {("keep", 0), ("mask", 1)}
    assert forms("c1") == {("keep", 0), ("cmp_mask", 0)}
    assert forms("n1") == {("keep", 0), ("recompute", 0)}  # exact use: replay from a graph input only
    assert forms("g1", LowbitConfig(recompute=False)) == forms("h1")
    n1 = dataclasses.replace(by_name["n1"], recompute=_replay(32768, "h1"))
    lossy = planner.candidates(n1, cfg, CPU, lossy_names=frozenset({"h1"}))[0]
    assert {c.form for c in lossy} == {"keep"}  # an exact tensor never replays from lossy values


def test_replay_leaves_are_stored_as_values():
    """A tensor a replay reads is never reduced to comparison masks (its value must exist); it may
    be replayed itself (the replays chain)."""
    records = (
        saved("a", numel=65536, uses=(LE0,)),
        saved("b", numel=65536, recompute=_replay(65536, "a")),
        saved("c", numel=65536, recompute=_replay(65536, "b")),
    )
    for budget in (0.02, 0.2, 0.5):
        d = plan_of(records, memory_budget=budget).by_name()
        assert d["a"].form == "keep"  # only keep or cmp_mask were possible; masks are not values
    d = plan_of(records, memory_budget=0.02).by_name()
    assert d["b"].form == d["c"].form == "recompute"  # c from b, b from a: a chain
    d = plan_of(records, memory_budget=2, min_bytes=0).by_name()
    assert d["c"].form == "recompute" and d["c"].bits == 0 and d["c"].bytes_after == 0


# -- the frontier ----------------------------------------------------------------------------------
SENS = {"h1": 5.0, "g1": 0.01, "r1": 50.0, "h2": 0.5, "n1": 1.0}


def _sweep(profile, **options):
    plans = [plan_of(mixed(), profile, SENS, memory_budget=b, **options) for b in FRACTIONS]
    return [p for p in plans if "cannot be met" not in p.status]


@pytest.mark.parametrize("max_ratio", [0.05, 1e9])
def test_frontier_is_monotone_when_only_memory_and_variance_count(max_ratio):
    """With free packing and replays the objective is the variance alone: more budget can only
    lower the least variance, and the solver takes the first (smallest) plan reaching it."""
    plans = _sweep(FREE, max_variance_ratio=max_ratio)
    assert len(plans) >= len(FRACTIONS) - 2
    for a, b in itertools.pairwise(plans):
        assert b.bytes_after >= a.bytes_after
        assert b.variance_ratio <= a.variance_ratio + 1e-15
    assert plans[0].variance_ratio > plans[-1].variance_ratio == 0


def test_frontier_with_measured_times():
    """With real pack/replay times the objective is ``time + step_time * variance`` (the variance
    limit being loose): it, not the variance alone, falls as the budget grows (a replay adds no
    variance but more time than 8-bit codes), and the plans grow."""
    plans = _sweep(CPU, max_variance_ratio=1e9)
    for a, b in itertools.pairwise(plans):
        assert b.bytes_after >= a.bytes_after
        objective = [p.time_s + p.step_time_s * p.variance_ratio for p in (a, b)]
        assert objective[1] <= objective[0] * (1 + 1e-12)


def test_more_budget_can_add_variance_with_measured_times():
    """The documented trade: a replay (0 bytes, no variance, slower) gives way to 8-bit codes
    (faster on this profile, whose replays are 100x slower than measured) once they fit."""
    records = (saved("t0", numel=1024), saved("t1", numel=65536, recompute=_replay(65536, "t0")))
    slow = _profile(pointwise=1e-2)
    tight, loose = (plan_of(records, slow, memory_budget=b).by_name()["t1"] for b in (4096, 100_000))
    assert (tight.form, loose.form, loose.bits) == ("recompute", "quant", 8)
    assert loose.variance > tight.variance == 0


# -- the profile -----------------------------------------------------------------------------------
def _profile(pack=1.0, pointwise=1.0, launch_us=None):
    return dataclasses.replace(
        CPU,
        pack_gbps={b: v * pack for b, v in CPU.pack_gbps.items()},
        unpack_gbps={b: v * pack for b, v in CPU.unpack_gbps.items()},
        pointwise_gbps=CPU.pointwise_gbps * pointwise,
        launch_us=CPU.launch_us if launch_us is None else launch_us,
    )


def test_slow_replays_pick_codes_and_slow_codes_pick_replays():
    records = (saved("t0", numel=1024), saved("t1", numel=65536, recompute=_replay(65536, "t0")))
    budget = 100_000  # t1 (256 KiB) must shrink; any of its compressed forms fits
    slow_replay = plan_of(records, _profile(pointwise=1e-3), memory_budget=budget).by_name()["t1"]
    slow_codes = plan_of(records, _profile(pack=1e-3), memory_budget=budget).by_name()["t1"]
    assert slow_replay.form == "quant" and slow_codes.form == "recompute"
    assert slow_codes.time_s == pytest.approx(_profile(pack=1e-3).pointwise_time(2 * 65536 * 4))


def _identical(n=4, numel=256):
    return tuple(saved(f"t{i}", numel=numel, recompute=_replay(numel, f"primals_{i}")) for i in range(n))


@pytest.mark.parametrize("budget", [0.1, 0.5, 0.8])
def test_faster_codes_win_over_replays(budget):
    """Cost of a plan at pack speed-up ``k``: ``A + Q / k`` with ``Q`` its pack + unpack work. For
    an exact solver ``Q`` of the chosen plan can only grow with ``k``; with identical tensors at
    one width that is the number of quantized tensors (and replays give way)."""
    counts = []
    for k in (1e-3, 0.1, 0.3, 1, 3, 10, 100, 1e4):
        plan = plan_of(
            _identical(), _profile(pack=k, launch_us=0.0), gemms=(), memory_budget=budget, min_bytes=0,
            allowed_bits=(4,), max_variance_ratio=1e9,
        )  # fmt: skip
        assert plan.bytes_after <= plan.budget  # 4 x 1 KiB: exact DP
        counts.append((plan.count("quant"), plan.count("recompute")))
    quant = [q for q, _ in counts]
    assert quant == sorted(quant), counts
    assert quant[0] == 0 and quant[-1] > 0
    assert counts[-1][1] < counts[0][1]


def test_faster_replays_win_over_codes():
    counts = []
    for k in (1e-3, 0.1, 1, 10, 1e3):
        plan = plan_of(
            _identical(), _profile(pointwise=k, launch_us=0.0), gemms=(), memory_budget=0.2, min_bytes=0,
            allowed_bits=(4,), max_variance_ratio=1e9,
        )  # fmt: skip
        counts.append(plan.count("recompute"))
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 4


def test_a_loose_budget_keeps_everything_whatever_the_profile():
    for profile in (CPU, FREE, _profile(pack=1e3, pointwise=1e3)):
        plan = plan_of(mixed(), profile, memory_budget=10**9)
        assert plan.bytes_after == plan.bytes_before and plan.time_s == 0 and plan.variance_ratio == 0


def test_full_budget_keeps_everything():
    plan = plan_of(mixed(), memory_budget=1.0)
    assert plan.bytes_after == plan.bytes_before and plan.variance_ratio == 0


# -- measured sensitivities ------------------------------------------------------------------------
@pytest.mark.parametrize("sensitive", ["a", "b"])
def test_the_sensitive_tensor_gets_more_bits(sensitive):
    records = (saved("a", numel=4096), saved("b", numel=4096))
    q = {b: int(cm.stored_bytes("quant", sympy.Integer(4096), b, 256, 4)) for b in (2, 4, 8)}
    budget = q[8] + q[2]  # both compressed; (8, 2), (4, 4) and (2, 8) fit
    other = "b" if sensitive == "a" else "a"
    sens = {sensitive: 100.0, other: 0.01}
    plan = plan_of(records, sensitivity=sens, memory_budget=budget)
    d = plan.by_name()
    assert d[sensitive].bits == 8 and d[other].bits == 2, str(plan)
    assert "measured sensitivity" in d[sensitive].reason
    assert plan.variance_ratio == pytest.approx(100 / 255**2 + 0.01 / 9)
    prior = plan_of(records, memory_budget=budget).by_name()
    assert "prior sensitivity" in prior["a"].reason


def test_variance_limit_trades_time_for_variance():
    """At w = 1 the fast 8-bit codes win; a tighter limit raises the variance weight until the
    replay (slower, no variance) is chosen."""
    records = (saved("t0", numel=1024), saved("t1", numel=65536, recompute=_replay(65536, "t0")))
    sens = {"t1": 1000.0}  # 8-bit: 1000 / 255^2 = 0.0154
    kw = dict(sensitivity=sens, gemms=(), memory_budget=100_000)
    slow = _profile(pointwise=1e-2)  # replays slower than codes, whatever this machine measured
    loose = plan_of(records, slow, **kw, max_variance_ratio=0.05)
    tight = plan_of(records, slow, **kw, max_variance_ratio=0.01)
    assert loose.by_name()["t1"].form == "quant" and loose.variance_ratio == pytest.approx(1000 / 255**2)
    assert tight.by_name()["t1"].form == "recompute" and tight.variance_ratio == 0
    assert tight.status == loose.status == "ok"


@pytest.mark.parametrize("limit", [0.002, 0.01, 0.05, 0.3])
def test_plans_meet_the_variance_limit_when_they_can(limit):
    for budget in (0.05, 0.1, 0.2, 0.4):
        plan = plan_of(mixed(), sensitivity=SENS, memory_budget=budget, max_variance_ratio=limit)
        if plan.status == "ok":
            assert plan.variance_ratio <= limit
            assert plan.bytes_after <= plan.budget
        else:
            assert "max_variance_ratio" in plan.status or "cannot be met" in plan.status


# -- warnings --------------------------------------------------------------------------------------
def test_infeasible_budget_warns_once_and_uses_the_smallest_plan():
    records = mixed()
    cfg = LowbitConfig(memory_budget=2)
    smallest = _smallest_bytes(records, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plans = [planner.decide(records, cfg, profile=CPU, gemms=GEMMS) for _ in range(3)]
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1, msgs
    assert f"budget of 2 saved bytes cannot be met: the smallest plan stores {smallest} bytes" in msgs[0]
    # the smallest forms' variance is named when it exceeds the limit (and not when it does not)
    assert "> max_variance_ratio=0.05 (expect degraded training" in msgs[0]
    loose = LowbitConfig(memory_budget=2, max_variance_ratio=1e9)
    assert planner.decide(records, loose, profile=CPU, gemms=GEMMS, warn=False).status.endswith("; using it")
    for plan in plans:
        assert plan.bytes_after == smallest and plan.status == msgs[0]
        for s, d in zip(records, plan.decisions, strict=True):
            costs = planner.candidates(s, cfg, CPU)[0]
            assert d.bytes_after == min(c.nbytes for c in costs)
            assert d.form != "quant" or d.bits - d.masks == 2


def _frontier_by_brute_force(records, cfg, sens, budget, limit):
    options = [planner.candidates(s, cfg, CPU, sensitivity=sens, total_numel=1.0)[0] for s in records]
    least_var = least_bytes = None
    for pick in itertools.product(*options):
        nbytes, var = sum(c.nbytes for c in pick), sum(c.variance for c in pick)
        if nbytes <= budget and (least_var is None or var < least_var):
            least_var = var
        if var <= limit and (least_bytes is None or nbytes < least_bytes):
            least_bytes = nbytes
    return least_var, least_bytes


def test_unmet_variance_limit_warns_once_with_the_best_bytes():
    records = (saved("a", numel=16384), saved("b", numel=16384), saved("c", numel=8192))
    sens = {"a": 100.0, "b": 100.0, "c": 1.0}
    q2 = int(cm.stored_bytes("quant", sympy.Integer(16384), 2, 256, 4))
    cfg = LowbitConfig(memory_budget=3 * q2, max_variance_ratio=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = planner.decide(records, cfg, profile=CPU, sensitivity=sens, gemms=GEMMS)
        again = planner.decide(records, cfg, profile=CPU, sensitivity=sens, gemms=GEMMS)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1, msgs
    assert plan.status == again.status == msgs[0]
    assert plan.bytes_after <= plan.budget
    least_var, least_bytes = _frontier_by_brute_force(records, cfg, sens, plan.budget, 0.05)
    assert plan.variance_ratio == pytest.approx(least_var, rel=1e-6) and least_var > 0.05
    assert f"variance ratio of {plan.variance_ratio:.3g} > max_variance_ratio=0.05" in msgs[0]
    reported = int(msgs[0].rsplit("smallest plan stores ", 1)[1].split()[0])
    assert least_bytes <= reported <= least_bytes * 1.005 + 1


# -- the uniform rule ------------------------------------------------------------------------------
def test_bits_4_is_the_uniform_rule():
    records = mixed()
    plan = plan_of(records, bits=4)  # no budget: bits with memory_budget is rejected (test_bad_input.py)
    assert plan.budget is None and plan.status == "uniform 4-bit"
    forms = {d.name: (d.form, d.bits) for d in plan.decisions}
    assert forms == {
        "x0": ("keep", 32),
        "h1": ("quant", 4),
        "g1": ("quant", 4),  # never replayed under the rule
        "m1": ("mask", 1),
        "r1": ("quant", 5),  # 4-bit codes plus one exact comparison mask
        "c1": ("cmp_mask", 1),
        "s1": ("keep", 32),
        "n1": ("keep", 32),
        "i1": ("keep", 64),
        "h2": ("quant", 4),
    }
    for d in plan.decisions:
        if d.form == "quant":
            numel = d.bytes_before // 4
            expected = cm.stored_bytes("quant", sympy.Integer(numel), 4, 256, 4) + d.masks * numel // 8
            assert d.bytes_after == expected
    # The same forms as the cost model squeezed to its smallest plan at 4 bits without replays.
    squeezed = plan_of(records, allowed_bits=(4,), recompute=False, memory_budget=2)
    assert squeezed.signature() == plan.signature()
    for bits in (2, 8):
        rule = plan_of(records, bits=bits)
        assert rule.by_name()["h1"].bits == bits and rule.count("recompute") == 0


def test_signature_tracks_forms_and_bits_only():
    a = plan_of(mixed(), memory_budget=0.1)
    b = plan_of(mixed(), cm.load_profile("cpu"), memory_budget=0.1)
    assert a.signature() == b.signature()
    assert a.signature() != plan_of(mixed(), memory_budget=0.5).signature()
    assert all(len(s) == 3 for s in a.signature())


# -- the options -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options,option",
    [
        ({"memory_budget": 0}, "memory_budget"),
        ({"memory_budget": -0.5}, "memory_budget"),
        ({"memory_budget": 1.5}, "memory_budget"),
        ({"memory_budget": True}, "memory_budget"),
        ({"memory_budget": "10%"}, "memory_budget"),
        ({"mode": "fast"}, "mode"),
        ({"max_variance_ratio": 0}, "max_variance_ratio"),
        ({"max_variance_ratio": "0.1"}, "max_variance_ratio"),
        ({"allowed_bits": ()}, "allowed_bits"),
        ({"allowed_bits": (3, 4)}, "allowed_bits"),
        ({"allowed_bits": 4}, "allowed_bits"),
        ({"recompute": 1}, "recompute"),
        ({"calibrate_every": -1}, "calibrate_every"),
        ({"calibrate_every": 2.5}, "calibrate_every"),
        ({"calibrate_every": True}, "calibrate_every"),
        ({"max_variants": 0}, "max_variants"),
        ({"max_variants": False}, "max_variants"),
    ],
)
def test_bad_new_options_raise_naming_them(options, option):
    with pytest.raises(ValueError, match=rf"option {option}="):
        LowbitConfig.from_options(options)


def test_good_new_options():
    cfg = LowbitConfig.from_options(
        {"memory_budget": 0.25, "mode": "memory", "max_variance_ratio": 1, "allowed_bits": [8, 2],
         "recompute": False, "calibrate_every": 0, "max_variants": 1, "profile": "h100"}
    )  # fmt: skip
    assert cfg.allowed_bits == (8, 2) and cfg.budget == 0.25
    assert LowbitConfig(memory_budget=123_456).budget == 123_456
    assert LowbitConfig(mode="speed").budget == 0.5
    assert LowbitConfig(memory_budget=1.0).budget == 1.0


def test_unknown_profile_surfaces_through_torch_compile():
    options = {"inner": "eager", "profile": "nope"}
    model = torch.compile(torch.nn.Linear(4, 4), backend="lowbit", options=options)
    with pytest.raises(Exception, match="profile 'nope' is neither a file nor a shipped profile"):
        model(torch.randn(2, 4))
