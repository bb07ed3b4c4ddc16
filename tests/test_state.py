"""One owner of run-time state (fxlowbit/state.py): every container fxlowbit mutates while
compiling and training is one of ``STATE``'s, and ``fxlowbit.reset()`` releases all of it, so a
deleted model's weights are freed."""

from __future__ import annotations

import gc
import importlib
import pkgutil
import weakref
from collections import Counter, deque

import torch
import torch.nn as nn
from torch.utils.weak import WeakTensorKeyDictionary

import fxlowbit
from fxlowbit.codegen import rng
from fxlowbit.codegen.kernels import quant_cpu
from fxlowbit.state import STATE

_CONTAINERS = (list, dict, set, Counter, deque, WeakTensorKeyDictionary, weakref.WeakKeyDictionary)


def _modules():
    names = ["fxlowbit"]
    for pkg in ("fxlowbit", "fxlowbit.passes", "fxlowbit.codegen", "fxlowbit.codegen.kernels"):
        names += [m.name for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__, pkg + ".")]
    mods = []
    for name in sorted(set(names)):
        if name.endswith("__main__"):
            continue
        mods.append(importlib.import_module(name))
    return mods


def _fingerprint(obj) -> tuple:
    try:
        return (len(obj), repr(sorted(map(repr, obj)))[:2000])
    except TypeError:
        return (len(obj),)


def _module_containers() -> dict[str, object]:
    out = {}
    for mod in _modules():
        for attr, value in vars(mod).items():
            if isinstance(value, _CONTAINERS) and not attr.startswith("__"):
                out[f"{mod.__name__}.{attr}"] = value
    return out


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 8))


def _train(options: dict, steps: int = 12) -> weakref.ref:
    model = _model()
    compiled = torch.compile(model, backend="lowbit", options=options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        compiled(torch.randn(64, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    # the weight's storage, not the Parameter: a detached copy of the weight shares it
    return weakref.ref(model[0].weight.untyped_storage())


OPTIONS = (
    {"inner": "eager"},  # the planner; the first probe runs at step 10, the re-plan at step 11
    {"inner": "eager", "passes": {"plan": False}, "gemm": "off", "sparsity": "2:4"},  # the mask registry
)


def test_only_state_containers_change_while_compiling_and_training():
    """Fingerprint every module-level container of the package, compile and train (planner with
    probes and a re-plan; 2:4 masks), and require that each container that changed is STATE's."""
    before = {k: _fingerprint(v) for k, v in _module_containers().items()}
    for options in OPTIONS:
        _train(options)
    owned = {id(c) for c in STATE.containers().values()}
    changed = [
        k for k, v in _module_containers().items() if _fingerprint(v) != before.get(k) and id(v) not in owned
    ]
    assert not changed, f"run-time state outside fxlowbit.state.STATE: {changed}"
    assert STATE.plans and STATE.records and STATE.counters["probes"] > 0 and STATE.masks


def test_reset_releases_a_deleted_models_weights_and_all_state():
    refs = [_train(options) for options in OPTIONS]
    assert STATE.masks and STATE.generators and STATE.plans
    torch._dynamo.reset()
    fxlowbit.reset()
    gc.collect()
    assert all(r() is None for r in refs), "a deleted model's weight outlived both resets"
    left = {k: len(v) for k, v in STATE.containers().items() if k != "stream_seeds" and len(v)}
    assert not left, f"fxlowbit.reset() left {left}"


def test_mask_registry_holds_no_weight_between_calls():
    _train(OPTIONS[1], steps=2)
    assert STATE.masks and all("w" not in e.state.weights for e in STATE.masks.values())


def test_reset_restarts_a_live_streams_noise_and_never_reuses_ids():
    sid = rng.new_stream(1234)
    first = [int(rng.draw_seed(sid, torch.device("cpu"))) for _ in range(3)]
    fxlowbit.reset(kernels=False)
    assert [int(rng.draw_seed(sid, torch.device("cpu"))) for _ in range(3)] == first  # restarted
    assert rng.new_stream(1234) > sid


def test_reset_kernels_clears_the_cpu_families_only_when_asked():
    STATE.families[("probe",)] = quant_cpu._Family.__new__(quant_cpu._Family)
    STATE.families[("probe",)].proc = None
    fxlowbit.reset(kernels=False)
    assert ("probe",) in quant_cpu._families
    fxlowbit.reset()
    assert not quant_cpu._families and not quant_cpu.counters


def test_rng_fork_leaves_every_stream_where_it_was():
    """Replays (first-batch check, probes) run under rng.fork(): what they draw never moves the
    noise training draws; a stream first used inside starts again from its seed afterwards."""
    used, fresh = rng.new_stream(11), rng.new_stream(12)
    rng.draw_seed(used, torch.device("cpu"))
    want_used = rng.draw_seed(used, torch.device("cpu"))  # control: the stream moves outside fork
    rng.draw_seed(used, torch.device("cpu"))
    fxlowbit.reset()
    used, fresh = rng.new_stream(11), rng.new_stream(12)
    first_fresh = rng.draw_seed(fresh, torch.device("cpu"))
    fxlowbit.reset()
    used, fresh = rng.new_stream(11), rng.new_stream(12)
    rng.draw_seed(used, torch.device("cpu"))
    with rng.fork():
        for _ in range(3):
            rng.draw_seed(used, torch.device("cpu")), rng.draw_seed(fresh, torch.device("cpu"))
    assert torch.equal(rng.draw_seed(used, torch.device("cpu")), want_used)
    assert torch.equal(rng.draw_seed(fresh, torch.device("cpu")), first_fresh)
