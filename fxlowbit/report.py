"""What lowbit did to each compiled graph: a per-node table, totals, reasons, graphs, plots.

:func:`last_report` reads the records the backend keeps per compiled graph (:mod:`fxlowbit.record`)
into a :class:`Report`: one :class:`GraphReport` per graph Dynamo produced (and per variant a
re-plan compiled), each with a :class:`Row` per saved tensor (from the plan's decisions, the layer
from the forward graph's ``nn_module_stack``), totals, a one-line reason per decision, the forward
and backward graphs' code before and after rewriting, and the budget frontier (the planner re-run
at several budgets). A report renders as plain text (100 columns; :meth:`Report.to_text` with
``rich=True`` uses ``rich``), JSON (:meth:`Report.to_json` / :meth:`Report.from_json`, with a
``schema`` field), a self-contained HTML page and a matplotlib figure.

    >>> import torch, fxlowbit
    >>> model = torch.compile(torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.GELU()),
    ...                       backend="lowbit", options={"inner": "eager"})
    >>> model(torch.randn(64, 64)).sum().backward()
    >>> print(fxlowbit.last_report().to_text())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

import torch

from . import forms, planner, record
from .config import LowbitConfig
from .frontier import budget_frontier
from .plan import Decision, Plan

log = logging.getLogger(__name__)

__all__ = ["Report", "GraphReport", "Row", "last_report", "reason", "SCHEMA"]

SCHEMA = "fxlowbit.report/1"


@dataclasses.dataclass
class Row:
    """One saved tensor of one graph."""

    node: str  # its name in the forward graph
    op: str  # the producing op
    layer: str  # module path from the forward graph's nn_module_stack ("" when unknown)
    shape: list[Any]  # ints, or strings of symbolic sizes
    dtype: str
    form: str  # plan.Form: keep, recompute, quant, mask, cmp_mask, packed
    bits: int  # stored bits per element (0: recomputed)
    gemm: str  # GEMM format of the consuming matmul (empty: none chosen)
    bytes_before: int
    bytes_after: int
    time_s: float  # estimated seconds this form adds to a step
    variance: float  # added gradient variance, in minibatch-variance units
    variance_share: float  # of the graph's total added variance (0..1)
    reason: str


@dataclasses.dataclass
class GraphReport:
    """One compiled graph (a Dynamo graph, or a variant a re-plan compiled)."""

    index: int
    status: str
    budget: int | None  # saved bytes allowed (None: no budget, e.g. the uniform rule)
    step_time_s: float  # estimated uncompressed step time
    time_added_s: float  # estimated seconds the plan adds
    variance_ratio: float
    replanned: bool
    options: dict[str, Any]
    rows: list[Row]
    code: dict[str, str]  # fw_before, fw_after, bw_before, bw_after -> readable code
    inductor_code: dict[str, str] = dataclasses.field(default_factory=dict)  # "fw"/"bw" -> source
    frontier: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # budget, bytes, time_s, ...
    modules: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    def by_layer(self) -> list[tuple[str, int, int]]:
        """(layer, bytes before, bytes after) per module, in forward order."""
        acc: dict[str, list[int]] = {}
        for r in self.rows:
            if r.bytes_before:
                a = acc.setdefault(r.layer or "(no module)", [0, 0])
                a[0] += r.bytes_before
                a[1] += r.bytes_after
        return [(k, b, a) for k, (b, a) in acc.items()]


@dataclasses.dataclass
class Report:
    """What lowbit did: ``entries`` holds one :class:`GraphReport` per compiled graph.

    >>> report = Report.from_json(Report([]).to_json())
    >>> report.totals["bytes_before"]
    0
    """

    entries: list[GraphReport]
    note: str = ""  # e.g. why there is nothing to report
    # per sampled linear (the sampling option): module, mnk, keep ratios, FLOPs, variance vs target
    sampling: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def graphs(self) -> list[dict[str, Any]]:
        """Per graph, the GraphModules ``fw_before``, ``fw_after``, ``bw_before``, ``bw_after``
        (empty for a report read from JSON: its ``entries[k].code`` has their code)."""
        return [e.modules for e in self.entries]

    @property
    def totals(self) -> dict[str, float]:
        before = sum(e.step_time_s for e in self.entries)
        return {
            "graphs": len(self.entries),
            "bytes_before": sum(e.bytes_before for e in self.entries),
            "bytes_after": sum(e.bytes_after for e in self.entries),
            "step_time_before_s": before,
            "step_time_after_s": before + sum(e.time_added_s for e in self.entries),
        }

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self, width: int = 100, rich: bool = False) -> str:
        """The per-node table, totals and reasons as plain text (``rich=True``: a ``rich`` table)."""
        from . import report_text

        return report_text.render(self, width=width, use_rich=rich)

    def to_json(self) -> str:
        """JSON with a ``schema`` version; :meth:`from_json` reads it back (without GraphModules)."""
        entries = []
        for e in self.entries:
            d = {f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name != "modules"}
            d["rows"] = [dataclasses.asdict(r) for r in e.rows]
            entries.append(d)
        doc = {"schema": SCHEMA, "note": self.note, "totals": self.totals, "graphs": entries,
               "sampling": self.sampling}  # fmt: skip
        return json.dumps(_finite(doc), indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> Report:
        doc = json.loads(text)
        schema = doc.get("schema", "")
        if schema.rsplit("/", 1)[0] != SCHEMA.rsplit("/", 1)[0] or schema > SCHEMA:
            raise ValueError(
                f"fxlowbit: unsupported report schema {schema!r} (this version reads {SCHEMA!r})"
            )
        entries = []
        for g in doc["graphs"]:
            fields = {f.name for f in dataclasses.fields(GraphReport)} - {"modules", "rows"}
            entry = GraphReport(rows=[Row(**r) for r in g["rows"]], **{k: g[k] for k in fields if k in g})
            entries.append(entry)
        return cls(entries, note=doc.get("note", ""), sampling=doc.get("sampling", []))

    def to_html(self) -> str:
        """A self-contained HTML page (inline CSS, no external assets; graphs in ``<details>``)."""
        from . import report_html

        return report_html.render(self)

    def plot(self, path: str | None = None):
        """Memory per layer before/after and the budget frontier (matplotlib); saves to ``path``
        when given and returns the figure."""
        from . import report_plot

        return report_plot.plot(self, path)


def _finite(x):
    """JSON has no inf/nan: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# -- reasons ----------------------------------------------------------------------------------------
