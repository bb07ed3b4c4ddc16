"""The Triton kernels of codegen/kernels/*_triton.py against their pure-torch references, bit for bit.

Without a GPU they run in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``),
which is slow, so the sizes stay small; with one they run on CUDA against the reference computed on
CUDA. Covered: bits 2/4/8, group sizes 8 and 256, odd and 2-D shapes, non-contiguous inputs and
output strides, fp32/bf16/fp16, NaN/+Inf/-Inf, constant and range-overflowing groups, empty tensors,
masks, integer fields of 1/2/4/8 bits (every integer dtype, with ``lo``, values that wrap), the
``fxlowbit::`` ops with ``FORCE_TRITON`` against the ops without, and argument errors.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

import fxlowbit.codegen.ops as ops_module
from fxlowbit.codegen import rng
from fxlowbit.codegen.kernels import bitmask_triton, quant_triton
from fxlowbit.codegen.kernels.bitmask import (
    BIT_WIDTHS,
    pack_bits_reference,
    pack_mask_reference,
    unpack_bits_reference,
    unpack_mask_reference,
)
from fxlowbit.codegen.kernels.bitmask_triton import (
    pack_bits_triton,
    pack_mask_triton,
    unpack_bits_triton,
    unpack_mask_triton,
)
from fxlowbit.codegen.kernels.quant import (
    BITS,
    dequantize_unpack_reference,
    quantize_pack_traceable,
)
from fxlowbit.codegen.kernels.quant_triton import dequantize_unpack_triton, quantize_pack_triton

from ._views import NONCONTIGUOUS
from .test_quant import SPECIAL_GROUPS

# numpy, under the interpreter, warns where inf - inf makes NaN and 3e38 - -3e38 makes inf: both meant
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUP_SIZES = (8, 256)
SHAPES = ((1,), (255,), (257,), (4097,), (3, 257))
ops = torch.ops.fxlowbit
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # bit views by item size


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed)) * 3 + 0.5).to(dtype).to(DEVICE)


def _seed(s: int = 0x2F3C_1234_89AB_CDEF) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.int64, device=DEVICE)


def _assert_same_bits(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal dtype, shape, strides and bit patterns (-0.0 != 0.0); NaNs compare by position only,
    since their payloads depend on the device's conversion instructions."""
    assert (got.dtype, got.shape, got.stride()) == (ref.dtype, ref.shape, ref.stride())
    nan = torch.isnan(got)
    assert torch.equal(nan, torch.isnan(ref)), "NaNs in different places"
    bits_got, bits_ref = got.view(_INT[got.element_size()]), ref.view(_INT[ref.element_size()])
    assert torch.equal(bits_got[~nan], bits_ref[~nan])


def _check_quant(x: torch.Tensor, bits: int, group_size: int, seed=None) -> None:
    """Triton pack and unpack equal the references, to ``x``'s dtype, shape and strides."""
    seed = _seed() if seed is None else seed
    codes, meta = quantize_pack_triton(x, bits, group_size, seed)
    ref_codes, ref_meta = quantize_pack_traceable(x, seed, bits, group_size)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(meta.view(torch.int32), ref_meta.view(torch.int32))  # (lo, flagged scale) bits
    args = (bits, group_size, x.shape)
    got = dequantize_unpack_triton(codes, meta, *args, x.stride(), x.dtype)
    _assert_same_bits(got, dequantize_unpack_reference(codes, meta, *args, x.dtype, x.stride()))


# ---------------------------------------------------------------- quantize / dequantize


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_quant_kernels_match_reference(bits, dtype, group_size, shape):
    _check_quant(_rand(shape, dtype), bits, group_size)


