"""The CPU path traces the low-bit linears' bodies into the graphs Inductor compiles
(passes/lower_linears.py): the same codes, scales, noise and results as the opaque ops
(``kernels="ops"``), counters that say what was lowered and what stayed an op, reports that still
name the GEMM formats, and a failure contained to "they run as ops".

The reference is the op path run with the same seed: a single linear draws one seed a backward, so
the lowered run must match it up to the epilogue's fp32 summation order (relative error 1e-5, the
largest measured 2.2e-7). With several linears Inductor may order the backward's seed draws
differently from the ops' execution order, so each linear gets another (equally independent)
draw; those runs are checked against the fp32 gradients instead (unbiased noise: the SQNR of the
op path, within 3 dB).
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

import fxlowbit
from fxlowbit import passes
from fxlowbit.backend import counters, last_graphs
from fxlowbit.examples import sqnr_db
from fxlowbit.memory import saved_tensors

NO_PLAN = {"passes": {"plan": False}, "calibrate_every": 0, "seed": 3}  # GEMMs only, no probes


def _grads(model, x, **options):
    """(loss, input and parameter gradients, counters) of one compiled step (Inductor inner)."""
    torch._dynamo.reset()
    fxlowbit.reset()
    xx = x.clone().requires_grad_()
    loss = torch.compile(model, backend="lowbit", options={**NO_PLAN, **options})(xx).square().mean()
    loss.backward()
    grads = [xx.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, dict(counters)


def _rel(a, b) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


@pytest.mark.parametrize("gemm", ["int8", ("int8", "int8", "off"), ("off", "int8", "int8")])
def test_one_linear_matches_the_ops(gemm):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 96), nn.GELU()), torch.randn(200, 64)
    loss_op, ref, c_op = _grads(model, x, gemm=gemm, kernels="ops")
    loss, got, c = _grads(model, x, gemm=gemm)
    assert c_op.get("lowbit_linear_lowered", 0) == 0 and c["lowbit_linear_lowered"] == 2  # fwd + bwd
    assert c.get("lowbit_linear_kept_op", 0) == 0
    torch.testing.assert_close(loss, loss_op, rtol=1e-6, atol=0)
    assert max(_rel(r, g) for r, g in zip(ref, got, strict=True)) < 1e-5
    fw, bw = last_graphs()[-1]
    ops = {n.target for g in (fw, bw) for n in g.graph.nodes if n.op == "call_function"}
    assert (
        not {torch.ops.fxlowbit.lowbit_linear.default, torch.ops.fxlowbit.lowbit_linear_backward.default}
        & ops
    )
    assert torch.ops.aten._int_mm.default in ops


def test_several_linears_keep_the_ops_gradient_quality_and_reproduce():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32))
    x = torch.randn(256, 64)
    loss_ref, exact, _ = _grads(model, x, gemm="off")
    _, via_ops, _ = _grads(model, x, gemm="int8", kernels="ops")
    loss, lowered, c = _grads(model, x, gemm="int8")
    _, again, _ = _grads(model, x, gemm="int8")
    assert c["lowbit_linear_lowered"] == 6
    assert all(torch.equal(a, b) for a, b in zip(lowered, again, strict=True))  # seeded: reproduces
    torch.testing.assert_close(loss, loss_ref, rtol=0.02, atol=0)
    for e, o, g in zip(exact[1:], via_ops[1:], lowered[1:], strict=True):  # parameters
        assert sqnr_db(e, g) > sqnr_db(e, o) - 3, (sqnr_db(e, g), sqnr_db(e, o))
        assert sqnr_db(e, g) > 15


class _SharedInput(nn.Module):
    """Three linears reading one input, as q, k and v do."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(64, 48) for _ in range(3))

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def _saved_int8(loss) -> list[torch.Tensor]:
    """The int8 tensors the backward holds, one per storage (walked from ``loss.grad_fn``)."""
    out = [t for t in saved_tensors(loss) if t.dtype == torch.int8]
    return list({t.untyped_storage().data_ptr(): t for t in out}.values())


