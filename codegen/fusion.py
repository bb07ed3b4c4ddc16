"""Generated fusions: a chain of pointwise producers ending in a quantized saved tensor becomes ONE
kernel that writes the forward value and its packed copy.

:func:`match` reads the chain off the forward FX graph (aten pointwise ops of :data:`OPS` whose
intermediates have no other users; inputs are contiguous tensors of the output's shape, vectors
broadcast along the last dimension, or scalars) and describes it as a :class:`Spec` (JSON, so it
travels as a string argument of the ``fxlowbit::fused_quantize_pack`` op). :func:`source` turns a
spec into the Triton source of one kernel: the chain evaluated in fp32 (rounded to bf16/fp16
wherever the graph's values are), stored as the forward output, then per-group min/max, stochastic
rounding and planar packing exactly as :mod:`.kernels.quant_triton` does. The source is a pure
function of the spec (deterministic); ``FXLOWBIT_DUMP_DIR`` also writes it there. The pure-torch
reference replays the same aten ops and calls the quantize reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.fx as fx

from .dtypes import FLOAT_NAMES

aten, prims = torch.ops.aten, torch.ops.prims

__all__ = ["Spec", "match", "match_consumer", "source", "source_consumer", "reference", "kernel", "OPS"]

# aten overload -> Triton expression over the argument expressions {0}, {1} (fp32 values)
OPS: dict[str, str] = {
    "aten.add.Tensor": "({0} + {1})",
    "aten.sub.Tensor": "({0} - {1})",
    "aten.mul.Tensor": "({0} * {1})",
    "aten.div.Tensor": "({0} / {1})",
    "aten.neg.default": "(-{0})",
    "aten.abs.default": "tl.abs({0})",
    "aten.relu.default": "tl.maximum({0}, 0.0)",
    "aten.exp.default": "tl.exp({0})",
    "aten.log.default": "tl.log({0})",
    "aten.sqrt.default": "tl.sqrt({0})",
    "aten.rsqrt.default": "tl.math.rsqrt({0})",
    "aten.erf.default": "tl.math.erf({0})",
    "aten.sigmoid.default": "(1.0 / (1.0 + tl.exp(-{0})))",
    "aten.tanh.default": "(2.0 / (1.0 + tl.exp(-2.0 * {0})) - 1.0)",
    "aten.reciprocal.default": "(1.0 / {0})",
    "aten.maximum.default": "tl.maximum({0}, {1})",
    "aten.minimum.default": "tl.minimum({0}, {1})",
    "prims.convert_element_type.default": "{0}",  # the rounding follows the output dtype below
    # reshapes of contiguous values keep the flat element order: identities on flat indices
    "aten.view.default": "{0}",
    "aten._unsafe_view.default": "{0}",
}
_VIEWS = ("aten.view.default", "aten._unsafe_view.default")
_MAX_OPS = 32


@dataclasses.dataclass(frozen=True)
class Spec:
    """A pointwise chain: ``inputs`` are ("full" | "row" | "scalar") kinds, ``program`` a list of
    ``(aten op, args, out dtype)`` with args ``["in", k]``, ``["v", i]`` or a Python number; the
    last value is the saved tensor."""

    inputs: tuple[str, ...]
    program: tuple[tuple[str, tuple, str], ...]

    def to_json(self) -> str:
        return json.dumps({"inputs": self.inputs, "program": self.program}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        d = json.loads(text)
        prog = tuple((op, tuple(tuple(a) if isinstance(a, list) else a for a in args), dt)
                     for op, args, dt in d["program"])  # fmt: skip
        return cls(tuple(d["inputs"]), prog)


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None  # AOT graphs: no example_value


def _supported(n: fx.Node) -> bool:
    v = _val(n)
    return (
        n.op == "call_function"
        and str(n.target) in OPS
        and not n.kwargs
        and isinstance(v, torch.Tensor)
        and v.dtype in FLOAT_NAMES
    )


def _same_flat(v: torch.Tensor, out: torch.Tensor) -> bool:
    """Same elements in the same flat order as ``out`` (rows of the same width for biases)."""
    return (
        v.is_contiguous()
        and v.dim() > 0
        and v.numel() == out.numel()
        and v.shape[-1] == out.shape[-1]
        and not any(isinstance(d, torch.SymInt) for d in v.shape)
    )


def _ancestors_within(root: fx.Node, allowed: set[fx.Node]) -> set[fx.Node]:
    """``root`` and its ancestors reachable through ``allowed`` nodes only."""
    found, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n in allowed and n not in found:
            found.add(n)
            stack.extend(a for a in n.args if isinstance(a, fx.Node))
    return found


def _input_kind(n: fx.Node, out: torch.Tensor) -> str | None:
    v = _val(n)
    if not isinstance(v, torch.Tensor) or v.dtype not in FLOAT_NAMES:
        return None
    if v.dim() == 0:
        return "scalar"
    if _same_flat(v, out):
        return "full"
    if v.is_contiguous() and v.numel() == out.shape[-1] and all(d == 1 for d in v.shape[:-1]):
        return "row"  # a bias: broadcast along the leading dimensions
    return None


def _kind(n: fx.Node, out: torch.Tensor) -> str:
    """:func:`_input_kind` of an input the matcher admitted (so it has one)."""
    kind = _input_kind(n, out)
    assert kind is not None
    return kind


def match(node: fx.Node) -> tuple[Spec, list[fx.Node], list[fx.Node]] | None:
    """``(spec, input nodes, chain nodes)`` for the pointwise chain producing ``node``, or None.
    Intermediates must have no users outside the chain (they are not written to memory)."""
    out = _val(node)
    if not _supported(node) or not out.is_contiguous() or any(isinstance(d, torch.SymInt) for d in out.shape):
        return None
    # candidates: supported same-shape ancestors; then drop any with a user outside the set (its
    # value escapes, so it must be written: it becomes an input) until nothing changes
    cand: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in cand or len(cand) > _MAX_OPS:
            continue
        if n is node or (_supported(n) and _same_flat(_val(n), out)):
            cand.add(n)
            stack.extend(a for a in n.args if isinstance(a, fx.Node))
    while True:
        escaping = {n for n in cand if n is not node and any(u not in cand for u in n.users)}
        # ancestors reachable only through a dropped node are no longer part of the chain
        keep = _ancestors_within(node, cand - escaping)
        if keep == cand:
            break
        cand = keep
    if len(cand) > _MAX_OPS:
        return None
    chain: list[fx.Node] = []
    inputs: list[fx.Node] = []

    def visit(n: fx.Node) -> bool:  # post-order: program order
        if n in chain or n in inputs:
            return True
        if n in cand:
            if not all(visit(a) for a in n.args if isinstance(a, fx.Node)):
                return False
            chain.append(n)
            return True
        if _input_kind(n, out) is None:
            return False
        inputs.append(n)
        return True

    if not visit(node) or not inputs:
        return None
    program = _program(chain, inputs)
    if program is None:
        return None
    return Spec(tuple(_kind(n, out) for n in inputs), program), inputs, chain


def match_consumer(src: fx.Node) -> tuple[Spec, list[fx.Node], list[fx.Node]] | None:
    """``(spec, external inputs, nodes)`` for the backward's pointwise ops that consume the decoded
    value of ``src`` (a saved tensor's placeholder) and end in ONE value used elsewhere (the sink,
    last of ``nodes``), or None. ``spec.inputs[0]`` is "decoded": the kernel decodes it in place."""
    out = _val(src)
    symbolic = isinstance(out, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in out.shape)
    if not isinstance(out, torch.Tensor) or not src.users or symbolic:
        return None
    order = {n: i for i, n in enumerate(src.graph.nodes)}
    cand: set[fx.Node] = set()
    stack = list(src.users)
    while stack and len(cand) <= _MAX_OPS:
        n = stack.pop()
        if n not in cand and _supported(n) and _same_flat(_val(n), out):
            cand.add(n)
            stack.extend(n.users)
    if not cand or len(cand) > _MAX_OPS:
        return None
    sink = max(cand, key=order.__getitem__)
    nodes = _ancestors_within(sink, cand)
    if any(u not in nodes for u in src.users) or any(
        n is not sink and any(u not in nodes for u in n.users) for n in nodes
    ):
        return None  # the decoded value or an intermediate is needed elsewhere
    chain = sorted(nodes, key=order.__getitem__)
    inputs: list[fx.Node] = []
    for n in chain:
        for a in n.args:
            if isinstance(a, fx.Node) and a is not src and a not in nodes and a not in inputs:
                if _input_kind(a, out) is None:
                    return None
                inputs.append(a)
    program = _program(chain, [src, *inputs])
    if program is None:
        return None
    return Spec(("decoded", *(_kind(a, out) for a in inputs)), program), inputs, chain


def _program(chain: list[fx.Node], inputs: list[fx.Node]):
    """The chain as program steps over ``inputs`` (None if an argument is not expressible)."""
    index = {n: i for i, n in enumerate(chain)}
    program = []
    for n in chain:
        args: list[tuple[str, int] | float | tuple[str, tuple[int, ...]]] = []
        for a in n.args:
            if isinstance(a, fx.Node):
                args.append(("v", index[a]) if a in index else ("in", inputs.index(a)))
            elif isinstance(a, (int, float)) and not isinstance(a, bool):
                args.append(float(a))
            elif isinstance(a, torch.dtype) and str(n.target) == "prims.convert_element_type.default":
                continue  # the output dtype carries it
            elif str(n.target) in _VIEWS and isinstance(a, (list, tuple)) and all(type(d) is int for d in a):
                args.append(("shape", tuple(a)))
            else:
                return None
        program.append((str(n.target), tuple(args), str(_val(n).dtype)))
    return tuple(program)


# -- the pure-torch reference ---------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    """The dtype a program step names (\"torch.bfloat16\" -> torch.bfloat16)."""
    return getattr(torch, name.split(".")[1])


def _aten(name: str):
    ns, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, ns), op), overload)


