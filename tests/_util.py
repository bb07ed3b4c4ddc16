"""Shared helpers for the compression tests: one training step, its saved bytes and gradients."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import torch
import torch.nn.functional as F

import fxlowbit
from fxlowbit.examples import MLP, SmallCNN, TinyGPT, char_batches, stdlib_text

UNCOMPRESSED = {"inner": "eager", "passes": {"plan": False}}


def model_graphs() -> int:
    """Dynamo graphs compiled since its counters were cleared: the user's graphs, to compare with
    ``aot_eager``'s (the CPU pack/decode kernel families, codegen/kernels/quant_cpu.py, are
    AOTInductor packages, never Dynamo graphs)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def make(name: str):
    """(model, inputs, loss_fn) for the three reference models, deterministic."""
    torch.manual_seed(0)
    if name == "mlp":
        x = torch.randn(128, 64)
        return MLP(hidden=512), (x,), lambda out: F.cross_entropy(out, torch.arange(128) % 10)
    if name == "cnn":
        x = torch.randn(64, 1, 8, 8)
        return SmallCNN(), (x,), lambda out: F.cross_entropy(out, torch.arange(64) % 10)
    if name == "gpt":
        x, y = next(char_batches(stdlib_text(), 4, 64, 1))
        return TinyGPT(), (x, y), lambda out: out
    raise KeyError(name)


def step(model, inputs, loss_fn, backend="lowbit", options=None, **compile_kw):
    """Compile fresh, run forward+backward once; returns (saved bytes, flat gradient, loss)."""
    torch._dynamo.reset()
    fxlowbit.reset()
    model.zero_grad(set_to_none=True)
    kw = {"options": options} if options is not None else {}
    compiled = torch.compile(model, backend=backend, **kw, **compile_kw)
    torch.manual_seed(1)  # same dropout masks for every run
    loss = loss_fn(compiled(*inputs))
    nbytes = fxlowbit.saved_activation_bytes(loss, model.parameters())
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return nbytes, grad, loss.detach()


def through_partitioner(model, loss_fn, *inputs, **cfg_options):
    """Compile ``model`` once through a :class:`fxlowbit.backend.LowbitPartitioner` (eager inner,
    probes on, seed 0; ``mincut`` off, as the probes need a rounding plan: with min-cut's partition
    weighed in, these small models' plans are exact) and run ``loss_fn(model(*inputs)).backward()``;
    returns (partitioner, the Dynamo graph's inputs), what probes and the joint check replay."""
    from fxlowbit import backend
    from fxlowbit.config import LowbitConfig

    cfg = LowbitConfig(**{"inner": "eager", "calibrate_every": 1, "seed": 0, "mincut": False, **cfg_options})
    partitioner = backend.LowbitPartitioner(cfg, seed=0)
    captured = []

    def compiler(gm, example_inputs):
        captured.append(list(example_inputs))
        return backend.compile_graph(gm, example_inputs, cfg, partitioner, None)

    torch._dynamo.reset()
    loss_fn(torch.compile(model, backend=compiler)(*inputs)).backward()
    (args,) = captured
    return partitioner, args


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@contextlib.contextmanager
def benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (its folder on ``sys.path`` meanwhile, as when
    it runs, for its ``_common`` import)."""
    sys.path.insert(0, BENCH)
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)


def choose_where_possible(form: str):
    """A stand-in for ``fxlowbit.planner._choose``: every saved tensor takes ``form`` where it is
    among its candidates, else its first (keep)."""

    def choose(items, budget, t_step, max_ratio, warn=True, soft=False):
        pick = [next((k for k, c in enumerate(it) if c.form == form), 0) for it in items]
        return pick, 1.0, f"test: {form} whatever can be"

    return choose


def machine_profile(threads: int, **figures) -> dict:
    """The shipped CPU profile's figures, ``figures`` replaced, recorded as measured on this CPU."""
    from fxlowbit.hardware import _this_cpu, load_profile

    d = load_profile("cpu").to_dict()
    d.update(figures)
    d["meta"] = {**d["meta"], "threads": threads, "machine": {"cpu_model": _this_cpu(), "gpu": None}}
    return d


# 1-thread figures of a 2-core AMD EPYC (benchmarks/results/profile_amd_epyc_t1_quant_ops_cpu.json,
# 2026-12-07): int8 GEMMs 7-8x fp32's, the row quantizers compiled; the shipped profile's keep fp32
AMD_T1 = {
    "matmul_tflops": {
        "float32": {"tiny": 0.09756, "small": 0.1122, "medium": 0.1127, "large": 0.1121},
        "int8": {"tiny": 0.07655, "small": 0.6712, "medium": 0.8354, "large": 0.9177},
    },
    "gemm_quant_gbps": {"int8": 3.852, "int8_sr": 3.364},
}
