"""Rewrite: linear layers -> ``fxlowbit::lowbit_linear``, each GEMM in the format chosen for it.

Runs on Dynamo's FX graph (torch-level ops) before AOTAutograd, like :mod:`.linear_ce`: there a
linear is one ``torch._C._nn.linear`` node (``nn.Linear`` and ``F.linear`` alike) carrying its
module path, and the replacement op brings its own backward, so the joint graph needs no surgery
and the low-bit copy of x it saves is what the partition saves. Per linear, the forward,
grad-input and grad-weight GEMMs get a format from the config (``gemm``, ``gemm_filter`` by module
name) or, for "auto", from :func:`fxlowbit.costmodel.gemm_choice` at the example sizes. Left as
they are: inputs of fewer than 2 dims, dtypes other than fp32/bf16/fp16, weights not 2-D, tensors
on different devices, and linears whose three GEMMs all stay plain.

2:4 sparsity (``sparsity="2:4"``, opt-in) takes precedence over the formats: a linear its module
matches in ``sparsity_filter`` (default: every one) whose weight sizes are both multiples of 4
becomes ``fxlowbit::sparse24_linear(x, w, b, mask, seed, mvue=True, masked_grad=True)`` with
``mask = fxlowbit::sparse24_mask(w, key, sparsity_refresh, sparsity_dense_after)``: a stateful op
keeping the linear's transposable mask across steps under a ``key`` this pass assigns
(codegen/kernels/sparse24_mask.py; key -> module path in its ``MODULES``), and ``seed`` a draw of
``stream`` for the MVUE grad-weight GEMM. Its GEMMs stay in the linear's dtype. Counters:
``sparse24`` per sparse linear, ``sparsity_declined`` per matching linear whose sizes are not
multiples of 4 (it then gets the formats as usual).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from collections import Counter

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..codegen import rng
from ..codegen.kernels import sparse24_mask as _masks
from ..codegen.kernels.lowbit_linear import LOWBIT, PLAIN, lowbit_linear, plain_format
from ..codegen.kernels.sparse24_linear import sparse24_linear
from ..codegen.ops import draw_seed  # noqa: F401  (registers fxlowbit::draw_seed)
from ..config import GEMM_ROLES, LowbitConfig
from ..costmodel import HardwareProfile, gemm_choice, load_profile
from ._graph import size_hint, value

log = logging.getLogger(__name__)

__all__ = ["run", "Decision", "module_name", "formats_for"]

_LINEAR = {F.linear, torch._C._nn.linear}
_SIGNATURE = inspect.signature(lambda input, weight, bias=None: None)
# the frame's root: L['self'], L__self__, or L['args'][0] when the module is the first positional
# argument of a decorated forward (transformers' models)
_ROOT = re.compile(r"^L\['args'\]\[0\]\.?|^L\['[^']*'\]\.?|^L__self__\.?")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the pass did with one linear."""

    node: str  # the linear's node name in the Dynamo graph
    module: str  # dotted module path ("" at the top level or unknown)
    mnk: tuple[int, int, int]  # tokens, out features, in features (at the example sizes)
    formats: tuple[str, str, str]  # forward, grad-input, grad-weight
    reasons: tuple[str, str, str]
    hadamard: int
    sparse24_key: int | None = None  # the sparse24_mask registry key of a 2:4 sparse linear


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


def _size(d) -> int:
    """A size at the example sizes; a symbolic one without an example: assume large."""
    return size_hint(d, 1 << 16)  # type: ignore[return-value]


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def formats_for(
    requested: tuple[str, str, str],
    mnk: tuple[int, int, int],
    dtype: torch.dtype,
    profile: HardwareProfile,
    capability: tuple[int, int] | None,
) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """(formats, reasons) of a linear's (forward, grad-input, grad-weight) GEMMs from the requested
    config values ("auto" asks the cost model; "off" is the plain dtype's name)."""
    m, n, k = mnk
    plain, dname = plain_format(dtype), str(dtype).removeprefix("torch.")
    # (rows, cols, reduction, first operand a gradient) of y = x w^T, dx = dy w, dw = dy^T x
    shapes = ((m, n, k, False), (m, k, n, True), (n, k, m, True))
    formats, reasons = [], []
    for want, (rows, cols, red, grad) in zip(requested, shapes, strict=True):
        if want == "auto":
            c = gemm_choice(rows, cols, red, dname, profile, capability, gradient=grad)
            formats.append(c.fmt)
            reasons.append(f"auto: {c.reason}")
        else:
            formats.append(plain if want == "off" else want)
            reasons.append("gemm_filter / gemm option" if want != "off" else "off by option")
    return tuple(formats), tuple(reasons)  # type: ignore[return-value]


def run(
    gm: fx.GraphModule,
    cfg: LowbitConfig,
    *,
    stream: int = -1,
    profile: HardwareProfile | str | None = None,
    counters: Counter | None = None,
) -> list[Decision]:
    """Rewrite every supported linear of ``gm`` whose formats are not all plain; returns a
    :class:`Decision` per linear considered. ``stream``: the random stream of the gradients'
    stochastic rounding (:mod:`fxlowbit.codegen.rng`; negative: round to nearest)."""
    counters = counters if counters is not None else Counter()
    prof = load_profile(profile if profile is not None else cfg.profile)
    decisions: list[Decision] = []
    rewritten = 0
    try:
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _LINEAR:
                d = _consider(gm.graph, node, cfg, prof, stream, counters)
                decisions += [d] if d is not None else []
                rewritten += d is not None and (
                    d.sparse24_key is not None or any(f in LOWBIT for f in d.formats)
                )
    finally:  # a failure leaves the linears rewritten so far rewritten, and the graph compiled
        if rewritten:
            gm.graph.lint()
            gm.recompile()
    return decisions


