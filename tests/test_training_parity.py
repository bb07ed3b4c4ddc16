"""Training parity on real bundled data (CPU, inner="eager"): a model trained with saved activations
stored in 4 bits ends where the uncompressed run ends.

Each pair of runs shares the seed, the initial weights, the batch order and the dropout masks; the
baseline is the lowbit pipeline with ``plan`` off (same decompositions, partition and RNG
use), so the only difference is the compression. Runs use one thread (steady on small CI machines)
and a cosine learning-rate decay, so the end point reflects the model rather than the last steps'
noise.

Measured here (torch 2.13 CPU, seeds 0-2): digits MLP test accuracy 90.8-91.6%, 4 bits within
0.3 pp, 2 bits within 0.6 pp; digits SmallCNN 95.5-96.4%, 4 bits identical, 2 bits within 0.9 pp;
TinyGPT (dim 64, 200 steps) final loss 2.25-2.28 nats (ln 128 = 4.85), 4 bits within 0.4% (train
and held-out), 2 bits 17-18% worse (train; 11% held-out). Saved bytes drop 5.2x (MLP), 5.3x (CNN)
and 6.8x (TinyGPT) at 4 bits. Each test also asserts that the runs learned and that compression
really happened (saved bytes walked from loss.grad_fn), so none can pass trivially.
"""

import functools
import math

import pytest
import torch

from fxlowbit.training import Result, digits_task, gpt_task, train

STEPS = {"mlp": 400, "cnn": 300, "gpt": 200}
ACC_FLOOR = {"mlp": 0.88, "cnn": 0.94}  # chance is 0.10
GPT_LOSS_CEILING = 0.6 * math.log(128)  # 2.91 nats; uniform over the ASCII vocabulary is 4.85


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _train(model: str, run: str, sampling: float | None = None) -> Result:
    """One seeded run, shared by the tests (the baselines are needed at every bit width)."""
    task = gpt_task(dim=64, layers=2, batch=16, block=64) if model == "gpt" else digits_task(model)
    options = {"sampling": sampling} if sampling is not None else None
    return train(task, run, STEPS[model], inner="eager", seed=0, progress=False, options=options)


def _compressed(base: Result, run: Result, min_ratio: float) -> None:
    assert run.saved_mb * min_ratio <= base.saved_mb, (
        f"{run.model} {run.run}: saved {base.saved_mb:.3f} -> {run.saved_mb:.3f} MB: not compressed"
    )


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_digits_accuracy_within_1pp_at_4_bits(model):
    base, low = _train(model, "uncompressed"), _train(model, "lowbit4")
    _compressed(base, low, 4.0)
    assert base.test_acc > ACC_FLOOR[model] and low.test_acc > ACC_FLOOR[model], (base.test_acc, low.test_acc)
    assert abs(low.test_acc - base.test_acc) <= 0.01, (
        f"{model}: test accuracy {100 * base.test_acc:.2f}% uncompressed, {100 * low.test_acc:.2f}% at 4 bits"
    )


