"""The ``fxlowbit::`` ops of the generated fusions (:mod:`.fusion`): ``fused_quantize_pack`` (a
pointwise chain and the quantize + pack of its value) and ``fused_dequantize_apply`` (a decode and
the backward's pointwise chain on it). Registered as ``custom_op`` + ``register_fake``, like the
ops of :mod:`.ops`, and dispatched the same way (:func:`.ops.use_triton`): on the Triton path one
generated kernel (:func:`.fusion.kernel`, launched with
:func:`.kernels.quant_triton.launch_config`), otherwise the spec's pure-torch reference and the
quantize references, with the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import fusion, rng
from .kernels.quant import (
    DTYPES,
    dequantize_unpack_reference,
    hash_uniform,
    packed_shapes,
    quantize_pack_reference,
)
from .ops import use_triton

__all__ = ["fused_quantize_pack", "fused_dequantize_apply"]


@torch.library.custom_op("fxlowbit::fused_quantize_pack", mutates_args=())
def fused_quantize_pack(
    inputs: list[torch.Tensor],
    spec: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    bits: int,
    group_size: int,
    stream: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A generated fusion (:mod:`.fusion`): evaluate the pointwise chain ``spec`` on ``inputs`` and
    return ``(value, codes, meta)``: the forward value (``dtype``, contiguous ``shape``) and its
    ``quantize_pack`` at ``bits`` with the next seed of ``stream``, in one kernel on the Triton path."""
    s = fusion.Spec.from_json(spec)
    seed = rng.draw_seed(stream, inputs[0].device)
    cshape, mshape = packed_shapes(math.prod(shape), bits, group_size)
    if use_triton(inputs[0], dtype) and math.prod(shape) > 0:
        from .kernels.quant_triton import launch_config

        out = torch.empty(list(shape), dtype=dtype, device=inputs[0].device)
        codes = torch.empty(cshape, dtype=torch.uint8, device=out.device)
        meta = torch.empty(mshape, dtype=torch.float32, device=out.device)
        grid, consts = launch_config(out.numel(), bits, group_size)
        fusion.kernel(s)[grid](
            *(t.contiguous() for t in inputs),
            out.view(torch.int16) if dtype == torch.bfloat16 else out,
            seed,
            codes,
            meta.view(torch.int32),
            out.numel(),
            cshape[0],
            shape[-1] if len(shape) else 1,
            **consts,
            OUT_BF16=dtype == torch.bfloat16,
            enable_fp_fusion=False,
        )
        return out, codes, meta
    out = _unaliased(fusion.reference(s, inputs), inputs)
    codes, meta = quantize_pack_reference(out, bits, group_size, hash_uniform(seed, cshape[0], group_size))
    return out, codes, meta


@fused_quantize_pack.register_fake
def _(inputs, spec, shape, dtype, bits, group_size, stream):
    cshape, mshape = packed_shapes(math.prod(shape), bits, group_size)
    like = inputs[0]
    return (
        like.new_empty(list(shape), dtype=dtype),
        like.new_empty(cshape, dtype=torch.uint8),
        like.new_empty(mshape, dtype=torch.float32),
    )


def _unaliased(out: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``out``, copied if it shares storage with an input (an op's outputs may not alias them)."""
    ptr = out.untyped_storage().data_ptr()
    return out.clone() if any(ptr == t.untyped_storage().data_ptr() for t in inputs) else out


@torch.library.custom_op("fxlowbit::fused_dequantize_apply", mutates_args=())
def fused_dequantize_apply(
    codes: torch.Tensor,
    meta: torch.Tensor,
    inputs: list[torch.Tensor],
    spec: str,
    bits: int,
    group_size: int,
    shape: Sequence[int],
    out_shape: Sequence[int],
    decoded_dtype: torch.dtype,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A generated consumer fusion (:mod:`.fusion`): decode ``codes``/``meta`` (as
    ``dequantize_unpack`` to ``decoded_dtype``) and apply the backward's pointwise chain ``spec``
    with ``inputs``, returning its last value (``dtype``, contiguous ``out_shape``: the same elements
    as ``shape``, maybe reshaped) in one kernel on the Triton path; the decoded tensor is never
    written."""
    s = fusion.Spec.from_json(spec)
    if use_triton(codes, dtype) and decoded_dtype in DTYPES and math.prod(shape) > 0:
        from .kernels.quant_triton import launch_config

        out = torch.empty(list(out_shape), dtype=dtype, device=codes.device)
        grid, consts = launch_config(out.numel(), bits, group_size)
        fusion.kernel(s)[grid](
            codes.contiguous(),
            meta.contiguous().view(torch.int32),
            *(t.contiguous() for t in inputs),
            out.view(torch.int16) if dtype == torch.bfloat16 else out,
            out.numel(),
            len(codes),
            out_shape[-1] if len(out_shape) else 1,
            **consts,
            DEC_BF16=decoded_dtype == torch.bfloat16,
            DEC_F16=decoded_dtype == torch.float16,
            OUT_BF16=dtype == torch.bfloat16,
            enable_fp_fusion=False,
        )
        return out
    x = dequantize_unpack_reference(codes, meta, bits, group_size, list(shape), decoded_dtype)
    return _unaliased(fusion.reference(s, [x, *inputs]), inputs)


@fused_dequantize_apply.register_fake
def _(codes, meta, inputs, spec, bits, group_size, shape, out_shape, decoded_dtype, dtype):
    return codes.new_empty(list(out_shape), dtype=dtype)
