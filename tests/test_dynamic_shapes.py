"""Changing batch size and sequence length (image size for the CNN) under ``backend="lowbit"``: it
compiles exactly as often as ``aot_eager`` (Dynamo decides the recompiles, from guards we must not
add), and with ``memory_budget=0.3`` every plan is within its budget and the bytes measured at each
new shape stay within 0.3x of the uncompressed run's at that shape.

Default ``torch.compile`` settings: the first shape compiles static, a changed size recompiles with
that size symbolic, later sizes reuse the symbolic graph. Plans are made at the sizes of the call that
compiled them; a later shape runs the same plan, so its measured bytes check that the plan's
proportions carry over. Measured bytes leave out parameters and the batch itself (graph inputs cost
the planner nothing, as the README says).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

import fxlowbit

from . import _models
from ._util import model_graphs

pytest.importorskip("transformers")

BUDGET = 0.3
BUDGET_RUN = {"inner": "eager", "seed": 0, "memory_budget": BUDGET}
UNCOMPRESSED = {"inner": "eager", "seed": 0, "passes": {"plan": False}}
# (batch, sequence length) for the decoder, (batch, image side) for the CNN; no size 1 (Dynamo
# specialises it) and no size equal to another of the same call (duck sizing would tie them).
SHAPES = {
    "llama": ((2, 16), (3, 16), (3, 24), (5, 40)),
    "resnet": ((16, 8), (24, 8), (24, 12), (40, 16)),
}


@dataclasses.dataclass
class Step:
    graphs: int  # graphs Dynamo has compiled so far
    nbytes: int  # saved-activation bytes of this step, parameters and inputs left out
    plans: list  # fxlowbit.last_plans() after this step
    variants: int = 0  # plan variants compiled so far (a prior checked on the first batch re-plans)


def run(name: str, backend: str, options: dict | None = None) -> list[Step]:
    """One forward+backward per shape of ``SHAPES[name]`` through one compiled model."""
    torch._dynamo.reset()
    fxlowbit.reset()
    torch._dynamo.utils.counters.clear()
    model = _models.build(name)
    compiled = torch.compile(model, backend=backend, **({"options": options} if options else {}))
    steps = []
    for size in SHAPES[name]:
        batch = _models.batch(name, size=size)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fxlowbit's once-per-op "kept exact" notes
            loss = _models.loss_of(compiled(**batch))
        nbytes = fxlowbit.saved_activation_bytes(loss, [*model.parameters(), *batch.values()])
        loss.backward()
        assert math.isfinite(loss.item()) and all(p.grad.isfinite().all() for p in model.parameters())
        model.zero_grad(set_to_none=True)
        graphs = model_graphs()
        steps.append(Step(graphs, nbytes, fxlowbit.last_plans(), fxlowbit.counters["plan_variants"]))
    return steps


def check_budget(name: str, steps: list[Step], reference: list[Step], extra: int = 0) -> None:
    """``extra``: bytes saved beside the plan that the reference does not have."""
    for size, step, ref in zip(SHAPES[name], steps, reference, strict=True):
        plan = step.plans[-1]
        assert plan.status == "ok", (size, plan.status)
        # the planner's budget is 0.3 of its own uncompressed count, and the plan keeps to it
        assert plan.budget <= BUDGET * plan.bytes_uncompressed
        assert plan.bytes_after <= plan.budget, (size, plan.bytes_after, plan.budget)
        # measured here, at this shape, against the uncompressed pipeline at the same shape. No slack:
        # measured 0.271-0.283 of it (llama), 0.283-0.296 (resnet), within 32 bytes of the plan's
        # own count; the walk also counts small storages the plan leaves out, on both sides.
        assert step.nbytes <= BUDGET * ref.nbytes + extra, (size, step.nbytes, ref.nbytes)
    assert fxlowbit.counters["fallback_internal_error"] == 0


@pytest.mark.parametrize("name", ["llama", "resnet"])
def test_shape_changes(name):
    base = run(name, "aot_eager")
    ref = run(name, "lowbit", UNCOMPRESSED)
    got = run(name, "lowbit", BUDGET_RUN)
    assert [s.graphs for s in got] == [s.graphs for s in base], "compilations per shape vs aot_eager"
    assert base[-1].graphs < len(SHAPES[name]), "the last shape reuses a symbolic graph"
    # one plan per compilation: every recompile re-planned, nothing planned without one
    assert [len(s.plans) for s in got] == [s.graphs + s.variants for s in got]
    check_budget(name, got, ref)


@pytest.mark.slow
def test_shape_changes_inductor_inner():
    """The same with the default inner compiler, against plain Inductor, which itself recompiles for
    the last shape (guards from its convolution lowering): we recompile exactly as often.

    Inductor's layout optimisation saves a channels-last copy of each residual conv weight (4 x 36 KB;
    plain Inductor saves the same copies): bytes the planner never sees, as Inductor makes them after
    our pass, so the measured bytes may exceed the budget by the conv weights' size. Measured:
    exactly the plan's bytes plus those 147 KB at every shape. About 4 minutes on one CPU thread,
    mostly Inductor compiling the traced pack/decode code (plain Inductor: 40 s)."""
    base = run("resnet", "inductor")
    ref = run("resnet", "lowbit", UNCOMPRESSED)
    got = run("resnet", "lowbit", {**BUDGET_RUN, "inner": "inductor"})
    assert [s.graphs for s in got] == [s.graphs for s in base], "compilations per shape vs Inductor"
    assert [len(s.plans) for s in got] == [s.graphs + s.variants for s in got]
    model = _models.build("resnet")
    convs = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    check_budget("resnet", got, ref, extra=convs)
