"""Kernels and the torch.library ops that rewritten graphs call (installed as fxlowbit.codegen)."""

from . import ops  # noqa: F401  (registers the fxlowbit:: ops)
