"""The ``lowbit`` torch.compile backend: AOTAutograd with our partition function.

Dynamo graph -> AOTAutograd joint graph -> min-cut partition -> our pipeline (``config.PASSES``:
analyze, plan, rewrite_saved) -> inner compiler (Inductor by default, ``options={"inner": "eager"}`` for fast
runs). Registered through the ``torch_dynamo_backends`` entry point and on ``import fxlowbit``.

    >>> model = torch.compile(torch.nn.Linear(4, 4), backend="lowbit", options={"bits": 4})
"""

from __future__ import annotations

import functools
import importlib
import itertools
import logging
import warnings
from collections import Counter
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from . import (
    codegen,  # noqa: F401  (registers the fxlowbit:: ops)
    passes,
    planner,
)
from .codegen import rng
from .config import LowbitConfig
from .plan import Plan

log = logging.getLogger(__name__)

__all__ = ["lowbit", "last_plans", "reset", "counters", "LowbitPartitioner"]

_last_plans: list[Plan] = []
_ordinal = itertools.count()
counters: Counter = Counter()  # what the rewrites did; tests assert it (expected zeros included)


def last_plans() -> list[Plan]:
    """Plans of every graph compiled since the last :func:`reset`, in compilation order (a model
    with graph breaks has several)."""
    return list(_last_plans)


def reset() -> None:
    """Forget recorded plans and zero the counters (``torch._dynamo.reset()`` does not)."""
    _last_plans.clear()
    counters.clear()


class LowbitPartitioner(CustomPartitionerFn):
    """Min-cut partition, then store each saved tensor in the form the planner chose."""

    def __init__(self, cfg: LowbitConfig, seed: int) -> None:
        self.cfg = cfg
        self.stream = rng.new_stream(seed)

    def uuid(self) -> Any | None:
        return None  # plans and random streams are per compilation: never reuse cached code

    def __call__(
        self, joint: fx.GraphModule, joint_inputs, **kwargs
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        kwargs.pop("compiler", None)
        partition = functools.partial(min_cut_rematerialization_partition, compiler="inductor", **kwargs)
        fw, bw = partition(joint, joint_inputs)
        try:
            self._compress(fw, bw, kwargs["num_fwd_outputs"])
        except Exception as err:  # never lose the user's training step to a bug of ours
            if self.cfg.strict:
                raise
            warnings.warn(
                f"fxlowbit: internal error while compressing saved tensors ({type(err).__name__}: {err}); "
                "this graph runs uncompressed",
                stacklevel=2,
            )
            counters["fallback_internal_error"] += 1
            fw, bw = partition(joint, joint_inputs)
        return fw, bw

    def _compress(self, fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> None:
        cfg = self.cfg
        if not cfg.enabled("analyze"):
            return
        facts = passes.analyze.run(fw, bw, num_fwd_outputs)
        if not cfg.enabled("plan"):
            return
        plan = planner.decide(facts.saved, cfg, facts.hints)
        _last_plans.append(plan)
        log.info("fxlowbit plan:\n%s", plan)
        if not cfg.enabled("rewrite_saved"):
            return
        passes.rewrite_saved.run(
            fw,
            bw,
            plan,
            num_fwd_outputs=num_fwd_outputs,
            group_size=cfg.group_size,
            stream=self.stream,
            counters=counters,
            inline=cfg.inner == "inductor",
        )
        counters["graphs_rewritten"] += 1
        counters["saved_bytes_before"] += plan.bytes_before
        counters["saved_bytes_after"] += plan.bytes_after


def _seed(cfg: LowbitConfig) -> int:
    # Without an explicit seed, derive one from torch's initial seed (so torch.manual_seed makes
    # runs reproducible) without drawing from the user's generator.
    base = cfg.seed if cfg.seed is not None else torch.initial_seed()
    return (base + 0x9E3779B97F4A7C15 * (next(_ordinal) if cfg.seed is None else 0)) % (2**63)


def lowbit(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """torch.compile backend entry point (``backend="lowbit"``)."""
    cfg = LowbitConfig.from_options(options)
    partitioner = LowbitPartitioner(cfg, _seed(cfg))
    if cfg.inner == "eager":
        importlib.import_module("torch._inductor.lowering")  # its max_pool2d decomposition reads it
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop
        from torch._inductor.decomposition import select_decomp_table

        return aot_autograd(
            fw_compiler=boxed_nop,
            bw_compiler=boxed_nop,
            partition_fn=partitioner,
            decompositions=select_decomp_table(),
            keep_inference_input_mutations=True,
        )(gm, example_inputs)

    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode)) if mode else {}
    patches["custom_partitioner_fn"] = partitioner
    # AOTAutograd's cache would hand back a previous process's graphs without calling our
    # partitioner (no plan, a stale random stream id): plans are per compilation, so bypass it.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, config_patches=patches)
