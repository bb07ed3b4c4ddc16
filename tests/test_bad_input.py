"""Bad input (issue 15): every item ends as a ValueError naming the option, before any pass runs,
or as behaviour identical to the uncompressed run.

- options that used to pass validation (NaN/Inf budgets, float bit widths, a list or None for
  ``passes``, a profile that is not a path, a profile whose GEMM tables are empty or misspelt);
- ``bits`` with options only the planner reads (it used to override them silently);
- non-finite activations: NaN, +Inf and -Inf in one group come back as they went in, so gradients
  have the uncompressed run's NaN/Inf pattern (eager and Inductor inner compilers);
- float64 activations beyond fp32's range are kept exact (the quantizer computes in fp32);
- calibration probes leave no generated FX source behind.
"""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch

import fxlowbit
from fxlowbit import LowbitConfig
from fxlowbit.costmodel import load_profile

SHIPPED = load_profile("cpu").to_dict()


def _profile_file(tmp_path, **changes) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**SHIPPED, **changes}))
    return str(path)


# -- options --------------------------------------------------------------------------------------
BAD_OPTIONS = [
    ({"memory_budget": math.nan}, r"option memory_budget=nan is invalid"),
    ({"memory_budget": math.inf}, r"option memory_budget=inf is invalid"),
    ({"memory_budget": -math.inf}, r"option memory_budget=-inf is invalid"),
    ({"bits": 8.0}, r"option bits=8\.0 is invalid; valid values: \(None, 2, 4, 8\)"),
    ({"bits": True}, r"option bits=True is invalid"),
    ({"allowed_bits": (2.0,)}, r"option allowed_bits=\(2\.0,\) is invalid"),
    ({"allowed_bits": [4, 8.0]}, r"option allowed_bits=\[4, 8\.0\] is invalid"),
    ({"gemm_hadamard": 32.0}, r"option gemm_hadamard=32\.0 is invalid"),
    ({"max_variance_ratio": math.nan}, r"option max_variance_ratio=nan must be > 0"),
    ({"max_variance_ratio": True}, r"option max_variance_ratio=True must be > 0"),
    ({"passes": ["plan"]}, r"option passes=\['plan'\] is invalid; give a mapping of pass name -> bool"),
    ({"passes": None}, r"option passes=None is invalid; give a mapping"),
    ({"passes": {"plan": "no"}}, r"option passes=\{'plan': 'no'\} is invalid"),
    ({"profile": 123}, r"option profile=123 is invalid: expected a JSON path.*got int 123"),
    ({"profile": ""}, r"option profile='' is invalid"),
]


@pytest.mark.parametrize("options, match", BAD_OPTIONS, ids=lambda v: str(v)[:40])
def test_bad_option_values(options, match):
    with pytest.raises(ValueError, match=match):
        LowbitConfig.from_options(options)


BAD_TABLES = [
    ({}, r"matmul_tflops is empty"),
    ({"float32": {}}, r"matmul_tflops\['float32'\] must map some of the buckets"),
    ({"float32": {"huge": 1.0}}, r"matmul_tflops\['float32'\]: unknown bucket\(s\) \['huge'\]"),
    ({"float32": {"tiny": 0.1, "smal": 0.2}}, r"unknown bucket\(s\) \['smal'\]"),
    ({"float32": {"tiny": 0.0}}, r"TFLOP/s must be finite and > 0"),
    ({"float32": {"tiny": "fast"}}, r"TFLOP/s must be finite and > 0"),
    ({"float32": [1.0]}, r"must map some of the buckets"),
]


