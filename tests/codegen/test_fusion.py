"""Generated fusions (codegen/fusion*.py): a pointwise chain + its 4-bit packing as one kernel.

The generated Triton kernel (interpreter on CPU) must equal the pure-torch reference op: the same
forward value and, given the same seed, the same codes and scales. Chains of exact arithmetic
(add/mul/relu/casts) are compared bit for bit; chains through erf/exp/tanh allow the last-ulp
differences of the interpreter's libm against torch's (a value one ulp apart can move a code by
one level, so at most 1% of codes may differ, by one). Then the FX side: :func:`fusion.match` takes
the right nodes, and compiled models give the same loss and gradients with fusion on and off.
"""

from __future__ import annotations

import pytest
import torch

import fxlowbit
from fxlowbit.codegen import fusion, fusion_load, ops, rng

F32, BF16, F16 = "torch.float32", "torch.bfloat16", "torch.float16"
ADD_RELU_CAST = (
    ("aten.add.Tensor", (("in", 0), ("in", 1)), F32),
    ("aten.mul.Tensor", (("v", 0), 0.5), F32),
    ("aten.relu.default", (("v", 1),), F32),
)
GELU = (  # Inductor's decomposition of exact GELU
    ("aten.mul.Tensor", (("in", 0), 0.5), F32),
    ("aten.mul.Tensor", (("in", 0), 0.7071067811865476), F32),
    ("aten.erf.default", (("v", 1),), F32),
    ("aten.add.Tensor", (("v", 2), 1.0), F32),
    ("aten.mul.Tensor", (("v", 0), ("v", 3)), F32),
)


def _cast(program, dtype):
    """``program`` ending in a cast to ``dtype`` (the forward value's dtype)."""
    if dtype == F32:
        return program
    return (*program, ("prims.convert_element_type.default", (("v", len(program) - 1),), dtype))


