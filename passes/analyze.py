"""Analysis: list every tensor the forward graph saves for the backward graph.

Pure: reads the partitioned forward/backward GraphModules and returns the frozen records of
:mod:`fxlowbit.records` (producer op, backward uses and their roles, dtype, symbolic bytes as sympy
expressions, whether it aliases a graph input, how to recompute it from other saved values) plus
the GEMM FLOPs of both graphs; :func:`saved_graph` draws the pair as one networkx graph.
Relies on AOTAutograd's convention that the forward returns
``[outputs..., saved tensors..., saved symints...]`` and the backward's placeholders for saved
values carry the same node names as the forward outputs.
"""

from __future__ import annotations

import logging
import operator
from typing import cast

import sympy
import torch
import torch.fx as fx

from ..gemm_cost import GEMM_TFLOPS_KEY
from ..records import Gemm, GraphFacts, Recompute, SavedTensor, Use
from . import _ops, sizes
from .flops import node_flops

# the records are defined in fxlowbit.records (no torch.fx) and re-exported here
__all__ = ["Use", "Recompute", "Gemm", "SavedTensor", "GraphFacts", "run", "int_range", "saved_graph"]

log = logging.getLogger(__name__)


def _root(node: fx.Node) -> fx.Node:
    """The first non-view ancestor of ``node`` in its graph."""
    while node.op == "call_function" and node.target in _ops.VIEWS:
        node = cast(fx.Node, node.args[0])  # a view's input
    return node


def _uses(
    node: fx.Node, seen: set[fx.Node] | None = None, direct: bool = True, forward: frozenset = frozenset()
) -> list[Use]:
    """Backward uses of ``node``, looking through transparent ops to their consumers. ``forward``:
    (name, target) of the forward graph's ops; a backward op found there is a forward op the
    partition recomputes in the backward (min-cut copies it under its joint-graph name): when no
    role is known for it, the use is EXACT (a noisy input would change the recomputed forward
    value), not unknown."""
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
                out.extend(_uses(user, seen, direct=direct and target in _ops.IDENTITIES, forward=forward))
                continue
            role = None
        if role is None and (user.name, target) in forward:
            out.append(Use(f"{_name(target)} (a recomputed forward op)", _ops.EXACT, None, direct))
            continue
        scalar = user.args[1 - index] if role == _ops.COMPARE else None
        out.append(Use(_name(target), role, scalar, direct))
    return out


_MAX_RECOMPUTE_NODES = 64  # a bound on replay length (masks built from positions take ~40)
# Matmuls and convolutions a replay may run (PyTorch's min-cut recomputes none of them): one per
# replay, so a replay costs at most one forward GEMM again; the planner prices it with the
# profile's GEMM throughput against storing the tensor.
_GEMMS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.convolution.default,
    # the ``sampling`` option's linear: forward F.linear (only its backward samples), so the
    # backward may rebuild its output from its input, which that backward keeps anyway
    torch.ops.fxlowbit.sampled_linear_keyed.default,
    # a linear with low-bit GEMMs: its forward is deterministic (round to nearest), so the backward
    # may rebuild its output (``getitem`` 0 of the op's tuple) from its input
    torch.ops.fxlowbit.lowbit_linear.default,
}
# GEMMs above that return a tuple: replayed through ``getitem`` of their first output
_TUPLE_GEMMS = {torch.ops.fxlowbit.lowbit_linear.default}


