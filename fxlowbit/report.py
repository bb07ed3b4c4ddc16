"""What lowbit did to each compiled graph: a per-node table, totals, reasons, graphs, plots.

:func:`fxlowbit.last_report` (fxlowbit/report_build.py) reads the records the backend keeps per
compiled graph (:mod:`fxlowbit.record`) into a :class:`Report`: one :class:`GraphReport` per graph
Dynamo produced (and per variant a re-plan compiled), each with a :class:`Row` per saved tensor
(from the plan's decisions, the layer from the forward graph's ``nn_module_stack``), totals, a one-
line reason per decision, the forward and backward graphs' code before and after rewriting, and the
budget frontier (the planner re-run at several budgets). A report renders as plain text (100
columns; :meth:`Report.to_text` with ``rich=True`` uses ``rich``), JSON (:meth:`Report.to_json` /
:meth:`Report.from_json`, with a ``schema`` field), a self-contained HTML page and a matplotlib
figure.

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

log = logging.getLogger(__name__)

__all__ = ["Report", "GraphReport", "Row", "SCHEMA"]

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
    partition: str = ""  # "": min-cut's default partition; else the re-partition the planner chose
    bytes_default: int = 0  # what the default partition saves, when ``partition`` is another

    @property
    def bytes_before(self) -> int:
        """Uncompressed saved bytes: of the default partition when the plan chose another."""
        return self.bytes_default or sum(r.bytes_before for r in self.rows)

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
