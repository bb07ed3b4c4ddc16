"""Memory/time/quality frontier: lowbit's memory budget against PyTorch's min-cut recompute budget.

For each model, one table row per setting, all in one process:

- ``aot_eager``: the fp32 reference for saved bytes and the exact gradients of the step;
- ``inductor``: plain ``backend="inductor"`` (min-cut partition at the default budget 1.0): the
  reference for step time and matmul FLOPs;
- ``min-cut B``: Inductor with ``torch._functorch.config.activation_memory_budget=B`` (recompute
  knapsack; exact gradients up to float noise);
- ``lowbit B``: ``backend="lowbit", options={"memory_budget": B}`` (the cost-model planner, Inductor
  inner compiler);
- ``uniform b``: ``options={"bits": b}``, every compressible saved tensor at ``b`` bits (the old rule).

Each row first runs ``--warmup`` steps (the first compiles; lowbit's adaptive plans probe at step 10
and may re-plan, compiling a variant, at step 11), then measures one step. Columns: saved-activation
bytes (``fxlowbit.saved_activation_bytes`` walked after the forward, parameters excluded) and their
ratio to ``aot_eager``'s; step ms (median of ``--steps`` forward+backward
steps after warm-up, every row timed in interleaved rounds of a shuffled order to spread drift) and its
ratio to ``inductor``; extra matmul FLOPs in % of ``inductor``'s (torch.utils.flop_counter's formulas
over the partitioned forward and backward graphs: the min-cut rows' recompute shows up there, lowbit's
graphs are taken after its rewrite); whole-gradient SQNR in dB against ``aot_eager``. Dropout is 0
everywhere: recompute with dropout redraws the masks in PyTorch (see saved_bytes.py).

The acceptance line per model takes lowbit's fastest row with >= 10x fewer saved bytes and compares it
with min-cut at 10x (its step time interpolated linearly in log-bytes between the two rows around 10x).
CPU step-time claims use ``--size small``: on hidden-64 models a step is per-op overhead, not arithmetic.

    python benchmarks/frontier.py --models gpt2,cnn --size small --out frontier.json --plot frontier.png
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable

if __name__ == "__main__":  # the quantize kernels run in the Triton interpreter without a GPU
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn as nn
from _common import (
    Case,
    Classify,
    RecordingPartitioner,
    causal_lm,
    eager_mincut,
    error_text,
    flat_grad,
    matmul_flops,
    meta,
    quartiles,
    seeded,
    time_ms,
    write_json,
)

import fxlowbit
from fxlowbit import examples
from fxlowbit.examples import sqnr_db

MODELS = ("gpt2", "cnn")
SIZES = {  # model -> size -> settings
    "gpt2": {
        "tiny": dict(n_embd=64, n_layer=2, n_head=4, seq=64, batch=4),
        "small": dict(n_embd=256, n_layer=4, n_head=4, seq=128, batch=4),
    },
    "cnn": {"tiny": dict(channels=32, batch=256), "small": dict(channels=64, batch=1024)},
}
MINCUT_BUDGETS = "1.0,0.7,0.5,0.3,0.2,0.1,0.05,0.0"
LOWBIT_BUDGETS = "0.5,0.3,0.2,0.15,0.1,0.08,0.06"
TARGET = 10.0  # the acceptance check's saved-bytes reduction


def make_case(name: str, size: str) -> Case:
    s = SIZES[name][size]
    if name == "gpt2":
        text = examples.stdlib_text()
        idx, _ = next(examples.char_batches(text, s["batch"], s["seq"], steps=1, seed=0))
        model = seeded(lambda: causal_lm("gpt2", vocab_size=examples.HF_VOCAB, n_embd=s["n_embd"],
                                         n_layer=s["n_layer"], n_head=s["n_head"], n_positions=s["seq"],
                                         bos_token_id=2, eos_token_id=3))  # fmt: skip
        return Case(name, model, examples.hf_batch("gpt2", idx), lambda m, b: m(**b).loss)
    if name == "cnn":
        x, y = examples.digits()
        n = s["batch"]
        make = seeded(lambda: Classify(examples.SmallCNN(s["channels"], dropout=0.0)))
        # copies: a saved slice of the data set would count its whole storage in the saved bytes
        inputs = {"x": x[:n].reshape(-1, 1, 8, 8).clone(), "y": y[:n].clone()}
        return Case(name, make, inputs, lambda m, b: m(**b))
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


LEAST_VARIANCE = 1e-9  # max_variance_ratio of the rows matching uniform bytes: least-variance plans


@dataclasses.dataclass
class Setting:
    frontier: str  # "aot_eager" | "inductor" | "min-cut" | "lowbit" | "uniform"
    budget: float | None = None
    bits: int | None = None
    matches: int | None = None  # lowbit at the planned bytes of uniform ``matches``-bit
    mincut: bool = True  # lowbit: the planner may take min-cut's re-partition (option ``mincut``)

    @property
    def label(self) -> str:
        if self.matches is not None:
            return f"lowbit least-variance = uniform {self.matches}b bytes"
        if self.budget is not None:
            return f"{self.frontier} B={self.budget:g}" + ("" if self.mincut else " bits/replays only")
        return f"{self.frontier} {self.bits}b" if self.bits is not None else self.frontier


@dataclasses.dataclass
class Live:
    """A compiled model kept for the timing rounds."""

    row: dict
    model: nn.Module
    compiled: Callable
    times: list[float] = dataclasses.field(default_factory=list)


def _compile(model: nn.Module, s: Setting, inner: str):
    """The compiled model and a function returning the (fw, bw) graphs it made (None if unknown)."""
    if s.frontier == "aot_eager":
        return torch.compile(model, backend="aot_eager"), lambda: None
    if s.frontier in ("inductor", "min-cut"):
        rec = RecordingPartitioner(s.budget)
        if inner == "eager":
            return torch.compile(model, backend=eager_mincut(rec)), lambda: rec.graphs
        return torch.compile(model, backend="inductor", options={"custom_partitioner_fn": rec}), (
            lambda: rec.graphs
        )
    opts = {"memory_budget": s.budget} if s.frontier in ("lowbit", "lowbit-bits") else {"bits": s.bits}
    if s.matches is not None:  # the least-variance plan within the budget (see vs_uniform)
        opts["max_variance_ratio"] = LEAST_VARIANCE
    opts |= {"seed": 0, **({"inner": "eager"} if inner == "eager" else {})}
    if not s.mincut:
        opts["mincut"] = False
    fxlowbit.LowbitConfig.from_options(opts)  # an unknown option raises here, not inside Dynamo
    last_graphs = getattr(fxlowbit.backend, "last_graphs", None)
    n0 = len(last_graphs()) if last_graphs else 0
    compiled = torch.compile(model, backend="lowbit", options=opts)
    return compiled, (lambda: last_graphs()[n0:]) if last_graphs else (lambda: None)


def build(
    case: Case,
    s: Setting,
    inner: str,
    ref: dict | None,
    warmup: int = 1,
    n_graphs: int | None = None,
    sqnr_samples: int = 1,
) -> tuple[dict, Live | None]:
    """Compile and run ``warmup`` steps (the first compiles; lowbit probes and re-plans at steps 10-11),
    then one seeded step (saved bytes, gradient, graphs); keep the model for timing. ``n_graphs``: how
    many graphs Dynamo makes of the model (lowbit's extra ones are re-plan variants); ``sqnr_samples``:
    gradients under that many rounding seeds for a lowbit row's SQNR."""
    row = {"model": case.name, "frontier": s.frontier, "label": s.label, "budget": s.budget, "bits": s.bits,
           "matches": s.matches}  # fmt: skip
    row.update(dict.fromkeys(("saved_bytes", "saved_ratio", "step_ms", "step_ratio", "matmul_flops",
                              "extra_flops_pct", "grad_sqnr_db", "error")), note="")  # fmt: skip
    c0 = Counter(fxlowbit.counters)
    try:
        model = case.make().train()
        compiled, graphs = _compile(model, s, inner)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spent = time_ms(lambda: case.loss(compiled, case.inputs).backward(), max(1, warmup), reduce=None)
            # the first step compiles; a lowbit re-plan may compile a variant during the others
            row["compile_s"], row["warmup_s"] = round(spent[0] / 1e3, 2), round(sum(spent[1:]) / 1e3, 2)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            loss = case.loss(compiled, case.inputs)
            row["saved_bytes"] = fxlowbit.saved_activation_bytes(loss, model.parameters())
            loss.backward()
            # more gradients under other rounding seeds: the SQNR of their mean squared error
            grads = [flat_grad(model)]
            for k in range(1, sqnr_samples if s.frontier in ("lowbit", "lowbit-bits", "uniform") else 1):
                model.zero_grad(set_to_none=True)
                torch.manual_seed(1 + k)
                case.loss(compiled, case.inputs).backward()
                grads.append(flat_grad(model))
    except Exception as err:  # a setting that does not compile is a row saying why, not the end
        row["error"] = error_text(err)
        return row, None
    row["loss"] = loss.item()
    grad = grads[0]
    row["grad"] = grad
    row["counters"] = dict(Counter(fxlowbit.counters) - c0)
    notes = [] if torch.isfinite(grad).all() else ["NON-FINITE gradients"]
    if row["counters"].get("fallback_internal_error"):
        notes.append("lowbit fell back to uncompressed (internal error)")
    pairs = graphs()
    if pairs is None and s.frontier != "aot_eager":
        notes.append("fxlowbit.backend.last_graphs() missing: no FLOPs")
    elif pairs is not None and not pairs:
        notes.append("no graphs recorded: no FLOPs")
    if pairs and n_graphs and len(pairs) > n_graphs:  # re-planned: the newest variants run now
        notes.append(f"re-planned: {len(pairs) - n_graphs} variant(s) compiled, FLOPs of the newest")
        pairs = pairs[-n_graphs:]
    row["note"] = "; ".join(notes)
    if pairs:
        row["graphs"] = len(pairs)
        row["matmul_flops_fw"] = matmul_flops(fw for fw, _ in pairs)
        row["matmul_flops_bw"] = matmul_flops(bw for _, bw in pairs)
        row["matmul_flops"] = row["matmul_flops_fw"] + row["matmul_flops_bw"]
    if ref is not None:
        row["saved_ratio"] = ref["saved_bytes"] / row["saved_bytes"] if row["saved_bytes"] else math.inf
        row["grad_sqnr_db"] = _mean_sqnr_db(ref["grad"], grads)
        row["grad_sqnr_samples"] = len(grads)
    return row, Live(row, model, compiled)


def _mean_sqnr_db(ref: torch.Tensor, grads: list[torch.Tensor]) -> float:
    """Gradient SQNR against the mean squared error over ``grads`` (one per rounding seed): one
    sample's SQNR varies by about +-0.4 dB between seeds on the CNN, enough to reorder close rows."""
    if len(grads) == 1:
        return sqnr_db(ref, grads[0])
    err = sum(float(((g.double() - ref.double()) ** 2).sum()) for g in grads) / len(grads)
    signal = float((ref.double() ** 2).sum())
    return math.inf if err == 0 else 10 * math.log10(signal / err)


def time_rows(case: Case, lives: list[Live], steps: int, rounds: int) -> None:
    """``steps`` timed steps per row, in ``rounds`` rounds each visiting the rows in a new random order;
    a row's first step of a round is an untimed warm-up."""
    per_round = math.ceil(steps / max(1, min(rounds, steps)))

    def step(lv: Live):
        return lambda: case.loss(lv.compiled, case.inputs).backward()

    def no_grads():  # every step starts without gradients (set to None: nothing to accumulate into)
        for lv in lives:
            lv.model.zero_grad(set_to_none=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = time_ms({i: step(lv) for i, lv in enumerate(lives)}, steps, warmup=1, reduce=None,
                        before=no_grads, per_visit=per_round, order="shuffle")  # fmt: skip
    for i, lv in enumerate(lives):
        lv.times += times[i]


def run_model(
    name: str,
    size: str,
    settings: list[Setting],
    inner: str,
    steps: int,
    rounds: int,
    warmup: int,
    match_uniform: bool = False,
    sqnr_samples: int = 1,
) -> list[dict]:
    torch._dynamo.reset()
    fxlowbit.reset()
    case = make_case(name, size)
    ref, _ = build(case, Setting("aot_eager"), inner, None)
    ref.update(saved_ratio=1.0, grad_sqnr_db=math.inf, note="fp32 reference: bytes, gradients")
    rows, lives = [ref], []
    n_graphs = None  # Dynamo's graphs of the model, counted on the first min-cut row
    # lowbit at each uniform row's planned bytes (an absolute budget), right after that row
    settings = list(settings)
    if match_uniform:
        for i in range(len(settings) - 1, -1, -1):
            if settings[i].frontier == "uniform":
                settings.insert(i + 1, Setting("lowbit", matches=settings[i].bits))
    planned: dict[int, int] = {}  # uniform bits -> its planned saved bytes
    for s in settings:
        if s.matches is not None:
            if s.matches not in planned:
                continue
            s = dataclasses.replace(s, budget=planned[s.matches])
        row, live = build(
            case, s, inner, ref if ref["error"] is None else None, warmup, n_graphs, sqnr_samples
        )
        if s.frontier == "uniform" and row["error"] is None:
            planned[s.bits] = row["counters"].get("saved_bytes_after")
        if n_graphs is None and s.frontier in ("inductor", "min-cut"):
            n_graphs = row.get("graphs")
        rows.append(row)
        lives += [live] if live else []
        spent = f"{row.get('compile_s', '-')} s, warm-up {row.get('warmup_s', '-')} s"
        print(f"  compiled {row['label']}: {spent} {row['error'] or ''}", file=sys.stderr)
    if steps:
        time_rows(case, lives, steps, rounds)
    for lv in lives:
        lv.row["step_ms"] = statistics.median(lv.times) if lv.times else None
        lv.row["step_times_ms"] = [round(t, 3) for t in lv.times]
        q = quartiles(lv.times, method="exclusive") if len(lv.times) > 1 else [math.nan] * 3
        lv.row["step_iqr_ms"] = q[2] - q[0]
    base = next((r for r in rows if r["frontier"] == "inductor" and r["error"] is None), None)
    for r in rows:
        r.pop("grad", None)
        r["size"] = size
        r["saved_mb"] = None if r["saved_bytes"] is None else r["saved_bytes"] / 1e6
        if base and base["step_ms"] and r["step_ms"]:
            r["step_ratio"] = r["step_ms"] / base["step_ms"]
        if base and base.get("matmul_flops") and r["matmul_flops"] is not None:
            r["extra_flops_pct"] = 100.0 * (r["matmul_flops"] / base["matmul_flops"] - 1.0)
    return rows


# ------------------------------------------------------------------------------------------- reporting


def _num(v, f: str, suffix: str = "") -> str:
    if v is None:
        return "-"
    return "inf" if v == math.inf else format(v, f) + suffix


def table(rows: list[dict]) -> str:
    lines = [
        "| setting | saved MB | fewer than fp32 | step ms | IQR ms | vs inductor | extra matmul FLOPs | "
        "grad SQNR dB | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        note = f"ERROR {r['error']}" if r["error"] else r["note"]
        lines.append(
            f"| {r['label']} | {_num(r['saved_mb'], '.3f')} | {_num(r['saved_ratio'], '.2f', 'x')} | "
            f"{_num(r['step_ms'], '.2f')} | {_num(r.get('step_iqr_ms'), '.2f')} | "
            f"{_num(r['step_ratio'], '.3f', 'x')} | "
            f"{_num(r['extra_flops_pct'], '+.1f', '%')} | {_num(r['grad_sqnr_db'], '.1f')} | {note} |"
        )
    return "\n".join(lines)


def _ok(r: dict) -> bool:
    return r["error"] is None and r["saved_ratio"] is not None and r["step_ms"] is not None


def acceptance(rows: list[dict], target: float = TARGET) -> dict:
    """lowbit's fastest row at >= ``target``x fewer saved bytes, and min-cut's step time at ``target``x."""
    out: dict = {"target_ratio": target}
    lb = [r for r in rows if r["frontier"] == "lowbit" and _ok(r) and r["saved_ratio"] >= target]
    best = min(lb, key=lambda r: r["step_ms"], default=None)
    keys = ("label", "saved_ratio", "step_ms", "step_ratio", "extra_flops_pct")
    out["lowbit"] = best and {k: best[k] for k in keys}
    top = max(
        (r for r in rows if r["frontier"] == "lowbit" and _ok(r)),
        key=lambda r: r["saved_ratio"],
        default=None,
    )
    out["lowbit_most_saved"] = top and {k: top[k] for k in keys}
    mc = sorted((r for r in rows if r["frontier"] == "min-cut" and _ok(r)), key=lambda r: -r["saved_bytes"])
    exact = [r for r in mc if abs(r["saved_ratio"] / target - 1) < 0.01]
    pair = next(
        ((a, b) for a, b in zip(mc, mc[1:], strict=False) if a["saved_ratio"] < target <= b["saved_ratio"]),
        None,
    )
    if exact:
        r = exact[0]
        out["mincut"] = {"step_ms": r["step_ms"], "how": f"row {r['label']} lands at {r['saved_ratio']:.2f}x"}
    elif pair:
        a, b = pair
        t = math.log(target / a["saved_ratio"]) / math.log(b["saved_ratio"] / a["saved_ratio"])
        how = "interpolated in log-bytes between " + " and ".join(
            f"{r['label']} ({r['saved_ratio']:.2f}x, {r['step_ms']:.2f} ms)" for r in (a, b)
        )
        out["mincut"] = {"step_ms": a["step_ms"] + t * (b["step_ms"] - a["step_ms"]), "how": how}
    else:
        top = max(mc, key=lambda r: r["saved_ratio"], default=None)
        how = f"never reaches {target:g}x" + (
            f" (at most {top['saved_ratio']:.2f}x, {top['label']})" if top else ""
        )
        out["mincut"] = {"step_ms": None, "how": how}
    real = min((r for r in mc if r["saved_ratio"] >= target), key=lambda r: r["step_ms"], default=None)
    out["mincut"]["fastest_row"] = real and {k: real[k] for k in keys}  # a measured row at >= target
    base = next((r for r in rows if r["frontier"] == "inductor" and _ok(r)), None)
    if base and out["mincut"]["step_ms"] is not None:
        out["mincut"]["step_ratio"] = out["mincut"]["step_ms"] / base["step_ms"]
    return out


def acceptance_line(name: str, acc: dict) -> str:
    lb, mc, tgt = acc["lowbit"], acc["mincut"], acc["target_ratio"]
    mc_txt = f"min-cut at {tgt:g}x: " + (
        f"{mc['step_ms']:.2f} ms ({_num(mc.get('step_ratio'), '.3f', 'x')} inductor), {mc['how']}"
        if mc["step_ms"] is not None
        else mc["how"]
    )
    if (real := mc["fastest_row"]) is not None:
        mc_txt += f" (fastest measured min-cut row at >= {tgt:g}x: {real['label']}, {real['step_ms']:.2f} ms)"
    if not lb:
        top = acc["lowbit_most_saved"]
        most = f" (at most {top['saved_ratio']:.2f}x, {top['label']}, {top['step_ms']:.2f} ms)" if top else ""
        return f"acceptance {name}: FAIL, no lowbit row reaches {tgt:g}x fewer saved bytes{most}; {mc_txt}"
    flops = lb["extra_flops_pct"]
    flops_ok = flops is not None and flops <= 5.0
    faster = mc["step_ms"] is None or lb["step_ms"] < mc["step_ms"]
    return (
        f"acceptance {name}: {'PASS' if flops_ok and faster else 'FAIL'}; {lb['label']}: "
        f"{lb['saved_ratio']:.2f}x fewer saved bytes, {lb['step_ms']:.2f} ms "
        f"({_num(lb['step_ratio'], '.3f', 'x')} inductor), extra matmul FLOPs {_num(flops, '+.1f', '%')} "
        f"({'<=' if flops_ok else 'NOT <='} 5%); {mc_txt}; lowbit {'faster' if faster else 'NOT faster'}"
    )


def vs_uniform(rows: list[dict]) -> list[dict]:
    """Each ``lowbit least-variance = uniform b bytes`` row against its uniform row: saved bytes and
    gradient SQNR (the planner must store no more and be strictly closer to the exact gradient).
    Those rows ask for the least-variance plan (``max_variance_ratio`` tiny): by default the planner
    spends the variance limit on speed (e.g. 8-bit codes, faster to pack on this CPU, and 2-bit
    ones elsewhere), which at equal bytes can cost SQNR against uniform rounding."""
    out = []
    for r in rows:
        m = r.get("matches")
        u = next((x for x in rows if x["frontier"] == "uniform" and x["bits"] == m), None)
        measured = [x for x in (r, u) if x and x["error"] is None and x["grad_sqnr_db"] is not None]
        if m is not None and len(measured) == 2:
            better = r["saved_bytes"] <= u["saved_bytes"] and r["grad_sqnr_db"] > u["grad_sqnr_db"]
            line = (f"{'PASS' if better else 'FAIL'} planned vs uniform {m}-bit at its bytes: "
                    f"{r['saved_mb']:.3f} vs {u['saved_mb']:.3f} MB, "
                    f"{r['grad_sqnr_db']:.1f} vs {u['grad_sqnr_db']:.1f} dB")  # fmt: skip
            out.append({"bits": m, "better": better, "line": line,
                        "saved_mb": [r["saved_mb"], u["saved_mb"]],
                        "grad_sqnr_db": [r["grad_sqnr_db"], u["grad_sqnr_db"]]})  # fmt: skip
    return out


LABELS = {
    "uniform": "uniform lowbit 8/4/2 b",
    "min-cut": "min-cut (activation_memory_budget)",
    "lowbit": "lowbit (memory_budget)",
    "lowbit-bits": "lowbit, bits and replays only (mincut=False)",
    "matched": "lowbit least-variance at uniform's bytes",
}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    styles = {"min-cut": ("o-", "C0"), "lowbit": ("s-", "C3"), "lowbit-bits": ("v--", "C4"),
              "matched": ("D", "C1"), "uniform": ("^", "C2"), "inductor": ("*", "k")}  # fmt: skip

    def series(r: dict) -> str:  # least-variance rows at uniform's bytes are not the budget sweep
        return "matched" if r["frontier"] == "lowbit" and r.get("matches") is not None else r["frontier"]

    for (ax_t, ax_q), name in zip(axes, models, strict=True):
        mine = [r for r in rows if r["model"] == name]
        finite = [r["grad_sqnr_db"] for r in mine if r["grad_sqnr_db"] not in (None, math.inf)]
        cap = max(finite, default=100.0) + 10  # exact gradients (inf dB) are drawn here
        exact = any(r["grad_sqnr_db"] == math.inf for r in mine if r["frontier"] in styles)
        for frontier, (marker, color) in styles.items():
            pts = sorted(
                (r for r in mine if series(r) == frontier and r["saved_mb"]), key=lambda r: r["saved_mb"]
            )
            if not pts:
                continue
            mb = [r["saved_mb"] for r in pts]
            label = LABELS.get(frontier, frontier)
            t = [(r["saved_mb"], r["step_ratio"]) for r in pts if r["step_ratio"] is not None]
            if t:
                ax_t.plot([x for x, _ in t], [y for _, y in t], marker, color=color, label=label, ms=7)
            sq = [min(r["grad_sqnr_db"], cap) for r in pts]
            ax_q.plot(mb, sq, marker, color=color, label=label, ms=7)
            for r in pts:
                if frontier == "matched":
                    tag = f"={r['matches']}b"
                elif r["budget"] is not None:
                    tag = f"{r['budget']:g}"
                else:
                    tag = f"{r['bits']}b" if r["bits"] else ""
                for ax, y in ((ax_t, r["step_ratio"]), (ax_q, r["grad_sqnr_db"])):
                    if y is not None:
                        ax.annotate(tag, (r["saved_mb"], min(y, cap)), fontsize=7, xytext=(3, 3),
                                    textcoords="offset points")  # fmt: skip
        if not any(r["step_ratio"] is not None for r in mine):
            ax_t.text(0.5, 0.5, "not timed (--steps 0)", ha="center", va="center", transform=ax_t.transAxes)
        ref = next((r for r in mine if r["frontier"] == "aot_eager" and r["saved_mb"]), None)
        size = mine[0]["size"]
        for ax, ylabel in (
            (ax_t, "step time / inductor"),
            (ax_q, "gradient SQNR dB vs exact" + (f" (exact drawn at {cap:.0f})" if exact else "")),
        ):
            if ref:
                ax.axvline(
                    ref["saved_mb"] / TARGET, color="grey", ls=":", label=f"{TARGET:g}x fewer than fp32"
                )
            ax.set_xscale("log")
            ax.set_xlabel("saved activations, MB (log)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name} ({size})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {MODELS}")
    p.add_argument("--size", default="tiny", choices=("tiny", "small"))
    p.add_argument("--mincut-budgets", default=MINCUT_BUDGETS, help="activation_memory_budget sweep")
    p.add_argument("--lowbit-budgets", default=LOWBIT_BUDGETS, help="lowbit memory_budget sweep")
    p.add_argument(
        "--bits-only-budgets", default="", help="lowbit memory_budget sweep with mincut=False (old planner)"
    )
    p.add_argument("--bits", default="8,4,2", help="uniform lowbit bit widths ('' for none)")
    p.add_argument(
        "--match-uniform",
        action="store_true",
        help="after each uniform row, lowbit with memory_budget = that row's planned bytes",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (0: no timing)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    seeds = "rounding seeds per lowbit row; SQNR of their mean squared gradient error"
    p.add_argument("--sqnr-samples", type=int, default=4, help=seeds)
    warm = "steps before measuring (the first compiles; lowbit probes and re-plans at steps 10-11)"
    p.add_argument("--warmup", type=int, default=12, help=warm)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    no_inductor = "eager: no Inductor (aot_autograd min-cut, lowbit inner=eager); for tests"
    p.add_argument("--inner", default="inductor", choices=("inductor", "eager"), help=no_inductor)
    p.add_argument("--out", help="write the rows and run metadata as JSON here")
    p.add_argument("--plot", help="write the frontier plots (PNG) here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def floats(s):
        return [float(x) for x in s.split(",") if x.strip()]

    settings = [Setting("inductor")]
    settings += [Setting("min-cut", budget=b) for b in floats(args.mincut_budgets)]
    settings += [Setting("lowbit", budget=b) for b in floats(args.lowbit_budgets)]
    settings += [Setting("lowbit-bits", budget=b, mincut=False) for b in floats(args.bits_only_budgets)]
    settings += [Setting("uniform", bits=int(b)) for b in floats(args.bits)]
    rows, accept = [], {}
    t0 = time.perf_counter()
    # every row is a new instance of the same model class: allow Dynamo one compiled entry per row, and
    # no AOTAutograd cache (a hit skips the partitioners, so nothing would be recorded)
    limits = torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=1 << 16)
    with limits, torch._functorch.config.patch(enable_autograd_cache=False):
        for name in (m.strip() for m in args.models.split(",")):
            mine = run_model(
                name,
                args.size,
                settings,
                args.inner,
                args.steps,
                args.rounds,
                args.warmup,
                args.match_uniform,
                args.sqnr_samples,
            )
            accept[name] = acceptance(mine)
            # timing ends run_model: a 1-min load average above the thread count means other processes
            # shared the CPUs while it ran (noisy step times)
            accept[name]["load_avg_1min"] = load = os.getloadavg()[0]
            print(f"\n### {name} ({args.size}, {args.threads} thread(s), inner {args.inner}, "
                  f"load average {load:.1f} on {os.cpu_count()} CPUs)\n")  # fmt: skip
            print(table(mine))
            print("\n" + acceptance_line(name, accept[name]), flush=True)
            accept[name]["vs_uniform"] = versus = vs_uniform(mine)
            for line in versus:
                print(f"{name}: {line['line']}")
            rows += mine
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    sizes = "; ".join(f"{m}: {SIZES[m][args.size]}" for m in args.models.split(",") if m in SIZES)
    setup = f"fp32, train mode, dropout 0, size {args.size}: {sizes}"
    result = {"meta": meta(args, setup, [os.path.relpath(__file__), *(argv or sys.argv[1:])]),
              "acceptance": accept, "rows": rows}  # fmt: skip
    if args.out:
        write_json(args.out, result)
    if args.plot:
        plot(rows, args.plot)
    return result


if __name__ == "__main__":
    main()
