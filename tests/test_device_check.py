"""benchmarks/device_check.py: its dry run (every benchmark of the GPU plan, on a CPU, tiny sizes)
completes with every benchmark ok and its metadata; a failing, a hanging and a late benchmark are
recorded without stopping the run; the folder merges into a hardware profile."""

import json
import os

import pytest

from ._util import benchmark_module

META_KEYS = {"device", "torch", "triton", "date", "commit", "command", "wall_s", "status", "dry_run"}


@pytest.fixture(scope="module")
def dc():
    with benchmark_module("device_check") as module:
        yield module


@pytest.fixture(scope="module")
def dry(dc, tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    assert dc.main(["--dry-run", "--out", str(out), "--no-install"]) == 0
    return out


def _script(args) -> str:
    """The script (or ``-m`` module) a benchmark runs."""
    return " ".join(args[:2]) if args[0] == "-m" else args[0]


def test_dry_run_runs_every_benchmark_of_the_plan(dc, dry):
    # the dry run calls what the GPU run calls, with every option it passes (and CPU smoke ones)
    for b in dc.PLAN:
        assert _script(b.dry) == _script(b.argv), b.name
        flags = lambda args: {a for a in args if a.startswith("--")}  # noqa: E731
        assert flags(b.argv) <= flags(b.dry), (b.name, flags(b.argv) - flags(b.dry))
    summary = json.loads((dry / "summary.json").read_text())
    assert [r["name"] for r in summary["rows"]] == [b.name for b in dc.PLAN]
    assert {r["name"]: r["status"] for r in summary["rows"]} == {b.name: "ok" for b in dc.PLAN}
    assert summary["meta"]["dry_run"] is True
    text = (dry / "summary.md").read_text()
    for r in summary["rows"]:
        assert f"| {r['name']} | ok |" in text
        assert r["figures"] and "unreadable" not in r["figures"], r
    for b in dc.PLAN:
        data = json.loads((dry / f"{b.name}.json").read_text())
        assert META_KEYS <= set(data["meta"]), b.name
        assert data["meta"]["status"] == "ok" and data["meta"]["dry_run"] is True
        assert _script(b.dry) in data["meta"]["command"]
        assert data["result"], b.name
        assert (dry / f"{b.name}.log").stat().st_size > 0


def test_dry_run_gpt2_rows(dry):
    rows = json.loads((dry / "gpt2_small.json").read_text())["result"]["rows"]
    labels = [r["label"] for r in rows]
    assert labels[:6] == ["inductor", "min-cut 0.1", "lowbit defaults", "lowbit memory_budget=0.1",
                          "lowbit gemm=fp8", "lowbit gemm=int8"]  # fmt: skip
    import fxlowbit

    sampling = "sampling" in fxlowbit.LowbitConfig.__dataclass_fields__
    assert labels[6:] == (["lowbit sampling=True"] if sampling else [])
    for r in rows:
        assert "error" not in r and r["step_ms"] > 0 and r["saved_MB"] > 0, r
    assert rows[1]["saved_ratio"] > 2 and rows[3]["saved_ratio"] > 2  # the budget rows save
    summary = json.loads((dry / "summary.json").read_text())
    note = summary["rows"][1]["note"]
    assert (note is None) if sampling else ("not built yet" in note)
    medium = json.loads((dry / "gpt2_medium.json").read_text())["result"]["rows"]
    assert [r["label"] for r in medium] == ["inductor", "lowbit gemm=fp8", "lowbit gemm=int8"]


def test_profile_from_dry_run(dry, tmp_path):
    from fxlowbit import profile
    from fxlowbit.costmodel import bucket, load_profile
    from fxlowbit.profile_merge import from_device_check

    assert profile.main(["--from-device-check", str(dry), "--out", str(tmp_path) + os.sep]) == 0
    p = load_profile(tmp_path / "cpu.json")  # named after the device
    assert p.measured and p.kind == "cpu"
    assert p.meta["device_check"]["dry_run"] is True and "DRY RUN" in p.meta["note"]
    # the GEMM table's int8 figure of its smallest shape lands in that shape's bucket
    rows = json.loads((dry / "gemm.json").read_text())["result"]["rows"]
    int8 = [r for r in rows if r["provider"] == "int8"]
    m, n, k = int8[0]["shape"]
    same = [r["tflops"] for r in int8 if bucket(2 * r["shape"][0] * r["shape"][1] * r["shape"][2])
            == bucket(2 * m * n * k)]  # fmt: skip
    assert p.matmul_tflops["int8"][bucket(2 * m * n * k)] == pytest.approx(sorted(same)[len(same) // 2], 1e-3)
    # on a CPU the pack figures stay the profile's; asked for, the Triton kernels' fp32 rows replace them
    base = json.loads((dry / "profile.json").read_text())["result"]
    assert p.pack_gbps == {int(b): v for b, v in base["pack_gbps"].items()}
    t = from_device_check(dry, kernels="triton")
    krows = json.loads((dry / "pack_kernels.json").read_text())["result"]["rows"]
    pack4 = next(
        r for r in krows if r["op"] == "pack4" and r["provider"] == "triton" and "float32" in r["dtype"]
    )
    assert t.pack_gbps[4] == pytest.approx(4 * pack4["numel"] / (pack4["ms"] * 1e-3) / 1e9, rel=1e-3)
    assert t.meta["profile_run"]["pack_gbps"][4] == base["pack_gbps"]["4"]


def test_failures_timeouts_and_the_time_limit_do_not_stop_the_run(dc, tmp_path):
    def bench(name, code, timeout=30.0, min_s=0.0):
        return dc.Bench(name, name, ("-c", code, "{out}"), ("-c", code, "{out}"), timeout, min_s=min_s)

    write = "import json, sys; json.dump({'rows': [1]}, open(sys.argv[1], 'w'))"
    plan = [
        bench("fails", "import sys; print('boom: this benchmark broke'); sys.exit(3)"),
        bench("hangs", "import time; time.sleep(60)", timeout=2),
        bench("partial", write + "; import time; time.sleep(60)", timeout=3),
        bench("no_json", "pass"),
        bench("works", write),
        bench("too_late", write, min_s=1e6),
    ]
    env = {"device": "test", "torch": "-", "triton": "-", "commit": None}  # no probe: seconds saved
    summary = dc.run(str(tmp_path), dry=False, time_limit=120, plan=plan, env_info=env)
    status = {r["name"]: r["status"] for r in summary["rows"]}
    assert status == {
        "fails": "error: exit code 3",
        "hangs": "timeout: killed after 2 s",
        "partial": "timeout: killed after 3 s (partial JSON kept)",
        "no_json": "error: exit code 0 but no JSON written",
        "works": "ok",
        "too_late": status["too_late"],
    }
    assert status["too_late"].startswith("skipped: total time limit (") and status["too_late"].endswith(
        "of 120)"
    )
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["fails"]["error"] == "boom: this benchmark broke"
    assert rows["hangs"]["wall_s"] < 10  # killed, not waited for
    for name in status:
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert META_KEYS <= set(data["meta"]) and data["meta"]["status"] == status[name]
    assert json.loads((tmp_path / "partial.json").read_text())["result"] == {"rows": [1]}
    assert json.loads((tmp_path / "works.json").read_text())["result"] == {"rows": [1]}
    assert "| 2 | hangs | timeout: killed after 2 s |" in (tmp_path / "summary.md").read_text()
    # a rerun of one benchmark into the same folder keeps the others' results and shows them
    before = (tmp_path / "fails.json").read_text()
    again = dc.run(str(tmp_path), dry=False, time_limit=120, plan=plan, only={"works"}, env_info=env)
    status = {r["name"]: r["status"] for r in again["rows"]}
    assert status["works"] == "ok" and status["fails"].startswith("error: exit code 3 (earlier run, ")
    assert (tmp_path / "fails.json").read_text() == before


def test_only_rejects_unknown_names(dc, tmp_path):
    with pytest.raises(SystemExit):
        dc.main(["--out", str(tmp_path), "--only", "gemm,nonesuch"])


def test_device_slug():
    from fxlowbit.profile_merge import device_slug

    assert device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert device_slug("NVIDIA H200") == "h200"
    assert device_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert device_slug("NVIDIA GeForce RTX 4090") == "nvidia_geforce_rtx_4090"
    assert device_slug("cpu") == "cpu"
