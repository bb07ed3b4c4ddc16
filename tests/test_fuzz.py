"""Property-based tests (hypothesis): the quantizer and the mask packer over random shapes, dtypes
and values, and random small graphs of supported ops compiled with lowbit against eager.

Quantizer (codegen/kernels/quant.py), for any input of 0-2000 elements in 1-3 dims, fp32/bf16/fp16,
values of any magnitude (subnormal to near the dtype's max) mixed with NaN/+-Inf, 2/4/8 bits,
stochastic or nearest rounding, contiguous or not: the decode has the input's shape and dtype;
every finite value decodes finite and within one step ``(hi - lo) / levels`` of its group's finite
range (half a step rounding to nearest), plus fp32 / dtype rounding slack; NaN decodes NaN, +-Inf
decode as themselves unless their group mixes kinds (then NaN, as documented). Known limitation
found here: a group whose step is below fp32's smallest normal (range < levels * 1.2e-38) only stays
within [lo, hi] (the scale's reciprocal overflows; absolute error < 3e-36). Masks (bitmask.py): the
round trip is exact, the byte count is ceil(n / 8) and the padding bits are zero.

Random graphs: chains of linear, relu/gelu/silu/tanh, residual add, gating mul, layer_norm, softmax
and dropout(p=0), compiled with ``bits=8, min_bytes=0`` (every saved float compressed) and the eager
inner compiler. Loss within 1e-5 relative of eager (only the backward is lossy); gradients (all
parameters and the input, concatenated) >= 20 dB SQNR against eager. Measured over the slow
profile's 300 graphs (derandomized): median 45 dB, minimum 24.9 dB; the low tail is chains of
several layer_norms at width 16-48 and batch 8-33 (little averaging; each norm's backward rescales
the noise). 20 dB keeps ~5 dB under that minimum and is far above a mis-decoded tensor or a lost
mask (<= 0 dB); per-tensor floors and unbiasedness are tests/codegen/test_quant.py's job.

Kernels: the traceable forms and the Triton kernels (in the interpreter on CPU) must give the
reference's codes and scales bit for bit and the same decoded values.

Budgets: ``max_examples`` 25 (quantizer, masks) and 8 (graphs) by default, derandomized so CI
sees the same cases every run; the ``slow`` twins run 2000 / 300 (about 20 s / 60 s here).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fxlowbit  # noqa: F401  (registers the backend)
from fxlowbit.codegen.kernels.bitmask import (
    pack_mask_reference,
    pack_mask_traceable,
    packed_mask_numel,
    unpack_mask_reference,
)
from fxlowbit.codegen.kernels.quant import (
    dequantize_unpack_reference,
    dequantize_unpack_traceable,
    hash_uniform,
    quantize_pack_reference,
    quantize_pack_traceable,
)
from fxlowbit.examples import sqnr_db

try:  # optional on CPU; tests/conftest.py runs the kernels in the interpreter
    from fxlowbit.codegen.kernels import bitmask_triton, quant_triton
except ImportError:
    bitmask_triton = quant_triton = None


def _settings(n: int):
    return settings(
        max_examples=n, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
    )


FAST, SLOW = _settings(25), _settings(2000)
# the Triton interpreter computes in numpy, which warns on the huge and non-finite values drawn here
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SPECIALS = (math.nan, math.inf, -math.inf, 0.0, -0.0)


@st.composite
def shapes(draw) -> list[int]:
    """1-3 dims, 0-2000 elements."""
    shape: list[int] = []
    for _ in range(draw(st.integers(1, 3))):
        shape.append(draw(st.integers(0, 2000 // max(1, math.prod(shape)))))
    return shape


@st.composite
def tensors(draw) -> torch.Tensor:
    """A float tensor: a random distribution at a random magnitude, some specials at random places,
    maybe seen through a non-contiguous view."""
    shape = draw(shapes())
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["normal", "positive", "constant", "wide", "sparse"]))
    exp = draw(st.integers(-45, 38)) if dtype != torch.float16 else draw(st.integers(-24, 4))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "positive":
        x = x.abs()
    elif kind == "constant":
        x = torch.full(shape, 1.5, dtype=torch.float64)
    elif kind == "wide":  # magnitudes spread over many decades within one group
        x = x * 10.0 ** torch.randint(-20, 20, shape, generator=gen)
    elif kind == "sparse":
        x = x * (torch.rand(shape, generator=gen) < 0.1)
    finfo = torch.finfo(dtype)
    x = (x * 10.0**exp).clamp(-finfo.max, finfo.max).to(dtype)  # huge, tiny or subnormal
    flat = x.reshape(-1)
    for _ in range(draw(st.integers(0, 4)) if flat.numel() else 0):
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    if draw(st.booleans()) and x.dim() >= 2:
        x = x.transpose(0, -1)
    return x


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    # x -> (n_groups, G) fp64 in logical order; the padding is masked out by the callers
    flat = x.reshape(-1).double()
    return torch.cat([flat, flat.new_zeros((-flat.numel()) % group_size)]).view(-1, group_size)


def _same(got: tuple, ref: tuple) -> None:
    """codes bit for bit, meta's scale column bit for bit (its sign bit flags special groups), lo and
    the decoded values as numbers: the kernels may differ in the sign of a zero lo and in NaN
    payloads (measured: -0.0 vs 0.0 for a group of signed zeros; bf16 NaN 0xFFFF vs 0x7FC0)."""
    (codes, meta, y), (rcodes, rmeta, ry) = got, ref
    assert torch.equal(codes, rcodes)
    assert torch.equal(meta[:, 1].contiguous().view(torch.int32), rmeta[:, 1].contiguous().view(torch.int32))
    torch.testing.assert_close(meta[:, 0], rmeta[:, 0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(y, ry, rtol=0, atol=0, equal_nan=True)


def _check_quant(x: torch.Tensor, bits: int, group_size: int, stochastic: bool, seed: int) -> None:
    n_groups = -(-x.numel() // group_size)
    noise = hash_uniform(torch.tensor(seed), n_groups, group_size) if stochastic else None
    codes, meta = quantize_pack_reference(x, bits, group_size, noise)
    y = dequantize_unpack_reference(codes, meta, bits, group_size, x.shape, x.dtype)
    assert y.shape == x.shape and y.dtype == x.dtype
    if stochastic:  # the traceable pair (what Inductor fuses) and the Triton kernels: same bits
        c2, m2 = quantize_pack_traceable(x, torch.tensor(seed), bits, group_size)
        y2 = dequantize_unpack_traceable(codes, meta, bits, group_size, list(x.shape), x.dtype)
        _same((c2, m2, y2), (codes, meta, y))
        # The interpreter (CPU, tests/conftest.py) converts bf16 subnormals inexactly even in a bare
        # load-and-cast kernel (measured: 1.5612e-39 -> 7.3468e-40, -2.9387e-39 -> -0.0), so those
        # inputs are left out of the kernel comparison; on a GPU the conversion is a bit shift.
        tiny = (x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)
        if quant_triton is not None and not (x.dtype == torch.bfloat16 and bool(tiny.any())):
            c3, m3 = quant_triton.quantize_pack_triton(x, bits, group_size, torch.tensor(seed))
            y3 = quant_triton.dequantize_unpack_triton(codes, meta, bits, group_size, x.shape, None, x.dtype)
            _same((c3, m3, y3), (codes, meta, y))
    if x.numel() == 0:
        return
    g, d = _groups(x, group_size), _groups(y, group_size)
    valid = (torch.arange(g.numel()) < x.numel()).view(g.shape)
    finite = torch.isfinite(g) & valid
    kinds = (torch.isnan, torch.isposinf, torch.isneginf)
    # each kind of non-finite value a group holds takes one of its top codes
    usable = (2**bits - 1) - sum((kind(g) & valid).any(1, keepdim=True).double() for kind in kinds)
    lo = torch.where(finite, g, math.inf).amin(1, keepdim=True)
    hi = torch.where(finite, g, -math.inf).amax(1, keepdim=True)
    rng = torch.where(finite.any(1, keepdim=True), hi - lo, 0.0)
    step = rng / usable.clamp_min(1.0) * (1.0 if stochastic else 0.5)
    step = torch.where(usable == 0, rng, step)  # 2 bits, all three kinds: finite values decode to lo
    ax = torch.where(finite, g.abs(), 0.0)
    # fp32 arithmetic of lo + q * scale and the final rounding to x.dtype
    slack = 8 * torch.finfo(torch.float32).eps * (ax + rng) + torch.finfo(x.dtype).eps / 2 * (ax + step)
    # Known limitation (found here): a scale below fp32's smallest normal (a group range under
    # levels * 1.2e-38) has a reciprocal that overflows, and the codes saturate; such groups only
    # stay within [lo, hi], i.e. absolute errors below 255 * 1.2e-38 = 3e-36.
    step = torch.where(rng / (2**bits - 1) < torch.finfo(torch.float32).tiny, rng, step)
    # subnormal steps are not representable in fp32; x.dtype's subnormals sit on a fixed grid
    slack = slack + torch.finfo(torch.float32).tiny + torch.finfo(x.dtype).tiny * torch.finfo(x.dtype).eps
    assert bool(torch.isfinite(d[finite]).all()), "a finite value decoded non-finite"
    err = torch.where(finite, (d - g).abs(), 0.0)
    assert bool((err <= step + slack).all()), f"error {(err - step - slack).max():.3g} beyond one step"
    # NaN, +Inf and -Inf come back as they went in, whatever else their group holds
    for kind in kinds:
        assert torch.equal(kind(d) & valid, kind(g) & valid), kind.__name__


quant_cases = dict(
    x=tensors(),
    bits=st.sampled_from([2, 4, 8]),
    group_size=st.sampled_from([8, 64, 256]),
    stochastic=st.booleans(),
    seed=st.integers(0, 2**62),
)


# Found by this test: the top code of a group reaching fp32's max decoded to +Inf (the scale's
# rounding carried lo + L * scale past the max); the decode now clamps to +-fp32 max.
_AT_FP32_MAX = torch.tensor([torch.finfo(torch.float32).max, -3.882e35, 0.0, 1.0, -1e38, 2.0, 5.0, 7.0])


# Every kind of non-finite value in one group (at 2 bits, one level is left for the finite ones),
# and two kinds with a finite range beyond fp32's max (one level above lo)
_ALL_KINDS = torch.tensor([math.inf, -math.inf, math.nan, 1.0, -2.0, 0.5, 3.0, math.inf, 7.0])
_WIDE_TWO_KINDS = torch.tensor([math.nan, -3e38, 3e38, math.inf, 1.0, 2.0, -5.0, 0.0])


@FAST
@example(x=_AT_FP32_MAX, bits=2, group_size=8, stochastic=False, seed=0)
@example(x=_AT_FP32_MAX, bits=4, group_size=8, stochastic=True, seed=3)
@example(x=_ALL_KINDS, bits=2, group_size=8, stochastic=True, seed=1)
@example(x=_ALL_KINDS, bits=4, group_size=8, stochastic=False, seed=0)
@example(x=_WIDE_TWO_KINDS, bits=2, group_size=8, stochastic=True, seed=2)
@example(x=_WIDE_TWO_KINDS, bits=2, group_size=8, stochastic=False, seed=0)
@given(**quant_cases)
def test_quantizer_roundtrip(x, bits, group_size, stochastic, seed):
    _check_quant(x, bits, group_size, stochastic, seed)


@pytest.mark.slow
@SLOW
@given(**quant_cases)
def test_quantizer_roundtrip_many(x, bits, group_size, stochastic, seed):
    _check_quant(x, bits, group_size, stochastic, seed)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda y: y + (y.float().nan_to_num(0, 0, 0).amax() - y.float().nan_to_num(0, 0, 0).amin()) / 100,
        lambda y: y.nan_to_num(0.0),
        lambda y: torch.where(torch.isinf(y), torch.nan, y),
    ],
    ids=["two_steps_off", "nan_lost", "inf_to_nan"],
)
def test_oracle_rejects_a_wrong_decode(monkeypatch, corrupt):
    """The round-trip oracle is not vacuous: a decode off by ~2.5 steps at 8 bits, one that loses
    NaN, or one that turns Inf into NaN fails it."""
    x = torch.randn(300)
    x[[5, 100, 299]] = torch.tensor([math.nan, math.inf, -math.inf])
    reference = dequantize_unpack_reference
    monkeypatch.setattr(
        sys.modules[__name__], "dequantize_unpack_reference", lambda *a: corrupt(reference(*a))
    )
    with pytest.raises(AssertionError):
        _check_quant(x, 8, 256, stochastic=False, seed=0)


# -- masks ----------------------------------------------------------------------------------------
@st.composite
def masks(draw) -> torch.Tensor:
    shape = draw(shapes())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    m = torch.rand(shape, generator=gen) < draw(st.sampled_from([0.0, 0.01, 0.5, 0.99, 1.0]))
    return m.transpose(0, -1) if draw(st.booleans()) and m.dim() >= 2 else m


def _check_mask(m: torch.Tensor) -> None:
    packed = pack_mask_reference(m)
    n = m.numel()
    assert packed.dtype == torch.uint8 and packed.shape == (packed_mask_numel(n),)
    assert torch.equal(pack_mask_traceable(m), packed)
    if bitmask_triton is not None:
        assert torch.equal(bitmask_triton.pack_mask_triton(m), packed)
        assert torch.equal(bitmask_triton.unpack_mask_triton(packed, list(m.shape)), m.contiguous())
    out = unpack_mask_reference(packed, list(m.shape), list(m.stride()))
    assert torch.equal(out, m) and (out.stride() == m.stride() or n == 0)  # empty: strides moot
    width = packed.numel()
    bits = torch.stack([(packed >> j) & 1 for j in range(8)]).reshape(-1)  # plane j = elements j*W..
    assert int(bits[n:].sum()) == 0 and int(bits.sum()) == int(m.sum())  # padding bits are zero
    assert width * 8 - n < 8


@FAST
@given(m=masks())
def test_mask_roundtrip(m):
    _check_mask(m)


@pytest.mark.slow
@SLOW
@given(m=masks())
def test_mask_roundtrip_many(m):
    _check_mask(m)


# -- random graphs --------------------------------------------------------------------------------
OPS = ("linear", "relu", "gelu", "silu", "tanh", "add", "mul", "layer_norm", "softmax", "dropout")
GRAPH_FLOOR_DB = 20.0


class _Chain(torch.nn.Module):
    """in-projection, then ``ops`` in order (add/mul combine with the last linear's output), then a
    head; every linear and layer_norm gets its own parameters."""

    def __init__(self, ops: list[str], width: int):
        super().__init__()
        self.ops = ops
        self.inp, self.head = torch.nn.Linear(24, width), torch.nn.Linear(width, 5)
        self.mods = torch.nn.ModuleList(
            torch.nn.Linear(width, width) if op == "linear" else torch.nn.LayerNorm(width)
            for op in ops
            if op in ("linear", "layer_norm")
        )

    def forward(self, x):
        h = skip = self.inp(x)
        mods = iter(self.mods)
        for op in self.ops:
            if op in ("linear", "layer_norm"):
                h = next(mods)(h)
                skip = h if op == "linear" else skip
            elif op in ("relu", "gelu", "silu", "tanh"):
                h = getattr(F, op)(h)
            elif op == "add":
                h = h + skip
            elif op == "mul":
                h = h * skip
            elif op == "softmax":
                h = F.softmax(h, dim=-1)
            else:
                h = F.dropout(h, 0.0, training=True)
        return self.head(h)


def _check_graph(ops: list[str], width: int, batch: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = _Chain(ops, width)
    x = torch.randn(batch, 24, requires_grad=True)
    target = torch.randn(batch, 5)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        x.grad = None
        loss = F.mse_loss(fn(x), target)
        loss.backward()
        return loss.detach(), torch.cat([x.grad.flatten(), *(p.grad.flatten() for p in model.parameters())])

    ref_loss, ref = grads(model)
    # one rounding draw's SQNR has a heavy lower tail where a chain amplifies a few elements
    # (relu, mul, mul, gelu, layer_norm at width 16: 19.2-29.7 dB over 22 seeds, median 27.7; min-cut
    # replays the chain from the rounded linear output under LayerNorm's exact per-row statistics,
    # so rows of near-constant input multiply its rounding by rstd): the floor holds for the median
    # of three draws
    sqnrs = []
    for draw in range(3):
        torch._dynamo.reset()
        options = {"inner": "eager", "bits": 8, "min_bytes": 0, "seed": 3 * seed + draw}
        loss, got = grads(torch.compile(model, backend="lowbit", options=options))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
        sqnrs.append(sqnr_db(ref, got))
    assert sorted(sqnrs)[1] >= GRAPH_FLOOR_DB, (ops, sqnrs)


graph_cases = dict(
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=8),
    width=st.sampled_from([16, 48, 128]),
    batch=st.sampled_from([8, 33, 64]),
    seed=st.integers(0, 2**16),
)


@_settings(8)
@given(**graph_cases)
def test_random_graphs_match_eager(ops, width, batch, seed):
    _check_graph(ops, width, batch, seed)


@pytest.mark.slow
@_settings(300)
@given(**graph_cases)
def test_random_graphs_match_eager_many(ops, width, batch, seed):
    _check_graph(ops, width, batch, seed)
