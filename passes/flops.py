"""Matmul FLOPs of FX graph nodes: the one count the planner's step estimate and the benchmarks share.

``torch.utils.flop_counter``'s formulas (mm/addmm/bmm/baddbmm, convolutions and their backward, SDPA
and its backward, and those the project's ops register), keyed by OpOverloadPacket. The CPU flash-
attention ops that SDPA lowers to on CPU take the same leading (query, key, value) / (grad_out,
query, key, value) arguments as the CUDA flash ops, so they borrow those formulas (``flop_counter``
has none of its own for them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch.utils import flop_counter

__all__ = ["formula", "node_flops", "matmul_flops"]

aten = torch.ops.aten

# flop_counter has no formulas of its own for these; they take the CUDA flash ops' arguments
CPU_ALIASES: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.flop_registry[
        aten._scaled_dot_product_flash_attention
    ],
    aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.flop_registry[
        aten._scaled_dot_product_flash_attention_backward
    ],
}


def formula(packet) -> Callable[..., int] | None:
    """The FLOP formula of an op packet, looked up when asked: ``flop_counter``'s registry is read
    live, so the formulas the project's own ops register (``register_flop_formula`` in
    codegen/kernels: the low-bit, 2:4, sampled and fused-loss linears) count too."""
    return flop_counter.flop_registry.get(packet) or CPU_ALIASES.get(packet)


def _recorded(v: Any) -> Any:
    return v.meta.get("val") if isinstance(v, fx.Node) else v


def node_flops(node: fx.Node, value: Callable[[Any], Any] | None = None) -> int | None:
    """Matmul FLOPs of one call from the shapes in ``meta["val"]``; None for a node that is no
    matmul, convolution or attention call. ``value`` maps each recorded value (tensor, SymInt,
    constant) before the formula sees it, e.g. to concrete example sizes."""
    packet = getattr(node.target, "overloadpacket", None)
    fn = formula(packet) if node.op == "call_function" else None
    if fn is None:
        return None
    conv = value or (lambda v: v)
    args, kwargs, out = torch.utils._pytree.tree_map(
        lambda v: conv(_recorded(v)), (node.args, node.kwargs, node)
    )
    return int(fn(*args, out_val=out, **kwargs))


def matmul_flops(graphs: Iterable[fx.GraphModule]) -> int:
    """Sum of :func:`node_flops` over every node of ``graphs``."""
    return sum(node_flops(n) or 0 for gm in graphs for n in gm.graph.nodes)
