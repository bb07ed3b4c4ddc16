"""The pipeline (fxlowbit/pipeline.py): one list of named steps, each switchable, each applied by
one helper that times it, counts it, lints the graphs, checks meta["val"] and dumps the graphs;
the hardware profile is loaded once per compile."""

from __future__ import annotations

import pytest
import torch

import fxlowbit
from fxlowbit import config, costmodel, pipeline

from ._util import make


def _compile_step(options: dict, name: str = "gpt") -> None:
    model, inputs, loss_fn = make(name)
    loss_fn(torch.compile(model, backend="lowbit", options=options)(*inputs)).backward()


def test_the_steps_are_the_passes_option_in_order():
    assert tuple(s.name for s in pipeline.STEPS) == config.PASSES
    assert all(s.stage == "dynamo" for s in pipeline.DYNAMO_STEPS)
    assert all(s.stage == "partition" for s in pipeline.PARTITION_STEPS)


def test_default_path_applies_every_partition_step_once_with_meta_vals_kept():
    _compile_step({"inner": "eager"})  # TinyGPT: a fusable loss head; the planner with probes
    c = fxlowbit.counters
    for step in pipeline.PARTITION_STEPS:
        assert c[f"step.{step.name}"] == 1, step.name
    assert c["step.linear_ce"] == 1 and c["step.lowbit_gemm"] == 1  # gemm="auto": the cost model picks
    assert not [k for k in c if k.endswith("nodes_without_val")]
    assert c["fallback_internal_error"] == 0
    (rec,) = fxlowbit.record.records()  # the partition steps' seconds, for the report
    assert set(rec.timings) == {s.name for s in pipeline.PARTITION_STEPS}


@pytest.mark.parametrize("off", ["saved_views", "probes", "analyze", "plan", "recompute", "rewrite_saved"])
def test_each_step_switches_off_and_what_needs_it_does_not_run(off):
    _compile_step({"inner": "eager", "passes": {off: False}}, name="mlp")
    c = fxlowbit.counters
    assert c[f"step.{off}"] == 0
    needs = {
        "analyze": {"probes", "plan", "recompute", "rewrite_saved"},
        "plan": {"probes", "recompute", "rewrite_saved"},
    }
    for step in pipeline.PARTITION_STEPS:
        if step.name != off:
            assert c[f"step.{step.name}"] == (0 if step.name in needs.get(off, ()) else 1), step.name
    assert c["fallback_internal_error"] == 0
    assert c["probes"] == 0 if off == "probes" else True
    assert bool(fxlowbit.last_plans()) == (off not in ("analyze", "plan"))


def test_the_reports_before_graphs_are_the_probes_pristine_pair_taken_before_any_rewrite():
    """One copy of the pair serves the report's "before" graphs and the probes' replays (the report
    used to keep its own copies, taken before saved_views: two more graph copies per compile and one
    more graph pair pickled into the journal); it is taken after saved_views, before the rewrites."""
    import torch.nn.functional as F

    from ._util import MLP, through_partitioner

    torch.manual_seed(0)
    x, y = torch.randn(64, 64), torch.arange(64) % 10
    partitioner, _ = through_partitioner(MLP(hidden=128, dropout=0.0), lambda out: F.cross_entropy(out, y), x)
    (rec,) = fxlowbit.record.records()
    fw, bw, _ = partitioner.pristine
    assert rec.graphs["fw_before"] is fw and rec.graphs["bw_before"] is bw
    assert fxlowbit.counters["graphs_rewritten"] == 1

    def ops(gm):
        return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}

    assert not any("fxlowbit" in t for t in ops(fw) | ops(bw))  # no pack, no decode yet
    assert any("fxlowbit" in t for t in ops(rec.graphs["fw_after"]))


@pytest.mark.parametrize("budget", [1.0, 0.1], ids=["exact", "rounded"])
def test_a_graph_no_rewrite_touched_is_recorded_and_journaled_once(tmp_path, budget):
    """An exact plan rewrites nothing: its "after" graphs are the "before" copies themselves, in the
    report and in the journal a cache hit loads (T5's journal pickled its 1.9 MB pair twice, 0.32 s
    each, CPU, 2026-12-07). A plan that rounds keeps its own after graphs, in both."""
    import pickle
    from collections import Counter

    import torch.nn.functional as F

    from fxlowbit import backend

    from ._util import MLP, through_partitioner

    torch.manual_seed(0)
    x, y = torch.randn(64, 64), torch.arange(64) % 10
    loss = lambda out: F.cross_entropy(out, y)  # noqa: E731
    partitioner, _ = through_partitioner(MLP(hidden=128, dropout=0.0), loss, x, memory_budget=budget)
    (rec,) = fxlowbit.record.records()
    g = rec.graphs
    untouched = budget == 1.0
    assert fxlowbit.counters["graphs_rewritten"] == 1
    assert (g["fw_after"] is g["fw_before"] and g["bw_after"] is g["bw_before"]) == untouched
    same = fxlowbit.passes._graph.same_graph
    assert (same(g["fw_after"], g["fw_before"]) and same(g["bw_after"], g["bw_before"])) == untouched
    partitioner.journal = tmp_path / "journal"
    partitioner._write_journal((g["fw_before"], g["bw_before"]), None, Counter(), [])
    _, _, shown = pickle.loads(partitioner.journal.read_bytes())
    kept = backend._loads(shown)
    assert kept["before"] is None  # the pristine pair's, pickled once with it
    assert (kept["after"] == (None, None)) == untouched
    hit = backend.LowbitPartitioner(partitioner.cfg, seed=0)
    hit.journal = partitioner.journal
    assert hit.restore()
    loaded = fxlowbit.record.records()[-1].graphs
    for part in fxlowbit.record.PARTS:
        assert [n.name for n in loaded[part].graph.nodes] == [n.name for n in g[part].graph.nodes]
    assert (loaded["fw_after"] is loaded["fw_before"]) == untouched


