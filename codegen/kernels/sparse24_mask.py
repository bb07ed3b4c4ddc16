"""``fxlowbit::sparse24_mask``: the 2:4 mask of one linear, kept across training steps inside a
compiled graph (the ``sparsity="2:4"`` option, passes/sparsity.py).

Dynamo fixes a graph's inputs, so a mask cannot be a new input. Instead every rewritten linear gets
an integer ``key`` and its graph calls ``sparse24_mask(w, key, refresh, dense_after)``, whose real
implementation keeps a process-wide registry ``key -> _Entry`` (a one-weight
:class:`~.sparse24_state.Sparse24State` and a call counter):

* the first call computes the transposable mask of ``w`` (:func:`~.sparse24.transposable_mask`);
* call ``c`` (0-based) recomputes it from the current ``w`` when ``c % refresh == 0``, else returns
  the cached one;
* from call ``dense_after`` on (``dense_after >= 0``; ``-1``: never) it returns an all-ones mask
  (dense fine-tuning). The pruned weights are *not* zeroed on that switch (the op may not mutate
  ``w``): they come back with the values they had when pruned.

The op is **stateful**: it must run exactly once per training step per linear. Every execution of
the forward graph counts as a step, so anything that runs the forward again (activation
checkpointing's recompute, a calibration probe, an evaluation forward with grad enabled) advances
the counter too and shifts the schedule. The returned mask is a fresh tensor (a clone), so a
refresh never changes a mask saved for a backward still to come. Keys are per compiled graph: a
recompilation (new shapes, ``torch._dynamo.reset()``) gets new keys, whose schedules start over
from the weights' values then. The fake implementation returns
a bool tensor of ``w``'s shape, what :func:`~.sparse24_linear.sparse24_linear` takes.

:data:`MODULES` maps each key to the module path the pass found it in (for reports);
:func:`entries` lists the live registry and :func:`reset` empties it (the next call of a graph
then starts its linear's schedule over from its current weight).
"""

from __future__ import annotations

import dataclasses

import torch

from ... import state as _state
from .sparse24_state import Sparse24State

__all__ = ["sparse24_mask", "new_key", "MODULES", "entries", "reset"]

# in fxlowbit.state.STATE (fxlowbit.reset() empties the registry)
MODULES: dict[int, str] = _state.STATE.mask_modules  # key -> module path of the linear ("" when unknown)
_lock = _state.STATE.lock


@dataclasses.dataclass
class _Entry:
    state: Sparse24State  # one weight, named "w"; its step is the number of calls so far
    calls: int = 0  # calls of the op with this key
    refreshes: int = 0  # mask computations (the first one included)

    @property
    def mask(self) -> torch.Tensor:
        return self.state.masks["w"]


_REGISTRY: dict[int, _Entry] = _state.STATE.masks


def new_key(module: str = "") -> int:
    """A fresh registry key for one linear of ``module`` (assigned by the pass at compile time)."""
    with _lock:
        key = _state.STATE.next_id("mask")
        MODULES[key] = module
    return key


def entries() -> dict[int, _Entry]:
    """The live registry (key -> entry with ``calls``, ``refreshes``, ``mask``, ``state``)."""
    return dict(_REGISTRY)


def reset() -> None:
    """Forget every mask and counter (module names stay in :data:`MODULES`)."""
    with _lock:
        _REGISTRY.clear()


@torch.library.custom_op("fxlowbit::sparse24_mask", mutates_args=())
def sparse24_mask(w: torch.Tensor, key: int, refresh: int, dense_after: int) -> torch.Tensor:
    """Bool 2:4 mask (rows and columns) of ``w`` for linear ``key`` at this call: see the module
    docstring. ``refresh >= 1``: calls between mask recomputations; ``dense_after``: the call from
    which the mask is all ones (-1: never)."""
    if refresh < 1:
        raise ValueError(f"fxlowbit sparse24_mask: refresh must be >= 1, got {refresh}")
    with _lock:
        entry = _REGISTRY.get(key)
        if entry is None:
            state = Sparse24State(
                {"w": w.detach()},
                refresh_every=refresh,
                dense_after_step=None if dense_after < 0 else dense_after,
                prune_at_dense=False,
            )
            entry = _REGISTRY[key] = _Entry(state, refreshes=1)
        else:
            state = entry.state
            state.weights["w"] = w.detach()  # the current values, whatever tensor carries them
            state.advance()  # step += 1; recomputes the mask when step % refresh == 0
            if not state.dense and state.step % refresh == 0:
                entry.refreshes += 1
        del state.weights["w"]  # the registry never keeps a weight alive between calls
        entry.calls += 1
        if state.dense:
            return torch.ones(w.shape, dtype=torch.bool, device=w.device)
        return entry.mask.clone()


@sparse24_mask.register_fake
def _(w, key, refresh, dense_after):
    return torch.empty(w.shape, dtype=torch.bool, device=w.device)
