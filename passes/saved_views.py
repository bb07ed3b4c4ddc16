"""Rewrite: save one dense tensor instead of several saved views of it.

When the backward receives views of one forward value R (attention's q, k and v are strided
slices of one projection output), the forward saves R once in their place and the backward
rebuilds each view by replaying its view ops on R. Exact; never stores more (only when the views
together cover at least R's elements, or R is saved anyway); and R is dense, so the packing and
unpacking that later passes add read contiguous memory and fuse with their neighbours instead of
gathering strided elements. Runs right after the partition, before analysis; relies on the
backward binding every shape symbol of R and of the view arguments (checked, else skipped).
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from typing import cast

import torch
import torch.fx as fx

from ..records import Recompute
from . import _ops
from ._graph import SymBuilder
from .recompute import replay
from .sizes import all_hints, at, numel

log = logging.getLogger(__name__)

__all__ = ["run"]


def run(
    fw: fx.GraphModule, bw: fx.GraphModule, *, num_fwd_outputs: int, counters: Counter | None = None
) -> int:
    """Replace groups of saved views by their root; returns the number of views replaced."""
    outputs = fw.graph.find_nodes(op="output")[0].args[0]
    saved = [n for n in outputs[num_fwd_outputs:] if isinstance(n, fx.Node)]
    saved_names = {n.name for n in saved}
    bw_names = {p.name for p in bw.graph.find_nodes(op="placeholder")}
    groups: dict[fx.Node, list[tuple[fx.Node, list[fx.Node]]]] = {}
    for node in saved:
        chain, root = [], node
        while root.op == "call_function":
            if root.target in _ops.VIEWS:
                chain.append(root)
                root = cast(fx.Node, root.args[0])  # a view's input
            elif root.target is operator.getitem and _is_split(root.args[0]):
                split = cast(fx.Node, root.args[0])
                chain += [root, split]  # a piece of a split is a view of its input
                root = cast(fx.Node, split.args[0])
            else:
                break
        if chain and root.op == "call_function" and isinstance(root.meta.get("val"), torch.Tensor):
            if node.name in bw_names:
                groups.setdefault(root, []).append((node, chain[::-1]))
    if not groups:
        return 0
    hints = all_hints(fw, bw)
    bound = set(SymBuilder(bw.graph).bound)
    recipes = {}
    for root, views in groups.items():
        covered = sum(at(numel(v.meta["val"]), hints) for v, _ in views)
        if root.name not in saved_names and at(numel(root.meta["val"]), hints) > covered:
            continue  # storing the root would cost more than the views
        if not _symbols(root, [c for _, chain in views for c in chain]) <= bound:
            continue
        for view, chain in views:
            recipes[view.name] = Recompute(tuple(c.name for c in chain), (root.name,), 0)
    replay(
        fw, bw, list(recipes), recipes, num_fwd_outputs=num_fwd_outputs, counters=counters,
        counter="saved_views_to_root", save_any_leaf=True,
    )  # fmt: skip
    log.debug("saved views rebuilt from their roots: %s", sorted(recipes))
    return len(recipes)


_SPLITS = {
    torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.unbind.int,
    torch.ops.aten.chunk.default,
}


def _is_split(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SPLITS


def _symbols(root: fx.Node, chain: list[fx.Node]) -> set:
    """Free shape symbols the backward needs to rebuild ``root``'s views."""
    out: set = set()
    val = root.meta["val"]
    for d in [*val.shape, *val.stride()]:
        if isinstance(d, torch.SymInt):
            out |= d.node.expr.free_symbols
    for node in chain:
        if node.target is operator.getitem:
            continue  # (split, index): the split is in the chain
        for a in torch.utils._pytree.tree_leaves((node.args[1:], node.kwargs)):
            v = a.meta.get("val") if isinstance(a, fx.Node) else a
            if isinstance(v, torch.SymInt):
                out |= v.node.expr.free_symbols
            elif isinstance(a, fx.Node):
                out.add(None)  # a tensor argument: not a plain view chain
    return out
