"""Comparison masks: a float tensor whose backward only compares it with scalars (a ReLU's or a
threshold's ``x <= 0``) stores those comparisons, made in the forward, as exact 1-bit masks, one
per distinct (op, scalar). The same masks ride beside a quantized tensor whose backward also
compares it (:attr:`~fxlowbit.forms.SavedForm.carries_masks`): the comparisons then read the exact
value while the other uses read the rounded one."""

from __future__ import annotations

from ..costmodel import Costs
from ..plan import Form
from . import SavedForm, Tensor, register
from .mask import mask_bytes, mask_parts


def comparison_masks(t: Tensor) -> tuple[int, float]:
    """(stored bytes, seconds) of ``t``'s comparison masks (0 and 0.0 when it has none)."""
    if not t.n_masks:
        return 0, 0.0
    return t.at(mask_bytes(t.s.numel, t.n_masks)), t.n_masks * t.profile.mask_time(t.fp32_bytes)


def store_comparisons(rw, node, ph) -> None:
    """Move the backward's scalar comparisons of ``node`` into the forward as 1-bit masks."""
    from ..passes import _ops
    from ..passes._graph import call, through_identities

    groups: dict[tuple, list] = {}
    for user in through_identities(ph):
        if user.op == "call_function" and user.target.overloadpacket in _ops.COMPARISONS:
            groups.setdefault((user.target, user.args[1]), []).append(user)
    for (target, scalar), users in groups.items():
        with rw.fg.inserting_after(node):
            cmp = call(rw.fg, target, (node, scalar))
        rw.store(ph, mask_parts(rw, node, ph, cmp, "cmpbits"), users=users)
        rw.counters["saved_cmp_mask"] += 1


@register
class ComparisonMask(SavedForm):
    name = Form.CMP_MASK
    kinds = frozenset({"compared"})
    replay_leaf = False  # the value itself is not stored
    carries_masks = True

    def offers(self, t: Tensor) -> list[tuple[Costs, str]]:
        if t.n_masks >= t.s.itemsize * 8:
            return []
        nbytes, seconds = comparison_masks(t)
        why = f"backward only compares it with scalars: {t.n_masks} exact 1-bit mask(s)"
        return [(Costs(self.name, 0, nbytes, seconds, 0.0), why)]

    def stored_bytes(self, numel, bits, group_size, itemsize, n_masks=1):
        return mask_bytes(numel, n_masks)

    def uniform_veto(self, c, n_masks, cfg):
        if n_masks >= cfg.bits:
            return f"{n_masks} distinct comparisons: masks would not save memory"
        return None

    def rewrite(self, rw, node, ph, d) -> None:
        if d.masks:
            store_comparisons(rw, node, ph)

    def report_reason(self, d, plan, cfg):
        return f"mask: {d.reason}"
