"""Probes: measure how much gradient variance quantizing each saved tensor adds (GACT-style).

A probe replays one training step's partitioned forward and backward graphs eagerly, uncompressed,
on the step's real inputs (``torch.no_grad``; the compiled step runs as usual afterwards):

1. the exact gradient ``g`` of every input for fixed tangents (ones for a scalar output, seeded
   N(0, 1/numel) otherwise);
2. for each tensor the planner may quantize, the gradient ``g_l`` with only that tensor quantized
   at ``PROBE_BITS`` = 4 bits (stochastic rounding, groups as configured; in normalised or
   standardised form where the rewrite stores it so, see :func:`normalised_probe` and
   ``fxlowbit.forms.normalised``): ``||g_l - g||^2`` is one
   sample of the variance it adds, and since rounding variance scales as ``1/(2^b - 1)^2`` for fixed group
   ranges, the sensitivity is ``s_l = 225 ||g_l - g||^2`` (the variance at "one level", see
   :mod:`fxlowbit.costmodel`);
3. at the next step, the exact gradient ``g'`` of a new minibatch: ``||g - g'||^2 / 2`` estimates
   the minibatch gradient variance (two consecutive batches; parameter drift over one step is
   small next to batch noise). When it is negligible (the same batch repeated), ``||g||^2`` stands
   in (:func:`gradient_power`), so the ratio becomes a relative gradient error.

The cost is one eager forward, ``L + 2`` eager backwards (``L`` probed tensors) per probe, every
``calibrate_every`` steps; :mod:`benchmarks.calibration` measures it against the step time. Where
those backwards are costly (:data:`PARTIAL_MIN_S`), each of the ``L`` runs only the part of the
backward its rounded tensor reaches (:func:`probe_sensitivity`): about half of it on average.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import linecache
import logging
import operator
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from .codegen.kernels.quant import dequantize_unpack_reference, quantize_pack_reference
from .forms.normalised import normalised, standardised
from .passes import _ops
from .passes._graph import copy_module, through_identities

log = logging.getLogger(__name__)

__all__ = [
    "Probe",
    "probe_sensitivity",
    "exact_gradient",
    "minibatch_variance",
    "gradient_power",
    "flat_gradient",
    "replay_tangents",
    "normalised_probe",
]

# 4, not 2: the 1/(2^b - 1)^2 scaling holds while the noise is small next to the consumers'
# curvature (softmax, normalisation); 2-bit probes misranked a CNN's tensors (a plan at uniform
# 4-bit's bytes lost 3.5 dB to it; 4-bit probes gain 0.6 dB)
PROBE_BITS = 4


@dataclasses.dataclass
class Probe:
    """Raw results of one probe (un-normalised); the gradient's power is :func:`gradient_power`."""

    sensitivity: dict[str, float]  # saved name -> variance at one level, in squared gradient units
    grad: torch.Tensor  # the exact flat gradient of this step


def gradient_power(grad: torch.Tensor) -> float:
    """``||grad||^2``: the unit of a probe's sensitivities when there is no minibatch variance to
    measure (the same batch twice, the first batch)."""
    return float((grad**2).sum())


def replay_tangents(bw: fx.GraphModule, seed: int) -> list[torch.Tensor]:
    """Output gradients for a replay: a graph that returns a scalar (the loss) gets 1 for it and
    zeros for its other outputs, as training does (a ``transformers`` model also returns its
    logits, which the loss alone never differentiates: random tangents there made T5's probed
    gradient mostly noise of the probe's own making, and its plans 4.8 dB); a graph without one
    (a graph break before the loss) gets random tangents of unit total scale."""
    gen = torch.Generator().manual_seed(seed)
    vals = [ph.meta["val"] for ph in bw.graph.find_nodes(op="placeholder") if ph.name.startswith("tangents")]
    has_loss = any(v.numel() == 1 for v in vals)
    out = []
    for val in vals:
        shape = [int(d) for d in val.shape]  # raises on symbolic sizes: probes need static shapes
        if val.numel() == 1:
            t = torch.ones(shape, dtype=val.dtype)
        elif has_loss:
            t = torch.zeros(shape, dtype=val.dtype)
        else:
            t = torch.randn(shape, generator=gen).to(val.dtype) / max(val.numel(), 1) ** 0.5
        out.append(t.to(val.device))
    return out