def linear_args(node: fx.Node):
    """(x, w, b) nodes of a linear call and their values (x, w, b, y), or None if it does not bind."""
    try:
        bound = _SIGNATURE.bind(*node.args, **node.kwargs).arguments
    except TypeError:
        return None
    x, w, b = bound["input"], bound["weight"], bound.get("bias")
    return (x, w, b), (value(x), value(w), value(b), value(node))


def _consider(graph, node, cfg: LowbitConfig, prof, stream: int, counters: Counter) -> Decision | None:
    """Choose the formats of one linear node and rewrite it when any is low-bit."""
    found = linear_args(node)
    if found is None:
        return None
    (x, w, b), (xv, wv, bv, yv) = found
    why = _unsupported(xv, wv, b, bv, yv)
    if why:
        counters["lowbit_gemm_skipped"] += 1
        log.debug("lowbit_gemm: %s left as is: %s", node.name, why)
        return None
    assert xv is not None and wv is not None and yv is not None  # _unsupported checked them
    name = module_name(node)
    tokens = _size(xv.numel() // xv.shape[-1]) if xv.shape[-1] else 0
    mnk = (tokens, _size(wv.shape[0]), _size(wv.shape[1]))
    if cfg.sparse(name):
        if mnk[1] % 4 == 0 and mnk[2] % 4 == 0 and not _symbolic(wv):
            return _sparsify(graph, node, x, w, b, yv.dtype, cfg, name, mnk, stream, counters)
        counters["sparsity_declined"] += 1
        log.debug("lowbit_gemm: %s (%s) not 2:4: weight %s", node.name, name, tuple(wv.shape))
    formats, reasons = formats_for(cfg.gemm_formats(name), mnk, yv.dtype, prof, _capability(yv.device))
    low = formats[0] in LOWBIT
    hadamard = cfg.gemm_hadamard if low and mnk[2] % max(cfg.gemm_hadamard, 1) == 0 else 0
    decision = Decision(node.name, name, mnk, formats, reasons, hadamard)
    if not any(f in LOWBIT for f in formats):
        counters["lowbit_gemm_declined"] += 1
        log.debug("lowbit_gemm: %s (%s) stays plain: %s", node.name, name, "; ".join(reasons))
        return decision
    _rewrite(graph, node, x, w, b, yv.dtype, (*formats, hadamard, stream))
    counters["lowbit_gemm"] += 1
    for role, fmt in zip(GEMM_ROLES, formats, strict=True):
        counters[f"lowbit_gemm_{role}_{fmt}"] += 1
    x_bytes = mnk[0] * mnk[2] * yv.dtype.itemsize
    saved = mnk[0] * (mnk[2] + 4) if low else x_bytes
    log.debug("lowbit_gemm: %s (%s, M N K %s) -> %s; saved x %d -> %d bytes; %s", node.name, name, mnk,
              "/".join(formats), x_bytes, saved, "; ".join(reasons))  # fmt: skip
    return decision


def _symbolic(t: torch.Tensor) -> bool:
    return any(isinstance(d, torch.SymInt) for d in t.shape)


def _sparsify(
    graph, node, x, w, b, dtype, cfg: LowbitConfig, name: str, mnk, stream: int, counters
) -> Decision:
    """Rewrite one linear to a 2:4 sparse one (see the module docstring)."""
    key = _masks.new_key(name)
    stream = stream if stream >= 0 else rng.new_stream(key)
    dense_after = -1 if cfg.sparsity_dense_after is None else cfg.sparsity_dense_after

    def build(add, x, w, b):
        mask = add(torch.ops.fxlowbit.sparse24_mask.default, w, key, cfg.sparsity_refresh, dense_after)
        seed = add(torch.ops.fxlowbit.draw_seed.default, x, stream)
        return add(sparse24_linear, x, w, b, mask, seed, True, True)

    _rewrite(graph, node, x, w, b, dtype, build)
    counters["sparse24"] += 1
    log.debug("lowbit_gemm: %s (%s, M N K %s) -> 2:4 sparse, mask key %d", node.name, name, mnk, key)
    plain = plain_format(dtype)
    return Decision(node.name, name, mnk, (plain,) * 3, ("2:4 sparsity",) * 3, 0, key)


def _unsupported(xv, wv, b, bv, yv) -> str:
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


def _rewrite(graph: fx.Graph, node: fx.Node, x, w, b, dtype: torch.dtype, args) -> None:
    """Replace ``node`` by ``lowbit_linear(x, w, b, *args)``, or by what ``args(add, x, w, b)``
    builds when ``args`` is callable; inputs are cast to ``dtype`` first."""
    new: list[fx.Node] = []

    def add(target, *a) -> fx.Node:
        n = graph.call_function(target, a)
        new.append(n)
        vals = fx.node.map_arg(a, value)
        mode = getattr(value(x), "fake_mode", None)
        if mode is not None:
            with mode:
                n.meta["example_value"] = target(*vals)
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in node.meta:
                n.meta[key] = node.meta[key]
        return n

    try:
        with graph.inserting_before(node):
            # autocast made the linear's output dtype: cast its inputs so the op runs in it too
            # (_unsupported checked that each input given has a value)
            x, w, b = (v if v is None or value(v).dtype == dtype else add(torch.Tensor.to, v, dtype)  # type: ignore[union-attr]
                       for v in (x, w, b))  # fmt: skip
            out = args(add, x, w, b) if callable(args) else add(lowbit_linear, x, w, b, *args)
    except Exception:
        for n in reversed(new):
            graph.erase_node(n)
        raise
    node.replace_all_uses_with(out)
    graph.erase_node(node)
