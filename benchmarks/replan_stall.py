"""What a re-plan costs the step that compiles its variant (issue 17), with the CPU kernel units
(codegen/cpu_batch.py) on and off. The probes are made pessimistic (1e6x the measured
sensitivities) so step 10's probe forces a re-plan and step 11 compiles the variant; each setting
runs in a fresh process with an empty Inductor cache.

    python benchmarks/replan_stall.py [--model llama] [--out benchmarks/results/replan_stall_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import ROOT, meta, write_json  # benchmarks/ is the script's directory

STEPS = 16
OPTIONS = {"memory_budget": 0.1, "mincut": False}  # a rounding plan: the probes have work to do


def _one(model: str) -> dict:
    import dataclasses

    import torch

    torch.set_num_threads(1)
    from compile_time import task

    import fxlowbit
    from fxlowbit import calibrate

    real = calibrate.probe_sensitivity

    def pessimistic(*args, **kwargs):
        probe = real(*args, **kwargs)
        return dataclasses.replace(probe, sensitivity={k: 1e6 * v for k, v in probe.sensitivity.items()})

    calibrate.probe_sensitivity = pessimistic
    make, loss_of = task(model, STEPS)
    net = make()
    compiled = torch.compile(net, backend="lowbit", options=OPTIONS)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    steps = []
    for i in range(STEPS):
        t0 = time.perf_counter()
        loss_of(compiled, i).backward()
        opt.step()
        opt.zero_grad()
        steps.append(round((time.perf_counter() - t0) * 1e3, 1))
    keep = ("probes", "plan_variants", "cpu_kernels_batched", "cpu_kernel_units")
    return {"steps_ms": steps, "counters": {k: fxlowbit.counters[k] for k in keep}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.model)))
        return
    rows = []
    print("| units | first step s | step of the probe ms | step compiling the variant ms | steady ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for units in ("0", "1"):
        with tempfile.TemporaryDirectory(prefix="fxlowbit-cache-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "FXLOWBIT_CPU_KERNEL_UNITS": units}
            cmd = [sys.executable, __file__, "--one", "--model", args.model]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=True)
        run = json.loads(out.stdout.strip().splitlines()[-1])
        s = run["steps_ms"]
        steady = sorted(s[12:])[len(s[12:]) // 2]
        rows.append({"units": units == "1", **run, "steady_ms": steady})
        label = "on" if units == "1" else "off"
        print(f"| {label} | {s[0] / 1e3:.1f} | {s[9]:.0f} | {s[10]:.0f} | {steady:.1f} |", flush=True)
    result = {"meta": meta(args, f"{args.model}, options {OPTIONS}, pessimistic probes"), "rows": rows}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
