"""The torch.library ops that compiled graphs call.

Registered as ``custom_op`` + ``register_fake`` (opaque to Inductor; see DESIGN.md, Style): the
forward graph calls ``quantize_pack`` / ``pack_mask`` on each compressed saved tensor and the
backward graph calls ``dequantize_unpack`` / ``unpack_mask`` before the consumers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import rng
from .kernels.bitmask import pack_mask_reference, packed_mask_numel, unpack_mask_reference
from .kernels.quant import (
    dequantize_unpack_reference,
    hash_uniform,
    packed_shapes,
    quantize_pack_reference,
)

__all__ = ["quantize_pack", "dequantize_unpack", "pack_mask", "unpack_mask", "draw_seed"]


@torch.library.custom_op("fxlowbit::draw_seed", mutates_args=())
def draw_seed(like: torch.Tensor, stream: int) -> torch.Tensor:
    """Next seed of random stream ``stream`` (int64 scalar on ``like``'s device)."""
    return rng.draw_seed(stream, like.device)


@draw_seed.register_fake
def _(like, stream):
    return like.new_empty((), dtype=torch.int64)


@torch.library.custom_op("fxlowbit::quantize_pack", mutates_args=())
def quantize_pack(
    x: torch.Tensor, bits: int, group_size: int, stream: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastically quantize ``x`` to ``bits`` per element in groups of ``group_size``.

    Returns ``(codes uint8 (n_groups, G*bits/8), meta fp32 (n_groups, 2))``; the rounding noise is
    ``hash_uniform`` of the next seed of random stream ``stream`` (negative: round to nearest).
    """
    if stream < 0:
        return quantize_pack_reference(x, bits, group_size, None)
    n_groups = -(-x.numel() // group_size)
    noise = hash_uniform(rng.draw_seed(stream, x.device), n_groups, group_size)
    return quantize_pack_reference(x, bits, group_size, noise)


@quantize_pack.register_fake
def _(x, bits, group_size, stream):
    cshape, mshape = packed_shapes(x.numel(), bits, group_size)
    return x.new_empty(cshape, dtype=torch.uint8), x.new_empty(mshape, dtype=torch.float32)


@torch.library.custom_op("fxlowbit::dequantize_unpack", mutates_args=())
def dequantize_unpack(
    codes: torch.Tensor,
    meta: torch.Tensor,
    bits: int,
    group_size: int,
    shape: Sequence[int],
    stride: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of ``quantize_pack``: a ``dtype`` tensor with the given shape and strides."""
    return dequantize_unpack_reference(codes, meta, bits, group_size, list(shape), dtype, list(stride))


@dequantize_unpack.register_fake
def _(codes, meta, bits, group_size, shape, stride, dtype):
    return codes.new_empty_strided(shape, stride, dtype=dtype)


@torch.library.custom_op("fxlowbit::pack_mask", mutates_args=())
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool -> uint8, eight per byte, lowest bit first."""
    return pack_mask_reference(mask)


@pack_mask.register_fake
def _(mask):
    return mask.new_empty((packed_mask_numel(mask.numel()),), dtype=torch.uint8)


@torch.library.custom_op("fxlowbit::unpack_mask", mutates_args=())
def unpack_mask(packed: torch.Tensor, shape: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Inverse of ``pack_mask``."""
    return unpack_mask_reference(packed, list(shape), list(stride))


@unpack_mask.register_fake
def _(packed, shape, stride):
    return packed.new_empty_strided(shape, stride, dtype=torch.bool)
