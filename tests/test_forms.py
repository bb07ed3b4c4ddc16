"""fxlowbit.forms: the registry of saved-tensor forms, and a form added from this file alone.

The toy form stores an fp32 tensor as fp16 (round to nearest: relative error <= 2^-11). Registered
here and nowhere else, it is offered by the planner, chosen under a budget, packed and decoded by
the rewrite, and shown by the text, JSON and HTML reports; the gradient stays within fp16's error
of the uncompressed one.
"""

from __future__ import annotations

import pytest
import sympy
import torch

import fxlowbit
from fxlowbit import costmodel as cm
from fxlowbit import forms
from fxlowbit.examples import MLP, sqnr_db
from fxlowbit.plan import Form

EAGER = {"inner": "eager", "seed": 0}


class Half(forms.SavedForm):
    """fp32 -> fp16 -> fp32, round to nearest."""

    name = "fp16"
    kinds = frozenset({"float"})
    color = "#b35900"

    def offers(self, t):
        if str(t.s.dtype) != "torch.float32":
            return []
        nbytes = t.at(self.stored_bytes(t.s.numel, 16, 1, 4))
        seconds = 2 * t.profile.pointwise_time(t.fp32_bytes)  # cast there and back
        # rounding to nearest at 11 significant bits, priced like an 11-bit quantizer
        return [(cm.Costs(self.name, 16, nbytes, seconds, cm.quant_variance(t.sensitivity, 11)), "fp16 copy")]

    def stored_bytes(self, numel, bits, group_size, itemsize, n_masks=1):
        return 2 * numel

    def rewrite(self, rw, node, ph, d):
        from fxlowbit.passes._graph import call

        cast = torch.ops.prims.convert_element_type.default
        half = rw.pack(node, lambda x, dtype: x.to(dtype), cast, (torch.float16,), ["half"])
        (part,) = rw.emit(node, ph, half)
        rw.store(ph, lambda syms: call(rw.bg, cast, (part, torch.float32)))
        rw.counters["saved_fp16"] += 1

    def report_reason(self, d, plan, cfg):
        return f"fp16 (toy form): {d.reason}"


@pytest.fixture
def half(monkeypatch):
    forms.register(Half)
    # the toy form is the only lossy one, so the gradient error is its alone
    monkeypatch.setattr(forms.get(Form.QUANT), "kinds", frozenset())
    yield forms.get("fp16")
    forms.unregister("fp16")


def _grads(options: dict) -> tuple[torch.Tensor, fxlowbit.Report]:
    torch._dynamo.reset()
    fxlowbit.reset()
    torch.manual_seed(0)
    model = MLP(dropout=0.0)
    x, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
    compiled = torch.compile(model, backend="lowbit", options=options)
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return grad, fxlowbit.last_report()


def test_builtin_forms_in_offer_order():
    assert forms.names()[:6] == ("keep", "recompute", "mask", "packed", "cmp_mask", "quant")
    assert {getattr(Form, k) for k in dir(Form) if k.isupper()} <= set(forms.names())
    assert cm.stored_bytes(Form.QUANT, sympy.Integer(512), 4, 256, 4) == 2 * (128 + 8)


def test_registering_twice_or_unknown_names_raise():
    with pytest.raises(ValueError, match="already registered"):
        forms.register(type(forms.get(Form.MASK)))
    with pytest.raises(ValueError, match="unknown form 'fp7'"):
        forms.get("fp7")

    class Bad(forms.SavedForm):
        name = "bad"
        kinds = frozenset({"floaty"})

    with pytest.raises(ValueError, match="unknown kinds"):
        forms.register(Bad)
    assert "bad" not in forms.names()


def test_a_form_added_in_a_test_file_is_planned_rewritten_and_reported(half):
    exact, _ = _grads({**EAGER, "passes": {"plan": False}})
    grad, report = _grads({**EAGER, "memory_budget": 0.6, "recompute": False})  # no GEMM replays
    (plan,) = fxlowbit.last_plans()
    n = plan.count("fp16")
    assert n > 0 and plan.count(Form.QUANT) == 0
    halves = [d for d in plan.decisions if d.form == "fp16"]
    assert all(d.bits == 16 and d.bytes_after == d.bytes_before // 2 for d in halves)
    assert plan.bytes_after <= plan.budget
    assert fxlowbit.counters["saved_fp16"] == n
    # fp16 keeps 11 significant bits: ~66 dB on one tensor, a little less through the backward
    assert sqnr_db(exact, grad) > 50
    rows = [r for r in report.entries[0].rows if r.form == "fp16"]
    assert len(rows) == n and all(r.reason.startswith("fp16 (toy form): fp16 copy") for r in rows)
    assert ".form-fp16{color:#b35900}" in report.to_html() and 'class="form-fp16"' in report.to_html()
    assert "fp16" in str(report)
