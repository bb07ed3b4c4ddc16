"""The cost model on plain numbers: exact stored bytes per form, the variance law of stochastic
rounding (checked against the reference quantizer), profile time functions and loading errors."""

import dataclasses
import json
import math

import pytest
import sympy
import torch

from fxlowbit import costmodel as cm
from fxlowbit.codegen.kernels.quant import dequantize_unpack_reference, quantize_pack_reference


@pytest.fixture(scope="module")
def cpu():
    return cm.load_profile("cpu")


# -- memory ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "form,numel,bits,group,itemsize,masks,expected",
    [
        ("keep", 1000, 0, 256, 4, 1, 4000),
        ("keep", 1000, 0, 256, 2, 1, 2000),
        ("recompute", 1000, 0, 256, 4, 1, 0),
        ("mask", 9, 1, 1, 1, 1, 2),  # 9 bits round up to 2 bytes
        ("mask", 16, 1, 1, 1, 3, 6),
        ("cmp_mask", 17, 1, 1, 4, 2, 6),
        ("quant", 1000, 8, 256, 4, 1, 4 * (256 + 8)),  # 4 groups (last one padded)
        ("quant", 1000, 4, 256, 4, 1, 4 * (128 + 8)),
        ("quant", 1000, 2, 256, 2, 1, 4 * (64 + 8)),  # codes do not depend on the input dtype
        ("quant", 7, 2, 8, 4, 1, 2 + 8),
    ],
)
def test_stored_bytes_per_form(form, numel, bits, group, itemsize, masks, expected):
    got = cm.stored_bytes(form, sympy.Integer(numel), bits, group, itemsize, masks)
    assert got == expected


def test_stored_bytes_are_symbolic_and_recompute_is_free():
    s0 = sympy.Symbol("s0", positive=True, integer=True)
    numel = 512 * s0
    assert cm.stored_bytes(cm.RECOMPUTE, numel, 0, 256, 4) == 0
    quant = cm.stored_bytes(cm.QUANT, numel, 4, 256, 4)
    for batch in (1, 3, 64):
        assert quant.subs({s0: batch}) == cm.stored_bytes(cm.QUANT, sympy.Integer(512 * batch), 4, 256, 4)
        assert cm.stored_bytes(cm.KEEP, numel, 0, 256, 4).subs({s0: batch}) == 2048 * batch


def test_stored_bytes_unknown_form_raises():
    with pytest.raises(ValueError, match="unknown form 'sparse'"):
        cm.stored_bytes("sparse", sympy.Integer(8), 1, 8, 4)


# -- variance -------------------------------------------------------------------------------------
def test_quant_variance_scales_with_levels_squared():
    for s in (1e-3, 1.0, 42.0):
        v = {b: cm.quant_variance(s, b) for b in (2, 4, 8)}
        assert v[2] == pytest.approx(s / 9)
        assert v[2] / v[4] == pytest.approx(225 / 9)
        assert v[4] / v[8] == pytest.approx(255**2 / 15**2)
    assert cm.quant_variance(3.0, 4) == pytest.approx(3 * cm.quant_variance(1.0, 4))


def test_sr_variance_bound_formula():
    assert cm.sr_variance_bound(2.0, 2) == pytest.approx(4 / (4 * 9))
    assert cm.sr_variance_bound(1.0, 4) / cm.sr_variance_bound(1.0, 8) == pytest.approx(255**2 / 15**2)


def _rounding_variance(bits: int, position: float, value_range: float = 3.0, samples: int = 8192):
    """Empirical variance of the decoded value of one element at ``position`` (a fraction of a
    level above level 1) in groups spanning ``value_range``, one sample per group."""
    levels = 2**bits - 1
    scale = value_range / levels
    x = -1.0 + (1 + position) * scale
    group = torch.tensor([-1.0, -1.0 + value_range, x, x, x, x, x, x])  # (lo, hi, 6 probes)
    data = group.repeat(samples)
    gen = torch.Generator().manual_seed(bits)
    noise = torch.rand(samples, 8, generator=gen)
    codes, meta = quantize_pack_reference(data, bits, 8, noise)
    out = dequantize_unpack_reference(codes, meta, bits, 8, data.shape, data.dtype).view(samples, 8)
    probes = out[:, 2:].double().flatten()
    assert float(probes.mean()) == pytest.approx(x, abs=scale * 0.02)  # unbiased
    return float(probes.var())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sr_variance_bound_matches_worst_position(bits):
    bound = cm.sr_variance_bound(3.0, bits)
    worst = _rounding_variance(bits, 0.5)
    assert worst == pytest.approx(bound, rel=0.1)
    # every other position rounds with less variance: p (1 - p) <= 1/4
    for p in (0.1, 0.3, 0.8):
        v = _rounding_variance(bits, p)
        assert v == pytest.approx(p * (1 - p) * (3.0 / (2**bits - 1)) ** 2, rel=0.1)
        assert v < bound


def test_prior_sensitivity_is_4bit_prior_ratio_over_the_whole_graph():
    total = 10_000.0
    parts = [1_000, 2_500, 6_500]
    ratio = sum(cm.quant_variance(cm.prior_sensitivity(n, total), 4) for n in parts)
    assert ratio == pytest.approx(cm.PRIOR_RATIO_4BIT)
    assert cm.prior_sensitivity(10, 0) > 0  # no division by zero on empty graphs


