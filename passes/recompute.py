"""Rewrite: replay producers in the backward instead of saving their outputs.

For every saved tensor the plan marks ``recompute``, the forward stops returning it and the
backward rebuilds it, just before its first use, by copying the ops that analysis recorded
(:class:`~fxlowbit.passes.analyze.Recompute`: pointwise and view ops, at most one matmul or
convolution) onto their leaves: saved tensors the backward receives anyway and graph inputs (added
to the saved outputs if absent; aliases of inputs cost no memory). A leaf may itself be replayed
(a chain): it is rebuilt first, before the earliest use of it or of what reads it. Runs before
``rewrite_saved``, so a replay reads the decoded value of a compressed leaf. Relies on AOTAutograd
matching saved outputs and backward placeholders by position and on the replayed ops being
deterministic; both graphs are linted and recompiled.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter

import torch
import torch.fx as fx

from ..plan import Form, Plan
from ._graph import SymBuilder, first_user, placeholder_like

log = logging.getLogger(__name__)

__all__ = ["run"]


def run(
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    plan: Plan,
    recipes: dict,
    *,
    num_fwd_outputs: int,
    counters: Counter | None = None,
) -> None:
    """Apply the plan's ``recompute`` decisions in place. ``recipes``: saved-tensor name ->
    :class:`~fxlowbit.passes.analyze.Recompute`."""
    names = [d.name for d in plan.decisions if d.form == Form.RECOMPUTE]
    replay(fw, bw, names, recipes, num_fwd_outputs=num_fwd_outputs, counters=counters)


def replay(
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    names: list[str],
    recipes: dict,
    *,
    num_fwd_outputs: int,
    counters: Counter | None = None,
    counter: str = "saved_recompute",
    save_any_leaf: bool = False,
) -> None:
    """Stop saving ``names``; rebuild each in the backward from its recipe. Leaves the backward
    does not receive yet are saved in the first replayed tensor's place: graph inputs, or any
    forward value when ``save_any_leaf``."""
    counters = Counter() if counters is None else counters
    if not names:
        return
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    out_node = fw.graph.find_nodes(op="output")[0]
    outputs = list(out_node.args[0])
    placeholders = {p.name: p for p in bw.graph.find_nodes(op="placeholder")}
    saved_here = {n.name for n in outputs[num_fwd_outputs:] if isinstance(n, fx.Node)}
    syms = SymBuilder(bw.graph)
    # A replay may read another replayed tensor (a chain): replay in forward order, each before
    # the first backward use of its own value or of any replay that reads it.
    position = {n.name: i for i, n in enumerate(fw.graph.nodes)}
    names = sorted(names, key=position.__getitem__)
    anchors = _anchors(bw.graph, names, recipes, placeholders)
    rebuilt: dict[str, fx.Node] = {}
    for name in names:
        recipe, ph = recipes[name], placeholders[name]
        # graph inputs the replay reads but the backward does not receive yet: save them (aliases)
        new_leaves = [leaf for leaf in recipe.leaves if leaf not in saved_here]
        for leaf in new_leaves:
            src = fw_nodes[leaf]
            if src.op != "placeholder" and not save_any_leaf:
                raise AssertionError(f"fxlowbit: replay leaf {leaf} is neither saved nor a graph input")
            outputs.insert(_saved_index(outputs, fw_nodes[name], num_fwd_outputs), src)
            placeholders[leaf] = placeholder_like(bw.graph, ph, src)
            saved_here.add(leaf)
        env = {leaf: rebuilt[leaf] if leaf in rebuilt else placeholders[leaf] for leaf in recipe.leaves}
        with bw.graph.inserting_before(anchors[name]):
            for node_name in recipe.nodes:
                src = fw_nodes[node_name]
                args, kwargs = fx.node.map_arg(
                    (src.args, src.kwargs), functools.partial(_arg, env=env, syms=syms)
                )
                new = bw.graph.call_function(src.target, args, kwargs)
                new.meta["val"] = src.meta["val"]
                env[node_name] = new
        rebuilt[name] = env[name]
        ph.replace_all_uses_with(env[name])
        bw.graph.erase_node(ph)
        del outputs[_saved_index(outputs, fw_nodes[name], num_fwd_outputs)]
        counters[counter] += 1
        log.debug("%s: recomputed from %s (%d ops)", name, recipe.leaves, len(recipe.nodes))
    out_node.args = (tuple(outputs),)
    fw.graph.eliminate_dead_code()
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()


def _anchors(graph: fx.Graph, names: list[str], recipes: dict, placeholders: dict) -> dict[str, fx.Node]:
    """The backward node each replay goes before: the first user of its saved value, or the
    anchor of a later replay that reads it, whichever comes first (``names`` in forward order)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    anchors: dict[str, fx.Node] = {}
    for name in reversed(names):
        anchors[name] = first_user(graph, placeholders[name])
    for name in reversed(names):  # readers come later in forward order: theirs are final here
        for leaf in recipes[name].leaves:
            if leaf in anchors and order[anchors[name]] < order[anchors[leaf]]:
                anchors[leaf] = anchors[name]
    return anchors


def _saved_index(outputs: list, node: fx.Node, num_fwd_outputs: int) -> int:
    """Position of ``node`` among the saved outputs (it may also be a user output before them)."""
    return num_fwd_outputs + outputs[num_fwd_outputs:].index(node)


def _arg(a: fx.Node, env: dict, syms: SymBuilder):
    if a.name in env:
        return env[a.name]
    if isinstance(a.meta.get("val"), torch.SymInt):
        return syms(a)
    raise AssertionError(f"fxlowbit: replay input {a.name} is not a leaf of the recipe")
