"""The ``sparsity="2:4"`` option: passes/sparsity.py rewrites matching linears to
``fxlowbit::sparse24_linear`` with a mask kept by ``fxlowbit::sparse24_mask``
(codegen/kernels/sparse24_mask.py): forward values, valid transposable masks, zero gradients of
pruned weights, the refresh and dense schedule, the filter, ineligible shapes, option errors, and a
short training run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxlowbit
from fxlowbit.backend import counters
from fxlowbit.codegen.kernels import sparse24_mask as sm
from fxlowbit.codegen.kernels.sparse24 import is_24, transposable_mask
from fxlowbit.config import LowbitConfig

BASE = {"inner": "eager", "passes": {"plan": False}, "gemm": "off", "sparsity": "2:4"}


def _mlp() -> nn.Module:
    torch.manual_seed(0)  # the last linear's out_features (6) is not a multiple of 4
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 6))


def _compile(model, **options):
    torch._dynamo.reset()
    fxlowbit.reset()
    sm.reset()
    return torch.compile(model, backend="lowbit", options={**BASE, **options})


def _entries() -> dict:
    """module path -> registry entry of the masks called since the last reset."""
    return {sm.MODULES[k]: e for k, e in sm.entries().items()}


def _reference(model, x, masks: dict) -> torch.Tensor:
    for name, layer in model.named_children():
        if isinstance(layer, nn.Linear):
            w = layer.weight * masks[name] if name in masks else layer.weight
            x = F.linear(x, w, layer.bias)
        else:
            x = layer(x)
    return x


def test_forward_is_the_masked_linear_and_masks_are_transposable_24():
    model = _mlp()
    x = torch.randn(10, 16)
    y = _compile(model)(x)
    assert counters["sparse24"] == 2 and counters["sparsity_declined"] == 1
    assert counters["fallback_internal_error"] == 0
    entries = _entries()
    assert set(entries) == {"0", "2"}  # "4": in_features 8 but out_features 6
    masks = {name: e.mask for name, e in entries.items()}
    for m in masks.values():
        assert m.dtype == torch.bool and is_24(m) and is_24(m.t()) and m.float().mean() == 0.5
    assert torch.equal(masks["0"], transposable_mask(model[0].weight))
    torch.testing.assert_close(y, _reference(model, x, masks))


def test_pruned_weights_get_no_gradient_and_keep_their_values():
    model = _mlp()
    before = [layer.weight.detach().clone() for layer in (model[0], model[2])]
    compiled = _compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 16)
    for _ in range(3):
        opt.zero_grad()
        compiled(x).square().mean().backward()
        masks = {name: e.mask for name, e in _entries().items()}
        for name in ("0", "2"):
            g = getattr(model, name).weight.grad
            assert bool((g[~masks[name]] == 0).all()) and g[masks[name]].abs().sum() > 0
        opt.step()
    for w0, name in zip(before, ("0", "2"), strict=True):
        w, m = getattr(model, name).weight.detach(), masks[name]
        assert torch.equal(w[~m], w0[~m]) and not torch.equal(w[m], w0[m])


def test_masks_refresh_every_sparsity_refresh_steps_then_go_dense():
    model = _mlp()
    compiled = _compile(model, sparsity_refresh=3, sparsity_dense_after=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(32, 16)
    seen = []
    for step in range(8):
        opt.zero_grad()
        w = model[0].weight.detach().clone()
        y = compiled(x)
        e = _entries()["0"]
        assert e.calls == step + 1
        seen.append(e.refreshes)
        if step < 7:
            if step % 3 == 0:  # recomputed from the weights of this step
                assert torch.equal(e.mask, transposable_mask(w))
        else:  # dense from step 7 on: the plain model's output
            torch.testing.assert_close(y, _reference(model, x, {}))
        y.square().mean().backward()
        opt.step()
    assert seen == [1, 1, 1, 2, 2, 2, 3, 3]


def test_filter_excludes_a_layer_and_sparsity_beats_gemm_formats():
    model = _mlp()
    x = torch.randn(10, 16)
    y = _compile(model, sparsity_filter={"2": False}, gemm="int8")(x)
    assert counters["sparse24"] == 1 and set(_entries()) == {"0"}
    assert counters["lowbit_gemm"] == 2  # "2" and "4" get the int8 GEMMs, "0" stays sparse
    assert counters["fallback_internal_error"] == 0
    assert y.shape == (10, 6)


def test_in_features_not_a_multiple_of_4_is_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(5, 6)
    y = _compile(model)(x)
    assert counters["sparse24"] == 1 and counters["sparsity_declined"] == 1
    assert set(_entries()) == {"2"}
    torch.testing.assert_close(y, _reference(model, x, {"2": _entries()["2"].mask}))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"sparsity": "1:4"}, "sparsity"),
        ({"sparsity_refresh": 0}, "sparsity_refresh"),
        ({"sparsity_refresh": True}, "sparsity_refresh"),
        ({"sparsity_dense_after": -1}, "sparsity_dense_after"),
        ({"sparsity_dense_after": 1.5}, "sparsity_dense_after"),
        ({"sparsity_filter": ["fc"]}, "sparsity_filter"),
        ({"sparsity_filter": {"fc": "yes"}}, "sparsity_filter"),
        ({"sparsity_filter": {"": True}}, "sparsity_filter"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        LowbitConfig.from_options(options)


def test_config_sparse_filter_first_match_wins():
    cfg = LowbitConfig(sparsity="2:4", sparsity_filter={"head": False, "h*": True})
    assert not cfg.sparse("head") and cfg.sparse("hid") and cfg.sparse("blocks.0.fc1")
    assert not LowbitConfig().sparse("fc") and not LowbitConfig().sparsity_active


def test_short_training_run_loss_decreases_with_half_the_weights_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    teacher = nn.Linear(32, 8)
    x = torch.randn(256, 32)
    target = teacher(x).detach()
    compiled = _compile(model, sparsity_refresh=20)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(compiled(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert counters["sparse24"] == 3
    assert losses[-1] < 0.5 * losses[0], losses
    for name, e in _entries().items():
        w = getattr(model, name).weight.detach()
        assert is_24(w * e.mask) and is_24((w * e.mask).t()) and e.refreshes == 3
