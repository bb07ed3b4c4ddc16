"""The hardware profile: schema round trip, shipped profiles, clear errors on bad files, and the
profiling script (``--quick``: small sizes, no compile; ~5 s here). Timings are only checked to be
positive: CI machines are shared and noisy."""

import json
import subprocess
import sys

import pytest
import torch

from fxlowbit.costmodel import BUCKETS, HardwareProfile, bucket, load_profile
from fxlowbit.profile import GEMMS, format_table, measure, parse_args

from ._util import AMD_T1, machine_profile

BUCKET_NAMES = [name for name, _ in BUCKETS]


def _profile_dict(**changes) -> dict:
    d = {
        "device": "cpu",
        "kind": "cpu",
        "measured": True,
        "copy_gbps": 10.0,
        "pointwise_gbps": 8.0,
        "pack_gbps": {"2": 1.0, "4": 1.5, "8": 2.0},
        "unpack_gbps": {"2": 3.0, "4": 3.5, "8": 4.0},
        "mask_gbps": 2.0,
        "matmul_tflops": {"float32": {"tiny": 0.01, "small": 0.1, "medium": 0.3, "large": 0.4}},
        "launch_us": 3.0,
        "meta": {"date": "2026-01-01", "threads": 2},
    }
    d.update(changes)
    return d


def _check_positive(p: HardwareProfile) -> None:
    figures = [p.copy_gbps, p.pointwise_gbps, p.mask_gbps, p.launch_us]
    figures += [*p.pack_gbps.values(), *p.unpack_gbps.values()]
    figures += [v for table in p.matmul_tflops.values() for v in table.values()]
    figures += list(p.gemm_quant_gbps.values())
    assert all(v > 0 for v in figures), p


@pytest.mark.parametrize("kind", sorted(GEMMS))
def test_gemm_shapes_fall_in_their_buckets(kind):
    assert list(GEMMS[kind]) == BUCKET_NAMES
    for name, (m, n, k) in GEMMS[kind].items():
        assert bucket(2 * m * n * k) == name


def test_round_trip(tmp_path):
    p = HardwareProfile.from_dict(_profile_dict())
    assert p.pack_gbps == {2: 1.0, 4: 1.5, 8: 2.0}  # JSON's string keys come back as ints
    assert HardwareProfile.from_dict(p.to_dict()) == p
    assert HardwareProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    path = tmp_path / "p.json"
    p.save(path)
    assert load_profile(path) == p
    assert load_profile(str(path)) == p
    assert load_profile(p.to_dict()) == p
    assert load_profile(p) is p


@pytest.mark.parametrize("name", ["cpu", "h100"])
def test_shipped_profiles_load(name):
    p = load_profile(name)
    _check_positive(p)
    assert p.meta["date"]
    for dtype in ("float32", "bfloat16"):
        assert sorted(p.matmul_tflops[dtype]) == sorted(BUCKET_NAMES)


def test_shipped_profiles_are_measured():
    cpu, h100 = load_profile("cpu"), load_profile("h100")
    assert (cpu.kind, cpu.measured) == ("cpu", True)
    assert (h100.kind, h100.measured) == ("cuda", True)
    for p in (cpu, h100):
        assert {"torch", "threads", "machine", "sizes", "command"} <= set(p.meta)
    assert "H100" in h100.device and h100.meta["torch"].endswith("cu130")
    assert {"float16", "int8", "float8_e4m3fn"} <= set(h100.matmul_tflops)
    # GEMMs that fill the GPU are faster there, and bf16 beats fp32 on its tensor cores (tiny
    # GEMMs are launch-bound on a GPU: measured slower than on the CPU, which the model keeps)
    for name in ("medium", "large"):
        assert h100.matmul_tflops["float32"][name] > cpu.matmul_tflops["float32"][name]
        assert h100.matmul_tflops["bfloat16"][name] > h100.matmul_tflops["float32"][name]
    assert load_profile(None).kind == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"copy_gbps": None}, r"missing field\(s\) \['copy_gbps'\]"),
        ({"matmul_tflops": None, "launch_us": None}, r"missing field\(s\) \['launch_us', 'matmul_tflops'\]"),
        ({"copy_gbps": 0.0}, "copy_gbps must be > 0"),
        ({"mask_gbps": -1.0}, "mask_gbps must be > 0"),
        ({"pack_gbps": {"2": 1.0, "4": 1.0}}, "pack_gbps needs positive figures for bits 2, 4, 8"),
        ({"unpack_gbps": {"2": 1.0, "4": 0.0, "8": 1.0}}, "unpack_gbps needs positive figures"),
        ({"matmul_tflops": {}}, "matmul_tflops is empty"),
        ({"launch_us": -1.0}, "launch_us must be >= 0"),
    ],
)
def test_bad_profile_file(tmp_path, changes, match):
    d = {k: v for k, v in _profile_dict(**changes).items() if v is not None}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        load_profile(path)