def _special_input(dtype) -> torch.Tensor:
    """Groups of 8: an ordinary one, every special kind of test_quant.py, a constant, a range beyond
    fp32's max (fp32 only: no other dtype holds it), and a tail of three (-Inf, 1, -Inf)."""
    rows = [[0.5, -1.5, 2.0, 3.25, -4.0, 1.0, 0.0, 2.5], *(g for g, _ in SPECIAL_GROUPS), [1 / 3] * 8]
    if dtype == torch.float32:
        rows.append([-3e38, 0.0, 3e38, 1.0, -1.0, 2.0, 5.0, 7.0])
    flat = [v for row in rows for v in row] + [-math.inf, 1.0, -math.inf]
    return torch.tensor(flat).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_quant_kernels_special_and_constant_groups(bits, dtype):
    _check_quant(_special_input(dtype), bits, 8)
    x = _rand((5 * 256 + 3,), dtype, seed=1)  # groups of 256:
    x[5] = math.nan  # one NaN
    x[300], x[301] = math.inf, -math.inf  # mixed kinds
    x[512:768] = math.nan  # all NaN
    x[768:1024] = math.inf  # all +Inf
    x[1024:1280] = 1 / 3  # constant
    x[1280], x[1282] = -math.inf, -math.inf  # tail of three, padded with -Inf
    _check_quant(x, bits, 256)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_quant_kernels_at_the_dtype_max_with_every_kind_in_a_group(bits, dtype):
    """Groups spanning [-max, max] of the dtype, some holding +Inf, -Inf and NaN together (three
    top codes: at 2 bits one level is left for the finite values)."""
    top = torch.finfo(dtype).max
    x = (torch.rand(6, 256, generator=_gen(6)) * 2 - 1) * top
    x[:, 0], x[:, 1] = top, -top
    x = x.to(dtype)
    x[1, 5], x[1, 6], x[1, 7] = math.inf, -math.inf, math.nan
    x[3, 100], x[3, 200] = -math.inf, math.nan
    _check_quant(x.to(DEVICE), bits, 256)


@pytest.mark.parametrize("group_size", [24, 200])
@pytest.mark.parametrize("bits", BITS)
def test_quant_kernels_group_width_not_a_power_of_two(bits, group_size):
    # W = G*b/8 bytes per group is padded to a power-of-two tile width: the extra lanes must
    # neither join a group's reductions nor be stored
    x = _rand((3, 257), torch.bfloat16)
    x[1, 7], x[2, 100:103] = math.nan, -math.inf
    _check_quant(x, bits, group_size)


