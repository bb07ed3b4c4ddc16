"""End to end on CPU: saved-activation bytes (walked from loss.grad_fn, independent of our own
bookkeeping) and parameter-gradient SQNR against the uncompressed run, for an MLP, a small CNN and
a small transformer.

SQNR floors (whole gradient, all parameters concatenated), per bit width:
  8 bits >= 25 dB, 4 bits >= 12 dB, 2 bits >= 2 dB.
Why these: one stochastic rounding of a Gaussian-like group of 256 values spans ~5.5 sigma, so its
step is 5.5 sigma / (2^b - 1) and its noise std ~ step / sqrt(6): a single quantized tensor has
SQNR ~ 41 / 16 / 2.5 dB at 8 / 4 / 2 bits. Gradients mix several such tensors (the noise adds)
and average over the batch (it shrinks). Measured here (CPU, 3 seeds): MLP 42.6 / 17.9-18.0 / 3.9 dB,
CNN 30.3-31.2 / 16.8-17.0 / 5.7-5.9 dB, TinyGPT 51.0-51.3 / 26.4-27.2 / 12.4-12.7 dB; seed-to-seed
spread <= 1 dB. Each floor sits >= 1.9 dB below the lowest measurement and would catch a biased
rounding, a wrong scale or a mis-wired decode (those give <= 0 dB).
"""

import pytest

from fxlowbit.examples import sqnr_db

from ._util import UNCOMPRESSED, make, step

FLOOR_DB = {8: 25.0, 4: 12.0, 2: 2.0}


@pytest.fixture(scope="module", params=["mlp", "cnn", "gpt"])
def reference(request):
    model, inputs, loss_fn = make(request.param)
    fp32_bytes, _, _ = step(model, inputs, loss_fn, backend="aot_eager")
    _, grad, loss = step(model, inputs, loss_fn, options=UNCOMPRESSED)
    return request.param, model, inputs, loss_fn, fp32_bytes, grad, loss


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_gradient_sqnr_floor(reference, bits):
    name, model, inputs, loss_fn, _, ref_grad, ref_loss = reference
    _, grad, loss = step(model, inputs, loss_fn, options={"inner": "eager", "bits": bits, "seed": 0})
    assert loss == ref_loss  # the forward is untouched: compression only affects the backward
    assert sqnr_db(ref_grad, grad) >= FLOOR_DB[bits], f"{name} at {bits} bits"


@pytest.mark.parametrize("bits,min_ratio", [(4, 5.0), (2, 9.0)])
def test_saved_bytes_drop(reference, bits, min_ratio):
    name, model, inputs, loss_fn, fp32_bytes, _, _ = reference
    if name == "cnn":
        pytest.skip("the issue's memory targets are for the transformer and the MLP (CNN: see benchmark)")
    nbytes, _, _ = step(model, inputs, loss_fn, options={"inner": "eager", "bits": bits, "seed": 0})
    assert fp32_bytes / nbytes >= min_ratio, f"{name}: {fp32_bytes} -> {nbytes} bytes"


def test_saved_bytes_monotone_in_bits(reference):
    _, model, inputs, loss_fn, fp32_bytes, _, _ = reference
    sizes = [step(model, inputs, loss_fn, options={"inner": "eager", "bits": b})[0] for b in (8, 4, 2)]
    assert fp32_bytes > sizes[0] > sizes[1] > sizes[2]


def test_inductor_inner_matches_eager_inner():
    """The default inner compiler (Inductor) stores the same bytes and meets the same floor."""
    model, inputs, loss_fn = make("mlp")
    eager_bytes, eager_grad, _ = step(
        model, inputs, loss_fn, options={"inner": "eager", "bits": 4, "seed": 0}
    )
    # Inductor draws dropout masks with its own RNG: compare with its own uncompressed run
    _, ref_grad, _ = step(model, inputs, loss_fn, options={"passes": {"plan": False}})
    nbytes, grad, _ = step(model, inputs, loss_fn, options={"bits": 4, "seed": 0})
    assert nbytes == eager_bytes
    assert sqnr_db(ref_grad, grad) >= FLOOR_DB[4]
