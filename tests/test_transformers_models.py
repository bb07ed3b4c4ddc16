"""`transformers` GPT-2, BERT and Llama under ``backend="lowbit"``: training runs, gradients stay
close to the uncompressed pipeline, saved-activation bytes drop.

Small configs (2 layers, hidden 64, 4 heads, vocab 128; batch 4 x 64 characters of stdlib text),
fp32, train mode with each config's default dropout (GPT-2 and BERT 0.1, Llama none), no downloads.
The gradient reference is the same backend with ``passes={"plan": False}``: same
decompositions, partition and dropout draws, so the SQNR measures the compression alone. SQNR is over
all parameter gradients concatenated (per-parameter SQNR is meaningless for parameters whose gradient
is ~0, such as unused position embeddings).
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

import fxlowbit
from fxlowbit import examples
from fxlowbit.examples import sqnr_db

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

MODELS = ("gpt2", "bert", "llama")
BATCH, SEQ = 4, examples.HF_SEQ

# Whole-gradient SQNR floors (dB) against the uncompressed reference, rounding seed 0.
# Measured on CPU (torch 2.13, transformers 5.23) over 3 rounding seeds x model init 0, and 3 inits
# (min - max over those 5 runs):
#   bits  gpt2         bert         llama
#   8     55.7 - 56.0  47.5 - 48.6  54.9 - 55.7
#   4     30.8 - 31.2  22.8 - 23.9  30.3 - 31.2
#   2     16.7 - 17.0   8.3 - 9.6   16.1 - 17.2
# Largest spread 1.3 dB. Each floor is ~4.5-5 dB under the lowest measurement: 3-4x the spread, so
# numerics-only changes pass, and under the ~6 dB one bit of precision is worth, so losing a bit or
# mis-decoding a tensor fails. BERT sits ~8 dB lower at every width (cause not investigated; its loss
# covers only the 15% masked positions); at 2 bits its floor is low on purpose.
SQNR_FLOOR_DB = {
    ("gpt2", 8): 51.0,
    ("gpt2", 4): 26.0,
    ("gpt2", 2): 12.0,
    ("bert", 8): 43.0,
    ("bert", 4): 18.0,
    ("bert", 2): 4.0,
    ("llama", 8): 50.0,
    ("llama", 4): 25.5,
    ("llama", 2): 11.5,
}
# 4-bit saved-activation bytes vs aot_eager: measured 6.1x (gpt2), 6.0x (bert), 4.6x (llama); the
# floor is the ~3x asked of the backend, so planner changes that keep a tensor or two exact pass.
MIN_REDUCTION_4BIT = 3.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a small shared CPU, OpenMP threads contending with other processes
    made these tiny steps ~50x slower (1.5 s instead of 30 ms per step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(name: str, cfg: tuple = ()) -> torch.nn.Module:
    """Seeded model; ``cfg``: config overrides as ``((key, value), ...)``."""
    torch.manual_seed(0)
    return examples.hf_model(name, **dict(cfg))


@functools.cache
def batch(name: str, step: int = 0) -> dict[str, torch.Tensor]:
    """Causal LM: labels = inputs (the model shifts them). BERT: 15% of positions masked."""
    data = examples.stdlib_text()
    idx = list(examples.char_batches(data, BATCH, SEQ, steps=step + 1, seed=0))[step][0]
    return examples.hf_batch(name, idx, seed=step)


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()]
    )


def one_step(name: str, backend: str, cfg: tuple = (), **options) -> tuple[int, torch.Tensor, float]:
    """Saved-activation bytes, flat gradient and loss of one seeded forward+backward."""
    torch._dynamo.reset()
    model = make_model(name, cfg)
    compiled = torch.compile(model, backend=backend, **({"options": options} if options else {}))
    torch.manual_seed(1)  # the same dropout masks in every run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fxlowbit's once-per-op "kept exact" notes
        loss = compiled(**batch(name)).loss
    nbytes = fxlowbit.saved_activation_bytes(loss, model.parameters())
    loss.backward()
    return nbytes, _flat_grad(model), loss.item()


# Results are cached so the reference, aot_eager and 4-bit steps are compiled once per model
# although several tests use them.
@functools.cache
def reference(name: str, cfg: tuple = ()):
    return one_step(name, "lowbit", cfg, inner="eager", seed=0, passes={"plan": False})


@functools.cache
def aot_eager(name: str, cfg: tuple = ()):
    return one_step(name, "aot_eager", cfg)


@functools.cache
def lowbit(name: str, bits: int, seed: int = 0):
    return one_step(name, "lowbit", inner="eager", bits=bits, seed=seed)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("name", MODELS)
def test_gradient_sqnr_floor(name, bits):
    _, ref_grad, ref_loss = reference(name)
    _, grad, loss = lowbit(name, bits)
    assert loss == pytest.approx(ref_loss, rel=1e-5), "the forward must not change"
    assert torch.isfinite(grad).all()
    sqnr = sqnr_db(ref_grad, grad)
    assert sqnr >= SQNR_FLOOR_DB[name, bits], f"{name} {bits}-bit whole-gradient SQNR {sqnr:.1f} dB"
    assert fxlowbit.counters["fallback_internal_error"] == 0


@pytest.mark.parametrize("name", MODELS)
def test_saved_bytes_drop_at_4_bits(name):
    base, _, _ = aot_eager(name)
    ref, _, _ = reference(name)
    got, _, _ = lowbit(name, 4)
    # the uncompressed pipeline itself saves no more than aot_eager (up to allocator rounding)
    assert ref <= base * 1.01
    assert base / got >= MIN_REDUCTION_4BIT, f"{name}: {base} -> {got} bytes ({base / got:.2f}x)"


@pytest.mark.parametrize("name", MODELS)
def test_trains_with_adamw(name):
    torch._dynamo.reset()
    model = make_model(name)
    compiled = torch.compile(model, backend="lowbit", options={"inner": "eager", "bits": 4, "seed": 0})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(6):
            loss = compiled(**batch(name)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    # one fixed batch: six AdamW steps must fit it (measured 4.7-4.8 -> 3.3-3.5 nats, i.e. drops of
    # 1.2-1.45; not monotonic with GPT-2's dropout). Half of the smallest drop as the floor.
    assert losses[-1] < losses[0] - 0.6, losses
    assert fxlowbit.counters["saved_quant4"] > 0


NO_DROPOUT = (("resid_pdrop", 0.0), ("embd_pdrop", 0.0), ("attn_pdrop", 0.0))


def test_gpt2_inner_inductor():
    """The same rewrite compiled by Inductor: gradients as close as with the eager inner compiler.

    Without dropout: Inductor draws its random numbers differently from the eager inner compiler,
    so with dropout the two runs would not see the same masks."""
    _, ref_grad, ref_loss = reference("gpt2", NO_DROPOUT)
    base, _, _ = aot_eager("gpt2", NO_DROPOUT)
    # Without the on-disk AOTAutograd cache: a hit from an earlier process skips our partitioner, so
    # the counters asserted below would stay empty (the compiled code itself is right).
    with torch._functorch.config.patch(enable_autograd_cache=False):
        nbytes, grad, loss = one_step("gpt2", "lowbit", NO_DROPOUT, inner="inductor", bits=4, seed=0)
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    assert sqnr_db(ref_grad, grad) >= SQNR_FLOOR_DB["gpt2", 4]  # measured 31.8 dB
    assert fxlowbit.counters["saved_quant4"] > 0
    assert base / nbytes >= MIN_REDUCTION_4BIT
    assert fxlowbit.counters["fallback_internal_error"] == 0
