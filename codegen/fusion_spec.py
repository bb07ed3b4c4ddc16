"""What a generated fusion computes: the aten pointwise ops a chain may hold (:data:`OPS`, each with
its Triton expression), the chain itself as a :class:`Spec` (JSON, so it travels as a string
argument of the ``fxlowbit::fused_quantize_pack`` / ``fused_dequantize_apply`` ops), and
:func:`reference`, the chain replayed with the graph's own aten ops (bit for bit what the unfused
graph does). :mod:`.fusion_match` builds specs from FX graphs, :mod:`.fusion_source` turns them
into Triton source.
"""

from __future__ import annotations

import dataclasses
import json

import torch

__all__ = ["OPS", "Spec", "reference", "resolve_arg", "step_dtype"]

# aten overload -> Triton expression over the argument expressions {0}, {1} (fp32 values)
OPS: dict[str, str] = {
    "aten.add.Tensor": "({0} + {1})",
    "aten.sub.Tensor": "({0} - {1})",
    "aten.mul.Tensor": "({0} * {1})",
    "aten.div.Tensor": "({0} / {1})",
    "aten.neg.default": "(-{0})",
    "aten.abs.default": "tl.abs({0})",
    "aten.relu.default": "tl.maximum({0}, 0.0)",
    "aten.exp.default": "tl.exp({0})",
    "aten.log.default": "tl.log({0})",
    "aten.sqrt.default": "tl.sqrt({0})",
    "aten.rsqrt.default": "tl.math.rsqrt({0})",
    "aten.erf.default": "tl.math.erf({0})",
    "aten.sigmoid.default": "(1.0 / (1.0 + tl.exp(-{0})))",
    "aten.tanh.default": "(2.0 / (1.0 + tl.exp(-2.0 * {0})) - 1.0)",
    "aten.reciprocal.default": "(1.0 / {0})",
    "aten.maximum.default": "tl.maximum({0}, {1})",
    "aten.minimum.default": "tl.minimum({0}, {1})",
    "prims.convert_element_type.default": "{0}",  # the rounding follows the output dtype below
    # reshapes of contiguous values keep the flat element order: identities on flat indices
    "aten.view.default": "{0}",
    "aten._unsafe_view.default": "{0}",
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """A pointwise chain: ``inputs`` are ("full" | "row" | "scalar") kinds (a consumer's first is
    "decoded"), ``program`` a list of ``(aten op, args, out dtype)`` with args ``["in", k]``,
    ``["v", i]``, ``["shape", dims]`` (a view's) or a Python number; the last value is the saved
    tensor (a producer's) or the sink (a consumer's)."""

    inputs: tuple[str, ...]
    program: tuple[tuple[str, tuple, str], ...]

    def to_json(self) -> str:
        return json.dumps({"inputs": self.inputs, "program": self.program}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        d = json.loads(text)
        prog = tuple((op, tuple(tuple(a) if isinstance(a, list) else a for a in args), dt)
                     for op, args, dt in d["program"])  # fmt: skip
        return cls(tuple(d["inputs"]), prog)


def step_dtype(name: str) -> torch.dtype:
    """The dtype a program step names: ``"torch.bfloat16"`` -> ``torch.bfloat16``."""
    return getattr(torch, name.split(".")[1])


def _aten(name: str):
    ns, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, ns), op), overload)


def resolve_arg(x, inputs: list, vals: list):
    """An argument of a program step: ``("in", k)``, ``("v", i)`` or a number."""
    if isinstance(x, tuple):
        return list(x[1]) if x[0] == "shape" else inputs[x[1]] if x[0] == "in" else vals[x[1]]
    return x


def reference(spec: Spec, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The chain replayed with the graph's own aten ops (bit for bit what the unfused graph does)."""
    vals: list[torch.Tensor] = []
    for op, args, dtype in spec.program:
        a = [resolve_arg(x, inputs, vals) for x in args]
        if op == "prims.convert_element_type.default":
            a.append(step_dtype(dtype))
        vals.append(_aten(op)(*a))
    return vals[-1]
