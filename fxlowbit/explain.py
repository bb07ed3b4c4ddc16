"""``fxlowbit.explain(model, *inputs, **options)``: compile with lowbit, run one step, report.

The model (or function) is compiled with ``backend="lowbit"`` and the given options, run forward
on the example inputs, and differentiated once (``torch.autograd.grad``, so no ``.grad`` changes)
so that every graph, the backward included, compiles (afresh: Dynamo's cache of an earlier
compile is not reused). The model is left as it was found: buffers
(BatchNorm statistics) are restored and the random state is forked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import record
from .backend import lowbit
from .config import LowbitConfig
from .report import Report
from .report_build import from_records

__all__ = ["explain"]


def explain(
    model_or_fn: torch.nn.Module | Callable[..., Any],
    *example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> Report:
    """Compile ``model_or_fn`` with lowbit under ``options``, run one forward and backward on the
    example inputs (keyword inputs in ``example_kwargs``) and return the :class:`Report` of the
    graphs that compiled.

    >>> import torch, fxlowbit
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    >>> report = fxlowbit.explain(mlp, torch.randn(128, 64), memory_budget=0.2, inner="eager")
    >>> report.totals["bytes_after"] < report.totals["bytes_before"]
    True
    >>> print(report)  # doctest: +SKIP
    """
    LowbitConfig.from_options(options)  # a bad option raises here, naming it, not inside Dynamo
    kwargs = dict(example_kwargs or {})
    start = len(record.records())
    # A fresh backend object: Dynamo's cached code of an earlier compile with equal options would
    # otherwise be reused, and nothing would compile (or be reported).
    compiled = torch.compile(model_or_fn, backend=functools.partial(lowbit, options=dict(options)))
    module = model_or_fn if isinstance(model_or_fn, torch.nn.Module) else None
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    leaves = params + [t for t in _tensors((example_inputs, kwargs)) if t.requires_grad and t.is_leaf]
    buffers = {k: b.detach().clone() for k, b in module.named_buffers()} if module is not None else {}
    devices = sorted({t.device.index or 0 for t in _tensors((example_inputs, kwargs)) if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            out = compiled(*example_inputs, **kwargs)
            loss = _scalar(out)
            if leaves and loss is not None and loss.requires_grad:
                torch.autograd.grad(loss, leaves, allow_unused=True)
    finally:
        if module is not None:
            with torch.no_grad():
                for k, b in module.named_buffers():
                    if k in buffers:
                        b.copy_(buffers[k])
    report = from_records(record.records()[start:])
    if not report.entries and not leaves:
        report.note = "nothing requires grad (no parameters, no input with requires_grad): no backward"
    return report


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def _scalar(out) -> torch.Tensor | None:
    """A scalar to differentiate: ``out.loss`` (Hugging Face outputs) or a ``"loss"`` entry when
    there is one, else the sum of every float output that requires grad."""
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        return loss.float().sum()
    parts = [t.float().sum() for t in _tensors(out) if t.requires_grad and t.is_floating_point()]
    return torch.stack(parts).sum() if parts else None
