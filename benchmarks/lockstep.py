"""Steady training step of one model under several lowbit option sets, in one process, timed in
interleaved rounds (each round runs every row once, rotating the order), as ratios to Inductor's
row: what an option does to step time, with the machine's drift falling on every row alike. Runs in
separate processes (compile_time.py, step_time_ab.py) differ by up to a quarter from one process
to the next on this 2-core machine; rows in one process differ far less.

Every row first trains ``--warm`` steps (the probe at step 10 and its re-plan at 11 included, and
the CPU kernel families given time to compile), then the timed rounds begin. Rows are named
``name=JSON`` options; ``inductor`` is plain ``torch.compile``.

    python benchmarks/lockstep.py --model tinygpt --rows inductor 'mincut={}' \\
        'rounding={"mincut": false}' --budget 0.1 --out benchmarks/results/lockstep_tinygpt.json

``--model``: ``tinygpt`` (the demo's nanoGPT-style model, batch 8x64) or a name from
tests/_models.py (small ``transformers`` configs, a ResNet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from _common import meta, quartiles, time_ms, write_json  # benchmarks/ is the script's directory
from compile_time import task

import fxlowbit


def _row(spec: str) -> tuple[str, dict | None]:
    if spec == "inductor":
        return spec, None
    name, _, opts = spec.partition("=")
    try:
        options = json.loads(opts or "{}")
    except json.JSONDecodeError as err:
        raise SystemExit(f"--rows: {spec!r} is not name=JSON ({err})") from None
    if not isinstance(options, dict):
        raise SystemExit(f"--rows: {spec!r}: the options must be a JSON object")
    return name, options


def table(result: dict) -> str:
    lines = [
        "| row | options | step ms median (IQR) | x Inductor (IQR of paired ratios) | first step s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        q1, med, q3 = r["ms_quartiles"]
        x1, xm, x3 = r["ratio_quartiles"]
        lines.append(
            f"| {r['row']} | `{json.dumps(r['options'])}` | {med:.2f} ({q1:.2f}-{q3:.2f}) "
            f"| {xm:.3f} ({x1:.3f}-{x3:.3f}) | {r['first_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tinygpt")
    ap.add_argument("--rows", nargs="+", default=["inductor", "defaults={}"])
    ap.add_argument("--budget", type=float, default=None, help="memory_budget added to every lowbit row")
    ap.add_argument("--warm", type=int, default=14, help="untimed steps per row before the rounds")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    make, loss_of = task(args.model, 16)
    rows = dict(_row(s) for s in args.rows)
    if "inductor" not in rows:
        raise SystemExit("--rows: an 'inductor' row is the reference; add it")
    steps, first, counters = {}, {}, {}
    for name, options in rows.items():  # no resets between rows: the rows compiled before still run
        before = dict(fxlowbit.counters)
        net = make()
        if options is not None and args.budget is not None:
            options = rows[name] = {**options, "memory_budget": args.budget}
        compiled = (
            torch.compile(net, backend="inductor")
            if options is None
            else torch.compile(net, backend="lowbit", options=options)
        )
        opt = torch.optim.AdamW(net.parameters(), 1e-3)
        count = [0]

        def step(compiled=compiled, opt=opt, count=count):
            loss_of(compiled, count[0]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            count[0] += 1

        start = time.perf_counter()
        step()
        first[name] = time.perf_counter() - start
        for _ in range(args.warm - 1):
            step()
        counters[name] = {
            k: v - before.get(k, 0) for k, v in fxlowbit.counters.items() if v != before.get(k, 0)
        }
        steps[name] = step
        print(f"{name}: first step {first[name]:.1f} s", file=sys.stderr, flush=True)
    from fxlowbit.codegen.kernels import quant_cpu

    quant_cpu.wait()
    times = time_ms(steps, args.rounds, reduce=None)
    ref = times["inductor"]
    out = []
    for name, options in rows.items():
        ratios = [t / r for t, r in zip(times[name], ref, strict=True)]
        out.append(
            {
                "row": name,
                "options": options,
                "first_s": first[name],
                "ms": times[name],
                "ms_quartiles": quartiles(times[name]),
                "ratio_quartiles": quartiles(ratios),
                "ratio_median": statistics.median(ratios),
                "counters": {k: v for k, v in counters[name].items() if not k.startswith("saved_bytes")},
            }
        )
    result = {
        "meta": meta(args, "rows in one process, interleaved rounds (time_ms mapping, rotate)"),
        "rows": out,
    }
    print(table(result))
    write_json(args.out, result, table)


if __name__ == "__main__":
    main()
