"""Compile time as a user meets it (issue 17): the first training step in a fresh process, cold
(empty Inductor cache) and warm (a second process on the same cache), and the steady step, for
Inductor and lowbit (default options; ``memory_budget=0.1``), all with Inductor as the inner
compiler. Each run is its own subprocess with its own cache folder; runs of one model go in
lockstep (Inductor, then each lowbit setting), so the ratios share the machine's state.

Per run: ``first_s`` (the ``torch.compile()`` call and step 0: compile + run), ``total_s`` (all
the steps: what background compiles, the eager kernels meanwhile and re-plans cost in the end),
``steady_ms`` (median of the steps after the second, run again once the CPU kernel families
compiled in child processes are in: the step a long run sees), ``max_later_ms`` (the slowest step
after the first: a probe, a re-plan's compile), and the lowbit counters that explain it.

    python benchmarks/compile_time.py --out benchmarks/results/compile_time_cpu.json [--models a,b]
        [--steps 14] [--settings inductor,defaults,budget0.1]

``tinygpt`` is the demo's nanoGPT-style model (fxlowbit.examples.TinyGPT); the others come from
tests/_models.py (small `transformers` configs and a ResNet, random init).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import ROOT, git, git_commit, time_ms, write_json  # benchmarks/ is the script's directory

SETTINGS = {
    "inductor": None,
    "defaults": {},
    "budget0.1": {"memory_budget": 0.1},
    "inline": {"kernels": "inline"},  # the former CPU default, for comparison
}
MODELS = ("tinygpt", "gpt2", "llama", "mixtral", "t5", "resnet")


def task(model: str, batches: int):
    """(make_model, loss(compiled, i)): a seeded builder of ``model`` and the loss of its step ``i``
    on ``batches`` fixed batches, cycled (also benchmarks/lockstep.py's models)."""
    import torch

    if model == "tinygpt":
        from fxlowbit.examples import TinyGPT, char_batches, stdlib_text

        data = list(char_batches(stdlib_text(), 8, 64, batches, seed=0))

        def make_tinygpt():
            torch.manual_seed(0)
            return TinyGPT()

        return make_tinygpt, lambda m, i: m(*data[i % batches])
    sys.path.insert(0, ROOT)
    from tests import _models

    inputs = [_models.batch(model, i) for i in range(batches)]
    return (lambda: _models.build(model)), lambda m, i: _models.loss_of(m(**inputs[i % batches]))


def _one(model: str, setting: str, steps: int) -> dict:
    """One run in this process: ``steps`` training steps; prints nothing, returns the figures."""
    import torch

    torch.set_num_threads(1)
    import fxlowbit

    make, loss_of = task(model, steps)
    net = make()

    def loss(i):
        return loss_of(compiled, i)

    options = SETTINGS[setting]
    # the torch.compile() call counts with the first step: Inductor's imports its compiler there
    # (0.64 s on this machine), lowbit's on the first step
    start = time.perf_counter()
    if options is None:
        compiled = torch.compile(net, backend="inductor")
    else:
        compiled = torch.compile(net, backend="lowbit", options=options)
    compile_call_s = time.perf_counter() - start
    opt = torch.optim.AdamW(net.parameters(), 1e-3)

    def stepper(batches):  # each call: one training step on the next batch
        it = iter(batches)

        def step():
            loss(next(it)).backward()
            opt.step()
            opt.zero_grad()

        return step

    times = [t / 1e3 for t in time_ms(stepper(range(steps)), steps, reduce=None)]
    times[0] += compile_call_s
    total = sum(times)
    # the CPU kernel families compile in child processes, their calls running the slower eager
    # reference meanwhile: the steady step is timed once they are in (same batches again)
    try:
        from fxlowbit.codegen.kernels import quant_cpu
    except ImportError:  # a checkout older than the CPU kernel families (step_time_ab.py's base)
        quant_cpu = None
    if quant_cpu is not None:
        quant_cpu.wait()
    steady_ms = time_ms(stepper(range(2, steps)), steps - 2)
    counters = {k: v for k, v in fxlowbit.counters.items() if not k.startswith("saved_bytes")}
    if quant_cpu is not None:
        counters.update({f"cpu_kernels_{k}": v for k, v in quant_cpu.counters.items()})
    return {
        "first_s": times[0],
        "total_s": total,
        "steady_ms": steady_ms,
        "max_later_ms": max(times[1:]) * 1e3,
        "step_ms": [round(t * 1e3, 2) for t in times],
        "counters": counters,
    }


def _spawn(
    model: str, setting: str, steps: int, cache: str, script: str = __file__, pythonpath: str | None = None
) -> dict:
    """One run in a fresh process with Inductor's cache in ``cache``; ``script`` and ``pythonpath``:
    another checkout's copy of this file and its package (benchmarks/step_time_ab.py)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, script, "--one", model, setting, "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(row: dict, base: dict | None, key: str, run: str) -> float:
    return row[run][key] / base[run][key] if base else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--settings", default="inductor,defaults,budget0.1")
    ap.add_argument("--steps", type=int, default=14)  # the first probe is at step 10, its re-plan at 11
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(*args.one, args.steps)))
        return
    settings = args.settings.split(",")
    rows = []
    header = (
        "| model | setting | first step cold (s) | x Inductor | warm (s) | x Inductor | steady (ms) "
        "| x Inductor | slowest later step (ms) | all steps cold (s) | x Inductor |"
    )
    print(header + "\n" + "| --- | --- |" + " ---: |" * 9, flush=True)
    for model in args.models.split(","):
        base = None
        for setting in settings:
            with tempfile.TemporaryDirectory(prefix="fxlowbit-cache-") as cache:
                cold = _spawn(model, setting, args.steps, cache)
                warm = _spawn(model, setting, args.steps, cache) if "error" not in cold else cold
            row = {
                "model": model,
                "setting": setting,
                "options": SETTINGS[setting],
                "cold": cold,
                "warm": warm,
            }
            rows.append(row)
            if "error" in cold or "error" in warm:
                print(
                    f"| {model} | {setting} | error: {cold.get('error') or warm.get('error')} |", flush=True
                )
                continue
            if setting == "inductor":
                base = row
            row["ratios"] = {
                "first_cold": _ratio(row, base, "first_s", "cold"),
                "first_warm": _ratio(row, base, "first_s", "warm"),
                "steady": _ratio(row, base, "steady_ms", "cold"),
                "total_cold": _ratio(row, base, "total_s", "cold"),
            }
            r = row["ratios"]
            print(
                f"| {model} | {setting} | {cold['first_s']:.1f} | {r['first_cold']:.2f} "
                f"| {warm['first_s']:.1f} | {r['first_warm']:.2f} "
                f"| {cold['steady_ms']:.1f} | {r['steady']:.2f} "
                f"| {cold['max_later_ms']:.0f} | {cold['total_s']:.1f} | {r['total_cold']:.2f} |",
                flush=True,
            )
    if args.out:
        import datetime
        import platform

        import torch

        commit = git_commit(short=True) or ""
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status and status.stdout.strip())
        meta = {
            "date": datetime.date.today().isoformat(), "commit": commit + ("+dirty" if dirty else ""),
            "torch": torch.__version__, "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, 1 torch thread", "steps": args.steps,
            "command": "python benchmarks/compile_time.py " + " ".join(sys.argv[1:]),
        }  # fmt: skip
        write_json(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
