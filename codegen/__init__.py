"""Kernels and the torch.library ops that rewritten graphs call (installed as fxlowbit.codegen)."""

from . import fusion_ops, ops  # noqa: F401  (register the fxlowbit:: ops)
from .kernels import (  # noqa: F401  (register the fxlowbit:: ops of each family)
    linear_ce,  # fxlowbit::linear_ce_fwd / _bwd
    lowbit_linear,  # fxlowbit::lowbit_linear / _backward
    sampled_linear,  # fxlowbit::sampled_linear / _backward
    sampling_state,  # fxlowbit::sampled_linear_keyed / _backward
)
