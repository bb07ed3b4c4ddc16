"""Seeded random streams for stochastic rounding.

Each compiled graph owns a stream id. Every quantization draws one 62-bit seed from its stream's
generator (on the CPU, whatever the device) and derives the per-element noise from it with a
counter-based hash (:func:`~fxlowbit.codegen.kernels.quant.hash_uniform`), so a given seed
reproduces a run exactly, on any device and inner compiler, while successive steps get fresh noise.
"""

from __future__ import annotations

import itertools
import threading

import torch

_lock = threading.Lock()
_next_id = itertools.count()
_generators: dict[int, torch.Generator] = {}


def new_stream(seed: int) -> int:
    """Register a stream seeded with ``seed``; returns its id (baked into the graph)."""
    with _lock:
        sid = next(_next_id)
        _generators[sid] = torch.Generator().manual_seed(int(seed))
        return sid


def generator(stream: int) -> torch.Generator:
    if stream not in _generators:
        raise KeyError(f"fxlowbit: unknown random stream {stream}")
    return _generators[stream]


def draw_seed(stream: int, device: torch.device) -> torch.Tensor:
    """The next seed of ``stream``: an int64 scalar tensor in ``[0, 2**62)`` on ``device``."""
    return torch.randint(0, 2**62, (), generator=generator(stream), dtype=torch.int64).to(device)
