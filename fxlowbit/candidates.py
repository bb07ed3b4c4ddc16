"""What each saved tensor may become: its kind and the forms it may take, with their costs.

Works on the records of :mod:`fxlowbit.records`. Aliases of graph inputs (the caller holds them
anyway; a forward output saved for the backward is compressible like any activation), tensors
under ``min_bytes``, integer tensors and tensors whose backward needs exact values are kept (or
recomputed, when a cheap exact replay exists); bool tensors and float tensors the backward only
compares with scalars get exact 1-bit masks; other float tensors get b-bit stochastic rounding at
each allowed width, or a replay of their pointwise producers from values the backward has anyway.
Unknown backward uses keep the tensor with one warning naming the op (strict mode raises).

:func:`candidates` sorts a tensor into a kind (:data:`fxlowbit.forms.KINDS`) and asks every form
of the registry :mod:`fxlowbit.forms` in turn where it applies and what it costs (stored bytes,
seconds added to the step, gradient variance added from the measured or prior sensitivity);
:func:`graph_candidates` does so for one graph's tensors. :func:`canonical_keys` names a tensor
across partitions, which is how a measured sensitivity finds it again.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import sympy

from . import costmodel as cm
from . import forms as _forms
from .config import LowbitConfig
from .costmodel import Costs
from .records import COMPARE, EXACT, SavedTensor
from .state import STATE

__all__ = ["candidates", "graph_candidates", "canonical_keys", "may_quantize", "UnsupportedOpError"]

_warned: set[str] = STATE.warned  # warn-once keys, shared with the planner (fxlowbit.state)
Options = tuple[list[Costs], list[str], int]  # candidates(): costs, a reason per form, masks


class UnsupportedOpError(NotImplementedError):
    """Raised in strict mode when a saved tensor meets an op the planner cannot reason about."""


def _warn_unknown(op: str, name: str, strict: bool) -> None:
    msg = (
        f"fxlowbit: saved tensor {name!r} stays in full precision: its backward use {op} "
        "is not known to tolerate a compressed value"
    )
    if strict:
        raise UnsupportedOpError(msg + " (strict mode)")
    if op not in _warned:
        _warned.add(op)
        warnings.warn(msg + " (warned once per op)", stacklevel=3)


def _exact_only(s: SavedTensor, cfg: LowbitConfig) -> str | None:
    """Why ``s`` must keep its exact value (None: it tolerates bounded noise)."""
    if not s.is_float:
        return f"{str(s.dtype)[6:]} tensor: kept exact"
    if not s.uses:
        return "no backward use found"
    if len(s.shape) >= 2 and s.shape[-1] == 1:
        # LayerNorm's mean and rstd, softmax's max/sum: 1/width of the rows they scale; one
        # rounding error would scale a whole row's gradient (errors correlated along the row)
        return "per-row statistic (keepdim reduction): kept exact, it scales a whole row"
    exact = [u.op for u in s.uses if u.role == EXACT]
    if exact:
        return f"backward use {exact[0]} needs it exact"
    unknown = [u.op for u in s.uses if u.role is None]
    if unknown:
        _warn_unknown(unknown[0], s.name, cfg.strict)
        return f"backward use {unknown[0]} not known to tolerate compression"
    compares = [u for u in s.uses if u.role == COMPARE]
    if compares and not (cfg.masks and all(u.direct for u in compares)):
        return "compared with a scalar (through a view): kept exact"
    return None


def canonical_keys(saved: Iterable[SavedTensor]) -> dict[str, tuple]:
    """Name-free keys of saved tensors, equal across two partitions of the same graph (node names
    differ between compilations): producer, shape, dtype and occurrence among equal ones."""
    seen: dict[tuple, int] = {}
    out = {}
    for s in saved:
        base = (s.producer, tuple(str(d) for d in s.shape), str(s.dtype))
        out[s.name] = (*base, seen.get(base, 0))
        seen[base] = seen.get(base, 0) + 1
    return out


def may_quantize(s: SavedTensor, cfg: LowbitConfig) -> bool:
    """Whether some plan may store ``s`` quantized (the tensors a probe measures)."""
    if _fixed(s, cfg) or not s.is_float or str(s.dtype) == "torch.bool" or _exact_only(s, cfg):
        return False
    if str(s.dtype) == "torch.float64":  # F64_KEPT
        return False
    return _n_masks(s) < len(s.uses)


# The quantizer computes in fp32: float64 values beyond its range would come back as Inf (1e100)
# or zero (1e-60), so float64 tensors are never quantized (exact masks and replays still apply):
# their kind is "float64" (F64_KEPT, forms/keep.py, is the reason a plan gives).


def _n_masks(s: SavedTensor) -> int:
    return len({(u.op, u.scalar) for u in s.uses if u.role == COMPARE})


def _batch(s: SavedTensor) -> bool:
    """Whether ``s`` aliases the user's batch."""
    return s.data_input


