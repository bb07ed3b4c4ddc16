"""Pattern matching for :mod:`.linear_ce`: from a ``cross_entropy`` / ``nll_loss`` node of a Dynamo
graph back to the projection that made its logits. Pure: reads the graph and its recorded values
(``meta["example_value"]``), raises :class:`Skip` with the reason when the graph is not the pattern.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ._graph import value
from .linears import LINEAR


class Skip(Exception):
    """The graph around a loss is not the pattern (the message says why)."""


@dataclasses.dataclass
class Match:
    loss: fx.Node
    logits: fx.Node  # the loss's (N, V) input
    proj: fx.Node
    h: fx.Node
    w: fx.Node  # (V, H); or (H, V) with w_transposed
    w_transposed: bool
    b: fx.Node | None
    target: fx.Node
    ignore_index: int
    reduction: str
    label_smoothing: float
    scale: float
    softcap: float
    slices: list  # leading-dim getitem indices of the logits, replayed on h
    chain: list[fx.Node]  # nodes between the projection and the loss, loss side first
    tail: list[fx.Node]  # the projection and the weight transpose it used (erased if left unused)


_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "unsqueeze", "squeeze"}
_RESHAPE_FNS = {torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze}
_CAST_METHODS = {"float", "to", "type"}
_MUL = ({operator.mul, torch.mul}, {"mul", "__mul__", "__rmul__"})
_DIV = ({operator.truediv, torch.div}, {"div", "__truediv__"})
_TANH = ({torch.tanh}, {"tanh"})
_LOG_SOFTMAX = ({F.log_softmax, torch.log_softmax}, {"log_softmax"})
_MATMUL = ({torch.matmul, operator.matmul, torch.mm}, {"matmul", "mm"})
LOSSES: dict[object, inspect.Signature] = {  # by fx target
    F.cross_entropy: inspect.signature(F.cross_entropy),
    F.nll_loss: inspect.signature(F.nll_loss),
}


def is_call(node, fns, methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in fns) or (
        node.op == "call_method" and node.target in methods
    )


def val(node) -> torch.Tensor:
    v = value(node)
    if v is None:
        raise Skip(f"no tensor value recorded for {node}")
    return v


def _scalar(node: fx.Node) -> tuple[fx.Node, float]:
    """(tensor argument, scalar) of a mul/div by a Python number; the tensor is the numerator."""
    if node.kwargs:
        raise Skip(f"{node.name}: keyword arguments")
    a, c = node.args
    if is_call(node, *_MUL) and not isinstance(a, fx.Node):
        a, c = c, a
    if not isinstance(a, fx.Node) or isinstance(c, bool) or not isinstance(c, (int, float)) or c == 0:
        raise Skip(f"{node.name}: not a scaling by a nonzero Python number")
    return a, (float(c) if is_call(node, *_MUL) else 1.0 / c)


def _leading_slices(index, ndim: int) -> bool:
    """Whether ``index`` is slices (and at most one Ellipsis) that leave the last dim whole."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(e, slice) or e is Ellipsis for e in index) or index.count(Ellipsis) > 1:
        return False
    if Ellipsis in index:
        last = index[-1] if index[-1] is not Ellipsis else None
    else:
        last = index[ndim - 1] if len(index) == ndim else None
    return last is None or last == slice(None)


def _untranspose(node: fx.Node) -> fx.Node | None:
    """``x`` if ``node`` is a 2-D transpose of ``x`` (t, .T, transpose, permute), else None."""
    args: Any = node.args  # the op's own arguments (dims are ints once is_call matched it)
    if is_call(node, {torch.t}, {"t"}) or is_call(node, {getattr}) and args[1] in ("T", "mT"):
        return args[0]
    if is_call(node, {torch.transpose}, {"transpose"}) and len(args) == 3 and not node.kwargs:
        return args[0] if {args[1] % 2, args[2] % 2} == {0, 1} else None
    if is_call(node, set(), {"permute"}) and not node.kwargs:
        dims = args[1] if len(args) == 2 else args[1:]
        return args[0] if [d % 2 for d in dims] == [1, 0] else None
    return None


def _projection(node: fx.Node):
    """(h, w, w_transposed, b) of a linear / matmul / mm / addmm node, else None."""
    if is_call(node, LINEAR):
        bound = inspect.signature(lambda input, weight, bias=None: None).bind(*node.args, **node.kwargs)
        h, w, b = bound.arguments["input"], bound.arguments["weight"], bound.arguments.get("bias")
        return h, w, False, b
    if is_call(node, *_MATMUL) and not node.kwargs and len(node.args) == 2:
        return node.args[0], node.args[1], True, None
    if is_call(node, {torch.addmm}) and not node.kwargs and len(node.args) == 3:
        return node.args[1], node.args[2], True, node.args[0]
    return None


