"""Inline a pure-torch function into an FX graph: trace it with make_fx over the graph's own fake
values and copy the traced nodes in at the current insertion point. This is how the CPU path hands
our reference kernels to Inductor, which then fuses them with their neighbours."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx


def inline(graph: fx.Graph, fn, args: list):
    """Insert ``fn(*args)`` into ``graph``; ``args`` mixes fx.Nodes (tensor or SymInt valued, also
    inside lists) and constants. Returns the output node, or a tuple of nodes for tuple outputs."""
    leaves, spec = pytree.tree_flatten(list(args))
    nodes = [a for a in leaves if isinstance(a, fx.Node)]

    def bound(*vals):
        it = iter(vals)
        return fn(*pytree.tree_unflatten([next(it) if isinstance(a, fx.Node) else a for a in leaves], spec))

    vals = [n.meta["val"] for n in nodes]
    mode = next(v.fake_mode for v in vals if isinstance(v, torch.Tensor))  # type: ignore[attr-defined]  # FakeTensors
    from torch._inductor.decomposition import select_decomp_table

    with mode:  # decomposed as AOTAutograd decomposes for Inductor (e.g. _to_copy -> convert_element_type)
        sub = make_fx(bound, decomposition_table=select_decomp_table(), tracing_mode="real")(*vals)
    env = dict(zip(sub.graph.find_nodes(op="placeholder"), nodes, strict=True))
    for node in sub.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            return fx.node.map_arg(node.args[0], env.__getitem__)
        if node.op != "call_function":
            raise NotImplementedError(f"fxlowbit: cannot inline a {node.op} node ({node.target})")
        env[node] = graph.node_copy(node, env.__getitem__)
    raise AssertionError("traced graph has no output")