def _run(spec, inputs, shape, dtype, bits, group_size, force):
    ops.FORCE_TRITON = force
    try:
        stream = rng.new_stream(11)
        return torch.ops.fxlowbit.fused_quantize_pack(
            inputs, spec.to_json(), list(shape), dtype, bits, group_size, stream
        )
    finally:
        ops.FORCE_TRITON = False


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("shape", [(1,), (255,), (3, 257)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_generated_kernel_equals_reference_bit_for_bit(dtype, shape, bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    bias = torch.randn(shape[-1], generator=g)
    spec = fusion.Spec(("full", "row"), _cast(ADD_RELU_CAST, dtype))
    torch_dtype = getattr(torch, dtype.split(".")[1])
    ref = _run(spec, [x, bias], shape, torch_dtype, bits, 64, force=False)
    tri = _run(spec, [x, bias], shape, torch_dtype, bits, 64, force=True)
    expected = torch.relu((x + bias) * 0.5).to(torch_dtype)
    assert torch.equal(ref[0], expected)  # the reference replays the graph's ops
    for r, t in zip(ref, tri, strict=True):
        assert r.dtype == t.dtype and torch.equal(r, t)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_generated_transcendental_chain_within_an_ulp(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 300, generator=g) * 2
    spec = fusion.Spec(("full",), _cast(GELU, dtype))
    torch_dtype = getattr(torch, dtype.split(".")[1])
    ref = _run(spec, [x], x.shape, torch_dtype, 4, 256, force=False)
    tri = _run(spec, [x], x.shape, torch_dtype, 4, 256, force=True)
    exact = torch.nn.functional.gelu(x).to(torch_dtype)
    tol = 1e-6 if dtype == F32 else 1e-2  # one bf16 rounding step of a value < 4
    torch.testing.assert_close(ref[0].float(), exact.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(tri[0].float(), ref[0].float(), rtol=tol, atol=tol)
    torch.testing.assert_close(tri[2], ref[2], rtol=1e-5, atol=1e-6)  # (lo, scale) per group
    codes = [torch.cat([(c >> s) & 15 for s in (0, 4)], 1).int() for c in (ref[1], tri[1])]
    diff = (codes[0] - codes[1]).abs()
    assert diff.max() <= 1 and diff.float().mean() <= 0.01


def _consume(spec, codes, meta, inputs, shape, decoded, dtype, bits, group_size, force):
    ops.FORCE_TRITON = force
    try:
        return torch.ops.fxlowbit.fused_dequantize_apply(
            codes, meta, inputs, spec.to_json(), bits, group_size, list(shape), list(shape), decoded, dtype
        )
    finally:
        ops.FORCE_TRITON = False


GRAD_MUL = (  # relu_backward-like: grad * (x > 0) written arithmetically, plus a bias-like row
    ("aten.mul.Tensor", (("in", 0), ("in", 1)), F32),
    ("aten.add.Tensor", (("v", 0), ("in", 2)), F32),
)


@pytest.mark.parametrize("decoded", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (255,), (3, 257)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_generated_consumer_equals_reference_bit_for_bit(decoded, shape, bits):
    from fxlowbit.codegen.kernels.quant import quantize_pack_reference

    g = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=g) * 3).to(decoded)
    grad, row = torch.randn(shape, generator=g), torch.randn(shape[-1], generator=g)
    codes, meta = quantize_pack_reference(x, bits, 64, torch.rand(-(-x.numel() // 64), 64, generator=g))
    spec = fusion.Spec(("decoded", "full", "row"), GRAD_MUL)
    args = (codes, meta, [grad, row], shape, decoded, torch.float32, bits, 64)
    ref, tri = _consume(spec, *args, force=False), _consume(spec, *args, force=True)
    from fxlowbit.codegen.kernels.quant import dequantize_unpack_reference

    dec = dequantize_unpack_reference(codes, meta, bits, 64, list(shape), decoded)
    assert torch.equal(ref, dec * grad + row)  # the reference replays the graph's ops
    assert torch.equal(ref, tri)


ADD_MUL = (("aten.add.Tensor", (("in", 0), ("in", 1)), F32), ("aten.mul.Tensor", (("v", 0), 0.5), F32))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype and values, NaN where the other has NaN (payloads aside)."""
    nan = a.isnan()
    return a.dtype == b.dtype and torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_generated_kernels_keep_nan_and_inf(dtype, bits):
    """NaN, +Inf and -Inf in one group (and each alone in others) through the fused pack and the
    fused decode: the same codes and scales as the reference, and decoded exactly."""
    from fxlowbit.codegen.kernels.quant import dequantize_unpack_reference

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 257, generator=g) * 3
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x[0, 100], x[1, 7], x[2, 200] = float("inf"), -float("inf"), float("nan")
    bias = torch.randn(257, generator=g)
    torch_dtype = getattr(torch, dtype.split(".")[1])
    spec = fusion.Spec(("full", "row"), _cast(ADD_MUL, dtype))
    ref = _run(spec, [x, bias], x.shape, torch_dtype, bits, 64, force=False)
    tri = _run(spec, [x, bias], x.shape, torch_dtype, bits, 64, force=True)
    assert _same(ref[0], tri[0]) and torch.equal(ref[1], tri[1])
    assert torch.equal(ref[2].view(torch.int32), tri[2].view(torch.int32))
    assert (ref[2][:, 1].view(torch.int32) < 0).sum() == 4  # four groups flagged special
    value = ref[0]
    dec = dequantize_unpack_reference(ref[1], ref[2], bits, 64, list(x.shape), torch_dtype)
    finite = value.isfinite()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert kind(value).any() and torch.equal(kind(dec), kind(value))
    grad, row = torch.randn(x.shape, generator=g), torch.randn(257, generator=g)
    spec = fusion.Spec(("decoded", "full", "row"), GRAD_MUL)
    args = (ref[1], ref[2], [grad, row], x.shape, torch_dtype, torch.float32, bits, 64)
    out_ref, out_tri = _consume(spec, *args, force=False), _consume(spec, *args, force=True)
    assert _same(out_ref, dec.float() * grad + row) and _same(out_ref, out_tri)
    assert out_ref[~finite].isfinite().sum() == 0 and out_ref[finite].isfinite().all()


def test_generated_consumer_source_is_deterministic():
    spec = fusion.Spec(("decoded", "full", "row"), GRAD_MUL)
    text = fusion.source_consumer(spec)
    assert text == fusion.source_consumer(fusion.Spec.from_json(spec.to_json()))
    assert "def _apply(in0, in1, in2, idx, inside, period)" in text and "_produce" not in text
    with pytest.raises(ValueError, match="decoded"):
        fusion.source_consumer(fusion.Spec(("full",), GRAD_MUL[:1]))


def test_match_consumer_needs_a_single_sink_and_no_other_use():
    def bw(x, grad):
        y = torch.ops.aten.mul.Tensor(x, 0.5)
        return torch.ops.aten.mul.Tensor(grad, torch.ops.aten.exp.default(y))

    g = _graph(bw, torch.randn(4, 8), torch.randn(4, 8))
    spec, inputs, chain = fusion.match_consumer(_node(g, "x_1"))
    assert spec.inputs == ("decoded", "full") and [n.name for n in inputs] == ["grad_1"]
    assert [n.name for n in chain] == ["mul", "exp", "mul_1"]

    def two_sinks(x, grad):
        return torch.ops.aten.mul.Tensor(grad, x), torch.ops.aten.exp.default(x)

    g = _graph(two_sinks, torch.randn(4, 8), torch.randn(4, 8))
    assert fusion.match_consumer(_node(g, "x_1")) is None  # the exp is used outside the chain

    def matmul_use(x, w):
        return torch.ops.aten.mm.default(x, w)

    g = _graph(matmul_use, torch.randn(4, 8), torch.randn(8, 2))
    assert fusion.match_consumer(_node(g, "x_1")) is None


def test_scalar_input_and_empty_tensor():
    spec = fusion.Spec(("full", "scalar"), (("aten.mul.Tensor", (("in", 0), ("in", 1)), F32),))
    x, s = torch.randn(7, 9), torch.tensor(-2.5)
    ref = _run(spec, [x, s], x.shape, torch.float32, 4, 8, force=False)
    tri = _run(spec, [x, s], x.shape, torch.float32, 4, 8, force=True)
    assert torch.equal(ref[0], x * s) and all(torch.equal(a, b) for a, b in zip(ref, tri, strict=True))
    empty = torch.empty(0, 5)
    out, codes, meta = _run(spec, [empty, s], empty.shape, torch.float32, 4, 8, force=True)
    assert out.shape == (0, 5) and codes.numel() == meta.numel() == 0


def test_seed_changes_codes_so_the_comparison_can_fail():
    spec = fusion.Spec(("full", "row"), ADD_RELU_CAST)
    x, b = torch.randn(4, 64), torch.randn(64)
    ops.FORCE_TRITON = True
    try:
        a = torch.ops.fxlowbit.fused_quantize_pack([x, b], spec.to_json(), [4, 64], torch.float32, 4, 64,
                                                   rng.new_stream(1))  # fmt: skip
        c = torch.ops.fxlowbit.fused_quantize_pack([x, b], spec.to_json(), [4, 64], torch.float32, 4, 64,
                                                   rng.new_stream(2))  # fmt: skip
    finally:
        ops.FORCE_TRITON = False
    assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_source_is_deterministic_and_dumped(tmp_path, monkeypatch):
    spec = fusion.Spec(("full",), GELU)
    assert fusion.source(spec) == fusion.source(fusion.Spec.from_json(spec.to_json()))
    assert "tl.math.erf" in fusion.source(spec) and "def _fused_kernel" in fusion.source(spec)
    monkeypatch.setenv("FXLOWBIT_DUMP_DIR", str(tmp_path))
    fusion_load._KERNELS.clear()
    fusion.kernel(spec)
    (path,) = tmp_path.glob("fused_pack_*.py")
    assert path.read_text() == fusion.source(spec)


def test_opcheck():
    spec = fusion.Spec(("full", "row"), ADD_RELU_CAST)
    inputs = [torch.randn(3, 40), torch.randn(40)]
    args = (inputs, spec.to_json(), [3, 40], torch.float32, 4, 8, rng.new_stream(0))
    torch.library.opcheck(torch.ops.fxlowbit.fused_quantize_pack.default, args,
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


# -- matching the FX graph ------------------------------------------------------------------------
def _graph(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*args).graph


def _node(graph, name):
    return next(n for n in graph.nodes if n.name == name)


def test_match_takes_the_whole_chain_and_stops_at_escaping_values():
    def f(x, b):
        y = torch.ops.aten.add.Tensor(x, b)
        z = torch.ops.aten.relu.default(y)
        return torch.ops.aten.mul.Tensor(z, 2.0), y  # y escapes: an input, not part of the chain

    g = _graph(f, torch.randn(4, 8), torch.randn(8))
    spec, inputs, chain = fusion.match(_node(g, "mul"))
    assert [n.name for n in inputs] == ["add"] and [n.name for n in chain] == ["relu", "mul"]
    assert spec.inputs == ("full",)

    def h(x, b):
        return torch.ops.aten.relu.default(torch.ops.aten.add.Tensor(x, b))

    g = _graph(h, torch.randn(4, 8), torch.randn(8))
    spec, inputs, chain = fusion.match(_node(g, "relu"))
    assert spec.inputs == ("full", "row") and [n.name for n in chain] == ["add", "relu"]


def test_match_refuses_non_pointwise_and_unsupported_broadcasts():
    g = _graph(lambda a, b: torch.ops.aten.mm.default(a, b), torch.randn(4, 8), torch.randn(8, 3))
    assert fusion.match(_node(g, "mm")) is None
    g = _graph(lambda x, c: torch.ops.aten.add.Tensor(x, c), torch.randn(4, 8), torch.randn(4, 1))
    assert fusion.match(_node(g, "add")) is None  # a column broadcast is not a supported input


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(40, 96), torch.nn.Linear(96, 8)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x))).square().mean()


@pytest.mark.parametrize("force", [False, True], ids=["reference", "triton-interpreter"])
def test_compiled_model_same_loss_and_gradients_with_fusion(force):
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(0))
    results = {}
    ops.FORCE_TRITON = force
    try:
        for fuse in (False, True):
            torch._dynamo.reset()
            fxlowbit.reset()
            torch.manual_seed(0)
            model = _MLP()
            opts = {"bits": 4, "inner": "eager", "kernels": "ops", "fuse": fuse, "seed": 0, "min_bytes": 0}
            loss = torch.compile(model, backend="lowbit", options=opts)(x)
            loss.backward()
            grads = [p.grad for p in model.parameters()]
            fused = (fxlowbit.counters["fused_pack"], fxlowbit.counters["fused_unpack"])
            results[fuse] = (loss.detach(), grads, fused)
    finally:
        ops.FORCE_TRITON = False
    # forward: the GELU output (5 ops) + its pack; backward: the GELU input's decode + gelu_backward
    assert results[False][2] == (0, 0) and results[True][2] == (1, 1)
    assert torch.equal(results[False][0], results[True][0])  # the forward stays exact
    # the reference path replays the graph's own ops: bit-identical; the interpreter's exp/erf
    # (numpy float32) differ from torch's in the last ulp inside gelu_backward (measured: 1.2e-4
    # relative, 4.7e-10 absolute at most)
    tol = dict(rtol=0, atol=0) if not force else dict(rtol=1e-3, atol=1e-8)
    for a, b in zip(results[False][1], results[True][1], strict=True):
        torch.testing.assert_close(a, b, **tol)
