"""The low-bit gradient GEMMs' noise, inside the variance limit (fxlowbit/adaptive.py).

An int8 grad-input GEMM rounds the output gradient stochastically: unbiased, but it adds variance,
and ``max_variance_ratio`` is one limit for everything a plan adds. The graph is replayed on the
first batch and at each probe with those GEMMs as planned and plain; the difference is their
noise, in the unit compression is measured in. Counted in the limit (the compression plans with
what is left), and over the limit on its own the GEMMs turn plain (a recompile, said in one
line). These tests plan with "auto" from a profile where int8 pays (this machine's figures, as
``fxlowbit-profile --save`` keeps them), the default path of a profiled machine.

Measured (2026-12-07, the Llama of issue 18 with this machine's profile: 29 linears int8 in the
forward and grad-input GEMMs): 2.1e-4 of the gradient power on the first batch, 3.4e-5 of the
minibatch variance at the step-10 probe, against the 0.05 limit.
"""

import logging

import pytest
import torch

import fxlowbit
from fxlowbit.backend import counters
from fxlowbit.state import STATE

from ._util import AMD_T1, machine_profile

EAGER = {"inner": "eager"}


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))


def _grads(model, options: dict, steps: int = 1, x: torch.Tensor | None = None) -> list[torch.Tensor]:
    torch.manual_seed(1)
    xs = [torch.randn(1024, 256) for _ in range(steps)] if x is None else [x] * steps
    f = torch.compile(model, backend="lowbit", options=options)
    for x in xs:
        model.zero_grad(set_to_none=True)
        f(x).pow(2).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def _profile() -> dict:
    return machine_profile(torch.get_num_threads(), **AMD_T1)


def test_the_noise_is_measured_small_and_counted_in_the_limit():
    """Defaults (the planner, its probes) with int8 picked by the cost model: the first batch and
    the step-10 check measure a small positive noise (one draw of the rounding, so > 0 proves
    the replays differ), the GEMMs stay low-bit, and the report says what they added."""
    fxlowbit.reset()
    _grads(_mlp(), {**EAGER, "profile": _profile()}, steps=11)
    assert counters["lowbit_gemm_grad_input_int8"] == 2 and counters["gemm_noise_fallbacks"] == 0
    checks = STATE.gemm_noise
    assert counters["gemm_noise_checks"] == len(checks) == 2, checks
    assert [c["unit"] for c in checks][0] == "gradient power"
    assert all(0 < c["ratio"] < 0.01 and not c["plain"] for c in checks), checks
    report = fxlowbit.last_report()
    assert "the int8/fp8 gradient GEMMs of 2 linear(s) added" in report.note
    assert "counted in the limit" in report.note


def test_over_the_limit_the_gradient_gemms_turn_plain_before_the_first_step(caplog):
    """With a limit below their noise, the first batch's check compiles the graph again with the
    gradient GEMMs plain (the forward GEMMs stay int8) before any step trains on them, and says so
    in one warning: the gradients are then those of ``gemm=("int8", "off", "off")`` exactly, which
    the int8 grad-input GEMMs' rounding would not give."""
    x = torch.randn(1024, 256)
    ref = _grads(_mlp(), {**EAGER, "profile": _profile(), "gemm": ("int8", "off", "off")}, x=x)
    noisy = _grads(_mlp(), {**EAGER, "profile": _profile(), "calibrate_every": 0}, x=x)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert 1e-4 < rel(noisy[0], ref[0]) < 0.05  # the first weight's gradient: after int8 SR dx
    fxlowbit.reset()
    with caplog.at_level(logging.WARNING, logger="fxlowbit.backend"):
        got = _grads(_mlp(), {**EAGER, "profile": _profile(), "max_variance_ratio": 1e-7}, x=x)
    warned = [r.getMessage() for r in caplog.records if "gradient GEMMs" in r.getMessage()]
    assert len(warned) == 1 and "they run plain from now on" in warned[0], warned
    assert counters["gemm_noise_fallbacks"] == 1 and counters["plan_variants"] == 1
    assert max(rel(a, b) for a, b in zip(got, ref, strict=True)) < 1e-6
    assert "turned plain" in fxlowbit.last_report().note


@pytest.mark.parametrize("gemms", [True, False])
def test_exact_replays_run_the_gradient_gemms_plain_unless_asked(gemms):
    """``sampling_state.exact()`` (the probes' replays) runs the low-bit linears' gradient GEMMs
    plain; ``exact(gemms=False)`` as planned, int8 with stochastic rounding."""
    from fxlowbit.codegen.kernels import sampling_state

    torch.manual_seed(0)
    x, w, g = torch.randn(64, 128), torch.randn(32, 128), torch.randn(64, 32)
    op = torch.ops.fxlowbit.lowbit_linear_backward
    empty = torch.empty(0)
    with sampling_state.exact(gemms=gemms):
        dx, dw, _ = op(g, x, empty, empty, w, "fp32", "int8", "fp32", 0, 0, True, True, True)
    exact = g @ w
    torch.testing.assert_close(dw, g.t() @ x, rtol=1e-5, atol=1e-5)
    if gemms:
        torch.testing.assert_close(dx, exact, rtol=1e-5, atol=1e-5)
    else:
        err = (dx - exact).norm() / exact.norm()
        assert 1e-4 < err < 0.05, err  # int8 rows: ~1% relative error, never exact
