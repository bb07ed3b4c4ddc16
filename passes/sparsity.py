"""Rewrite: linear layers -> 2:4 sparse linears (the ``sparsity="2:4"`` option, while training).

Runs on Dynamo's FX graph before :mod:`.lowbit_gemm`, so sparsity takes precedence over the GEMM
formats: a linear its module matches in ``sparsity_filter`` (default: every one) whose weight sizes
are both multiples of 4 becomes ``fxlowbit::sparse24_linear(x, w, b, mask, seed, mvue=True,
masked_grad=True)`` with ``mask = fxlowbit::sparse24_mask(w, key, sparsity_refresh,
sparsity_dense_after)``: a stateful op keeping the linear's transposable mask across steps under a
``key`` this pass assigns (codegen/kernels/sparse24_mask.py; key -> module path in its
``MODULES``), and ``seed`` a draw of ``stream`` for the MVUE grad-weight GEMM. Its GEMMs stay in the
linear's dtype. Counters: ``sparse24`` per sparse linear, ``sparsity_declined`` per matching linear
whose sizes are not multiples of 4 (it then gets the GEMM formats as usual).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import torch
import torch.fx as fx

from ..codegen import rng
from ..codegen.kernels import sparse24_mask as _masks
from ..codegen.ops import draw_seed  # noqa: F401  (registers fxlowbit::draw_seed)
from ..config import LowbitConfig
from . import linears

log = logging.getLogger(__name__)

__all__ = ["run", "SparseLinear"]


@dataclasses.dataclass(frozen=True)
class SparseLinear:
    """One linear this pass made 2:4 sparse."""

    node: str  # the linear's node name in the Dynamo graph
    module: str  # dotted module path ("" at the top level or unknown)
    mnk: tuple[int, int, int]  # tokens, out features, in features (at the example sizes)
    key: int  # its mask's sparse24_mask registry key


def run(
    gm: fx.GraphModule, cfg: LowbitConfig, *, stream: int = -1, counters: Counter | None = None
) -> list[SparseLinear]:
    """Make every matching linear of ``gm`` 2:4 sparse. ``stream``: the random stream of the MVUE
    seeds (:mod:`fxlowbit.codegen.rng`; negative: a new stream per linear)."""
    counters = counters if counters is not None else Counter()
    return linears.rewrite_each(gm, lambda node: _consider(gm.graph, node, cfg, stream, counters))


def _consider(graph, node, cfg: LowbitConfig, stream: int, counters: Counter) -> SparseLinear | None:
    found = linears.linear_args(node)
    if found is None:
        return None
    (x, w, b), (xv, wv, bv, yv) = found
    name = linears.module_name(node)
    if linears.unsupported(xv, wv, b, bv, yv) or not cfg.sparse(name):
        return None  # the GEMM pass skips (and counts) an unsupported linear
    mnk = linears.mnk(xv, wv)
    if mnk[1] % 4 or mnk[2] % 4 or any(isinstance(d, torch.SymInt) for d in wv.shape):
        counters["sparsity_declined"] += 1
        log.debug("sparsity: %s (%s) not 2:4: weight %s", node.name, name, tuple(wv.shape))
        return None
    key = _masks.new_key(name)
    stream = stream if stream >= 0 else rng.new_stream(key)
    dense_after = -1 if cfg.sparsity_dense_after is None else cfg.sparsity_dense_after

    def build(add, x, w, b):
        mask = add(torch.ops.fxlowbit.sparse24_mask.default, w, key, cfg.sparsity_refresh, dense_after)
        seed = add(torch.ops.fxlowbit.draw_seed.default, x, stream)
        # the op itself (any rank), not a Python wrapper: AOTAutograd's cache keeps the graph
        return add(torch.ops.fxlowbit.sparse24_linear.default, x, w, b, mask, seed, True, True)

    linears.replace(graph, node, x, w, b, yv.dtype, build)
    counters["sparse24"] += 1
    log.debug("sparsity: %s (%s, M N K %s) -> 2:4 sparse, mask key %d", node.name, name, mnk, key)
    return SparseLinear(node.name, name, mnk, key)
