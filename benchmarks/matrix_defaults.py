"""The model matrix on the path users take (issue 15): every architecture of tests/_models.py at
default options (planner + probes, 12 steps so the first probe and its re-plan happen) and at
``memory_budget=0.1``, against the uncompressed pipeline: walked saved-bytes reduction and
whole-gradient SQNR on the first step (prior plan) and the last (after the re-plan), plus the
fallback and probe counters, and the matmul/convolution FLOPs the first step's plans replay in the
backward (as a fraction of the step's own). Eager inner compiler for those (CPU time). With
``--step-time``, each model's steady training step is also timed with Inductor as the inner compiler
against ``backend="inductor"`` (benchmarks/compile_time.py's in-process run, 14 steps: the probe
and its re-plan included), which costs three Inductor compiles per model.

    python benchmarks/matrix_defaults.py --out benchmarks/results/matrix_defaults_cpu.json [--models a,b]
        [--step-time]
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
from _common import ROOT, git_commit, time_ms, write_json  # benchmarks/ is the script's directory

sys.path.insert(0, ROOT)
from tests import _models  # noqa: E402
from tests.test_model_matrix import DEFAULTS, measure_defaults  # noqa: E402

SETTINGS = {"defaults": DEFAULTS, "budget0.1": {**DEFAULTS, "memory_budget": 0.1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(_models.FAMILY))
    ap.add_argument("--out", default=None)
    ap.add_argument("--step-time", action="store_true", help="also time steady steps against Inductor")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(
        "| model | family | setting | reduction | SQNR first (dB) | SQNR after re-plan (dB) "
        "| extra matmul FLOPs | step vs Inductor | probes | fallbacks | s |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        inductor_ms = _steady_ms(name, "inductor") if args.step_time else None
        for label, options in SETTINGS.items():
            m: dict = {}

            def measure(name=name, options=options, m=m):
                m.update(measure_defaults(name, options))

            seconds = time_ms(measure) / 1e3
            c = m.pop("counters")
            row = {"model": name, "family": _models.FAMILY[name], "setting": label, **m,
                   "probes": c.get("probes", 0), "plan_variants": c.get("plan_variants", 0),
                   "guard_replans": c.get("guard_replans", 0),
                   "fallbacks": c.get("fallback_internal_error", 0) + c.get("probes_disabled", 0),
                   "seconds": seconds}  # fmt: skip
            if inductor_ms is not None:
                ms = _steady_ms(name, label)
                row.update(inductor_steady_ms=inductor_ms, steady_ms=ms, step_vs_inductor=ms / inductor_ms)
            rows.append(row)
            vs = f"{row['step_vs_inductor']:.2f}x" if "step_vs_inductor" in row else "-"
            print(f"| {name} | {row['family']} | {label} | {m['reduction']:.2f}x | "
                  f"{m['sqnr_first_db']:.1f} | {m['sqnr_last_db']:.1f} | "
                  f"{100 * m['extra_matmul_flops']:.1f}% | {vs} | "
                  f"{row['probes']} | {row['fallbacks']} | {row['seconds']:.0f} |", flush=True)  # fmt: skip
    if args.out:
        meta = {"date": datetime.date.today().isoformat(), "commit": git_commit(short=True),
                "torch": torch.__version__, "device": "cpu (2 cores, 1 thread)",
                "command": " ".join(sys.argv)}  # fmt: skip
        write_json(args.out, {"meta": meta, "rows": rows})


def _steady_ms(name: str, setting: str) -> float:
    """Steady training-step ms of ``name`` under ``setting`` (compile_time.py's SETTINGS; lowbit
    with Inductor as the inner compiler), measured in this process."""
    import compile_time

    torch._dynamo.reset()
    return compile_time._one(name, setting, 14)["steady_ms"]


if __name__ == "__main__":
    main()
