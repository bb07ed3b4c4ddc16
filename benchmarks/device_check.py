"""Every GPU figure of the project in one prepared call: the GPU benchmarks in a fixed order, each in
its own process under its own time limit, all under a total limit, into one folder.

Order (by value; what does not fit the total limit is skipped and says so):

1. ``pack_kernels``: copy bandwidth and the pack/unpack/mask kernels, bf16 and fp32 (% of copy);
2. ``gpt2_small``: the GPT-2-small bf16 step, batch 8x1024: Inductor, min-cut budget 0.1, lowbit
   defaults, lowbit ``memory_budget=0.1``, lowbit ``gemm="fp8"`` / ``"int8"`` (and
   ``sampling=True`` once ``LowbitConfig`` has that option): step ms and ratio, peak memory,
   saved bytes, gradient SQNR against fp32;
3. ``gemm`` and ``sparse24_gemm``: INT8 / FP8 / 2:4 GEMMs against cuBLAS bf16, per shape;
4. ``profile``: ``python -m fxlowbit.profile`` (the cost model's figures, quantizers included);
5. ``linear_ce``: the fused loss heads (its script's own CLI);
6. ``gpt2_medium``: the GPT-2-medium step for the GEMM formats.

Each benchmark writes ``<out>/<name>.json`` (``{"meta": {device, torch, triton, date, commit,
command, wall_s, status, ...}, "result": <the script's JSON>}``) and ``<out>/<name>.log`` (its
stdout and stderr); a benchmark that fails or runs out of time is recorded and the run goes on.
The end is one markdown table, printed and written as ``summary.md``, with ``summary.json``.
``python -m fxlowbit.profile --from-device-check <out> --out fxlowbit/profiles/<device>.json``
turns the folder into a shipped hardware profile.

``--dry-run`` runs the same plan on a CPU with tiny sizes and each script's CPU smoke mode (figures
meaningless), passing every option the GPU run passes: tests/test_device_check.py runs it, so the
script cannot rot between GPU turns.

    python benchmarks/device_check.py --out /tmp/device_check        # a GPU: <= 8 minutes
    python benchmarks/device_check.py --only profile,gpt2_medium --out /tmp/dc2   # a rerun
    python benchmarks/device_check.py --dry-run --out /tmp/dc_dry     # a CPU: about 70 s

The per-benchmark limits were set before any GPU run of this script (compile times scaled from a
2-layer GPT-2 on an H100: 12-47 s per row); the first GPU run tells what fits in 8 minutes, and
``gpu_step.py --max-build-s`` makes a slow compile cost GPT-2 rows, not the whole benchmark. The
profile comes after the GEMM table: its figures are what the planner reads. A machine that hands
back few files: ``tar czf dc.tgz -C /tmp device_check``.

The package must be importable; if it is not, the script installs this checkout with
``pip install --no-deps --no-build-isolation --no-index -e .`` (nothing else, no network).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from device_check_figures import figures  # noqa: I001 (benchmarks/ is sys.path[0])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = 'inductor,mincut:0.1,lowbit,lowbit:budget=0.1,lowbit:gemm="fp8",lowbit:gemm="int8"{sampling}'
MEDIUM = 'inductor,lowbit:gemm="fp8",lowbit:gemm="int8"'
STEP_DRY = ("--device", "cpu", "--inner", "eager", "--size", "micro", "--batch", "2", "--steps", "1",
            "--warmup", "0", "--max-build-s", "{build_s}")  # fmt: skip
INTERPRET = {"TRITON_INTERPRET": "1"}  # Triton kernels on a CPU: the interpreter


@dataclasses.dataclass(frozen=True)
class Bench:
    """One benchmark: ``python <argv>`` on the GPU, ``python <dry>`` in the dry run. Placeholders:
    ``{out}`` the JSON path, ``{build_s}`` seconds the script may spend building before it must
    time what it has (its time limit less a margin), ``{sampling}`` the sampling row if built."""

    name: str
    title: str
    argv: tuple[str, ...]
    dry: tuple[str, ...]
    timeout_s: float  # on a GPU
    min_s: float = 30.0  # not started with less of the total limit left
    dry_timeout_s: float = 150.0  # generous: CI machines are slow and sometimes shared
    dry_env: dict = dataclasses.field(default_factory=dict)


PLAN: list[Bench] = [
    Bench("pack_kernels", "copy and pack/unpack/mask kernels, bf16 + fp32",
          ("benchmarks/pack_kernels.py", "--numel", str(1 << 26), "--dtypes", "bf16,fp32", "--out", "{out}"),
          ("benchmarks/pack_kernels.py", "--cpu-smoke", "--numel", str(1 << 14), "--dtypes", "bf16,fp32",
           "--out", "{out}"), 90, dry_env=INTERPRET),
    Bench("gpt2_small", "GPT-2 small bf16 step, batch 8x1024",
          ("benchmarks/gpu_step.py", "--size", "small", "--batch", "8", "--settings", SMALL,
           "--steps", "10", "--warmup", "2", "--max-build-s", "{build_s}", "--out", "{out}"),
          ("benchmarks/gpu_step.py", *STEP_DRY, "--settings", SMALL, "--out", "{out}"), 240, min_s=120),
    Bench("gemm", "INT8 / FP8 GEMMs and linears vs cuBLAS bf16",
          ("benchmarks/gemm.py", "--reps", "20", "--out", "{out}"),
          ("benchmarks/gemm.py", "--cpu-smoke", "--reps", "1", "--out", "{out}"), 90, dry_env=INTERPRET),
    Bench("sparse24_gemm", "2:4 semi-structured GEMM vs dense bf16",
          ("benchmarks/sparse24.py", "--gemm-only", "--out", "{out}"),
          ("benchmarks/sparse24.py", "--gemm-only", "--cpu-smoke", "--out", "{out}"), 45),
    Bench("profile", "python -m fxlowbit.profile (cost-model figures)",
          ("-m", "fxlowbit.profile", "--device", "cuda", "--no-progress", "--out", "{out}"),
          ("-m", "fxlowbit.profile", "--device", "cpu", "--quick", "--no-progress", "--out", "{out}"), 100),
    Bench("linear_ce", "fused loss heads (linear + cross-entropy)",
          ("benchmarks/linear_ce.py", "--kernels", "--out", "{out}"),
          ("benchmarks/linear_ce.py", "--quick", "--kernels", "--out", "{out}"), 90),
    Bench("gpt2_medium", "GPT-2 medium bf16 step, GEMM formats",
          ("benchmarks/gpu_step.py", "--size", "medium", "--batch", "8", "--settings", MEDIUM,
           "--steps", "10", "--warmup", "2", "--max-build-s", "{build_s}", "--out", "{out}"),
          ("benchmarks/gpu_step.py", *STEP_DRY, "--settings", MEDIUM, "--out", "{out}"), 180, min_s=120),
]  # fmt: skip


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git(*cmd: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None


_PROBE = """
import dataclasses, importlib.metadata as md, json, platform, torch
def v(n):
    try: return md.version(n)
    except md.PackageNotFoundError: return None
