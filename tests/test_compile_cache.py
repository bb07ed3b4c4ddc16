"""AOTAutograd's and Inductor's on-disk caches across processes, on the default path (planner,
probes, Inductor).

What a cache hit may never do (issue 17): reuse a stale plan or share a random stream. What
decides a plan (options, profile, sensitivities, our code) is in the partitioner's uuid, so in
both caches' keys: a changed plan input compiles anew. The rounding noise is drawn at run time from
the stream's generator (seeded from the ``seed`` option or torch's seed), so another seed never
replays the first one's noise, and a second process with the same seed reproduces the first bit
for bit. A hit skips the partitioner: what it left (plan, analysis, the graphs the probes replay,
counters) comes back from beside the cache, so probes and reports work as after a compile.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import hashlib, json, sys
import torch
import fxlowbit
from torch._dynamo.utils import counters
from fxlowbit.examples import MLP

if sys.argv[3] == "pessimistic":  # probes measure 1e6x the prior's error: the guard re-plans
    import dataclasses
    from fxlowbit import calibrate

    real = calibrate.probe_sensitivity

    def pessimistic(*args, **kwargs):
        probe = real(*args, **kwargs)
        return dataclasses.replace(probe, sensitivity={k: 1e6 * v for k, v in probe.sensitivity.items()})

    calibrate.probe_sensitivity = pessimistic
pristine_loads = 0
loads = fxlowbit.backend._loads


def counting_loads(data):
    global pristine_loads
    entry = loads(data)
    pristine_loads += "pristine" in entry
    return entry


fxlowbit.backend._loads = counting_loads
from torch._inductor import cpp_builder

builds = 0
build = cpp_builder.CppBuilder.build


def counting_build(self):  # compiles to a library (not the header's preprocessing for its hash)
    global builds
    builds += self.get_target_file_path().endswith(".so")
    return build(self)


cpp_builder.CppBuilder.build = counting_build
torch.set_num_threads(1)
torch.manual_seed(0)
model = MLP(hidden=256, dropout=0.0)
if sys.argv[4] == "three graphs":  # graph breaks after the GELU and the next ReLU
    parts = model.net[:5], model.net[5:7], model.net[7:]

    def forward(x):  # (a graph break inside a loop would make Dynamo skip the whole frame)
        x = parts[0](x)
        torch._dynamo.graph_break()
        x = parts[1](x)
        torch._dynamo.graph_break()
        return parts[2](x)

    compiled = torch.compile(forward, backend="lowbit", options=json.loads(sys.argv[1]))
else:
    compiled = torch.compile(model, backend="lowbit", options=json.loads(sys.argv[1]))
g = torch.Generator().manual_seed(1)
for step in range(int(sys.argv[2])):
    model.zero_grad()
    x, y = torch.randn(512, 64, generator=g), torch.randint(0, 10, (512,), generator=g)
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
grad = torch.cat([p.grad.flatten() for p in model.parameters()])
pristine_loads_in_training = pristine_loads  # the report below loads it (its "before" graphs)
report = fxlowbit.last_report()
last_graphs = fxlowbit.backend.last_graphs
print(json.dumps({
    "grad": hashlib.sha256(grad.numpy().tobytes()).hexdigest(),
    "hits": counters["inductor"]["fxgraph_cache_hit"],
    "misses": counters["inductor"]["fxgraph_cache_miss"],
    "aot_hits": counters["aot_autograd"]["autograd_cache_hit"],
    "aot_misses": counters["aot_autograd"]["autograd_cache_miss"],
    "restored": fxlowbit.counters["cache_hits"],
    "lost": fxlowbit.counters["cache_hits_without_plan"],
    "rewritten": fxlowbit.counters["graphs_rewritten"],
    "probes": fxlowbit.counters["probes"],
    "checks_kept": fxlowbit.counters["prior_checks_kept"],
    "prior_misses": fxlowbit.counters["prior_misses"],
    "pristine_loads": pristine_loads_in_training,
    "variants": fxlowbit.counters["plan_variants"],
    "cpp_builds": builds,
    "kernel_units": fxlowbit.counters["cpu_kernel_units"],
    "plans": [p.signature() for p in fxlowbit.last_plans()],
    "reported": [[r.form for r in e.rows] for e in report.entries],
    "graphs": [{k: len(g.graph.nodes) for k, g in d.items()} for d in report.graphs],
    "values": [sum("val" in n.meta for g in gs for n in g.graph.nodes) for gs in last_graphs()],
}, default=str))
"""


