"""Rewrite: store saved tensors in the forms a :class:`~fxlowbit.plan.Plan` chose.

Forward: right after each compressed tensor's producer, insert its packing (for comparison masks
first the scalar comparisons the backward would make) and return the packed parts in its place
among the saved outputs. Packing and decoding are either the opaque ``fxlowbit::`` ops or, for
Inductor, the same pure-torch references traced into the graph so that Inductor fuses them.
Backward: replace its placeholder by placeholders for the parts
and decode them once, just before the first use (all backward readers share that one decode), so
only the activations in use are live in full precision.

Each form's pack and decode live in its module of :mod:`fxlowbit.forms` (quant, mask, comparison
masks, packed integers); this pass dispatches on the plan through that registry and owns the rest:
where packs go, the graphs' seed, returning parts in the saved value's place, decoding before the
first use.

Relies on AOTAutograd matching saved forward outputs and backward placeholders by position; order
is kept, ``meta["val"]`` is set on every new node and both graphs are linted and recompiled.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Callable

import torch
import torch.fx as fx
from torch._prims_common import make_contiguous_strides_for
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import forms
from ..plan import Form, Plan
from ._graph import SymBuilder, call, first_user, placeholder_like
from ._inline import inline as _inline

log = logging.getLogger(__name__)
lowbit = torch.ops.fxlowbit

__all__ = ["run", "Rewriter"]


class Rewriter:
    """The state of one rewrite, and the primitives a form's :meth:`~fxlowbit.forms.SavedForm.rewrite`
    stores its value with: :meth:`pack`, :meth:`emit`, :meth:`decoder`, :meth:`store`."""

    def __init__(
        self,
        inline: bool,
        fuse: bool,
        quant_op: bool,
        fw: fx.GraphModule,
        bw: fx.GraphModule,
        num_fwd_outputs: int,
        group_size: int,
        stream: int,
        counters: Counter,
    ):
        self.inline, self.fuse, self.quant_op = inline, fuse, quant_op
        self.fg, self.bg = fw.graph, bw.graph
        self.group_size, self.stream, self.counters = group_size, stream, counters
        self.out_node = self.fg.find_nodes(op="output")[0]
        self.outputs = list(self.out_node.args[0])
        self.new_outputs = self.outputs[:num_fwd_outputs]
        self.num_fwd = num_fwd_outputs
        self.saved_names = {o.name for o in self.outputs[num_fwd_outputs:] if isinstance(o, fx.Node)}
        self.placeholders = {p.name: p for p in self.bg.find_nodes(op="placeholder")}
        # (old placeholder, decode builder, comparison users or None, fused decode or None)
        self.stored: list = []
        self.seed: fx.Node | None = None  # this graph's seed node (inline mode)
        self.n_seeded = 0
        self.dropped: list[fx.Node] = []  # backward placeholders replaced by a normalised form
        self.fw_nodes = {n.name: n for n in self.fg.nodes}  # for forms.normalised (names are stable)
        self.exact: set[str] = set()  # saved names stored as they are (run() fills it)

    def emit(self, node: fx.Node, ph: fx.Node, parts: list[fx.Node]) -> list[fx.Node]:
        """Return ``parts`` from the forward in ``node``'s place; matching backward placeholders."""
        for p in parts:
            if "saved_tensor_with_no_vc_check" in node.meta:
                p.meta["saved_tensor_with_no_vc_check"] = node.meta["saved_tensor_with_no_vc_check"]
        self.new_outputs.extend(parts)
        return [placeholder_like(self.bg, ph, p) for p in parts]

    def graph_seed(self) -> fx.Node:
        """One seed drawn per forward call, at the top of the graph; tensor k uses ``seed + k``
        (the noise hash mixes the seed, so consecutive seeds give unrelated streams)."""
        if self.seed is None:
            phs = [
                p for p in self.fg.find_nodes(op="placeholder") if isinstance(p.meta.get("val"), torch.Tensor)
            ]
            with self.fg.inserting_after(self.fg.find_nodes(op="placeholder")[-1]):
                self.seed = call(self.fg, lowbit.draw_seed.default, (phs[0], self.stream), "lowbit_seed")
        return self.seed

    def pack(
        self, node: fx.Node, fn, op, args: tuple, names: list[str], seeded: bool = False, traced: bool = True
    ):
        """Insert the packing of ``node`` right after its producer: traced ``fn`` (inline mode, unless
        ``traced`` is False) or the opaque ``op``. ``seeded``: stochastic, takes a seed (traced) or
        the stream id (op). A graph input (an earlier graph's activation) is packed after the last
        placeholder and the seed."""
        anchor = node
        inline = self.inline and traced
        if node.op == "placeholder":
            anchor = self.graph_seed() if inline and seeded else self.fg.find_nodes(op="placeholder")[-1]
        with self.fg.inserting_before(anchor.next):
            if inline and seeded:
                seed = call(self.fg, torch.ops.aten.add.Tensor, (self.graph_seed(), self.n_seeded))
                self.n_seeded += 1
                out = _inline(self.fg, fn, [node, seed, *args])
            elif inline:
                out = _inline(self.fg, fn, [node, *args])
            else:
                out = call(self.fg, op, (node, *args, self.stream) if seeded else (node, *args))
                if isinstance(out.meta["val"], tuple):
                    n = len(out.meta["val"])
                    out = tuple(call(self.fg, operator.getitem, (out, i)) for i in range(n))
        parts = list(out) if isinstance(out, (tuple, list)) else [out]
        for part, name in zip(parts, names, strict=True):
            part._rename(f"{node.name}_{name}")
        return parts

    def decoder(self, val, traceable, op, parts: list[fx.Node], consts: tuple):
        """A function building the decode of ``parts`` in the backward graph."""
        shape, stride = list(val.shape), list(val.stride())
        contiguous = all(
            statically_known_true(a == b)
            for a, b in zip(stride, make_contiguous_strides_for(shape), strict=True)
        )

        def build(syms) -> fx.Node:
            if self.inline and contiguous:
                return _inline(self.bg, traceable, [*parts, *consts[:-1], syms(shape), *consts[-1:]])
            return call(self.bg, op, (*parts, *consts[:-1], syms(shape), syms(stride), *consts[-1:]))

        return build

    def store(
        self,
        reader: fx.Node,
        build: Callable,
        users: list[fx.Node] | None = None,
        fused: Callable[[], bool] | None = None,
    ) -> None:
        """Decode a stored value with ``build(syms)`` before the first backward use of ``reader``
        (its placeholder), or of ``users`` only (those comparisons of it); ``fused``: tried first
        at decode time, True when it replaced the decode and its consumers by one kernel."""
        self.stored.append((reader, build, users, fused))

    def decode_all(self) -> None:
        """Decode each stored value just before its first backward use."""
        syms = SymBuilder(self.bg)
        order = {n: i for i, n in enumerate(self.bg.nodes)}
        for ph, build, users, fused in self.stored:
            if fused is not None and fused():
                continue
            first = first_user(self.bg, ph) if users is None else min(users, key=order.__getitem__)
            with self.bg.inserting_before(first):
                value = build(syms)
            if users is None:
                ph.replace_all_uses_with(value)
            else:
                for u in users:
                    u.replace_all_uses_with(value)
                    self.bg.erase_node(u)
        for ph in dict.fromkeys(s[0] for s in self.stored):  # placeholders or normalised readers
            if ph.users:
                raise AssertionError(f"fxlowbit: saved value {ph.name} still has users after rewrite")
            self.bg.erase_node(ph)
        # identity ops left without users by moved comparisons, recomputations a normalised form
        # replaced; then the saved tensors only those used (LayerNorm's mean), forward and backward
        self.bg.eliminate_dead_code()
        for ph in self.dropped:
            if ph.users:
                raise AssertionError(f"fxlowbit: placeholder {ph.name} still has users after rewrite")
            self.bg.erase_node(ph)
        if self.dropped:
            unused = set()
            for p in self.bg.find_nodes(op="placeholder"):
                if not p.users and p.name in self.saved_names and isinstance(p.meta.get("val"), torch.Tensor):
                    unused.add(p.name)
                    self.bg.erase_node(p)
            self.new_outputs = self.new_outputs[: self.num_fwd] + [
                o for o in self.new_outputs[self.num_fwd :] if getattr(o, "name", None) not in unused
            ]
        self.out_node.args = (tuple(self.new_outputs),)