cuda = torch.cuda.is_available()
cpu = "cpu: " + (platform.processor() or platform.machine())
info = {"device": torch.cuda.get_device_name() if cuda else cpu,
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "torch": torch.__version__, "triton": v("triton"), "transformers": v("transformers"),
        "python": platform.python_version(), "cuda": cuda}
try:
    import fxlowbit
    info["sampling"] = "sampling" in {f.name for f in dataclasses.fields(fxlowbit.LowbitConfig)}
except Exception as err:
    info["import_error"] = f"{type(err).__name__}: {err}"
print(json.dumps(info))
"""


def environment(install: bool = True) -> dict:
    """Device, versions, commit, whether LowbitConfig has ``sampling``; installs this checkout
    (no dependencies, no network) if ``import fxlowbit`` fails and ``install``."""

    def probe() -> dict:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd="/")
        if out.returncode:
            return {"probe_error": (out.stderr.strip().splitlines() or ["?"])[-1]}
        return json.loads(out.stdout.strip().splitlines()[-1])

    info = probe()
    if "import_error" in info and install:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
               "--no-index", "-e", ROOT]  # fmt: skip
        print(f"fxlowbit not importable ({info['import_error']}): {shlex.join(pip)}", flush=True)
        subprocess.run(pip, check=False)
        info = {**probe(), "installed": True}
    head, dirty = _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")
    info["commit"] = head.stdout.strip() if head and head.returncode == 0 else None
    info["dirty"] = bool(dirty.stdout.strip()) if dirty and dirty.returncode == 0 else None
    return info


def _expand(args: tuple[str, ...], out: str, timeout: float, sampling: bool) -> list[str]:
    build_s = f"{max(timeout - 75, timeout / 2):.0f}"  # margin: the reference step, one row, timing
    fill = {"{out}": out, "{build_s}": build_s, "{sampling}": ",lowbit:sampling=true" if sampling else ""}
    expanded = []
    for a in args:
        for key, value in fill.items():
            a = a.replace(key, value)
        expanded.append(a)
    return expanded


def run_one(name: str, args: list[str], env: dict, timeout: float, folder: str):
    """Run ``python args`` in its own process group, killed at ``timeout``: (status, wall_s, JSON)."""
    raw = os.path.join(folder, ".raw", f"{name}.json")
    if os.path.exists(raw):  # left by an earlier run into this folder
        os.remove(raw)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with open(os.path.join(folder, f"{name}.log"), "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"error: exit code {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the script and its compile workers
            proc.wait()
            status = f"timeout: killed after {timeout:.0f} s"
        wall = time.perf_counter() - t0
    result = None
    if os.path.exists(raw):
        try:
            with open(raw) as f:
                result = json.load(f)
        except ValueError as err:
            status = f"error: bad JSON ({err})" if status == "ok" else status
        os.remove(raw)
    elif status == "ok":
        status = "error: exit code 0 but no JSON written"
    if status.startswith("timeout") and result is not None:
        status += " (partial JSON kept)"
    return status, wall, result


def _last_error(folder: str, name: str) -> str | None:
    try:
        with open(os.path.join(folder, f"{name}.log")) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return None
    return lines[-1][:300] if lines else None


def _earlier(path: str) -> dict | None:
    """The summary row of a benchmark's JSON left in the folder by an earlier run (None: none)."""
    try:
        with open(path) as f:
            data = json.load(f)
        m = data["meta"]
    except (OSError, ValueError, KeyError):
        return None
    status = f"{m['status']} (earlier run, {m['date']})"
    figs = figures(os.path.basename(path)[: -len(".json")], data.get("result"))
    return {"status": status, "wall_s": m["wall_s"], "figures": figs, "error": m.get("error")}


