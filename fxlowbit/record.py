"""What each compiled graph looked like, for :mod:`fxlowbit.report` and for dumps.

The partition function calls :func:`add` once per compiled graph with the forward and backward
graphs before the plan's rewrites (the min-cut partition after saved_views, which re-points saved
views to their bases losslessly: the names plans and analyses use) and after rewriting (as handed
to the inner compiler), its plan and its config. Graphs are kept as copies that share the GraphModules'
attributes (nodes and their metadata are copied, tensors are not). :func:`clear` (called by
``fxlowbit.reset()``) forgets them.

``FXLOWBIT_DUMP_DIR=dir`` also writes, per compiled graph ``k``, ``dir/graph<k>_{fw,bw}_before.py``,
``graph<k>_{fw,bw}_after.py`` and ``graph<k>_plan.txt`` and, with Inductor as the inner compiler,
Inductor's generated code ``graph<k>_{fw,bw}_inductor.py``: :func:`inner_compile` wraps
``compile_fx_inner`` and saves the returned ``CompiledFxGraph.source_code`` (torch 2.13; the
backward's is written when it compiles, at the first backward).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch.fx as fx

from .candidates import canonical_keys
from .config import LowbitConfig
from .passes._graph import copy_module, same_graph
from .plan import Plan
from .records import GraphFacts
from .state import STATE

log = logging.getLogger(__name__)

__all__ = ["GraphRecord", "DUMP_ENV", "records", "add", "clear", "snapshot", "inner_compile", "dump_dir"]

DUMP_ENV = "FXLOWBIT_DUMP_DIR"
PARTS = ("fw_before", "fw_after", "bw_before", "bw_after")


class LazyGraphs(Mapping[str, fx.GraphModule]):
    """PARTS -> GraphModule, loaded by ``load`` on first use: the graphs of a graph that
    AOTAutograd's cache served (``fxlowbit.backend``), which only reports and ``last_graphs()`` read."""

    def __init__(self, load: Callable[[], dict[str, fx.GraphModule]]) -> None:
        self._load: Callable[[], dict[str, fx.GraphModule]] | None = load
        self._graphs: dict[str, fx.GraphModule] = {}

    def _get(self) -> dict[str, fx.GraphModule]:
        if self._load is not None:
            self._graphs, self._load = self._load(), None
        return self._graphs

    def __getitem__(self, part: str) -> fx.GraphModule:
        return self._get()[part]

    def __iter__(self) -> Iterator[str]:
        return iter(PARTS)

    def __len__(self) -> int:
        return len(PARTS)


@dataclasses.dataclass
class GraphRecord:
    index: int  # order of compilation since the last reset (the k of graph<k>_* dump files)
    graphs: Mapping[str, fx.GraphModule]  # PARTS -> GraphModule
    plan: Plan | None  # None: the plan step did not run (switched off, or nothing to plan)
    cfg: LowbitConfig
    facts: GraphFacts | None = None  # of the partition (for the budget frontier)
    profile: Any = None  # costmodel.HardwareProfile the plan was costed with
    sensitivity: dict[str, float] | None = None  # measured, by saved-tensor name (None: the prior)
    replanned: bool = False  # a variant compiled after probes changed the plan
    fallback: str | None = None  # why this graph runs uncompressed (an internal error)
    inductor_code: dict[str, str] = dataclasses.field(default_factory=dict)  # "fw"/"bw" -> source
    extra_bytes: Any = 0  # saved bytes of the losses linear_ce fused, had they not been (the budget's base)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # partition step -> seconds


_records: list[GraphRecord] = STATE.records  # fxlowbit.state; reset() clears it


def records() -> list[GraphRecord]:
    """Records of every graph compiled since the last ``fxlowbit.reset()``, in compilation order."""
    return list(_records)


