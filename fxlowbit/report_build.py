"""Building a :class:`~fxlowbit.report.Report` from the records the backend keeps per compiled graph
(:mod:`fxlowbit.record`): a row per saved tensor with its layer, the GEMM format it feeds and a
one-line reason from its form, the sampled linears' rows, and the budget frontier.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from . import forms, hardware, planner, record
from .codegen.dtypes import SHORT_NAMES
from .config import LowbitConfig
from .frontier import budget_frontier
from .plan import Decision, Plan
from .report import GraphReport, Report, Row
from .state import STATE

__all__ = ["last_report", "from_records", "reason", "sampling_rows"]


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
    notes = [] if entries else ["no graph compiled with lowbit needed a backward (nothing is saved)"]
    # est. ms are the profile's machine's: say so, once, when that is not this one
    lines = (hardware.machine_mismatch(r.profile) for r in records if r.profile is not None)
    notes += dict.fromkeys(line.removeprefix("fxlowbit: ") for line in lines if line is not None)
    if any(r.cfg.profile is None for r in records):  # which file profile=None meant
        notes.append(f"profile: {hardware.default_source()}")
    notes += gemm_noise_notes()
    return Report(entries, note="\n".join(notes), sampling=sampling_rows())


def gemm_noise_notes() -> list[str]:
    """One line per graph with low-bit gradient GEMMs: the noise they were last measured to add
    (fxlowbit/adaptive.py), or that they were turned plain."""
    last = {check["graph"]: check for check in STATE.gemm_noise}  # the last check per graph
    lines = []
    for c in last.values():
        what = f"the int8/fp8 gradient GEMMs of {c['linears']} linear(s)"
        share = f"{c['ratio']:.3g} of the {c['unit']} (step {c['step']}, limit {c['limit']:g})"
        lines.append(f"{what} added {share}: " + ("turned plain" if c["plain"] else "counted in the limit"))
    return lines


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
        partition=plan.partition,
        bytes_default=plan.bytes_default,
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
        return SHORT_NAMES.get(dtype, ""), ""
    return "", ""


def _layer(node) -> str:
    """The innermost module a forward node came from, as a dotted path ("" when unknown), spelt as
    the ``gemm_filter`` / ``sparsity_filter`` / ``sampling_filter`` globs match it."""
    from .passes.linears import module_name

    return module_name(node)