def _arg(x, inputs: list, vals: list):
    """An argument of a program step: ``("in", k)``, ``("v", i)`` or a number."""
    if isinstance(x, tuple):
        return list(x[1]) if x[0] == "shape" else inputs[x[1]] if x[0] == "in" else vals[x[1]]
    return x


def reference(spec: Spec, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The chain replayed with the graph's own aten ops (bit for bit what the unfused graph does)."""
    vals: list[torch.Tensor] = []
    for op, args, dtype in spec.program:
        a = [_arg(x, inputs, vals) for x in args]
        if op == "prims.convert_element_type.default":
            a.append(_dtype(dtype))
        vals.append(_aten(op)(*a))
    return vals[-1]


# -- Triton source --------------------------------------------------------------------------------
def _expr(spec: Spec) -> list[str]:
    lines = []
    names, values = [f"a{k}" for k in range(len(spec.inputs))], [f"v{i}" for i in range(len(spec.program))]
    for i, (op, args, dtype) in enumerate(spec.program):
        a = [_arg(x, names, values) if isinstance(x, tuple) else repr(float(x)) for x in args
             if not (isinstance(x, tuple) and x[0] == "shape")]  # fmt: skip
        e = OPS[op].format(*a)
        kind = FLOAT_NAMES[_dtype(dtype)]
        if kind != "fp32":
            e = f"_round_{kind}({e})"
        lines.append(f"    v{i} = {e}")
    return lines


def source(spec: Spec) -> str:
    """Triton source of the fused kernel for ``spec`` (deterministic)."""
    n = len(spec.inputs)
    params = "".join(f"in{k}, " for k in range(n))
    loads = []
    for k, kind in enumerate(spec.inputs):
        if kind == "decoded_x":
            loads.append(f"    a{k} = in{k}")  # the value decoded in the kernel
        elif kind == "full":
            loads.append(f"    a{k} = tl.load(in{k} + idx, mask=inside, other=0).to(tl.float32)")
        elif kind == "row":
            loads.append(f"    a{k} = tl.load(in{k} + idx % period, mask=inside, other=0).to(tl.float32)")
        elif kind == "scalar":
            loads.append(f"    a{k} = tl.load(in{k}).to(tl.float32)")
    last = len(spec.program) - 1
    body = "\n".join(loads + _expr(spec) + [f"    return v{last}"])
    return _TEMPLATE.format(params=params, body=body, call_params=params)


def source_consumer(spec: Spec) -> str:
    """Triton source of the decode + backward-consumer kernel for ``spec`` (``inputs[0]`` is the
    decoded value; deterministic)."""
    if spec.inputs[:1] != ("decoded",):
        raise ValueError("fxlowbit: a consumer spec starts with the decoded input")
    params = "".join(f"in{k}, " for k in range(1, len(spec.inputs)))
    text = source(Spec(("decoded_x", *spec.inputs[1:]), spec.program))
    head = text[: text.index("@triton.jit\ndef _fused_kernel")]
    head = head.replace("def _produce(in0, ", "def _apply(in0, ").replace("def _produce(", "def _apply(")
    return head + _DECODE_TEMPLATE.format(params=params)


_TEMPLATE = '''"""Generated by fxlowbit.codegen.fusion (do not edit)."""
import triton
import triton.language as tl

from fxlowbit.codegen.kernels.quant_triton_lib import (
    INF, bf16_bits, decode_plane, group_scales, load_meta, plane_codes, plane_stats, seed_key,
    store_packed,
)


@triton.jit
def _round_bf16(x):
    return (bf16_bits(x).to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _round_fp16(x):
    return x.to(tl.float16).to(tl.float32)


@triton.jit
def _produce({params}idx, inside, period):
{body}


@triton.jit
def _value(x, out_ptr, OUT_BF16: tl.constexpr):
    """``x`` rounded to the output dtype, as the unfused graph stores it."""
    if OUT_BF16:
        return _round_bf16(x)
    return x.to(out_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _fused_kernel({params}out_ptr, seed_ptr, codes_ptr, meta_ptr, numel, n_groups, period,
                  BITS: tl.constexpr, G: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr,
                  ROWS: tl.constexpr, OUT_BF16: tl.constexpr):
    P: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (ROWS * G)
    kk = tl.arange(0, BLOCK_W)
    if W != BLOCK_W:
        kk = tl.minimum(kk, W - 1)
    offs = tl.arange(0, ROWS)[:, None] * G + kk[None, :]
    byte_ok = (kk < W)[None, :]
    lastidx = tl.zeros([ROWS, BLOCK_W], tl.int64) + numel - 1
    last = _value(_produce({call_params}lastidx, lastidx >= 0, period), out_ptr, OUT_BF16)
    lo_t = tl.full([ROWS, BLOCK_W], INF, tl.float32)
    hi_t = tl.full([ROWS, BLOCK_W], -INF, tl.float32)
    kinds_t = tl.zeros([ROWS, BLOCK_W], tl.int32)
    for j in tl.static_range(P):  # pass 1: the forward value, and the group statistics
        idx = base + offs + j * W
        inside = idx < numel
        x = _produce({call_params}idx, inside, period)
        if OUT_BF16:
            tl.store(out_ptr + idx, bf16_bits(x), mask=inside & byte_ok)
        else:
            tl.store(out_ptr + idx, x.to(out_ptr.dtype.element_ty), mask=inside & byte_ok)
        x = tl.where(inside, _value(x, out_ptr, OUT_BF16), last)
        lo_t, hi_t, kinds_t = plane_stats(x, lo_t, hi_t, kinds_t)
    lo, scale, usable, half, inv, kinds = group_scales(lo_t, hi_t, kinds_t, LEVELS)
    key = seed_key(seed_ptr)
    packed = tl.zeros([ROWS, BLOCK_W], tl.uint32)
    for j in tl.static_range(P):  # pass 2: codes; the chain is recomputed (inputs from L1/L2)
        idx = base + offs + j * W
        inside = idx < numel
        x = _value(_produce({call_params}idx, inside, period), out_ptr, OUT_BF16)
        x = tl.where(inside, x, last)
        q = plane_codes(x, idx.to(tl.uint32), key, lo, half, inv, usable, kinds, LEVELS)
        packed |= q.to(tl.uint32) << (j * BITS)
    store_packed(codes_ptr, meta_ptr, pid, n_groups, packed, lo, scale, kinds, W, BLOCK_W, ROWS)
'''

_DECODE_TEMPLATE = """@triton.jit
def _fused_kernel(codes_ptr, meta_ptr, {params}out_ptr, numel, n_groups, period,
                  BITS: tl.constexpr, G: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr,
                  ROWS: tl.constexpr, DEC_BF16: tl.constexpr, DEC_F16: tl.constexpr,
                  OUT_BF16: tl.constexpr):
    P: tl.constexpr = 8 // BITS
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    kk = tl.arange(0, BLOCK_W)
    row_ok = rows < n_groups
    byte_ok = row_ok[:, None] & (kk < W)[None, :]
    packed = tl.load(codes_ptr + rows[:, None] * W + kk[None, :], mask=byte_ok, other=0)
    lo, scale, kinds = load_meta(meta_ptr, rows, row_ok)
    base = pid.to(tl.int64) * (ROWS * G)
    offs = tl.arange(0, ROWS)[:, None] * G + kk[None, :]
    for j in tl.static_range(P):
        x = decode_plane(packed, j, lo, scale, kinds, BITS)
        if DEC_BF16:  # the decoded value as the unfused decode writes it
            x = _round_bf16(x)
        if DEC_F16:
            x = _round_fp16(x)
        idx = base + offs + j * W
        ok = byte_ok & (idx < numel)
        y = _apply(x, {params}idx, ok, period)
        if OUT_BF16:
            tl.store(out_ptr + idx, bf16_bits(y), mask=ok)
        else:
            tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=ok)
"""

_KERNELS: dict[str, object] = {}


def kernel(spec: Spec):
    """The compiled ``_fused_kernel`` of ``spec`` (a producer, or a consumer when its first input
    is "decoded"), generated once per process and spec; Triton needs the source in a file, written
    under ``FXLOWBIT_DUMP_DIR`` or a temporary directory."""
    consumer = spec.inputs[:1] == ("decoded",)
    text = source_consumer(spec) if consumer else source(spec)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    if digest not in _KERNELS:
        folder = Path(os.environ.get("FXLOWBIT_DUMP_DIR") or Path(tempfile.gettempdir()) / "fxlowbit_kernels")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{'fused_unpack' if consumer else 'fused_pack'}_{digest}.py"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        name = f"fxlowbit_generated_{digest}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None  # a .py file has a loader
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        _KERNELS[digest] = module._fused_kernel
    return _KERNELS[digest]