def run(
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    plan: Plan,
    *,
    num_fwd_outputs: int,
    group_size: int,
    stream: int,
    counters: Counter | None = None,
    inline: bool = False,
    fuse: bool = False,
    quant_op: bool = False,
) -> None:
    """Apply ``plan`` to the partitioned pair in place. ``inline``: trace the pure-torch pack and
    decode functions into the graphs (for Inductor to fuse) instead of calling the opaque ops;
    ``quant_op`` (with ``inline``): except the quantizing packs, which call the opaque op
    (``fxlowbit::quantize_pack``: on CPU one compiled kernel per family, codegen/kernels/quant_cpu.py;
    Inductor spends most of a compile generating C++ for traced quantizers); ``fuse``: on the ops
    path, generate one kernel per pointwise chain + packing (codegen/fusion.py)."""
    rw = Rewriter(
        inline,
        fuse,
        quant_op,
        fw,
        bw,
        num_fwd_outputs,
        group_size,
        stream,
        Counter() if counters is None else counters,
    )
    decisions = plan.by_name()
    rw.exact = {  # saved values the backward will read as they are
        name for name in rw.placeholders
        if name in rw.saved_names and forms.get(getattr(decisions.get(name), "form", Form.KEEP)).keeps_value
    }  # fmt: skip
    for node in rw.outputs[num_fwd_outputs:]:
        d = decisions.get(node.name) if isinstance(node, fx.Node) else None
        ph = rw.placeholders.get(getattr(node, "name", None))
        if d is None or ph is None or (form := forms.get(d.form)).stored_as_is:
            rw.new_outputs.append(node)
            continue
        form.rewrite(rw, node, ph, d)
        log.debug("%s: %s %s bits, %d -> %d bytes", node.name, d.form, d.bits, d.bytes_before, d.bytes_after)
    rw.decode_all()
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()
