"""Rewrite: store saved tensors in the forms a :class:`~fxlowbit.plan.Plan` chose.

Forward: right after each compressed tensor's producer, insert its packing (for comparison masks
first the scalar comparisons the backward would make) and return the packed parts in its place
among the saved outputs. Packing and decoding are either the opaque ``fxlowbit::`` ops or, for
Inductor, the same pure-torch references traced into the graph so that Inductor fuses them.
Backward: replace its placeholder by placeholders for the parts
and decode them once, just before the first use (all backward readers share that one decode), so
only the activations in use are live in full precision.

Normalised form: when the backward only uses a quantized tensor ``x`` to recompute a value the
forward also computed from saved tensors (LayerNorm's ``(x - mean) * rstd``), that value is
quantized in ``x``'s place and the backward's recomputation is dropped (:func:`_normalised`).
Rounding errors then stay the size of the normalised values: rounding ``x`` itself would be
multiplied by ``rstd``, which is 1e6 on a constant row (a zero-initialised token) with eps=1e-12.

Relies on AOTAutograd matching saved forward outputs and backward placeholders by position; order
is kept, ``meta["val"]`` is set on every new node and both graphs are linted and recompiled.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Container

import torch
import torch.fx as fx
from torch._prims_common import make_contiguous_strides_for
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..codegen import fusion
from ..codegen.kernels.bitmask import (
    pack_bits_traceable,
    pack_mask_traceable,
    unpack_bits_traceable,
    unpack_mask_traceable,
)
from ..codegen.kernels.quant import dequantize_unpack_traceable, quantize_pack_traceable
from ..plan import Form, Plan
from . import _ops
from ._graph import SymBuilder, call, first_user, placeholder_like, through_identities
from ._inline import inline as _inline
from .analyze import int_range

log = logging.getLogger(__name__)
lowbit = torch.ops.fxlowbit

__all__ = ["run"]


class _Rewriter:
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
        # (old placeholder, decode builder, comparison users or None, (parts, bits) of a quantized one)
        self.stored: list = []
        self.seed: fx.Node | None = None  # this graph's seed node (inline mode)
        self.n_seeded = 0
        self.dropped: list[fx.Node] = []  # backward placeholders replaced by a normalised form
        self.fw_nodes = {n.name: n for n in self.fg.nodes}  # for _normalised (names are stable)
        self.exact: set[str] = set()  # saved names stored as they are (run() fills it)

    def emit(self, node: fx.Node, ph: fx.Node, parts: list[fx.Node]) -> list[fx.Node]:
        """Return ``parts`` from the forward in ``node``'s place; matching backward placeholders."""
        for p in parts:
            if "saved_tensor_with_no_vc_check" in node.meta:
                p.meta["saved_tensor_with_no_vc_check"] = node.meta["saved_tensor_with_no_vc_check"]
        self.new_outputs.extend(parts)
        return [placeholder_like(self.bg, ph, p) for p in parts]

    def _graph_seed(self) -> fx.Node:
        """One seed drawn per forward call, at the top of the graph; tensor k uses ``seed + k``
        (the noise hash mixes the seed, so consecutive seeds give unrelated streams)."""
        if self.seed is None:
            phs = [
                p for p in self.fg.find_nodes(op="placeholder") if isinstance(p.meta.get("val"), torch.Tensor)
            ]
            with self.fg.inserting_after(self.fg.find_nodes(op="placeholder")[-1]):
                self.seed = call(self.fg, lowbit.draw_seed.default, (phs[0], self.stream), "lowbit_seed")
        return self.seed

    def _pack(
        self, node: fx.Node, fn, op, args: tuple, names: list[str], seeded: bool = False, traced: bool = True
    ):
        """Insert the packing of ``node`` right after its producer: traced ``fn`` (inline mode, unless
        ``traced`` is False) or the opaque ``op``. ``seeded``: stochastic, takes a seed (traced) or
        the stream id (op). A graph input (an earlier graph's activation) is packed after the last
        placeholder and the seed."""
        anchor = node
        inline = self.inline and traced
        if node.op == "placeholder":
            anchor = self._graph_seed() if inline and seeded else self.fg.find_nodes(op="placeholder")[-1]
        with self.fg.inserting_before(anchor.next):
            if inline and seeded:
                seed = call(self.fg, torch.ops.aten.add.Tensor, (self._graph_seed(), self.n_seeded))
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

    def _decoder(self, val, traceable, op, parts: list[fx.Node], consts: tuple):
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

    def _fused(self, node: fx.Node, bits: int) -> list[fx.Node] | None:
        """Replace the pointwise chain producing ``node`` and its packing by one generated kernel
        (codegen/fusion.py): returns the packed parts, or None if the chain does not match."""
        found = fusion.match(node)
        if found is None:
            return None
        spec, inputs, chain = found
        val = node.meta["val"]
        with self.fg.inserting_before(node.next):
            args = (inputs, spec.to_json(), list(val.shape), val.dtype, bits, self.group_size, self.stream)
            fused = call(self.fg, lowbit.fused_quantize_pack.default, args)
            value, codes, meta = (call(self.fg, operator.getitem, (fused, i)) for i in range(3))
        node.replace_all_uses_with(value, delete_user_cb=lambda u: u not in (fused, value, codes, meta))
        self.outputs = [value if o is node else o for o in self.outputs]
        self.new_outputs = [value if o is node else o for o in self.new_outputs]
        for n in reversed(chain):
            if not n.users:
                self.fg.erase_node(n)
        value._rename(f"{node.name}_fused")
        codes._rename(f"{value.name}_codes")
        meta._rename(f"{value.name}_qmeta")
        self.counters["fused_pack"] += 1
        return [codes, meta]

    def quant(self, node: fx.Node, ph: fx.Node, bits: int) -> None:
        reader = ph  # the backward node the decoded value replaces
        rebuild = None  # (mean, rstd) backward placeholders: x = decoded / rstd + mean
        normal = _normalised(ph, self.fw_nodes)
        if normal is not None:  # store the forward's normalised value in node's place
            self.dropped.append(ph)
            node, reader = normal
            self.counters["saved_normalised"] += 1
        elif (std := standardised(node, self.exact)) is not None:
            node, *rebuild = std
            rebuild = [self.placeholders[n.name] for n in rebuild]
            self.counters["saved_standardised"] += 1
        # inline kernels decode contiguously: a permuted tensor (attention's q/k/v) is packed in
        # memory order and its decode permuted back, a view with the original strides (no copy)
        perm = _memory_order(node.meta["val"]) if self.inline else None
        src = node
        if perm is not None:
            with self.fg.inserting_after(node):
                src = call(self.fg, torch.ops.aten.permute.default, (node, perm))
        val = src.meta["val"]
        packed = self._fused(node, bits) if self.fuse and not self.inline else None
        packed = packed or self._pack(
            src,
            quantize_pack_traceable,
            lowbit.quantize_pack.default,
            (bits, self.group_size),
            ["codes", "qmeta"],
            seeded=True,
            traced=not self.quant_op,
        )
        if perm is not None:
            for part, name in zip(packed, ("codes", "qmeta"), strict=True):
                part._rename(f"{node.name}_{name}")
        parts = self.emit(node, ph, packed)
        decode = self._decoder(
            val,
            dequantize_unpack_traceable,
            lowbit.dequantize_unpack.default,
            parts,
            (bits, self.group_size, val.dtype),
        )
        if perm is not None:
            inverse = sorted(range(len(perm)), key=perm.__getitem__)
            contiguous_decode = decode

            def decode(syms):
                return call(self.bg, torch.ops.aten.permute.default, (contiguous_decode(syms), inverse))

            self.counters["saved_permuted"] += 1
        if rebuild is not None:
            standard_decode = decode

            def decode(syms):
                y = standard_decode(syms)
                x = call(self.bg, torch.ops.aten.div.Tensor, (y, rebuild[1]))
                return call(self.bg, torch.ops.aten.add.Tensor, (x, rebuild[0]))

        # a rebuilt value is not what the backward's pointwise consumers read: no fused decode
        self.stored.append((reader, decode, None, (parts, bits) if rebuild is None else None))
        self.counters[f"saved_quant{bits}"] += 1

    def _mask_parts(self, node: fx.Node, ph: fx.Node, source: fx.Node, name: str):
        packed = self._pack(source, pack_mask_traceable, lowbit.pack_mask.default, (), [name])
        parts = self.emit(node, ph, packed)
        return self._decoder(source.meta["val"], unpack_mask_traceable, lowbit.unpack_mask.default, parts, ())

    def mask(self, node: fx.Node, ph: fx.Node) -> None:
        self.stored.append((ph, self._mask_parts(node, ph, node, "bits"), None, None))
        self.counters["saved_mask"] += 1

    def packed(self, node: fx.Node, ph: fx.Node, bits: int) -> None:
        """Store integers of a known range (max-pool window offsets) as ``bits``-wide fields."""
        found = int_range(node)
        if found is None:
            raise ValueError(f"fxlowbit: the plan packs {node.name}, whose value range is unknown")
        lo, val = found[0], node.meta["val"]
        parts = self.emit(
            node, ph, self._pack(node, pack_bits_traceable, lowbit.pack_bits.default, (bits, lo), ["bits"])
        )
        decode = self._decoder(
            val, unpack_bits_traceable, lowbit.unpack_bits.default, parts, (bits, lo, val.dtype)
        )
        self.stored.append((ph, decode, None, None))
        self.counters["saved_packed"] += 1

    def comparisons(self, node: fx.Node, ph: fx.Node) -> None:
        """Move the backward's scalar comparisons of ``node`` into the forward as 1-bit masks."""
        groups: dict[tuple, list[fx.Node]] = {}
        for user in through_identities(ph):
            if user.op == "call_function" and user.target.overloadpacket in _ops.COMPARISONS:
                groups.setdefault((user.target, user.args[1]), []).append(user)
        for (target, scalar), users in groups.items():
            with self.fg.inserting_after(node):
                cmp = call(self.fg, target, (node, scalar))
            self.stored.append((ph, self._mask_parts(node, ph, cmp, "cmpbits"), users, None))
            self.counters["saved_cmp_mask"] += 1

    def _fused_decode(self, ph: fx.Node, parts: list[fx.Node], bits: int) -> bool:
        """Replace the decode of ``ph`` and the backward's pointwise ops consuming it by one
        generated kernel (codegen/fusion.py); False if they do not form a single-sink chain."""
        found = fusion.match_consumer(ph)
        if found is None:
            return False
        spec, inputs, chain = found
        sink, val = chain[-1], ph.meta["val"]
        out = sink.meta["val"]
        with self.bg.inserting_before(sink):
            shapes = (list(val.shape), list(out.shape))
            args = (*parts, inputs, spec.to_json(), bits, self.group_size, *shapes, val.dtype, out.dtype)
            fused = call(self.bg, lowbit.fused_dequantize_apply.default, args)
        sink.replace_all_uses_with(fused)
        for n in reversed(chain):
            self.bg.erase_node(n)
        fused._rename(f"{ph.name}_fused_decode")
        self.counters["fused_unpack"] += 1
        return True

    def decode_all(self) -> None:
        """Decode each stored value just before its first backward use."""
        syms = SymBuilder(self.bg)
        order = {n: i for i, n in enumerate(self.bg.nodes)}
        for ph, build, users, quant in self.stored:
            if quant is not None and self.fuse and not self.inline and self._fused_decode(ph, *quant):
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


