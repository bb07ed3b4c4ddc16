"""Mask: a bool tensor (dropout's keep mask, a ReLU's ``x > 0``) packed to 1 bit per element,
eight to a byte. Exact. Forward ``fxlowbit::pack_mask``, backward ``fxlowbit::unpack_mask`` (or
their traced references, codegen/kernels/bitmask.py)."""

from __future__ import annotations

import sympy

from ..costmodel import Costs
from ..plan import Form
from . import SavedForm, Tensor, register


def mask_bytes(numel, n_masks: int = 1):
    """``n_masks`` 1-bit masks of ``numel`` elements, each rounded up to bytes."""
    return n_masks * sympy.ceiling(numel / 8)


def mask_parts(rw, node, ph, source, name: str):
    """Pack bool ``source`` (``node`` or a comparison of it) to bits in the forward, return them
    in ``node``'s place, and give the decode builder of the backward's bool value."""
    import torch

    from ..codegen.kernels.bitmask import pack_mask_traceable, unpack_mask_traceable

    ops = torch.ops.fxlowbit
    parts = rw.emit(node, ph, rw.pack(source, pack_mask_traceable, ops.pack_mask.default, (), [name]))
    return rw.decoder(source.meta["val"], unpack_mask_traceable, ops.unpack_mask.default, parts, ())


@register
class Mask(SavedForm):
    name = Form.MASK
    kinds = frozenset({"bool"})

    def offers(self, t: Tensor) -> list[tuple[Costs, str]]:
        if not t.cfg.masks:
            return []
        nbytes = t.at(mask_bytes(t.s.numel))
        return [
            (Costs(self.name, 1, nbytes, t.profile.mask_time(t.fp32_bytes), 0.0), "bool mask: 1 bit, exact")
        ]

    def stored_bytes(self, numel, bits, group_size, itemsize, n_masks=1):
        return mask_bytes(numel, n_masks)

    def rewrite(self, rw, node, ph, d) -> None:
        rw.store(ph, mask_parts(rw, node, ph, node, "bits"))
        rw.counters["saved_mask"] += 1

    def report_reason(self, d, plan, cfg):
        return f"mask: {d.reason}"