def _run(cache, options: dict, steps: int = 1, probes: str = "as measured", graphs: str = "one") -> dict:
    """One process's run. ``mincut`` is off unless ``options`` say otherwise: the noise, probes
    and re-plans these tests follow need a rounding plan, and with min-cut's partition weighed in
    this MLP's plans are exact."""
    options = {"mincut": False, **options}
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    cmd = [sys.executable, "-c", SCRIPT, json.dumps(options), str(steps), probes, f"{graphs} graphs"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("inductor-cache")
    settings = ({"seed": 3}, {"seed": 3}, {"seed": 4}, {"seed": 3, "memory_budget": 0.5})
    return tuple(_run(cache, options) for options in settings)  # in this order, one cache


def test_a_second_process_hits_the_cache_and_reproduces_the_first(runs):
    first, again, _, _ = runs
    assert first["rewritten"] == again["rewritten"] == 1  # compressed, not a fallback
    assert first["aot_misses"] == 1 and first["restored"] == 0
    # AOTAutograd's cache served the whole graph: no trace, no partition, no Inductor compile
    assert again["aot_hits"] == 1 and again["aot_misses"] == 0 and again["misses"] == 0
    # nor a C++ compile: the CPU kernels' units (codegen/cpu_batch.py) come back from the disk cache
    assert first["kernel_units"] >= 2 and first["cpp_builds"] >= 2  # forward and backward
    assert again["kernel_units"] == first["kernel_units"] and again["cpp_builds"] == 0
    assert again["restored"] == 1 and again["lost"] == 0  # the plan came back with it
    assert again["plans"] == first["plans"] and again["reported"] == first["reported"] != []
    assert again["graphs"] == first["graphs"]  # the graphs reports show, before and after rewriting
    # last_graphs(): a hit's nodes keep their fake values (as partitioned; Inductor drops some later)
    assert all(hit >= cold > 0 for hit, cold in zip(again["values"], first["values"], strict=True))
    assert again["grad"] == first["grad"]  # bit for bit


def test_a_hit_trusts_the_first_batch_check_of_the_process_that_compiled_it(runs):
    """The first process checks the prior plan on its first batch (it passes: no miss) and marks
    the journal; the second skips the check, and its first step never loads the pristine graphs
    (they load when the first probe, at step 10, needs them)."""
    first, again, _, _ = runs
    assert first["prior_misses"] == again["prior_misses"] == 0
    assert first["checks_kept"] == 0 and again["checks_kept"] == 1
    assert again["pristine_loads"] == 0


def test_a_skipped_check_leaves_the_later_graphs_ids_alone(tmp_path):
    """Three graphs (two graph breaks): the cold process checks the second graph's plan (it rounds
    that graph's input) on the first batch; the warm one skips that check, and the third graph,
    compiled after it, still hits. The check's rounding stream once took the next stream id, so
    a warm process gave every later graph another id than the cold one, and another key: GPT-2's
    loss graph compiled anew in every warm process (7.3 s against 6.0 s, at 004f285)."""
    first, again = (_run(tmp_path, {"seed": 3}, graphs="three") for _ in range(2))
    assert first["aot_misses"] == 3 and first["checks_kept"] == 0
    assert any(form == "quant" for plan in first["plans"] for _, form, _ in plan)  # a check ran
    assert again["aot_hits"] == 3 and again["aot_misses"] == 0 and again["checks_kept"] == 3
    assert again["grad"] == first["grad"]


def test_probes_and_re_plans_run_on_a_cache_hit_and_a_variant_hits_too(tmp_path):
    """The probe at step 2 finds 1e6x the prior's error; the guard re-plans at step 3 and compiles
    a variant outside Dynamo, on the real batch. The second process hits on both graphs (a variant
    once compiled cold in every process: the caches want a shape environment, which
    ``compile_graph`` now gives it)."""
    options = {"seed": 3, "calibrate_every": 2}
    first, again = (_run(tmp_path, options, steps=4, probes="pessimistic") for _ in range(2))
    assert first["variants"] == again["variants"] == 1
    assert first["aot_misses"] == 2 and first["aot_hits"] == 0
    assert again["aot_hits"] == 2 and again["aot_misses"] == 0 and again["restored"] == 2
    assert first["probes"] == again["probes"] >= 1
    # the first partition's pristine pair, loaded by the probe at step 2 (the hit skipped the
    # first-batch check; probes always replay the first partition, whatever variant runs)
    assert again["pristine_loads"] == 1
    assert again["plans"] == first["plans"] and len(first["plans"]) == 2
    assert again["grad"] == first["grad"]


def test_another_seed_reuses_the_code_but_never_replays_the_first_seeds_noise(runs):
    first, _, other_seed, _ = runs
    # the seed is not in the code (it seeds the stream the code names, at run time), so it is left
    # out of the keys (backend.LowbitPartitioner.uuid and __getstate__): a hit, with other noise
    assert other_seed["rewritten"] == 1
    assert other_seed["aot_hits"] == 1 and other_seed["misses"] == 0
    assert other_seed["grad"] != first["grad"]


def test_a_changed_plan_compiles_anew(runs):
    first, _, _, budget = runs
    assert budget["aot_misses"] == 1 and budget["restored"] == 0 and budget["misses"] > 0
    assert budget["plans"] != first["plans"]
    assert budget["grad"] != first["grad"]


def test_two_models_in_one_process_draw_different_noise():
    """Two copies of one model, compiled in one process with Inductor (same graph, same options):
    each graph names its own random stream, so neither hits the other's cached code and they draw
    different rounding noise on the same batch (the seed comes from torch's, per graph)."""
    import copy

    import torch

    import fxlowbit  # noqa: F401  (registers the backend)
    from fxlowbit.examples import MLP

    torch.manual_seed(0)
    first = MLP(hidden=256, dropout=0.0)
    models = (first, copy.deepcopy(first))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 64, generator=g), torch.randint(0, 10, (512,), generator=g)
    grads = []
    for model in models:
        compiled = torch.compile(model, backend="lowbit", options={"bits": 4})
        torch.nn.functional.cross_entropy(compiled(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    exact = torch.func.grad(
        lambda params: torch.nn.functional.cross_entropy(torch.func.functional_call(first, params, (x,)), y)
    )(dict(first.named_parameters()))
    exact = torch.cat([exact[n].flatten() for n, _ in first.named_parameters()])
    assert not torch.equal(grads[0], grads[1])
    for grad in grads:  # noise, not garbage: both near the exact gradient (4-bit MLP: ~18 dB in the README)
        assert 10 * torch.log10(exact.square().sum() / (grad - exact).square().sum()) > 12


def test_a_mincut_partition_comes_back_from_the_cache(tmp_path):
    """At 0.05 this MLP's exact replays miss the budget and min-cut's re-partition is kept: a second
    process hits on it, gets the same plan back (its partition is in the signature) and the same
    gradient bit for bit."""
    options = {"seed": 3, "memory_budget": 0.05, "mincut": True}
    first, again = (_run(tmp_path, options) for _ in range(2))
    assert any(row[0] == "partition" for plan in first["plans"] for row in plan)
    assert again["aot_hits"] == 1 and again["aot_misses"] == 0 and again["restored"] == 1
    assert again["plans"] == first["plans"] and again["grad"] == first["grad"]


@pytest.mark.parametrize("options", [{"gemm": "int8"}, {"sparsity": "2:4"}], ids=["int8", "2:4"])
def test_low_bit_and_sparse_gemms_come_back_from_the_cache(tmp_path, options):
    """The lowbit_gemm and sparsity passes call their ops themselves in the Dynamo graph (a Python
    wrapper there made AOTAutograd's cache bypass the graph: every process compiled them cold): a
    second process hits, and its INT8 / 2:4 linears give the same gradient bit for bit (the 2:4
    masks are rebuilt from the same weights under the same keys). With 2:4 the first-batch check
    re-plans before the first step: the first plan's graph never runs a backward, and AOTAutograd
    saves an entry only once the backward is compiled, so that graph misses again and the variant
    that trained hits."""
    options = {"seed": 3, **options}
    first, again = (_run(tmp_path, options) for _ in range(2))
    assert first["aot_hits"] == 0 and again["aot_hits"] == 1 and again["restored"] == 1
    assert again["aot_misses"] == first["aot_misses"] - 1 == first["variants"]
    assert again["grad"] == first["grad"]
