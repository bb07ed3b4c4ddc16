"""The analysis pass on real partitioned graphs: saved tensors, roles, symbolic bytes, networkx
view, and no mutation."""

import operator

import pytest
import sympy
import torch

from fxlowbit.examples import MLP
from fxlowbit.passes import analyze

EAGER = {"inner": "eager", "seed": 0}


@pytest.fixture
def captured(monkeypatch):
    """Record (facts, forward code before, after analysis, the pair's networkx graph) for every
    compiled graph."""
    seen = []
    original = analyze.run

    def spy(fw, bw, num_fwd_outputs, *rest):
        before = (fw.code, bw.code)
        facts = original(fw, bw, num_fwd_outputs, *rest)
        seen.append((facts, before, (fw.code, bw.code), analyze.saved_graph(fw, bw, facts)))
        return facts

    monkeypatch.setattr(analyze, "run", spy)
    return seen


def _compile_mlp(dynamic, batch=48):
    model = MLP(hidden=256)
    compiled = torch.compile(model, backend="lowbit", options=EAGER, dynamic=dynamic)
    compiled(torch.randn(batch, 64)).sum().backward()
    return model


def test_lists_saved_tensors_with_producers_and_uses(captured):
    _compile_mlp(dynamic=False)
    facts, before, after, _ = captured[0]  # the first partition (a re-plan may add a second)
    assert before == after  # analysis never mutates the graphs
    by = facts.by_name()
    producers = {s.producer for s in facts.saved}
    assert {"placeholder", "aten.addmm.default", "aten.le.Scalar"} <= producers
    params = [s for s in facts.saved if s.producer == "placeholder"]
    assert params and all(s.input_alias for s in params)
    masks = [s for s in facts.saved if s.dtype == torch.bool]
    assert len(masks) == 2  # dropout mask and a ReLU mask
    floats = [s for s in facts.saved if s.is_float and not s.input_alias]
    assert all(any(u.role == "value" for u in s.uses) for s in floats)
    assert all(s.nbytes == s.nbytes_hint for s in facts.saved)  # static shapes: plain integers
    assert by  # names index the records


def test_symbolic_bytes_under_dynamic_shapes(captured):
    _compile_mlp(dynamic=True, batch=48)
    facts, _, _, _ = captured[0]
    activations = [s for s in facts.saved if not s.input_alias and s.nbytes.free_symbols]
    assert activations, "batch-dependent saved tensors must have symbolic sizes"
    for s in activations:
        assert s.nbytes.subs(facts.hints) == s.nbytes_hint
        (sym,) = s.nbytes.free_symbols
        # the expression scales with the batch size: doubling the batch doubles the bytes
        assert sympy.simplify(s.nbytes.subs(sym, 2 * sym) - 2 * s.nbytes) == 0


def test_networkx_view_links_saved_tensors(captured):
    _compile_mlp(dynamic=False)
    facts, _, _, g = captured[0]  # the first partition (a re-plan may add a second)
    saved_edges = [(a, b) for a, b, d in g.edges(data=True) if d.get("saved")]
    assert len(saved_edges) == len(facts.saved)
    for s in facts.saved:
        assert g.has_edge(f"fw:{s.name}", f"bw:{s.name}")
    import networkx as nx

    assert nx.is_directed_acyclic_graph(g)


