"""The backend as users meet it: registration, counters, inference, seeds, dynamic shapes,
fallbacks (one warning naming the op, never a failure unless strict)."""

import subprocess
import sys
import warnings
from importlib.metadata import entry_points

import pytest
import torch

import fxlowbit
from fxlowbit import planner
from fxlowbit.examples import MLP, sqnr_db

from ._util import UNCOMPRESSED, make, model_graphs, step

# mincut off: these tests follow the rounding (noise, seeds, quantized forms); with it, the small
# models' plans are min-cut's exact re-partition (tests/test_mincut_choice.py)
EAGER = {"inner": "eager", "seed": 0, "mincut": False}


def test_entry_point_is_declared():
    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("lowbit") == "fxlowbit.backend:lowbit"


def test_backend_works_without_importing_fxlowbit():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))\n"
        "out = torch.compile(m, backend='lowbit', options={'inner': 'eager'})(torch.randn(256, 8)).sum()\n"
        "out.backward()\n"
        "assert 'fxlowbit' in sys.modules  # loaded through the entry point\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_counters_for_mlp_including_zeros():
    model, inputs, loss_fn = make("mlp")
    step(model, inputs, loss_fn, options={**EAGER, "bits": 4})
    c = fxlowbit.counters
    # MLP: Linear-ReLU-Dropout-Linear-GELU-Linear-ReLU-Linear. Dropout and first ReLU masks are bool
    # saved tensors; the second ReLU output feeds a matmul and a comparison (4 bits + 1-bit mask).
    assert c["graphs_rewritten"] == 1
    assert c["saved_quant4"] == 4
    assert c["saved_mask"] == 2
    assert c["saved_cmp_mask"] == 1
    assert c["fallback_internal_error"] == 0
    assert c["saved_bytes_after"] < c["saved_bytes_before"]


def test_plan_is_inspectable_and_json():
    model, inputs, loss_fn = make("mlp")
    step(model, inputs, loss_fn, options=EAGER)
    (plan,) = fxlowbit.last_plans()[-1:]
    forms = {d.form for d in plan.decisions}
    assert {"keep", "quant"} <= forms and forms & {"mask", "recompute"}  # ReLU masks: stored or replayed
    assert all(d.reason for d in plan.decisions)
    assert "total saved bytes" in str(plan)
    assert '"form": "quant"' in plan.to_json()
    # parameters are saved for the backward but never compressed
    assert all(d.form == "keep" for d in plan.decisions if d.producer == "placeholder")


def test_inference_compiles_without_compressing():
    model = MLP(hidden=128).eval()
    x = torch.randn(16, 64)
    compiled = torch.compile(model, backend="lowbit", options=EAGER)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert fxlowbit.counters["graphs_rewritten"] == 0


def test_seed_makes_runs_reproducible():
    model, inputs, loss_fn = make("mlp")
    _, g1, _ = step(model, inputs, loss_fn, options={**EAGER, "seed": 123})
    _, g2, _ = step(model, inputs, loss_fn, options={**EAGER, "seed": 123})
    _, g3, _ = step(model, inputs, loss_fn, options={**EAGER, "seed": 124})
    assert torch.equal(g1, g2)
    assert not torch.equal(g1, g3)


