"""Saved-tensor forms: what a saved tensor may be stored as, one module per form, in one registry.

A form (:class:`SavedForm`) declares in its own module where it applies (:attr:`~SavedForm.kinds`
and :meth:`~SavedForm.offers`), what it costs (stored bytes, seconds, gradient variance, from
:mod:`fxlowbit.costmodel`'s figures), how the rewrite stores it (:meth:`~SavedForm.rewrite`: pack
in the forward, decode in the backward) and how the report shows it. The planner, the cost
model's :func:`~fxlowbit.costmodel.stored_bytes`, passes/rewrite_saved.py and the reports look
forms up here by the name a :class:`~fxlowbit.plan.Decision` stores; none of them branches on it.
docs/forms.md says how to add one.

Why here, beside plan.py and costmodel.py: the planner imports the registry, so it sits between
the cost model and the planner in ../DESIGN.md's one-way order and imports no torch.fx. Pricing is
plain Python on the analysis records; a rewrite hook runs only when a graph is rewritten and
imports its torch, passes/ and codegen/ helpers then.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import sympy

from ..costmodel import Costs

if TYPE_CHECKING:
    from ..config import LowbitConfig
    from ..costmodel import HardwareProfile
    from ..plan import Decision, Plan
    from ..records import SavedTensor

__all__ = ["KINDS", "Tensor", "SavedForm", "register", "unregister", "get", "all_forms", "names"]

# What the planner found a saved tensor to be, in the order it checks (the first that holds):
#   fixed     no choice at all (graph-input alias, the user's batch, below min_bytes)
#   bool      a bool tensor
#   exact     the backward needs its exact value (integers, exact-only uses, per-row statistics)
#   compared  the backward only compares it with scalars
#   float64   float64 (never quantized: the quantizer computes in fp32)
#   float     any other float tensor: tolerates bounded noise
KINDS = ("fixed", "bool", "exact", "compared", "float64", "float")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One saved tensor as every form's :meth:`SavedForm.offers` sees it (planner-made, no torch.fx).
    Sizes are at the example sizes ``subs``; ``at`` evaluates a sympy expression there."""

    s: SavedTensor  # the analysis record
    cfg: LowbitConfig
    profile: HardwareProfile
    subs: Mapping
    kind: str  # one of KINDS
    fixed: str | None  # why it has no choice at all (kind "fixed")
    exact: str | None  # why it must keep its exact value (None: it tolerates bounded noise)
    numel: int
    nbytes: int  # stored as it is (0 when free: an alias of a parameter or other input)
    n_masks: int  # distinct scalar comparisons the backward makes of it (exact 1-bit masks)
    sensitivity: float  # variance at one level per range, minibatch-variance units
    source: str  # "measured" or "prior"
    min_prior_bits: int  # narrowest width offered on a prior sensitivity
    lossy_names: frozenset[str]  # saved tensors a plan may store lossily
    row_stats: frozenset[str]  # per-row statistics (keepdim reductions)

    @property
    def fp32_bytes(self) -> int:
        """Bytes of the tensor in fp32: the profile's rates are per fp32 byte (kernels compute in fp32)."""
        return 4 * self.numel

    def at(self, expr) -> int:
        return int(sympy.sympify(expr).subs(self.subs))


class SavedForm:
    """One stored form of a saved tensor. Subclass, set :attr:`name` (the string a Decision stores)
    and :attr:`kinds`, override what differs, and decorate with :func:`register`."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[str]] = frozenset()  # the tensor kinds (KINDS) it may apply to
    color: ClassVar[str] = "#17803d"  # the report's colour for it (HTML)
    stored_as_is: ClassVar[bool] = False  # the rewrite leaves the saved value alone (keep, recompute)
    keeps_value: ClassVar[bool] = False  # the backward reads the forward's exact value (keep)
    replay_leaf: ClassVar[bool] = True  # a replay may read what it stores (its decoded value)
    carries_masks: ClassVar[bool] = False  # comparison masks stored beside it count in Decision.masks
    probed: ClassVar[bool] = False  # lossy in a way the probes measure (the joint check replays it)

    def measured_variance(self, sensitivity: float, d: Decision) -> float:
        """Added gradient variance of ``d`` given the probe's ``sensitivity`` of its tensor (the
        runtime guard's figure; 0 for a form the probes do not measure)."""
        return 0.0

    def offers(self, t: Tensor) -> list[tuple[Costs, str]]:
        """The choices this form offers for ``t`` (one per width, say), each with the plan's reason."""
        return []

    def exclusive(self, t: Tensor) -> bool:
        """True when, once this form is offered for ``t``, no later form is (an exact, cheap replay)."""
        return False

    def reads(self, s: SavedTensor) -> tuple[str, ...]:
        """Other saved tensors whose stored values this form's decode of ``s`` reads."""
        return ()

    def stored_bytes(self, numel, bits: int, group_size: int, itemsize: int, n_masks: int = 1):
        """Exact stored bytes, a sympy expression of the symbolic sizes."""
        raise NotImplementedError(f"form {self.name!r} declares no stored bytes")

    def decision_bits(self, c: Costs, masks: int, itemsize: int) -> int:
        """``Decision.bits``: stored bits per element, comparison masks included."""
        return c.bits + masks

    def uniform_veto(self, c: Costs, n_masks: int, cfg: LowbitConfig) -> str | None:
        """Why the uniform ``bits=b`` rule keeps the tensor instead of this choice (None: it may not)."""
        return None

    def rewrite(self, rw, node, ph, d: Decision) -> None:
        """Store ``node`` (forward) / ``ph`` (its backward placeholder) as ``d`` says, through the
        rewriter ``rw`` of passes/rewrite_saved.py: pack with ``rw.pack`` and ``rw.emit``, then
        ``rw.store`` a decode built by ``rw.decoder`` (or a function of the backward's symbols)."""
        raise NotImplementedError(f"form {self.name!r} has no rewrite")

    def report_reason(self, d: Decision, plan: Plan, cfg: LowbitConfig) -> str:
        """The report's one-line reason for ``d``."""
        return f"{self.name}: {d.reason}"


_REGISTRY: dict[str, SavedForm] = {}


def register(cls: type[SavedForm]) -> type[SavedForm]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``. Forms are offered in
    registration order (the solver breaks ties by it); a name registered twice raises."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"fxlowbit: saved form {cls.__name__} needs a non-empty string name")
    if name in _REGISTRY:
        raise ValueError(f"fxlowbit: saved form {name!r} is already registered")
    unknown = set(cls.kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"fxlowbit: saved form {name!r}: unknown kinds {sorted(unknown)}; valid: {KINDS}")
    _REGISTRY[name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove form ``name`` (tests that register a form of their own)."""
    del _REGISTRY[name]


def get(name: str) -> SavedForm:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown form {name!r}; registered: {names()}") from None


def all_forms() -> tuple[SavedForm, ...]:
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


# the built-in forms, in the order the planner offers them
from . import keep, recompute, mask, packed, cmp_mask, quant  # noqa: E402, F401, I001
