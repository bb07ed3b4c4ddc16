"""The torch.library ops that compiled graphs call.

Registered as ``custom_op`` + ``register_fake`` (opaque to Inductor; see DESIGN.md, Style): the
forward graph calls ``quantize_pack`` / ``pack_mask`` / ``pack_bits`` on each compressed saved
tensor and the backward graph calls ``dequantize_unpack`` / ``unpack_mask`` / ``unpack_bits``
before the consumers.

Each op runs the hand-written Triton kernel (``kernels/*_triton.py``) on CUDA tensors, or anywhere
when :data:`FORCE_TRITON` is set (env ``FXLOWBIT_TRITON=1``; tests use it to run the kernels in the
interpreter on CPU), and the pure-torch reference otherwise. Both give the same bits (NaN payloads
aside). The ops of the generated fusions are in :mod:`.fusion_ops`, dispatched by the same
:func:`use_triton`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch

from . import rng
from .kernels import quant_cpu
from .kernels.bitmask import (
    pack_bits_reference,
    pack_mask_reference,
    packed_bits_numel,
    packed_mask_numel,
    unpack_bits_reference,
    unpack_mask_reference,
)
from .kernels.quant import (
    DTYPES,
    dequantize_unpack_reference,
    hash_uniform,
    packed_shapes,
    quantize_pack_reference,
)

__all__ = [
    "quantize_pack",
    "dequantize_unpack",
    "pack_mask",
    "unpack_mask",
    "pack_bits",
    "unpack_bits",
    "draw_seed",
    "FORCE_TRITON",
    "use_triton",
]

FORCE_TRITON = os.environ.get("FXLOWBIT_TRITON") == "1"
# Off the Triton path, quantize_pack and dequantize_unpack run one Inductor-compiled kernel per
# family (kernels/quant_cpu.py); env FXLOWBIT_CPU_KERNELS=reference runs the eager references.
CPU_COMPILED = os.environ.get("FXLOWBIT_CPU_KERNELS", "compiled") != "reference"


@contextlib.contextmanager
def reference_kernels():
    """Within: the CPU ops run the eager references (same bits). The eager replays of the checks and
    probes use it, so no decode kernel is compiled for a replay alone (the hybrid path decodes
    inline; one decode family took 1.7 s to compile cold on 2 cores, 2026-12-05)."""
    global CPU_COMPILED
    before, CPU_COMPILED = CPU_COMPILED, False
    try:
        yield
    finally:
        CPU_COMPILED = before


def use_triton(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the op on ``t`` runs its Triton kernel (imported lazily: triton is optional on CPU).
    ``dtype``: the float dtype a quant kernel would read or write; fp64 stays on the reference."""
    return (t.is_cuda or FORCE_TRITON) and dtype in (None, *DTYPES)


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
    seed = rng.draw_seed(stream, x.device)
    if use_triton(x, x.dtype):
        from .kernels.quant_triton import quantize_pack_triton

        return quantize_pack_triton(x, bits, group_size, seed)
    if CPU_COMPILED:
        return quant_cpu.quantize_pack(x, bits, group_size, seed)
    n_groups = -(-x.numel() // group_size)
    return quantize_pack_reference(x, bits, group_size, hash_uniform(seed, n_groups, group_size))


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
    if use_triton(codes, dtype):
        from .kernels.quant_triton import dequantize_unpack_triton

        return dequantize_unpack_triton(codes, meta, bits, group_size, list(shape), list(stride), dtype)
    if CPU_COMPILED:
        return quant_cpu.dequantize_unpack(codes, meta, bits, group_size, list(shape), dtype, list(stride))
    return dequantize_unpack_reference(codes, meta, bits, group_size, list(shape), dtype, list(stride))


@dequantize_unpack.register_fake
def _(codes, meta, bits, group_size, shape, stride, dtype):
    return codes.new_empty_strided(shape, stride, dtype=dtype)


@torch.library.custom_op("fxlowbit::pack_mask", mutates_args=())
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool -> uint8, eight per byte, lowest bit first."""
    if use_triton(mask):
        from .kernels.bitmask_triton import pack_mask_triton

        return pack_mask_triton(mask)
    return pack_mask_reference(mask)


@pack_mask.register_fake
def _(mask):
    return mask.new_empty((packed_mask_numel(mask.numel()),), dtype=torch.uint8)


@torch.library.custom_op("fxlowbit::unpack_mask", mutates_args=())
def unpack_mask(packed: torch.Tensor, shape: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Inverse of ``pack_mask``."""
    if use_triton(packed):
        from .kernels.bitmask_triton import unpack_mask_triton

        return unpack_mask_triton(packed, list(shape), list(stride))
    return unpack_mask_reference(packed, list(shape), list(stride))


@unpack_mask.register_fake
def _(packed, shape, stride):
    return packed.new_empty_strided(shape, stride, dtype=torch.bool)


@torch.library.custom_op("fxlowbit::pack_bits", mutates_args=())
def pack_bits(x: torch.Tensor, bits: int, lo: int) -> torch.Tensor:
    """Integers in ``[lo, lo + 2**bits)`` (or bool at 1 bit) -> uint8, ``8 // bits`` planar fields
    per byte, stored exactly as ``x - lo``."""
    if use_triton(x):
        from .kernels.bitmask_triton import pack_bits_triton

        return pack_bits_triton(x, bits, lo)
    return pack_bits_reference(x, bits, lo)


@pack_bits.register_fake
def _(x, bits, lo):
    return x.new_empty((packed_bits_numel(x.numel(), bits),), dtype=torch.uint8)


@torch.library.custom_op("fxlowbit::unpack_bits", mutates_args=())
def unpack_bits(
    packed: torch.Tensor,
    bits: int,
    lo: int,
    shape: Sequence[int],
    stride: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of ``pack_bits``: a ``dtype`` tensor with the given shape and strides."""
    if use_triton(packed):
        from .kernels.bitmask_triton import unpack_bits_triton

        return unpack_bits_triton(packed, bits, lo, list(shape), dtype, list(stride))
    return unpack_bits_reference(packed, bits, lo, list(shape), dtype, list(stride))


@unpack_bits.register_fake
def _(packed, bits, lo, shape, stride, dtype):
    return packed.new_empty_strided(shape, stride, dtype=dtype)
