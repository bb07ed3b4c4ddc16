"""The budget frontier of a compiled graph: the planner re-run on its saved tensors at several
memory budgets, for reports and plots (bytes stored, estimated added step time, variance ratio).

Pure planner calls on the records the backend kept (no graphs, no tensors); the planner's own
warnings and INFO logs are silenced meanwhile, and its warn-once memory is left as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

from . import planner
from .config import LowbitConfig
from .state import STATE

log = logging.getLogger(__name__)

__all__ = ["budget_frontier", "FRONTIER_BUDGETS"]

FRONTIER_BUDGETS = (1.0, 0.5, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03)  # fractions of the fp bytes


def budget_frontier(rec) -> list[dict[str, Any]]:
    """The planner's plans for this graph's saved tensors at :data:`FRONTIER_BUDGETS` (bytes,
    estimated added time and variance ratio), with its own warnings and logs silenced."""
    if rec.facts is None or not rec.facts.saved or rec.profile is None:
        return []
    base = {f.name: getattr(rec.cfg, f.name) for f in dataclasses.fields(rec.cfg)}
    quiet = logging.getLogger(planner.__name__)
    level, warned = quiet.level, set(STATE.warned)
    points = []
    try:
        quiet.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for f in FRONTIER_BUDGETS:
                cfg = LowbitConfig(**{**base, "bits": None, "memory_budget": f})
                p = planner.decide(rec.facts.saved, cfg, rec.facts.hints, profile=rec.profile,
                                   sensitivity=rec.sensitivity, gemms=rec.facts.gemms,
                                   extra_bytes=getattr(rec, "extra_bytes", 0))  # fmt: skip
                assert p.budget is not None  # a memory_budget plans to a budget in bytes
                points.append(
                    {"budget": f, "bytes": p.bytes_after, "time_s": p.time_s,
                     "variance_ratio": p.variance_ratio, "met": p.bytes_after <= p.budget}
                )  # fmt: skip
    except Exception as err:  # a report must not fail on the frontier
        log.warning("fxlowbit: no budget frontier for graph %d (%s: %s)", rec.index, type(err).__name__, err)
    finally:
        quiet.setLevel(level)
        STATE.warned.clear()  # the warn-once keys as they were (fxlowbit.state)
        STATE.warned.update(warned)
    return points
