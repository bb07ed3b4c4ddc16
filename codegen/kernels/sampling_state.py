"""The ``sampling`` option's linears: ``fxlowbit::sampled_linear_keyed(x, w, b, seed, key)`` and the
registry of their keep ratios, which adapt as training goes without a recompile.

Dynamo fixes a graph's inputs, so the keep ratios cannot be new inputs; as for the 2:4 masks
(:mod:`.sparse24_mask`), every rewritten linear gets an integer ``key`` (passes/sampling.py) and
its backward reads ``STATE.sampling[key]``, an :class:`Entry` holding the ratios, the last
backward's :data:`~.sampled_backward.STATS` and the controller's target. The backward is
:func:`.sampled_backward.backward` (gathered GEMMs on the kept rows, unbiased reweighting).

**The controller** (VCAS's adaptation, Wang, Chen, Zhu 2024): after each backward a linear's
added variance is measured in the unit compression uses (fxlowbit/backend.py: the minibatch
variance, capped by the gradient's power): for the weight gradient ``rho = var / min(V, ||dw||^2)``
with ``var`` exact and ``V = sum_i ||g_i||^2 ||x_i||^2 - ||dw||^2 / N`` the minibatch variance of
``dw = sum_i g_i^T x_i`` over its N rows; for the input gradient, whose rows are not summed,
``rho = var / ||dx||^2`` (both from the kept rows, unbiased). ``rho`` is compared with the target
``t``: Bernoulli sampling adds about ``rho(k) = A (1/k - 1)``, so ``A`` follows from the
measurement and ``k* = A / (t + A)`` meets the target; the ratio moves half-way there (geometric
mean), by at most 2x per backward, within ``[KEEP_MIN, 1]``; a ratio at 1 measures no variance and
steps down by ``2 ** -0.5``. Where the ratio settles above the keep at which the cost model says
sampling stops paying (``max_useful``, passes/sampling.py), the backward runs exact instead, and
every :data:`PROBE_EVERY`-th backward samples again to re-measure.

Targets come from ``max_variance_ratio`` minus what the plan's compression adds (one budget of
added variance for both; :func:`set_budget`): for the weight gradients the whole remainder (each
linear's error is a separate block of the gradient, so per-linear relative errors ``<= t`` keep
the whole one ``<= t``); for the input gradients the remainder over the number of sampled
linears (an input-gradient error reaches every parameter upstream, so with ``L`` sampled layers
it can add up ``L`` times). ``sampling=<float>`` fixes the ratios (no controller).

The op is stateful like ``sparse24_mask``: its backward updates the registry, so a backward run
twice adapts twice; the probes' replays run under :func:`exact` (exact, the registry untouched).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ... import state as _state
from . import linear_flops
from . import sampled_backward as _sb

__all__ = ["Entry", "new_key", "entries", "set_budget", "KEEP_MIN", "KEEP_START", "PROBE_EVERY"]

KEEP_MIN = 0.1  # below this the gather and reweighting cost more than the GEMM rows they save
KEEP_START = 1.0  # the first backward is exact: the controller then steps down from measured figures
_STEP_CLAMP = 2.0  # a ratio changes by at most this factor per backward
_STEP_DOWN = 2**-0.5  # from an exact backward (which measures no added variance)
PROBE_EVERY = 16  # a linear held exact because sampling would not pay is re-measured this often


@dataclasses.dataclass
class Entry:
    """One sampled linear: where it is, its ratios, the last backward's figures."""

    module: str
    mnk: tuple[int, int, int]  # tokens, out, in at the example sizes
    keep_input: float = KEEP_START
    keep_weight: float = KEEP_START
    fixed: bool = False  # sampling=<float>: ratios forced, no controller
    max_useful: float = 1.0  # above this keep ratio sampling costs more than it saves (cost model)
    target_input: float = 0.0  # relative added variance allowed (0: not yet budgeted -> exact)
    target_weight: float = 0.0
    stats: list[float] = dataclasses.field(default_factory=lambda: [0.0] * 6)
    steps: int = 0  # backwards run
    rows: int = 0  # token rows of the last backward
    flops_dense: float = 0.0  # backward GEMM FLOPs summed over the backwards, dense
    flops_done: float = 0.0  # the same, as run

    @property
    def effective(self) -> tuple[float, float]:
        """The ratios backwards run at between probes: the controller's, or exact (1.0) where they
        are above :attr:`max_useful`."""
        if self.fixed:
            return self.keep_input, self.keep_weight
        return tuple(k if k <= self.max_useful else 1.0 for k in (self.keep_input, self.keep_weight))  # type: ignore[return-value]

    def used(self) -> tuple[float, float]:
        """The ratios the next backward runs at: :attr:`effective`, except every
        :data:`PROBE_EVERY`-th backward, which runs (and so measures) the controller's."""
        if self.fixed or self.steps % PROBE_EVERY == 0:
            return self.keep_input, self.keep_weight
        return self.effective

    def units(self, rows: int) -> tuple[float, float]:
        """The controller's units of dx's and dw's added variance for the last backward, over ``rows``
        rows: ``||dx||^2``, and dw's minibatch variance capped by ``||dw||^2`` (module docstring)."""
        n2_in, n2_w = self.stats[2], self.stats[3]
        sgd = self.stats[6] - n2_w / max(rows, 1) if len(self.stats) > 6 and self.stats[6] > 0 else n2_w
        return n2_in, min(max(sgd, 0.0), n2_w)

    def adapt(self, rows: int, used: tuple[float, float]) -> None:
        """One controller step from :attr:`stats` of a backward over ``rows`` rows run at ratios
        ``used`` (module docstring)."""
        if self.fixed:
            return
        unit_in, unit_w = self.units(rows)
        if used[0] < 1 or self.keep_input >= 1:
            self.keep_input = _step(used[0], self.stats[0], unit_in, self.target_input)
        if used[1] < 1 or self.keep_weight >= 1:
            self.keep_weight = _step(used[1], self.stats[1], unit_w, self.target_weight)

    @property
    def rho(self) -> tuple[float, float]:
        """The last backward's added variance of dx and dw, in the controller's units."""
        unit_in, unit_w = self.units(self.rows)
        return self.stats[0] / max(unit_in, 1e-30), self.stats[1] / max(unit_w, 1e-30)


