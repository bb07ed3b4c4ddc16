"""Matplotlib figure of a :class:`~fxlowbit.report.Report`: saved bytes per layer before and after
(left), and the budget frontier, estimated added step time against saved bytes (right).

With several graphs, layers are prefixed ``g<k>:`` and the frontier sums the graphs' plans at each
budget. Draws on a bare ``matplotlib.figure.Figure`` (Agg; no pyplot state, no display).
"""

from __future__ import annotations

from typing import Any

__all__ = ["plot", "MAX_LAYERS"]

MAX_LAYERS = 40  # more layers than this: merged into their parent modules


def _layers(report) -> list[tuple[str, int, int]]:
    many = len(report.entries) > 1
    out = [
        (f"g{e.index}:{name}" if many else name, before, after)
        for e in report.entries
        for name, before, after in e.by_layer()
    ]
    depth = max((name.count(".") for name, _, _ in out), default=0)
    while len(out) > MAX_LAYERS and depth > 0:  # merge the deepest modules into their parents
        merged: dict[str, list[int]] = {}
        for name, before, after in out:
            key = ".".join(name.split(".")[:depth])
            m = merged.setdefault(key, [0, 0])
            m[0] += before
            m[1] += after
        out = [(k, b, a) for k, (b, a) in merged.items()]
        depth -= 1
    return out[: 2 * MAX_LAYERS]


def _frontier(report) -> list[tuple[float, float, float, bool]]:
    """(budget, MB, added ms, met) summed over the graphs, per budget every graph has."""
    by_budget: dict[float, list[Any]] = {}  # MB, ms, graphs, all met
    for e in report.entries:
        for p in e.frontier:
            acc = by_budget.setdefault(p["budget"], [0.0, 0.0, 0, 1])
            acc[0] += p["bytes"] / 1e6
            acc[1] += p["time_s"] * 1e3
            acc[2] += 1
            acc[3] &= bool(p["met"])
    n = len(report.entries)
    return [(b, mb, ms, bool(met)) for b, (mb, ms, k, met) in sorted(by_budget.items()) if k == n]


def plot(report, path: str | None = None):
    """Draw the report; save it to ``path`` (PNG, SVG, PDF by suffix) when given; return the figure."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    layers = _layers(report)
    height = max(3.5, 0.22 * len(layers) + 1.5)
    fig = Figure(figsize=(13, height))
    ax_mem, ax_front = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    names = [n for n, _, _ in layers][::-1]
    ys = range(len(names))
    before = [b / 1e3 for _, b, _ in layers][::-1]
    after = [a / 1e3 for _, _, a in layers][::-1]
    ax_mem.barh([y + 0.2 for y in ys], before, height=0.4, color="#b8bfcc", label="before")
    ax_mem.barh([y - 0.2 for y in ys], after, height=0.4, color="#0b5cad", label="after")
    ax_mem.set_yticks(list(ys), names, fontsize=7)
    ax_mem.set_xlabel("saved activation KB")
    ax_mem.set_title("Memory per layer")
    ax_mem.legend(loc="lower right")

    points = _frontier(report)
    if points:
        xs = [mb for _, mb, _, _ in points]
        ys2 = [ms for _, _, ms, _ in points]
        ax_front.plot(xs, ys2, "-", color="#888", zorder=1)
        labels: dict[tuple[float, float], list[str]] = {}  # budgets with the same plan share a point
        for b, mb, ms, met in points:
            ax_front.scatter([mb], [ms], color="#0b5cad" if met else "#d9534f", zorder=2, s=22)
            labels.setdefault((round(mb, 6), round(ms, 6)), []).append(f"{b:g}")
        for i, ((mb, ms), text) in enumerate(labels.items()):  # alternate sides: neighbours overlap less
            offset = (4, 5) if i % 2 else (-4, -11)
            ax_front.annotate("/".join(text), (mb, ms), textcoords="offset points", xytext=offset,
                              fontsize=7, ha="left" if i % 2 else "right")  # fmt: skip
    t = report.totals
    ax_front.scatter([t["bytes_after"] / 1e6], [(t["step_time_after_s"] - t["step_time_before_s"]) * 1e3],
                     marker="*", s=160, color="#f0a202", zorder=3, label="this plan")  # fmt: skip
    ax_front.scatter(
        [t["bytes_before"] / 1e6], [0.0], marker="s", color="#555", zorder=3, label="uncompressed"
    )
    ax_front.set_xscale("log")
    ax_front.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_front.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_front.xaxis.set_minor_formatter(NullFormatter())
    ax_front.set_xlabel("saved activation MB (log)")
    ax_front.set_ylabel("estimated added step time, ms")
    ax_front.set_title("Budget frontier (labels: budget fraction; red: not met)")
    ax_front.legend(loc="upper right", fontsize=8)
    ax_front.grid(alpha=0.3)
    fig.suptitle(
        f"fxlowbit: {t['bytes_before'] / 1e6:.2f} MB -> {t['bytes_after'] / 1e6:.2f} MB saved, "
        f"est. step {t['step_time_before_s'] * 1e3:.2f} -> {t['step_time_after_s'] * 1e3:.2f} ms"
    )
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
