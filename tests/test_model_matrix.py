"""A matrix of real architectures under ``backend="lowbit"`` at 4 bits: each compiles, trains three
AdamW steps, keeps its first-step gradient within a per-model SQNR floor of the uncompressed
pipeline, stores >= 3x fewer saved-activation bytes, and gets exactly the graphs (and graph breaks)
that ``aot_eager`` gets: breaks come from Dynamo, before any backend, so we must add none.

Models: tests/_models.py (`transformers` decoder-only, encoder-only, encoder-decoder and vision
families from tiny configs, plus two hand-built CNNs with batch norm, pooling and dropout). CI runs
the representative subset below; ``python -m pytest -m "slow or not slow"`` runs all. The gradient
reference is the same backend with ``passes={"plan": False}`` (same decompositions, partition and
dropout draws), so the SQNR measures the compression alone; it is over all parameter gradients
concatenated, as in test_transformers_models.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch

import fxlowbit
from fxlowbit.examples import sqnr_db

from . import _models
from ._util import model_graphs

pytest.importorskip("transformers")

LOWBIT4 = {"bits": 4, "inner": "eager", "seed": 0}
UNCOMPRESSED = {"inner": "eager", "seed": 0, "passes": {"plan": False}}
STEPS = 3
MIN_REDUCTION_4BIT = 3.0  # measured 4.9x (SmallCNN) to 8.2x (GPT-NeoX); see the table below

# Whole-gradient SQNR floors (dB) at 4 bits against the uncompressed reference, rounding seed 0.
# Measured on CPU (torch 2.13, transformers 5.23) over rounding seeds 0-2 x init 0 and inits 1-2 x
# seed 0: min - max of those 5 runs, and the saved-bytes reduction (the same in all 5):
#   gpt2      28.8-29.6  5.9x   bert        23.7-24.2  7.3x   t5     22.9-23.7  7.5x
#   llama     29.9-31.1  7.3x   roberta     23.0-25.0  7.2x   bart   29.8-31.6  7.1x
#   mistral   30.7-31.3  7.3x   distilbert  23.1-23.6  7.2x   vit    13.9-14.4  6.1x
#   qwen2     30.5-31.9  7.3x   electra     22.7-24.5  7.3x   deit   15.9-19.8  6.1x
#   qwen3     21.5-24.8  7.2x                                 convnext 19.8-24.8 6.8x
#   gemma     28.0-29.7  7.3x                                 swin   22.8-23.7  6.9x
#   phi       31.1-32.5  7.3x                                 cnn    15.4-16.0  4.9x
#   gpt_neox  32.3-33.0  8.2x                                 resnet 11.0-11.9  6.4x
#   opt       29.6-31.1  6.6x
# Each floor is the lowest measurement less 4.5 dB, rounded down to 0.5 dB: 2-9x the spread of most
# models, and under the ~6 dB one bit of precision is worth, so losing a bit or mis-decoding a tensor
# fails (ConvNeXt and Qwen3 spread 5 and 3 dB over inits; the test runs init 0, 23.0 and 22.9 dB).
# Vision models and CNNs sit lower: their loss averages over 16 labels, not hundreds of predicted
# tokens. Qwen3 sits 8 dB under Qwen2 because its RMSNorm of each 16-wide query/key head multiplies
# the rounding error of its input by that row's 1/rms, while a 256-element group's range is set by
# the largest of its 16 rows. LayerNorm inputs are stored in normalised form, ``(x - mean) * rstd``
# (passes/rewrite_saved.py): DeiT's zero-initialised CLS/distillation rows have rstd 1e6, which
# multiplied their rounding into gradients 1e5x too large (-145 to -131 dB) before that.
SQNR_FLOOR_DB = {
    "gpt2": 24.0,
    "llama": 25.0,
    "mistral": 26.0,
    "qwen2": 25.5,
    "qwen3": 17.0,
    "gemma": 23.0,
    "phi": 26.5,
    "gpt_neox": 27.5,
    "opt": 25.0,
    "bert": 19.0,
    "roberta": 18.0,
    "distilbert": 18.5,
    "electra": 18.0,
    "t5": 18.0,
    "bart": 25.0,
    "vit": 9.0,
    "deit": 11.0,
    "convnext": 15.0,
    "swin": 18.0,
    "cnn": 10.5,
    "resnet": 6.5,
}

# CI runs one model per family and DeiT (the normalised-form regression; the slow set runs all);
# gpt2, bert and llama also run in CI, in test_transformers_models.py.
REPRESENTATIVE = ("gpt_neox", "distilbert", "bart", "vit", "deit", "cnn", "resnet")

# Known to fail, for a reason of ours (see the report in each reason).
KNOWN_FAILURES: dict[str, str] = {}


def _param(name: str):
    marks = [] if name in REPRESENTATIVE else [pytest.mark.slow]
    if name in KNOWN_FAILURES:
        marks.append(pytest.mark.xfail(strict=True, raises=AssertionError, reason=KNOWN_FAILURES[name]))
    return pytest.param(name, marks=marks, id=name)


@dataclasses.dataclass
class Run:
    nbytes: int  # saved-activation bytes of the first step, walked from its loss
    grad: torch.Tensor  # first step's parameter gradients, concatenated
    losses: list[float]
    graphs: int  # graphs Dynamo compiled
    breaks: int  # graph breaks Dynamo took


def train(name: str, backend: str, options: dict | None = None, steps: int = STEPS) -> Run:
    """Compile model ``name`` fresh with ``backend`` and train ``steps`` AdamW steps (same batches
    and dropout draws in every run)."""
    torch._dynamo.reset()
    fxlowbit.reset()
    torch._dynamo.utils.counters.clear()
    model = _models.build(name)
    compiled = torch.compile(model, backend=backend, **({"options": options} if options else {}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, nbytes, grad = [], 0, None
    for step in range(steps):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fxlowbit's once-per-op "kept exact" notes
            loss = _models.loss_of(compiled(**_models.batch(name, step)))
        if step == 0:
            nbytes = fxlowbit.saved_activation_bytes(loss, model.parameters())
        loss.backward()
        if step == 0:
            grad = torch.cat(
                [(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in model.parameters()]
            )
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    stats = torch._dynamo.utils.counters
    return Run(nbytes, grad, losses, model_graphs(), sum(stats["graph_break"].values()))


def test_matrix_covers_the_families():
    hf = [n for n, f in _models.FAMILY.items() if f != "cnn"]
    assert len(hf) - len(KNOWN_FAILURES) >= 10
    families = {"decoder", "encoder", "encoder-decoder", "vision", "cnn", "moe", "audio", "multimodal", "ssm"}
    assert set(_models.FAMILY.values()) == families
    assert {_models.FAMILY[n] for n in REPRESENTATIVE + DEFAULTS_CI} == set(_models.FAMILY.values()) - {"ssm"}
    assert set(SQNR_FLOOR_DB) <= set(_models.FAMILY)  # the 4-bit matrix: the first 21 models
    assert set(DEFAULTS_FLOOR_DB) == set(_models.FAMILY)


@pytest.mark.parametrize("name", [_param(n) for n in _models.FAMILY if n in SQNR_FLOOR_DB])
def test_model_trains_compressed(name):
    ref = train(name, "lowbit", UNCOMPRESSED, steps=1)
    base = train(name, "aot_eager")
    got = train(name, "lowbit", LOWBIT4)

    assert all(math.isfinite(v) for v in got.losses), got.losses
    assert got.losses[0] == pytest.approx(ref.losses[0], rel=1e-5), "the forward must not change"
    assert (got.graphs, got.breaks) == (base.graphs, base.breaks), "graphs / breaks vs aot_eager"
    assert fxlowbit.counters["fallback_internal_error"] == 0
    assert fxlowbit.counters["saved_quant4"] > 0
    assert ref.nbytes / got.nbytes >= MIN_REDUCTION_4BIT, f"{ref.nbytes} -> {got.nbytes} bytes"
    sqnr = sqnr_db(ref.grad, got.grad)
    assert sqnr >= SQNR_FLOOR_DB[name], f"{name}: whole-gradient SQNR {sqnr:.1f} dB"


@pytest.mark.slow
def test_inductor_inner_compiler():
    """One model with the default inner compiler (Inductor, pack and decode fused into its kernels):
    the same graphs, bytes saved and floor (measured 30.4 dB, 7.3x). Qwen2 has no dropout, whose
    random numbers Inductor draws differently from the eager inner compiler. About 5 minutes on one
    CPU thread with a cold Inductor cache, nearly all Inductor compiling the traced pack/decode code
    (plain Inductor 25 s, lowbit with ``kernels="ops"`` 35 s, the default inline kernels 286 s)."""
    ref = train("qwen2", "lowbit", UNCOMPRESSED, steps=1)
    base = train("qwen2", "aot_eager")
    got = train("qwen2", "lowbit", {**LOWBIT4, "inner": "inductor"})
    assert all(math.isfinite(v) for v in got.losses), got.losses
    assert (got.graphs, got.breaks) == (base.graphs, base.breaks)
    assert got.losses[0] == pytest.approx(ref.losses[0], rel=1e-4)
    assert fxlowbit.counters["fallback_internal_error"] == 0
    assert ref.nbytes / got.nbytes >= MIN_REDUCTION_4BIT
    assert sqnr_db(ref.grad, got.grad) >= SQNR_FLOOR_DB["qwen2"]


# -- the default path: what users run (issue 15) --------------------------------------------------
# No options but the eager inner compiler (CI time; test_inductor_inner_compiler_at_defaults runs
# Inductor): the planner with its priors, the first probe at step 10 and its re-plan at step 11.
DEFAULTS = {"inner": "eager", "seed": 0}
DEFAULT_STEPS = 12
MIN_REDUCTION_DEFAULTS = 4.0  # issue 15's acceptance: >= 4x fewer walked bytes at >= 15 dB
MIN_SQNR_DEFAULTS = 15.0
# One model per family in CI, the new architectures included (Mamba's sequential scan takes two
# minutes per setting on one thread: slow set only); the slow set runs all.
DEFAULTS_CI = ("qwen3_moe", "whisper", "clip", "mbconv", "t5", "gpt2")
# Measured (benchmarks/results/matrix_defaults_cpu.json, CPU, seed 0): every model meets the floors
# below except these, which fail for a reason of ours (strict xfails: a fix must remove them).
KNOWN_SHORTFALLS: dict[tuple[str, str], str] = {}  # none since GEMM replays (f12bf32..df674a4)
# Per-model floors at defaults (dB) where one is set above the acceptance line; None: 15 dB.
DEFAULTS_FLOOR_DB: dict[str, float | None] = dict.fromkeys(_models.FAMILY)


@dataclasses.dataclass
class DefaultRun:
    nbytes: int  # walked saved bytes of the first step
    first: torch.Tensor  # first step's gradient (the prior plan)
    last: torch.Tensor  # last step's gradient (after the probe's re-plan)
    state: dict  # weights before the last step
    counters: dict
    replay_flops: int = 0  # matmul/convolution FLOPs the first step's plans replay in the backward
    gemm_flops: int = 0  # matmul FLOPs of the first step's forward and backward graphs, uncompressed


def _replay_flops() -> tuple[int, int]:
    """(FLOPs the first plans' GEMM replays and min-cut re-partitions add, the default graphs' own
    matmul FLOPs), from the records of the graphs compiled since the last reset (re-planned
    variants left out)."""
    extra = total = 0
    for rec in fxlowbit.record.records():
        if rec.replanned or rec.plan is None or rec.facts is None:
            continue
        recipes = {s.name: s.recompute for s in rec.facts.saved if s.recompute is not None}
        extra += sum(recipes[d.name].flops for d in rec.plan.decisions if d.form == "recompute")
        extra += rec.plan.partition_flops  # min-cut's recompute, when its partition was kept
        total += sum(g.flops for g in rec.facts.gemms) - rec.plan.partition_flops
    return extra, total


def _flat_grad(model) -> torch.Tensor:
    return torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in model.parameters()]
    )


def train_defaults(
    name: str, options: dict, steps: int = DEFAULT_STEPS, state: dict | None = None
) -> DefaultRun:
    """``steps`` AdamW steps of model ``name`` under ``backend="lowbit"`` with ``options``; the
    weights before the last step are kept so the uncompressed gradient there can be compared."""
    torch._dynamo.reset()
    fxlowbit.reset()
    model = _models.build(name)
    if state is not None:
        model.load_state_dict(state)
    compiled = torch.compile(model, backend="lowbit", options=options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    nbytes, first, last, before = 0, None, None, None
    for step in range(steps):
        if step == steps - 1:
            before = copy.deepcopy(model.state_dict())
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batch = _models.batch(name, step if state is None else DEFAULT_STEPS - 1)
            loss = _models.loss_of(compiled(**batch))
        if step == 0:
            nbytes = fxlowbit.saved_activation_bytes(loss, model.parameters())
        loss.backward()
        if step == 0:
            first = _flat_grad(model)
        if step == steps - 1:
            last = _flat_grad(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return DefaultRun(nbytes, first, last, before, dict(fxlowbit.counters), *_replay_flops())


def measure_defaults(name: str, options: dict) -> dict:
    """Walked-bytes reduction and whole-gradient SQNR against the uncompressed pipeline, on the
    first step (prior plan) and on the last (after the probe and re-plan)."""
    ref = train_defaults(name, UNCOMPRESSED, steps=1)
    got = train_defaults(name, options)
    ref_last = train_defaults(name, UNCOMPRESSED, steps=1, state=got.state)
    return {
        "reduction": ref.nbytes / got.nbytes,
        "sqnr_first_db": sqnr_db(ref.first, got.first),
        "sqnr_last_db": sqnr_db(ref_last.first, got.last),
        "extra_matmul_flops": got.replay_flops / max(got.gemm_flops, 1),  # fraction of the step's
        "counters": got.counters,
    }


def _defaults_param(name: str, setting: str):
    marks = [] if name in DEFAULTS_CI else [pytest.mark.slow]
    if (name, setting) in KNOWN_SHORTFALLS:
        marks.append(
            pytest.mark.xfail(strict=True, raises=AssertionError, reason=KNOWN_SHORTFALLS[name, setting])
        )
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [_defaults_param(n, "defaults") for n in _models.FAMILY])
def test_model_at_default_options(name):
    m = measure_defaults(name, DEFAULTS)
    c = m["counters"]
    assert c.get("fallback_internal_error", 0) == 0 and c.get("probes_disabled", 0) == 0, c
    # the probe at step 10 and its re-plan, unless every graph's plan keeps all its tensors within
    # its budget (min-cut's pair, say), which no probe could better (adaptive.Adaptive._settled)
    probed = c.get("probes", 0) + c.get("probes_not_needed", 0)
    assert probed >= 1, "the probe at step 10 and its re-plan must happen (or no plan may need one)"
    assert m["reduction"] >= MIN_REDUCTION_DEFAULTS, m
    floor = DEFAULTS_FLOOR_DB[name] or MIN_SQNR_DEFAULTS
    assert m["sqnr_first_db"] >= floor, m
    assert m["sqnr_last_db"] >= floor, m


MIN_REDUCTION_BUDGET01 = 8.0  # issue 15's acceptance at memory_budget=0.1: >= 8x at >= 10 dB
MIN_SQNR_BUDGET01 = 10.0
BUDGET01_FLOOR_DB: dict[str, float | None] = dict.fromkeys(_models.FAMILY)


@pytest.mark.parametrize("name", [_defaults_param(n, "budget0.1") for n in _models.FAMILY])
def test_model_at_budget_0_1(name):
    m = measure_defaults(name, {**DEFAULTS, "memory_budget": 0.1})
    c = m["counters"]
    assert c.get("fallback_internal_error", 0) == 0 and c.get("probes_disabled", 0) == 0, c
    assert m["reduction"] >= MIN_REDUCTION_BUDGET01, m
    floor = BUDGET01_FLOOR_DB[name] or MIN_SQNR_BUDGET01
    assert m["sqnr_last_db"] >= floor, m
    assert m["sqnr_first_db"] >= floor, m
