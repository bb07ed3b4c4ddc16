"""Rewrite: store saved tensors in the forms a :class:`~fxlowbit.plan.Plan` chose.

Forward: right after each compressed tensor's producer, insert ``quantize_pack`` / ``pack_mask``
(for CMP_MASK first the scalar comparisons the backward would make) and return the packed parts in
its place among the saved outputs. Backward: replace its placeholder by placeholders for the parts
and decode them once, just before the first use (all backward readers share that one decode), so
only the activations in use are live in full precision. Relies on AOTAutograd matching saved
forward outputs and backward placeholders by position; order is kept, ``meta["val"]`` is set on
every new node and both graphs are linted and recompiled.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.functions import FloorDiv

from ..plan import Form, Plan
from . import _ops

log = logging.getLogger(__name__)
lowbit = torch.ops.fxlowbit

__all__ = ["run"]


def _fake(fn, *args):
    """Run ``fn`` on the FakeTensor values of node arguments to get the new node's meta["val"]."""
    vals = fx.node.map_arg(list(args), lambda a: a.meta["val"])
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


class _SymBuilder:
    """Materialise symbolic sizes as backward-graph nodes computed from the saved-symint
    placeholders (the partitioner guarantees every free symbol of a saved tensor is bound there)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.bound = {}
        for ph in graph.find_nodes(op="placeholder"):
            val = ph.meta.get("val")
            if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
                self.bound.setdefault(val.node.expr, ph)

    def __call__(self, value):
        """Map ints, SymInts, forward SymInt nodes and lists of them to backward arguments."""
        if isinstance(value, (list, tuple)):
            return type(value)(self(v) for v in value)
        if isinstance(value, fx.Node) and isinstance(value.meta.get("val"), torch.SymInt):
            value = value.meta["val"]
        if isinstance(value, torch.SymInt):
            return self._expr(value.node.expr, value)
        return value

    def _expr(self, expr, like):
        if expr.is_Integer:
            return int(expr)
        if expr in self.bound:
            return self.bound[expr]
        if isinstance(expr, (sympy.Add, sympy.Mul)):
            fn = operator.add if isinstance(expr, sympy.Add) else operator.mul
            args = [self._expr(a, like) for a in expr.args]
            out = args[0]
            for a in args[1:]:
                out = _call(self.graph, fn, (out, a))
            return out
        if isinstance(expr, FloorDiv):
            return _call(self.graph, operator.floordiv, tuple(self._expr(a, like) for a in expr.args))
        raise NotImplementedError(f"fxlowbit: cannot rebuild symbolic size {expr} in the backward graph")


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


class _Rewriter:
    def __init__(
        self,
        fw: fx.GraphModule,
        bw: fx.GraphModule,
        num_fwd_outputs: int,
        group_size: int,
        stream: int,
        counters: Counter,
    ):
        self.fg, self.bg = fw.graph, bw.graph
        self.group_size, self.stream, self.counters = group_size, stream, counters
        self.out_node = self.fg.find_nodes(op="output")[0]
        self.outputs = list(self.out_node.args[0])
        self.new_outputs = self.outputs[:num_fwd_outputs]
        self.placeholders = {p.name: p for p in self.bg.find_nodes(op="placeholder")}
        self.stored: list = []  # (old placeholder, bw part placeholders, decode (op, args), users or None)

    def emit(self, node: fx.Node, ph: fx.Node, parts: list[fx.Node]) -> list[fx.Node]:
        """Return ``parts`` from the forward in ``node``'s place; matching backward placeholders."""
        for p in parts:
            if "saved_tensor_with_no_vc_check" in node.meta:
                p.meta["saved_tensor_with_no_vc_check"] = node.meta["saved_tensor_with_no_vc_check"]
        self.new_outputs.extend(parts)
        return [_placeholder_like(self.bg, ph, p) for p in parts]

    def quant(self, node: fx.Node, ph: fx.Node, bits: int) -> None:
        val = node.meta["val"]
        with self.fg.inserting_after(node):
            qp = _call(self.fg, lowbit.quantize_pack.default, (node, bits, self.group_size, self.stream))
        with self.fg.inserting_after(qp):
            codes = _call(self.fg, operator.getitem, (qp, 0), f"{node.name}_codes")
        with self.fg.inserting_after(codes):
            meta = _call(self.fg, operator.getitem, (qp, 1), f"{node.name}_qmeta")
        codes, meta = self.emit(node, ph, [codes, meta])
        args = (codes, meta, bits, self.group_size, list(val.shape), list(val.stride()), val.dtype)
        self.stored.append((ph, (lowbit.dequantize_unpack.default, args), None))
        self.counters[f"saved_quant{bits}"] += 1

    def mask(self, node: fx.Node, ph: fx.Node) -> None:
        val = node.meta["val"]
        with self.fg.inserting_after(node):
            packed = _call(self.fg, lowbit.pack_mask.default, (node,), f"{node.name}_bits")
        (packed,) = self.emit(node, ph, [packed])
        self.stored.append(
            (ph, (lowbit.unpack_mask.default, (packed, list(val.shape), list(val.stride()))), None)
        )
        self.counters["saved_mask"] += 1

    def comparisons(self, node: fx.Node, ph: fx.Node) -> None:
        """Move the backward's scalar comparisons of ``node`` into the forward as 1-bit masks."""
        groups: dict[tuple, list[fx.Node]] = {}
        for user in _through_identities(ph):
            if user.op == "call_function" and user.target.overloadpacket in _COMPARISONS:
                groups.setdefault((user.target, user.args[1]), []).append(user)
        anchor = node
        for (target, scalar), users in groups.items():
            with self.fg.inserting_after(anchor):
                cmp = _call(self.fg, target, (node, scalar))
            with self.fg.inserting_after(cmp):
                anchor = _call(self.fg, lowbit.pack_mask.default, (cmp,), f"{node.name}_cmpbits")
            (packed,) = self.emit(node, ph, [anchor])
            cval = cmp.meta["val"]
            decode = (lowbit.unpack_mask.default, (packed, list(cval.shape), list(cval.stride())))
            self.stored.append((ph, decode, users))
            self.counters["saved_cmp_mask"] += 1

    def decode_all(self) -> None:
        """Decode each stored value just before its first backward use."""
        syms = _SymBuilder(self.bg)
        order = {n: i for i, n in enumerate(self.bg.nodes)}
        for ph, (target, args), users in self.stored:
            if users is None:
                first = _first_user(self.bg, [ph])
            else:
                first = min(users, key=order.__getitem__)
            with self.bg.inserting_before(first):
                value = _call(self.bg, target, syms(list(args)), f"{ph.name}_decoded")
            if users is None:
                ph.replace_all_uses_with(value)
            else:
                for u in users:
                    u.replace_all_uses_with(value)
                    self.bg.erase_node(u)
        for ph in dict.fromkeys(s[0] for s in self.stored):
            if ph.users:
                raise AssertionError(f"fxlowbit: placeholder {ph.name} still has users after rewrite")
            self.bg.erase_node(ph)
        self.out_node.args = (tuple(self.new_outputs),)
        self.bg.eliminate_dead_code()  # identity ops left without users by moved comparisons


