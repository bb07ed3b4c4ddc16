"""The CLI: ``python -m fxlowbit demo --quick`` prints one table row per (model, run) with the
advertised columns, and writes the same results as JSON. The quick demo takes ~30 s here (2 CPU
cores); the subprocess timeout leaves room for slow, shared CI machines."""

import json
import subprocess
import sys

from fxlowbit.__main__ import parse_args

COLUMNS = [
    "model",
    "run",
    "saved MB",
    "reduction",
    "train loss",
    "eval loss",
    "test acc",
    "ms/step",
    "first step s",
]
RUNS = ["uncompressed", "budget0.1", "lowbit4", "lowbit2"]  # --quick: inner="eager", so the baseline is
# the lowbit pipeline with compression off


def _rows(stdout: str) -> list[list[str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_demo_is_the_default_command():
    args = parse_args([])
    assert (args.command, args.model, args.bits, args.inner) == (
        "demo",
        ["gpt", "mlp"],
        [4],
        "inductor",
    )
    assert args.budget == [0.1]
    quick = parse_args(["--quick", "--bits", "4"])
    assert (quick.command, quick.inner, quick.bits, quick.dim) == ("demo", "eager", [4], 64)
    assert parse_args(["--quick"]).bits == [4, 2]


def test_quick_demo_table(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fxlowbit", "demo", "--quick", "--no-progress", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, rule, *rows = _rows(proc.stdout)
    assert header == COLUMNS
    assert set("".join(rule)) == {"-"}
    assert [(r[0], r[1]) for r in rows] == [(m, run) for m in ("gpt", "mlp") for run in RUNS]

    table = {(r[0], r[1]): dict(zip(COLUMNS, r, strict=True)) for r in rows}
    for model in ("gpt", "mlp"):
        base, *low = (table[model, run] for run in RUNS)
        assert base["reduction"] == "1.0x"
        saved = {run: float(table[model, run]["saved MB"]) for run in RUNS}
        assert saved["uncompressed"] > saved["lowbit4"] > saved["lowbit2"] > 0  # fewer bits, fewer bytes
        # the planner under a 0.1 budget stores less than uniform 4-bit (the walk also counts the
        # model inputs, which the planner's budget does not: 9.6x GPT, 6.6x MLP measured)
        assert saved["budget0.1"] < saved["lowbit4"]
        assert all(float(r["reduction"].rstrip("x")) > 2 for r in low)
        assert all(float(r["ms/step"]) > 0 for r in (base, *low))
        # the first step compiles: it takes longer than a steady one
        assert all(float(r["first step s"]) * 1e3 > float(r["ms/step"]) for r in (base, *low))
    assert all(table["gpt", run]["test acc"] == "-" for run in RUNS)
    assert all(table["mlp", run]["test acc"].endswith("%") for run in RUNS)
    assert float(table["gpt", "lowbit4"]["train loss"]) < 3.5  # learned something (ln 128 = 4.85)

    results = json.loads(out.read_text())["results"]
    assert [(r["model"], r["run"]) for r in results] == [(r[0], r[1]) for r in rows]
    assert all(len(r["losses"]) == r["steps"] for r in results)
    assert all(r["first_s"] > 0 for r in results)