@pytest.mark.parametrize("table, match", BAD_TABLES, ids=lambda v: str(v)[:40])
def test_bad_profile_tables_fail_when_options_are_read(tmp_path, table, match):
    path = _profile_file(tmp_path, matmul_tflops=table)
    with pytest.raises(ValueError, match=match):
        load_profile(path)
    with pytest.raises(ValueError, match=r"option profile='.*profile\.json' is invalid: .*" + match):
        LowbitConfig.from_options({"profile": path})
    with pytest.raises(ValueError, match=r"option profile=\{.* is invalid: .*" + match):
        LowbitConfig.from_options({"profile": {**SHIPPED, "matmul_tflops": table}})


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"launch_us": math.nan}, r"launch_us must be >= 0"),
        ({"copy_gbps": math.inf}, r"copy_gbps must be > 0"),
        ({"copy_gbps": "10"}, r"copy_gbps must be > 0"),
        ({"pack_gbps": {"2": 1.0, "4": 1.0, "8": 1.0, "3": 1.0}}, r"pack_gbps needs positive figures"),
        ({"pack_gbps": [1.0, 2.0, 3.0]}, r"pack_gbps needs positive figures"),
        ({"unpack_gbps": {"2": None, "4": 1.0, "8": 1.0}}, r"unpack_gbps needs positive figures"),
        ({"kind": "tpu"}, r"kind must be 'cpu' or 'cuda'"),
        ({"measured": "yes"}, r"measured must be true or false"),
        ({"gemm_quant_gbps": {"int4": 1.0}}, r"gemm_quant_gbps takes positive figures"),
        ({"meta": []}, r"meta must be a mapping"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_profile_fields(tmp_path, changes, match):
    with pytest.raises(ValueError, match=r"option profile=.* is invalid: " + match):
        LowbitConfig.from_options({"profile": _profile_file(tmp_path, **changes)})


def test_profile_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(
        ValueError, match=r"option profile=.* is invalid: expected a JSON object of fields, got list"
    ):
        LowbitConfig.from_options({"profile": str(path)})


@pytest.mark.parametrize(
    "options, names",
    [
        ({"bits": 4, "memory_budget": 0.01}, ("bits=4", "memory_budget=0.01")),
        ({"bits": 4, "memory_budget": 4096}, ("bits=4", "memory_budget=4096")),
        ({"bits": 2, "mode": "memory"}, ("bits=2", "mode='memory'")),
        ({"bits": 8, "mode": "speed"}, ("bits=8", "mode='speed'")),
        ({"bits": 4, "allowed_bits": (2, 8)}, ("bits=4", "allowed_bits=(2, 8)")),
    ],
)
def test_bits_contradicting_planner_options(options, names):
    """``bits`` skips the planner: a budget, a mode or widths it excludes would be ignored (bits=4
    with memory_budget=0.01 stored 94 KB against a 4 KB budget)."""
    with pytest.raises(ValueError, match=r"options " + r" and ".join(map(re.escape, names)) + " contradict"):
        LowbitConfig.from_options(options)


def test_bits_with_consistent_options():
    for options in ({"bits": 4}, {"bits": 4, "mode": "balanced"}, {"bits": 4, "allowed_bits": (4, 8)}):
        assert LowbitConfig.from_options(options).bits == 4


@pytest.mark.parametrize(
    "options, match",
    [
        ({"passes": ["plan"]}, "option passes=['plan'] is invalid"),
        ({"passes": None}, "option passes=None is invalid"),
        ({"profile": 123}, "option profile=123 is invalid"),
        ({"profile": "EMPTY_TABLE"}, "profile.json' is invalid: matmul_tflops['float32'] must map"),
        ({"memory_budget": math.nan}, "option memory_budget=nan is invalid"),
        ({"bits": 4, "memory_budget": 0.01}, "options bits=4 and memory_budget=0.01 contradict"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_options_fail_at_the_first_call_before_any_pass(tmp_path, options, match):
    """Through torch.compile (Dynamo wraps the backend's ValueError), with no "pass failed" or
    "internal error" warning first (a bad profile used to warn twice, then raise a TypeError)."""
    if options.get("profile") == "EMPTY_TABLE":
        options = {"profile": _profile_file(tmp_path, matmul_tflops={"float32": {}})}
    model = torch.compile(torch.nn.Linear(4, 4), backend="lowbit", options={"inner": "eager", **options})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Exception) as info:
            model(torch.randn(2, 4, requires_grad=True))
    err: BaseException | None = info.value
    while err is not None and not isinstance(err, ValueError):
        err = getattr(err, "inner_exception", None) or err.__cause__
    assert isinstance(err, ValueError) and match in str(err), info.value
    assert not [w for w in caught if "fxlowbit" in str(w.message)], [str(w.message) for w in caught]
    assert fxlowbit.counters["fallback_internal_error"] == 0 and not fxlowbit.last_plans()


# -- non-finite activations -----------------------------------------------------------------------
class _Tiny(torch.nn.Module):
    """Leaky ReLUs keep -Inf (a ReLU would zero it): a single +Inf in the input makes a whole
    256-wide row of +Inf and -Inf, saved for the next layer's weight gradient."""

    def __init__(self, layers: int = 3):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(16, 256), torch.nn.Linear(256, 256)
        self.l3 = torch.nn.Linear(256, 4) if layers == 3 else None

    def forward(self, x):
        act = torch.nn.functional.leaky_relu
        h = act(self.l2(act(self.l1(x), 0.1)), 0.1)
        return h if self.l3 is None else self.l3(h)


def _poisoned_input(case: str, dtype) -> torch.Tensor:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    if case == "+inf":
        x[3, 5] = math.inf
    elif case == "+inf-inf":  # in one group of the input, and rows of mixed sign in every layer
        x[3, 5], x[3, 9] = math.inf, -math.inf
    elif case == "nan+inf-inf":
        x[2, 0], x[5, 3], x[5, 4] = math.nan, math.inf, -math.inf
    return x.to(dtype)


def _grads(options: dict, case: str, dtype, layers: int = 3) -> list[torch.Tensor]:
    torch._dynamo.reset()
    fxlowbit.reset()
    torch.manual_seed(0)
    model = _Tiny(layers).to(dtype)
    x = _poisoned_input(case, dtype).requires_grad_()
    out = torch.compile(model, backend="lowbit", options=options)(x)
    out.float().sum().backward()
    return [out.detach(), x.grad, *(p.grad for p in model.parameters())]


def _assert_same_pattern(ref: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(r), kind(g)), f"{i}: {kind.__name__} {kind(r).sum()} vs {kind(g).sum()}"
    # the check has teeth: the uncompressed weight gradients hold +Inf and -Inf (the former
    # quantizer decoded every non-finite value of a group holding two kinds as NaN)
    assert any(r.isposinf().any() for r in ref[2:]) and any(r.isneginf().any() for r in ref[2:])


UNCOMPRESSED = {"inner": "eager", "passes": {"plan": False}}
CASES = ["+inf", "+inf-inf", "nan+inf-inf"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_nonfinite_gradients_match_uncompressed_eager(case, dtype):
    ref = _grads(UNCOMPRESSED, case, dtype)
    # the planner without replays (which would rebuild these tensors exactly instead)
    for extra in ({"bits": 8}, {"bits": 4}, {"bits": 2}, {"memory_budget": 0.05, "recompute": False}):
        got = _grads({"inner": "eager", "seed": 0, "min_bytes": 0, **extra}, case, dtype)
        bits = extra.get("bits", 2)  # the planner picks 2 bits at this budget
        assert fxlowbit.counters[f"saved_quant{bits}"] >= 2, (extra, dict(fxlowbit.counters))
        _assert_same_pattern(ref, got)


@pytest.mark.parametrize(
    "case, dtype, extra",
    [
        ("nan+inf-inf", torch.float32, {"bits": 2}),
        # without replays, which would rebuild these tensors exactly (min-cut's pair among them)
        pytest.param(
            "+inf-inf", torch.bfloat16, {"memory_budget": 0.05, "recompute": False}, marks=pytest.mark.slow
        ),
    ],
    ids=["fp32-bits2", "bf16-planner"],
)
def test_nonfinite_gradients_match_uncompressed_inductor(case, dtype, extra):
    """The inline (traced) pack and decode, compiled by Inductor with the graph (two layers, for
    compile time: ~40 s each on a busy 2-core CPU; one case by default, the other with -m slow)."""
    ref = _grads(UNCOMPRESSED, case, dtype, layers=2)
    got = _grads({"seed": 0, "min_bytes": 0, **extra}, case, dtype, layers=2)
    assert fxlowbit.counters["saved_quant2"] >= 2, dict(fxlowbit.counters)
    _assert_same_pattern(ref, got)


# -- float64 --------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:fxlowbit. memory budget")  # 0.05 cannot be met with float64 kept
@pytest.mark.parametrize("scale", [1e100, 1e-60], ids=["1e100", "1e-60"])
@pytest.mark.parametrize(
    "extra",
    [{"bits": 4}, {"memory_budget": 0.05, "recompute": False}, {"memory_budget": 0.05}],
    ids=["bits4", "planner", "planner-replays"],
)
def test_float64_beyond_fp32_range_is_kept_exact(scale, extra):
    """Quantized through fp32, activations near 1e100 came back Inf (non-finite weight gradients)
    and near 1e-60 zero (an all-zero weight gradient). float64 tensors are kept, with a reason;
    exact masks still apply."""
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * scale

    def grads(options):
        torch._dynamo.reset()
        fxlowbit.reset()
        torch.manual_seed(0)
        model = _Tiny().double()
        with torch.no_grad():
            model.l1.bias.zero_()  # the first activations are then of the input's magnitude
        out = torch.compile(model, backend="lowbit", options=options)(x)
        out.sum().backward()
        return [p.grad for p in model.parameters()]

    ref = grads(UNCOMPRESSED)
    got = grads({"inner": "eager", "seed": 0, "min_bytes": 0, **extra})
    w2 = ref[2]  # l2.weight: (grad of l2's output)^T x leaky_relu(l1(x)), of the scale's magnitude
    assert w2.isfinite().all() and (w2 != 0).any() and 1e-3 < w2.abs().max() / scale < 1e3
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=0.0)
    plan = fxlowbit.last_plans()[-1]
    assert not [d for d in plan.decisions if d.form == "quant"]
    if extra.get("recompute", True) and "bits" not in extra:  # replays rebuild what they can, exactly
        assert plan.count("recompute") > 0
        return
    kept = [d for d in plan.decisions if d.form == "keep" and "float64" in d.reason]
    assert len(kept) >= 2
    assert fxlowbit.counters["saved_mask"] == 2  # the leaky ReLUs' masks: exact, still packed


# -- calibration probes ---------------------------------------------------------------------------
def test_probes_leave_no_generated_source_behind():
    """Each probe copies the backward (a LayerNorm input's normalised form, a ReLU output whose
    comparisons stay exact) and recompiles the copies; fx kept every copy's Python source in its
    loader cache and a linecache entry for the life of the process (~105 KB per probe on TinyGPT)."""
    import linecache

    from torch.fx.graph_module import _loader

    from fxlowbit import calibrate

    from ._util import through_partitioner

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.ReLU(), torch.nn.Linear(64, 64)
    )
    partitioner, args = through_partitioner(
        model, lambda out: out.pow(2).sum(), torch.randn(64, 64), min_bytes=0
    )
    pristine, names = partitioner.pristine, partitioner.quantizable
    calibrate.probe_sensitivity(pristine, args, names, 256, seed=0)  # warm-up
    sources, lines, compiled = dict(_loader.eval_cache), set(linecache.cache), _loader.next_id
    for seed in range(1, 4):
        probe = calibrate.probe_sensitivity(pristine, args, names, 256, seed=seed)
        assert len(probe.sensitivity) == len(names) >= 2
    assert _loader.next_id >= compiled + 3 * 2  # the probes did compile copies (two per probe at least)
    assert _loader.eval_cache == sources
    assert set(linecache.cache) <= lines