def _step(keep: float, var: float, unit: float, target: float) -> float:
    if target <= 0 or not math.isfinite(var) or not math.isfinite(unit):
        return 1.0  # no budget (or a non-finite gradient): exact
    if unit <= 0:
        return keep  # nothing measured (a zero gradient)
    if keep >= 1 or var <= 0:
        return max(KEEP_MIN, keep * _STEP_DOWN)  # exact: nothing measured, try sampling
    # Bernoulli sampling adds about rho(k) = A (1/k - 1): A from this measurement, then the ratio
    # that meets the target, approached half-way (geometric mean) and by at most 2x per step
    a = (var / unit) * keep / (1 - keep)
    goal = a / (target + a)
    new = math.sqrt(keep * goal)
    return min(1.0, max(KEEP_MIN, keep / _STEP_CLAMP, min(new, keep * _STEP_CLAMP)))


_REGISTRY: dict[int, Entry] = _state.STATE.sampling  # key -> Entry (fxlowbit.reset() empties it)


def new_key(
    module: str, mnk: tuple[int, int, int], fixed: float | None = None, max_useful: float = 1.0
) -> int:
    """A registry key for one linear (assigned by passes/sampling.py at compile time)."""
    with _state.STATE.lock:
        key = _state.STATE.next_id("sampling")
        keep = KEEP_START if fixed is None else float(fixed)
        _REGISTRY[key] = Entry(module, mnk, keep, keep, fixed=fixed is not None, max_useful=max_useful)
    return key


def entries() -> dict[int, Entry]:
    return dict(_REGISTRY)


def set_budget(keys, share: float) -> None:
    """Give the linears ``keys`` the relative added variance ``share`` (see the module docstring)."""
    keys = [k for k in keys if k in _REGISTRY]
    for k in keys:
        e = _REGISTRY[k]
        e.target_weight = max(share, 0.0)
        e.target_input = max(share, 0.0) / max(len(keys), 1)