def test_successive_steps_draw_fresh_noise():
    model, inputs, loss_fn = make("mlp")
    compiled = torch.compile(model, backend="lowbit", options=EAGER)
    grads = []
    for _ in range(2):
        model.zero_grad()
        torch.manual_seed(1)
        loss_fn(compiled(*inputs)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert not torch.equal(grads[0], grads[1])


def test_dynamic_shapes_compile_once():
    fxlowbit.reset()  # no CPU kernel family yet: those this test compiles are counted below
    torch._dynamo.utils.counters.clear()
    model = MLP(hidden=256)
    compiled = torch.compile(model, backend="lowbit", options=EAGER, dynamic=True)
    for batch in (48, 96, 160):  # none equal to a feature size (Dynamo duck-sizes equal sizes)
        model.zero_grad()
        compiled(torch.randn(batch, 64)).square().mean().backward()
        assert all(p.grad.isfinite().all() for p in model.parameters())
    assert model_graphs() == 1
    assert fxlowbit.counters["graphs_rewritten"] == 1
    assert fxlowbit.counters["fallback_internal_error"] == 0


def test_dynamic_shapes_gradient_quality():
    model = MLP(hidden=256, dropout=0.0)
    x = torch.randn(96, 64)
    ref = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
    compiled = torch.compile(model, backend="lowbit", options={**EAGER, "bits": 8}, dynamic=True)
    compiled(torch.randn(64, 64)).sum().backward()  # first shape: compiles a dynamic graph
    got = torch.autograd.grad(compiled(x).square().mean(), list(model.parameters()))
    flat = torch.cat([g.flatten() for g in ref]), torch.cat([g.flatten() for g in got])
    assert sqnr_db(*flat) >= 25.0  # the 8-bit floor of test_compression


class _AbsModel(torch.nn.Module):
    """abs's backward takes sign(x): near zero a compressed value could flip it, so sign is not
    trusted with a compressed value (nor is log's division by its input)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 256)

    def forward(self, x):
        return torch.log(self.lin(x).abs() + 1.0).sum()


def test_unknown_backward_op_warns_once_naming_it_and_keeps_exact():
    planner._warned.clear()
    model, x = _AbsModel(), torch.randn(64, 64)
    ref = torch.autograd.grad(model(x), list(model.parameters()))
    with pytest.warns(UserWarning, match=r"aten\.sign\.default is not known to tolerate") as record:
        compiled = torch.compile(model, backend="lowbit", options=EAGER)
        got = torch.autograd.grad(compiled(x), list(model.parameters()))
    assert sum("aten.sign.default" in str(w.message) for w in record) == 1
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(r, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: a second compile stays quiet
        torch._dynamo.reset()
        torch.compile(model, backend="lowbit", options=EAGER)(x).backward()


def test_strict_mode_raises_on_unknown_op():
    planner._warned.clear()
    compiled = torch.compile(_AbsModel(), backend="lowbit", options={**EAGER, "strict": True})
    with pytest.raises(Exception, match=r"aten\.sign\.default.*strict mode"):
        compiled(torch.randn(8, 64)).backward()


def _boom(*args, **kwargs):
    raise RuntimeError("synthetic bug")


def test_internal_error_falls_back_to_uncompressed(monkeypatch):
    monkeypatch.setattr(fxlowbit.passes.rewrite_saved, "run", _boom)
    model, inputs, loss_fn = make("mlp")
    _, ref, _ = step(model, inputs, loss_fn, options=UNCOMPRESSED)
    with pytest.warns(UserWarning, match="internal error.*synthetic bug.*runs uncompressed"):
        _, got, _ = step(model, inputs, loss_fn, options=EAGER)
    assert torch.equal(ref, got)
    assert fxlowbit.counters["fallback_internal_error"] == 1


def test_internal_error_raises_in_strict_mode(monkeypatch):
    monkeypatch.setattr(fxlowbit.passes.rewrite_saved, "run", _boom)
    model, inputs, loss_fn = make("mlp")
    with pytest.raises(Exception, match="synthetic bug"):
        step(model, inputs, loss_fn, options={**EAGER, "strict": True})


@pytest.mark.parametrize("step_name", ["analyze", "plan", "rewrite_saved"])
def test_pipeline_steps_can_be_switched_off(step_name):
    model, inputs, loss_fn = make("mlp")
    _, ref, _ = step(model, inputs, loss_fn, options=UNCOMPRESSED)
    _, got, _ = step(model, inputs, loss_fn, options={**EAGER, "passes": {step_name: False}})
    assert torch.equal(ref, got)
    assert fxlowbit.counters["saved_quant4"] == 0


def test_dynamic_shapes_with_inductor_inner():
    """The inlined (Inductor-fused) pack/decode with symbolic sizes: one graph for three batch
    sizes, and 8-bit gradients meet the 8-bit floor against the uncompressed Inductor run."""
    torch._dynamo.utils.counters.clear()
    model = MLP(hidden=256, dropout=0.0)
    grads = {}
    for name, options in (("ref", {"passes": {"plan": False}}), ("lowbit", {"bits": 8, "seed": 0})):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="lowbit", options=options, dynamic=True)
        for batch in (48, 96, 160):
            x = torch.randn(batch, 64, generator=torch.Generator().manual_seed(batch))
            grads[name, batch] = torch.autograd.grad(compiled(x).square().mean(), list(model.parameters()))
    assert fxlowbit.counters["graphs_rewritten"] == 1
    for batch in (48, 96, 160):
        ref, got = (torch.cat([g.flatten() for g in grads[k, batch]]) for k in ("ref", "lowbit"))
        assert sqnr_db(ref, got) >= 25.0


def test_compile_mode_reaches_inductor_and_lowbit_mode_stays_an_option(monkeypatch):
    """torch.compile's ``mode`` (the compile mode, handed to the backend as the keyword ``mode``)
    becomes Inductor's config patches; lowbit's own ``mode`` is an option and never goes there."""
    import torch._inductor.compile_fx as inductor

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", fake_compile_fx)
    modes = torch._inductor.list_mode_options("max-autotune-no-cudagraphs")
    assert modes  # the mode sets something, so the check below can fail
    model = torch.nn.Linear(8, 8)
    for kwargs in ({"mode": "max-autotune-no-cudagraphs"}, {"options": {"mode": "memory"}}):
        torch._dynamo.reset()
        torch.compile(model, backend="lowbit", **kwargs)(torch.randn(4, 8)).sum().backward()
    compiled_mode, lowbit_mode = seen
    assert {k: compiled_mode[k] for k in modes} == modes
    assert not set(modes) & set(lowbit_mode)
    assert set(lowbit_mode) == {"custom_partitioner_fn"}
