"""Rewrite: linear layers -> ``fxlowbit::sampled_linear_keyed``, whose backward GEMMs run on sampled
token rows (the ``sampling`` option; VCAS, Wang, Chen, Zhu 2024).

Linears are ``F.linear`` calls and ``torch.addmm(b, x, w)`` with a 1-D bias (``transformers``'
Conv1D: GPT-2's linears, weight (in, out), sampled as the linear of its transpose). Runs on Dynamo's
FX graph after :mod:`.sparsity` and :mod:`.lowbit_gemm` (a linear already made 2:4 sparse or given
an INT8/FP8 GEMM is no longer a plain linear and stays as it is). Per plain linear left: when the
option is on, ``sampling_filter`` matches its module, it needs a gradient, and the hardware profile
says the backward GEMMs it could skip are worth more than gathering the kept rows (:func:`choose`),
it becomes ``sampled_linear_keyed(x, w, b, draw_seed(x, stream), key)``: forward ``F.linear``,
backward :func:`fxlowbit.codegen.kernels.sampled_linear.backward` at the keep ratios of registry
entry ``key`` (codegen/kernels/sampling_state.py), which adapt after every backward.
Counters: ``sampled_linear`` per rewritten linear, ``sampling_declined`` per linear the cost model
leaves, ``sampling_lowbit_kept`` per linear left because it runs low-bit GEMMs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import torch
import torch.fx as fx

from ..codegen.kernels import sampling_state
from ..codegen.ops import draw_seed  # noqa: F401  (registers fxlowbit::draw_seed)
from ..config import LowbitConfig
from ..costmodel import HardwareProfile
from . import linears

log = logging.getLogger(__name__)

__all__ = ["run", "choose", "Choice", "KEEP_PLANNED"]

KEEP_PLANNED = 0.5  # the keep ratio the cost model prices a linear at (the controller then adapts it)
MIN_GAIN = 1.5  # the skipped GEMM time must exceed the gather/scatter/score time this many times


@dataclasses.dataclass(frozen=True)
class Choice:
    sample: bool
    saved_s: float  # backward GEMM seconds skipped at KEEP_PLANNED
    overhead_s: float  # row norms, probabilities, gathers and scatters
    reason: str
    max_useful: float  # the keep ratio above which the skipped GEMM time no longer covers the overhead


def choose(mnk: tuple[int, int, int], dtype: torch.dtype, profile: HardwareProfile) -> Choice:
    """Whether sampling a linear of (tokens, out, in) ``mnk`` pays, by the profile: the two backward
    GEMMs' time times ``1 - KEEP_PLANNED`` against the memory traffic sampling adds (row norms of g
    and x, a gather of the kept rows of g and x, the scatter of dx: about three passes over
    ``N (in + out)`` elements at the profile's copy bandwidth), which must be ``MIN_GAIN`` times
    smaller. (Measured on the 2-core CPU, 1 thread, N=4096, in=out=512 fp32: the sampled backward
    took 0.76-0.87x the dense one at keep 0.5 and 0.50-0.57x at keep 0.25, so the gathers cost about
    a quarter of the dense backward there; at N=1024, 128 wide they cost more than they save.)

        >>> from fxlowbit.costmodel import load_profile
        >>> choose((4096, 512, 512), torch.float32, load_profile("cpu")).sample
        True
    """
    n, d_out, d_in = mnk
    dname = str(dtype).removeprefix("torch.")
    gemm = 2 * profile.matmul_time(2.0 * n * d_in * d_out, dname)
    saved = gemm * (1 - KEEP_PLANNED)
    overhead = 3.0 * n * (d_in + d_out) * dtype.itemsize / (profile.copy_gbps * 1e9)
    sample = saved >= MIN_GAIN * overhead
    why = (
        f"skips {saved * 1e3:.3g} ms of backward GEMMs at keep {KEEP_PLANNED} for {overhead * 1e3:.3g} ms "
        "of gathers"
    )
    useful = min(1.0, max(0.0, 1 - overhead / gemm)) if gemm > 0 else 0.0
    return Choice(sample, saved, overhead, ("sampled: " if sample else "exact: ") + why, useful)


def run(
    gm: fx.GraphModule,
    cfg: LowbitConfig,
    *,
    stream: int,
    profile: HardwareProfile,
    counters: Counter | None = None,
) -> list[int]:
    """Rewrite the linears of ``gm`` worth sampling; returns their registry keys."""
    counters = counters if counters is not None else Counter()
    lowbit = len(gm.graph.find_nodes(op="call_function", target=torch.ops.fxlowbit.lowbit_linear.default))
    if lowbit:  # their backward GEMMs run low-bit instead (passes/lowbit_gemm.py)
        counters["sampling_lowbit_kept"] += lowbit
        log.info("sampling: %d linears run low-bit GEMMs and are not sampled", lowbit)
    return linears.rewrite_each(
        gm,
        lambda node: _consider(gm.graph, node, cfg, profile, stream, counters),
        linears.LINEAR_OR_CONV1D,
    )


def _consider(graph, node, cfg: LowbitConfig, profile, stream: int, counters: Counter) -> int | None:
    found = linears.args_of(node)
    if found is None:
        return None
    (x, w, b), (xv, wv, bv, yv) = found
    if linears.unsupported(xv, wv, b, bv, yv) or not (xv.requires_grad or wv.requires_grad):
        return None
    assert xv is not None and wv is not None and yv is not None
    name = linears.module_name(node)
    if not cfg.sampled(name):
        return None
    mnk = linears.mnk(xv, wv)
    forced = cfg.sampling_keep
    choice = choose(mnk, yv.dtype, profile)
    if forced is None and not choice.sample:
        counters["sampling_declined"] += 1
        log.debug("sampling: %s (%s, M N K %s) exact: %s", node.name, name, mnk, choice.reason)
        return None
    key = sampling_state.new_key(name, mnk, fixed=forced, max_useful=choice.max_useful)

    def build(add, x, w, b):
        seed = add(torch.ops.fxlowbit.draw_seed.default, x, stream)
        w = linears.weight_of(add, node, w)
        return add(torch.ops.fxlowbit.sampled_linear_keyed.default, x, w, b, seed, key)

    linears.replace(graph, node, x, w, b, yv.dtype, build)
    counters["sampled_linear"] += 1
    log.debug("sampling: %s (%s, M N K %s) -> key %d: %s", node.name, name, mnk, key, choice.reason)
    return key
