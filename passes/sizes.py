"""Symbolic sizes of graph values: a tensor's element count as a sympy expression of the shape
symbols, the symbols' values at the example sizes (read without adding guards), and expressions or
values evaluated there. Shared by the passes that count saved bytes (analyze, saved_views).
"""

from __future__ import annotations

import sympy
import torch
import torch.fx as fx

__all__ = ["expr", "numel", "at", "concrete", "symbol_hint", "all_hints"]


def expr(d) -> sympy.Expr:
    """A dimension (an int or a SymInt) as a sympy expression."""
    return sympy.Integer(d) if isinstance(d, int) else d.node.expr


def symbol_hint(shape_env, sym) -> int:
    """Value of a shape symbol at the example sizes, without adding guards."""
    values = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val
    return int(values[sym]) if sym in values else int(shape_env.size_hint(sym))


def numel(val: torch.Tensor) -> sympy.Expr:
    """``val``'s element count, a sympy expression of the shape symbols."""
    out = sympy.Integer(1)
    for d in val.shape:
        out = out * expr(d)
    return out


def at(expr, hints: dict) -> int:
    """``expr`` (a sympy size) at the example sizes ``hints``."""
    return int(sympy.sympify(expr).subs(hints))


def concrete(v, hints: dict):
    """Meta tensors / ints at the example sizes, for torch's FLOP formulas."""
    if isinstance(v, torch.Tensor):
        return torch.empty([at(expr(d), hints) for d in v.shape], dtype=v.dtype, device="meta")
    if isinstance(v, torch.SymInt):
        return at(v.node.expr, hints)
    return v


def all_hints(*gms: fx.GraphModule) -> dict:
    """Example-size values of every shape symbol the graphs' values mention."""
    hints: dict = {}
    for gm in gms:
        for n in gm.graph.nodes:
            for v in torch.utils._pytree.tree_leaves(n.meta.get("val")):
                dims = (
                    list(v.shape)
                    if isinstance(v, torch.Tensor)
                    else [v]
                    if isinstance(v, torch.SymInt)
                    else []
                )
                for d in dims:
                    if isinstance(d, torch.SymInt):
                        for sym in d.node.expr.free_symbols:
                            if sym not in hints:
                                hints[sym] = symbol_hint(d.node.shape_env, sym)
    return hints
