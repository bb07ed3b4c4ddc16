"""Rewrite: store saved tensors in the forms a :class:`~fxlowbit.plan.Plan` chose.

Forward: right after each compressed tensor's producer, insert ``quantize_pack`` / ``pack_mask``
(for CMP_MASK first the scalar comparisons the backward would make) and return the packed parts in
its place among the saved outputs. Backward: replace its placeholder by placeholders for the parts
and decode them just before the first use, so only one decoded activation is live at a time; VIEW
tensors replay their reshapes on their base's decoded value. Relies on AOTAutograd matching saved
forward outputs and backward placeholders by position; order is kept, ``meta["val"]`` is set on
every new node and both graphs are linted and recompiled.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter

import torch
import torch.fx as fx

from ..plan import Form, Plan

log = logging.getLogger(__name__)
lowbit = torch.ops.fxlowbit

__all__ = ["run"]


def _fake(fn, *args):
    """Run ``fn`` on the FakeTensor values of node arguments to get the new node's meta["val"]."""
    vals = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
    leaves = torch.utils._pytree.tree_leaves(vals)
    mode = next(v.fake_mode for v in leaves if isinstance(v, torch.Tensor))
    with mode:
        return fn(*vals)


def _call(graph: fx.Graph, target, args, name: str | None = None) -> fx.Node:
    node = graph.call_function(target, tuple(args))
    if name:
        node.name = graph._graph_namespace.create_name(name, None)
    node.meta["val"] = _fake(target, *args)
    return node


def _first_user(graph: fx.Graph, nodes) -> fx.Node:
    users = {u for n in nodes for u in n.users}
    for node in graph.nodes:
        if node in users:
            return node
    raise AssertionError("decoded saved tensor has no user")


def _placeholder_like(graph: fx.Graph, before: fx.Node, fw_node: fx.Node) -> fx.Node:
    with graph.inserting_before(before):
        ph = graph.placeholder(fw_node.name)
    ph.meta.update({k: v for k, v in fw_node.meta.items() if k in ("val", "tensor_meta")})
    return ph


def _replay_views(graph: fx.Graph, base: fx.Node, fw_view: fx.Node, stop: str) -> fx.Node:
    chain = []
    node = fw_view
    while node.name != stop:
        chain.append(node)
        node = node.args[0]
    out = base
    for fw_node in reversed(chain):
        out = _call(graph, fw_node.target, (out, *fw_node.args[1:]))
    return out