def reason(d: Decision, plan: Plan, cfg: LowbitConfig | None = None) -> str:
    """One line saying why ``d`` got its form, from the decision, its plan and the config."""
    return forms.get(d.form).report_reason(d, plan, cfg or LowbitConfig())


# -- building a report from the backend's records ------------------------------------------------------
def last_report() -> Report:
    """The report of every graph compiled with lowbit since the last ``fxlowbit.reset()``, one
    entry per graph (Dynamo makes several at graph breaks).

    >>> import torch, fxlowbit
    >>> f = torch.compile(lambda x: torch.relu(x) * 2, backend="lowbit", options={"inner": "eager"})
    >>> f(torch.randn(256, 64, requires_grad=True)).sum().backward()
    >>> fxlowbit.last_report().entries[0].rows[0].form  # doctest: +SKIP
    'mask'
    """
    return from_records(record.records())


def from_records(records: list, frontier: bool = True) -> Report:
    entries = [_entry(r, frontier) for r in records]
    note = "" if entries else "no graph compiled with lowbit needed a backward (nothing is saved)"
    return Report(entries, note=note, sampling=sampling_rows())


def sampling_rows() -> list[dict[str, Any]]:
    """One row per linear the ``sampling`` option rewrote (codegen/kernels/sampling_state.py):
    its keep ratios (the controller's and those backwards run at), the share of backward GEMM FLOPs
    skipped so far (at the effective ratios before any backward ran), and its last measured added
    variance against its target (in the controller's unit)."""
    from .codegen.kernels import sampling_state

    rows = []
    for key, e in sorted(sampling_state.entries().items()):
        ki, kw = e.effective
        skipped = 1 - e.flops_done / e.flops_dense if e.flops_dense else 1 - (ki + kw) / 2
        rho_in, rho_w = e.rho
        rows.append(
            {"key": key, "module": e.module, "mnk": list(e.mnk), "keep_input": e.keep_input,
             "keep_weight": e.keep_weight, "effective": [ki, kw], "fixed": e.fixed, "backwards": e.steps,
             "flops_skipped": skipped, "variance": [rho_in, rho_w],
             "target": [e.target_input, e.target_weight]}
        )  # fmt: skip
    return rows


