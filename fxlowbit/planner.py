"""Choose a stored form for every saved tensor.

This is the fixed-rule planner (the cost-model planner replaces ``decide`` later). It works on the
plain records of :mod:`fxlowbit.passes.analyze` and never touches torch.fx graphs. Rules, first
match wins:

1. aliases of graph inputs (parameters, buffers, user inputs) and of forward outputs: keep, they
   cost no extra memory;
2. smaller than ``min_bytes``: keep;
3. bool: 1-bit mask (exact);
4. other non-float (indices, RNG state): keep;
5. float used by the backward only in comparisons with scalars: 1-bit masks of those
   comparisons, computed in the forward (exact);
6. float whose backward uses all tolerate bounded noise: b-bit stochastic quantization;
7. anything else: keep, with one warning naming the op (strict mode raises).
A tensor read by several backward ops is stored once and decoded once for all of them.
"""

from __future__ import annotations

import logging
import warnings

import sympy

from .config import LowbitConfig
from .plan import Decision, Form, Plan

log = logging.getLogger(__name__)
_warned: set[str] = set()

__all__ = ["decide", "stored_bytes", "UnsupportedOpError"]

VALUE, COMPARE, EXACT = "value", "compare", "exact"  # mirrors fxlowbit.passes._ops roles (no torch.fx)


class UnsupportedOpError(NotImplementedError):
    """Raised in strict mode when a saved tensor meets an op the planner cannot reason about."""


def stored_bytes(form: str, numel, bits: int, group_size: int, itemsize: int, n_masks: int = 1):
    """Exact bytes of a stored form as a sympy expression of the symbolic sizes."""
    if form == Form.KEEP:
        return numel * itemsize
    if form in (Form.MASK, Form.CMP_MASK):
        return n_masks * sympy.ceiling(numel / 8)
    if form == Form.QUANT:
        groups = sympy.ceiling(numel / group_size)
        return groups * (group_size * bits // 8) + groups * 8  # codes + fp32 (lo, scale)
    raise ValueError(f"unknown form {form!r}")


def _warn_once(op: str, name: str, strict: bool) -> None:
    msg = (
        f"fxlowbit: saved tensor {name!r} stays in full precision: its backward use {op} "
        "is not known to tolerate a compressed value"
    )
    if strict:
        raise UnsupportedOpError(msg + " (strict mode)")
    if op not in _warned:
        _warned.add(op)
        warnings.warn(msg + " (warned once per op)", stacklevel=2)


def _form(s, cfg: LowbitConfig) -> tuple[str, str, int, int]:
    """(form, reason, bits per element of the main form, number of comparison masks)."""
    if s.input_alias:
        return Form.KEEP, "alias of a graph input: costs no memory", 0, 0
    if s.forward_output_alias:
        return Form.KEEP, "also returned by the forward: no memory to win", 0, 0
    if s.nbytes_hint < cfg.min_bytes:
        return Form.KEEP, f"below min_bytes={cfg.min_bytes}", 0, 0
    if str(s.dtype) == "torch.bool":
        return (Form.MASK, "bool mask: 1 bit, exact", 1, 0) if cfg.masks else (Form.KEEP, "masks off", 0, 0)
    if not s.is_float:
        return Form.KEEP, f"{str(s.dtype)[6:]} tensor: kept exact", 0, 0
    if not s.uses:
        return Form.KEEP, "no backward use found", 0, 0
    exact = [u.op for u in s.uses if u.role == EXACT]
    if exact:
        return Form.KEEP, f"backward use {exact[0]} needs it exact", 0, 0
    unknown = [u.op for u in s.uses if u.role is None]
    if unknown:
        _warn_once(unknown[0], s.name, cfg.strict)
        return Form.KEEP, f"backward use {unknown[0]} not known to tolerate compression", 0, 0
    compares = [u for u in s.uses if u.role == COMPARE]
    n = len({(u.op, u.scalar) for u in compares})  # one mask per distinct comparison
    if compares and not (cfg.masks and all(u.direct for u in compares)):
        # quantization could flip a comparison near its threshold: keep exact
        return Form.KEEP, "compared with a scalar (through a view): kept exact", 0, 0
    if compares and len(compares) == len(s.uses):
        if n < min(cfg.bits, s.itemsize * 8):
            return Form.CMP_MASK, f"backward only compares it with scalars: {n} exact 1-bit mask(s)", 0, n
        return Form.KEEP, f"{n} distinct comparisons: masks would not save memory", 0, 0
    why = f"{cfg.bits}-bit stochastic rounding, groups of {cfg.group_size}"
    if compares:
        why += f", plus {n} exact 1-bit comparison mask(s)"
    return Form.QUANT, why, cfg.bits, n


def decide(saved, cfg: LowbitConfig, subs: dict | None = None) -> Plan:
    """Fixed-rule plan for a tuple of :class:`~fxlowbit.passes.analyze.SavedTensor` records."""
    subs = subs or {}
    decisions: list[Decision] = []
    for s in saved:
        form, reason, nbits, masks = _form(s, cfg)
        mask_bytes = stored_bytes(Form.MASK, s.numel, 1, 1, 1, masks)
        if form == Form.CMP_MASK:
            after = mask_bytes
        else:
            after = stored_bytes(form, s.numel, nbits, cfg.group_size, s.itemsize) + mask_bytes
        decisions.append(
            Decision(
                name=s.name,
                producer=s.producer,
                shape=tuple(d if isinstance(d, int) else str(d) for d in s.shape),
                dtype=str(s.dtype).replace("torch.", ""),
                form=form,
                bits=(nbits + masks) if form != Form.KEEP else s.itemsize * 8,
                bytes_before=s.nbytes_hint,
                bytes_after=int(sympy.sympify(after).subs(subs)),
                reason=reason,
                masks=masks,
            )
        )
    return Plan(tuple(decisions))