def flat_gradient(grads) -> torch.Tensor:
    """The floating-point tensors of a backward's outputs, flattened into one float64 vector."""
    parts = [
        g.detach().reshape(-1).double()
        for g in grads
        if isinstance(g, torch.Tensor) and g.is_floating_point()
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _forward(fw: fx.GraphModule, num_fwd_outputs: int, args) -> list:
    outs = fw(*args)
    return list(outs[num_fwd_outputs:])


def exact_gradient(pristine, args, seed: int = 0) -> tuple[torch.Tensor, list, list[torch.Tensor]]:
    """(flat exact gradient, saved values, tangents) of one step replayed from the pristine graphs."""
    fw, bw, num_fwd_outputs = pristine
    with torch.no_grad():
        saved = _forward(fw, num_fwd_outputs, list(args))
        tangents = replay_tangents(bw, seed)
        grad = flat_gradient(bw(*saved, *tangents))
    return grad, saved, tangents


@contextlib.contextmanager
def _transient_source():
    """GraphModules built inside leave no generated source behind. fx keeps the Python source of
    every ``recompile`` in its loader's cache and a lazy ``linecache`` entry (holding the code's
    globals), for the process's lifetime, so that tracebacks can show it: the probes' temporary
    copies of the backward grew memory by ~105 KB per probe on TinyGPT. The compiled code does not
    need either; only these copies' tracebacks lose their source lines."""
    from torch.fx.graph_module import _loader

    before = set(_loader.eval_cache)
    try:
        yield
    finally:
        for key in set(_loader.eval_cache) - before:
            _loader.eval_cache.pop(key, None)
            linecache.cache.pop(key, None)


def _value_only(bw: fx.GraphModule, name: str) -> fx.GraphModule | None:
    """A copy of ``bw`` whose scalar comparisons of saved tensor ``name`` read it exactly (the
    rewrite stores them as exact 1-bit masks) while its value uses read an extra last placeholder;
    None when it has no comparison uses."""
    ph = next(p for p in bw.graph.find_nodes(op="placeholder") if p.name == name)
    if not any(_is_comparison(u) for u in through_identities(ph)):
        return None
    with _transient_source():
        g = copy_module(bw)
    ph = next(p for p in g.graph.find_nodes(op="placeholder") if p.name == name)
    *_, last = g.graph.find_nodes(op="placeholder")
    with g.graph.inserting_after(last):
        noisy = g.graph.placeholder(f"{name}_noisy")
    noisy.meta.update(ph.meta)

    def walk(node: fx.Node) -> None:
        for user in list(node.users):
            if user.op == "call_function" and user.target in _ops.IDENTITIES:
                walk(user)
            elif not _is_comparison(user):
                user.replace_input_with(node, noisy)

    walk(ph)
    with _transient_source():
        g.recompile()
    return g


def normalised_probe(pristine, name: str, noisy, fw_nodes: dict | None = None) -> fx.GraphModule | None:
    """A copy of the backward in which the value the rewrite would store for ``name`` in its place
    (its normalised form, e.g. LayerNorm's ``(x - mean) * rstd``; fxlowbit/forms/normalised.py) goes
    through ``noisy``; None when ``name`` is stored as itself. ``fw_nodes``: the forward graph's
    nodes by name (built here if not given); the backward is copied only when the form applies."""
    fw, bw, _ = pristine
    fw_nodes = fw_nodes if fw_nodes is not None else {n.name: n for n in fw.graph.nodes}
    ph = next(p for p in bw.graph.find_nodes(op="placeholder") if p.name == name)
    found = normalised(ph, fw_nodes)
    if found is None:
        return None
    with _transient_source():
        g = copy_module(bw)
    reader = next(n for n in g.graph.nodes if n.name == found[1].name)
    with g.graph.inserting_after(reader):
        q = g.graph.call_function(noisy, (reader,))
    reader.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
    with _transient_source():
        g.recompile()
    return g


def _is_comparison(user: fx.Node) -> bool:
    return user.op == "call_function" and getattr(user.target, "overloadpacket", None) in _ops.COMPARISONS


@dataclasses.dataclass
class _Replay:
    """One probed tensor's noisy backward: ``graph`` (the backward or a copy of it with the same node
    names), the nodes whose values change (``roots``: placeholders, whose values a replay is given,
    or nodes computed from exact values, e.g. the normalised form's rounding) and what they reach,
    run in graph order (``order``)."""

    graph: fx.GraphModule
    roots: set[str]
    order: list[fx.Node] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        changed = set(self.roots)
        given = {p.name for p in self.graph.graph.find_nodes(op="placeholder")} & self.roots

        def reaches(n: fx.Node) -> bool:
            if n.name in changed:
                return True
            src = n.args[0] if n.target is operator.getitem else None
            if isinstance(src, fx.Node) and src.name in changed and not src.kwargs:
                # a piece of a tuple op: only the arguments that piece reads count
                ignored = _ops.ignored_args(src.target, n.args[1])  # type: ignore[arg-type]
                return any(j not in ignored and _reads(a, changed) for j, a in enumerate(src.args))
            return any(a.name in changed for a in n.all_input_nodes)

        for n in self.graph.graph.nodes:
            if n.op != "output" and reaches(n):
                changed.add(n.name)
                if n.name not in given:
                    self.order.append(n)

    @property
    def partial(self) -> bool:
        """Whether the changed nodes can run alone: calls of functional ops only (an in-place op
        would write into a value the other replays read)."""
        return all(
            n.op == "call_function"
            and not (isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable)
            for n in self.order
        )

    def reads(self) -> set[str]:
        """Names of the unchanged values this replay reads (the exact run keeps them)."""
        changed = self.roots | {n.name for n in self.order}
        (output,) = self.graph.graph.find_nodes(op="output")
        used = [a for n in (*self.order, output) for a in n.all_input_nodes]
        return {a.name for a in used if a.name not in changed}

    def run(self, exact: dict[str, object], given: dict[str, torch.Tensor]) -> list:
        """The backward's outputs with only the changed nodes run; the rest read ``exact``."""
        env: dict[str, Any] = dict(given)

        def load(a: fx.Node) -> Any:
            return env[a.name] if a.name in env else exact[a.name]

        for n in self.order:
            fn: Callable[..., Any] = n.target  # type: ignore[assignment]  # call_function nodes only
            env[n.name] = fn(*fx.node.map_arg(n.args, load), **fx.node.map_arg(n.kwargs, load))
        (output,) = self.graph.graph.find_nodes(op="output")
        return list(fx.node.map_arg(output.args[0], load))

    def run_whole(self, inputs: dict[str, object], given: dict[str, torch.Tensor]) -> list:
        """The whole graph, run as generated, on ``inputs`` by placeholder name with ``given`` in."""
        values = {**inputs, **given}
        return list(self.graph(*(values[p.name] for p in self.graph.graph.find_nodes(op="placeholder"))))


def _reads(arg: Any, names: set[str]) -> bool:
    """Whether the node argument ``arg`` (a node, or a list or tuple of them) holds one of ``names``."""
    found: list[str] = []

    def note(a: fx.Node) -> fx.Node:
        found.append(a.name)
        return a

    fx.node.map_arg(arg, note)
    return any(name in names for name in found)


def _exact_values(bw: fx.GraphModule, inputs: list, names: set[str]) -> tuple[list, dict[str, object]]:
    """(the backward's outputs, the values of ``names`` and of the placeholders) from one run of a
    copy of ``bw`` that also returns those values."""
    phs = list(bw.graph.find_nodes(op="placeholder"))
    values: dict[str, object] = {p.name: v for p, v in zip(phs, inputs, strict=True)}
    extra = [n for n in bw.graph.nodes if n.name in names and n.op not in ("placeholder", "output")]
    if not extra:
        return list(bw(*inputs)), values
    with _transient_source():
        g = copy_module(bw)
        (output,) = g.graph.find_nodes(op="output")
        by_name = {n.name: n for n in g.graph.nodes}
        outs = list(output.args[0])
        output.args = (tuple(outs + [by_name[n.name] for n in extra]),)
        g.recompile()
        got = list(g(*inputs))
    values.update({n.name: v for n, v in zip(extra, got[len(outs) :], strict=True)})
    return got[: len(outs)], values


def _rounded(
    noisy: Callable[[torch.Tensor], torch.Tensor], key: str, x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What a replay is given: ``x`` rounded, under placeholder ``key`` (drawn when it runs)."""
    return {key: noisy(x)}


# Partial replays pay a fixed cost (a copy of the backward that also returns the values they read,
# its code generated: ~25 ms for Llama-tiny's 541 nodes) and Python's dispatch per node they run:
# on small models that is more than they skip (Llama tiny at defaults, CPU, 2026-12-07: the probe
# step 31-34 ms with whole replays, 66-67 ms with partial ones; the issue-18 Llama planned with
# int8 GEMMs, 46 tensors: 14.5 s -> 7.8 s). Probes whose whole replays would take less run whole.
PARTIAL_MIN_S = 0.25


def probe_sensitivity(pristine, args, names, group_size: int, seed: int = 0) -> Probe:
    """Sensitivity of each saved tensor in ``names`` (see the module docstring). Each noisy backward
    runs only the nodes its rounded value reaches (:class:`_Replay`), reading every other value from
    one exact run that keeps them: a tensor read by a grad-weight GEMM alone costs that GEMM, one
    read in layer ``k`` the backward from layer ``k`` down. The gradients are bit for bit those of
    replaying the whole backward (the same ops on the same values). The exact run keeps the values
    the replays read until the probe ends: more memory than one backward holds at a time. Probes
    cheap enough to run whole (:data:`PARTIAL_MIN_S`) or with an in-place op to replay run whole."""
    fw, bw, n_out = pristine
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    placeholders = [p.name for p in bw.graph.find_nodes(op="placeholder")]
    exact = set(placeholders) - set(names)  # never quantized: a standardised form may read them
    gen = torch.Generator().manual_seed(seed + 1)

    def noisy(v: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(-(-v.numel() // group_size), group_size, generator=gen).to(v.device)
        codes, meta = quantize_pack_reference(v.detach(), PROBE_BITS, group_size, noise)
        return dequantize_unpack_reference(codes, meta, PROBE_BITS, group_size, v.shape, v.dtype, v.stride())

    with torch.no_grad():
        start = time.perf_counter()
        saved = _forward(fw, n_out, list(args))
        t_forward = time.perf_counter() - start
        tangents = replay_tangents(bw, seed)
        inputs = [*saved, *tangents]
        # per tensor: its replay and the rounded value it is given (drawn when it runs, in order)
        replays: dict[str, tuple[_Replay, Callable[[], dict[str, torch.Tensor]]]] = {}
        for name in names:
            if name not in placeholders:
                continue
            i = placeholders.index(name)
            x = saved[i]
            if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()):
                continue
            normal = normalised_probe(pristine, name, noisy, fw_nodes)
            std = standardised(fw_nodes[name], exact) if normal is None and name in fw_nodes else None
            split = None if normal is not None or std is not None else _value_only(bw, name)
            if normal is not None:  # its inserted rounding node reads the exact normalised value
                (q,) = (n for n in normal.graph.nodes if n.op == "call_function" and n.target is noisy)
                replays[name] = _Replay(normal, {q.name}), dict
            elif std is not None:  # rounded standardised, rebuilt as the rewrite stores it
                mean, rstd = (saved[placeholders.index(n.name)] for n in std[1:])

                def rebuilt(name=name, x=x, mean=mean, rstd=rstd) -> dict[str, torch.Tensor]:
                    return {name: noisy((x - mean) * rstd) / rstd + mean}

                replays[name] = _Replay(bw, {name}), rebuilt
            elif split is not None:  # comparisons keep reading the exact value, as the masks do
                key = f"{name}_noisy"
                replays[name] = _Replay(split, {key}), functools.partial(_rounded, noisy, key, x)
            else:
                replays[name] = _Replay(bw, {name}), functools.partial(_rounded, noisy, name, x)
        # a backward takes about two forwards: below PARTIAL_MIN_S of whole replays, run them whole
        worth = len(replays) * 2 * t_forward > PARTIAL_MIN_S
        partial = worth and all(r.partial for r, _ in replays.values())
        keep = set().union(*(r.reads() for r, _ in replays.values())) if partial else set()
        outs, values = _exact_values(bw, inputs, keep)
        grad = flat_gradient(outs)
        sens: dict[str, float] = {}
        for name, (r, given) in replays.items():
            got = r.run(values, given()) if partial else r.run_whole(values, given())
            g = flat_gradient(got)
            sens[name] = float(((g - grad) ** 2).sum()) * (2**PROBE_BITS - 1) ** 2
    return Probe(sens, grad)


def minibatch_variance(g1: torch.Tensor, g2: torch.Tensor) -> float:
    """Minibatch gradient variance from two consecutive batches' exact gradients; falls back to
    ``||g1||^2`` (relative error) when the two batches are (nearly) the same."""
    var = float(((g1 - g2) ** 2).sum()) / 2
    norm = gradient_power(g1)
    return var if var > 1e-6 * norm else max(norm, 1e-30)
