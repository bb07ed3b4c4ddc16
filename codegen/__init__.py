"""Kernels and the torch.library ops that rewritten graphs call (installed as fxlowbit.codegen)."""

from . import ops  # noqa: F401  (registers the fxlowbit:: ops)
from .kernels import linear_ce  # noqa: F401  (registers fxlowbit::linear_ce_fwd / _bwd)
