"""Distributed training with lowbit on CPU: DDP and FSDP2 (``fully_shard``), gloo, 2 processes
spawned here, against a single-process run on the concatenated batch.

Each rank trains the same seeded MLP for 2 SGD steps on its half of the batch, compiled with
``bits=8``; the reference is the uncompressed model (eager) on the whole batch. Data parallelism
averages the two half-batch gradients, which equals the whole-batch gradient up to float rounding,
so what differs is the compression: first-step gradients and the 2-step parameter updates must meet
the 8-bit floor of tests/test_modes.py (30 dB), and the ranks must agree exactly (all-reduced /
gathered values). Measured (gradient / update SQNR, rounding seed 0): DDP 41.3 / 44.4 dB, FSDP2 with
per-block graphs 53.3 / 56.5 dB (each block graph only compresses its own pre-activation), the slow
wrappings 41.3 / 44.4 dB. One rank's half-batch gradient alone is at -0.4 dB: averaging must happen.

How each wrapper meets torch.compile (observed with torch 2.13 CPU, also with backend="aot_eager",
so not ours): ``torch.compile(DDP(model))`` with the default ``optimize_ddp`` compiles no graph at
all (``_inside_ddp_forward`` is skipped and nothing under it is captured); it works with
``optimize_ddp="python_reducer"`` (a slow test here), and ``DDP(torch.compile(model))`` works.
``torch.compile`` of a ``fully_shard`` module captures nothing either (FSDP2's hooks are
``torch._dynamo.disable``d); compiling each block's ``forward`` and sharding the blocks (the
torchtitan pattern) works on gloo, with per-block all-gathers and reduce-scatters.

Workers time out after 120 s (a collective waits at most 60 s), so a hang fails instead of blocking CI.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fxlowbit
from fxlowbit.examples import sqnr_db

WORLD = 2
OPTIONS = {"inner": "eager", "bits": 8, "seed": 0}
FLOOR_DB = 30.0
LR = 0.1
DEFAULT = ("ddp", "fsdp2")
SLOW = ("ddp_python_reducer", "fsdp2_root")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")


class _Block(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int, act):
        super().__init__()
        self.lin, self.act = torch.nn.Linear(d_in, d_out), act

    def forward(self, x):
        return self.act(self.lin(x))


def _net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        _Block(64, 256, torch.nn.GELU()), _Block(256, 256, torch.nn.Tanh()), torch.nn.Linear(256, 10)
    )


def _batch():
    return torch.randn(128, 64, generator=torch.Generator().manual_seed(1)), torch.arange(128) % 10


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2: DTensor shards -> whole


def _wrap(variant: str, model: torch.nn.Module):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    if variant == "ddp":
        return DDP(torch.compile(model, backend="lowbit", options=OPTIONS))
    if variant == "ddp_python_reducer":
        torch._dynamo.config.optimize_ddp = "python_reducer"
        return torch.compile(DDP(model), backend="lowbit", options=OPTIONS)
    if variant == "fsdp2":
        for block in model[:2]:
            block.forward = torch.compile(block.forward, backend="lowbit", options=OPTIONS)
            fully_shard(block)
        return fully_shard(model)
    if variant == "fsdp2_root":
        fully_shard(model)
        model.forward = torch.compile(model.forward, backend="lowbit", options=OPTIONS)
        return model
    raise KeyError(variant)


def _train(variant: str, rank: int) -> dict:
    torch._dynamo.reset()
    fxlowbit.reset()
    model = _net()
    init = [p.detach().clone() for p in model.parameters()]
    step = _wrap(variant, model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = (t.chunk(WORLD)[rank] for t in _batch())
    grads = []
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(step(x), y).backward()
        grads.append(torch.cat([_full(p.grad).flatten() for p in model.parameters()]))
        opt.step()
    params = torch.cat([_full(p.detach()).flatten() for p in model.parameters()])
    return {"grad": grads[0], "update": params - torch.cat([p.flatten() for p in init]),
            "counters": dict(fxlowbit.counters)}  # fmt: skip


def _worker(rank: int, port: int, variants: tuple[str, ...], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for variant in variants:
            try:
                results[variant] = _train(variant, rank)
            except Exception:  # reported by the test of that variant
                results[variant] = traceback.format_exc()
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(variants: tuple[str, ...], out: str, limit_s: float = 120.0) -> list[dict]:
    ctx = mp.start_processes(
        _worker, args=(_free_port(), variants, out), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {limit_s:.0f} s")
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """Single process, whole batch, uncompressed, eager."""
    model = _net()
    init = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _batch()
    grads = []
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        opt.step()
    return {"grad": grads[0], "update": torch.cat([p.detach().flatten() for p in model.parameters()]) - init}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _spawn(DEFAULT, str(tmp_path_factory.mktemp("dist")))


@pytest.fixture(scope="module")
def slow_runs(tmp_path_factory):
    return _spawn(SLOW, str(tmp_path_factory.mktemp("dist_slow")))


def _check(results: list[dict], variant: str, reference: dict) -> None:
    for r in results:
        if isinstance(r[variant], str):
            pytest.fail(f"{variant} failed in a worker:\n{r[variant]}")
    first, second = (r[variant] for r in results)
    assert torch.equal(first["grad"], second["grad"]) and torch.equal(first["update"], second["update"])
    for r in (first, second):  # each rank compressed its own saved activations
        assert r["counters"].get("saved_quant8", 0) >= 1, r["counters"]
        assert r["counters"].get("fallback_internal_error", 0) == 0
    assert sqnr_db(reference["grad"], first["grad"]) >= FLOOR_DB
    assert sqnr_db(reference["update"], first["update"]) >= FLOOR_DB


@pytest.mark.parametrize("variant", DEFAULT)
def test_matches_single_process(runs, reference, variant):
    _check(runs, variant, reference)


@pytest.mark.slow
@pytest.mark.parametrize("variant", SLOW)
def test_matches_single_process_other_wrappings(slow_runs, reference, variant):
    _check(slow_runs, variant, reference)