def test_linears_reading_one_input_quantize_it_once_and_save_one_copy():
    """The three lowered forwards quantize x identically; CSE over the inlined nodes leaves one
    quantization, so the backward holds one int8 copy of x where the ops held three (3 before the
    change, walked from ``loss.grad_fn``). The gradients are those of the ops up to the epilogue's
    summation order (the codes are the same)."""
    torch.manual_seed(0)
    model, x = _SharedInput(), torch.randn(128, 64)
    # the grad-weight GEMM int8 too: only then the backward reads the forward's copy (with it
    # plain, x itself); seeded, both runs draw the same gradient noise
    gemm = ("int8", "off", "int8")
    _, ref, _ = _grads(model, x, gemm=gemm, kernels="ops", seed=0)
    _, got, c = _grads(model, x, gemm=gemm, seed=0)
    assert c["lowbit_linear_lowered"] == 6 and c["lowbit_linear_cse"] > 0
    assert max(_rel(r, g) for r, g in zip(ref, got, strict=True)) < 1e-5
    fw, _ = last_graphs()[-1]
    saved = fw.graph.find_nodes(op="output")[0].args[0]
    codes = {n for n in saved if isinstance(n, torch.fx.Node) and n.meta["val"].dtype == torch.int8}
    assert len(codes) == 1, codes  # the three lowbit_linear ops each returned their own
    torch._dynamo.reset()
    fxlowbit.reset()
    f = torch.compile(model, backend="lowbit", options={**NO_PLAN, "gemm": gemm})
    loss = f(x).square().mean()
    assert len(_saved_int8(loss)) == 1


def test_what_stays_an_op_is_counted_and_still_right():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 64)), torch.randn(128, 64)
    _, exact, _ = _grads(model, x, gemm="off")
    _, got, c = _grads(model, x, gemm="int8", gemm_hadamard=32)
    assert c["lowbit_linear_kept_op"] == 2 and c.get("lowbit_linear_lowered", 0) == 0
    assert min(sqnr_db(e, g) for e, g in zip(exact, got, strict=True)) > 15
    fw, _ = last_graphs()[-1]
    assert any(n.target is torch.ops.fxlowbit.lowbit_linear.default for n in fw.graph.nodes)
    _, _, c = _grads(model, x, gemm="int8", inner="eager")  # nothing traced in: eager runs the ops
    assert c.get("lowbit_linear_lowered", 0) == 0 and c.get("lowbit_linear_kept_op", 0) == 0


def test_defaults_with_a_budget_lower_and_report_the_formats():
    """Default options (planner, probes) with int8 forced: lowered in the compiled pair; the report,
    built from the graphs before lowering, still names the GEMM formats and the saved int8 copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(256, 64)
    torch._dynamo.reset()
    fxlowbit.reset()
    f = torch.compile(model, backend="lowbit", options={"gemm": "int8", "memory_budget": 0.3})
    for _ in range(3):
        f(x).square().mean().backward()
    assert counters["lowbit_linear_lowered"] >= 4 and counters.get("lower_linears_failed", 0) == 0
    text = fxlowbit.last_report().to_text(width=200)
    assert "int8/int8/int8" in text and "saved input copy" in text


def test_a_failure_leaves_the_ops_with_one_warning(monkeypatch):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 64)), torch.randn(128, 64)
    _, ref, _ = _grads(model, x, gemm="int8", kernels="ops")

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(passes.lower_linears, "inline", broken)
    with pytest.warns(
        UserWarning, match=r"lowering the low-bit linears failed \(RuntimeError: boom\); they run as ops"
    ):
        _, got, c = _grads(model, x, gemm="int8")
    assert c["lower_linears_failed"] == 1
    assert max(_rel(r, g) for r, g in zip(ref, got, strict=True)) < 1e-5
    with pytest.raises(Exception, match="boom"):
        _grads(model, x, gemm="int8", strict=True)


def test_the_merge_takes_pure_repeats_only():
    """Identical functional ops merge, the round-to-nearest quantizer and the getitems of merged
    tuples too; uninitialised buffers, random draws and other custom ops do not."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    aten = torch.ops.aten
    nodes = [
        graph.call_function(aten.abs.default, (x,)),
        graph.call_function(aten.abs.default, (x,)),  # merges with the first
        graph.call_function(aten.empty.memory_format, ([0],)),
        graph.call_function(aten.empty.memory_format, ([0],)),  # two buffers, kept
        graph.call_function(aten.rand.default, ([2],)),
        graph.call_function(aten.rand.default, ([2],)),  # two draws, kept
        graph.call_function(torch.ops.fxlowbit.draw_seed.default, (x, 3)),
        graph.call_function(torch.ops.fxlowbit.draw_seed.default, (x, 3)),  # custom op, kept
    ]
    q1 = graph.call_function(torch.ops.fxlowbit.quantize_int8.default, (x,))
    q2 = graph.call_function(torch.ops.fxlowbit.quantize_int8.default, (x,))  # merges with q1
    codes = [graph.call_function(operator.getitem, (q, 0)) for q in (q1, q2)]  # then these merge
    graph.output((*nodes, *codes))
    assert passes.lower_linears._merge_repeats(graph, [*nodes, q1, q2, *codes]) == 3
    out = graph.find_nodes(op="output")[0].args[0]
    assert out[0] is out[1] and len(set(out[2:8])) == 6
    assert out[8] is out[9] and out[8].args[0] is q1