def clear() -> None:
    _records.clear()


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm``'s graph on the same attributes: later rewrites of ``gm`` leave it alone
    (if copying fails, ``gm`` itself: recording must never cost the user's compile)."""
    try:
        return copy_module(gm, lazy=True)  # its code is generated if a report reads it
    except Exception as err:
        log.warning("fxlowbit: graph not copied for the report (%s: %s)", type(err).__name__, err)
        return gm


def dump_dir() -> str | None:
    return os.environ.get(DUMP_ENV) or None


def add(
    partitioner,
    before: tuple[fx.GraphModule, fx.GraphModule] | LazyGraphs,
    after: tuple[fx.GraphModule, fx.GraphModule] | None,
    fallback: str | None,
) -> GraphRecord | None:
    """Record one compiled graph (``partitioner``: the ``LowbitPartitioner`` that made it): its
    graphs ``before`` and ``after`` rewriting, or all four as :class:`LazyGraphs` (``after``
    None: a cache hit's); None (and a logged warning) if that fails: the compile goes on."""
    try:
        return _add(partitioner, before, after, fallback)
    except Exception as err:
        log.warning("fxlowbit: graph not recorded for reports (%s: %s)", type(err).__name__, err)
        return None


def _add(partitioner, before, after, fallback: str | None) -> GraphRecord:
    facts = partitioner.facts
    sens = partitioner.sensitivity
    if sens is not None and facts is not None:  # measured, by canonical key -> by this graph's names
        keys = canonical_keys(facts.saved)
        sens = {name: sens[k] for name, k in keys.items() if k in sens}
    if isinstance(before, LazyGraphs):
        graphs: Mapping[str, fx.GraphModule] = before
    else:  # a graph no rewrite touched is its before copy (no second copy, nor a second pickle)
        fw, bw = (b if same_graph(a, b) else snapshot(a) for a, b in zip(after, before, strict=True))
        graphs = dict(zip(PARTS, (before[0], fw, before[1], bw), strict=True))
    rec = GraphRecord(
        index=len(_records),
        graphs=graphs,
        plan=None if fallback else partitioner.plan,
        cfg=partitioner.cfg,
        facts=facts,
        profile=partitioner.profile,
        sensitivity=sens,
        replanned=partitioner.sensitivity is not None,
        fallback=fallback,
        extra_bytes=getattr(partitioner, "extra_bytes", 0),
        timings=dict(getattr(partitioner, "timings", {})),
    )
    _records.append(rec)
    partitioner.record = rec
    if dump_dir():
        _dump(rec)
    return rec


def write(name: str, text: str) -> None:
    """Write ``text`` to ``FXLOWBIT_DUMP_DIR/name`` (nothing when it is not set)."""
    root = dump_dir()
    if root is None:
        return
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, name)
    with open(path, "w") as f:
        f.write(text)
    log.debug("wrote %s", path)


def _dump(rec: GraphRecord) -> None:
    for part, gm in rec.graphs.items():
        write(f"graph{rec.index}_{part}.py", gm.print_readable(print_output=False))
    plan = str(rec.plan) if rec.plan is not None else f"no plan ({rec.fallback or 'plan step off'})"
    write(f"graph{rec.index}_plan.txt", plan + "\n")


def inner_compile(partitioner):
    """Inductor's ``compile_fx_inner``, also keeping the generated code of the graphs
    ``partitioner`` made in their record and writing it to ``FXLOWBIT_DUMP_DIR`` (the backend
    uses it only while that is set)."""
    from torch._inductor.compile_fx import compile_fx_inner

    def compile_inner(gm, example_inputs, **kwargs):
        out = compile_fx_inner(gm, example_inputs, **kwargs)
        rec = getattr(partitioner, "record", None)
        code = getattr(out, "source_code", None)
        if rec is not None and isinstance(code, str):
            part = "bw" if kwargs.get("is_backward") else "fw"
            rec.inductor_code[part] = code
            try:
                write(f"graph{rec.index}_{part}_inductor.py", code)
            except OSError as err:
                log.warning("fxlowbit: %s not written (%s)", DUMP_ENV, err)
        return out

    return compile_inner
