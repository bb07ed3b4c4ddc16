"""`transformers` GPT-2, BERT and Llama under ``backend="lowbit"``: training runs, gradients stay
close to the uncompressed pipeline, saved-activation bytes drop.

Small configs (2 layers, hidden 64, 4 heads, vocab 128; batch 4 x 64 characters of stdlib text),
fp32, train mode with each config's default dropout (GPT-2 and BERT 0.1, Llama none), no downloads.
The gradient reference is the same backend with ``passes={"rewrite_saved": False}``: same
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
VOCAB, BATCH, SEQ, MASK_ID = 128, 4, 64, 1  # ASCII codes; id 1 (SOH) never occurs in the corpus

# Whole-gradient SQNR floors (dB) against the uncompressed reference, seed 0 of the rounding noise.
# Measured on CPU, torch 2.13, transformers 5.23 (min over rounding seeds 0/1/2; spread = max - min):
#   bits  gpt2             bert             llama
#   8     53.8 (spread 1.8) 44.8 (2.5)      52.0 (1.6)
#   4     29.3 (1.8)        20.6 (2.1)      27.4 (1.4)
#   2     15.1 (1.4)         6.6 (2.1)      13.5 (1.6)
# Each floor sits ~2x the largest seed spread (4-5 dB) under the lowest of the three models, so a
# numerics-only change passes and a lost bit of precision (~6 dB per bit) or a mis-decoded tensor
# fails. 2 bits gets a low floor: BERT's gradients are dominated by its few masked positions.
SQNR_FLOOR_DB = {8: 40.0, 4: 16.0, 2: 2.0}
# 4-bit saved-activation bytes vs aot_eager: measured 4.6-5.3x here; the floor is the design
# target (~3x) so planner changes that keep a tensor or two exact do not break it.
MIN_REDUCTION_4BIT = 3.0


def _config(name: str):
    tf = transformers
    if name == "gpt2":
        return tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=SEQ, vocab_size=VOCAB,
                             bos_token_id=2, eos_token_id=3, use_cache=False)
    if name == "bert":
        return tf.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                             intermediate_size=256, vocab_size=VOCAB, max_position_embeddings=SEQ)
    return tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=176, vocab_size=VOCAB,
                          max_position_embeddings=SEQ, use_cache=False)


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = {"gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM", "llama": "LlamaForCausalLM"}[name]
    return getattr(transformers, cls)(_config(name)).train()


@functools.cache
def batch(name: str, step: int = 0) -> dict[str, torch.Tensor]:
    """Causal LM: labels = inputs (the model shifts them). BERT: 15% of positions masked."""
    data = examples.stdlib_text()
    idx = list(examples.char_batches(data, BATCH, SEQ, steps=step + 1, seed=0))[step][0]
    if name != "bert":
        return {"input_ids": idx, "labels": idx}
    masked = torch.rand(idx.shape, generator=torch.Generator().manual_seed(step)) < 0.15
    return {"input_ids": idx.masked_fill(masked, MASK_ID), "labels": idx.masked_fill(~masked, -100)}


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()
    ])


def one_step(name: str, backend: str, **options) -> tuple[int, torch.Tensor, float]:
    """Saved-activation bytes, flat gradient and loss of one seeded forward+backward."""
    torch._dynamo.reset()
    model = make_model(name)
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
def reference(name: str):
    return one_step(name, "lowbit", inner="eager", seed=0, passes={"rewrite_saved": False})


@functools.cache
def aot_eager(name: str):
    return one_step(name, "aot_eager")


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
    assert sqnr >= SQNR_FLOOR_DB[bits], f"{name} {bits}-bit whole-gradient SQNR {sqnr:.1f} dB"
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
    # one fixed batch: six AdamW steps must fit it better (measured drops ~0.3-0.6 nats)
    assert losses[-1] < losses[0] - 0.05, losses
    assert fxlowbit.counters["graphs_rewritten"] >= 1


def test_gpt2_inner_inductor():
    """The same rewrite compiled by Inductor: gradients as close as with the eager inner compiler."""
    _, ref_grad, ref_loss = reference("gpt2")
    base, _, _ = aot_eager("gpt2")
    nbytes, grad, loss = one_step("gpt2", "lowbit", inner="inductor", bits=4, seed=0)
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    assert sqnr_db(ref_grad, grad) >= SQNR_FLOOR_DB[4]
    assert base / nbytes >= MIN_REDUCTION_4BIT
    assert fxlowbit.counters["fallback_internal_error"] == 0
