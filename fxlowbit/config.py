"""Validated options of the ``lowbit`` backend.

``torch.compile(model, backend="lowbit", options={...})`` lands here; an unknown key or a bad value
raises ``ValueError`` naming it and listing what is valid (the valid values and their checks are
fxlowbit/config_checks.py).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

from .config_checks import GEMM_FORMATS, GEMM_ROLES, PASSES, normalised

__all__ = ["LowbitConfig", "PASSES", "GEMM_FORMATS", "GEMM_ROLES"]

# Default memory budget of each mode, as a fraction of the uncompressed saved-activation bytes.
MODE_BUDGET = {"memory": 0.1, "balanced": 0.2, "speed": 0.5}


@dataclasses.dataclass(frozen=True)
class LowbitConfig:
    """Options (all optional).

    bits: bit width for saved float activations (8, 4 or 2).
    group_size: elements per quantization group along contiguous memory (multiple of 8).
    min_bytes: saved tensors smaller than this stay as they are.
    masks: pack bool saved tensors and scalar comparisons to exact 1-bit masks.
    seed: seed of the stochastic-rounding noise (None: drawn from torch's default generator).
    inner: compiler for the rewritten graphs, "inductor" (default) or "eager" (fast, for tests).
    kernels: how packing and decoding run. "inline": our pure-torch code traced into the graphs, for
        Inductor to fuse with the producers and consumers (fastest CPU step, but Inductor spends
        minutes generating C++ for the traced quantizers); "hybrid": inline, except each quantizing
        pack, which calls ``fxlowbit::quantize_pack``, on CPU one Inductor kernel per (bits, group
        size, dtype) compiled once per process and reused by every graph and shape
        (codegen/kernels/quant_cpu.py); "ops": the opaque ``fxlowbit::`` ops everywhere (hand-written
        Triton kernels on CUDA, compiled or reference kernels on CPU; "triton", its old
        name, still works with a FutureWarning); "auto" (default): hybrid on CPU, ops on CUDA
        (benchmarks/results/compile_time_cpu.json and gpu_step_*.json measure them). With
        ``inner="eager"`` the ops always run.
    fuse: on the ops path, generate one kernel per pointwise chain ending in a quantized tensor
        that writes the forward value and its packed copy (codegen/fusion.py).
    strict: raise on unsupported constructs and internal errors instead of falling back.
    passes: mapping of pass name -> bool to switch pipeline steps off.
    gemm: format of the linear layers' GEMMs (passes/lowbit_gemm.py, while training): "auto"
        (default: the forward and grad-input GEMMs int8 or fp8 where the hardware profile estimates
        them at least 10% faster than plain, quantization included; small GEMMs stay plain; fp8
        only on CUDA sm89+; grad-weight GEMMs plain, as SwitchBack's, see
        ``passes.lowbit_gemm.AUTO_GRAD_WEIGHT``), "off" (plain), "int8" or "fp8" (forced). A
        3-tuple sets the forward, grad-input and grad-weight GEMMs apart, e.g.
        ``("int8", "int8", "off")``. With a low-bit forward and grad-weight GEMM, the forward's
        int8/fp8 copy of the input is the only copy saved for the backward (about 1/4 of fp32
        bytes); otherwise the input is saved as is, for the planner to replay or round.
    gemm_filter: mapping of module-name glob pattern (``fnmatch``, on dotted paths such as
        ``"blocks.0.fc1"``; functional linears take their enclosing module's path) -> a ``gemm``
        value, overriding ``gemm`` for the linears it matches; the first matching pattern wins.
        E.g. ``{"head": "off", "blocks.*.fc?": "int8"}``.
    gemm_hadamard: 0 (default), 32 or 128: rotate a low-bit forward GEMM's operands along K by
        block Hadamard matrices first (spreads outliers; layers whose K is not a multiple skip it).
    sparsity: None (default) or "2:4": train the linear layers with 2:4 weight sparsity
        (passes/sparsity.py, while training): each matching linear whose weight sizes are both
        multiples of 4 becomes ``fxlowbit::sparse24_linear`` with a transposable 2:4 mask of its
        weight (codegen/kernels/sparse24*.py: forward ``x (w*m)^T + b``, MVUE-sparsified
        grad-weight GEMM, pruned weights get a zero gradient). Sparsity takes precedence over
        ``gemm``: a sparse linear's GEMMs stay in its dtype. The mask lives in a process-wide
        registry of ``fxlowbit::sparse24_mask`` (codegen/kernels/sparse24_mask.py), advanced once
        per execution of the forward graph: activation checkpointing or anything else running the
        forward twice per step shifts the schedule.
    sparsity_filter: mapping of module-name glob pattern (as in ``gemm_filter``) -> bool: whether
        the linears it matches are sparsified; the first matching pattern wins and a linear no
        pattern matches is sparsified. Default {}: every eligible linear. E.g. ``{"head": False}``.
    sparsity_refresh: int >= 1 (default 100): forward calls (training steps) between recomputations
        of each mask from the current weights.
    sparsity_dense_after: None (default) or int >= 0: from this training step on the masks are no
        longer applied (dense fine-tuning; pruned weights resume from the values they had).
    sampling: variance-controlled sampling of the linears' backward GEMMs (VCAS; passes/sampling.py,
        codegen/kernels/sampling_state.py): the grad-input and grad-weight GEMMs run on a sampled
        subset of token rows, reweighted so the gradient stays unbiased. None (default: on with
        ``mode="speed"``, else off), False, True (keep ratios adapted per linear so that the added
        variance stays within what ``max_variance_ratio`` leaves after compression) or a float in
        (0, 1] (that keep ratio on every eligible linear, no adaptation; 1.0 is exact).
    mincut: when a plan needs lossy forms to meet the budget, also partition the joint graph with
        PyTorch's own recompute knapsack (``activation_memory_budget`` = the budget's fraction, which
        recomputes reductions, attention and chains of GEMMs that lowbit's replays cannot), plan
        that pair under the same budget in bytes, and keep whichever costs less by the cost model
        (default True; needs ``recompute``). Costs one more partition and analysis per such graph.
    sampling_filter: mapping of module-name glob pattern (as in ``gemm_filter``) -> bool: whether the
        linears it matches are sampled; first match wins; unmatched linears are. E.g. ``{"head": False}``.
    """

    memory_budget: float | int | None = None
    mode: str = "balanced"
    max_variance_ratio: float = 0.05
    allowed_bits: tuple[int, ...] = (2, 4, 8)
    profile: Any = None
    recompute: bool = True
    mincut: bool = True
    calibrate_every: int = 2000
    max_variants: int = 4
    bits: int | None = None
    group_size: int = 256
    min_bytes: int = 8192
    masks: bool = True
    seed: int | None = None
    inner: str = "inductor"
    kernels: str = "auto"
    fuse: bool = True
    strict: bool = False
    passes: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    gemm: Any = "auto"
    gemm_filter: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    gemm_hadamard: int = 0
    sparsity: str | None = None
    sparsity_filter: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    sparsity_refresh: int = 100
    sparsity_dense_after: int | None = None
    sampling: bool | float | None = None
    sampling_filter: Mapping[str, bool] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # every option checked (fxlowbit/config_checks.py; the first bad one raises ValueError),
        # and those with a normal form (tuples, plain dicts) stored in it
        for key, value in normalised(self).items():
            object.__setattr__(self, key, value)

    def sparse(self, module: str) -> bool:
        """Whether the linear in module ``module`` is to be 2:4 sparse: ``sparsity`` is set and the
        first ``sparsity_filter`` pattern matching it (if any) says True."""
        if self.sparsity is None:
            return False
        for pattern, keep in self.sparsity_filter.items():
            if fnmatch.fnmatchcase(module, pattern):
                return keep
        return True

    def gemm_formats(self, module: str) -> tuple[str, str, str]:
        """(forward, grad-input, grad-weight) formats for the linear in module ``module`` (each one
        of :data:`GEMM_FORMATS`): the first ``gemm_filter`` pattern matching it, else ``gemm``."""
        for pattern, formats in self.gemm_filter.items():
            if fnmatch.fnmatchcase(module, pattern):
                return formats
        return self.gemm

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> LowbitConfig:
        """Build from a ``torch.compile`` options dict, rejecting unknown keys."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"fxlowbit: unknown option(s) {unknown}; valid options: {valid}")
        return cls(**options)

    @property
    def budget(self) -> float | int:
        """The memory budget in force: ``memory_budget`` or the mode's default fraction."""
        return MODE_BUDGET[self.mode] if self.memory_budget is None else self.memory_budget

    @property
    def gemm_active(self) -> bool:
        """Whether any linear may get a low-bit GEMM (else the lowbit_gemm pass has nothing to do)."""
        return any(f != "off" for fs in (self.gemm, *self.gemm_filter.values()) for f in fs)

    @property
    def sampling_keep(self) -> float | None:
        """The forced keep ratio (``sampling=<float>``), else None."""
        v = self.sampling
        return None if v is None or isinstance(v, bool) else float(v)

    @property
    def sampling_active(self) -> bool:
        """Whether linears' backward GEMMs are sampled (``sampling``; ``mode="speed"`` turns it on)."""
        return bool(self.mode == "speed" if self.sampling is None else self.sampling is not False)

    def sampled(self, module: str) -> bool:
        """Whether the linear of ``module`` is sampled (``sampling_filter``; first match wins)."""
        for pattern, on in self.sampling_filter.items():
            if fnmatch.fnmatchcase(module, pattern):
                return on
        return True

    @property
    def sparsity_active(self) -> bool:
        """Whether any linear may be made 2:4 sparse (else the sparsity pass has nothing to do)."""
        return self.sparsity is not None

    def inline_kernels(self, device_type: str) -> bool:
        """Whether pack/decode are traced into the graphs (see ``kernels``) on ``device_type``."""
        if self.inner != "inductor":
            return False
        return self.kernels in ("inline", "hybrid") or (self.kernels == "auto" and device_type != "cuda")

    def quant_op(self, device_type: str) -> bool:
        """Whether, with inline kernels, the quantizing packs still call the opaque op (hybrid)."""
        return self.inline_kernels(device_type) and self.kernels != "inline"

    def enabled(self, step: str) -> bool:
        return bool(self.passes.get(step, True))
