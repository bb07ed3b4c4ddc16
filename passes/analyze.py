"""Analysis: list every tensor the forward graph saves for the backward graph.

Pure: reads the partitioned forward/backward GraphModules and returns frozen records (producer op,
backward uses and their roles, dtype, symbolic bytes as sympy expressions, view root) plus a
networkx view of both graphs. Relies on AOTAutograd's convention that the forward returns
``[outputs..., saved tensors..., saved symints...]`` and the backward's placeholders for saved
values carry the same node names as the forward outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import networkx as nx
import sympy
import torch
import torch.fx as fx

from . import _ops

__all__ = ["SavedTensor", "GraphFacts", "run"]


@dataclasses.dataclass(frozen=True)
class Use:
    op: str  # target of the backward consumer (looked through transparent ops)
    role: str | None  # _ops.VALUE / COMPARE, or None: not known to tolerate compression
    scalar: Any = None  # the scalar a COMPARE use compares with
    direct: bool = True  # False when reached through a transparent (view/copy) op


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    name: str
    position: int  # index in the forward graph's output tuple
    producer: str  # target of the producing forward op ("placeholder" for graph inputs)
    shape: tuple[Any, ...]  # ints, or sympy expressions for symbolic sizes
    stride: tuple[Any, ...]
    dtype: torch.dtype
    numel: sympy.Expr
    nbytes: sympy.Expr
    nbytes_hint: int  # at the example sizes
    uses: tuple[Use, ...]
    view_root: str  # first non-view ancestor in the forward graph (itself if not a view)
    input_alias: bool  # aliases a graph input (parameter, buffer, user input): costs no memory
    forward_output_alias: bool  # also (an alias of) a value the forward returns to the user

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class GraphFacts:
    saved: tuple[SavedTensor, ...]
    num_fwd_outputs: int
    nx_graph: nx.DiGraph  # nodes "fw:<name>" / "bw:<name>", saved edges fw -> bw
    hints: dict  # sympy symbol -> value at the example sizes

    def by_name(self) -> dict[str, SavedTensor]:
        return {s.name: s for s in self.saved}


def _expr(d) -> sympy.Expr:
    return sympy.Integer(d) if isinstance(d, int) else d.node.expr


def _symbol_hint(shape_env, sym) -> int:
    """Value of a shape symbol at the example sizes, without adding guards."""
    values = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val
    return int(values[sym]) if sym in values else int(shape_env.size_hint(sym))


def _root(node: fx.Node) -> fx.Node:
    """The first non-view ancestor of ``node`` in its graph."""
    while node.op == "call_function" and node.target in _ops.VIEWS:
        node = node.args[0]
    return node


def _uses(node: fx.Node, seen: set[fx.Node] | None = None, direct: bool = True) -> list[Use]:
    """Backward uses of ``node``, looking through transparent ops to their consumers."""
    seen = set() if seen is None else seen
    out: list[Use] = []
    for user in node.users:
        if user in seen:
            continue
        seen.add(user)
        if user.op == "output":
            out.append(Use("output", None, direct=direct))
            continue
        target = user.target
        index = _arg_index(user, node)
        role = _ops.role(target, index, user.args) if user.op == "call_function" else None
        if role == _ops.TRANSPARENT:
            if index == 0:  # the viewed/copied tensor (for cat: its list of inputs)
                out.extend(_uses(user, seen, direct=direct and target in _ops.IDENTITIES))
                continue
            role = None
        scalar = user.args[1 - index] if role == _ops.COMPARE else None
        out.append(Use(_name(target), role, scalar, direct))
    return out


def _arg_index(user: fx.Node, node: fx.Node) -> int:
    for i, a in enumerate(user.args):
        if a is node or (isinstance(a, (list, tuple)) and any(x is node for x in a)):
            return i
    return -1  # kwarg


def _name(target) -> str:
    if isinstance(target, (str, torch._ops.OpOverload)):
        return str(target)
    return getattr(target, "__name__", str(target))


def run(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> GraphFacts:
    """Collect :class:`GraphFacts` for a partitioned forward/backward pair (no mutation)."""
    outputs = fw.graph.find_nodes(op="output")[0].args[0]
    bw_inputs = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    user_outputs = {n for n in outputs[:num_fwd_outputs] if isinstance(n, fx.Node)}
    user_output_roots = {_root(n) for n in user_outputs}

    g = nx.DiGraph()
    for prefix, gm in (("fw", fw), ("bw", bw)):
        for n in gm.graph.nodes:
            g.add_node(f"{prefix}:{n.name}", op=n.op, target=_name(n.target))
            for a in n.all_input_nodes:
                g.add_edge(f"{prefix}:{a.name}", f"{prefix}:{n.name}")

    saved = []
    hints: dict = {}
    for pos, node in enumerate(outputs):
        if pos < num_fwd_outputs or not isinstance(node, fx.Node):
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue  # symints and opaque objects are never touched
        g.add_edge(f"fw:{node.name}", f"bw:{node.name}", saved=True)
        root = _root(node)
        numel = sympy.Integer(1)
        for d in val.shape:
            numel = numel * _expr(d)
            if not isinstance(d, int):
                for sym in _expr(d).free_symbols:
                    hints.setdefault(sym, _symbol_hint(d.node.shape_env, sym))
        nbytes = numel * val.dtype.itemsize
        placeholder = bw_inputs.get(node.name)
        saved.append(
            SavedTensor(
                name=node.name,
                position=pos,
                producer="placeholder" if node.op == "placeholder" else _name(node.target),
                shape=tuple(_expr(d) if not isinstance(d, int) else d for d in val.shape),
                stride=tuple(_expr(d) if not isinstance(d, int) else d for d in val.stride()),
                dtype=val.dtype,
                numel=numel,
                nbytes=nbytes,
                nbytes_hint=int(nbytes.subs(hints)),
                uses=tuple(_uses(placeholder)) if placeholder is not None else (),
                view_root=root.name,
                input_alias=root.op == "placeholder",
                forward_output_alias=node in user_outputs or root in user_output_roots,
            )
        )
    return GraphFacts(saved=tuple(saved), num_fwd_outputs=num_fwd_outputs, nx_graph=g, hints=hints)