def run(out: str, dry: bool, time_limit: float, plan: list[Bench] | None = None,
        only: set[str] | None = None, install: bool = True, command: str = "",
        env_info: dict | None = None) -> dict:  # fmt: skip
    """Run ``plan`` (default :data:`PLAN`) into the folder ``out``; returns the summary.
    ``env_info``: :func:`environment`'s answer, when the caller has it (tests)."""
    plan = PLAN if plan is None else plan
    os.makedirs(os.path.join(out, ".raw"), exist_ok=True)
    env_info = environment(install) if env_info is None else env_info
    started = time.perf_counter()
    sampling = bool(env_info.get("sampling"))
    rows = []
    where = f"{env_info.get('device')}, torch {env_info.get('torch')}, commit {env_info.get('commit')}"
    print(f"device check ({'dry run, CPU' if dry else 'GPU'}): {where}", flush=True)
    for i, b in enumerate(plan, 1):
        left = time_limit - (time.perf_counter() - started)
        timeout = min(b.dry_timeout_s if dry else b.timeout_s, left)
        raw = os.path.join(out, ".raw", f"{b.name}.json")
        args = _expand(b.dry if dry else b.argv, raw, timeout, sampling)
        env = b.dry_env if dry else {}
        cmd = " ".join([*(f"{k}={v}" for k, v in env.items()), shlex.join(["python", *args])])
        meta = {k: env_info.get(k) for k in ("device", "torch", "triton", "transformers", "python", "commit")}
        meta |= {"dirty": env_info.get("dirty"), "date": _now(), "command": cmd, "dry_run": dry}
        path = os.path.join(out, f"{b.name}.json")
        if only is not None and b.name not in only:  # a rerun of others: keep what this folder holds
            row = _earlier(path) or {"status": "skipped: not selected (--only)", "wall_s": 0.0}
            rows.append({"name": b.name, "title": b.title, "selected": False, "figures": None, "note": None,
                         "error": None, **row})  # fmt: skip
            continue
        status, wall, result = f"skipped: total time limit ({left:.0f} s left of {time_limit:.0f})", 0.0, None
        if left >= b.min_s:
            print(f"[{i}/{len(plan)}] {b.name}: {cmd} (limit {timeout:.0f} s)", flush=True)
            status, wall, result = run_one(b.name, args, env, timeout, out)
        note = None
        if b.name.startswith("gpt2_small") and not sampling:
            note = "sampling=True row: not built yet (LowbitConfig has no 'sampling' option)"
        error = _last_error(out, b.name) if status.startswith(("error", "timeout")) else None
        meta |= {"wall_s": round(wall, 1), "timeout_s": round(timeout, 1), "status": status, "error": error,
                 "note": note, "log": f"{b.name}.log" if wall else None}  # fmt: skip
        with open(path, "w") as f:
            json.dump({"meta": meta, "result": result}, f, indent=1, default=str)
            f.write("\n")
        rows.append({"name": b.name, "title": b.title, "selected": True, "status": status,
                     "wall_s": round(wall, 1), "figures": figures(b.name, result), "note": note,
                     "error": error})  # fmt: skip
        print(f"    {b.name}: {status} in {wall:.1f} s" + (f" -- {error}" if error else ""), flush=True)
    if not os.listdir(os.path.join(out, ".raw")):
        os.rmdir(os.path.join(out, ".raw"))
    summary = {"meta": {**env_info, "date": _now(), "dry_run": dry, "time_limit_s": time_limit,
                        "wall_s": round(time.perf_counter() - started, 1),
                        "command": command},
               "rows": rows}  # fmt: skip
    text = table(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
        f.write("\n")
    print("\n" + text, flush=True)
    return summary


def table(summary: dict) -> str:
    m = summary["meta"]
    head = (f"device check{' (DRY RUN: CPU, tiny sizes, figures meaningless)' if m['dry_run'] else ''}: "
            f"{m.get('device')}, torch {m.get('torch')}, triton {m.get('triton')}, {m['date']}, "
            f"commit {(m.get('commit') or '?')[:7]}{' (dirty)' if m.get('dirty') else ''}, "
            f"{m['wall_s']:.0f} s of {m['time_limit_s']:.0f}")  # fmt: skip
    lines = [head, "", "| # | benchmark | status | wall s | figures |", "| --- | --- | --- | ---: | --- |"]
    for i, r in enumerate(summary["rows"], 1):
        cell = "; ".join(filter(None, [r["figures"], r["note"], r["error"]])).replace("|", "/")
        lines.append(f"| {i} | {r['name']} | {r['status']} | {r['wall_s']:.1f} | {cell} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check that everything runs")
    ap.add_argument("--time-limit", type=float, default=None, help="total seconds (default 480; dry run 600)")
    names = ",".join(b.name for b in PLAN)
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {names}")
    ap.add_argument("--no-install", action="store_true", help="never pip-install this checkout")
    args = ap.parse_args(argv)
    only = None if args.only is None else set(args.only.split(","))
    unknown = (only or set()) - {b.name for b in PLAN}
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; known: {[b.name for b in PLAN]}")
    limit = args.time_limit or (600.0 if args.dry_run else 480.0)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/device_check.py", *argv])
    summary = run(args.out, args.dry_run, limit, only=only, install=not args.no_install, command=command)
    bad = [r for r in summary["rows"] if r["selected"] and r["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
