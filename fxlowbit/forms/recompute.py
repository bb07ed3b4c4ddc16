"""Recompute: nothing is stored; the backward replays the tensor's cheap pointwise producers from
values it has anyway (other saved tensors, graph inputs). Exact; costs one pointwise pass. Its
rewrite is its own pass, passes/recompute.py (it runs before the others rewrite what they store);
here the rewrite leaves the saved value alone."""

from __future__ import annotations

import sympy

from ..costmodel import Costs
from ..plan import Form
from . import SavedForm, Tensor, register


@register
class Recompute(SavedForm):
    name = Form.RECOMPUTE
    kinds = frozenset({"bool", "exact", "compared", "float64", "float"})
    color = "#7a3db8"
    stored_as_is = True
    replay_leaf = False  # no replays of replays

    def offers(self, t: Tensor) -> list[tuple[Costs, str]]:
        r = t.s.recompute
        if not t.cfg.recompute or r is None:
            return []
        lossy_leaves = t.lossy_names & set(r.leaves)
        # per-row statistics are kept exact: only other lossy leaves are scaled by them (a replay
        # that scales a lossy leaf by 1/rms multiplies its rounding error by it, unseen by any
        # variance estimate of the leaf)
        if lossy_leaves - t.row_stats and t.row_stats & set(r.leaves):
            return []
        if t.exact is not None and lossy_leaves:  # an exact value never reads a lossy one
            return []
        leaves = ", ".join(r.leaves) or "constants"
        why = f"replayed in the backward: {len(r.nodes)} pointwise op(s) on {leaves}"
        return [(Costs(self.name, 0, 0, t.profile.pointwise_time(r.nbytes_moved), 0.0), why)]

    def exclusive(self, t: Tensor) -> bool:
        # a cast of weights or inputs: replaying it is exact and costs one pass
        r = t.s.recompute
        return r is not None and r.from_inputs

    def reads(self, s) -> tuple[str, ...]:
        return s.recompute.leaves if s.recompute is not None else ()

    def stored_bytes(self, numel, bits, group_size, itemsize, n_masks=1):
        return sympy.Integer(0)

    def decision_bits(self, c, masks, itemsize):
        return 0

    def report_reason(self, d, plan, cfg):
        return f"recompute (cheaper than storing): {d.reason}"