def _through_identities(node: fx.Node):
    for user in list(node.users):
        if user.op == "call_function" and user.target in _ops.IDENTITIES:
            yield from _through_identities(user)
        else:
            yield user


_COMPARISONS = {
    torch.ops.aten.le,
    torch.ops.aten.lt,
    torch.ops.aten.gt,
    torch.ops.aten.ge,
    torch.ops.aten.eq,
    torch.ops.aten.ne,
}


def run(
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    plan: Plan,
    *,
    num_fwd_outputs: int,
    group_size: int,
    stream: int,
    counters: Counter | None = None,
) -> None:
    """Apply ``plan`` to the partitioned pair in place."""
    rw = _Rewriter(fw, bw, num_fwd_outputs, group_size, stream, Counter() if counters is None else counters)
    decisions = plan.by_name()
    for node in rw.outputs[num_fwd_outputs:]:
        d = decisions.get(node.name) if isinstance(node, fx.Node) else None
        ph = rw.placeholders.get(getattr(node, "name", None))
        if d is None or d.form == Form.KEEP or ph is None:
            rw.new_outputs.append(node)
            continue
        if d.masks:
            rw.comparisons(node, ph)
        if d.form == Form.QUANT:
            rw.quant(node, ph, d.bits - d.masks)
        elif d.form == Form.MASK:
            rw.mask(node, ph)
        elif d.form != Form.CMP_MASK:
            raise ValueError(f"fxlowbit: unknown form {d.form!r} for {node.name}")
        log.debug("%s: %s %s bits, %d -> %d bytes", node.name, d.form, d.bits, d.bytes_before, d.bytes_after)
    rw.decode_all()
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()
