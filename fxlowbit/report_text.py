"""Text rendering of a :class:`~fxlowbit.report.Report`: plain (fits ``width`` columns) or ``rich``.

Rows of graph-input aliases (parameters and inputs the backward reads as they are: no memory to
win) are counted, not listed. Reasons are grouped: one line per distinct reason, with the nodes.
"""

from __future__ import annotations

from collections import defaultdict

__all__ = ["render", "COLUMNS", "human_bytes", "op_name", "summary_line", "graph_header"]

# (header, width, right-aligned)
COLUMNS = (
    ("node", 14, False),
    ("op", 15, False),
    ("shape", 13, False),
    ("dtype", 5, False),
    ("form", 9, False),
    ("bits", 4, True),
    ("gemm", 4, False),
    ("before", 7, True),
    ("after", 7, True),
    ("est.ms", 7, True),
    ("var%", 4, True),
)
_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
           "bool": "bool", "uint8": "u8", "int8": "i8", "float64": "f64"}  # fmt: skip


def human_bytes(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}"


def op_name(op: str) -> str:
    return op.removeprefix("aten.").removesuffix(".default")


def _cells(r) -> list[str]:
    shape = "x".join(str(d) for d in r.shape) or "scalar"
    return [
        r.node,
        op_name(r.op),
        shape,
        _DTYPES.get(r.dtype, r.dtype),
        r.form,
        str(r.bits),
        r.gemm or "-",
        human_bytes(r.bytes_before),
        human_bytes(r.bytes_after),
        f"{r.time_s * 1e3:.3f}",
        f"{100 * r.variance_share:.0f}" if r.variance_share else "-",
    ]


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def _line(cells: list[str]) -> str:
    out = []
    for c, (_, w, right) in zip(cells, COLUMNS, strict=True):
        c = _fit(c, w)
        out.append(c.rjust(w) if right else c.ljust(w))
    return " ".join(out).rstrip()


def summary_line(report) -> str:
    t = report.totals
    ratio = t["bytes_before"] / t["bytes_after"] if t["bytes_after"] else float("inf")
    return (
        f"fxlowbit report: {t['graphs']} graph(s); saved activations {human_bytes(t['bytes_before'])}B -> "
        f"{human_bytes(t['bytes_after'])}B ({ratio:.1f}x fewer); est. step "
        f"{t['step_time_before_s'] * 1e3:.2f} -> {t['step_time_after_s'] * 1e3:.2f} ms"
    )


def graph_header(e) -> str:
    budget = f"budget {human_bytes(e.budget)}B" if e.budget is not None else "no budget"
    variant = ", re-planned variant" if e.replanned else ""
    return (
        f"graph {e.index}{variant}: {human_bytes(e.bytes_before)}B -> {human_bytes(e.bytes_after)}B, "
        f"{budget}, "
        f"est. +{e.time_added_s * 1e3:.3f} ms on {e.step_time_s * 1e3:.3f} ms, "
        f"variance ratio {e.variance_ratio:.3g} ({e.status})"
        + (f"; on the {e.partition}" if e.partition else "")
    )


def _reasons(e, width: int) -> list[str]:
    groups: dict[str, list[str]] = defaultdict(list)
    for r in e.rows:
        if r.bytes_before:
            groups[r.reason].append(r.node)
    out = ["why:"]
    for why, nodes in groups.items():
        out += _wrap(f"- {why} [{', '.join(nodes)}]", width, "    ")
    return out


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, subsequent_indent=indent) or [""]


_SAMPLING_COLUMNS = (("module", 20), ("tokens x out x in", 18), ("keep dx/dw", 14), ("runs at", 10),
                     ("FLOPs skipped", 13), ("var/target dx, dw", 24))  # fmt: skip


def _sampling(report) -> list[str]:
    """The sampled linears (the ``sampling`` option): keep ratios, FLOPs skipped, variance/target."""
    rows = getattr(report, "sampling", [])
    if not rows:
        return []

    def line(cells) -> str:
        return " ".join(
            _fit(c, w).ljust(w) for c, (_, w) in zip(cells, _SAMPLING_COLUMNS, strict=True)
        ).rstrip()

    out = ["", f"sampled backward GEMMs ({len(rows)} linear(s); keep = expected fraction of token rows):"]
    out.append(line([h for h, _ in _SAMPLING_COLUMNS]))
    for r in rows:
        var = ", ".join(f"{v:.3g}/{t:.3g}" for v, t in zip(r["variance"], r["target"], strict=True))
        out.append(
            line([r["module"] or "-", "x".join(map(str, r["mnk"])),
                  f"{r['keep_input']:.2f}/{r['keep_weight']:.2f}" + (" fixed" if r["fixed"] else ""),
                  "/".join(f"{k:.2f}" for k in r["effective"]), f"{r['flops_skipped']:.0%}", var])
        )  # fmt: skip
    return out


def render(report, width: int = 100, use_rich: bool = False) -> str:
    if use_rich:
        return _render_rich(report, width)
    lines = _wrap(summary_line(report), width, "  ")
    for note in filter(None, report.note.split("\n")):
        lines += _wrap(note, width, "  ")
    for e in report.entries:
        lines += [""] + _wrap(graph_header(e), width, "  ")
        shown = [r for r in e.rows if r.bytes_before]
        if not e.rows:
            continue
        lines.append(_line([h for h, _, _ in COLUMNS]))
        lines += [_line(_cells(r)) for r in shown]
        hidden = len(e.rows) - len(shown)
        if hidden:
            lines.append(f"({hidden} graph-input aliases saved as they are, no memory: not listed)")
        lines += _reasons(e, width)
    lines += _sampling(report)
    lines.append("")
    lines.append("graphs before/after: report.graphs[k] (GraphModules) or --format html")
    return "\n".join(_fit(ln, width) for ln in lines)


def _render_rich(report, width: int) -> str:
    import io

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, markup=False, highlight=False)
    console.print(summary_line(report))
    if report.note:
        console.print(report.note)
    for e in report.entries:
        console.print()
        console.print(graph_header(e))
        if not e.rows:
            continue
        table = Table(box=None, pad_edge=False, padding=(0, 1))
        for head, _, right in COLUMNS:
            table.add_column(head, justify="right" if right else "left", overflow="ellipsis", no_wrap=True)
        for r in e.rows:
            if r.bytes_before:
                table.add_row(*(Text(c) for c in _cells(r)))
        console.print(table)
        for ln in _reasons(e, width):
            console.print(ln)
    return out.getvalue()
