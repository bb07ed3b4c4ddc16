"""Seeded random streams for stochastic rounding.

Each compiled graph owns a stream id; the quantize op draws its rounding noise from that stream's
generator, so a given seed reproduces a run exactly while successive steps still get fresh noise.
"""

from __future__ import annotations

import itertools
import threading

import torch

_lock = threading.Lock()
_next_id = itertools.count()
_seeds: dict[int, int] = {}
_generators: dict[tuple[int, str], torch.Generator] = {}


def new_stream(seed: int) -> int:
    """Register a stream seeded with ``seed``; returns its id (baked into the graph)."""
    with _lock:
        sid = next(_next_id)
        _seeds[sid] = int(seed)
        return sid


def generator(stream: int, device: torch.device) -> torch.Generator:
    key = (stream, str(device))
    gen = _generators.get(key)
    if gen is None:
        if stream not in _seeds:
            raise KeyError(f"fxlowbit: unknown random stream {stream}")
        gen = torch.Generator(device=device)
        gen.manual_seed(_seeds[stream])
        _generators[key] = gen
    return gen


def uniform(stream: int, shape, device: torch.device) -> torch.Tensor:
    """``U[0, 1)`` fp32 noise of ``shape`` from the stream (``stream < 0``: round to nearest)."""
    if stream < 0:
        return torch.full(shape, 0.5, device=device)
    return torch.rand(shape, generator=generator(stream, device), device=device)
