"""Masks of 2:4 sparse training and their schedule: one mask per weight, refreshed every
``refresh_every`` optimizer steps from the current weights, and a dense fine-tuning phase from
``dense_after_step`` on (2:4 pre-training recipes end dense, Hu et al. 2024).

Masks are updated in place, so a compiled model that reads them keeps its graphs; the switch to
dense changes a Python branch (one recompile). Each weight draws its MVUE seeds from its own
:mod:`~fxlowbit.codegen.rng` stream (``fxlowbit::draw_seed``), so runs reproduce from ``seed`` and
two layers reading the same input never share noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from .. import rng
from ..ops import draw_seed
from .sparse24 import plain_mask, transposable_mask
from .sparse24_linear import sparse24_linear

__all__ = ["Sparse24State"]


class Sparse24State:
    """2:4 masks for named weights, with a refresh schedule and a dense switch.

    ``weights``: name -> weight (out, in), sizes multiples of 4 (e.g. ``model.named_parameters()``
    filtered to the linears to sparsify). ``transposable``: 2:4 masks for ``w`` and ``w^T`` (sparse
    grad-input GEMM) or plain row-wise 2:4. ``mvue`` and ``masked_grad`` are passed to
    :func:`~.sparse24_linear.sparse24_linear`. ``prune_at_dense``: zero the pruned weights when the
    dense phase starts. Call :meth:`advance` after every optimizer step.

    >>> lin = torch.nn.Linear(8, 4)
    >>> state = Sparse24State({"fc": lin.weight}, refresh_every=10, dense_after_step=100)
    >>> y = state.linear("fc", torch.randn(3, 8), lin.weight, lin.bias)
    >>> state.advance()
    """

    def __init__(
        self,
        weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        *,
        refresh_every: int = 100,
        dense_after_step: int | None = None,
        transposable: bool = True,
        mvue: bool = True,
        masked_grad: bool = True,
        prune_at_dense: bool = True,
        seed: int = 0,
    ):
        if refresh_every < 0 or (dense_after_step is not None and dense_after_step < 0):
            raise ValueError(
                f"fxlowbit Sparse24State: refresh_every ({refresh_every}) and dense_after_step "
                f"({dense_after_step}) must be >= 0"
            )
        self.weights = dict(weights.items() if isinstance(weights, Mapping) else weights)
        self.refresh_every, self.dense_after_step = refresh_every, dense_after_step
        self.transposable, self.mvue, self.masked_grad = transposable, mvue, masked_grad
        self.prune_at_dense = prune_at_dense
        self.step = 0
        self.masks = {name: self._mask(w) for name, w in self.weights.items()}
        gen = torch.Generator().manual_seed(seed)
        self._streams = {
            name: rng.new_stream(int(torch.randint(0, 2**62, (), generator=gen))) for name in self.weights
        }
        self.flip_rates: dict[str, float] = {}  # fraction of mask entries changed by the last refresh

    def _mask(self, w: torch.Tensor) -> torch.Tensor:
        return transposable_mask(w) if self.transposable else plain_mask(w)

    @property
    def dense(self) -> bool:
        """Whether the dense phase has begun (masks no longer applied)."""
        return self.dense_after_step is not None and self.step >= self.dense_after_step

    def refresh(self) -> dict[str, float]:
        """Recompute every mask from its weight's current values (in place); returns flip rates."""
        with torch.no_grad():
            for name, w in self.weights.items():
                new = self._mask(w)
                self.flip_rates[name] = float((new != self.masks[name]).float().mean())
                self.masks[name].copy_(new)
        return dict(self.flip_rates)

    def advance(self) -> None:
        """One optimizer step done: count it and refresh the masks when the schedule says so. On
        entering the dense phase the pruned weights are zeroed (``prune_at_dense``), so it starts
        from the function the sparse model computed, not from stale pruned values."""
        self.step += 1
        if self.dense:
            if self.step == self.dense_after_step and self.prune_at_dense:
                self.prune_()
        elif self.refresh_every and self.step % self.refresh_every == 0:
            self.refresh()

    def linear(
        self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``F.linear`` of ``x`` with weight ``name`` (passed in, as the module holds it): 2:4
        sparse with its mask during the sparse phase, dense afterwards."""
        if self.dense:
            return F.linear(x, weight, bias)
        seed = draw_seed(x, self._streams[name]) if self.mvue else None
        return sparse24_linear(x, weight, bias, self.masks[name], seed, self.mvue, self.masked_grad)

    @torch.no_grad()
    def prune_(self) -> None:
        """Zero the pruned entries of every weight in place (e.g. to export the sparse model)."""
        for name, w in self.weights.items():
            w.masked_fill_(~self.masks[name], 0)

    def state_dict(self) -> dict:
        return {"step": self.step, "masks": {k: m.clone() for k, m in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["masks"]) != set(self.masks):
            raise ValueError(
                f"fxlowbit Sparse24State: masks for {sorted(state['masks'])}, expected {sorted(self.masks)}"
            )
        self.step = int(state["step"])
        for k, m in state["masks"].items():
            self.masks[k].copy_(m)