# -- the hardware profile -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flops,name",
    [(0, "tiny"), (2e6 - 1, "tiny"), (2e6, "small"), (2e8 - 1, "small"), (2e8, "medium"), (1e30, "large")],
)
def test_bucket(flops, name):
    assert cm.bucket(flops) == name


@pytest.mark.parametrize("name", ["cpu", "h100"])
def test_time_functions_are_monotone_in_bytes(name):
    p = cm.load_profile(name)
    sizes = [0, 1, 1024, 10**6, 10**9]
    for fn in (
        p.pointwise_time,
        p.mask_time,
        *(lambda n, b=b: p.pack_time(n, b) for b in (2, 4, 8)),
        *(lambda n, b=b: p.unpack_time(n, b) for b in (2, 4, 8)),
    ):
        times = [fn(n) for n in sizes]
        assert times[0] >= 0
        assert all(a < b for a, b in zip(times, times[1:], strict=False)), times


@pytest.mark.parametrize("name", ["cpu", "h100"])
def test_matmul_time_is_monotone_in_flops_within_a_bucket(name):
    p = cm.load_profile(name)
    for lo, hi in ((1, 2e6 - 1), (2e6, 2e8 - 1), (2e8, 2e10 - 1), (2e10, 1e15)):
        for dtype in ("float32", "bfloat16"):
            flops = [lo + (hi - lo) * f for f in (0.0, 0.1, 0.5, 1.0)]
            times = [p.matmul_time(f, dtype) for f in flops]
            # non-decreasing: launch-bound GEMMs (tiny to small on a GPU) all take the same time
            assert all(a <= b for a, b in zip(times, times[1:], strict=False)), (dtype, times)
            assert times[0] < times[-1] or lo < 2e8, (dtype, times)


def test_matmul_time_is_monotone_across_bucket_edges(cpu):
    assert cpu.matmul_time(2e6 - 1) <= cpu.matmul_time(2e6)


def test_matmul_time_dtype_fallback(cpu):
    flops = 2e9  # the medium bucket's centre: its measured throughput exactly
    assert cpu.matmul_time(flops, "bfloat16") == pytest.approx(
        flops / (cpu.matmul_tflops["bfloat16"]["medium"] * 1e12) + cpu.launch_us * 1e-6
    )
    assert cpu.matmul_time(flops, "float16") == cpu.matmul_time(flops, "float32")  # not profiled


def test_time_formulas(cpu):
    n = 10**8
    assert cpu.pack_time(n, 4) == pytest.approx(n / (cpu.pack_gbps[4] * 1e9) + cpu.launch_us * 1e-6)
    assert cpu.unpack_time(n, 2) == pytest.approx(n / (cpu.unpack_gbps[2] * 1e9) + cpu.launch_us * 1e-6)
    assert cpu.mask_time(0) == pytest.approx(2 * cpu.launch_us * 1e-6)


# -- loading --------------------------------------------------------------------------------------
def test_shipped_profiles_load_and_round_trip(tmp_path):
    for name in ("cpu", "h100"):
        p = cm.load_profile(name)
        assert p.kind == ("cpu" if name == "cpu" else "cuda")
        assert cm.load_profile(p) is p
        assert cm.load_profile(p.to_dict()) == p
        p.save(tmp_path / f"{name}.json")
        assert cm.load_profile(tmp_path / f"{name}.json") == p
        assert cm.load_profile(str(tmp_path / f"{name}.json")) == p
    assert cm.load_profile("h100").measured  # measured on a lent H100 (see its meta)
    expected = "h100" if torch.cuda.is_available() else "cpu"
    assert cm.load_profile(None) == cm.load_profile(expected)


def _cpu_dict():
    return cm.load_profile("cpu").to_dict()


@pytest.mark.parametrize(
    "change,match",
    [
        ({"copy_gbps": 0}, "copy_gbps must be > 0"),
        ({"pointwise_gbps": -1.0}, "pointwise_gbps must be > 0"),
        ({"mask_gbps": math.nan}, "mask_gbps must be > 0"),
        ({"pack_gbps": {"4": 1.0, "8": 1.0}}, "pack_gbps needs positive figures for bits 2, 4, 8"),
        ({"unpack_gbps": {"2": 1.0, "4": 0.0, "8": 1.0}}, "unpack_gbps needs positive figures"),
        ({"matmul_tflops": {}}, "matmul_tflops is empty"),
        ({"launch_us": -1.0}, "launch_us must be >= 0"),
    ],
)
def test_bad_profile_values_raise(change, match):
    with pytest.raises(ValueError, match=match):
        cm.load_profile({**_cpu_dict(), **change})


def test_load_profile_errors(tmp_path):
    with pytest.raises(ValueError, match=r"profile 'nope' is neither a file nor a shipped profile \[.*'cpu'"):
        cm.load_profile("nope")
    with pytest.raises(ValueError, match="is neither a file"):
        cm.load_profile(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        cm.load_profile(bad)
    partial = tmp_path / "partial.json"
    d = _cpu_dict()
    del d["copy_gbps"], d["launch_us"]
    partial.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"missing field\(s\) \['copy_gbps', 'launch_us'\]"):
        cm.load_profile(partial)


def test_meta_is_optional_and_unknown_keys_are_ignored():
    d = _cpu_dict()
    del d["meta"]
    d["future_field"] = 1
    p = cm.load_profile(d)
    assert p.meta == {} and dataclasses.replace(p, meta=cm.load_profile("cpu").meta) == cm.load_profile("cpu")