def match(loss: fx.Node) -> Match:
    try:
        bound = LOSSES[loss.target].bind(*loss.args, **loss.kwargs).arguments
    except TypeError as err:
        raise Skip(f"{loss.name}: {err}") from None
    x, target = bound["input"], bound["target"]
    smoothing = bound.get("label_smoothing", 0.0)
    if bound.get("weight") is not None:
        raise Skip(f"{loss.name}: class weights")
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing <= 1:
        raise Skip(f"{loss.name}: label smoothing {smoothing!r} not a number in [0, 1]")
    if bound.get("size_average") is not None or bound.get("reduce") is not None:
        raise Skip(f"{loss.name}: legacy size_average/reduce arguments")
    reduction, ignore_index = bound.get("reduction", "mean"), bound.get("ignore_index", -100)
    if reduction not in ("mean", "sum", "none") or not isinstance(ignore_index, int):
        raise Skip(f"{loss.name}: reduction {reduction!r}, ignore_index {ignore_index!r}")
    xv, tv = val(x), val(target)
    if xv.dim() != 2 or tv.dim() != 1 or tv.dtype.is_floating_point or tv.shape[0] != xv.shape[0]:
        raise Skip(f"{loss.name}: input {tuple(xv.shape)} / target {tuple(tv.shape)} not (N, V) / (N,)")
    vocab = xv.shape[-1]
    chain: list[fx.Node] = []
    node = x
    if loss.target is F.nll_loss:  # log-probs: reshapes, then log_softmax over the last dim
        while is_call(node, _RESHAPE_FNS, _RESHAPE_METHODS):
            chain.append(node)
            node = node.args[0]
        if not is_call(node, *_LOG_SOFTMAX):
            raise Skip(f"{loss.name}: nll_loss input is not a log_softmax")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dim is None or dim % val(node).dim() != val(node).dim() - 1 or node.kwargs.get("_stacklevel"):
            raise Skip(f"{node.name}: log_softmax not over the last dim")
        chain.append(node)
        node = node.args[0]
    while (proj := _projection(node)) is None:
        ok = is_call(node, _RESHAPE_FNS, _RESHAPE_METHODS | _CAST_METHODS) or is_call(node, *_TANH)
        ok = ok or is_call(node, *_MUL) or is_call(node, *_DIV) or is_call(node, {operator.getitem})
        if not ok:
            raise Skip(f"{loss.name}: {node} ({node.target}) between the projection and the loss")
        chain.append(node)
        node = _scalar(node)[0] if is_call(node, *_MUL) or is_call(node, *_DIV) else node.args[0]
        if not isinstance(node, fx.Node):
            raise Skip(f"{loss.name}: chain leaves the graph")
    h, w, w_t, b = proj
    hv, wv, yv = val(h), val(w), val(node)
    hidden = hv.shape[-1]
    if wv.dim() != 2 or tuple(wv.shape) != ((hidden, vocab) if w_t else (vocab, hidden)):
        raise Skip(f"{node.name}: weight {tuple(wv.shape)} does not map {hidden} -> {vocab}")
    if tuple(yv.shape[:-1]) != tuple(hv.shape[:-1]) or (b is not None and tuple(val(b).shape) != (vocab,)):
        raise Skip(f"{node.name}: batched weight or a bias not of shape ({vocab},)")
    tail = [node]
    if w_t and (root := _untranspose(w)) is not None:
        tail.append(w)
        w, w_t = root, False
    return Match(loss, x, node, h, w, w_t, b, target, ignore_index, reduction, float(smoothing),
                  *_scaling(chain[::-1], yv.dim(), vocab, loss), chain, tail)  # fmt: skip


def _scaling(ops: list[fx.Node], ndim: int, vocab: int, loss: fx.Node) -> tuple[float, float, list]:
    """(scale, softcap, slices) of the projection-to-loss chain in forward order: the logits are
    ``a * tanh(s * y)`` (softcap a, scale a * s) or ``s * y`` (softcap 0, scale s)."""
    pre, post, tanh, reshaped, slices = 1.0, 1.0, False, False, []
    for op in ops:
        if val(op).shape[-1] != vocab or val(op).device != val(loss).device:
            raise Skip(f"{op.name}: changes the vocabulary dim or the device")
        if is_call(op, *_MUL) or is_call(op, *_DIV):
            c = _scalar(op)[1]
            post, pre = (post * c, pre) if tanh else (post, pre * c)
        elif is_call(op, *_TANH):
            if tanh:
                raise Skip(f"{op.name}: a second tanh")
            tanh = True
        elif is_call(op, {operator.getitem}):
            if reshaped or tanh or val(op).dim() != ndim or not _leading_slices(op.args[1], ndim):
                raise Skip(f"{op.name}: indexing other than slices of the leading dims")
            slices.append(op.args[1])
        elif is_call(op, _RESHAPE_FNS, _RESHAPE_METHODS):
            if val(op).dtype != val(op.args[0]).dtype:
                raise Skip(f"{op.name}: a view as another dtype")
            reshaped = True
        elif not val(op).dtype.is_floating_point:
            raise Skip(f"{op.name}: cast to {val(op).dtype}")
    if tanh and post <= 0:
        raise Skip(f"{loss.name}: softcap multiplier {post} <= 0")
    return (pre * post, post, slices) if tanh else (pre, 0.0, slices)
