"""Generated fusions (codegen/fusion.py): a pointwise chain + its 4-bit packing as one kernel.

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
from fxlowbit.codegen import fusion, ops, rng

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
    fusion._KERNELS.clear()
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
            opts = {"bits": 4, "inner": "eager", "kernels": "triton", "fuse": fuse, "seed": 0, "min_bytes": 0}
            loss = torch.compile(model, backend="lowbit", options=opts)(x)
            loss.backward()
            grads = [p.grad for p in model.parameters()]
            results[fuse] = (loss.detach(), grads, fxlowbit.counters["fused_pack"])
    finally:
        ops.FORCE_TRITON = False
    assert results[False][2] == 0 and results[True][2] == 1  # the GELU output: 5 ops + pack
    assert torch.equal(results[False][0], results[True][0])
    for a, b in zip(results[False][1], results[True][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