def standardised(node: fx.Node, saved: Container[str]) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(y, mean, rstd)`` when the forward computes ``y = (node - mean) * rstd`` with ``mean`` and
    ``rstd`` saved as they are (their names in ``saved``) and ``y`` of ``node``'s shape and dtype: BatchNorm's
    decomposition in training, whose backward reads ``node - mean`` and never ``y``. Storing ``y``
    and rebuilding ``node = y / rstd + mean`` in the backward keeps the rounding error the size of
    the standardised values (``rstd`` cancels it where the backward scales ``node - mean`` by it);
    rounding ``node`` itself spans the channels' different means and scales in one group."""
    ref = node.meta.get("val")
    if not isinstance(ref, torch.Tensor):
        return None
    aten = torch.ops.aten
    for sub in node.users:
        if sub.target != aten.sub.Tensor or sub.args[0] is not node or sub.kwargs:
            continue
        mean = sub.args[1]
        for mul in sub.users:
            if mul.target != aten.mul.Tensor or mul.kwargs or sub not in mul.args:
                continue
            rstd = mul.args[1] if mul.args[0] is sub else mul.args[0]
            val = mul.meta.get("val")
            if (
                isinstance(mean, fx.Node)
                and isinstance(rstd, fx.Node)
                and mean.name in saved
                and rstd.name in saved
                and isinstance(val, torch.Tensor)
                and val.dtype == ref.dtype
                and list(val.shape) == list(ref.shape)
                and val.is_contiguous()
            ):
                return mul, mean, rstd
    return None


