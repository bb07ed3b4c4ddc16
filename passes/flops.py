"""Matmul FLOPs of FX graph nodes: the one count the planner's step estimate and the benchmarks share.

``torch.utils.flop_counter``'s formulas (mm/addmm/bmm/baddbmm, convolutions and their backward, SDPA
and its backward), keyed by OpOverloadPacket. The CPU flash-attention ops that SDPA lowers to on
CPU take the same leading (query, key, value) / (grad_out, query, key, value) arguments as the CUDA
flash ops, so they borrow those formulas (``flop_counter`` has none of its own for them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch.utils import flop_counter

__all__ = ["FORMULAS", "node_flops", "matmul_flops"]

aten = torch.ops.aten

FORMULAS: dict[Any, Callable[..., int]] = dict(flop_counter.flop_registry)
FORMULAS.setdefault(
    aten._scaled_dot_product_flash_attention_for_cpu,
    flop_counter.flop_registry[aten._scaled_dot_product_flash_attention],
)
FORMULAS.setdefault(
    aten._scaled_dot_product_flash_attention_for_cpu_backward,
    flop_counter.flop_registry[aten._scaled_dot_product_flash_attention_backward],
)


def _recorded(v: Any) -> Any:
    return v.meta.get("val") if isinstance(v, fx.Node) else v


def node_flops(node: fx.Node, value: Callable[[Any], Any] | None = None) -> int | None:
    """Matmul FLOPs of one call from the shapes in ``meta["val"]``; None for a node that is no
    matmul, convolution or attention call. ``value`` maps each recorded value (tensor, SymInt,
    constant) before the formula sees it, e.g. to concrete example sizes."""
    packet = getattr(node.target, "overloadpacket", None)
    formula = FORMULAS.get(packet) if node.op == "call_function" else None
    if formula is None:
        return None
    conv = value or (lambda v: v)
    args, kwargs, out = torch.utils._pytree.tree_map(
        lambda v: conv(_recorded(v)), (node.args, node.kwargs, node)
    )
    return int(formula(*args, out_val=out, **kwargs))


def matmul_flops(graphs: Iterable[fx.GraphModule]) -> int:
    """Sum of :func:`node_flops` over every node of ``graphs``."""
    return sum(node_flops(n) or 0 for gm in graphs for n in gm.graph.nodes)
