"""Generated fusions: a chain of pointwise producers ending in a quantized saved tensor becomes ONE
kernel that writes the forward value and its packed copy; the backward's pointwise consumers of a
decoded tensor become one kernel that decodes and applies them.

This module is the entry point; the work is split by responsibility:

- :mod:`.fusion_spec`: what a fusion computes: the supported aten ops (:data:`OPS`), the chain as
  a :class:`Spec` (JSON, so it travels as a string argument of the ``fxlowbit::fused_*`` ops) and
  the pure-torch :func:`reference`, which replays the same aten ops;
- :mod:`.fusion_match`: :func:`match` / :func:`match_consumer` read chains off FX graphs;
- :mod:`.fusion_source`: :func:`source` / :func:`source_consumer` write a spec's Triton kernel
  (the chain in fp32, rounded where the graph's values are, then the packing of
  :mod:`.kernels.quant_triton`), a pure function of the spec;
- :mod:`.fusion_load`: :func:`kernel` writes the source to a file (``FXLOWBIT_DUMP_DIR`` or a
  temporary directory), imports it and keeps the compiled kernel.
"""

from __future__ import annotations

from .fusion_load import kernel
from .fusion_match import match, match_consumer
from .fusion_source import source, source_consumer
from .fusion_spec import OPS, Spec, reference

__all__ = ["Spec", "match", "match_consumer", "source", "source_consumer", "reference", "kernel", "OPS"]