def _memory_order(val) -> list[int] | None:
    """The permutation of dims listing ``val``'s strides from largest to smallest when that makes
    a non-contiguous tensor contiguous (a permuted dense tensor, static strides); else None."""
    if not isinstance(val, torch.Tensor) or val.is_contiguous():
        return None
    if any(not isinstance(d, int) for d in (*val.shape, *val.stride())):
        return None
    strides = val.stride()
    perm = sorted(range(val.dim()), key=lambda d: (-strides[d], d))
    return perm if val.permute(perm).is_contiguous() else None


def _mirror(n: fx.Node, fw_nodes: dict[str, fx.Node], memo: dict) -> fx.Node | None:
    """The forward node computing what backward node ``n`` computes: saved placeholders map to
    their forward node by name, ops to a forward op with the same target on mirrored arguments."""
    if n in memo:
        return memo[n]
    memo[n] = None
    if n.op == "placeholder":
        memo[n] = fw_nodes.get(n.name)
    elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and not n.kwargs:
        args = [_mirror(a, fw_nodes, memo) if isinstance(a, fx.Node) else a for a in n.args]
        first = next((a for a in args if isinstance(a, fx.Node)), None)
        if first is not None and all(a is not None for a in args):
            memo[n] = next(
                (u for u in first.users if u.target == n.target and not u.kwargs and list(u.args) == args),
                None,
            )
    return memo[n]


