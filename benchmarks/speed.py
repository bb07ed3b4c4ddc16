"""Training-step speed against Inductor: lowbit at default options, with sampled backward GEMMs
(issue 18: ``sampling=True``, alone and with ``memory_budget=0.1``), and with INT8 GEMMs forced
(``gemm=("int8", "int8", "off")``, SwitchBack's forward and grad-input; ``gemm="int8"``, all three;
``gemm="int8"`` with ``memory_budget=0.1``). ``--rows`` picks rows; ``--profile`` plans every lowbit row
from a measured profile; ``--seeds 0,1,2`` runs each lowbit row once per seed (its noise streams).

A Llama-style and a GPT-2-style model from small `transformers` configs (random init, no
downloads, dropout 0), trained with AdamW on character tokens (ASCII codes) of Python
standard-library sources (:func:`fxlowbit.examples.stdlib_text`, the first 90% for training, the
rest held out). CPU, fp32, one torch thread; Inductor is the inner compiler of every lowbit row.
The rows of one model run in lockstep in one process: each step runs every row once, in an order
rotating by one per step, so machine load hits all rows alike. Same initial weights and batches
for every row.

Per row: the median step ms over the last ``--timed`` steps before the final one (the compiles,
the first probe at step 10 and its re-plan are earlier), its interquartile range and its ratio to
Inductor's (median of the per-step ratios, paired by step); the linears' backward GEMM FLOPs per
step over those steps, dense against done (``fxlowbit.state.STATE.sampling`` entries'
``flops_dense`` / ``flops_done``; the linears not sampled count as dense), the mean effective keep
ratios (input, weight), the saved-activation bytes walked from ``loss.grad_fn`` on the final step
(``fxlowbit.saved_activation_bytes``), the mean train loss of the last ``--timed`` steps and the
held-out loss after all steps (the uncompiled module, no grad, ``--eval-batches`` fixed batches).
The sampling counters say how many linears were rewritten (``sampled_linear``) and declined by the
cost model (``sampling_declined``). /proc/loadavg is recorded before and after (the machine is
shared).

    python benchmarks/speed.py --out benchmarks/results/speed_cpu.json [--models llama,gpt2]
        [--steps 40] [--timed 20] [--hidden 512] [--intermediate 2048] [--layers 2] [--batch 16]
        [--seq 256] [--vocab 2048]
    python benchmarks/speed.py --quick        # smoke check: Llama only, 1 layer, 8 steps (4 min here
                                              # under load average 11, mostly compiling)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

import fxlowbit
from fxlowbit import examples, hardware
from fxlowbit.state import STATE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

ROWS = {  # name: backend options (None: backend="inductor")
    "inductor": None,
    "lowbit defaults": {},
    "lowbit sampling": {"sampling": True},
    "lowbit budget0.1": {"memory_budget": 0.1},
    "lowbit budget0.1 + sampling": {"memory_budget": 0.1, "sampling": True},
    "lowbit int8 fwd+gi": {"gemm": ("int8", "int8", "off")},
    "lowbit int8": {"gemm": "int8"},
    "lowbit int8 + budget0.1": {"gemm": "int8", "memory_budget": 0.1},
}


def build(name: str, a) -> nn.Module:
    """Seeded ``transformers`` model ``name`` ("llama" or "gpt2") at the sizes of ``a``, dropout 0."""
    if name == "llama":
        return _common.causal_lm("llama", vocab_size=a.vocab, hidden_size=a.hidden,
                                 intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                                 num_attention_heads=a.heads, num_key_value_heads=a.heads,
                                 max_position_embeddings=a.seq)  # fmt: skip
    if name == "gpt2":
        return _common.causal_lm("gpt2", vocab_size=a.vocab, n_embd=a.hidden, n_inner=a.intermediate,
                                 n_layer=a.layers, n_head=a.heads, n_positions=a.seq, bos_token_id=2,
                                 eos_token_id=3)  # fmt: skip
    raise ValueError(f"unknown model {name!r}; valid: llama, gpt2")


def linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (in, out) of every linear layer (nn.Linear and GPT-2's Conv1D)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif type(m).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight (in, out)
            out[name] = tuple(m.weight.shape)
    return out


class Row:
    """One compiled copy of the model, its optimizer, and what it measured."""

    def __init__(self, label: str, options: dict | None, model_name: str, a, batches):
        self.label, self.options, self.batches = label, options, batches
        self.model = build(model_name, a)
        self.compiled = (
            torch.compile(self.model, backend="inductor")
            if options is None
            else torch.compile(self.model, backend="lowbit", options=options)
        )
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=a.lr)
        self.times: list[float] = []
        self.losses: list[float] = []
        self.keys: set[int] = set()  # this row's STATE.sampling keys
        self.counters: dict[str, int] = {}
        self.flops_at: dict[int, tuple[float, float]] = {}  # step -> summed (dense, done) so far
        self.saved_bytes: int | None = None

    def step(self, i: int, measure: bool = False) -> None:
        x = self.batches[i]
        before_keys, before_counters = set(STATE.sampling), dict(fxlowbit.counters)
        losses = []

        def step():
            loss = self.compiled(input_ids=x, labels=x).loss
            if measure:  # the final step: not in the timed window
                self.saved_bytes = fxlowbit.saved_activation_bytes(loss, self.model.parameters())
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            losses.append(loss)

        self.times.append(_common.time_ms(step) / 1e3)
        self.losses.append(float(losses[0].detach()))
        self.keys |= set(STATE.sampling) - before_keys  # rows run one at a time: new keys are ours
        for k, v in fxlowbit.counters.items():
            if v != before_counters.get(k, 0) and not k.startswith("saved_bytes"):
                self.counters[k] = self.counters.get(k, 0) + v - before_counters.get(k, 0)
        es = [STATE.sampling[k] for k in self.keys if k in STATE.sampling]
        self.flops_at[i] = (
            sum(e.flops_dense for e in es),
            sum(e.flops_done for e in es),
            sum(e.steps for e in es),
        )


def heldout_loss(model: nn.Module, batches) -> float:
    """Mean loss of the uncompiled module on ``batches``, no grad (train mode: dropout is 0)."""
    with torch.no_grad():
        return statistics.fmean(float(model(input_ids=x, labels=x).loss) for x in batches)


def row_options(a) -> list[tuple[str, dict | None]]:
    """(label, backend options) of each row: the rows of ``--rows`` in :data:`ROWS`' order, the
    lowbit ones planned from ``--profile`` and, with ``--seeds``, run once per seed (their noise
    streams: held-out losses of stochastic rows differ by a few percent from seed to seed)."""
    out: list[tuple[str, dict | None]] = []
    for label, opts in ROWS.items():
        if label not in a.rows:
            continue
        if opts is None:
            out.append((label, None))
            continue
        opts = {**opts, "profile": a.profile} if a.profile else dict(opts)
        if not a.seeds:
            out.append((label, opts))
        out += [(f"{label} @seed {k}", {**opts, "seed": k}) for k in a.seeds]
    return out


def run_model(model_name: str, a, train, held) -> list[dict]:
    gen_train = examples.char_batches(train, a.batch, a.seq, a.steps + 1, seed=0)
    batches = [x for x, _ in gen_train]  # the model shifts labels = inputs itself
    eval_batches = [x for x, _ in examples.char_batches(held, a.batch, a.seq, a.eval_batches, seed=1)]
    rows = [Row(label, opts, model_name, a, batches) for label, opts in row_options(a)]
    lin = linears(rows[0].model)
    tokens = a.batch * a.seq
    t_start = time.perf_counter()
    for i in range(a.steps + 1):
        order = rows[i % len(rows) :] + rows[: i % len(rows)]
        for r in order:
            r.step(i, measure=i == a.steps)
        if i < 3 or i % 5 == 0 or i == a.steps:
            ms = "  ".join(f"{r.label}: {r.times[-1] * 1e3:.0f}" for r in rows)
            print(f"[{model_name}] step {i}/{a.steps} ({time.perf_counter() - t_start:.0f} s) ms {ms}",
                  file=sys.stderr, flush=True)  # fmt: skip
    lo, hi = a.steps - a.timed, a.steps  # timed window: steps lo .. hi-1
    base = rows[0]
    out = []
    for r in rows:
        ts = [t * 1e3 for t in r.times[lo:hi]]
        q1, med, q3 = _common.quartiles(ts)
        ratios = [t / b for t, b in zip(r.times[lo:hi], base.times[lo:hi], strict=True)]
        rq1, rmed, rq3 = _common.quartiles(ratios)
        es = {k: STATE.sampling[k] for k in sorted(r.keys) if k in STATE.sampling}
        sampled_modules = sorted({e.module for e in es.values()})
        # registry names carry a prefix here ("0.model.layers.0.mlp.down_proj"): match by suffix
        not_sampled = [n for n in lin if not any(m == n or m.endswith("." + n) for m in sampled_modules)]
        # backward GEMM FLOPs per step over the timed window: sampled linears from the registry,
        # every other linear dense (2 GEMMs of 2 * tokens * in * out)
        d0, done0, n0 = r.flops_at[lo - 1]
        d1, done1, n1 = r.flops_at[hi - 1]
        s_dense, s_done = (d1 - d0) / a.timed, (done1 - done0) / a.timed
        rest = sum(4.0 * tokens * i_ * o_ for n, (i_, o_) in lin.items() if n in not_sampled)
        keep_eff = [e.effective for e in es.values()]
        out.append({
            "model": model_name, "row": r.label, "options": r.options,
            "step_ms": med, "step_ms_q1": q1, "step_ms_q3": q3, "ratio_vs_inductor": rmed,
            "ratio_q1": rq1, "ratio_q3": rq3, "step_ms_all": [round(t * 1e3, 1) for t in r.times],
            "first_step_s": r.times[0],
            "bwd_gemm_gflop_sampled_dense": s_dense / 1e9, "bwd_gemm_gflop_sampled_done": s_done / 1e9,
            "bwd_gemm_gflop_linears_dense": (s_dense + rest) / 1e9 if es else rest / 1e9,
            "bwd_gemm_gflop_linears_done": (s_done + rest) / 1e9 if es else rest / 1e9,
            "sampled_linears": len(es),
            "sampled_backwards_per_step": (n1 - n0) / a.timed / len(es) if es else None,
            "sampled_modules": sampled_modules,
            "not_sampled_linears": not_sampled,
            "mean_keep_input": statistics.fmean(k[0] for k in keep_eff) if keep_eff else None,
            "mean_keep_weight": statistics.fmean(k[1] for k in keep_eff) if keep_eff else None,
            "keep_done_fraction": s_done / s_dense if s_dense else None,
            "entries": {e.module: {"keep_input": e.keep_input, "keep_weight": e.keep_weight,
                                   "effective": list(e.effective), "max_useful": e.max_useful,
                                   "steps": e.steps, "rho": list(e.rho), "mnk": list(e.mnk),
                                   "flops_dense": e.flops_dense, "flops_done": e.flops_done}
                        for e in es.values()},
            "saved_mb": r.saved_bytes / 2**20 if r.saved_bytes is not None else None,
            "train_loss": statistics.fmean(r.losses[lo:hi]), "final_train_loss": r.losses[-1],
            "heldout_loss": heldout_loss(r.model, eval_batches),
            "counters": r.counters,
        })  # fmt: skip
    for o in out:
        o["heldout_vs_inductor"] = o["heldout_loss"] / out[0]["heldout_loss"]
        o["saved_fewer_than_inductor"] = (out[0]["saved_mb"] or math.nan) / (o["saved_mb"] or math.nan)
    return out


COLUMNS = (
    "| model | row | step ms (IQR) | x Inductor (IQR) | bwd linear GEMM GFLOP/step dense -> done "
    "| sampled / declined linears | mean keep (input, weight) | saved MB (fewer) | train loss "
    "| held-out loss (x Inductor) |"
)


def line(r: dict) -> str:
    keep = "-" if r["mean_keep_input"] is None else f"{r['mean_keep_input']:.2f}, {r['mean_keep_weight']:.2f}"
    declined = r["counters"].get("sampling_declined", 0)
    return (f"| {r['model']} | {r['row']} | {r['step_ms']:.0f} ({r['step_ms_q1']:.0f}-{r['step_ms_q3']:.0f}) "
            f"| {r['ratio_vs_inductor']:.3f} ({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}) "
            f"| {r['bwd_gemm_gflop_linears_dense']:.1f} -> {r['bwd_gemm_gflop_linears_done']:.1f} "
            f"| {r['counters'].get('sampled_linear', 0)} / {declined} | {keep} "
            f"| {r['saved_mb']:.1f} ({r['saved_fewer_than_inductor']:.1f}x) | {r['train_loss']:.3f} "
            f"| {r['heldout_loss']:.3f} ({r['heldout_vs_inductor']:.3f}) |")  # fmt: skip


def table(result: dict) -> str:
    m = result["meta"]
    a = m["args"]
    lines = [
        f"`{m['command']}`: commit {m['commit'][:7]}, {m['date_u']}, {m['device']}, {m['cpus']} cores, torch "
        f"{m['torch']}, {m['threads']} thread, fp32, Inductor inner for every row, rows in lockstep. "
        f"{a['layers']} layers, hidden {a['hidden']}, intermediate {a['intermediate']}, vocab {a['vocab']}, "
        f"batch {a['batch']}x{a['seq']}, AdamW lr {a['lr']}, {a['steps']} steps + 1 measured; step ms: "
        f"median of steps {a['steps'] - a['timed']}-{a['steps'] - 1}; load average before "
        f"{m['loadavg_before']}, after {m['loadavg_after']}.",
        "",
        COLUMNS,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [line(r) for r in result["rows"]]
    lines.append("")
    for r in result["rows"]:
        if r["options"] and r["options"].get("sampling"):
            lines.append(f"- {r['model']}, {r['row']}: not sampled: {', '.join(r['not_sampled_linears'])}")
    return "\n".join(lines) + "\n"


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama,gpt2")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated, from: " + ", ".join(ROWS))
    ap.add_argument("--steps", type=int, default=40, help="training steps before the measured one")
    ap.add_argument("--timed", type=int, default=20, help="the last steps whose median is reported")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048, help="tokens are ASCII codes (< 128)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke check: Llama, 1 layer, 8 steps (2-4 min)")
    ap.add_argument(
        "--profile",
        default=None,
        help="hardware profile JSON for every lowbit row (default: profile=None, i.e. this machine's "
        "profile if `fxlowbit-profile --save` kept one, else the shipped one; the JSON's meta says which)",
    )
    ap.add_argument("--seeds", default="", help="comma-separated seeds: each lowbit row once per seed")
    ap.add_argument("--note", default=None, help="a remark stored in the JSON's meta")
    ap.add_argument("--out", default=None, help="JSON path; the .md table is written next to it")
    ap.add_argument("--table", default=None, help="write the .md table of this result JSON and stop")
    a = ap.parse_args(argv)
    if a.table:
        _common.table_from_json(a.table, table)
        return
    if a.quick:
        a.models, a.layers, a.steps, a.timed, a.eval_batches = "llama", 1, 8, 4, 1
    a.rows = [r.strip() for r in a.rows.split(",")]
    a.seeds = [int(k) for k in a.seeds.split(",") if k.strip()]
    if a.rows[0] != "inductor" or not set(a.rows) <= set(ROWS):
        ap.error(f"--rows must start with inductor and name rows of {list(ROWS)}")
    if not 0 < a.timed < a.steps:
        ap.error("need 0 < --timed < --steps")
    torch.set_num_threads(a.threads)
    for k in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, k):  # every row is another instance of the same classes
            setattr(torch._dynamo.config, k, 64)
    load_before = _loadavg()
    date_u = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    # the commit, date and command at the start: the code this process imports (others may commit
    # while it runs; a commit at the end that differs is recorded as commit_at_end)
    meta = _common.meta(a, "lockstep rows, one process", ["benchmarks/speed.py", *(argv or sys.argv[1:])])
    # where the package was imported from (an editable install can map fxlowbit.passes elsewhere)
    meta["package_files"] = [m.__file__ for m in (fxlowbit, fxlowbit.passes, fxlowbit.codegen)]
    meta["profile"] = a.profile or hardware.default_source()  # at --threads, as the rows plan
    print(f"lowbit rows plan with {meta['profile']}", file=sys.stderr, flush=True)
    if not a.profile and "shipped" in meta["profile"]:
        hint = f"fxlowbit-profile --save --threads {a.threads}"
        print(f"  (`{hint}` first measures this machine's)", file=sys.stderr)
    data = examples.stdlib_text()
    split = int(0.9 * data.numel())
    train, held = data[:split], data[split:]
    print(COLUMNS + "\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    rows, t0 = [], time.perf_counter()
    for model_name in a.models.split(","):
        out = run_model(model_name, a, train, held)
        for r in out:
            print(line(r), flush=True)
        rows += out
    end = _common.meta(a, "")
    if end["commit"] != meta["commit"]:
        meta["commit_at_end"] = end["commit"]
    meta.update({"date_u": date_u, "loadavg_before": load_before, "loadavg_after": _loadavg(),
                 "wall_s": time.perf_counter() - t0, "dtype": "float32", "rows": ROWS})  # fmt: skip
    result = {"meta": meta, "rows": rows}
    if a.out:
        _common.write_json(a.out, result, table)
    else:
        print(json.dumps(_common.jsonable(result), indent=1, default=str), file=sys.stderr)


if __name__ == "__main__":
    main()
