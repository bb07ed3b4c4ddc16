"""Rewrite: linear layers -> ``fxlowbit::lowbit_linear``, each GEMM in the format chosen for it.
Linears are ``F.linear`` calls and ``torch.addmm(b, x, w)`` with a 1-D bias (``transformers``'
Conv1D, GPT-2's linears: weight (in, out), run as the linear of its transpose).

Runs on Dynamo's FX graph (torch-level ops) before AOTAutograd, like :mod:`.linear_ce`: there a
linear is one ``torch._C._nn.linear`` node (``nn.Linear`` and ``F.linear`` alike) carrying its
module path, and the replacement op brings its own backward, so the joint graph needs no surgery
and the low-bit copy of x it saves is what the partition saves. Per linear, the forward,
grad-input and grad-weight GEMMs get a format from the config (``gemm``, ``gemm_filter`` by module
name) or, for "auto", from :func:`fxlowbit.costmodel.gemm_choice` at the example sizes. Left as
they are: inputs of fewer than 2 dims, dtypes other than fp32/bf16/fp16, weights not 2-D, tensors
on different devices, and linears whose three GEMMs all stay plain.

Linears made 2:4 sparse by :mod:`.sparsity`, which runs first, are no longer plain linears.
Shared with the other linear rewrites: :mod:`.linears` (matching, module paths, replacement).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections import Counter

import torch
import torch.fx as fx

from ..codegen.kernels.lowbit_linear import LOWBIT, plain_format, saves_codes
from ..config import GEMM_ROLES, LowbitConfig
from ..costmodel import HardwareProfile, gemm_choice, load_profile
from . import linears

log = logging.getLogger(__name__)

__all__ = ["run", "LinearFormats", "formats_for"]


@dataclasses.dataclass(frozen=True)
class LinearFormats:
    """The GEMM formats the pass chose for one linear (plain ones included)."""

    node: str  # the linear's node name in the Dynamo graph
    module: str  # dotted module path ("" at the top level or unknown)
    mnk: tuple[int, int, int]  # tokens, out features, in features (at the example sizes)
    formats: tuple[str, str, str]  # forward, grad-input, grad-weight
    reasons: tuple[str, str, str]
    hadamard: int


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


AUTO_GRAD_WEIGHT = "grad-weight GEMMs stay plain (SwitchBack's split; int8 ones trained worse)"
"""Why "auto" never picks a low-bit grad-weight GEMM (SwitchBack's split: int8 forward and
grad-input, plain grad-weight; ``gemm``/``gemm_filter`` still force one). Its stochastic rounding
of the output gradient along the tokens adds variance the planner did not count when this rule
was made (the replays ran the gradient GEMMs plain), and training showed it: issue 18's
Llama (benchmarks/speed.py, planned from this machine's 1-thread profile, 150 steps, seeds 0/1/2,
2026-12-06) ended at held-out losses 1.024x / 1.130x / 1.663x Inductor's with "auto" picking int8
for all three GEMMs of most linears (at 2755bd0; 1.023x / 1.150x / 1.128x at 37f63f1), against
1.021x / 1.004x / 0.989x with ``gemm=("int8", "int8", "off")`` on every linear, at 0.70x
Inductor's step instead of 0.61x. Since then the low-bit gradient GEMMs' noise is measured on
the first batch and at each probe and counted in ``max_variance_ratio``; over it on its own they
turn plain (fxlowbit/adaptive.py; that Llama's 29 int8 grad-input GEMMs: 2.1e-4 of the gradient
power on the first batch, 2026-12-07). That measure does not see the grad-weight GEMMs' damage:
with ``gemm="int8"`` on the same Llama it read 2.3e-4 on the first batch and 2.5e-4 at step 11,
well inside 0.05 (the whole gradient's variance; why training still went wrong is not
established, Adam's per-parameter scaling being one suspect), so the rule stays. With the
grad-weight GEMM plain the op saves ``x`` as is, which
the planner may replay or round, so tight budgets keep the forward and grad-input GEMMs low-bit
too."""


def formats_for(
    requested: tuple[str, str, str],
    mnk: tuple[int, int, int],
    dtype: torch.dtype,
    profile: HardwareProfile,
    capability: tuple[int, int] | None,
    *,
    lowered: bool = False,
) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """(formats, reasons) of a linear's (forward, grad-input, grad-weight) GEMMs from the requested
    config values ("auto" asks the cost model; "off" is the plain dtype's name). ``lowered``: the
    op's body is traced into the compiled graphs (passes/lower_linears.py), so the profile's
    ``linear_op_us`` (the opaque op pair's calls) is not paid. "auto" keeps the grad-weight GEMM
    plain (:data:`AUTO_GRAD_WEIGHT`)."""
    m, n, k = mnk
    plain, dname = plain_format(dtype), str(dtype).removeprefix("torch.")
    # (rows, cols, reduction, first operand a gradient) of y = x w^T, dx = dy w, dw = dy^T x
    shapes = ((m, n, k, False), (m, k, n, True), (n, k, m, True))
    formats, reasons = [], []
    saved = 0.0  # est. seconds the low-bit GEMMs "auto" chose save against plain ones
    for i, (want, (rows, cols, red, grad)) in enumerate(zip(requested, shapes, strict=True)):
        if want == "auto" and i == 2:
            formats.append(plain)
            reasons.append(f"auto: {AUTO_GRAD_WEIGHT}")
        elif want == "auto":
            c = gemm_choice(rows, cols, red, dname, profile, capability, gradient=grad)
            formats.append(c.fmt)
            reasons.append(f"auto: {c.reason}")
            saved += c.plain_s - c.lowbit_s[c.fmt] if c.fmt in LOWBIT else 0.0
        else:
            formats.append(plain if want == "off" else want)
            reasons.append("gemm_filter / gemm option" if want != "off" else "off by option")
    call = 0.0 if lowered else profile.linear_op_us * 1e-6
    if saves_codes(formats[0], formats[2]):  # the backward decodes the saved copy of x, (m, k), to fp32
        call += 4 * m * k / (profile.unpack_gbps[8] * 1e9)
    auto_low = [w == "auto" and f in LOWBIT for f, w in zip(formats, requested, strict=True)]
    forced_low = any(f in LOWBIT and not a for f, a in zip(formats, auto_low, strict=True))
    if saved and saved <= call and not forced_low:
        # the op's own cost (its calls; decoding the saved x) eats what the low-bit GEMMs save
        why = f"auto: low-bit GEMMs save est. {saved * 1e3:.3g} ms, the op costs {call * 1e3:.3g} ms"
        reasons = [why if a else r for a, r in zip(auto_low, reasons, strict=True)]
        formats = [plain if a else f for a, f in zip(auto_low, formats, strict=True)]
    return tuple(formats), tuple(reasons)  # type: ignore[return-value]


def run(
    gm: fx.GraphModule,
    cfg: LowbitConfig,
    *,
    stream: int = -1,
    profile: HardwareProfile | str | None = None,
    counters: Counter | None = None,
) -> list[LinearFormats]:
    """Rewrite every supported linear of ``gm`` whose formats are not all plain; returns a
    :class:`LinearFormats` per linear considered. ``stream``: the random stream of the gradients'
    stochastic rounding (:mod:`fxlowbit.codegen.rng`; negative: round to nearest)."""
    counters = counters if counters is not None else Counter()
    prof = load_profile(profile if profile is not None else cfg.profile)
    return linears.rewrite_each(
        gm,
        lambda node: _consider(gm.graph, node, cfg, prof, stream, counters),
        linears.LINEAR_OR_CONV1D,
        rewrote=lambda d: any(f in LOWBIT for f in d.formats),  # plain ones are only recorded
    )


def _consider(graph, node, cfg: LowbitConfig, prof, stream: int, counters: Counter) -> LinearFormats | None:
    """Choose the formats of one linear node and rewrite it when any is low-bit."""
    found = linears.args_of(node)
    if found is None:
        return None
    (x, w, b), (xv, wv, bv, yv) = found
    why = linears.unsupported(xv, wv, b, bv, yv)
    if why:
        counters["lowbit_gemm_skipped"] += 1
        log.debug("lowbit_gemm: %s left as is: %s", node.name, why)
        return None
    assert xv is not None and wv is not None and yv is not None  # _unsupported checked them
    name = linears.module_name(node)
    mnk = linears.mnk(xv, wv)
    lowered = cfg.inline_kernels(yv.device.type) and not cfg.gemm_hadamard  # passes/lower_linears.py
    formats, reasons = formats_for(
        cfg.gemm_formats(name), mnk, yv.dtype, prof, _capability(yv.device), lowered=lowered
    )  # fmt: skip
    low = formats[0] in LOWBIT
    hadamard = cfg.gemm_hadamard if low and mnk[2] % max(cfg.gemm_hadamard, 1) == 0 else 0
    decision = LinearFormats(node.name, name, mnk, formats, reasons, hadamard)
    if not any(f in LOWBIT for f in formats):
        counters["lowbit_gemm_declined"] += 1
        log.debug("lowbit_gemm: %s (%s) stays plain: %s", node.name, name, "; ".join(reasons))
        return decision
    args = (*formats, hadamard, stream)
    op = torch.ops.fxlowbit.lowbit_linear.default  # the op itself: AOTAutograd's cache keeps the graph

    def build(add, x, w, b):
        w = linears.weight_of(add, node, w)
        return add(operator.getitem, add(op, x, w, b, *args), 0)

    linears.replace(graph, node, x, w, b, yv.dtype, build)
    counters["lowbit_gemm"] += 1
    for role, fmt in zip(GEMM_ROLES, formats, strict=True):
        counters[f"lowbit_gemm_{role}_{fmt}"] += 1
    x_bytes = mnk[0] * mnk[2] * yv.dtype.itemsize
    saved = mnk[0] * (mnk[2] + 4) if saves_codes(formats[0], formats[2]) else x_bytes
    log.debug("lowbit_gemm: %s (%s, M N K %s) -> %s; saved x %d -> %d bytes; %s", node.name, name, mnk,
              "/".join(formats), x_bytes, saved, "; ".join(reasons))  # fmt: skip
    return decision
