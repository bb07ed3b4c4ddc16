"""Steady training step of this checkout against an earlier commit, both against Inductor: what a
change did to step time and to the first step (compile), measured the way compile_time.py runs one
model (a fresh process per run, its own Inductor cache per version, 14 steps: the probe and its
re-plan included). The base commit is checked out into a temporary git worktree and imported from a
package layout built there; runs go in lockstep per model (Inductor, then each setting on the base
and on this checkout), so the ratios share the machine's state.

    python benchmarks/step_time_ab.py --base 0d5632b --models gpt2,llama,resnet \\
        --out benchmarks/results/step_time_ab_cpu.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from _common import ROOT, git, git_commit, write_json  # benchmarks/ is the script's directory
from compile_time import _spawn

SETTINGS = ("defaults", "budget0.1")
STEPS = 14  # compile_time.py's default: the probe at step 10 and its re-plan at 11 included


def _package(src: str, where: str) -> str:
    """A PYTHONPATH folder under ``where`` holding the package of the checkout ``src`` as
    pyproject.toml maps it (fxlowbit/, with passes/ and codegen/ as its subpackages)."""
    pkg = os.path.join(where, "pkg")
    os.makedirs(pkg)
    subprocess.run(["cp", "-r", os.path.join(src, "fxlowbit"), pkg], check=True)
    for sub in ("passes", "codegen"):
        os.symlink(os.path.join(src, sub), os.path.join(pkg, "fxlowbit", sub))
    os.symlink(os.path.join(src, "tests"), os.path.join(pkg, "tests"))
    return pkg


def _layout(rev: str, where: str) -> tuple[str, str]:
    """(PYTHONPATH, compile_time.py) of commit ``rev``, checked out under ``where``: the package
    as pyproject.toml maps it (fxlowbit/, with passes/ and codegen/ as its subpackages)."""
    src = os.path.join(where, "src")
    if git("worktree", "add", "--detach", src, rev) is None:
        raise SystemExit(f"cannot check out {rev}")
    pkg = _package(src, where)
    script = os.path.join(src, "benchmarks", "compile_time.py")
    if not os.path.exists(script):  # a base older than the benchmark: this checkout's runs it
        script = os.path.join(ROOT, "benchmarks", "compile_time.py")
    return pkg, script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the earlier commit")
    ap.add_argument("--models", default="gpt2,llama,resnet")
    ap.add_argument("--steps", type=int, default=STEPS, help="steps per run (below 11: no probe, no re-plan)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    here = os.path.join(ROOT, "benchmarks", "compile_time.py")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = _layout(args.base, os.path.join(tmp, "base"))
        # this checkout's package as copied now (not the editable install: edits made while the
        # runs go on do not reach them; passes/ and codegen/ are linked, so leave those alone)
        versions = {"base": base, "head": (_package(ROOT, os.path.join(tmp, "head")), here)}
        caches = {v: os.path.join(tmp, f"cache_{v}") for v in versions}
        print("| model | inductor ms | setting | base ms (x inductor) | head ms (x inductor) | first s |")
        print("| --- | ---: | --- | ---: | ---: | ---: |")
        try:
            for model in args.models.split(","):
                ind_run = _spawn(model, "inductor", args.steps, caches["head"], here, versions["head"][0])
                ind = ind_run.get("steady_ms", float("nan"))
                for setting in SETTINGS:
                    got = {
                        v: _spawn(model, setting, args.steps, caches[v], s, pp)
                        for v, (pp, s) in versions.items()
                    }
                    row = {"model": model, "setting": setting, "inductor_ms": ind,
                           **{f"{v}_ms": r.get("steady_ms") for v, r in got.items()},
                           **{f"{v}_first_s": r.get("first_s") for v, r in got.items()},
                           **{f"{v}_error": r["error"] for v, r in got.items() if "error" in r}}  # fmt: skip
                    rows.append(row)
                    b, h = row["base_ms"] or float("nan"), row["head_ms"] or float("nan")
                    first = f"{row['base_first_s'] or 0:.0f} -> {row['head_first_s'] or 0:.0f}"
                    print(f"| {model} | {ind:.2f} | {setting} | {b:.2f} ({b / ind:.2f}x) "
                          f"| {h:.2f} ({h / ind:.2f}x) | {first} |", flush=True)  # fmt: skip
        finally:
            git("worktree", "remove", "--force", os.path.join(tmp, "base", "src"))
    meta = {"base": args.base, "head": git_commit(short=True), "command": " ".join(sys.argv),
            "steps": args.steps, "machine": "CPU, 1 torch thread per run"}  # fmt: skip
    write_json(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