def test_value_range_of_pooling_offsets_and_indices(captured):
    """Max-pool window offsets lie in [0, kernel area): 2x2 -> [0, 3], 3x3 -> [0, 8] (Inductor's
    low-memory max-pool, our decompositions); aten's max_pool2d_with_indices returns indices into
    the pooled input's spatial plane: [0, H*W)."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.MaxPool2d(2), torch.nn.MaxPool2d(3, stride=2)
    )
    compiled = torch.compile(model, backend="lowbit", options=EAGER)
    compiled(torch.randn(4, 3, 12, 12)).sum().backward()
    facts, _, _, _ = captured[0]
    ranges = sorted(s.int_range for s in facts.saved if s.int_range is not None)
    assert ranges == [(0, 3), (0, 8)]
    assert all(s.int_range is None for s in facts.saved if s.is_float)

    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2, 8, 6, 7)
    pool = g.call_function(torch.ops.aten.max_pool2d_with_indices.default, (x, [2, 2]))
    idx = g.call_function(operator.getitem, (pool, 1))
    idx.meta["val"] = torch.empty(2, 8, 3, 3, dtype=torch.int64)
    assert analyze.int_range(idx) == (0, 41)
    values = g.call_function(operator.getitem, (pool, 0))
    values.meta["val"] = torch.empty(2, 8, 3, 3)
    assert analyze.int_range(values) is None


def test_gemms_count_cpu_attention_as_the_benchmarks_do(captured):
    """The planner's step estimate and the benchmarks count matmul FLOPs with one function
    (passes/flops.py): SDPA's CPU flash kernels and their backward are counted in both graphs, at
    the formula's value for these sizes."""
    from fxlowbit.passes import flops

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 64, 3, 4, 8).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch.compile(Attention(), backend="lowbit", options=EAGER)(torch.randn(2, 64, 32)).sum().backward()
    facts = captured[0][0]
    attn = [g for g in facts.gemms if "scaled_dot_product" in g.op]
    assert {g.graph for g in attn} == {"fw", "bw"}, facts.gemms
    fw = next(g for g in attn if g.graph == "fw")
    assert fw.flops == 2 * 2 * (2 * 4 * 64 * 64 * 8), fw  # QK^T and PV, b*h*s*s*d multiply-adds each
    bw = next(g for g in attn if g.graph == "bw")
    assert 2 * bw.flops == 5 * fw.flops, bw  # QK^T again, dV, dP, dQ, dK: five of the forward's two
    from fxlowbit import backend

    graphs = [gm for pair in backend.last_graphs() for gm in pair]
    assert flops.matmul_flops(graphs) >= sum(g.flops for g in facts.gemms) > 0


def test_the_flop_count_includes_the_projects_own_linear_ops():
    """flop_counter's registry is read when a node is counted, not copied at import: the formulas
    codegen/kernels registers for its ops (low-bit, 2:4, sampled linears, the fused loss) count in
    the planner's step estimate (a copy taken at import missed them and shortened it)."""
    from fxlowbit.passes import flops

    ops = ("lowbit_linear", "sparse24_linear", "sparse24_linear_bwd", "linear_ce_fwd_grad", "sampled_linear")
    for op in ops:
        assert flops.formula(getattr(torch.ops.fxlowbit, op)) is not None, op


def _recomputing_pair(bw_name: str):
    """A forward saving ``mm`` for a backward that applies amax to it, the backward's node named
    ``bw_name``: "amax" is how min-cut names a forward op it recomputes in the backward (the
    joint graph's node, copied), "amax_1" a backward op of the same target (not a copy)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    aten = torch.ops.aten

    def forward(x, w):
        mm = aten.mm.default(x, w)
        return aten.amax.default(mm, [-1], True).sum(), mm

    fw = make_fx(forward)(torch.randn(8, 4), torch.randn(4, 16))
    assert [n.name for n in fw.graph.find_nodes(op="output")[0].args[0]][1] == "mm"
    g = torch.fx.Graph()
    mm, _ = g.placeholder("mm"), g.placeholder("tangents_1")
    node = g.create_node("call_function", aten.amax.default, (mm, [-1], True), name=bw_name)
    g.output((node,))
    return fw, torch.fx.GraphModule({}, g)


def test_a_forward_op_recomputed_in_the_backward_keeps_its_input_exact_without_warning():
    """min-cut recomputes forward ops such as attention or amax in the backward: their saved inputs
    stay exact (a noisy input would change the recomputed forward value) as a known EXACT use,
    without the "not known to tolerate" warning an unknown backward op gets."""
    fw, bw = _recomputing_pair("amax")
    (saved,) = [s for s in analyze.run(fw, bw, 1).saved if s.name == "mm"]
    assert [(u.op, u.role) for u in saved.uses] == [("aten.amax.default (a recomputed forward op)", "exact")]
    # the control: the same op, but the backward's own (not a copy of the forward's): unknown
    fw, bw = _recomputing_pair("amax_1")
    (saved,) = [s for s in analyze.run(fw, bw, 1).saved if s.name == "mm"]
    assert {(u.op, u.role) for u in saved.uses} == {("aten.amax.default", None)}
