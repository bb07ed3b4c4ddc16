"""The float dtypes the kernels handle and their short names: the one table the codegen modules
share (the quantize kernels' dtypes, the int8 GEMMs' output dtypes, the plain GEMM formats of
:mod:`.kernels.lowbit_linear`, the rounding of the generated fusions)."""

from __future__ import annotations

import torch

__all__ = ["FLOAT_NAMES", "FLOATS"]

FLOAT_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
FLOATS: tuple[torch.dtype, ...] = tuple(FLOAT_NAMES)  # (fp32, bf16, fp16), in this order