def _tuple_gemm(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _TUPLE_GEMMS


def _value_of(node: fx.Node) -> torch.Tensor:
    """The tensor ``node`` makes: its value, or a tuple GEMM's first output."""
    val = node.meta["val"]
    return val[0] if _tuple_gemm(node) else val


def _first_of_tuple_gemm(node: fx.Node) -> bool:
    """``getitem(op, 0)`` of a GEMM in :data:`_TUPLE_GEMMS`: the linear's output."""
    src = node.args[0] if node.op == "call_function" and node.target is operator.getitem else None
    return isinstance(src, fx.Node) and _tuple_gemm(src) and bool(node.args[1] == 0)


def _replayable(node: fx.Node) -> bool:
    """Deterministic pointwise, view or constant-building ops, or a matmul/convolution: ops the
    backward can replay to rebuild a value (the GEMMs are priced by the planner)."""
    target = node.target
    if _first_of_tuple_gemm(node):
        return True
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable:
        return False
    cheap = _ops.VIEWS | _ops.CONSTRUCTORS | _ops.CHEAP_MOVES
    return torch.Tag.pointwise in target.tags or target in cheap or target in _GEMMS


def _recompute(
    node: fx.Node, saved: set[str], hints: dict, activations: frozenset[str] = frozenset()
) -> Recompute | None:
    """A replay of ``node`` from saved tensors and graph inputs, or None if it needs anything else
    (a reduction, random numbers, more than one matmul/convolution, a long chain)."""
    order: list[fx.Node] = []
    leaves: dict[str, None] = {}
    seen: set[fx.Node] = set()

    def visit(n: fx.Node) -> bool:
        if n in seen:
            return True
        seen.add(n)
        if n is not node and (n.name in saved or n.op == "placeholder"):
            leaves[n.name] = None
            return True
        if not (isinstance(n.meta.get("val"), torch.Tensor) or _tuple_gemm(n)) or not _replayable(n):
            return False
        for a in n.all_input_nodes:
            if (isinstance(a.meta.get("val"), torch.Tensor) or _tuple_gemm(a)) and not visit(a):
                return False
        order.append(n)
        return len(order) <= _MAX_RECOMPUTE_NODES

    if node.op == "placeholder" or not visit(node):
        return None
    gemms = [n for n in order if n.target in _GEMMS]
    if len(gemms) > 1:  # one GEMM per replay (the record names it)
        return None
    # Inductor fuses the pointwise part into one kernel: it reads the leaves and writes the result.
    vals = [node.meta["val"], *(n.meta["val"] for n in seen if n.name in leaves)]
    tensors = [v for v in vals if isinstance(v, torch.Tensor)]
    moved = sum(sizes.at(sizes.numel(v) * v.dtype.itemsize, hints) for v in tensors)
    from_inputs = all(n.op == "placeholder" and n.name not in activations for n in seen if n.name in leaves)
    nodes, names = tuple(n.name for n in order), tuple(leaves)
    if not gemms:
        return Recompute(nodes, names, moved, from_inputs)
    (gemm,) = gemms
    flops = node_flops(gemm, lambda v: sizes.concrete(v, hints)) or 0
    dtype = str(_value_of(gemm).dtype).replace("torch.", "")
    fwd_fmt = str(gemm.args[3]) if _tuple_gemm(gemm) else ""
    dtype = GEMM_TFLOPS_KEY.get(fwd_fmt, dtype)  # a low-bit forward: its format's table
    return Recompute(nodes, names, moved, from_inputs, gemm.name, flops, dtype)


def _static_prod(dims) -> int | None:
    out = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        out *= d
    return out


def int_range(node: fx.Node) -> tuple[int, int] | None:
    """``(lo, hi)`` bounding an integer tensor's values by what its producer can return: the
    window offsets of Inductor's low-memory max-pool (``[0, kernel area)``) and the indices of
    ``max_pool*_with_indices`` (``[0, pooled input's spatial size)``). Static sizes only."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.is_floating_point() or val.dtype == torch.bool:
        return None
    if node.target is not operator.getitem or node.args[1] != 1:
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_function":
        return None
    name = _name(src.target).split(".")
    if "_low_memory_max_pool_with_offsets" in name:
        area = _static_prod(src.args[1])  # kernel_size, one entry per spatial dim
    elif any(n.startswith("max_pool") and n.endswith("d_with_indices") for n in name):
        op = next(n for n in name if n.startswith("max_pool"))
        spatial = int(op[len("max_pool")])  # max_pool2d_with_indices -> 2 spatial dims
        x = src.args[0].meta.get("val") if isinstance(src.args[0], fx.Node) else None
        area = _static_prod(x.shape[-spatial:]) if isinstance(x, torch.Tensor) else None
    else:
        return None
    return None if area is None or area < 1 else (0, area - 1)


def _must_save(node: fx.Node) -> bool:
    """Whether activation checkpointing marked ``node`` MUST_SAVE: store it, never recompute it."""
    from torch.utils.checkpoint import CheckpointPolicy

    return node.meta.get("recompute") == CheckpointPolicy.MUST_SAVE


def _gemms(gm: fx.GraphModule, graph: str, hints: dict) -> list[Gemm]:
    out = []
    for n in gm.graph.nodes:
        flops = node_flops(n, lambda v: sizes.concrete(v, hints))
        if flops is None:
            continue
        dtype = next((a.meta["val"].dtype for a in n.all_input_nodes
                      if isinstance(a.meta.get("val"), torch.Tensor)), None)  # fmt: skip
        out.append(Gemm(_name(n.target), flops, str(dtype).replace("torch.", ""), graph))
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


def run(
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    num_fwd_outputs: int,
    activations: frozenset[str] = frozenset(),
    data: frozenset[str] = frozenset(),
) -> GraphFacts:
    """Collect :class:`GraphFacts` for a partitioned forward/backward pair (no mutation).
    ``activations``: forward placeholders that are activations of an earlier compiled graph (a
    graph break before the loss hands it the logits; they require grad and are not parameters):
    a saved alias of one is memory this graph keeps alive, so it is not ``input_alias``. ``data``:
    forward placeholders of the user's batch (no grad): kept as they are, but counted."""
    outputs = fw.graph.find_nodes(op="output")[0].args[0]
    bw_inputs = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}

    saved = []
    hints: dict = sizes.all_hints(fw, bw)
    saved_names = {n.name for n in outputs[num_fwd_outputs:] if isinstance(n, fx.Node)}
    pinned = _pinned_shares(outputs[num_fwd_outputs:])
    forward = frozenset((n.name, n.target) for n in fw.graph.nodes if n.op == "call_function")
    for node in outputs[num_fwd_outputs:]:
        if not isinstance(node, fx.Node):
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue  # symints and opaque objects are never touched
        root = _root(node)
        numel = sizes.numel(val)
        nbytes = numel * val.dtype.itemsize
        if node.name in pinned:  # kept as it is, a view holds its whole root's storage
            nbytes = sympy.Max(nbytes, pinned[node.name])
        placeholder = bw_inputs.get(node.name)
        saved.append(
            SavedTensor(
                name=node.name,
                producer="placeholder" if node.op == "placeholder" else _name(node.target),
                shape=tuple(sizes.expr(d) if not isinstance(d, int) else d for d in val.shape),
                dtype=val.dtype,
                numel=numel,
                nbytes=nbytes,
                nbytes_hint=int(nbytes.subs(hints)),
                uses=tuple(_uses(placeholder, forward=forward)) if placeholder is not None else (),
                input_alias=root.op == "placeholder" and root.name not in activations,
                data_input=root.op == "placeholder" and root.name in data,
                # a checkpoint policy's MUST_SAVE (user's or the partitioner's) is never replayed
                recompute=None if _must_save(node) else _recompute(node, saved_names, hints, activations),
                int_range=int_range(node),
            )
        )
    gemms = _gemms(fw, "fw", hints) + _gemms(bw, "bw", hints)
    log.debug("%d saved tensors (%d graph-input aliases), %d GEMMs", len(saved),
              sum(s.input_alias for s in saved), len(gemms))  # fmt: skip
    return GraphFacts(saved=tuple(saved), hints=hints, gemms=tuple(gemms))