def _free(s: SavedTensor) -> bool:
    """Kept at no cost: an alias of a parameter, buffer or other input that is not the batch."""
    return s.input_alias and not _batch(s)


def _fixed(s: SavedTensor, cfg: LowbitConfig) -> str | None:
    """Why ``s`` has no choice at all (None: it has)."""
    if _batch(s):
        return "the user's batch: kept as it is (the training loop holds it), counted in the budget"
    if s.input_alias:
        return "alias of a graph input: costs no memory"
    if s.nbytes_hint < cfg.min_bytes:
        return f"below min_bytes={cfg.min_bytes}"
    return None


def _sensitivity(
    s: SavedTensor, sens: Mapping[str, float] | None, total_numel: float, numel: int
) -> tuple[float, str]:
    if sens and s.name in sens:
        return sens[s.name], "measured"
    return cm.prior_sensitivity(numel, total_numel), "prior"


def candidates(
    s: SavedTensor,
    cfg: LowbitConfig,
    profile: cm.HardwareProfile,
    *,
    subs: Mapping | None = None,
    sensitivity: Mapping[str, float] | None = None,
    total_numel: float = 1.0,
    lossy_names: frozenset[str] = frozenset(),
    row_stats: frozenset[str] = frozenset(),
    min_prior_bits: int = 0,
) -> Options:
    """The forms ``s`` may take with their costs, a reason per form, and the comparison masks a
    quantized form carries. ``lossy_names``: saved tensors a plan may store lossily (a replay that
    must be exact may not read them). ``row_stats``: per-row statistics (keepdim reductions such as
    RMSNorm's rsqrt); a replay that scales a lossy leaf by one multiplies the leaf's rounding error
    by 1/rms of each row (Qwen3's 16-wide per-head norms: 1e3x on small rows), an error no
    variance estimate of the leaf sees, so such replays are not offered. ``min_prior_bits``: the
    narrowest width offered on a prior sensitivity (no measurement yet)."""
    subs = subs or {}
    numel = int(sympy.sympify(s.numel).subs(subs))
    fixed = _fixed(s, cfg)
    exact = None if fixed else _exact_only(s, cfg)  # warns (or raises) on unknown backward uses
    n = _n_masks(s)
    if fixed:
        kind = "fixed"
    elif str(s.dtype) == "torch.bool":
        kind = "bool"
    elif exact:
        kind = "exact"
    elif n and n == len(s.uses):
        kind = "compared"
    elif str(s.dtype) == "torch.float64":
        kind = "float64"
    else:
        kind = "float"
    sens, source = _sensitivity(s, sensitivity, total_numel, numel)
    t = _forms.Tensor(
        s, cfg, profile, subs, kind, fixed, exact, numel,
        nbytes=0 if _free(s) else int(sympy.sympify(s.nbytes).subs(subs)),
        n_masks=n, sensitivity=sens, source=source, min_prior_bits=min_prior_bits,
        lossy_names=lossy_names, row_stats=row_stats,
    )  # fmt: skip
    out: list[Costs] = []
    why: list[str] = []
    for form in _forms.all_forms():
        if kind not in form.kinds:
            continue
        offered = form.offers(t)
        out += [c for c, _ in offered]
        why += [w for _, w in offered]
        if offered and form.exclusive(t):
            return out, why, 0
    return out, why, n if kind in ("compared", "float") else 0


