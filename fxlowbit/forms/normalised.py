"""Normalised and standardised values: what the quant form stores in a saved tensor's place.

Normalised: when the backward only uses a quantized tensor ``x`` to recompute a value the forward
also computed from saved tensors (LayerNorm's ``(x - mean) * rstd``), that value is quantized in
``x``'s place and the backward's recomputation is dropped (:func:`normalised`). Rounding errors
then stay the size of the normalised values: rounding ``x`` itself would be multiplied by
``rstd``, which is 1e6 on a constant row (a zero-initialised token) with eps=1e-12.
Standardised (BatchNorm in training, :func:`standardised`): the forward's ``(x - mean) * rstd`` is
stored and ``x`` rebuilt from it in the backward. Not forms of their own (a plan says ``quant``):
the quant rewrite (:mod:`.quant`) and the probes (:mod:`fxlowbit.calibrate`) both use these
matchers, so a probe measures the value the rewrite stores. Graph matching only: torch.fx here.
"""

from __future__ import annotations

from collections.abc import Container

import torch
import torch.fx as fx

__all__ = ["normalised", "standardised", "mirror"]


def standardised(node: fx.Node, saved: Container[str]) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(y, mean, rstd)`` when the forward computes ``y = (node - mean) * rstd`` with ``mean`` and
    ``rstd`` saved as they are (their names in ``saved``) and ``y`` of ``node``'s shape and dtype: BatchNorm's
    decomposition in training, whose backward reads ``node - mean`` and never ``y``. Storing ``y``
    and rebuilding ``node = y / rstd + mean`` in the backward keeps the rounding error the size of
    the standardised values (``rstd`` cancels it where the backward scales ``node - mean`` by it);
    rounding ``node`` itself spans the channels' different means and scales in one group."""
    ref = node.meta.get("val")
    if not isinstance(ref, torch.Tensor):
        return None
    aten = torch.ops.aten
    for sub in node.users:
        if sub.target != aten.sub.Tensor or sub.args[0] is not node or sub.kwargs:
            continue
        mean = sub.args[1]
        for mul in sub.users:
            if mul.target != aten.mul.Tensor or mul.kwargs or sub not in mul.args:
                continue
            rstd = mul.args[1] if mul.args[0] is sub else mul.args[0]
            val = mul.meta.get("val")
            if (
                isinstance(mean, fx.Node)
                and isinstance(rstd, fx.Node)
                and mean.name in saved
                and rstd.name in saved
                and isinstance(val, torch.Tensor)
                and val.dtype == ref.dtype
                and list(val.shape) == list(ref.shape)
                and val.is_contiguous()
            ):
                return mul, mean, rstd
    return None


def mirror(n: fx.Node, fw_nodes: dict[str, fx.Node], memo: dict) -> fx.Node | None:
    """The forward node computing what backward node ``n`` computes: saved placeholders map to
    their forward node by name, ops to a forward op with the same target on mirrored arguments."""
    if n in memo:
        return memo[n]
    memo[n] = None
    if n.op == "placeholder":
        memo[n] = fw_nodes.get(n.name)
    elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and not n.kwargs:
        args = [mirror(a, fw_nodes, memo) if isinstance(a, fx.Node) else a for a in n.args]
        first = next((a for a in args if isinstance(a, fx.Node)), None)
        if first is not None and all(a is not None for a in args):
            memo[n] = next(
                (u for u in first.users if u.target == n.target and not u.kwargs and list(u.args) == args),
                None,
            )
    return memo[n]


def normalised(ph: fx.Node, fw_nodes: dict[str, fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """``(forward node, backward node)`` when every backward use of saved ``ph`` is a replay of
    forward ops ending in ONE node of ``ph``'s size and dtype (LayerNorm's ``(x - mean) * rstd``),
    else None. The backward node's value is what the backward really reads: storing it instead of
    ``ph`` puts the rounding error where the gradient formula sees it, not scaled by ``rstd``.
    ``fw_nodes``: the forward graph's nodes by name."""
    memo: dict = {}
    region, frontier, stack = set(), [], [ph]
    while stack:
        n = stack.pop()
        if n in region:
            continue
        region.add(n)
        users = list(n.users)
        if not users or len(region) > 8:
            return None
        mirrored = [u for u in users if mirror(u, fw_nodes, memo) is not None]
        if len(mirrored) == len(users):
            stack.extend(mirrored)
        elif mirrored or n is ph:
            return None  # read both raw and replayed, or not replayed at all
        else:
            frontier.append(n)
    if len(frontier) != 1:
        return None
    (out,) = frontier
    val, ref = out.meta.get("val"), ph.meta["val"]
    if (
        not isinstance(val, torch.Tensor)
        or val.dtype != ref.dtype
        or list(val.shape) != list(ref.shape)
        or not val.is_contiguous()
    ):
        return None
    fw_out = mirror(out, fw_nodes, memo)
    assert fw_out is not None  # out is on the frontier because it was mirrored (memo holds it)
    return fw_out, out
