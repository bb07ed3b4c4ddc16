"""Matching generated fusions in FX graphs: :func:`match` reads off the forward graph the chain
of pointwise producers of a saved tensor, :func:`match_consumer` off the backward graph the
pointwise consumers of a decoded one, each as a :class:`.fusion_spec.Spec` with its input and
chain nodes. Chains hold aten pointwise ops of :data:`.fusion_spec.OPS` whose intermediates have
no users outside the chain; inputs are contiguous tensors of the output's shape, vectors
broadcast along the last dimension, or scalars, all of a float dtype of :mod:`.dtypes`.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .dtypes import FLOAT_NAMES
from .fusion_spec import OPS, Spec

__all__ = ["match", "match_consumer"]

_VIEWS = ("aten.view.default", "aten._unsafe_view.default")
_MAX_OPS = 32


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None  # AOT graphs: no example_value


def _supported(n: fx.Node) -> bool:
    v = _val(n)
    return (
        n.op == "call_function"
        and str(n.target) in OPS
        and not n.kwargs
        and isinstance(v, torch.Tensor)
        and v.dtype in FLOAT_NAMES
    )


def _same_flat(v: torch.Tensor, out: torch.Tensor) -> bool:
    """Same elements in the same flat order as ``out`` (rows of the same width for biases)."""
    return (
        v.is_contiguous()
        and v.dim() > 0
        and v.numel() == out.numel()
        and v.shape[-1] == out.shape[-1]
        and not any(isinstance(d, torch.SymInt) for d in v.shape)
    )


def _ancestors_within(root: fx.Node, allowed: set[fx.Node]) -> set[fx.Node]:
    """``root`` and its ancestors reachable through ``allowed`` nodes only."""
    found, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n in allowed and n not in found:
            found.add(n)
            stack.extend(a for a in n.args if isinstance(a, fx.Node))
    return found


def _input_kind(n: fx.Node, out: torch.Tensor) -> str | None:
    v = _val(n)
    if not isinstance(v, torch.Tensor) or v.dtype not in FLOAT_NAMES:
        return None
    if v.dim() == 0:
        return "scalar"
    if _same_flat(v, out):
        return "full"
    if v.is_contiguous() and v.numel() == out.shape[-1] and all(d == 1 for d in v.shape[:-1]):
        return "row"  # a bias: broadcast along the leading dimensions
    return None


def _kind(n: fx.Node, out: torch.Tensor) -> str:
    """:func:`_input_kind` of an input the matcher admitted (so it has one)."""
    kind = _input_kind(n, out)
    assert kind is not None
    return kind


def match(node: fx.Node) -> tuple[Spec, list[fx.Node], list[fx.Node]] | None:
    """``(spec, input nodes, chain nodes)`` for the pointwise chain producing ``node``, or None.
    Intermediates must have no users outside the chain (they are not written to memory)."""
    out = _val(node)
    if not _supported(node) or not out.is_contiguous() or any(isinstance(d, torch.SymInt) for d in out.shape):
        return None
    # candidates: supported same-shape ancestors; then drop any with a user outside the set (its
    # value escapes, so it must be written: it becomes an input) until nothing changes
    cand: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in cand or len(cand) > _MAX_OPS:
            continue
        if n is node or (_supported(n) and _same_flat(_val(n), out)):
            cand.add(n)
            stack.extend(a for a in n.args if isinstance(a, fx.Node))
    while True:
        escaping = {n for n in cand if n is not node and any(u not in cand for u in n.users)}
        # ancestors reachable only through a dropped node are no longer part of the chain
        keep = _ancestors_within(node, cand - escaping)
        if keep == cand:
            break
        cand = keep
    if len(cand) > _MAX_OPS:
        return None
    chain: list[fx.Node] = []
    inputs: list[fx.Node] = []

    def visit(n: fx.Node) -> bool:  # post-order: program order
        if n in chain or n in inputs:
            return True
        if n in cand:
            if not all(visit(a) for a in n.args if isinstance(a, fx.Node)):
                return False
            chain.append(n)
            return True
        if _input_kind(n, out) is None:
            return False
        inputs.append(n)
        return True

    if not visit(node) or not inputs:
        return None
    program = _program(chain, inputs)
    if program is None:
        return None
    return Spec(tuple(_kind(n, out) for n in inputs), program), inputs, chain


def match_consumer(src: fx.Node) -> tuple[Spec, list[fx.Node], list[fx.Node]] | None:
    """``(spec, external inputs, nodes)`` for the backward's pointwise ops that consume the decoded
    value of ``src`` (a saved tensor's placeholder) and end in ONE value used elsewhere (the sink,
    last of ``nodes``), or None. ``spec.inputs[0]`` is "decoded": the kernel decodes it in place."""
    out = _val(src)
    symbolic = isinstance(out, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in out.shape)
    if not isinstance(out, torch.Tensor) or not src.users or symbolic:
        return None
    order = {n: i for i, n in enumerate(src.graph.nodes)}
    cand: set[fx.Node] = set()
    stack = list(src.users)
    while stack and len(cand) <= _MAX_OPS:
        n = stack.pop()
        if n not in cand and _supported(n) and _same_flat(_val(n), out):
            cand.add(n)
            stack.extend(n.users)
    if not cand or len(cand) > _MAX_OPS:
        return None
    sink = max(cand, key=order.__getitem__)
    nodes = _ancestors_within(sink, cand)
    if any(u not in nodes for u in src.users) or any(
        n is not sink and any(u not in nodes for u in n.users) for n in nodes
    ):
        return None  # the decoded value or an intermediate is needed elsewhere
    chain = sorted(nodes, key=order.__getitem__)
    inputs: list[fx.Node] = []
    for n in chain:
        for a in n.args:
            if isinstance(a, fx.Node) and a is not src and a not in nodes and a not in inputs:
                if _input_kind(a, out) is None:
                    return None
                inputs.append(a)
    program = _program(chain, [src, *inputs])
    if program is None:
        return None
    return Spec(("decoded", *(_kind(a, out) for a in inputs)), program), inputs, chain


def _program(chain: list[fx.Node], inputs: list[fx.Node]):
    """The chain as program steps over ``inputs`` (None if an argument is not expressible)."""
    index = {n: i for i, n in enumerate(chain)}
    program = []
    for n in chain:
        args: list[tuple[str, int] | float | tuple[str, tuple[int, ...]]] = []
        for a in n.args:
            if isinstance(a, fx.Node):
                args.append(("v", index[a]) if a in index else ("in", inputs.index(a)))
            elif isinstance(a, (int, float)) and not isinstance(a, bool):
                args.append(float(a))
            elif isinstance(a, torch.dtype) and str(n.target) == "prims.convert_element_type.default":
                continue  # the output dtype carries it
            elif str(n.target) in _VIEWS and isinstance(a, (list, tuple)) and all(type(d) is int for d in a):
                args.append(("shape", tuple(a)))
            else:
                return None
        program.append((str(n.target), tuple(args), str(_val(n).dtype)))
    return tuple(program)
