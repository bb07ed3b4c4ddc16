"""The planner weighs PyTorch's own recompute partition (``activation_memory_budget``) against its
plan on the default partition, and keeps the cheaper (pipeline._weigh_mincut; option ``mincut``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import fxlowbit
from fxlowbit import costmodel, pipeline, planner
from fxlowbit.examples import TinyGPT, char_batches, sqnr_db, stdlib_text
from fxlowbit.passes import _ops
from fxlowbit.plan import Decision, Plan
from fxlowbit.records import Gemm
from tests._util import UNCOMPRESSED, step


def _gpt(dropout: float = 0.0):
    torch.manual_seed(0)
    x, y = next(char_batches(stdlib_text(), 8, 64, 1))
    return TinyGPT(dim=64, dropout=dropout), (x, y), lambda out: out


def test_tight_budget_takes_mincuts_partition_exactly():
    """At 0.1 a GPT's lossy plan (attention outputs and LayerNorm inputs rounded: no replay of
    softmax, reductions or attention) loses to min-cut's partition, which meets the budget with
    exact recompute: the gradient is the uncompressed one, the counters and the plan say so."""
    model, inputs, loss_fn = _gpt()
    ref_bytes, ref_grad, _ = step(model, inputs, loss_fn, options=UNCOMPRESSED)
    opts = {"memory_budget": 0.1, "inner": "eager", "seed": 0}
    nbytes, grad, _ = step(model, inputs, loss_fn, options=opts)
    (plan,) = fxlowbit.last_plans()
    c = fxlowbit.counters
    assert c["mincut_tried"] == 1 and c["mincut_used"] == 1 and c["mincut_unsafe"] == 0, dict(c)
    assert plan.partition.startswith("min-cut partition at activation_memory_budget=0.1")
    assert plan.bytes_after <= plan.budget and not planner.lossy(plan)
    assert plan.bytes_default > plan.bytes_before  # the default pair saves more than this one
    # exact: recompute reorders nothing in fp32 here (measured 2026-12-06: bit-identical)
    assert sqnr_db(ref_grad, grad) > 100
    assert nbytes * 8 <= ref_bytes, (nbytes, ref_bytes)  # walked from the loss: >= 8x fewer
    report = fxlowbit.last_report()
    assert "on the min-cut partition" in " ".join(str(report).split())  # wrapped text
    assert report.totals["bytes_before"] == plan.bytes_default


def test_the_repartition_reuses_the_first_partitions_cse(monkeypatch):
    """Min-cut replaces the joint graph by its CSE in place, so the re-partition skips CSE (one pass
    per compile, not two) and gets the same pair as with it (checked on T5, TinyGPT, GPT-2 and
    Mixtral at 0.1: the same forward and backward code, 2026-12-07)."""
    from torch._functorch import partitioners

    calls = []
    real = partitioners.fx_graph_cse

    def spy(graph):
        calls.append(len(graph.nodes))
        return real(graph)

    monkeypatch.setattr(partitioners, "fx_graph_cse", spy)
    model, inputs, loss_fn = _gpt()
    step(model, inputs, loss_fn, options={"memory_budget": 0.1, "inner": "eager", "seed": 0})
    assert fxlowbit.counters["mincut_tried"] == 1 and len(calls) == 1


def test_mincut_false_keeps_the_default_partition():
    model, inputs, loss_fn = _gpt()
    step(model, inputs, loss_fn, options={"memory_budget": 0.1, "inner": "eager", "seed": 0, "mincut": False})
    (plan,) = fxlowbit.last_plans()
    assert fxlowbit.counters["mincut_tried"] == 0 and plan.partition == "" and plan.bytes_default == 0
    assert planner.lossy(plan)  # what min-cut's partition replaces above


def test_loose_budget_is_not_repartitioned():
    """A plan that meets its budget exactly never pays for a second partition."""
    model, inputs, loss_fn = _gpt()
    step(model, inputs, loss_fn, options={"memory_budget": 0.9, "inner": "eager", "seed": 0})
    (plan,) = fxlowbit.last_plans()
    assert not planner.lossy(plan) and fxlowbit.counters["mincut_tried"] == 0


def test_a_partition_that_replays_random_ops_is_refused():
    """min-cut may recompute dropout in the backward with a fresh mask (pytorch/pytorch#190758):
    such a pair is never used, and an SDPA call without dropout does not count as random."""

    def fwd(x, drop):
        y = torch.nn.functional.scaled_dot_product_attention(x, x, x)
        return F.dropout(y, 0.5, training=True) if drop else y

    x = torch.randn(2, 2, 8, 4)
    plain = make_fx(lambda x: fwd(x, False))(x)
    dropped = make_fx(lambda x: fwd(x, True))(x)
    assert pipeline._replays_state(dropped, plain) and not pipeline._replays_state(plain, dropped)
    (sdpa,) = [n for n in plain.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert torch.Tag.nondeterministic_seeded in sdpa.target.tags  # tagged for its dropout_p
    assert not _ops.draws_random(sdpa)  # ... which is 0

    # end to end with dropout on: whatever pair is kept, its backward draws no mask
    model, inputs, loss_fn = _gpt(dropout=0.1)
    step(model, inputs, loss_fn, options={"memory_budget": 0.1, "inner": "eager", "seed": 0})
    (_, bw), c = fxlowbit.backend.last_graphs()[0], fxlowbit.counters
    assert c["mincut_tried"] == 1 and c["mincut_unsafe"] + c["mincut_used"] <= 1
    seeded = [n for n in bw.graph.nodes if isinstance(n.target, torch._ops.OpOverload)
              and _ops.draws_random(n)]  # fmt: skip
    assert not seeded, seeded


def _plan(time_s: float, variance: float) -> Plan:
    d = Decision("x", "mm", (4,), "float32", "quant", 4, 16, 4, "", time_s=time_s, variance=variance)
    return Plan((d,), budget=8, step_time_s=1.0, variance_ratio=variance)


def test_objective_prices_gemms_time_and_variance():
    profile = costmodel.load_profile(None)
    gemm = Gemm("aten.mm.default", 10**9, "float32", "bw")
    base = planner.objective(_plan(0.0, 0.0), [], profile, 1.0)
    assert base == 0.0
    assert planner.objective(_plan(0.0, 0.0), [gemm], profile, 1.0) == profile.matmul_time(10**9, "float32")
    assert planner.objective(_plan(0.002, 0.0), [], profile, 1.0) == 0.002
    assert planner.objective(_plan(0.0, 0.01), [], profile, 0.5) == 0.005  # ratio x reference step
