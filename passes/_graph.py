"""Small graph-building helpers shared by the rewrites (new nodes always get ``meta["val"]``)."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils._sympy.functions import FloorDiv

from ._ops import IDENTITIES

__all__ = [
    "value",
    "recorded",
    "size_hint",
    "fake",
    "call",
    "copy_module",
    "SymBuilder",
    "first_user",
    "placeholder_like",
    "through_identities",
    "NodeBuilder",
]


def recorded(node: fx.Node) -> Any:
    """What a node was recorded to produce, as recorded: ``meta["example_value"]`` on Dynamo
    graphs, ``meta["val"]`` on AOTAutograd's (a tensor, a SymInt, a tuple of them), else None."""
    return node.meta.get("example_value", node.meta.get("val"))


def value(node) -> torch.Tensor | None:
    """The tensor a node was recorded to produce (:func:`recorded`); None for a non-node, a
    non-tensor value or none recorded."""
    if not isinstance(node, fx.Node):
        return None
    v = recorded(node)
    return v if isinstance(v, torch.Tensor) else None


def size_hint(d, unknown: int | None = None) -> int | None:
    """A size as an int: a symbolic size's example value, ``unknown`` when it has none."""
    if isinstance(d, torch.SymInt):
        return d.node.hint if d.node.has_hint() else unknown
    return int(d)


def copy_module(gm: fx.GraphModule, lazy: bool = False) -> fx.GraphModule:
    """A copy of ``gm`` whose graph can be rewritten without touching ``gm``'s: nodes are new,
    ``meta`` dicts are shallow copies and attributes (weights, lifted tensor constants) are shared.
    ``copy.deepcopy`` would copy every FakeTensor in ``meta["val"]`` and every constant, and fails
    on graphs holding lifted constants (T5, Whisper: "Attempted to set the storage of a tensor on
    device "meta" to a storage on different device "cpu"").

    ``lazy``: the copy generates its Python code when first called or read (torch's
    ``_LazyGraphModule``, as Dynamo's graphs do), not here and not on each ``recompile()`` of a
    rewrite; about 70% of a copy's cost (Llama's pair: 18 of 25 ms, CPU, 2026-12-07). A caller that
    scopes the generated source (``calibrate._transient_source``) runs the copy inside that scope,
    as ``validate.plan_error`` does."""
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    graph._codegen = gm.graph._codegen
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    cls = _LazyGraphModule if lazy else fx.GraphModule
    return cls(gm, graph, gm.__class__.__name__)


def same_graph(a: fx.GraphModule, b: fx.GraphModule) -> bool:
    """Whether ``a`` and ``b`` hold the same nodes in the same order: names, ops, targets and
    arguments (a :func:`copy_module` copy that no rewrite touched since). Reads the graphs only: a
    lazy copy generates no code for it."""
    na, nb = a.graph.nodes, b.graph.nodes
    if len(na) != len(nb):
        return False
    return all(
        x.name == y.name
        and x.op == y.op
        and x.target == y.target
        and repr(x.args) == repr(y.args)
        and repr(x.kwargs) == repr(y.kwargs)
        for x, y in zip(na, nb, strict=True)
    )


def fake(fn, *args):
    """Run ``fn`` on the FakeTensor values of node arguments to get the new node's meta["val"]."""
    vals = fx.node.map_arg(list(args), lambda a: a.meta["val"])
    leaves = torch.utils._pytree.tree_leaves(vals)
    mode = next((v.fake_mode for v in leaves if isinstance(v, torch.Tensor)), None)  # type: ignore[attr-defined]  # FakeTensors
    if mode is None:  # size arithmetic on SymInts needs no fake mode
        return fn(*vals)
    with mode:
        return fn(*vals)


def call(graph: fx.Graph, target, args, name: str | None = None) -> fx.Node:
    node = graph.call_function(target, tuple(args))
    if name:
        node._rename(name)
    node.meta["val"] = fake(target, *args)
    return node


class SymBuilder:
    """Materialise symbolic sizes as backward-graph nodes computed from the saved-symint
    placeholders (the partitioner guarantees every free symbol of a saved tensor is bound there)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.bound: dict[sympy.Symbol, fx.Node] = {}  # size symbol -> its backward placeholder
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
            return self._expr(value.node.expr)
        return value

    def _expr(self, expr):
        if expr.is_Integer:
            return int(expr)
        if expr in self.bound:
            return self.bound[expr]
        if isinstance(expr, (sympy.Add, sympy.Mul)):
            fn = operator.add if isinstance(expr, sympy.Add) else operator.mul
            args = [self._expr(a) for a in expr.args]
            out = args[0]
            for a in args[1:]:
                out = call(self.graph, fn, (out, a))
            return out
        if isinstance(expr, FloorDiv):
            return call(self.graph, operator.floordiv, tuple(self._expr(a) for a in expr.args))
        raise NotImplementedError(f"fxlowbit: cannot rebuild symbolic size {expr} in the backward graph")


def first_user(graph: fx.Graph, node: fx.Node) -> fx.Node:
    for candidate in graph.nodes:
        if candidate in node.users:
            return candidate
    raise AssertionError(f"saved tensor {node.name} has no backward user")


def placeholder_like(graph: fx.Graph, before: fx.Node, fw_node: fx.Node) -> fx.Node:
    with graph.inserting_before(before):
        ph = graph.placeholder(fw_node.name)
    ph.meta.update({k: v for k, v in fw_node.meta.items() if k in ("val", "tensor_meta")})
    return ph


def through_identities(node: fx.Node):
    """Users of ``node``, looking through ops that return the same values (alias, clone, detach)."""
    for user in list(node.users):
        if user.op == "call_function" and user.target in IDENTITIES:
            yield from through_identities(user)
        else:
            yield user


class NodeBuilder:
    """Adds call nodes to a Dynamo graph at the graph's current insertion point, each with
    ``meta["example_value"]`` computed under ``fake_mode`` and the ``meta`` entries given (source
    locations of the node it replaces); :meth:`transaction` erases every node added when the block
    raises, so a rewrite that fails half-way leaves the graph as it was."""

    def __init__(self, graph: fx.Graph, fake_mode, meta: dict | None = None):
        self.graph, self.fake_mode, self.meta = graph, fake_mode, meta or {}
        self.added: list[fx.Node] = []

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        self.added.append(node)
        if self.fake_mode is not None:
            vals = fx.node.map_arg((args, kwargs), recorded)  # a tuple-valued op's too, for its getitem
            with self.fake_mode:
                node.meta["example_value"] = target(*vals[0], **vals[1])
        node.meta.update(self.meta)
        return node

    @contextlib.contextmanager
    def transaction(self) -> Iterator[NodeBuilder]:
        try:
            yield self
        except BaseException:
            for node in reversed(self.added):
                self.graph.erase_node(node)
            self.added.clear()
            raise
