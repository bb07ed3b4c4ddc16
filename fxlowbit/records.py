"""The analysis records the planner reads: saved tensors, their backward uses and replay recipes,
GEMMs, and one forward/backward pair's facts.

Pure: frozen dataclasses, no torch.fx (torch and sympy only name the fields' types).
:mod:`fxlowbit.passes.analyze` makes them from the partitioned graphs; :mod:`fxlowbit.planner`,
the forms (:mod:`fxlowbit.forms`) and the reports read them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sympy
    import torch

__all__ = ["VALUE", "COMPARE", "EXACT", "Use", "Recompute", "Gemm", "SavedTensor", "GraphFacts"]

# A backward use's role (Use.role), as fxlowbit.passes._ops names them; None: not known to tolerate
# compression
VALUE = "value"  # used arithmetically: bounded unbiased noise is fine
COMPARE = "compare"  # compared with a scalar: a 1-bit mask of the result is exact
EXACT = "exact"  # a known consumer that needs the value exact (kept, no warning)


@dataclasses.dataclass(frozen=True)
class Use:
    op: str  # target of the backward consumer (looked through transparent ops)
    role: str | None  # VALUE / COMPARE / EXACT, or None: not known to tolerate compression
    scalar: Any = None  # the scalar a COMPARE use compares with
    direct: bool = True  # False when reached through a transparent (view/copy) op


@dataclasses.dataclass(frozen=True)
class Recompute:
    """How the backward can rebuild a saved tensor from values it has anyway: replay ``nodes``
    (deterministic pointwise/view ops of the forward and at most one matmul or convolution, in
    order) on ``leaves`` (other saved tensors and graph inputs)."""

    nodes: tuple[str, ...]
    leaves: tuple[str, ...]
    nbytes_moved: int  # bytes read + written by the replayed ops at the example sizes (upper bound)
    # every leaf is a graph input (e.g. autocast's bf16 copy of a weight): exact and always at hand,
    # so such a tensor is replayed, never stored lossily
    from_inputs: bool = False
    # the replay's matmul/convolution: its node ("": pointwise and views only), its FLOPs at the
    # example sizes and the dtype it runs in (its time comes from the profile's table for it)
    gemm: str = ""
    flops: int = 0
    gemm_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class Gemm:
    op: str
    flops: int  # at the example sizes
    dtype: str
    graph: str  # "fw" | "bw"


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    name: str
    producer: str  # target of the producing forward op ("placeholder" for graph inputs)
    shape: tuple[Any, ...]  # ints, or sympy expressions for symbolic sizes
    dtype: torch.dtype
    numel: sympy.Expr
    nbytes: sympy.Expr
    nbytes_hint: int  # at the example sizes
    uses: tuple[Use, ...]
    input_alias: bool  # aliases a graph input (parameter, buffer, user input): costs no memory
    recompute: Recompute | None = None
    # aliases the user's batch (a graph input without grad that is no parameter or buffer): no
    # choice (the training loop holds it anyway) but memory, so the budget counts it
    data_input: bool = False
    # (lo, hi): every value an integer tensor can hold, known from its producer (max-pool window
    # offsets, pooling indices); None when unknown or not an integer tensor
    int_range: tuple[int, int] | None = None

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class GraphFacts:
    saved: tuple[SavedTensor, ...]
    hints: dict  # sympy symbol -> value at the example sizes
    gemms: tuple[Gemm, ...] = ()  # every matmul/conv/attention call of both graphs

    def by_name(self) -> dict[str, SavedTensor]:
        return {s.name: s for s in self.saved}
