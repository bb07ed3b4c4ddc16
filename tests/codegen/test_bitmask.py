"""Exactness of codegen/kernels/bitmask.py: bool masks packed eight per uint8, lowest bit first.

Round trips are bit for bit on odd, empty and non-contiguous masks; the layout is checked against
hand-computed bytes; strides requested on unpack are honoured; wrong dtypes raise TypeError.
"""

import pytest
import torch

from fxlowbit.codegen.kernels.bitmask import (
    pack_mask_reference,
    packed_mask_numel,
    unpack_mask_reference,
)

from ._views import NONCONTIGUOUS

SHAPES = ((0,), (1,), (7,), (8,), (9,), (255,), (257,), (4097,), (3, 5, 7), (0, 4), (2, 0, 3))


def _mask(shape, seed=0, p=0.5):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mask_roundtrip_bit_exact(shape, p):
    m = _mask(shape, p=p)
    packed = pack_mask_reference(m)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_mask_numel(m.numel()),)
    assert packed.shape == ((m.numel() + 7) // 8,)
    out = unpack_mask_reference(packed, shape)
    assert out.dtype == torch.bool and out.shape == m.shape
    assert torch.equal(out, m)


@pytest.mark.parametrize(
    "bits,packed",
    [
        # planar, W = ceil(n / 8) bytes: element j*W + k -> bit j of byte k
        ([1, 0, 1, 1, 0, 0, 0, 0, 1], [0b00010011, 0b00000010]),
        ([0, 0, 0, 0, 0, 0, 0, 1], [0b10000000]),
        ([1, 1, 1, 1, 1, 1, 1, 1, 1], [0x1F, 0x0F]),  # padding bits are zero
        ([0, 1] * 8, [0x00, 0xFF]),
    ],
)
def test_mask_layout_planar_lowest_bit_first(bits, packed):
    m = torch.tensor(bits, dtype=torch.bool)
    assert pack_mask_reference(m).tolist() == packed
    assert unpack_mask_reference(torch.tensor(packed, dtype=torch.uint8), m.shape).tolist() == m.tolist()


def test_mask_layout_follows_logical_order():
    m = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)  # elements 0 and 8
    assert pack_mask_reference(m).tolist() == [0x11, 0x00]  # W = 2: element 8 is bit 4 of byte 0
    assert pack_mask_reference(m.t()).tolist() == [0x11, 0x00]  # transposed: same logical positions
    m2 = torch.tensor([[0, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert pack_mask_reference(m2).tolist() == [0x00, 0x01]
    assert pack_mask_reference(m2.t()).tolist() == [0x00, 0x02]  # (1, 0) of m2.t() is element 3


def test_every_byte_value_survives_unpack_pack():
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_mask_reference(unpack_mask_reference(every, (2048,))), every)


@pytest.mark.parametrize(
    "make",
    [*NONCONTIGUOUS.values(), lambda b: b[:1].expand(5, 40)],
    ids=[*NONCONTIGUOUS, "expanded"],
)
def test_noncontiguous_mask(make):
    m = make(_mask((33, 40)))
    assert not m.is_contiguous()
    packed = pack_mask_reference(m)
    assert torch.equal(packed, pack_mask_reference(m.contiguous()))
    if 0 in m.stride():
        return  # an expanded layout cannot be materialised with its own (overlapping) strides
    out = unpack_mask_reference(packed, m.shape, m.stride())
    assert out.stride() == m.stride()
    assert torch.equal(out, m)


@pytest.mark.parametrize(
    "shape,stride",
    [((3, 5), (1, 3)), ((2, 3, 4), (1, 2, 6)), ((4, 1), (1, 4)), ((6, 7), (7, 1)), ((5, 6), (12, 2))],
    ids=str,
)
def test_unpack_mask_honours_stride(shape, stride):
    m = _mask(shape)
    out = unpack_mask_reference(pack_mask_reference(m), shape, stride)
    assert out.stride() == stride and out.dtype == torch.bool
    assert torch.equal(out, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int64])
def test_pack_mask_rejects_non_bool(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        pack_mask_reference(torch.ones(16, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.float32])
def test_unpack_mask_rejects_non_uint8(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        unpack_mask_reference(torch.ones(2, dtype=dtype), (16,))
