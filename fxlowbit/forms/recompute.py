"""Recompute: nothing is stored; the backward replays the tensor's producers from values it has
anyway (other saved tensors, graph inputs): pointwise and view ops, and at most one matmul or
convolution (the exact alternative PyTorch's min-cut never takes for GEMM outputs). Costs one
pointwise pass plus that GEMM at the profile's throughput. Exact when its leaves are; a replay
through a GEMM from leaves stored lossily carries their rounding noise: each lossy form of such a
leaf is charged the variance the replayed tensor would get at its width (an upper bound when the
plan stores the tensor instead; a pointwise replay's noise is not charged: it counts as the leaves').
Its rewrite is its own pass, passes/recompute.py (it runs before the others rewrite what they
store); here the rewrite leaves the saved value alone."""

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
    replay_leaf = True  # a replay may read a replayed value (passes/recompute.py chains them)

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
        seconds = t.profile.pointwise_time(r.nbytes_moved)
        if not r.flops:
            why = f"replayed in the backward: {len(r.nodes)} pointwise op(s) on {leaves}"
            return [(Costs(self.name, 0, 0, seconds, 0.0), why)]
        seconds += t.profile.matmul_time(r.flops, r.gemm_dtype)
        ops = f"{r.gemm} ({r.flops / 1e6:.3g} MFLOP) and {len(r.nodes) - 1} op(s)"
        why = f"replayed in the backward: {ops} on {leaves}"
        # the noise of lossy leaves it carries is charged to the leaves' forms (graph_candidates)
        lossy = tuple(sorted(lossy_leaves))
        return [(Costs(self.name, 0, 0, seconds, 0.0, reads_lossy=lossy, sensitivity=t.sensitivity), why)]

    def exclusive(self, t: Tensor) -> bool:
        # a cast of weights or inputs: replaying it is exact and costs one pass (a GEMM of weights
        # is priced like any other replay)
        r = t.s.recompute
        return r is not None and r.from_inputs and not r.flops

    def reads(self, s) -> tuple[str, ...]:
        return s.recompute.leaves if s.recompute is not None else ()

    def stored_bytes(self, numel, bits, group_size, itemsize, n_masks=1):
        return sympy.Integer(0)

    def decision_bits(self, c, masks, itemsize):
        return 0

    def report_reason(self, d, plan, cfg):
        return f"recompute (cheaper than storing): {d.reason}"
