"""Graph passes (installed as fxlowbit.passes): one pass per module, each exposing ``run``."""

from . import (
    analyze,
    linear_ce,
    linears,
    lowbit_gemm,
    lower_linears,
    recompute,
    rewrite_saved,
    sampling,
    saved_views,
    sparsity,
)

__all__ = [
    "linear_ce",
    "linears",
    "sparsity",
    "lowbit_gemm",
    "sampling",
    "saved_views",
    "analyze",
    "recompute",
    "rewrite_saved",
    "lower_linears",
]