def test_the_profile_is_parsed_once_per_process(monkeypatch):
    """The options' check, the loss fusion, the GEMM choice, the planner and a second compile all
    share one parsed profile (it was read up to three times per compile)."""
    parses = []
    real = costmodel.HardwareProfile.from_dict.__func__

    def counting(cls, d):
        parses.append(d.get("kind"))
        return real(cls, d)

    monkeypatch.setattr(costmodel.HardwareProfile, "from_dict", classmethod(counting))
    fxlowbit.reset()  # forget the profiles parsed by earlier tests
    for _ in range(2):
        torch._dynamo.reset()
        _compile_step({"inner": "eager", "gemm": "int8", "calibrate_every": 0})  # every profile user runs
    assert fxlowbit.counters["step.lowbit_gemm"] == 2 and fxlowbit.counters["step.linear_ce"] == 2
    assert len(parses) == 1


def test_a_step_that_breaks_the_graph_is_caught_by_the_lint_and_falls_back(monkeypatch):
    real = fxlowbit.passes.saved_views.run

    def corrupt(fw, bw, **kw):
        out = real(fw, bw, **kw)
        last = list(fw.graph.nodes)[-2]  # the node before the output
        with fw.graph.inserting_before(next(iter(fw.graph.nodes))):  # used before it is defined
            fw.graph.call_function(torch.ops.aten.neg.default, (last,))
        return out

    monkeypatch.setattr(fxlowbit.passes.saved_views, "run", corrupt)
    with pytest.warns(UserWarning, match="internal error.*runs uncompressed"):
        _compile_step({"inner": "eager", "calibrate_every": 0}, name="mlp")
    assert fxlowbit.counters["fallback_internal_error"] == 1


def test_a_node_without_meta_val_is_counted_and_raises_under_strict(monkeypatch):
    real = fxlowbit.passes.recompute.run

    def careless(fw, bw, *args, **kw):
        real(fw, bw, *args, **kw)
        out = fw.graph.find_nodes(op="output")[0]
        with fw.graph.inserting_before(out):
            fw.graph.call_function(torch.ops.aten.neg.default, (fw.graph.find_nodes(op="placeholder")[0],))

    monkeypatch.setattr(fxlowbit.passes.recompute, "run", careless)
    _compile_step({"inner": "eager", "calibrate_every": 0}, name="mlp")
    assert fxlowbit.counters["step.recompute.nodes_without_val"] == 1
    torch._dynamo.reset()
    with pytest.raises(Exception, match="step recompute left 1 node"):
        _compile_step({"inner": "eager", "calibrate_every": 0, "strict": True}, name="mlp")


def test_graphs_are_dumped_after_every_step(monkeypatch, tmp_path):
    monkeypatch.setenv("FXLOWBIT_DUMP_DIR", str(tmp_path))
    _compile_step({"inner": "eager", "calibrate_every": 0})
    names = {p.name for p in tmp_path.iterdir()}
    for step in ("saved_views", "analyze", "plan", "recompute", "rewrite_saved"):
        assert {f"graph0_{step}_fw.py", f"graph0_{step}_bw.py"} <= names, step
    assert any(n.endswith("_linear_ce_gm.py") for n in names)
    assert "graph0_fw_after.py" in names  # the record's own dump is still there


@pytest.mark.parametrize("strict", [False, True])
def test_analysis_off_trains_past_the_probe_steps_with_no_fallback(strict):
    """With ``analyze`` off there is no plan to revisit: no probes run (they used to fail at step 11
    with an AttributeError), nothing falls back, and strict mode has nothing to raise."""
    model, inputs, loss_fn = make("mlp")
    compiled = torch.compile(model, backend="lowbit", options={"inner": "eager", "passes": {"analyze": False},
                                                               "strict": strict})  # fmt: skip
    for _ in range(12):
        loss_fn(compiled(*inputs)).backward()
    c = fxlowbit.counters
    assert c["step.analyze"] == 0 and c["step.probes"] == 0 and c["probes"] == 0
    assert c["probes_disabled"] == 0 and c["fallback_internal_error"] == 0
