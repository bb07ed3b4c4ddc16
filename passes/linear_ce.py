"""Rewrite: output projection + cross-entropy -> one fused op that never materialises the logits.

Runs on Dynamo's FX graph (torch-level ops), before AOTAutograd: there the pattern sits in one
place (afterwards log_softmax and nll_loss are split into many aten ops across forward and
backward) and the fused op brings its own backward, so the joint graph needs no surgery. Matches
linear / matmul / mm / addmm (weight any 2-D tensor, optional bias), then casts, scalar scaling,
a tanh softcap, reshapes that keep the vocabulary last, slices of leading dims, then
``cross_entropy`` or ``log_softmax`` + ``nll_loss`` (no class weights, no label smoothing). The
target side (transformers' pad + slice label shift) is left as it is. A projection with other
users stays for them. Anything else, or a fusion :func:`choose` rejects, leaves the graph alone.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections import Counter

import torch
import torch.fx as fx

from ..codegen.kernels.linear_ce import linear_cross_entropy
from ..costmodel import HardwareProfile, load_profile
from ._linear_ce_match import _LOSSES, _hint, _is, _Match, _match, _val

log = logging.getLogger(__name__)

__all__ = ["run", "choose", "Choice", "MIN_FUSE_BYTES"]

MIN_FUSE_BYTES = 1 << 20  # saved logits at least this large: always fuse
MIN_VOCAB_RATIO = 8  # under a binding budget fuse only logits this many times wider than the input


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
) -> Choice:
    """Whether fusing pays. The unfused loss saves ``tokens x vocab x itemsize`` bytes (its
    log-probabilities); the fused one saves none but recomputes the logits in the backward, one
    extra ``2 tokens vocab hidden``-FLOP matmul (two when the logits are kept for other users).
    Fuse when a memory budget binds and the logits are at least ``MIN_VOCAB_RATIO`` times wider
    than the input, when the saved bytes reach ``MIN_FUSE_BYTES`` (they are then usually the step's
    largest saved tensor), or when the matmul costs no more than writing and reading those bytes
    back (``2 bytes / copy bandwidth``). The fused backward reads its input exact: when saved
    tensors are being compressed (``compressing``, the planner on), the unfused loss stores input
    and log-probabilities compressed instead, (H + V) elements at about 4 bits a token against H at
    32, so under a binding budget fusing only pays from V >= 7 H (an LM head, not a 10-class
    classifier on 512 features).

        >>> choose(4096, 50257, 768, 4, load_profile("cpu")).fuse
        True
    """
    saved = tokens * vocab * itemsize
    extra = profile.matmul_time(2.0 * tokens * vocab * hidden, dtype) * (2 if logits_kept else 1)
    traffic = 2 * saved / (profile.copy_gbps * 1e9)
    if budget_binding and (not compressing or vocab >= MIN_VOCAB_RATIO * hidden):
        why = f" and vocab >= {MIN_VOCAB_RATIO} x hidden" if compressing else ""
        return Choice(True, saved, extra, "memory budget binds" + why)
    if saved >= MIN_FUSE_BYTES:
        return Choice(True, saved, extra, f"saved logits {saved} B >= {MIN_FUSE_BYTES} B")
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
        if not _is(loss, set(_LOSSES)):
            continue
        try:
            m = _match(loss)
        except Exception as why:  # _Skip, or a construct the matcher did not foresee
            log.debug("linear_ce: %s left as is: %s", loss.name, why)
            continue
        xv, hv, yv = _val(m.logits), _val(m.h), _val(m.proj)
        tokens = _hint(xv.shape[0])
        inside = {*m.chain, m.loss}
        kept = any(u not in inside for n in (m.proj, *m.chain) for u in n.users)  # logits used elsewhere
        choice = choose(tokens if tokens is not None else 1 << 30, xv.shape[1], hv.shape[-1],
                        xv.dtype.itemsize, prof, dtype=str(yv.dtype)[6:], budget_binding=budget_binding,
                        logits_kept=kept, compressing=compressing)  # fmt: skip
        if not choice.fuse:
            counters["linear_ce_declined"] += 1
            log.debug("linear_ce: %s not fused: %s", loss.name, choice.reason)
            continue
        _rewrite(gm.graph, m, yv.dtype, _val(loss).dtype)
        fused += 1
        counters["linear_ce"] += 1
        log.debug("linear_ce: fused %s (%s x %s, hidden %s; %s): saved logits %d -> 0 bytes, +%.3g ms",
                  loss.name, tokens, xv.shape[1], hv.shape[-1], choice.reason, choice.saved_bytes,
                  choice.extra_s * 1e3)  # fmt: skip
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _rewrite(graph: fx.Graph, m: _Match, compute_dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    new: list[fx.Node] = []

    def add(target, *args, **kwargs) -> fx.Node:
        node = graph.call_function(target, args, kwargs)
        new.append(node)
        vals = fx.node.map_arg((args, kwargs), lambda a: _val(a))
        mode = _val(m.h).fake_mode if hasattr(_val(m.h), "fake_mode") else None
        if mode is not None:
            with mode:
                node.meta["example_value"] = target(*vals[0], **vals[1])
        node.meta["stack_trace"] = m.loss.meta.get("stack_trace")
        return node

    try:
        with graph.inserting_before(m.loss):
            h, w, b = m.h, m.w, m.b
            for index in m.slices:  # logits[..., :-1, :] is linear(h[..., :-1, :])
                h = add(operator.getitem, h, index)
            if m.w_transposed:
                w = add(torch.t, w)
            h, w, b = (_cast(add, x, compute_dtype) for x in (h, w, b))  # autocast: the projection's dtype
            kw = dict(reduction=m.reduction, scale=m.scale, softcap=m.softcap, out_dtype=out_dtype)
            fused = add(linear_cross_entropy, h, w, b, m.target, ignore_index=m.ignore_index, **kw)
    except Exception:
        for node in reversed(new):
            graph.erase_node(node)
        raise
    m.loss.replace_all_uses_with(fused)
    graph.erase_node(m.loss)
    for node in [*m.chain, *m.tail]:  # loss side first: each becomes dead once its user is gone
        if not node.users:
            graph.erase_node(node)


def _cast(add, x: fx.Node | None, dtype: torch.dtype) -> fx.Node | None:
    if x is None or _val(x).dtype == dtype:
        return x
    return add(torch.Tensor.to, x, dtype)
