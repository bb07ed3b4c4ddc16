"""Lowering (CPU path): each ``fxlowbit::lowbit_linear`` / ``lowbit_linear_backward`` node of the
partitioned graphs -> its pure-torch body traced in (:func:`fxlowbit.codegen.kernels.lowbit_linear.
forward` / ``backward``), so Inductor fuses the scale epilogue into the consumers and calls
``aten._int_mm`` for the int8 GEMM itself. The operands' int8 quantizers stay ops
(``fxlowbit::quantize_int8`` and ``quantize_int8_sr``), each one compiled kernel per row length
and dtype that every graph reuses (codegen/kernels/quant_cpu.py): traced in, Inductor fused them
into their producers and compiled C++ for each such pair. TinyGPT with int8 linears (2-core AMD
EPYC, 1 thread, empty Inductor cache, 2026-12-07): first step 22.2-25.8 s traced (4 runs) against
18.4-18.5 s through the ops (2 runs; Inductor's 14.1-14.9 s), steady step 15.1-17.5 ms against
17.2-17.4 ms (Inductor's 18.6-19.0 ms).

Why: as opaque ops, a linear's quantization and epilogue ran eagerly, pass by pass, and the
dispatch and copies around them cost more than the int8 GEMM saved on small and medium layers.
Measured on a 2-core AMD EPYC (1 thread, 2026-12-06, benchmarks/speed.py rows in lockstep), a
4-layer Llama (hidden 256, 1024 tokens) stepped at 1.03x / 1.08x / 1.41x Inductor's through the
ops with INT8 forward / forward and grad-input / all three GEMMs, although ``torch._int_mm`` runs
4.3-4.7x fp32's ``mm`` at its shapes; lowered: 0.91x / 0.82x / 0.78x (benchmarks/results/
speed_int8_cpu.json has the committed run).

What runs is unchanged: the same functions compute the same codes, scales and noise (the backward's
seed comes from an ``fxlowbit::draw_seed`` node in its place, one draw per call as the op draws
it). Runs after the plan's rewrites, on the pair Inductor compiles, when ``kernels`` traces our
code into the graphs (:meth:`fxlowbit.config.LowbitConfig.inline_kernels`). Left as ops: FP8
formats, Hadamard rotation, symbolic sizes, and any node whose outputs are not read by
``getitem`` (counted as ``lowbit_linear_kept_op``). Counters: ``lowbit_linear_lowered`` per node,
``lowbit_linear_cse`` per inlined node merged with an identical one (linears reading one input
quantize it once and save one copy).
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx

from ..codegen.kernels import lowbit_linear as ll
from ..codegen.ops import draw_seed  # noqa: F401  (registers fxlowbit::draw_seed)
from ._graph import value
from ._inline import inline

log = logging.getLogger(__name__)

__all__ = ["run", "lowerable"]

_FWD = torch.ops.fxlowbit.lowbit_linear.default
_BWD = torch.ops.fxlowbit.lowbit_linear_backward.default
_SEED = torch.ops.fxlowbit.draw_seed.default


def lowerable(node: fx.Node) -> str | None:
    """None if ``node`` (a lowbit_linear forward or backward) can be traced in, else why not."""
    fmts, hadamard = (node.args[3:6], node.args[6]) if node.target is _FWD else (node.args[5:8], node.args[8])
    if any(f not in ll.PLAIN and f != "int8" for f in fmts):
        return f"formats {'/'.join(map(str, fmts))}"
    if hadamard:
        return f"hadamard={hadamard}"
    for a in node.all_input_nodes:
        v = value(a)
        if isinstance(v, torch.Tensor) and (
            v.device.type != "cpu" or not all(isinstance(s, int) for s in v.shape)
        ):
            return "symbolic sizes or not on CPU"
    if any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
        return "outputs read other than by getitem"
    return None


def _forward(graph: fx.Graph, node: fx.Node):
    x, w, bias, fwd_fmt, _gi, _gw, hadamard, _stream = node.args
    # the quantizers stay ops (one compiled kernel per row length, whatever produced the rows)
    return inline(graph, ll.forward, [x, w, bias, fwd_fmt, hadamard, True])


def _backward(graph: fx.Graph, node: fx.Node):
    grad, x, xq, xs, w, fwd, gi, gw, hadamard, stream, need_dx, need_dw, need_db = node.args
    seed = None
    if ll.draws_seed(str(gi), str(gw), int(stream)):  # type: ignore[arg-type]
        seed = graph.call_function(_SEED, (grad, stream))
        g: Any = value(grad)  # a FakeTensor
        with g.fake_mode:
            seed.meta["val"] = _SEED(g, stream)
    # the quantizers stay ops, the gradients' stochastic rounding too (compiled kernels shared by
    # every graph)
    args = [grad, x, xq, xs, w, seed, fwd, gi, gw, hadamard, need_dx, need_dw, need_db, True]
    try:
        return inline(graph, ll.backward, args)
    except Exception:
        if seed is not None:  # no stray draw: the op left in place draws its own
            graph.erase_node(seed)
        raise


_LOWER = {_FWD: _forward, _BWD: _backward}


_QUANTIZE = torch.ops.fxlowbit.quantize_int8.default


def _pure(node: fx.Node) -> bool:
    """An op CSE may merge: an aten or prims op that is functional, draws no random numbers and
    leaves no memory uninitialised (two ``empty`` results are two buffers, not one value), the
    round-to-nearest int8 quantizer (a function of its input), or ``getitem`` (of a merged tuple)."""
    t = node.target
    if t is _QUANTIZE or t is operator.getitem:
        return node.op == "call_function"
    return (
        node.op == "call_function"
        and isinstance(t, torch._ops.OpOverload)
        and t.namespace in ("aten", "prims")
        and not t._schema.is_mutable
        and torch.Tag.nondeterministic_seeded not in t.tags
        and "empty" not in t._schema.name
    )


def _frozen(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(a) for a in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _frozen(a)) for k, a in v.items()))
    hash(v)  # raises TypeError for what cannot be a key
    return v


def _merge_repeats(graph: fx.Graph, new: list[fx.Node]) -> int:
    """Common-subexpression elimination over the nodes the lowering inlined (``new``, in graph
    order): linears that read one input (q, k and v; gate and up) quantize it identically, so
    one quantization remains and the backward receives one saved copy of its codes and scales,
    where each op saved its own. AOTAutograd ran CSE before partitioning; the inlined bodies came
    after it. Returns the number of nodes merged."""
    seen: dict[tuple, fx.Node] = {}
    merged = 0
    for node in new:
        if not _pure(node):
            continue
        try:
            key = (node.target, _frozen(node.args), _frozen(node.kwargs))
        except TypeError:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            merged += 1
    return merged


def run(graphs: tuple[fx.GraphModule, ...], counters: Counter) -> int:
    """Lower every lowerable node of ``graphs`` in place, then merge the repeated quantizations
    (:func:`_merge_repeats`); returns how many nodes were lowered. A failure part-way leaves valid,
    recompiled graphs: the linears lowered so far, the rest ops."""
    done = 0
    for gm in graphs:
        graph, changed = gm.graph, False
        before = set(graph.nodes)
        try:
            for node in [n for n in graph.nodes if n.op == "call_function" and n.target in _LOWER]:
                why = lowerable(node)
                if why is not None:
                    counters["lowbit_linear_kept_op"] += 1
                    log.debug("fxlowbit: %s stays an op (%s)", node.name, why)
                    continue
                with graph.inserting_before(node):
                    outs = _LOWER[node.target](graph, node)
                for user in list(node.users):
                    user.replace_all_uses_with(outs[user.args[1]])
                    graph.erase_node(user)
                graph.erase_node(node)
                counters["lowbit_linear_lowered"] += 1
                done, changed = done + 1, True
            if changed:
                inlined = [n for n in graph.nodes if n not in before]
                counters["lowbit_linear_cse"] += _merge_repeats(graph, inlined)
        finally:
            if changed:
                graph.lint()
                gm.recompile()
    return done
