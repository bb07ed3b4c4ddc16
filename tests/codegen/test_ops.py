"""The torch.library ops of codegen/ops.py: opcheck, fake vs real metadata, random streams and
torch.compile (aot_eager and Inductor, fullgraph).

``quantize_pack`` is stochastic: with ``stream=-1`` it rounds to nearest and is deterministic,
which is what opcheck and the eager-vs-compiled comparisons use.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import fxlowbit  # noqa: F401  (registers the fxlowbit:: ops)
from fxlowbit.codegen import rng
from fxlowbit.codegen.kernels.bitmask import pack_bits_reference
from fxlowbit.codegen.kernels.quant import hash_uniform, quantize_pack_reference

ops = torch.ops.fxlowbit
NEAREST = -1


def _rand(shape, dtype=torch.float32, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 0.3).to(dtype)


def _quant_samples():
    """(x, bits, group_size) covering odd sizes, non-contiguous inputs and every dtype."""
    return [
        (_rand((257,)), 2, 64),
        (_rand((3, 5, 7), torch.bfloat16), 4, 8),
        (_rand((40, 33), torch.float16).t(), 8, 256),
        (_rand((1,)), 4, 256),
    ]


def _dequant_samples():
    """Arguments of dequantize_unpack, including a transposed output stride."""
    out = []
    for x, bits, g in _quant_samples():
        codes, meta = ops.quantize_pack(x, bits, g, NEAREST)
        out.append((codes, meta, bits, g, list(x.shape), list(x.stride()), x.dtype))
    return out


def _mask_samples():
    return [_rand((257,)) > 0, _rand((3, 5, 7)) > 0, (_rand((40, 33)) > 0).t(), _rand((1,)) > 0]


def _unpack_mask_samples():
    return [(ops.pack_mask(m), list(m.shape), list(m.stride())) for m in _mask_samples()]


def _ints(x, lo, hi, dtype):
    """``x`` mapped onto the integers ``[lo, hi]`` exactly (``x * 2`` and ``floor`` are exact)."""
    return (x * 2).floor().clamp(lo, hi).to(dtype)


def _bits_samples():
    """(x, bits, lo): every width, odd sizes, non-contiguous inputs, negative and positive lo."""
    return [
        (_ints(_rand((257,)), 0, 8, torch.int8), 4, 0),  # 3x3 max-pool window offsets
        (_ints(_rand((3, 5, 7)), -2, 1, torch.int64), 2, -2),
        (_ints(_rand((40, 33)), -100, 100, torch.int32).t(), 8, -100),
        (_rand((1,)) > 0, 1, 0),
        (_ints(_rand((9,)), 3, 18, torch.uint8), 4, 3),
    ]


def _unpack_bits_samples():
    return [
        (ops.pack_bits(x, bits, lo), bits, lo, list(x.shape), list(x.stride()), x.dtype)
        for x, bits, lo in _bits_samples()
    ]


# ---------------------------------------------------------------- opcheck


@pytest.mark.parametrize("i", range(4))
def test_opcheck_quantize_pack(i):
    x, bits, g = _quant_samples()[i]
    torch.library.opcheck(ops.quantize_pack.default, (x, bits, g, NEAREST))


def test_opcheck_quantize_pack_stochastic_stream():
    # A live stream gives fresh noise on each call, so only the checks that do not compare two
    # runs' outputs apply.
    x, bits, g = _quant_samples()[0]
    stream = rng.new_stream(0)
    torch.library.opcheck(
        ops.quantize_pack.default, (x, bits, g, stream), test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.parametrize("i", range(4))
def test_opcheck_dequantize_unpack(i):
    torch.library.opcheck(ops.dequantize_unpack.default, _dequant_samples()[i])


@pytest.mark.parametrize("i", range(4))
def test_opcheck_pack_mask(i):
    torch.library.opcheck(ops.pack_mask.default, (_mask_samples()[i],))


@pytest.mark.parametrize("i", range(4))
def test_opcheck_unpack_mask(i):
    torch.library.opcheck(ops.unpack_mask.default, _unpack_mask_samples()[i])


@pytest.mark.parametrize("i", range(5))
def test_opcheck_pack_bits(i):
    torch.library.opcheck(ops.pack_bits.default, _bits_samples()[i])


@pytest.mark.parametrize("i", range(5))
def test_opcheck_unpack_bits(i):
    torch.library.opcheck(ops.unpack_bits.default, _unpack_bits_samples()[i])


# ---------------------------------------------------------------- fake vs real metadata


def _meta(t):
    # Strides of a tensor with no elements are insignificant (torch's own fake-tensor checks skip
    # them too), and the real kernels return contiguous empties whatever stride is asked for.
    return t.shape, t.dtype, t.stride() if t.numel() else None


def _fake_vs_real(op, args):
    real = op(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert [_meta(t) for t in fake] == [_meta(t) for t in real]


EMPTY = (torch.empty(0, 4), 8, 64)  # bits 8 only: 2/4-bit empties hit the bug in test_quant.py


@pytest.mark.parametrize("i", range(5))
def test_fake_matches_real(i):
    x, bits, g = [*_quant_samples(), EMPTY][i]
    _fake_vs_real(ops.quantize_pack, (x, bits, g, NEAREST))
    codes, meta = ops.quantize_pack(x, bits, g, NEAREST)
    for dtype in (torch.float32, torch.bfloat16):
        _fake_vs_real(ops.dequantize_unpack, (codes, meta, bits, g, list(x.shape), list(x.stride()), dtype))
    m = x > 0
    _fake_vs_real(ops.pack_mask, (m,))
    _fake_vs_real(ops.unpack_mask, (ops.pack_mask(m), list(m.shape), list(m.stride())))
    for bits, lo, dtype in [(2, -2, torch.int8), (8, 0, torch.int64), (1, 0, torch.bool)]:
        n = x > 0 if dtype == torch.bool else _ints(x, lo, lo + 1, dtype)
        _fake_vs_real(ops.pack_bits, (n, bits, lo))
        args = (ops.pack_bits(n, bits, lo), bits, lo, list(n.shape), list(n.stride()), dtype)
        _fake_vs_real(ops.unpack_bits, args)


def test_fake_vs_real_check_can_fail():
    def wrong_fake_strides(x):  # a "fake impl" returning row-major where the real one is not
        y = x.t().contiguous()
        return y if isinstance(x, FakeTensor) else y.t().contiguous().t()

    with pytest.raises(AssertionError):
        _fake_vs_real(wrong_fake_strides, (torch.ones(3, 4),))


# ---------------------------------------------------------------- values and random streams


def test_ops_match_references():
    x = _rand((5, 77))
    codes, meta = ops.quantize_pack(x, 4, 64, NEAREST)
    rc, rm = quantize_pack_reference(x, 4, 64, None)
    assert torch.equal(codes, rc) and torch.equal(meta, rm)
    # a stream seeded s draws one seed from a CPU generator seeded s; the noise hashes it
    codes, meta = ops.quantize_pack(x, 4, 64, rng.new_stream(11))
    seed = torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(11), dtype=torch.int64)
    rc, rm = quantize_pack_reference(x, 4, 64, hash_uniform(seed, 7, 64))
    assert torch.equal(codes, rc) and torch.equal(meta, rm)
    m = x > 0
    assert torch.equal(ops.unpack_mask(ops.pack_mask(m), [5, 77], [77, 1]), m)
    n = _ints(x, -3, 4, torch.int64)
    assert torch.equal(ops.pack_bits(n, 4, -3), pack_bits_reference(n, 4, -3))
    assert torch.equal(ops.unpack_bits(ops.pack_bits(n, 4, -3), 4, -3, [5, 77], [1, 5], torch.int64), n)


def test_nearest_stream_is_deterministic():
    x = _rand((1000,))
    a = ops.quantize_pack(x, 2, 64, NEAREST)
    b = ops.quantize_pack(x, 2, 64, NEAREST)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_streams_same_seed_same_codes_different_seed_different_codes(bits):
    x = _rand((1000,))
    same1, same2, other = rng.new_stream(123), rng.new_stream(123), rng.new_stream(124)
    assert len({same1, same2, other}) == 3
    c1, m1 = ops.quantize_pack(x, bits, 64, same1)
    c2, m2 = ops.quantize_pack(x, bits, 64, same2)
    c3, _ = ops.quantize_pack(x, bits, 64, other)
    assert torch.equal(c1, c2) and torch.equal(m1, m2)
    assert not torch.equal(c1, c3)


def test_successive_calls_on_one_stream_draw_fresh_noise():
    x = _rand((1000,))
    stream = rng.new_stream(7)
    first = [ops.quantize_pack(x, 4, 64, stream)[0] for _ in range(3)]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    # ... and the sequence replays on a fresh stream with the same seed
    replay = rng.new_stream(7)
    assert all(torch.equal(c, ops.quantize_pack(x, 4, 64, replay)[0]) for c in first)


def test_unknown_stream_raises():
    with pytest.raises(KeyError, match="unknown random stream"):
        ops.quantize_pack(_rand((64,)), 4, 64, 10**9)


def test_ops_raise_on_bad_arguments():
    x = _rand((64,))
    with pytest.raises(ValueError, match="got 3"):
        ops.quantize_pack(x, 3, 64, NEAREST)
    with pytest.raises(ValueError, match="got 12"):
        ops.quantize_pack(x, 4, 12, NEAREST)
    with pytest.raises(TypeError, match="float32"):
        ops.pack_mask(x)
    with pytest.raises(TypeError, match="float32"):
        ops.pack_bits(x, 4, 0)
    with pytest.raises(ValueError, match="got 3"):
        ops.pack_bits(x.int(), 3, 0)


# ---------------------------------------------------------------- torch.compile


def _roundtrip(x):
    codes, meta = ops.quantize_pack(x * 2, 4, 64, NEAREST)  # x * 2 is exact: same in any backend
    y = ops.dequantize_unpack(codes, meta, 4, 64, x.shape, x.stride(), x.dtype)
    m = x > 0
    mm = ops.unpack_mask(ops.pack_mask(m), m.shape, m.stride())
    n = _ints(x, -2, 1, torch.int8)
    nn = ops.unpack_bits(ops.pack_bits(n, 2, -2), 2, -2, n.shape, n.stride(), n.dtype)
    return y, mm, nn, codes, meta


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_fullgraph_and_matches_eager(backend):
    x = _rand((37, 19)).t()  # non-contiguous on purpose: output strides must follow x
    expected = _roundtrip(x)
    got = torch.compile(_roundtrip, backend=backend, fullgraph=True)(x)
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape and g.stride() == e.stride()
        assert torch.equal(g, e)


def test_bits_compile_with_dynamic_shapes():
    # the fakes size the packed bytes and the restored tensor from symbolic sizes
    def f(x):
        n = _ints(x, 0, 8, torch.int64)
        return n, ops.unpack_bits(ops.pack_bits(n, 4, 0), 4, 0, n.shape, n.stride(), n.dtype)

    cf = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in [(5, 7), (9, 3), (1, 1)]:
        n, nn = cf(_rand(shape).t())
        assert nn.stride() == n.stride() and torch.equal(nn, n)


def test_compiled_stream_replays_eager_stream():
    x = _rand((300,))
    eager, compiled = rng.new_stream(5), rng.new_stream(5)

    def f(x, stream):
        return ops.quantize_pack(x, 2, 64, stream)

    cf = torch.compile(lambda x: f(x, compiled), backend="aot_eager", fullgraph=True)
    for _ in range(2):  # also the second call: the compiled graph advances its stream
        (ce, me), (cc, mc) = f(x, eager), cf(x)
        assert torch.equal(ce, cc) and torch.equal(me, mc)