def graph_candidates(
    saved: Sequence[SavedTensor],
    cfg: LowbitConfig,
    profile: cm.HardwareProfile,
    subs: Mapping,
    *,
    sensitivity: Mapping[str, float] | None = None,
    min_prior_bits: int = 0,
) -> Callable[[Mapping], list[Options]]:
    """The :func:`candidates` of every saved tensor of one graph, as a function of the sizes ``at``
    they are priced at (the planner checks a plan at grown sizes too). What ties the tensors
    together is fixed at the example sizes ``subs``: the prior's share of each tensor, which may
    be stored lossily, which are per-row statistics; and a tensor some replay reads keeps only
    the forms a replay may read (no comparison-only masks; replays chain)."""
    quantizable = [s for s in saved if not _fixed(s, cfg) and s.is_float]
    total_numel = float(sum(int(sympy.sympify(s.numel).subs(subs)) for s in quantizable)) or 1.0
    lossy_names = frozenset(s.name for s in quantizable)
    # keepdim reductions of activations; a saved weight whose last dim is 1 (a 1x1 convolution's
    # kernel) is a graph input, not a statistic
    row_stats = frozenset(
        s.name for s in saved if len(s.shape) >= 2 and str(s.shape[-1]) == "1" and not s.input_alias
    )

    def forms(at: Mapping) -> list[Options]:
        options = [
            candidates(
                s,
                cfg,
                profile,
                subs=at,
                sensitivity=sensitivity,
                total_numel=total_numel,
                lossy_names=lossy_names,
                row_stats=row_stats,
                min_prior_bits=min_prior_bits,
            )  # fmt: skip
            for s in saved
        ]
        _charge_replay_noise(saved, options)
        # A replay reads its leaves' values: they must exist (no comparison-only masks; a replayed
        # leaf is rebuilt first).
        leaves = {leaf for s, (c, _, _) in zip(saved, options, strict=True) for leaf in _replay_leaves(s, c)}
        for i, s in enumerate(saved):
            if s.name in leaves:
                c, why, n = options[i]
                keep = [k for k, x in enumerate(c) if _forms.get(x.form).replay_leaf]
                options[i] = ([c[k] for k in keep], [why[k] for k in keep], n)
        return options

    return forms


def _charge_replay_noise(saved: Sequence[SavedTensor], options: list[Options]) -> None:
    """A GEMM replay that reads a lossily stored leaf carries the leaf's rounding noise into the
    replayed tensor, about as much as rounding that tensor itself to the leaf's width; through a
    chain of replays (a leaf that is itself replayed) it carries the noise of that leaf's lossy
    leaves too. The solver prices each choice alone, so that noise is charged, in place, to every
    lossy form of each such leaf (``b`` bits: ``quant_variance(sensitivity of the replayed tensor,
    b)``): a plan that replays the tensor keeps its leaves wide enough; one that stores it instead
    is over-charged, never under-charged."""
    index = {s.name: i for i, s in enumerate(saved)}
    replays = {  # tensor -> the leaves its offered replay reads (saved tensors only)
        s.name: {leaf for leaf in _replay_leaves(s, c) if leaf in index}
        for s, (c, _, _) in zip(saved, options, strict=True)
    }

    def upstream(name: str, seen: set[str]) -> set[str]:
        """Saved tensors whose stored values a replay of ``name`` may read, through chains."""
        for leaf in replays.get(name, ()):
            if leaf not in seen:
                seen.add(leaf)
                upstream(leaf, seen)
        return seen

    extra: dict[str, float] = {}  # leaf -> sum of the sensitivities of GEMM replays reading it
    for s, (c, _, _) in zip(saved, options, strict=True):
        for x in c:
            if x.reads_lossy:
                for leaf in set(x.reads_lossy) | upstream(s.name, set()):
                    extra[leaf] = extra.get(leaf, 0.0) + x.sensitivity
    for leaf, sens in extra.items():
        c, why, n = options[index[leaf]]
        c = [dataclasses.replace(x, variance=x.variance + cm.quant_variance(sens, x.bits))
             if _forms.get(x.form).probed else x for x in c]  # fmt: skip
        options[index[leaf]] = (c, why, n)


def _replay_leaves(s: SavedTensor, costs: list[Costs]) -> set[str]:
    """Saved tensors whose stored values some form offered for ``s`` would read."""
    return {leaf for c in costs for leaf in _forms.get(c.form).reads(s)}