@contextlib.contextmanager
def exact(gemms: bool = True):
    """Within: sampled linears run their backward exact and leave the registry alone, and low-bit
    linears run their gradient GEMMs plain (codegen/kernels/lowbit_linear.py; ``gemms=False``: as
    planned, low-bit, which is how the probes measure those GEMMs' noise). The probes' replays of a
    graph (fxlowbit/adaptive.py) need the exact gradient, and must not move the controller or
    count as backwards. The innermost context decides."""
    with _state.STATE.lock:
        _state.STATE.sampling_paused.append(gemms)
    try:
        yield
    finally:
        with _state.STATE.lock:
            _state.STATE.sampling_paused.pop()


def _entry(key: int) -> Entry:
    e = _REGISTRY.get(key)
    if e is None:  # after fxlowbit.reset(): the graph still runs; its linear starts over, exact
        e = _REGISTRY[key] = Entry("", (0, 0, 0))
    return e


@torch.library.custom_op("fxlowbit::sampled_linear_keyed", mutates_args=())
def sampled_linear_keyed(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seed: torch.Tensor, key: int
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; the backward samples rows at ``STATE.sampling[key]``'s ratios."""
    return F.linear(x, weight, bias).contiguous()


@sampled_linear_keyed.register_fake
def _(x, weight, bias, seed, key):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fxlowbit::sampled_linear_keyed_backward", mutates_args=())
def sampled_linear_keyed_backward(
    grad: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    seed: torch.Tensor,
    key: int,
    x_colmajor: bool,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db) as :func:`.sampled_backward.backward` at the registry's ratios; records the
    figures and takes one controller step."""
    if _state.STATE.sampling_paused:  # a probe's replay: exact, and not a training backward
        dx, dw, db, _ = _sb.backward(
            grad, x, weight, 1.0, 1.0, seed, False, x_colmajor, need_input, need_weight, need_bias
        )
        return dx, dw, db
    e = _entry(key)
    ki, kw = e.used()
    ki, kw = (ki if need_input else 1.0), (kw if need_weight else 1.0)
    dx, dw, db, fig = _sb.backward(
        grad, x, weight, ki, kw, seed, True, x_colmajor, need_input, need_weight, need_bias
    )
    n = grad.numel() // max(grad.shape[-1], 1)
    d_out, d_in = weight.shape
    with _state.STATE.lock:
        e.stats, e.steps, e.rows = fig, e.steps + 1, n
        e.flops_dense += 2.0 * n * d_in * d_out * (need_input + need_weight)
        e.flops_done += 2.0 * d_in * d_out * (fig[4] * need_input + fig[5] * need_weight)
        e.adapt(n, (ki, kw))
    return dx, dw, db


@sampled_linear_keyed_backward.register_fake
def _(grad, x, weight, seed, key, x_colmajor, need_input, need_weight, need_bias):
    return _sb.fake_grads(grad, weight, need_input, need_weight, need_bias)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, seed, key = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, seed)
    ctx.key = key
    ctx.x_colmajor = x.dim() == 2 and x.stride(0) == 1 and x.stride(1) == x.shape[0]


def _backward(ctx, grad):
    x, weight, seed = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.fxlowbit.sampled_linear_keyed_backward(
        grad, x, weight, seed, ctx.key, ctx.x_colmajor, *need
    )
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None, None)


sampled_linear_keyed.register_autograd(_backward, setup_context=_setup_context)


register_flop_formula(torch.ops.fxlowbit.sampled_linear_keyed)(linear_flops)


@register_flop_formula(torch.ops.fxlowbit.sampled_linear_keyed_backward)
def _bwd_flops(grad_shape, x_shape, w_shape, seed, key, x_colmajor, need_input, need_weight, need_bias,
               out_shape=None, **kwargs) -> int:  # fmt: skip
    """The dense count: the backward at keep ratio 1 on the GEMMs it runs (the registry counts what ran)."""
    d_out, d_in = w_shape
    return int(_sb.flops(math.prod(grad_shape[:-1]), d_in, d_out, need_input, need_weight))
