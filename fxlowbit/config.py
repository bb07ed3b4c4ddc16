"""Validated options of the ``lowbit`` backend.

``torch.compile(model, backend="lowbit", options={...})`` lands here; an unknown key or a bad value
raises ``ValueError`` naming it and listing what is valid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["LowbitConfig", "PASSES"]

# The pipeline's named steps, in order; each can be switched off with options={"passes": {...}}.
PASSES = ("analyze", "plan", "rewrite_saved")

_CHOICES: dict[str, tuple[Any, ...]] = {
    "bits": (2, 4, 8),
    "inner": ("inductor", "eager"),
}


@dataclasses.dataclass(frozen=True)
class LowbitConfig:
    """Options (all optional).

    bits: bit width for saved float activations (8, 4 or 2).
    group_size: elements per quantization group along contiguous memory (multiple of 8).
    min_bytes: saved tensors smaller than this stay as they are.
    masks: pack bool saved tensors and scalar comparisons to exact 1-bit masks.
    seed: seed of the stochastic-rounding noise (None: drawn from torch's default generator).
    inner: compiler for the rewritten graphs, "inductor" (default) or "eager" (fast, for tests).
    strict: raise on unsupported constructs and internal errors instead of falling back.
    passes: mapping of pass name -> bool to switch pipeline steps off.
    """

    bits: int = 4
    group_size: int = 256
    min_bytes: int = 8192
    masks: bool = True
    seed: int | None = None
    inner: str = "inductor"
    strict: bool = False
    passes: Mapping[str, bool] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(
                    f"fxlowbit: option {key}={getattr(self, key)!r} is invalid; valid values: {choices}"
                )
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 8:
            raise ValueError(
                f"fxlowbit: option group_size={self.group_size!r} is invalid; "
                "it must be a positive multiple of 8"
            )
        if not isinstance(self.min_bytes, int) or self.min_bytes < 0:
            raise ValueError(f"fxlowbit: option min_bytes={self.min_bytes!r} must be an int >= 0")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"fxlowbit: option seed={self.seed!r} must be an int or None")
        for key in ("masks", "strict"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"fxlowbit: option {key}={getattr(self, key)!r} must be a bool")
        unknown = set(self.passes) - set(PASSES)
        if unknown:
            raise ValueError(
                f"fxlowbit: unknown pass name(s) {sorted(unknown)} in options['passes']; valid: {PASSES}"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> LowbitConfig:
        """Build from a ``torch.compile`` options dict, rejecting unknown keys."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"fxlowbit: unknown option(s) {unknown}; valid options: {valid}")
        return cls(**options)

    def enabled(self, step: str) -> bool:
        return bool(self.passes.get(step, True))