def _normalised(ph: fx.Node, fw_nodes: dict[str, fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """``(forward node, backward node)`` when every backward use of saved ``ph`` is a replay of
    forward ops ending in ONE node of ``ph``'s size and dtype (LayerNorm's ``(x - mean) * rstd``),
    else None. The backward node's value is what the backward really reads: storing it instead of
    ``ph`` puts the rounding error where the gradient formula sees it, not scaled by ``rstd``.
    ``fw_nodes``: the forward graph's nodes by name."""
    memo: dict = {}
    region, frontier, stack = set(), [], [ph]
    while stack:
        n = stack.pop()
        if n in region:
            continue
        region.add(n)
        users = list(n.users)
        if not users or len(region) > 8:
            return None
        mirrored = [u for u in users if _mirror(u, fw_nodes, memo) is not None]
        if len(mirrored) == len(users):
            stack.extend(mirrored)
        elif mirrored or n is ph:
            return None  # read both raw and replayed, or not replayed at all
        else:
            frontier.append(n)
    if len(frontier) != 1:
        return None
    (out,) = frontier
    val, ref = out.meta.get("val"), ph.meta["val"]
    if (
        not isinstance(val, torch.Tensor)
        or val.dtype != ref.dtype
        or list(val.shape) != list(ref.shape)
        or not val.is_contiguous()
    ):
        return None
    fw_out = _mirror(out, fw_nodes, memo)
    assert fw_out is not None  # out is on the frontier because it was mirrored (memo holds it)
    return fw_out, out


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
    rw = _Rewriter(
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
        if name in rw.saved_names and getattr(decisions.get(name), "form", Form.KEEP) == Form.KEEP
    }  # fmt: skip
    for node in rw.outputs[num_fwd_outputs:]:
        d = decisions.get(node.name) if isinstance(node, fx.Node) else None
        ph = rw.placeholders.get(getattr(node, "name", None))
        if d is None or d.form in (Form.KEEP, Form.RECOMPUTE) or ph is None:
            rw.new_outputs.append(node)
            continue
        if d.masks:
            rw.comparisons(node, ph)
        if d.form == Form.QUANT:
            rw.quant(node, ph, d.bits - d.masks)
        elif d.form == Form.MASK:
            rw.mask(node, ph)
        elif d.form == Form.PACKED:
            rw.packed(node, ph, d.bits)
        elif d.form != Form.CMP_MASK:
            raise ValueError(f"fxlowbit: unknown form {d.form!r} for {node.name}")
        log.debug("%s: %s %s bits, %d -> %d bytes", node.name, d.form, d.bits, d.bytes_before, d.bytes_after)
    rw.decode_all()
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()
