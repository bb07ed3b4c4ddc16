"""The process-wide runtime state of fxlowbit, in one place.

Everything fxlowbit keeps beyond one call lives in :data:`STATE`, and nowhere else (a test walks
every module of the package and fails on a module-level mutable container that is not one of
:data:`STATE`'s): what was compiled (plans, graph pairs, records), what the rewrites counted, the
warn-once keys, the random streams of stochastic rounding, the 2:4 mask registry and the CPU
kernel families. Modules keep their old names as *aliases* of these containers (e.g.
``fxlowbit.counters is STATE.counters``), so :func:`reset` clears them in place and every alias
sees it.

:func:`reset` (exported as ``fxlowbit.reset``) releases all of it: a deleted model's weights,
graphs and masks are freed once Dynamo forgets its code too (``torch._dynamo.reset()``). Graphs
compiled before a reset keep running: a random stream a graph still names is re-seeded from its
seed (kept as one int per stream; the only thing a reset keeps), so its noise restarts from the
beginning, and a 2:4 mask is recomputed from the current weights on the next call (its schedule
starts over). Integer ids (streams, mask keys, graph ordinals) are never reused.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections import Counter
from typing import Any

from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["RuntimeState", "STATE", "reset"]


_ID_KINDS = ("stream", "mask", "graph", "gemm", "sampling")


@dataclasses.dataclass(eq=False)
class RuntimeState:
    """The containers fxlowbit mutates at run time (see the module docstring)."""

    # backend: what was compiled since the last reset, and what the rewrites did
    plans: list = dataclasses.field(default_factory=list)  # plan.Plan per compiled graph
    graphs: list = dataclasses.field(default_factory=list)  # (forward, backward) GraphModules
    records: list = dataclasses.field(default_factory=list)  # record.GraphRecord
    counters: Counter = dataclasses.field(default_factory=Counter)  # fxlowbit.counters
    warned: set = dataclasses.field(default_factory=set)  # warn-once keys (planner, 2:4 linear)
    # codegen.rng: stream id -> generator (and per device); stream id -> seed survives a reset
    generators: dict = dataclasses.field(default_factory=dict)
    device_generators: dict = dataclasses.field(default_factory=dict)
    stream_seeds: dict = dataclasses.field(default_factory=dict)
    # codegen.kernels.sparse24_mask: key -> mask entry, key -> module path
    masks: dict = dataclasses.field(default_factory=dict)
    mask_modules: dict = dataclasses.field(default_factory=dict)
    # codegen.kernels.sampling_state: key -> sampled linear (keep ratios, last figures)
    sampling: dict = dataclasses.field(default_factory=dict)
    # non-empty: sampled backwards exact; the last entry: low-bit gradient GEMMs plain too
    sampling_paused: list = dataclasses.field(default_factory=list)
    # fxlowbit.adaptive: the low-bit gradient GEMMs' measured noise, one dict per check
    gemm_noise: list = dataclasses.field(default_factory=list)
    # codegen.kernels.sparse24_linear: weak mask -> (version, 2:4 along rows, along columns)
    mask_checks: WeakTensorKeyDictionary = dataclasses.field(default_factory=WeakTensorKeyDictionary)
    # codegen.kernels.quant_cpu: compiled kernel families, families that failed, their counters
    families: dict = dataclasses.field(default_factory=dict)
    broken_families: set = dataclasses.field(default_factory=set)
    kernel_counters: Counter = dataclasses.field(default_factory=Counter)
    # costmodel.load_profile: (path, mtime) -> HardwareProfile, parsed once
    profiles: dict = dataclasses.field(default_factory=dict)
    # ids: never reset (a graph compiled before a reset still names its ids)
    ids: dict[str, Any] = dataclasses.field(default_factory=lambda: {k: itertools.count() for k in _ID_KINDS})
    lock: Any = dataclasses.field(default_factory=threading.RLock)

    def next_id(self, kind: str) -> int:
        with self.lock:
            return next(self.ids[kind])

    def containers(self) -> dict[str, Any]:
        """The mutable containers (name -> object), for the module-state test."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("ids", "lock")
        }


STATE = RuntimeState()

# Emptied by reset(kernels=False); the kernel families and parsed profiles only by reset() (they
# hold compiled code and hardware figures, no model state; a family recompiles from Inductor's disk
# cache in about half a second).
_MODEL_STATE = (
    "plans",
    "graphs",
    "records",
    "counters",
    "warned",
    "generators",
    "device_generators",
    "masks",
    "mask_modules",
    "mask_checks",
    "sampling",
    "gemm_noise",
)
_KERNEL_STATE = ("families", "broken_families", "kernel_counters", "profiles")


def reset(kernels: bool = True) -> None:
    """Release everything fxlowbit holds: recorded plans, graphs and reports, counters, warn-once
    keys, random-stream state, 2:4 masks and (``kernels=True``) the compiled CPU kernel families.
    ``torch._dynamo.reset()`` does none of this; call both to free a deleted model's memory.
    A CPU kernel family still compiling in a child process is waited for first."""
    if kernels:
        from .codegen.kernels import (
            quant_cpu,  # a leaf import: state.py imports nothing of ours at import time
        )

        quant_cpu.wait()
    with STATE.lock:
        for name in _MODEL_STATE + (_KERNEL_STATE if kernels else ()):
            getattr(STATE, name).clear()
