"""The analysis pass on real partitioned graphs: saved tensors, roles, symbolic bytes, networkx
view, and no mutation."""

import pytest
import sympy
import torch

from fxlowbit.examples import MLP
from fxlowbit.passes import analyze

EAGER = {"inner": "eager", "seed": 0}


@pytest.fixture
def captured(monkeypatch):
    """Record (facts, forward code before, after analysis) for every compiled graph."""
    seen = []
    original = analyze.run

    def spy(fw, bw, num_fwd_outputs):
        before = (fw.code, bw.code)
        facts = original(fw, bw, num_fwd_outputs)
        seen.append((facts, before, (fw.code, bw.code)))
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
    ((facts, before, after),) = captured
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
    ((facts, _, _),) = captured
    activations = [s for s in facts.saved if not s.input_alias and s.nbytes.free_symbols]
    assert activations, "batch-dependent saved tensors must have symbolic sizes"
    for s in activations:
        assert s.nbytes.subs(facts.hints) == s.nbytes_hint
        (sym,) = s.nbytes.free_symbols
        # the expression scales with the batch size: doubling the batch doubles the bytes
        assert sympy.simplify(s.nbytes.subs(sym, 2 * sym) - 2 * s.nbytes) == 0


def test_networkx_view_links_saved_tensors(captured):
    _compile_mlp(dynamic=False)
    ((facts, _, _),) = captured
    g = facts.nx_graph
    saved_edges = [(a, b) for a, b, d in g.edges(data=True) if d.get("saved")]
    assert len(saved_edges) == len(facts.saved)
    for s in facts.saved:
        assert g.has_edge(f"fw:{s.name}", f"bw:{s.name}")
    import networkx as nx

    assert nx.is_directed_acyclic_graph(g)
