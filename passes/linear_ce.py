"""Rewrite: output projection + cross-entropy -> one fused op that never materialises the logits.

Runs on Dynamo's FX graph (torch-level ops), before AOTAutograd: there the pattern sits in one
place (afterwards log_softmax and nll_loss are split into many aten ops across forward and
backward) and the fused op brings its own backward, so the joint graph needs no surgery. Matches
linear / matmul / mm / addmm (weight any 2-D tensor, optional bias), then casts, scalar scaling,
a tanh softcap, reshapes that keep the vocabulary last, slices of leading dims, then
``cross_entropy`` (label smoothing included) or ``log_softmax`` + ``nll_loss``; no class weights.
The target side (transformers' pad + slice label shift) is left as it is. Logits with other users
(a model that returns them) are handed to the fused op, which reads them instead of rebuilding
them. The fused op forms the gradients in the forward, so it is fused whenever the logits exceed
one cache-resident chunk (:func:`choose`); anything else leaves the graph alone.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections import Counter

import sympy
import torch
import torch.fx as fx

from ..codegen.kernels import linear_ce_grad
from ..codegen.kernels.linear_ce import linear_cross_entropy
from ..costmodel import HardwareProfile, load_profile
from ._graph import NodeBuilder, size_hint
from ._linear_ce_match import LOSSES, Match, Skip, is_call, match, val

log = logging.getLogger(__name__)

__all__ = ["run", "choose", "Choice", "unfused_extra_bytes", "MIN_FUSE_BYTES"]

MIN_FUSE_BYTES = 1 << 20  # recompute path: saved logits at least this large: always fuse
MIN_VOCAB_RATIO = 8  # recompute path, binding budget: fuse only logits this many times wider than h
COMPRESSED = 8  # a binding budget stores the unfused loss's tensors ~4-bit: 8x fewer bytes than fp32


@dataclasses.dataclass(frozen=True)
class Choice:
    fuse: bool
    saved_bytes: int  # logit-sized bytes the unfused loss saves for its backward
    extra_s: float  # estimated seconds of the extra logits matmul(s)
    reason: str


def choose(
    tokens: int,
    vocab: int,
    hidden: int,
    itemsize: int,
    profile: HardwareProfile,
    *,
    dtype: str = "float32",
    budget_binding: bool = False,
    logits_kept: bool = False,
    compressing: bool = True,
    recompute: bool = False,
    cache_bytes: int | None = None,
) -> Choice:
    """Whether to fuse. The unfused loss saves ``tokens x vocab x itemsize`` bytes (its logits or
    log-probabilities) plus its input h; the fused op forms the gradients in the forward and saves
    dh and dw instead, with the same three GEMMs and fewer passes over the logits, so it is no
    slower: fuse whenever the logits (fp32) exceed ``cache_bytes``, one cache-resident chunk
    (:func:`~fxlowbit.codegen.kernels.linear_ce_grad.cache_bytes` of the profile's device). Under a
    binding budget smaller heads are fused too when dh + dw take fewer bytes than the unfused loss's
    tensors stored compressed (``compressing``: ~4 bits).

    ``recompute``: ``reduction="none"`` with a weight gradient, where the op rebuilds the logits in
    the backward, one extra ``2 tokens vocab hidden``-FLOP matmul (two when the logits are kept for
    other users). Fused then under a binding budget for LM heads (vocab >= ``MIN_VOCAB_RATIO`` x
    hidden when compressing), when the logits reach ``MIN_FUSE_BYTES``, or when the matmul costs no
    more than writing and reading them back.

        >>> choose(4096, 50257, 768, 4, load_profile("cpu")).fuse
        True
    """
    saved = tokens * vocab * itemsize
    if recompute:
        return _choose_recompute(tokens, vocab, hidden, saved, profile, dtype, budget_binding, logits_kept,
                                 compressing)  # fmt: skip
    cache = cache_bytes if cache_bytes is not None else linear_ce_grad.cache_bytes(profile.kind)
    if tokens * vocab * 4 > cache:
        return Choice(True, saved, 0.0, f"logits ({tokens} x {vocab}) exceed one cache-resident chunk")
    fused = (tokens + vocab) * hidden * itemsize  # dh, dw
    unfused = (saved + tokens * hidden * itemsize) // (COMPRESSED if compressing else 1)
    if budget_binding and fused < unfused:
        return Choice(True, saved, 0.0, f"memory budget binds: dh + dw {fused} B < {unfused} B")
    return Choice(False, saved, 0.0, f"logits ({tokens} x {vocab}) fit one cache-resident chunk")


def _choose_recompute(tokens, vocab, hidden, saved, profile, dtype, budget_binding, logits_kept, compressing):
    extra = profile.matmul_time(2.0 * tokens * vocab * hidden, dtype) * (2 if logits_kept else 1)
    traffic = 2 * saved / (profile.copy_gbps * 1e9)
    if budget_binding and (not compressing or vocab >= MIN_VOCAB_RATIO * hidden):
        why = f" and vocab >= {MIN_VOCAB_RATIO} x hidden" if compressing else ""
        return Choice(True, saved, extra, "recompute: memory budget binds" + why)
    if saved >= MIN_FUSE_BYTES:
        return Choice(True, saved, extra, f"recompute: saved logits {saved} B >= {MIN_FUSE_BYTES} B")
    if extra <= traffic:
        return Choice(True, saved, extra, f"recompute {extra:.3g} s <= saved-bytes traffic {traffic:.3g} s")
    return Choice(False, saved, extra, f"small ({saved} B) and recompute {extra:.3g} s > {traffic:.3g} s")


def run(
    gm: fx.GraphModule,
    *,
    budget_binding: bool = False,
    compressing: bool = True,
    profile: HardwareProfile | str | None = None,
    counters: Counter | None = None,
) -> int:
    """Fuse every matching projection + cross-entropy in ``gm``; returns how many were fused.
    ``compressing``: the planner will compress saved tensors (see :func:`choose`)."""
    counters = counters if counters is not None else Counter()
    prof = load_profile(profile)
    fused = 0
    for loss in list(gm.graph.nodes):
        if not is_call(loss, set(LOSSES)):
            continue
        try:
            m = match(loss)
            recompute = m.reduction == "none" and any(
                x is not None and val(x).requires_grad for x in (m.w, m.b)
            )  # per-token output gradients: dw cannot be formed in the forward
            if recompute and m.label_smoothing:
                raise Skip(f"{loss.name}: reduction 'none' with label smoothing and a weight gradient")
        except Exception as why:  # Skip, or a construct the matcher did not foresee
            log.debug("linear_ce: %s left as is: %s", loss.name, why)
            continue
        xv, hv, yv = val(m.logits), val(m.h), val(m.proj)
        tokens = size_hint(xv.shape[0])
        inside = {*m.chain, m.loss}
        kept = any(u not in inside for n in (m.proj, *m.chain) for u in n.users)  # logits used elsewhere
        choice = choose(tokens if tokens is not None else 1 << 30, xv.shape[1], hv.shape[-1],
                        xv.dtype.itemsize, prof, dtype=str(yv.dtype)[6:], budget_binding=budget_binding,
                        logits_kept=kept, compressing=compressing, recompute=recompute,
                        cache_bytes=linear_ce_grad.cache_bytes(xv.device.type))  # fmt: skip
        if not choice.fuse:
            counters["linear_ce_declined"] += 1
            log.debug("linear_ce: %s not fused: %s", loss.name, choice.reason)
            continue
        _rewrite(gm.graph, m, yv.dtype, val(loss).dtype, pass_logits=kept and not recompute)
        fused += 1
        counters["linear_ce"] += 1
        log.debug("linear_ce: fused %s (%s x %s, hidden %s; %s): saved logits %d -> 0 bytes, +%.3g ms",
                  loss.name, tokens, xv.shape[1], hv.shape[-1], choice.reason, choice.saved_bytes,
                  choice.extra_s * 1e3)  # fmt: skip
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def unfused_extra_bytes(gm: fx.GraphModule) -> sympy.Expr:
    """Bytes the unfused losses of ``gm`` (an AOTAutograd forward graph) would save beyond what
    their fused ops save instead, as a sympy expression of the symbolic sizes: per forward-gradient
    op its logits (tokens x vocab, in the projection's dtype) and its input h (kept for the weight
    gradient) less the dh / dw / db it stores; per recompute op its logits less its log-sum-exps.
    The planner adds them to the graph's uncompressed bytes, so a fractional budget is a fraction
    of what the model saves without fxlowbit, logits included."""
    ops = torch.ops.fxlowbit
    total = sympy.Integer(0)
    for node in gm.graph.nodes:
        grad_op = node.target is ops.linear_ce_fwd_grad.default
        if node.op != "call_function" or not (grad_op or node.target is ops.linear_ce_fwd.default):
            continue
        h, w, b = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:3])
        if not isinstance(h, torch.Tensor) or not isinstance(w, torch.Tensor):
            continue
        (n, hid), v = (_expr(d) for d in h.shape), _expr(w.shape[0])
        logits = n * v * torch.promote_types(h.dtype, w.dtype).itemsize
        if not grad_op:
            total += logits - n * 4  # both keep h and w; the fused op keeps the fp32 log-sum-exps
            continue
        grad_h, grad_w, grad_b = node.args[10:13]
        total += logits + (n * hid * h.dtype.itemsize if grad_w else 0)
        total -= (n * hid * h.dtype.itemsize if grad_h else 0) + (v * hid * w.dtype.itemsize if grad_w else 0)
        total -= v * b.dtype.itemsize if grad_b and isinstance(b, torch.Tensor) else 0
    return total


def _expr(d) -> sympy.Expr:
    return d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d))


def _rewrite(
    graph: fx.Graph, m: Match, compute_dtype: torch.dtype, out_dtype: torch.dtype, pass_logits: bool
) -> None:
    add = NodeBuilder(graph, getattr(val(m.h), "fake_mode", None),
                      {"stack_trace": m.loss.meta.get("stack_trace")})  # fmt: skip
    with add.transaction():
        y = None
        if pass_logits:  # the projection its other users read, its zero gradient skipped
            with graph.inserting_before(m.proj.next):
                hk: fx.Node | None
                wk: fx.Node | None
                hk, wk, bk = m.h, m.w, m.b
                if m.w_transposed:
                    wk = add(torch.t, wk)
                hk, wk, bk = (_cast(add, x, compute_dtype) for x in (hk, wk, bk))
                y = add(torch.ops.fxlowbit.linear_logits.default, hk, wk, bk)
        with graph.inserting_before(m.loss):
            h: fx.Node | None
            w: fx.Node | None
            h, w, b, full = m.h, m.w, m.b, y
            for index in m.slices:  # logits[..., :-1, :] is linear(h[..., :-1, :])
                h = add(operator.getitem, h, index)
                y = add(operator.getitem, y, index) if y is not None else None
            if m.w_transposed:
                w = add(torch.t, w)
            h, w, b = (_cast(add, x, compute_dtype) for x in (h, w, b))  # autocast: the projection's dtype
            kw = dict(reduction=m.reduction, scale=m.scale, softcap=m.softcap, out_dtype=out_dtype,
                      label_smoothing=m.label_smoothing, logits=y)  # fmt: skip
            fused = add(linear_cross_entropy, h, w, b, m.target, ignore_index=m.ignore_index, **kw)
    m.loss.replace_all_uses_with(fused)
    graph.erase_node(m.loss)
    if full is not None:
        m.proj.replace_all_uses_with(full)
    for node in [*m.chain, *m.tail]:  # loss side first: each becomes dead once its user is gone
        if not node.users:
            graph.erase_node(node)


def _cast(add, x: fx.Node | None, dtype: torch.dtype) -> fx.Node | None:
    if x is None or val(x).dtype == dtype:
        return x
    return add(torch.Tensor.to, x, dtype)