def test_gpt_loss_within_3pct_at_4_bits():
    base, low = _train("gpt", "uncompressed"), _train("gpt", "lowbit4")
    _compressed(base, low, 5.0)
    assert base.train_loss < GPT_LOSS_CEILING and base.losses[0] > 4.0, base.losses[:: STEPS["gpt"] // 10]
    # final training loss (mean of the last 20 steps) and held-out loss (last 10% of the corpus)
    assert abs(low.train_loss / base.train_loss - 1) <= 0.03, (base.train_loss, low.train_loss)
    assert abs(low.eval_loss / base.eval_loss - 1) <= 0.03, (base.eval_loss, low.eval_loss)


@pytest.mark.parametrize("model", ["cnn", "gpt"])
def test_2_bits_still_trains(model):
    """Uniform 2 bits is lossy by design (DESIGN.md: it wrecks transformer gradients; the planner is
    meant to avoid it there). Bounds here only say training still works: the CNN within 3 pp of the
    uncompressed accuracy (measured <= 0.9 pp), TinyGPT within 30% of its loss (measured +17-18%)
    and far below the untrained loss."""
    base, low = _train(model, "uncompressed"), _train(model, "lowbit2")
    _compressed(base, low, 8.0 if model == "gpt" else 6.0)
    if model == "gpt":
        assert low.train_loss < 0.7 * math.log(128), low.train_loss
        assert low.train_loss / base.train_loss - 1 <= 0.30, (base.train_loss, low.train_loss)
    else:
        assert low.test_acc > ACC_FLOOR[model] - 0.03, low.test_acc
        assert abs(low.test_acc - base.test_acc) <= 0.03, (base.test_acc, low.test_acc)


@pytest.mark.parametrize("model", ["mlp", "cnn", "gpt"])
def test_parity_under_the_planner_at_8x_less_than_fp32(model):
    """The cost-model planner at ``memory_budget=0.125`` (8x fewer saved bytes than fp32; planned
    from its prior, as ``compile_run`` turns the probes off): the same parity bounds as uniform 4
    bits. Measured (seed 0, 2026-12-07): MLP 8.7x fewer saved bytes, CNN 28.9x, TinyGPT 9.0x, each with the
    uncompressed run's accuracy and losses to the digits shown (91.64%, 96.38%; 2.2753 / 2.4236
    nats); earlier plans measured MLP 6.1x, CNN 7.2x (96.10%), TinyGPT 8.1x (train loss +0.17%)."""
    base, low = _train(model, "uncompressed"), _train(model, "budget0.125")
    _compressed(base, low, 5.0 if model == "gpt" else 4.0)
    if model == "gpt":
        assert abs(low.train_loss / base.train_loss - 1) <= 0.03, (base.train_loss, low.train_loss)
        assert abs(low.eval_loss / base.eval_loss - 1) <= 0.03, (base.eval_loss, low.eval_loss)
    else:
        assert low.test_acc > ACC_FLOOR[model], low.test_acc
        assert abs(low.test_acc - base.test_acc) <= 0.01, (base.test_acc, low.test_acc)


@pytest.mark.parametrize("model", ["mlp", "cnn", "gpt"])
def test_parity_holds_with_half_the_backward_rows_sampled(model):
    """Issue 18's parity check with sampling on: the planner at ``memory_budget=0.125`` with
    ``sampling=0.5`` forced on every linear (half the rows of each grad-input and grad-weight GEMM
    dropped by norm, the kept ones reweighted), the bounds of the tests above. ``sampling=True`` is
    the default path but samples few of these small linears (the cost model finds the gathers
    dearer than the rows they skip: 2 of 4 MLP linears, none of TinyGPT's), so the forced ratio is
    the harsher check. Measured (seed 0, 2026-12-07): MLP 91.09% vs 91.64%, CNN 95.82% vs 96.38%,
    TinyGPT train loss +1.3%, held-out +0.8%."""
    from fxlowbit.backend import counters

    base = _train(model, "uncompressed")
    counters.clear()
    low = _train(model, "budget0.125", 0.5)
    assert counters["sampled_linear"] >= (9 if model == "gpt" else 1), dict(counters)  # really sampled
    _compressed(base, low, 5.0 if model == "gpt" else 4.0)
    if model == "gpt":
        assert abs(low.train_loss / base.train_loss - 1) <= 0.03, (base.train_loss, low.train_loss)
        assert abs(low.eval_loss / base.eval_loss - 1) <= 0.03, (base.eval_loss, low.eval_loss)
        assert low.train_loss != base.train_loss  # the sampled backward changed the trajectory
    else:
        assert low.test_acc > ACC_FLOOR[model], low.test_acc
        assert abs(low.test_acc - base.test_acc) <= 0.01, (base.test_acc, low.test_acc)