def _entry(rec, frontier: bool) -> GraphReport:
    plan, cfg = rec.plan, rec.cfg
    code = {k: gm.print_readable(print_output=False) for k, gm in rec.graphs.items()}
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    options["passes"] = dict(options["passes"])
    if plan is None:
        status = f"uncompressed: {rec.fallback}" if rec.fallback else "uncompressed: plan step off"
        return GraphReport(rec.index, status, None, 0.0, 0.0, 0.0, rec.replanned, options, [], code,
                           dict(rec.inductor_code), [], dict(rec.graphs))  # fmt: skip
    step = plan.step_time_s
    if not step and rec.facts is not None and rec.profile is not None:  # the uniform rule has none
        step = planner.step_time(rec.facts.gemms, rec.profile, plan.bytes_before)
    nodes = {n.name: n for k in ("fw_before", "fw_after") for n in rec.graphs[k].graph.nodes}
    var = plan.variance_ratio if math.isfinite(plan.variance_ratio) else 0.0
    rows = []
    for d in plan.decisions:
        gemm, gemm_why = _gemm(nodes.get(d.name))
        rows.append(Row(
            d.name,
            d.producer,
            _layer(nodes.get(d.name)),
            list(d.shape),
            d.dtype,
            d.form,
            d.bits,
            gemm,
            d.bytes_before,
            d.bytes_after,
            d.time_s,
            d.variance,
            d.variance / var if var else 0.0,
            reason(d, plan, cfg) + gemm_why,
        ))  # fmt: skip
    return GraphReport(
        index=rec.index,
        status=plan.status,
        budget=plan.budget,
        step_time_s=step,
        time_added_s=plan.time_s,
        variance_ratio=plan.variance_ratio,
        replanned=rec.replanned,
        options=options,
        rows=rows,
        code=code,
        inductor_code=dict(rec.inductor_code),
        frontier=budget_frontier(rec) if frontier else [],
        modules=dict(rec.graphs),
    )


_PLAIN_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "linear", "matmul"}
_VIEWS = {"view", "reshape", "_unsafe_view", "permute", "t", "transpose", "expand", "clone", "contiguous"}
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _opname(node) -> str:
    return getattr(getattr(node, "target", None), "__name__", "").split(".")[0]


def _lowbit_formats(node) -> tuple[str, str, str] | None:
    """(forward, grad-input, grad-weight) formats of an ``fxlowbit::lowbit_linear`` node, else None."""
    if getattr(getattr(node, "target", None), "overloadpacket", None) is torch.ops.fxlowbit.lowbit_linear:
        return tuple(node.args[3:6])
    return None


def _gemm(node) -> tuple[str, str]:
    """(format of the forward GEMM a saved tensor feeds, a note for its reason): the forward format
    of the ``fxlowbit::lowbit_linear`` whose saved input copy it is (its GEMMs in the note); a
    low-bit linear's input saved as it is: the grad-weight format it is read by; the dtype of a
    plain matmul it feeds; "" otherwise."""
    if node is None:
        return "", ""
    note = "GEMMs fwd/grad-input/grad-weight: {}"
    if _opname(node) == "getitem" and (fmts := _lowbit_formats(node.args[0])) is not None:
        return fmts[0], f"; the {fmts[0]} GEMM's saved input copy ({note.format('/'.join(fmts))})"
    users = list(node.users)
    users += [u for v in users if _opname(v) in _VIEWS for u in v.users]
    for user in users:
        if (fmts := _lowbit_formats(user)) is not None:
            return fmts[2], f"; input of a low-bit linear ({note.format('/'.join(fmts))})"
    if any(_opname(user) in _PLAIN_GEMMS for user in users):
        dtype = str(getattr(node.meta.get("val"), "dtype", "")).removeprefix("torch.")
        return _SHORT.get(dtype, ""), ""
    return "", ""


def _layer(node) -> str:
    """The innermost module a forward node came from, as a dotted path ("" when unknown), spelt as
    the ``gemm_filter`` / ``sparsity_filter`` / ``sampling_filter`` globs match it."""
    from .passes.linears import module_name

    return module_name(node)
