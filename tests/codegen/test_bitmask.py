"""Exactness of codegen/kernels/bitmask.py: bool masks packed eight per uint8, lowest bit first,
and small integers packed ``bits`` (1, 2, 4, 8) per planar field as ``x - lo``.

Round trips are bit for bit on odd, empty and non-contiguous inputs of every integer dtype, with
zero, positive and negative ``lo``; the layouts are checked against hand-computed bytes; strides
requested on unpack are honoured; wrong dtypes, widths and byte counts raise.
"""

import pytest
import torch

from fxlowbit.codegen.kernels.bitmask import (
    BIT_WIDTHS,
    pack_bits_reference,
    pack_bits_traceable,
    pack_mask_reference,
    packed_bits_numel,
    packed_mask_numel,
    unpack_bits_reference,
    unpack_mask_reference,
)
from fxlowbit.costmodel import PACKED_WIDTHS, packed_bits

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


# ---------------------------------------------------------------- ``bits``-wide integer fields

INT_DTYPES = (torch.int8, torch.uint8, torch.int32, torch.int64)
NUMELS = (0, 1, 7, 255, 257, 4097)


def _ints(shape, bits, lo, dtype, seed=0):
    """Values of ``[lo, lo + 2**bits)`` that ``dtype`` holds, both ends included when there is room;
    None when ``dtype`` holds none of them."""
    if dtype == torch.bool:
        return _mask(shape, seed) if (bits, lo) == (1, 0) else None
    info = torch.iinfo(dtype)
    a, b = max(lo, info.min), min(lo + (1 << bits) - 1, info.max)
    if a > b:
        return None
    x = torch.randint(a, b + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    x.view(-1)[:2] = torch.tensor([a, b])[: x.numel()]
    return x.to(dtype)


# every (bits, dtype, lo) where dtype holds some value of [lo, lo + 2**bits): bool at bits=1, lo=0
ROUNDTRIP_CASES = [
    (bits, dtype, lo)
    for bits in BIT_WIDTHS
    for dtype in (*INT_DTYPES, torch.bool)
    for lo in (0, 3, -5, -128)
    if _ints((1,), bits, lo, dtype) is not None
]


@pytest.mark.parametrize("bits,dtype,lo", ROUNDTRIP_CASES, ids=str)
def test_bits_roundtrip_bit_exact(bits, dtype, lo):
    for n in NUMELS:
        x = _ints((n,), bits, lo, dtype, seed=n)
        packed = pack_bits_reference(x, bits, lo)
        assert packed.dtype == torch.uint8 and packed.shape == (packed_bits_numel(n, bits),)
        assert packed.numel() == (n * bits + 7) // 8
        out = unpack_bits_reference(packed, bits, lo, x.shape, dtype)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, x), n


def test_bits_roundtrip_uses_the_whole_field():
    # the extremes lo and lo + 2**bits - 1 are among the values packed above
    x = _ints((257,), 4, -5, torch.int8)
    assert (x.min().item(), x.max().item()) == (-5, 10)
    assert torch.equal(unpack_bits_reference(pack_bits_reference(x, 4, -5), 4, -5, x.shape, x.dtype), x)


@pytest.mark.parametrize(
    "bits,lo,values,packed",
    [
        # bits=2, 5 elements: P = 4, W = 2; byte 0 = elements 0, 2, 4, byte 1 = elements 1, 3
        (2, 0, [1, 2, 3, 0, 2], [1 | 3 << 2 | 2 << 4, 2 | 0 << 2]),
        (2, -1, [0, 1, 2, -1, 1], [1 | 3 << 2 | 2 << 4, 2 | 0 << 2]),  # stored as x - lo
        (4, 0, [5, 9, 15], [0xF5, 0x09]),  # P = 2, W = 2: element 2 is the high nibble of byte 0
        (4, 3, [3], [0x00]),  # the padding is 0, not -lo
        (4, 3, [4, 18, 3], [0x01, 0x0F]),
        (8, -2, [-2, 7, 253], [0, 9, 255]),  # one plane: a plain offset copy
        (1, 0, [1, 0, 1, 1, 0, 0, 0, 0, 1], [0b00010011, 0b00000010]),  # the mask layout
    ],
)
def test_bits_layout_planar_lowest_field_first(bits, lo, values, packed):
    x = torch.tensor(values, dtype=torch.int64)
    assert pack_bits_reference(x, bits, lo).tolist() == packed
    assert pack_bits_traceable(x, bits, lo).tolist() == packed
    out = unpack_bits_reference(torch.tensor(packed, dtype=torch.uint8), bits, lo, x.shape, torch.int64)
    assert out.tolist() == values


def test_bits_layout_follows_logical_order():
    x = torch.tensor([[1, 0, 0], [0, 0, 2], [0, 3, 0]], dtype=torch.int8)  # elements 0, 5, 7
    # bits=4, W = 5: element 5 is the high nibble of byte 0, element 7 that of byte 2
    assert pack_bits_reference(x, 4).tolist() == [0x21, 0x00, 0x30, 0x00, 0x00]
    assert pack_bits_reference(x.t().contiguous().t(), 4).tolist() == [0x21, 0x00, 0x30, 0x00, 0x00]
    # x.t() holds 3 at element 5 and 2 at element 7: the logical order, not the memory order
    assert pack_bits_reference(x.t(), 4).tolist() == [0x31, 0x00, 0x20, 0x00, 0x00]


