"""The float dtypes the kernels handle and their short names: the one table the codegen modules
share (the quantize kernels' dtypes, the int8 GEMMs' output dtypes, the plain GEMM formats of
:mod:`.kernels.lowbit_linear`, the rounding of the generated fusions)."""

from __future__ import annotations

import torch

__all__ = ["FLOAT_NAMES", "FLOATS", "SHORT_NAMES"]

FLOAT_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
FLOATS: tuple[torch.dtype, ...] = tuple(FLOAT_NAMES)  # (fp32, bf16, fp16), in this order
# the same names keyed by the dtype's name ("float32" -> "fp32"), as the cost model and reports name dtypes
SHORT_NAMES: dict[str, str] = {str(d).removeprefix("torch."): name for d, name in FLOAT_NAMES.items()}