def saved_graph(fw: fx.GraphModule, bw: fx.GraphModule, facts: GraphFacts):
    """The pair as one ``networkx.DiGraph`` (for inspection; the compile never builds it): nodes
    ``"fw:<name>"`` / ``"bw:<name>"`` with their ``op`` and ``target``, data edges within each
    graph, and an edge ``fw:<name> -> bw:<name>`` marked ``saved=True`` per saved tensor of
    ``facts`` (call it on the pair :func:`run` analysed, before later passes rewrite it)."""
    import networkx as nx

    g = nx.DiGraph()
    for prefix, gm in (("fw", fw), ("bw", bw)):
        for n in gm.graph.nodes:
            g.add_node(f"{prefix}:{n.name}", op=n.op, target=_name(n.target))
            for a in n.all_input_nodes:
                g.add_edge(f"{prefix}:{a.name}", f"{prefix}:{n.name}")
    for s in facts.saved:
        g.add_edge(f"fw:{s.name}", f"bw:{s.name}", saved=True)
    return g


def _pinned_shares(saved_nodes) -> dict[str, int]:
    """Saved views into a larger storage that no saved tensor or graph input owns (Falcon's k and
    v: slices of one fused QKV projection that saved_views leaves as views because they cover a
    third of it; CLIP's CLS token, a slice of the vision tower's last hidden state, which min-cut's
    re-partition saves). Kept as they are, they keep the whole storage alive, which the walk from
    the loss counts: each such view is charged an equal share of the storage's bytes. A user output
    does not own its storage here: the step keeps it alive through the saved view for as long as
    the autograd graph lives, whether or not the caller keeps the output. A compressed form reads
    the view alone and frees the storage."""
    owned: set[int] = set()  # storages that something else keeps alive anyway
    groups: dict[int, tuple[int, list[fx.Node]]] = {}  # storage -> (its bytes, saved views into it)
    for node in saved_nodes:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            continue
        size = val.untyped_storage().nbytes()
        if not isinstance(size, int) or any(not isinstance(d, int) for d in val.shape):
            continue  # symbolic sizes: left as they are (int() would specialise them)
        key = val.untyped_storage()._cdata  # the storage itself (a Python wrapper's id can be reused)
        root = _root(node)
        if root.op == "placeholder" or val.numel() * val.dtype.itemsize == size:
            owned.add(key)
            continue
        groups.setdefault(key, (size, []))[1].append(node)
    return {
        node.name: size // len(nodes)
        for key, (size, nodes) in groups.items()
        if key not in owned
        for node in nodes
    }
