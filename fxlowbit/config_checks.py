"""The valid values of the ``lowbit`` backend's options and their checks.

:class:`fxlowbit.config.LowbitConfig` calls :func:`normalised` when it is built: a bad value raises
``ValueError`` naming the option and listing what is valid (the options are checked in a fixed
order, so of several bad ones the same one is named every time), and the values that have a
normal form (tuples, plain dicts, 3-tuples of GEMM formats) come back in it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import LowbitConfig

__all__ = ["PASSES", "GEMM_FORMATS", "GEMM_ROLES", "CHOICES", "normalised", "gemm_formats"]

# The pipeline's named steps, in order; each can be switched off with options={"passes": {...}}.
# (fxlowbit/pipeline.py runs them; "probes": the copies the probes replay, so off = no probes)
PASSES = (
    *("linear_ce", "sparsity", "lowbit_gemm", "sampling"),  # on the Dynamo graph
    *("saved_views", "analyze", "plan", "probes", "recompute", "rewrite_saved"),  # on the partitioned pair
)
GEMM_FORMATS = ("auto", "off", "int8", "fp8")  # per GEMM: cost model, plain, or forced
GEMM_ROLES = ("fwd", "grad_input", "grad_weight")

CHOICES: dict[str, tuple[Any, ...]] = {
    "bits": (None, 2, 4, 8),
    "inner": ("inductor", "eager"),
    "kernels": ("auto", "inline", "hybrid", "ops", "triton"),  # "triton": the old name of "ops"
    "mode": ("memory", "balanced", "speed"),
    "gemm_hadamard": (0, 32, 128),
    "sparsity": (None, "2:4"),
}


def normalised(cfg: LowbitConfig) -> dict[str, Any]:
    """Check every option of ``cfg``; return the options to store in their normal form."""
    _check_values(cfg)
    out: dict[str, Any] = {"allowed_bits": _allowed_bits(cfg.allowed_bits)}
    _check_counts_and_flags(cfg)
    out["passes"] = _passes(cfg.passes)
    out["kernels"] = _kernels(cfg.kernels)
    out["gemm"] = gemm_formats(cfg.gemm, "gemm")
    out["gemm_filter"] = _gemm_filter(cfg.gemm_filter)
    out["sparsity_filter"] = _sparsity(cfg)
    out["sampling_filter"] = _sampling(cfg)
    _check_bits(cfg, out["allowed_bits"])
    _check_profile(cfg.profile)
    return out


def _kernels(value: str) -> str:
    """``kernels="triton"`` is the old name of ``"ops"``: the opaque ops run Triton only on CUDA (on a
    CPU they run compiled or reference kernels), so the name said what they are on one device only."""
    if value == "triton":
        warnings.warn(
            'fxlowbit: option kernels="triton" is now called kernels="ops" (the opaque fxlowbit:: ops: '
            'Triton kernels on CUDA, compiled or reference kernels on a CPU); running as "ops"',
            FutureWarning,
            stacklevel=5,
        )
        return "ops"
    return value


def _one_of(value: Any, choices: tuple[Any, ...]) -> bool:
    """``value in choices`` with types compared too: 8.0 and True are not the int choices 8 and 1."""
    return any(value == c and type(value) is type(c) for c in choices)


def _check_values(cfg: LowbitConfig) -> None:
    for key, choices in CHOICES.items():
        if not _one_of(getattr(cfg, key), choices):
            raise ValueError(
                f"fxlowbit: option {key}={getattr(cfg, key)!r} is invalid; valid values: {choices}"
            )
    if not isinstance(cfg.group_size, int) or cfg.group_size <= 0 or cfg.group_size % 8:
        raise ValueError(
            f"fxlowbit: option group_size={cfg.group_size!r} is invalid; it must be a positive multiple of 8"
        )
    if not isinstance(cfg.min_bytes, int) or cfg.min_bytes < 0:
        raise ValueError(f"fxlowbit: option min_bytes={cfg.min_bytes!r} must be an int >= 0")
    if cfg.seed is not None and not isinstance(cfg.seed, int):
        raise ValueError(f"fxlowbit: option seed={cfg.seed!r} must be an int or None")
    b = cfg.memory_budget
    if b is not None and (
        isinstance(b, bool)
        or not isinstance(b, (int, float))
        or (isinstance(b, float) and not math.isfinite(b))  # NaN passes every comparison below
        or b <= 0
        or (isinstance(b, float) and 1 < b < 2)
    ):
        raise ValueError(
            f"fxlowbit: option memory_budget={b!r} is invalid; give a fraction in (0, 1] of the "
            "uncompressed saved-activation bytes or a byte count (int > 1)"
        )
    r = cfg.max_variance_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
        raise ValueError(f"fxlowbit: option max_variance_ratio={cfg.max_variance_ratio!r} must be > 0")


def _allowed_bits(value: Any) -> tuple[int, ...]:
    bits = tuple(value) if isinstance(value, (list, tuple)) else None
    if not bits or any(not _one_of(x, (2, 4, 8)) for x in bits):
        raise ValueError(
            f"fxlowbit: option allowed_bits={value!r} is invalid; give a non-empty subset of (2, 4, 8)"
        )
    return bits


def _check_counts_and_flags(cfg: LowbitConfig) -> None:
    for key in ("calibrate_every", "max_variants"):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "calibrate_every" else 1):
            raise ValueError(
                f"fxlowbit: option {key}={v!r} must be an int >= {int(key != 'calibrate_every')}"
            )
    for key in ("masks", "strict", "recompute", "mincut", "fuse"):
        if not isinstance(getattr(cfg, key), bool):
            raise ValueError(f"fxlowbit: option {key}={getattr(cfg, key)!r} must be a bool")


def _passes(passes: Any) -> dict[str, bool]:
    if not isinstance(passes, Mapping) or not all(isinstance(v, bool) for v in passes.values()):
        raise ValueError(
            f"fxlowbit: option passes={passes!r} is invalid; give a mapping of pass name -> bool, "
            f'e.g. {{"plan": False}}; pass names: {PASSES}'
        )
    unknown = set(passes) - set(PASSES)
    if unknown:
        raise ValueError(
            f"fxlowbit: unknown pass name(s) {sorted(unknown, key=str)} in options['passes']; valid: {PASSES}"
        )
    return dict(passes)


def gemm_formats(value: Any, key: str) -> tuple[str, str, str]:
    """A ``gemm`` value as (forward, grad-input, grad-weight) formats; a single format sets all three."""
    formats = (value,) * 3 if isinstance(value, str) else value
    if (
        not isinstance(formats, (list, tuple))
        or len(formats) != 3
        or any(not isinstance(f, str) or f not in GEMM_FORMATS for f in formats)
    ):
        raise ValueError(
            f"fxlowbit: option {key}={value!r} is invalid; give one of {GEMM_FORMATS} or a 3-tuple of them "
            f"for the {', '.join(GEMM_ROLES)} GEMMs"
        )
    return tuple(formats)


def _gemm_filter(rules: Any) -> dict[str, tuple[str, str, str]]:
    if not isinstance(rules, Mapping):
        raise ValueError(
            f"fxlowbit: option gemm_filter={rules!r} must be a mapping of module-name glob pattern -> format"
        )
    out = {}
    for pattern, value in rules.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"fxlowbit: gemm_filter pattern {pattern!r} must be a non-empty string")
        out[pattern] = gemm_formats(value, f"gemm_filter[{pattern!r}]")
    return out


def _sparsity(cfg: LowbitConfig) -> dict[str, bool]:
    """Check the sparsity options; return ``sparsity_filter`` as a dict."""
    rules = cfg.sparsity_filter
    if not isinstance(rules, Mapping):
        raise ValueError(
            f"fxlowbit: option sparsity_filter={rules!r} must be a mapping of "
            "module-name glob pattern -> bool"
        )
    for pattern, value in rules.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"fxlowbit: sparsity_filter pattern {pattern!r} must be a non-empty string")
        if not isinstance(value, bool):
            raise ValueError(f"fxlowbit: sparsity_filter[{pattern!r}]={value!r} must be a bool")
    r = cfg.sparsity_refresh
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"fxlowbit: option sparsity_refresh={r!r} must be an int >= 1")
    d = cfg.sparsity_dense_after
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
        raise ValueError(f"fxlowbit: option sparsity_dense_after={d!r} must be None or an int >= 0")
    return dict(rules)


def _sampling(cfg: LowbitConfig) -> dict[str, bool]:
    """Check the sampling options; return ``sampling_filter`` as a dict."""
    v = cfg.sampling
    ok = v is None or isinstance(v, bool) or (isinstance(v, (int, float)) and 0 < v <= 1)
    if not ok:
        raise ValueError(
            f"fxlowbit: option sampling={v!r} is invalid; give None, False, True or a keep ratio in (0, 1]"
        )
    rules = cfg.sampling_filter
    if not isinstance(rules, Mapping) or not all(
        isinstance(k, str) and k and isinstance(b, bool) for k, b in rules.items()
    ):
        raise ValueError(
            f"fxlowbit: option sampling_filter={rules!r} must be a mapping of module-name glob "
            "pattern -> bool"
        )
    return dict(rules)


def _check_bits(cfg: LowbitConfig, allowed_bits: tuple[int, ...]) -> None:
    """``bits`` is the uniform rule and skips the planner: options that only the planner reads
    would be silently ignored, so giving them with ``bits`` is an error."""
    if cfg.bits is None:
        return
    if cfg.memory_budget is not None:
        raise ValueError(
            f"fxlowbit: options bits={cfg.bits!r} and memory_budget={cfg.memory_budget!r} contradict: "
            "bits stores every compressible tensor at that width whatever the budget; give one of them"
        )
    if cfg.mode != "balanced":
        raise ValueError(
            f"fxlowbit: options bits={cfg.bits!r} and mode={cfg.mode!r} contradict: bits skips the "
            "planner, which is what mode sets the budget of; give one of them"
        )
    if cfg.bits not in allowed_bits:
        raise ValueError(
            f"fxlowbit: options bits={cfg.bits!r} and allowed_bits={allowed_bits!r} contradict: "
            "bits is not among the allowed widths"
        )


def _check_profile(spec: Any) -> None:
    """Load the hardware profile once, so that a bad ``profile`` fails when the options are read
    (``torch.compile``'s first call) with its name, before any pass runs."""
    from .costmodel import load_profile

    try:
        load_profile(spec)
    except ValueError as err:
        text = repr(spec)
        text = text if len(text) <= 80 else text[:77] + "..."
        why = str(err).removeprefix("fxlowbit profile: ").removeprefix("fxlowbit: ")
        raise ValueError(f"fxlowbit: option profile={text} is invalid: {why}") from None