def run(fw: fx.GraphModule, bw: fx.GraphModule, plan: Plan, *, num_fwd_outputs: int, group_size: int,
        stream: int, counters: Counter | None = None) -> None:
    """Apply ``plan`` to the partitioned pair in place."""
    counters = Counter() if counters is None else counters
    fg, bg = fw.graph, bw.graph
    out_node = fg.find_nodes(op="output")[0]
    outputs = list(out_node.args[0])
    placeholders = {p.name: p for p in bg.find_nodes(op="placeholder")}
    decisions = plan.by_name()
    new_outputs = outputs[:num_fwd_outputs]
    decoded: dict[str, fx.Node] = {}  # saved name -> decoded value in the backward graph
    pending_views = []
    stored_parts: list = []  # (old placeholder, bw part placeholders, decode fn, comparison users)

    for node in outputs[num_fwd_outputs:]:
        d = decisions.get(node.name) if isinstance(node, fx.Node) else None
        ph = placeholders.get(getattr(node, "name", None))
        if d is None or d.form == Form.KEEP or ph is None:
            new_outputs.append(node)
            continue
        val = node.meta["val"]
        shape, stride, dtype = list(val.shape), list(val.stride()), val.dtype
        no_vc = {k: v for k, v in node.meta.items() if k == "saved_tensor_with_no_vc_check"}

        def emit(parts_fw: list[fx.Node]) -> list[fx.Node]:
            for p in parts_fw:
                p.meta.update(no_vc)
            new_outputs.extend(parts_fw)
            return [_placeholder_like(bg, ph, p) for p in parts_fw]

        if d.form == Form.VIEW:
            pending_views.append((node, ph, d.base))
            counters["saved_view_deduped"] += 1
            continue
        if d.form == Form.QUANT:
            with fg.inserting_after(node):
                qp = _call(fg, lowbit.quantize_pack.default, (node, d.bits, group_size, stream))
            with fg.inserting_after(qp):
                codes = _call(fg, operator.getitem, (qp, 0), f"{node.name}_codes")
            with fg.inserting_after(codes):
                meta = _call(fg, operator.getitem, (qp, 1), f"{node.name}_qmeta")
            parts = emit([codes, meta])
            decode = (lambda p, b=d.bits, s=shape, st=stride, dt=dtype:
                      (lowbit.dequantize_unpack.default, (p[0], p[1], b, group_size, s, st, dt)))
            stored_parts.append((ph, parts, decode, None))
            counters[f"saved_quant{d.bits}"] += 1
        elif d.form == Form.MASK:
            with fg.inserting_after(node):
                packed = _call(fg, lowbit.pack_mask.default, (node,), f"{node.name}_bits")
            parts = emit([packed])
            decode = lambda p, s=shape, st=stride: (lowbit.unpack_mask.default, (p[0], s, st))  # noqa: E731
            stored_parts.append((ph, parts, decode, None))
            counters["saved_mask"] += 1
        elif d.form == Form.CMP_MASK:
            comparisons: dict[tuple, list[fx.Node]] = {}
            for user in ph.users:
                comparisons.setdefault((user.target, user.args[1]), []).append(user)
            anchor = node
            for (target, scalar), users in comparisons.items():
                with fg.inserting_after(anchor):
                    cmp = _call(fg, target, (node, scalar))
                with fg.inserting_after(cmp):
                    packed = _call(fg, lowbit.pack_mask.default, (cmp,), f"{node.name}_cmpbits")
                anchor = packed
                parts = emit([packed])
                cshape, cstride = list(cmp.meta["val"].shape), list(cmp.meta["val"].stride())
                decode = lambda p, s=cshape, st=cstride: (lowbit.unpack_mask.default, (p[0], s, st))  # noqa: E731
                stored_parts.append((ph, parts, decode, users))
            counters["saved_cmp_mask"] += 1
        else:
            raise ValueError(f"fxlowbit: unknown form {d.form!r} for {node.name}")
        log.debug("%s: %s %s, %d -> %d bytes", node.name, d.form, d.bits, d.bytes_before, d.bytes_after)

    # Backward: decode each stored tensor just before its first use.
    for ph, parts, decode, users in stored_parts:
        targets = users if users is not None else [ph]
        if users is None and ph.name in {b for _, _, b in pending_views}:
            first = _first_user(bg, [ph] + [pv for _, pv, b in pending_views if b == ph.name])
        else:
            first = _first_user(bg, targets) if users is None else min(users, key=_order(bg))
        target, args = decode(parts)
        with bg.inserting_before(first):
            value = _call(bg, target, args, f"{ph.name}_decoded")
        if users is None:
            ph.replace_all_uses_with(value)
            decoded[ph.name] = value
        else:
            for u in users:
                u.replace_all_uses_with(value)
                bg.erase_node(u)
    for fw_node, ph, base in pending_views:
        base_value = decoded[base]
        first = _first_user(bg, [ph])
        with bg.inserting_before(first):
            value = _replay_views(bg, base_value, fw_node, base)
        ph.replace_all_uses_with(value)
    replaced = dict.fromkeys([ph for ph, *_ in stored_parts] + [ph for _, ph, _ in pending_views])
    for ph in replaced:
        if ph.users:
            raise AssertionError(f"fxlowbit: placeholder {ph.name} still has users after rewrite")
        bg.erase_node(ph)

    out_node.args = (tuple(new_outputs),)
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()


def _order(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__