@pytest.mark.parametrize("make", NONCONTIGUOUS.values(), ids=NONCONTIGUOUS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quant_kernels_noncontiguous_input_and_output_strides(dtype, make):
    x = make(_rand((33, 40), dtype))
    assert not x.is_contiguous()
    _check_quant(x, 2, 8)  # also decodes straight into x's strides


@pytest.mark.parametrize("shape", [(0,), (0, 5)], ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_quant_kernels_empty(bits, shape):
    x = torch.empty(shape, device=DEVICE)
    codes, meta = quantize_pack_triton(x, bits, 256, _seed())
    assert codes.shape == (0, 256 * bits // 8) and codes.dtype == torch.uint8
    assert meta.shape == (0, 2) and meta.dtype == torch.float32
    y = dequantize_unpack_triton(codes, meta, bits, 256, shape, x.stride(), torch.bfloat16)
    assert y.shape == shape and y.dtype == torch.bfloat16


def test_bit_exact_comparison_can_fail():
    x = _rand((300,))
    codes, meta = quantize_pack_triton(x, 2, 8, _seed(1))
    assert not torch.equal(codes, quantize_pack_traceable(x, _seed(2), 2, 8)[0])  # another seed
    assert not torch.equal(codes, quantize_pack_traceable(x, _seed(1 << 32 | 1), 2, 8)[0])  # high half
    ref = dequantize_unpack_reference(codes, meta, 2, 8, x.shape, torch.float32)
    meta[0, 1] = torch.nextafter(meta[0, 1], meta.new_tensor(math.inf))  # one ulp off one scale
    with pytest.raises(AssertionError):
        _assert_same_bits(dequantize_unpack_triton(codes, meta, 2, 8, x.shape, None, torch.float32), ref)
    with pytest.raises(AssertionError):
        _assert_same_bits(torch.zeros(1, device=DEVICE), -torch.zeros(1, device=DEVICE))


# ---------------------------------------------------------------- masks


def _mask(shape, seed=0, p=0.5) -> torch.Tensor:
    return (torch.rand(shape, generator=_gen(seed)) < p).to(DEVICE)


@pytest.mark.parametrize("p", [0.3, 1.0])
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (257,), (4097,), (3, 5, 7), (0,), (0, 4)], ids=str)
def test_mask_kernels_match_reference(shape, p):
    m = _mask(shape, p=p)
    packed = pack_mask_triton(m)
    assert torch.equal(packed, pack_mask_reference(m))
    assert torch.equal(unpack_mask_triton(packed, shape), m)
    # unpacking wider planes than needed reads them as the reference does
    wide = torch.cat([packed, packed.new_full((3,), 0xFF)])
    assert torch.equal(unpack_mask_triton(wide, shape), unpack_mask_reference(wide, shape))


@pytest.mark.parametrize(
    "make", [*NONCONTIGUOUS.values(), lambda b: b[:1].expand(5, 40)], ids=[*NONCONTIGUOUS, "expanded"]
)
def test_mask_kernels_noncontiguous(make):
    m = make(_mask((33, 40)))
    packed = pack_mask_triton(m)
    assert torch.equal(packed, pack_mask_reference(m))
    if 0 not in m.stride():  # an expanded layout cannot be materialised with its own strides
        out = unpack_mask_triton(packed, m.shape, m.stride())
        assert out.stride() == m.stride() and torch.equal(out, m)


def test_mask_comparison_can_fail():
    m = _mask((9,))
    flipped = m.clone()
    flipped[8] = ~flipped[8]
    assert not torch.equal(pack_mask_triton(flipped), pack_mask_reference(m))


# ---------------------------------------------------------------- integer fields


def _ints(shape, bits, lo, dtype, seed=0) -> torch.Tensor:
    """Values of ``[lo, lo + 2**bits)`` clipped to what ``dtype`` holds (bool: a mask)."""
    if dtype == torch.bool:
        return _mask(shape, seed)
    info = torch.iinfo(dtype)
    a, b = max(lo, info.min), min(lo + (1 << bits) - 1, info.max)
    return torch.randint(a, b + 1, shape, generator=_gen(seed), dtype=torch.int64).to(dtype).to(DEVICE)


def _check_bits(x: torch.Tensor, bits: int, lo: int) -> None:
    """Triton pack and unpack equal the references, to ``x``'s dtype, shape and strides."""
    packed = pack_bits_triton(x, bits, lo)
    assert torch.equal(packed, pack_bits_reference(x, bits, lo))
    out = unpack_bits_triton(packed, bits, lo, x.shape, x.dtype, x.stride())
    assert (out.dtype, out.shape, out.stride()) == (x.dtype, x.shape, x.stride())
    assert torch.equal(out, x)


# every integer dtype at every width (bool at 1 bit), each with its own lo: zero, positive, negative
_LO = {torch.int8: -5, torch.uint8: 3, torch.int32: 0, torch.int64: -1000, torch.bool: 0}
BITS_CASES = [(b, d, lo) for b in BIT_WIDTHS for d, lo in _LO.items() if d != torch.bool or b == 1]


@pytest.mark.parametrize("bits,dtype,lo", BITS_CASES, ids=str)
def test_bits_kernels_match_reference(bits, dtype, lo):
    for shape in [(1,), (7,), (257,), (4097,), (3, 5, 7), (0,), (0, 4)]:
        _check_bits(_ints(shape, bits, lo, dtype), bits, lo)
    # unpacking wider planes than needed reads them as the reference does
    packed = pack_bits_triton(_ints((9,), bits, lo, dtype), bits, lo)
    wide = torch.cat([packed, packed.new_full((3,), 0xA5)])
    ref = unpack_bits_reference(wide, bits, lo, (9,), dtype)
    assert torch.equal(unpack_bits_triton(wide, bits, lo, (9,), dtype), ref)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("make", NONCONTIGUOUS.values(), ids=NONCONTIGUOUS.keys())
def test_bits_kernels_noncontiguous(make, bits):
    x = make(_ints((33, 40), bits, -1, torch.int64))
    assert not x.is_contiguous()
    _check_bits(x, bits, -1)  # also unpacks straight into x's strides


@pytest.mark.parametrize("bits", BIT_WIDTHS)
def test_bits_kernels_wrap_as_the_reference(bits):
    # values outside [lo, lo + 2**bits) are the caller's error, but the bytes still match
    x = torch.randint(-128, 128, (300,), generator=_gen(1), dtype=torch.int8).to(DEVICE)
    assert torch.equal(pack_bits_triton(x, bits, 3), pack_bits_reference(x, bits, 3))
    assert torch.equal(
        pack_bits_triton(x.long() * 1000, bits, -7), pack_bits_reference(x.long() * 1000, bits, -7)
    )
    # and every byte unpacks as the reference does, into narrow types that wrap and into bool
    every = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    shape = (256 * 8 // bits,)
    for dtype, lo in [(torch.int8, 100), (torch.uint8, -7), (torch.int16, -300), (torch.bool, 0)]:
        got, ref = (
            unpack_bits_triton(every, bits, lo, shape, dtype),
            unpack_bits_reference(every, bits, lo, shape, dtype),
        )
        # compared as bytes: a bool must be stored as 0 or 1, whatever the field held
        assert torch.equal(got.view(_INT[got.element_size()]), ref.view(_INT[ref.element_size()])), dtype


def test_bits_comparison_can_fail():
    x = _ints((9,), 2, 0, torch.int8)
    assert not torch.equal(pack_bits_triton(x, 2, 1), pack_bits_reference(x, 2, 0))  # another lo
    bumped = x.clone()
    bumped[8] = (bumped[8] + 1) % 4
    assert not torch.equal(pack_bits_triton(bumped, 2, 0), pack_bits_reference(x, 2, 0))
    packed = pack_bits_triton(x, 2, 0)
    assert not torch.equal(unpack_bits_triton(packed, 2, -1, x.shape, x.dtype), x)


# ---------------------------------------------------------------- argument errors


def test_launchers_raise_on_bad_arguments():
    x = _rand((64,))
    with pytest.raises(ValueError, match="got 3"):
        quantize_pack_triton(x, 3, 64, _seed())
    with pytest.raises(ValueError, match="got 12"):
        quantize_pack_triton(x, 4, 12, _seed())
    with pytest.raises(TypeError, match="float64"):
        quantize_pack_triton(x.double(), 4, 64, _seed())
    with pytest.raises(TypeError, match="int64 scalar"):
        quantize_pack_triton(x, 4, 64, _seed().int())
    codes, meta = quantize_pack_triton(x, 4, 64, _seed())
    with pytest.raises(ValueError, match="do not hold"):
        dequantize_unpack_triton(codes, meta, 4, 64, (65,), None, torch.float32)  # two groups needed
    with pytest.raises(ValueError, match="do not hold"):
        dequantize_unpack_triton(codes, meta, 2, 64, (64,), None, torch.float32)  # 2-bit rows are 16 B
    with pytest.raises(TypeError, match="float64"):
        dequantize_unpack_triton(codes, meta, 4, 64, (64,), None, torch.float64)
    with pytest.raises(TypeError, match="float32"):
        pack_mask_triton(x)
    with pytest.raises(TypeError, match="bool"):
        unpack_mask_triton(x > 0, (8,))
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_mask_triton(torch.zeros(1, dtype=torch.uint8, device=DEVICE), (9,))
    ints = torch.zeros(9, dtype=torch.int8, device=DEVICE)
    with pytest.raises(TypeError, match="float32"):
        pack_bits_triton(x, 4)
    with pytest.raises(ValueError, match="got 3"):
        pack_bits_triton(ints, 3)
    with pytest.raises(ValueError, match="lo=2"):
        pack_bits_triton(ints > 0, 1, 2)
    packed = pack_bits_triton(ints, 4)
    with pytest.raises(ValueError, match="got 3"):
        unpack_bits_triton(packed, 3, 0, (9,), torch.int8)
    with pytest.raises(TypeError, match="int8"):
        unpack_bits_triton(ints, 4, 0, (9,), torch.int8)
    with pytest.raises(TypeError, match="float32"):
        unpack_bits_triton(packed, 4, 0, (9,), torch.float32)
    with pytest.raises(ValueError, match="5 bytes cannot hold 4-bit fields of shape \\(11,\\)"):
        unpack_bits_triton(packed, 4, 0, (11,), torch.int8)
    with pytest.raises(ValueError, match="cannot hold 2-bit"):
        unpack_bits_triton(packed[:2], 2, 0, (9,), torch.int8)


# ---------------------------------------------------------------- the fxlowbit:: ops


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setattr(ops_module, "FORCE_TRITON", True)


def _all_ops(x: torch.Tensor, stream: int):
    codes, meta = ops.quantize_pack(x, 4, 64, stream)
    y = ops.dequantize_unpack(codes, meta, 4, 64, x.shape, x.stride(), x.dtype)
    m = x > 0.5
    mm = ops.unpack_mask(ops.pack_mask(m), m.shape, m.stride())
    i = (x > 0.5).to(torch.int8) - (x < -0.5).to(torch.int8)  # -1, 0, 1 in x's strides
    ii = ops.unpack_bits(ops.pack_bits(i, 2, -1), 2, -1, i.shape, i.stride(), i.dtype)
    return codes, meta, y, mm, ii


def _spy_on_launchers(monkeypatch) -> list[str]:
    """The names of the Triton launchers the ops call from now on, in call order."""
    calls = []

    def spy(name, launch):
        def call(*args):
            calls.append(name)
            return launch(*args)

        return call

    for module in (quant_triton, bitmask_triton):
        for name in module.__all__:
            if name.endswith("_triton"):  # the launchers, not their helpers (launch_config)
                monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)  # fp64: reference path
def test_ops_with_force_triton_match_ops_without(monkeypatch, dtype):
    # On CPU this compares the references with the interpreted kernels; on CUDA the ops always
    # run the kernels, and the tests above compare those with the references.
    x = _rand((37, 19), dtype).t()  # non-contiguous: outputs follow its strides
    x[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    expected = _all_ops(x, rng.new_stream(3))
    calls = _spy_on_launchers(monkeypatch)
    monkeypatch.setattr(ops_module, "FORCE_TRITON", True)
    got = _all_ops(x, rng.new_stream(3))
    for g, e in zip(got, expected, strict=True):
        _assert_same_bits(g, e)
    quant = ["quantize_pack_triton", "dequantize_unpack_triton"] if dtype != torch.float64 else []
    assert calls == [
        *quant,
        "pack_mask_triton",
        "unpack_mask_triton",
        "pack_bits_triton",
        "unpack_bits_triton",
    ]


def test_ops_with_force_triton_compile(monkeypatch, force_triton):
    x = _rand((40, 33)).t()
    expected = _all_ops(x, rng.new_stream(9))
    stream = rng.new_stream(9)
    calls = _spy_on_launchers(monkeypatch)
    got = torch.compile(lambda x: _all_ops(x, stream), backend="aot_eager", fullgraph=True)(x)
    assert len(calls) == 6  # the compiled graph's ops ran the kernels (tracing runs the fakes)
    for g, e in zip(got, expected, strict=True):
        _assert_same_bits(g, e)


def test_ops_with_force_triton_raise_on_bad_arguments(force_triton):
    x = _rand((64,))
    with pytest.raises(ValueError, match="got 3"):
        ops.quantize_pack(x, 3, 64, rng.new_stream(0))
    with pytest.raises(TypeError, match="float32"):
        ops.pack_mask(x)
    with pytest.raises(TypeError, match="float32"):
        ops.pack_bits(x, 4, 0)
    with pytest.raises(ValueError, match="got 3"):
        ops.pack_bits(x.int(), 3, 0)


def test_env_var_sets_force_triton():
    code = "import fxlowbit.codegen.ops as o; print(o.FORCE_TRITON)"
    env = {**os.environ, "FXLOWBIT_TRITON": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_cuda_kernels_match_cuda_reference_at_size(bits, dtype):
    """Large tensors on CUDA (many programs, full tiles) against the reference on CUDA, bit for
    bit. No tolerance is needed: the kernels are built without FMA contraction and divide with
    div_rn, so they round each step as torch's separate eager kernels do (exact on an H100 with
    Triton 3.6). With contraction, ``(g*half - lo*half) * inv + u`` would round once instead of
    twice and move the odd code by one level; a failure here of that kind means a Triton version
    ignores ``enable_fp_fusion=False``."""
    x = torch.randn(1 << 22, device="cuda").mul_(3).to(dtype)
    x[12345] = math.nan
    x[1 << 20 : (1 << 20) + 256] = math.inf
    for group_size in GROUP_SIZES:
        _check_quant(x, bits, group_size)
        _check_quant(x[: 7 * 599_000].view(-1, 7).t(), bits, group_size)
    m = x > 0
    assert torch.equal(pack_mask_triton(m), pack_mask_reference(m))
    assert torch.equal(unpack_mask_triton(pack_mask_reference(m), m.shape), m)
