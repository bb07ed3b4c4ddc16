"""Packed integers: an integer tensor whose values lie in a known small range (max-pool window
offsets) stored as ``bits``-wide fields (1, 2, 4 or 8), ``8 // bits`` to a byte, offset by the
range's low end. Exact. Forward ``fxlowbit::pack_bits``, backward ``fxlowbit::unpack_bits``."""

from __future__ import annotations

import sympy

from .. import costmodel as cm
from ..costmodel import Costs
from ..plan import Form
from . import SavedForm, Tensor, register


@register
class Packed(SavedForm):
    name = Form.PACKED
    kinds = frozenset({"exact"})

    def offers(self, t: Tensor) -> list[tuple[Costs, str]]:
        s, known = t.s, t.s.int_range
        b = cm.packed_bits(*known) if known is not None else None
        if known is None or b is None or b >= s.itemsize * 8:
            return []
        nbytes = t.at(self.stored_bytes(s.numel, b, 1, 1))
        lo, hi = known
        why = f"integers in [{lo}, {hi}] (from {s.producer}'s op): {b}-bit fields, exact"
        return [(Costs(self.name, b, nbytes, t.profile.mask_time(t.fp32_bytes), 0.0), why)]

    def stored_bytes(self, numel, bits, group_size, itemsize, n_masks=1):
        return sympy.ceiling(numel / (8 // bits))  # bits-wide fields, 8 // bits per byte

    def rewrite(self, rw, node, ph, d) -> None:
        import torch

        from ..codegen.kernels.bitmask import pack_bits_traceable, unpack_bits_traceable
        from ..passes.analyze import int_range

        found = int_range(node)
        if found is None:
            raise ValueError(f"fxlowbit: the plan packs {node.name}, whose value range is unknown")
        ops, bits, lo, val = torch.ops.fxlowbit, d.bits, found[0], node.meta["val"]
        parts = rw.emit(
            node, ph, rw.pack(node, pack_bits_traceable, ops.pack_bits.default, (bits, lo), ["bits"])
        )
        rw.store(
            ph, rw.decoder(val, unpack_bits_traceable, ops.unpack_bits.default, parts, (bits, lo, val.dtype))
        )
        rw.counters["saved_packed"] += 1

    def report_reason(self, d, plan, cfg):
        return f"packed (exact): {d.reason}"
