"""Plain records shared by the planner and the rewrites (no torch.fx here).

A :class:`Plan` says, for each saved tensor of one forward/backward pair, which form it is stored
in and why. It is frozen and JSON-serialisable so reports and tests can inspect every decision.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

__all__ = ["Form", "Decision", "Plan"]


class Form:
    """The built-in forms' names, as :attr:`Decision.form` stores them. Each is the ``name`` of a
    module of :mod:`fxlowbit.forms`, which says what the form is (``fxlowbit.forms.names()`` lists
    every registered form, added ones included)."""

    KEEP = "keep"
    RECOMPUTE = "recompute"  # replayed in the backward from values it has anyway
    QUANT = "quant"  # b-bit per-group affine, stochastic rounding
    MASK = "mask"  # bool tensor packed to 1 bit
    CMP_MASK = "cmp_mask"  # float tensor whose backward only compares it with scalars
    PACKED = "packed"  # integers of a known small range (max-pool window offsets), exact


@dataclasses.dataclass(frozen=True)
class Decision:
    name: str  # saved node name (same in forward outputs and backward placeholders)
    producer: str  # target of the producing op
    shape: tuple[Any, ...]  # ints or strings of symbolic sizes
    dtype: str
    form: str
    bits: int  # stored bits per element (32/16 for keep, 1 for masks), comparison masks included (+masks)
    bytes_before: int  # at the example sizes
    bytes_after: int
    reason: str
    masks: int = 0  # exact 1-bit masks of scalar comparisons stored beside the form (QUANT/CMP_MASK)
    time_s: float = 0.0  # estimated seconds this form adds to a step
    variance: float = 0.0  # estimated gradient variance added, in minibatch-variance units


@dataclasses.dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]
    budget: int | None = None  # saved-activation bytes allowed (None: uniform rule, no budget)
    step_time_s: float = 0.0  # estimated uncompressed step time of the graph
    variance_ratio: float = 0.0  # estimated added gradient variance / minibatch variance
    status: str = "ok"  # "ok", "uniform b-bit", or why the budget or variance limit was not met
    partition: str = ""  # "": min-cut's default partition; else which partition and why (planner)
    # uncompressed saved bytes of the default partition when the plan is of another (0: the same)
    bytes_default: int = 0
    partition_flops: int = 0  # GEMM FLOPs the other partition's recompute adds to the default pair's

    @property
    def time_s(self) -> float:
        """Estimated seconds the plan adds to a step."""
        return sum(d.time_s for d in self.decisions)

    @property
    def bytes_before(self) -> int:
        return sum(d.bytes_before for d in self.decisions)

    @property
    def bytes_uncompressed(self) -> int:
        """What the graph saves without fxlowbit (the default partition, uncompressed): the bytes a
        fractional budget is a fraction of (with a fused loss's logits, ``extra_bytes``)."""
        return self.bytes_default or self.bytes_before

    @property
    def bytes_after(self) -> int:
        return sum(d.bytes_after for d in self.decisions)

    def by_name(self) -> dict[str, Decision]:
        return {d.name: d for d in self.decisions}

    def count(self, form: str) -> int:
        return sum(d.form == form for d in self.decisions)

    def signature(self) -> tuple:
        """What the rewrite depends on: two plans with equal signatures compile to the same code."""
        rows = tuple((d.name, d.form, d.bits) for d in self.decisions)
        return rows + ((("partition", self.partition, 0),) if self.partition else ())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=str)

    def __str__(self) -> str:
        rows = [
            f"{'saved':28} {'producer':34} {'dtype':9} {'form':9} {'bits':>4} {'before':>10} {'after':>10}"
        ]
        for d in self.decisions:
            rows.append(
                f"{d.name:28.28} {d.producer:34.34} {d.dtype:9} {d.form:9} {d.bits:>4} "
                f"{d.bytes_before:>10} {d.bytes_after:>10}  {d.reason}"
            )
        rows.append(f"total saved bytes {self.bytes_before} -> {self.bytes_after}")
        if self.bytes_default:
            rows.append(f"(the default partition saves {self.bytes_default} bytes)")
        if self.budget is not None:
            rows.append(
                f"budget {self.budget} bytes, est. +{self.time_s * 1e3:.3f} ms on a "
                f"{self.step_time_s * 1e3:.3f} ms step, variance ratio {self.variance_ratio:.3g} "
                f"({self.status})"
            )
        if self.partition:
            rows.append(f"partition: {self.partition}")
        return "\n".join(rows)
