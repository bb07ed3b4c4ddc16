"""benchmarks/frontier.py end to end on the tiny GPT-2, without Inductor (``--inner eager``) so it
stays fast on a CPU: the JSON it writes, the matmul FLOP counter, and min-cut's recompute FLOPs rising
as its budget falls."""

import json
import math

import pytest

from ._util import benchmark_module

ROW_KEYS = {"model", "size", "frontier", "label", "budget", "bits", "saved_bytes", "saved_mb",
            "saved_ratio", "step_ms", "step_ratio", "matmul_flops", "extra_flops_pct", "grad_sqnr_db",
            "error", "note"}  # fmt: skip


@pytest.fixture(scope="module")
def frontier():
    with benchmark_module("frontier") as module:
        yield module


def test_matmul_flops_of_a_graph(frontier):
    import torch
    from _common import matmul_flops
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a, b, q):
        attn = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return (a @ b).sum() + attn.sum()

    gm = make_fx(f, tracing_mode="fake")(torch.randn(3, 5), torch.randn(5, 7), torch.randn(1, 2, 4, 8))
    # mm: 2*3*5*7; SDPA: two (4x8 @ 8x4)-sized matmuls per head
    assert matmul_flops([gm]) == 2 * 3 * 5 * 7 + 2 * (2 * 2 * 4 * 4 * 8)


def test_frontier_tiny_gpt2(frontier, tmp_path):
    out, png = tmp_path / "frontier.json", tmp_path / "frontier.png"
    argv = ["--models", "gpt2", "--size", "tiny", "--inner", "eager", "--mincut-budgets", "0.5,0.0",
            "--lowbit-budgets", "0.3,0.1", "--bits", "", "--steps", "1",
            "--out", str(out), "--plot", str(png)]  # fmt: skip
    result = frontier.main(argv)
    data = json.loads(out.read_text())
    assert png.stat().st_size > 0
    assert {"device", "torch", "date", "commit", "command", "args"} <= set(data["meta"])
    assert data["meta"]["command"].startswith("python ") and "--inner eager" in data["meta"]["command"]
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == [
        "aot_eager",
        "inductor",
        "min-cut B=0.5",
        "min-cut B=0",
        "lowbit B=0.3",
        "lowbit B=0.1",
    ]
    for r in data["rows"]:
        assert ROW_KEYS <= set(r), r["label"]
    for label in ("inductor", "min-cut B=0.5", "min-cut B=0"):
        r = rows[label]
        assert r["error"] is None, r["error"]
        assert r["matmul_flops"] > 0 and r["step_ms"] > 0 and r["step_ratio"] > 0
        assert r["grad_sqnr_db"] == "inf" or float(r["grad_sqnr_db"]) > 100  # exact up to float noise
    assert rows["inductor"]["extra_flops_pct"] == 0
    # less memory for min-cut means recomputing matmuls: FLOPs rise, saved bytes fall
    assert (
        rows["inductor"]["matmul_flops"]
        <= rows["min-cut B=0.5"]["matmul_flops"]
        < rows["min-cut B=0"]["matmul_flops"]
    )
    assert (
        rows["min-cut B=0"]["saved_bytes"]
        < rows["min-cut B=0.5"]["saved_bytes"]
        < rows["aot_eager"]["saved_bytes"]
    )
    assert rows["min-cut B=0"]["extra_flops_pct"] > 10
    assert set(result["acceptance"]["gpt2"]) >= {"target_ratio", "lowbit", "mincut"}
    for label in ("lowbit B=0.3", "lowbit B=0.1"):
        r = rows[label]
        assert r["error"] is None, r["error"]
        assert r["saved_bytes"] < rows["inductor"]["saved_bytes"]
        assert math.isfinite(r["grad_sqnr_db"]) and r["matmul_flops"] > 0


def _row(frontier, label, ratio, ms, flops=0.0):
    return {"frontier": frontier, "label": label, "saved_bytes": 1000 / ratio, "saved_ratio": ratio,
            "step_ms": ms, "step_ratio": ms / 10, "extra_flops_pct": flops, "error": None}  # fmt: skip


def test_acceptance_interpolates_mincut_in_log_bytes(frontier):
    rows = [_row("inductor", "inductor", 1.2, 10.0), _row("min-cut", "min-cut B=0.2", 5.0, 12.0),
            _row("min-cut", "min-cut B=0.1", 20.0, 14.0),
            _row("lowbit", "lowbit B=0.1", 12.0, 11.0, 1.0), _row("lowbit", "lowbit B=0.08", 15.0, 10.5),
            _row("lowbit", "lowbit B=0.3", 4.0, 10.2)]  # fmt: skip
    acc = frontier.acceptance(rows)
    assert acc["lowbit"]["label"] == "lowbit B=0.08"  # the fastest row at >= 10x
    assert acc["mincut"]["step_ms"] == pytest.approx(13.0)  # 10x: halfway between 5x and 20x in log
    assert "between min-cut B=0.2" in acc["mincut"]["how"]
    assert acc["mincut"]["fastest_row"]["label"] == "min-cut B=0.1"
    assert frontier.acceptance_line("m", acc).startswith("acceptance m: PASS")
    acc = frontier.acceptance(rows[:2] + rows[3:])  # min-cut never reaches 10x
    assert acc["mincut"]["step_ms"] is None and "never reaches 10x" in acc["mincut"]["how"]


def test_vs_uniform_compares_at_equal_bytes(frontier):
    def row(bits, matches, mb, db):
        s = frontier.Setting("lowbit", matches=matches) if matches else frontier.Setting("uniform", bits=bits)
        return {"label": s.label, "frontier": s.frontier, "bits": s.bits, "matches": s.matches,
                "saved_mb": mb, "saved_bytes": int(mb * 1e6), "grad_sqnr_db": db, "error": None}  # fmt: skip

    rows = [row(4, None, 5.0, 33.0), row(None, 4, 4.9, 44.0), row(8, None, 9.0, 58.0),
            row(None, 8, 9.0, 58.0), row(2, None, 2.0, 19.0), row(None, 2, 2.1, 30.0)]  # fmt: skip
    got = {v["bits"]: v["better"] for v in frontier.vs_uniform(rows)}
    # strictly better SQNR at no more bytes: a tie or more bytes fails
    assert got == {4: True, 8: False, 2: False}
    assert frontier.Setting("lowbit", matches=4).label == "lowbit least-variance = uniform 4b bytes"