def test_not_json_and_unknown_name(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"copy_gbps": 10,')
    with pytest.raises(ValueError, match="broken.json.* is not valid JSON"):
        load_profile(path)
    with pytest.raises(ValueError, match=r"'tpu9' is neither a file nor a shipped profile \['cpu', 'h100'"):
        load_profile("tpu9")
    with pytest.raises(ValueError, match="neither a file"):
        load_profile(tmp_path / "missing.json")


def test_measure_quick():
    threads = torch.get_num_threads()
    p = measure("cpu", quick=True, threads=1, progress=False)
    assert torch.get_num_threads() == threads  # restored
    assert (p.kind, p.device, p.measured) == ("cpu", "cpu", True)
    _check_positive(p)
    assert sorted(p.pack_gbps) == sorted(p.unpack_gbps) == [2, 4, 8]
    assert set(p.matmul_tflops) == {"float32", "bfloat16", "int8"}  # int8: fxlowbit's int8_mm
    assert sorted(p.gemm_quant_gbps) == ["fp8", "fp8_sr", "int8", "int8_sr"]
    assert all(v > 0 for v in p.gemm_quant_gbps.values())
    assert all(sorted(t) == sorted(BUCKET_NAMES) for t in p.matmul_tflops.values())
    assert p.meta["threads"] == 1 and p.meta["quick"] is True and p.meta["compiled"] is False
    assert p.meta["sizes"]["matmul"] == {k: list(v) for k, v in GEMMS["cpu"].items()}
    assert {"torch", "triton", "python", "date", "machine", "command", "mask_input"} <= set(p.meta)
    assert HardwareProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    table = format_table(p)
    assert all(len(line) <= 100 for line in table.splitlines())


def test_measure_rejects_missing_device():
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        measure("mps", quick=True, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            measure("cuda", quick=True, progress=False)


def test_cli_arguments():
    with pytest.raises(SystemExit):
        parse_args([])  # --out or --save is required
    for wrong in (["--save", "--quick"], ["--save", "--from-device-check", "d"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)  # the defaults' profile is measured in full
    assert parse_args(["--save"]).save and parse_args(["--save"]).out is None
    args = parse_args(["--out", "p.json", "--device", "cpu", "--quick", "--threads", "3", "--no-compile"])
    got = (args.out, args.device, args.quick, args.threads, args.compile)
    assert got == ("p.json", "cpu", True, 3, False)
    assert parse_args(["--out", "p.json"]).compile is None  # decided by --quick


def test_cli_quick(tmp_path):
    out = tmp_path / "p.json"
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "fxlowbit.profile", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    p = load_profile(out)
    _check_positive(p)
    assert p.meta["threads"] == 1 and "--quick" in p.meta["command"]
    lines = proc.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines)
    rows = {ln.split("|")[1].strip() for ln in lines if ln.startswith("|")}
    assert {"figure", "copy", "pointwise", "pack 4-bit / unpack", "matmul TFLOP/s", "float32"} <= rows
    assert str(out) in proc.stdout


def test_the_pack_figure_times_the_kernel_the_backend_calls(monkeypatch):
    """The CPU pack figure is the compiled family ``fxlowbit::quantize_pack`` calls at default
    options (not a Dynamo compile of the traceable quantizer, which the backend no longer runs);
    without ``compile`` it is the eager reference, and no family compiles."""
    import dataclasses

    from fxlowbit import profile_bench as bench
    from fxlowbit.codegen.kernels import quant_cpu

    monkeypatch.setattr(quant_cpu, "BACKGROUND", False)
    monkeypatch.setattr(quant_cpu, "IN_PROCESS", True)
    b = bench.Bench(torch.device("cpu"), {"quant": 1 << 12}, bench.timer(lambda: None, 0.01), compile=True)
    compiled = quant_cpu.counters["compiled"]
    pack, unpack = bench.quant_gbps(b, 8)
    assert pack > 0 and unpack > 0
    assert quant_cpu.counters["compiled"] > compiled  # the timed calls ran the compiled kernel
    compiled = quant_cpu.counters["compiled"]
    pack, unpack = bench.quant_gbps(dataclasses.replace(b, compile=False), 8)
    assert pack > 0 and unpack > 0
    assert quant_cpu.counters["compiled"] == compiled


def _with_machine(cpu_model, threads) -> dict:
    d = _profile_dict()
    d["meta"] = {"threads": threads, "machine": {"cpu_model": cpu_model, "gpu": None}}
    return d


def test_a_profile_of_another_machine_is_named_in_the_report_and_logged_once(caplog):
    """Est. times are the profile's machine's: explain() says so in one line when the profile was
    measured on another CPU model or at another thread count, and the backend logs it once (INFO);
    this machine's own profile, and a hand-made one with no machine record, say nothing."""
    import logging

    import fxlowbit
    from fxlowbit.hardware import _this_cpu, machine_mismatch

    here, n = _this_cpu(), torch.get_num_threads()
    assert machine_mismatch(HardwareProfile.from_dict(_with_machine(here, n))) is None
    assert machine_mismatch(HardwareProfile.from_dict(_profile_dict(meta={}))) is None
    other = machine_mismatch(HardwareProfile.from_dict(_with_machine("Some Other CPU", n)))
    assert other is not None and "Some Other CPU" in other and f"--threads {n}" in other
    threads = machine_mismatch(HardwareProfile.from_dict(_with_machine(here, n + 1)))
    assert threads is not None and f"at {n + 1} thread(s)" in threads

    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    x = torch.randn(128, 64)
    fxlowbit.reset()
    with caplog.at_level(logging.INFO, logger="fxlowbit.backend"):
        report = fxlowbit.explain(
            mlp, x, inner="eager", memory_budget=0.2, profile=_with_machine("Some Other CPU", n)
        )
        fxlowbit.explain(mlp, x, inner="eager", memory_budget=0.2, profile=_with_machine("Some Other CPU", n))
    assert "time estimates come from a profile of Some Other CPU" in report.note
    assert "profile of Some Other CPU" in str(report)
    logged = [r for r in caplog.records if "time estimates come from a profile" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO
    fxlowbit.reset()
    report = fxlowbit.explain(mlp, x, inner="eager", memory_budget=0.2, profile=_with_machine(here, n))
    assert "time estimates" not in report.note


def test_a_saved_profile_of_this_machine_is_what_the_defaults_plan_with(tmp_path, monkeypatch):
    """``fxlowbit-profile --save`` keeps the profile where ``profile=None`` finds it, one file per
    CPU model and thread count: the default options then plan with it (here: INT8 GEMMs, which the
    shipped profile does not pick for these shapes), the report names it, and no machine-mismatch
    line is left; at another thread count, or once removed, the shipped profile is back."""
    import fxlowbit
    from fxlowbit import hardware
    from fxlowbit import profile as cli
    from fxlowbit.backend import counters

    monkeypatch.setenv(hardware.PROFILE_DIR_ENV, str(tmp_path))
    n = torch.get_num_threads()
    path = hardware.saved_profile_path()
    assert path.parent == tmp_path and path.name.startswith("cpu-") and path.name.endswith(f"-{n}t.json")
    assert load_profile(None) is load_profile("cpu") and "shipped 'cpu'" in hardware.default_source()

    # the CLI's --save, its measurement replaced by these figures (a full one takes a minute)
    measured = HardwareProfile.from_dict(machine_profile(n, **AMD_T1))
    monkeypatch.setattr(cli, "measure", lambda *a, **k: measured)
    assert cli.main(["--save", "--threads", str(n), "--no-progress"]) == 0
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))
    saved = load_profile(None)
    assert saved.matmul_tflops["int8"]["small"] == 0.6712 and str(path) in hardware.default_source()

    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    x = torch.randn(1024, 256)
    report = fxlowbit.explain(mlp, x)
    assert counters["lowbit_gemm"] == 2, report.to_text(width=200)  # both linears, int8/int8/fp32
    assert "int8/int8/fp32" in report.to_text(width=400)
    assert f"this machine's profile, saved at {path}" in report.note
    assert "time estimates come from a profile" not in report.note

    path.rename(tmp_path / "elsewhere.json")  # gone: the shipped profile, which keeps fp32 here
    fxlowbit.reset()
    report = fxlowbit.explain(mlp, x)
    assert counters["lowbit_gemm"] == 0 and "shipped 'cpu'" in report.note
    hardware.saved_profile_path(threads=n + 1).write_text(json.dumps(machine_profile(n + 1, **AMD_T1)))
    assert load_profile(None) is load_profile("cpu")  # another thread count's figures are not these
