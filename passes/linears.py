"""Linear layers on Dynamo's FX graph, as the passes that rewrite them (:mod:`.lowbit_gemm`,
:mod:`.sparsity`, :mod:`.sampling`) find, name and replace them.

A linear is one ``torch._C._nn.linear`` node (``nn.Linear`` and ``F.linear`` alike) carrying its
module path in ``nn_module_stack``; :func:`module_name` is the one spelling of that path, shared by
the reports and the ``*_filter`` option globs.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..codegen.kernels.lowbit_linear import PLAIN
from ._graph import NodeBuilder, size_hint, value

__all__ = [
    "LINEAR",
    "module_name",
    "linear_args",
    "addmm_args",
    "LINEAR_OR_CONV1D",
    "args_of",
    "weight_of",
    "example_size",
    "unsupported",
    "replace",
    "rewrite_each",
]

LINEAR = frozenset({F.linear, torch._C._nn.linear})
_SIGNATURE = inspect.signature(lambda input, weight, bias=None: None)
# the frame's root: L['self'], L__self__, or L['args'][0] when the module is the first positional
# argument of a decorated forward (transformers' models)
_ROOT = re.compile(r"^L\['args'\]\[0\]\.?|^L\['[^']*'\]\.?|^L__self__\.?")
_SOURCE_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def module_name(node: fx.Node | None) -> str:
    """Dotted path of the innermost module a node came from (``"blocks.0.fc1"``; "" when unknown),
    from its ``nn_module_stack`` (Dynamo graphs) or ``fwd_nn_module_stack`` (backward nodes): the
    one spelling reports and the ``*_filter`` globs share."""
    if node is None:
        return ""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    path = _ROOT.sub("", path).replace("._modules['", ".").replace("']", "")
    return re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".")


def linear_args(node: fx.Node):
    """(x, w, b) nodes of a linear call and their values (x, w, b, y), or None if it does not bind."""
    try:
        bound = _SIGNATURE.bind(*node.args, **node.kwargs).arguments
    except TypeError:
        return None
    x, w, b = bound["input"], bound["weight"], bound.get("bias")
    return (x, w, b), (value(x), value(w), value(b), value(node))


def addmm_args(node: fx.Node):
    """``torch.addmm(b, x, w)`` with a 1-D bias and unit alpha/beta (``transformers``' Conv1D, GPT-2's
    linears: ``w`` is (in, out)) as the linear ``x w^T`` of ``w^T``: ((x, w, b) nodes, their values
    (x, w^T, b, y)), or None."""
    if len(node.args) != 3 or any(node.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")):
        return None
    if set(node.kwargs) - {"alpha", "beta"}:
        return None
    b, x, w = node.args
    bv, xv, wv, yv = value(b), value(x), value(w), value(node)
    if bv is None or wv is None or bv.dim() != 1 or wv.dim() != 2:
        return None
    return (x, w, b), (xv, wv.t(), bv, yv)


LINEAR_OR_CONV1D = LINEAR | {torch.addmm}
"""Linear calls and ``torch.addmm`` (``transformers``' Conv1D when :func:`addmm_args` binds)."""


def args_of(node: fx.Node):
    """:func:`linear_args` of a linear call, :func:`addmm_args` of an ``addmm`` (as a linear)."""
    return addmm_args(node) if node.target is torch.addmm else linear_args(node)


def weight_of(add, node: fx.Node, w: fx.Node) -> fx.Node:
    """The (out, in) weight of the linear ``node`` for a replacement op: ``w`` itself, or for a
    Conv1D ``addmm`` (weight (in, out)) its transpose, added with ``add``."""
    return add(torch.t, w) if node.target is torch.addmm else w


def example_size(d) -> int:
    """A size at the example sizes; a symbolic one without an example: assume large."""
    return size_hint(d, 1 << 16)  # type: ignore[return-value]


def mnk(xv: torch.Tensor, wv: torch.Tensor) -> tuple[int, int, int]:
    """(tokens, out features, in features) of a linear of input ``xv`` and (out, in) weight ``wv``."""
    tokens = example_size(xv.numel() // xv.shape[-1]) if xv.shape[-1] else 0
    return tokens, example_size(wv.shape[0]), example_size(wv.shape[1])


def unsupported(xv, wv, b, bv, yv) -> str:
    """Why a linear with these values cannot be replaced by the project's linear ops ("" if it can)."""
    if xv is None or wv is None or yv is None or (b is not None and bv is None):
        return "no tensor values recorded"
    if xv.dim() < 2 or wv.dim() != 2:
        return f"input {tuple(xv.shape)} / weight {tuple(wv.shape)}: need (..., K) with >= 2 dims and (N, K)"
    if yv.dtype not in PLAIN.values():
        return f"dtype {yv.dtype}"
    devices = {t.device for t in (xv, wv, bv, yv) if t is not None}
    if len(devices) != 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    return ""


def replace(graph: fx.Graph, node: fx.Node, x, w, b, dtype: torch.dtype, build: Callable) -> None:
    """Replace ``node`` by what ``build(add, x, w, b)`` returns, ``add`` adding call nodes before it
    (:class:`._graph.NodeBuilder`, with the node's source locations); inputs are cast to ``dtype``
    first (autocast made the linear's output dtype, so the op runs in it too). A failure leaves the
    graph as it was."""
    add = NodeBuilder(graph, getattr(value(x), "fake_mode", None),
                      {k: node.meta[k] for k in _SOURCE_META if k in node.meta})  # fmt: skip
    with add.transaction(), graph.inserting_before(node):
        x, w, b = (v if v is None or value(v).dtype == dtype else add(torch.Tensor.to, v, dtype)  # type: ignore[union-attr]
                   for v in (x, w, b))  # fmt: skip
        out = build(add, x, w, b)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def rewrite_each(
    gm: fx.GraphModule,
    consider: Callable[[fx.Node], Any],
    targets: Collection = LINEAR,
    rewrote: Callable[[Any], bool] = lambda result: True,
) -> list:
    """``consider(node)`` for every call of ``targets`` in ``gm``, in graph order; returns the results
    that are not None. When any result ``rewrote`` the graph, the graph is linted and recompiled,
    also when a later ``consider`` raises (the linears rewritten so far stay rewritten)."""
    results: list = []
    changed = False
    try:
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in targets:
                result = consider(node)
                if result is not None:
                    results.append(result)
                    changed = changed or rewrote(result)
    finally:
        if changed:
            gm.graph.lint()
            gm.recompile()
    return results
