"""The model matrix on the path users take (issue 15): every architecture of tests/_models.py at
default options (planner + probes, 12 steps so the first probe and its re-plan happen) and at
``memory_budget=0.1``, against the uncompressed pipeline: walked saved-bytes reduction and
whole-gradient SQNR on the first step (prior plan) and the last (after the re-plan), plus the
fallback and probe counters. Eager inner compiler (CPU time); step times are not measured here.

    python benchmarks/matrix_defaults.py --out benchmarks/results/matrix_defaults_cpu.json [--models a,b]
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
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(
        "| model | family | setting | reduction | SQNR first (dB) | SQNR after re-plan (dB) "
        "| probes | fallbacks | s |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
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
            rows.append(row)
            print(f"| {name} | {row['family']} | {label} | {m['reduction']:.2f}x | "
                  f"{m['sqnr_first_db']:.1f} | "
                  f"{m['sqnr_last_db']:.1f} | {row['probes']} | {row['fallbacks']} | {row['seconds']:.0f} |",
                  flush=True)  # fmt: skip
    if args.out:
        meta = {"date": datetime.date.today().isoformat(), "commit": git_commit(short=True),
                "torch": torch.__version__, "device": "cpu (2 cores, 1 thread)",
                "command": " ".join(sys.argv)}  # fmt: skip
        write_json(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