@pytest.mark.parametrize("bits", BIT_WIDTHS)
def test_every_byte_value_survives_unpack_pack_at_every_width(bits):
    every = torch.arange(256, dtype=torch.uint8)
    for dtype, lo in [(torch.uint8, 0), (torch.int64, -7), (torch.int8, 100)]:
        x = unpack_bits_reference(every, bits, lo, (256 * 8 // bits,), dtype)
        assert torch.equal(pack_bits_reference(x, bits, lo), every), dtype


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("make", NONCONTIGUOUS.values(), ids=NONCONTIGUOUS.keys())
def test_noncontiguous_bits(make, bits):
    x = make(_ints((33, 40), bits, -1, torch.int64))
    assert not x.is_contiguous()
    packed = pack_bits_reference(x, bits, -1)
    assert torch.equal(packed, pack_bits_reference(x.contiguous(), bits, -1))
    out = unpack_bits_reference(packed, bits, -1, x.shape, x.dtype, x.stride())
    assert (out.shape, out.stride(), out.dtype) == (x.shape, x.stride(), x.dtype)
    assert torch.equal(out, x)


@pytest.mark.parametrize(
    "shape,stride",
    [((3, 5), (1, 3)), ((2, 3, 4), (1, 2, 6)), ((5, 6), (12, 2))],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32], ids=str)
def test_unpack_bits_honours_stride(shape, stride, dtype):
    x = _ints(shape, 2, 1, dtype)
    out = unpack_bits_reference(pack_bits_reference(x, 2, 1), 2, 1, shape, dtype, stride)
    assert out.stride() == stride and out.dtype == dtype
    assert torch.equal(out, x)


def test_unpack_bits_reads_planes_of_packed_numel():
    # more bytes than needed: the planes are packed.numel() wide, so the values move
    x = torch.tensor([1, 2, 3], dtype=torch.int8)
    wide = torch.cat([pack_bits_reference(x, 2), torch.zeros(1, dtype=torch.uint8)])
    assert unpack_bits_reference(wide, 2, 0, (3,), torch.int8).tolist() == [1, 0, 2]


@pytest.mark.parametrize(
    "lo,hi,bits",
    [
        (0, 0, 1),
        (0, 1, 1),
        (0, 2, 2),
        (0, 3, 2),
        (0, 4, 4),
        (0, 8, 4),  # 3x3 max-pool window offsets
        (0, 15, 4),
        (0, 16, 8),
        (-128, 127, 8),
        (5, 20, 4),
        (-3, 0, 2),
        (0, 256, None),
        (-1, 255, None),
    ],
)
def test_bits_for_range(lo, hi, bits):
    assert packed_bits(lo, hi) == bits
    if bits is not None:  # and the values of the range survive at that width
        x = torch.arange(lo, hi + 1, dtype=torch.int64)
        assert torch.equal(
            unpack_bits_reference(pack_bits_reference(x, bits, lo), bits, lo, x.shape, x.dtype), x
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.complex64], ids=str)
def test_pack_bits_rejects_float(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        pack_bits_reference(torch.ones(16, dtype=dtype), 4)


@pytest.mark.parametrize("bits", [0, 3, 5, 16])
def test_bits_rejects_widths_that_do_not_tile_a_byte(bits):
    x = torch.zeros(16, dtype=torch.int8)
    with pytest.raises(ValueError, match=f"got {bits}"):
        pack_bits_reference(x, bits)
    with pytest.raises(ValueError, match=f"got {bits}"):
        unpack_bits_reference(torch.zeros(8, dtype=torch.uint8), bits, 0, (16,), torch.int8)
    with pytest.raises(ValueError, match=f"got {bits}"):
        packed_bits_numel(16, bits)


@pytest.mark.parametrize("bits,n", [(2, 5), (4, 3), (8, 2), (1, 9)])
def test_unpack_bits_rejects_too_few_bytes(bits, n):
    packed = torch.zeros(packed_bits_numel(n, bits) - 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"cannot hold {n} {bits}-bit values"):
        unpack_bits_reference(packed, bits, 0, (n,), torch.int8)


def test_bits_reference_rejects_float_output_and_bool_offset():
    with pytest.raises(TypeError, match="float32"):
        unpack_bits_reference(torch.zeros(4, dtype=torch.uint8), 4, 0, (4,), torch.float32)
    with pytest.raises(ValueError, match="lo=0"):
        pack_bits_reference(torch.ones(4, dtype=torch.bool), 1, 1)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float32], ids=str)
def test_unpack_bits_rejects_non_uint8(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        unpack_bits_reference(torch.ones(2, dtype=dtype), 4, 0, (4,), torch.int8)


def test_planner_widths_are_the_kernels_widths():
    assert PACKED_WIDTHS == BIT_WIDTHS
