"""A :class:`~fxlowbit.report.Report` as one self-contained HTML page.

Inline CSS, no scripts, no external assets: the page opens from a file, an e-mail or a CI
artifact. Per graph: a summary, memory per layer as CSS bars, the per-node table (layer and
reason included), the budget frontier, the reasons, and the forward/backward graphs' code before
and after rewriting (and Inductor's code when it was kept) in ``<details>`` blocks.
"""

from __future__ import annotations

from html import escape

from . import forms
from .report_text import graph_header, human_bytes, op_name, summary_line

__all__ = ["render"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1200px;
 padding:0 1rem;color:#1d232a;background:#fff}
h1{font-size:1.5rem;margin:0 0 .3rem}h2{font-size:1.2rem;margin:2rem 0 .4rem;border-bottom:1px solid #dde}
h3{font-size:1rem;margin:1.2rem 0 .3rem}.summary{color:#334;font-size:1rem}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:.3rem 0}
th,td{padding:.15rem .5rem;border-bottom:1px solid #eef;text-align:left;vertical-align:top}
th{background:#f3f5fa;position:sticky;top:0}td.n{text-align:right}
td.reason{color:#445;font-size:.85em;max-width:28rem}
.bars{display:grid;grid-template-columns:minmax(8rem,16rem) 1fr 10rem;gap:.15rem .6rem;align-items:center}
.bar{height:.55rem;border-radius:2px}.before{background:#c9ced8}.after{background:#0b5cad}
.label{font-size:.85em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
details{margin:.3rem 0}summary{cursor:pointer;font-weight:600}
pre{background:#f6f8fb;border:1px solid #e3e7ef;padding:.6rem;overflow:auto;max-height:40rem;font-size:12px}
.muted{color:#667}
"""


def _form_css() -> str:
    """One colour per registered form (each form's module declares it)."""
    return "".join(f".form-{f.name}{{color:{f.color}}}" for f in forms.all_forms()) + "\n"


def _td(value, cls: str = "") -> str:
    return f'<td class="{cls}">{escape(str(value))}</td>' if cls else f"<td>{escape(str(value))}</td>"


def _bars(entry) -> str:
    layers = entry.by_layer()
    if not layers:
        return ""
    top = max(b for _, b, _ in layers) or 1
    cells = []
    for name, before, after in layers:
        cells.append(
            f'<div class="label" title="{escape(name)}">{escape(name)}</div>'
            f'<div><div class="bar before" style="width:{100 * before / top:.1f}%"></div>'
            f'<div class="bar after" style="width:{100 * after / top:.1f}%"></div></div>'
            f'<div class="label">{human_bytes(before)}B &rarr; {human_bytes(after)}B</div>'
        )
    legend = '<p class="muted">grey: saved bytes before, blue: after</p>'
    return f'<h3>Memory per layer</h3>{legend}<div class="bars">{"".join(cells)}</div>'


_HEAD = ("node", "layer", "op", "shape", "dtype", "form", "bits", "gemm", "before", "after", "est. ms",
         "var %", "reason")  # fmt: skip


def _rows_html(rows) -> str:
    out = []
    for r in rows:
        out.append(
            "<tr>"
            + _td(r.node)
            + _td(r.layer)
            + _td(op_name(r.op))
            + _td("x".join(map(str, r.shape)) or "scalar")
            + _td(r.dtype)
            + _td(r.form, f"form-{r.form}")
            + _td(r.bits, "n")
            + _td(r.gemm or "-")
            + _td(f"{r.bytes_before:,}", "n")
            + _td(f"{r.bytes_after:,}", "n")
            + _td(f"{r.time_s * 1e3:.3f}", "n")
            + _td(f"{100 * r.variance_share:.1f}" if r.variance_share else "-", "n")
            + _td(r.reason, "reason")
            + "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in _HEAD)
    return f'<table class="nodes"><thead><tr>{head}</tr></thead><tbody>{"".join(out)}</tbody></table>'


def _table(entry) -> str:
    """Saved tensors; graph-input aliases (parameters: no memory to win) folded away below."""
    shown = [r for r in entry.rows if r.bytes_before]
    aliases = [r for r in entry.rows if not r.bytes_before]
    html = "<h3>Saved tensors</h3>" + _rows_html(shown)
    if aliases:
        html += (f"<details><summary>{len(aliases)} graph inputs saved as they are (no memory)</summary>"
                 f"{_rows_html(aliases)}</details>")  # fmt: skip
    return html


def _frontier(entry) -> str:
    if not entry.frontier:
        return ""
    rows = "".join(
        "<tr>"
        + _td(f"{p['budget']:g}", "n")
        + _td(f"{p['bytes']:,}", "n")
        + _td(f"{p['time_s'] * 1e3:.3f}", "n")
        + _td("-" if p["variance_ratio"] is None else f"{p['variance_ratio']:.3g}", "n")
        + _td("yes" if p["met"] else "no")
        + "</tr>"
        for p in entry.frontier
    )
    head = "".join(f"<th>{h}</th>" for h in ("budget", "saved bytes", "est. +ms", "variance ratio", "met"))
    return (
        '<h3>Budget frontier</h3><p class="muted">the planner re-run at other budgets (fractions of the '
        'uncompressed saved bytes)</p><table class="frontier">'
        f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    )


_CODE = (
    ("fw_before", "forward graph before rewriting"),
    ("fw_after", "forward graph after rewriting"),
    ("bw_before", "backward graph before rewriting"),
    ("bw_after", "backward graph after rewriting"),
)


def _code(entry) -> str:
    parts = [("code", k, title) for k, title in _CODE] + [
        ("inductor", k, f"Inductor's generated code ({'forward' if k == 'fw' else 'backward'})")
        for k in ("fw", "bw")
    ]
    out = []
    for source, key, title in parts:
        text = (entry.code if source == "code" else entry.inductor_code).get(key)
        if text:
            out.append(
                f"<details><summary>{escape(title)}</summary><pre><code>{escape(text)}</code></pre></details>"
            )
    return "<h3>Graphs</h3>" + "".join(out) if out else ""


def _reasons(entry) -> str:
    groups: dict[str, list[str]] = {}
    for r in entry.rows:
        if r.bytes_before:
            groups.setdefault(r.reason, []).append(r.node)
    items = "".join(
        f"<li>{escape(why)} <span class='muted'>[{escape(', '.join(n))}]</span></li>"
        for why, n in groups.items()
    )
    return f"<h3>Why</h3><ul>{items}</ul>" if items else ""


def render(report) -> str:
    summary = summary_line(report).removeprefix("fxlowbit report: ")
    body = [f"<h1>fxlowbit report</h1><p class='summary'>{escape(summary)}</p>"]
    if report.note:
        body.append(f"<p class='muted'>{escape(report.note)}</p>")
    for e in report.entries:
        body.append(
            f'<section id="graph-{e.index}"><h2>Graph {e.index}</h2><p>{escape(graph_header(e))}</p>'
            + _bars(e)
            + (_table(e) if e.rows else "")
            + _frontier(e)
            + _reasons(e)
            + _code(e)
            + "</section>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>fxlowbit report</title><style>{_CSS}{_form_css()}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
