"""The joint check of a plan: the gradient error of all its compressed tensors together, measured.

Probes (:mod:`fxlowbit.calibrate`) round one saved tensor at a time and the planner adds their
variances. Errors in the backward compound (a rounded activation perturbs a gradient that a second
rounded activation then multiplies), so the sum can miss: on T5 in the model matrix a plan
estimated at 0.045 of the gradient's power measured 0.33 (4.8 dB). This module applies a plan to
copies of the pristine graphs with the same recompute and rewrite passes the compiled graphs get
(the reference ops, bit for bit the inline kernels' arithmetic) and replays one step eagerly with the
exact replay's dropout draws and tangents, so the whole plan's added error is measured in one
forward and one backward.
"""

from __future__ import annotations

import torch

from . import calibrate, passes
from .codegen import ops, rng
from .config import LowbitConfig
from .plan import Plan

__all__ = ["plan_error"]


def _check_stream() -> int:
    """The one rounding stream of every check (its draws never reach training): a reserved id, no
    id a compiled graph bakes in, so a check one process runs and another skips shifts no later
    graph's stream."""
    return rng.reserved_stream(0, 0x5EED)


def plan_error(pristine, args, plan: Plan, facts, cfg: LowbitConfig, seed: int = 0) -> tuple[float, float]:
    """(squared error of the plan's gradient against the exact one, squared norm of the exact
    one) on the step ``args``, with the probes' tangents for ``seed``."""
    with calibrate._transient_source():  # temporary copies: their generated code is not kept
        return _plan_error(pristine, args, plan, facts, cfg, seed)


def _plan_error(pristine, args, plan: Plan, facts, cfg: LowbitConfig, seed: int) -> tuple[float, float]:
    fw0, bw0, n = pristine
    # lazy copies: the rewrites' recompiles only mark them; their code is generated once, when run
    fw, bw = passes._graph.copy_module(fw0, lazy=True), passes._graph.copy_module(bw0, lazy=True)
    if cfg.enabled("recompute"):
        recipes = {s.name: s.recompute for s in facts.saved if s.recompute is not None}
        passes.recompute.run(fw, bw, plan, recipes, num_fwd_outputs=n)
    passes.rewrite_saved.run(
        fw,
        bw,
        plan,
        num_fwd_outputs=n,
        group_size=cfg.group_size,
        stream=_check_stream(),
        inline=False,
        fuse=False,
    )
    devices = sorted({a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda}, key=str)
    with torch.random.fork_rng(devices=devices):  # both replays draw the same dropout masks
        state = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
        grad, _, tangents = calibrate.exact_gradient(pristine, args, seed)
        torch.set_rng_state(state[0])
        for d, s in zip(devices, state[1], strict=True):
            torch.cuda.set_rng_state(s, d)
        with torch.no_grad(), ops.reference_kernels():
            saved = list(fw(*list(args))[n:])
            got = calibrate.flat_gradient(bw(*saved, *tangents))
    return float(((got - grad) ** 2).sum()), float((grad**2).sum())
