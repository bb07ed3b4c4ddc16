"""Seeded random streams for stochastic rounding.

Each compiled graph owns a stream id. Every quantization draws one 62-bit seed from its stream's
generator and derives the per-element noise from it with a counter-based hash
(:func:`~fxlowbit.codegen.kernels.quant.hash_uniform`), so a given seed reproduces a run exactly
on a device type and with any inner compiler, while successive steps get fresh noise. On CUDA the
seed is drawn by a CUDA generator of the stream (seeded from its CPU generator): a CPU draw copied
to the GPU would be a pageable host-to-device copy, which waits for the queued work every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .. import state

# in fxlowbit.state.STATE (fxlowbit.reset() clears the generators; a stream's seed survives it)
_lock = state.STATE.lock
_generators: dict[int, torch.Generator] = state.STATE.generators
_device_generators: dict[tuple[int, torch.device], torch.Generator] = state.STATE.device_generators
_seeds: dict[int, int] = state.STATE.stream_seeds


def new_stream(seed: int) -> int:
    """Register a stream seeded with ``seed``; returns its id (baked into the graph)."""
    with _lock:
        sid = state.STATE.next_id("stream")
        _seeds[sid] = int(seed)
        return sid


# ids of streams that never enter compiled code, apart from new_stream's counter: allocating one
# must not shift the ids later graphs bake in (a warm process that skips a check would compile
# every later graph under other ids than the cold one, and miss the caches)
_RESERVED = 1 << 62


def reserved_stream(index: int, seed: int) -> int:
    """The id of reserved stream ``index`` (seeded with ``seed``), outside :func:`new_stream`'s ids."""
    sid = _RESERVED + index
    with _lock:
        _seeds[sid] = int(seed)
    return sid


def generator(stream: int) -> torch.Generator:
    """The stream's generator, created from its seed on first use (and again after
    ``fxlowbit.reset()``, which restarts the stream)."""
    with _lock:
        gen = _generators.get(stream)
        if gen is None:
            if stream not in _seeds:
                raise KeyError(f"fxlowbit: unknown random stream {stream}")
            gen = _generators[stream] = torch.Generator().manual_seed(_seeds[stream])
        return gen


def _on_device(stream: int, device: torch.device) -> torch.Generator:
    with _lock:
        key = (stream, device)
        if key not in _device_generators:
            seed = int(torch.randint(0, 2**62, (), generator=generator(stream)))
            _device_generators[key] = torch.Generator(device=device).manual_seed(seed)
        return _device_generators[key]


def draw_seed(stream: int, device: torch.device) -> torch.Tensor:
    """The next seed of ``stream``: an int64 scalar tensor in ``[0, 2**62)`` on ``device`` (drawn
    there on CUDA, so no host synchronisation)."""
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = _on_device(stream, device)
        return torch.randint(0, 2**62, (), generator=gen, dtype=torch.int64, device=device)
    return torch.randint(0, 2**62, (), generator=generator(stream), dtype=torch.int64).to(device)


@contextlib.contextmanager
def fork() -> Iterator[None]:
    """Within: draws leave every stream where it was. The first-batch check and the probes replay
    the graphs (their low-bit GEMMs and 2:4 linears draw seeds); the noise training draws must not
    depend on them, or a second process whose cache hit skips the check would draw other noise than
    the process that compiled it. A stream first used within starts again from its seed."""
    with _lock:
        cpu = {k: g.get_state() for k, g in _generators.items()}
        dev = {k: g.get_state() for k, g in _device_generators.items()}
    try:
        yield
    finally:
        with _lock:
            tables: tuple[tuple[dict[Any, torch.Generator], dict[Any, torch.Tensor]], ...] = (
                (_generators, cpu),
                (_device_generators, dev),
            )
            for table, states in tables:
                for k in [k for k in table if k not in states]:
                    del table[k]
                for k, st in states.items():
                    table[k].set_state(st)
