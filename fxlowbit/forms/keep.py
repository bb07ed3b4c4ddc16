"""Keep: the saved tensor stays as the forward computed it. Applies to every tensor; exact, free
in time, stored at its own width. The rewrite leaves it alone."""

from __future__ import annotations

from ..costmodel import Costs
from ..plan import Form
from . import SavedForm, Tensor, register

# why a float64 tensor is kept when nothing else fits (it is never quantized)
F64_KEPT = "float64: kept exact (quantization computes in fp32, whose range float64 values exceed)"


@register
class Keep(SavedForm):
    name = Form.KEEP
    kinds = frozenset({"fixed", "bool", "exact", "compared", "float64", "float"})
    color = "#555"
    stored_as_is = True
    keeps_value = True

    def offers(self, t: Tensor) -> list[tuple[Costs, str]]:
        if t.kind == "fixed":
            why = t.fixed or ""
        elif t.kind == "exact":
            why = t.exact or ""
        elif t.kind == "float64":
            why = F64_KEPT
        else:
            why = "kept: cheapest in time within the budget"
        return [(Costs(self.name, 0, t.nbytes, 0.0, 0.0), why)]

    def stored_bytes(self, numel, bits, group_size, itemsize, n_masks=1):
        return numel * itemsize

    def decision_bits(self, c, masks, itemsize):
        return itemsize * 8

    def report_reason(self, d, plan, cfg):
        why = d.reason
        if why.startswith("below min_bytes"):
            return f"kept: below size threshold (min_bytes={cfg.min_bytes})"
        if why.startswith("kept: cheapest"):
            return "kept: budget met without compressing it (keeping costs no time)"
        return why if why.startswith("kept") else f"kept: {why}"
