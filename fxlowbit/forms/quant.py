"""Quant: b-bit per-group min/max affine codes with stochastic rounding (unbiased), groups of
``group_size`` elements along contiguous memory, an fp32 (lo, scale) pair per group; b in the
config's ``allowed_bits``. Adds gradient variance ``sensitivity / (2^b - 1)^2``
(:func:`fxlowbit.costmodel.quant_variance`). Comparison masks the backward also needs ride beside
it (:mod:`.cmp_mask`).

Rewrite: ``fxlowbit::quantize_pack`` right after the producer (or a generated kernel fusing its
pointwise chain, ``fuse``), ``fxlowbit::dequantize_unpack`` before the first backward use. What
it stores in ``x``'s place may be a normalised or standardised value (:mod:`.normalised`); a
permuted tensor is packed in memory order and its decode permuted back.
"""

from __future__ import annotations

from .. import costmodel as cm
from ..costmodel import Costs
from ..plan import Form
from . import SavedForm, Tensor, register
from .cmp_mask import comparison_masks, store_comparisons


@register
class Quant(SavedForm):
    name = Form.QUANT
    kinds = frozenset({"float"})
    color = "#0b5cad"
    carries_masks = True

    probed = True

    def measured_variance(self, sensitivity, d):
        return sensitivity / (2 ** (d.bits - d.masks) - 1) ** 2  # d.bits counts the masks beside it

    def offers(self, t: Tensor) -> list[tuple[Costs, str]]:
        cfg, n = t.cfg, t.n_masks
        mask_bytes, mask_time = comparison_masks(t)
        out = []
        for b in sorted(cfg.allowed_bits):
            if b < t.min_prior_bits and t.source == "prior":
                continue  # 2 bits need a measurement: a wrong prior there wrecks the gradient
            q = t.at(self.stored_bytes(t.s.numel, b, cfg.group_size, t.s.itemsize))
            seconds = (
                t.profile.pack_time(t.fp32_bytes, b) + t.profile.unpack_time(t.fp32_bytes, b) + mask_time
            )
            extra = f", plus {n} exact 1-bit comparison mask(s)" if n else ""
            why = f"{b}-bit stochastic rounding, groups of {cfg.group_size}{extra} ({t.source} sensitivity)"
            out.append(
                (Costs(self.name, b, q + mask_bytes, seconds, cm.quant_variance(t.sensitivity, b)), why)
            )
        return out

    def stored_bytes(self, numel, bits, group_size, itemsize, n_masks=1):
        import sympy

        groups = sympy.ceiling(numel / group_size)  # codes of whole groups plus fp32 (lo, scale)
        return groups * (group_size * bits // 8) + groups * 8

    def rewrite(self, rw, node, ph, d) -> None:
        if d.masks:
            store_comparisons(rw, node, ph)
        _quantize(rw, node, ph, d.bits - d.masks)

    def report_reason(self, d, plan, cfg):
        rule = f"uniform rule bits={cfg.bits}" if plan.status.startswith("uniform") else "to meet the budget"
        return f"quant, {rule}: {d.reason}"


def _quantize(rw, node, ph, bits: int) -> None:
    import torch

    from ..codegen.kernels.quant import dequantize_unpack_traceable, quantize_pack_traceable
    from ..passes._graph import call
    from .normalised import normalised, standardised

    ops, aten = torch.ops.fxlowbit, torch.ops.aten
    reader = ph  # the backward node the decoded value replaces
    rebuild = None  # (mean, rstd) backward placeholders: x = decoded / rstd + mean
    normal = normalised(ph, rw.fw_nodes)
    if normal is not None:  # store the forward's normalised value in node's place
        rw.dropped.append(ph)
        node, reader = normal
        rw.counters["saved_normalised"] += 1
    elif (std := standardised(node, rw.exact)) is not None:
        node, *rebuild = std
        rebuild = [rw.placeholders[n.name] for n in rebuild]
        rw.counters["saved_standardised"] += 1
    # inline kernels decode contiguously: a permuted tensor (attention's q/k/v) is packed in
    # memory order and its decode permuted back, a view with the original strides (no copy)
    perm = _memory_order(node.meta["val"]) if rw.inline else None
    src = node
    if perm is not None:
        with rw.fg.inserting_after(node):
            src = call(rw.fg, aten.permute.default, (node, perm))
    val = src.meta["val"]
    packed = _fused_pack(rw, node, bits) if rw.fuse and not rw.inline else None
    packed = packed or rw.pack(
        src,
        quantize_pack_traceable,
        ops.quantize_pack.default,
        (bits, rw.group_size),
        ["codes", "qmeta"],
        seeded=True,
        traced=not rw.quant_op,
    )
    if perm is not None:
        for part, name in zip(packed, ("codes", "qmeta"), strict=True):
            part._rename(f"{node.name}_{name}")
    parts = rw.emit(node, ph, packed)
    decode = rw.decoder(
        val,
        dequantize_unpack_traceable,
        ops.dequantize_unpack.default,
        parts,
        (bits, rw.group_size, val.dtype),
    )
    if perm is not None:
        inverse = sorted(range(len(perm)), key=perm.__getitem__)
        contiguous_decode = decode

        def decode(syms):
            return call(rw.bg, aten.permute.default, (contiguous_decode(syms), inverse))

        rw.counters["saved_permuted"] += 1
    if rebuild is not None:
        standard_decode = decode

        def decode(syms):
            y = standard_decode(syms)
            x = call(rw.bg, aten.div.Tensor, (y, rebuild[1]))
            return call(rw.bg, aten.add.Tensor, (x, rebuild[0]))

    # a rebuilt value is not what the backward's pointwise consumers read: no fused decode
    fused = None
    if rebuild is None and rw.fuse and not rw.inline:

        def fused() -> bool:
            return _fused_decode(rw, reader, parts, bits)

    rw.store(reader, decode, fused=fused)
    rw.counters[f"saved_quant{bits}"] += 1


def _fused_pack(rw, node, bits: int):
    """Replace the pointwise chain producing ``node`` and its packing by one generated kernel
    (codegen/fusion.py): returns the packed parts, or None if the chain does not match."""
    import operator

    import torch

    from ..codegen import fusion
    from ..passes._graph import call

    found = fusion.match(node)
    if found is None:
        return None
    spec, inputs, chain = found
    val = node.meta["val"]
    with rw.fg.inserting_before(node.next):
        args = (inputs, spec.to_json(), list(val.shape), val.dtype, bits, rw.group_size, rw.stream)
        fused = call(rw.fg, torch.ops.fxlowbit.fused_quantize_pack.default, args)
        value, codes, meta = (call(rw.fg, operator.getitem, (fused, i)) for i in range(3))
    node.replace_all_uses_with(value, delete_user_cb=lambda u: u not in (fused, value, codes, meta))
    rw.outputs = [value if o is node else o for o in rw.outputs]
    rw.new_outputs = [value if o is node else o for o in rw.new_outputs]
    for n in reversed(chain):
        if not n.users:
            rw.fg.erase_node(n)
    value._rename(f"{node.name}_fused")
    codes._rename(f"{value.name}_codes")
    meta._rename(f"{value.name}_qmeta")
    rw.counters["fused_pack"] += 1
    return [codes, meta]


def _fused_decode(rw, ph, parts: list, bits: int) -> bool:
    """Replace the decode of ``ph`` and the backward's pointwise ops consuming it by one
    generated kernel (codegen/fusion.py); False if they do not form a single-sink chain."""
    import torch

    from ..codegen import fusion
    from ..passes._graph import call

    found = fusion.match_consumer(ph)
    if found is None:
        return False
    spec, inputs, chain = found
    sink, val = chain[-1], ph.meta["val"]
    out = sink.meta["val"]
    with rw.bg.inserting_before(sink):
        shapes = (list(val.shape), list(out.shape))
        args = (*parts, inputs, spec.to_json(), bits, rw.group_size, *shapes, val.dtype, out.dtype)
        fused = call(rw.bg, torch.ops.fxlowbit.fused_dequantize_apply.default, args)
    sink.replace_all_uses_with(fused)
    for n in reversed(chain):
        rw.bg.erase_node(n)
    fused._rename(f"{ph.name}_fused_decode")
    rw.counters["fused_unpack"] += 1
    return True


def _memory_order(val) -> list[int] | None:
    """The permutation of dims listing ``val``'s strides from largest to smallest when that makes
    a non-contiguous tensor contiguous (a permuted dense tensor, static strides); else None."""
    import torch

    if not isinstance(val, torch.Tensor) or val.is_contiguous():
        return None
    if any(not isinstance(d, int) for d in (*val.shape, *val.stride())):
        return None
    strides = val.stride()
    perm = sorted(range(val.dim()), key=lambda d: (-strides[d], d))
    return perm if val.permute(perm).is_contiguous() else None
