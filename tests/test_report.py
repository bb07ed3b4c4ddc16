"""fxlowbit.explain / last_report: the table, JSON round trip, HTML structure, the plot, dumps,
logging, and the report of graphs compiled by an ordinary torch.compile (graph breaks included).
Everything compiles with the eager inner compiler except the one Inductor dump test."""

import json
import logging
import math
from html.parser import HTMLParser

import pytest
import torch

import fxlowbit
from fxlowbit import record, report_text
from fxlowbit.examples import MLP, SmallCNN
from fxlowbit.plan import Decision, Form, Plan
from fxlowbit.report import SCHEMA, Report
from fxlowbit.report_build import reason

# mincut off: these tests read the rows of rounded tensors (with it, the MLP's plans at these budgets
# are min-cut's exact re-partition; tests/test_mincut_choice.py reports one)
EAGER = {"inner": "eager", "seed": 0, "mincut": False}
HEADER = ["node", "op", "shape", "dtype", "form", "bits", "gemm", "before", "after", "est.ms", "var%"]


@pytest.fixture(scope="module")
def mlp_report():
    torch.manual_seed(0)
    fxlowbit.reset()
    report = fxlowbit.explain(MLP(), torch.randn(64, 64), memory_budget=0.1, **EAGER)
    report.plan = fxlowbit.last_plans()[-1]  # (the autouse fixture resets fxlowbit before each test)
    yield report
    torch._dynamo.reset()
    fxlowbit.reset()


def test_explain_rows_and_totals(mlp_report):
    (entry,) = mlp_report.entries
    plan = mlp_report.plan
    assert [r.node for r in entry.rows] == [d.name for d in plan.decisions]
    forms = {r.node: r.form for r in entry.rows}
    assert forms["gt"] == Form.MASK and Form.QUANT in forms.values()  # dropout mask; quantized activations
    layers = {r.layer for r in entry.rows if r.bytes_before}
    assert {"net.2", "net.3"} <= layers  # module paths from the forward graph's nn_module_stack
    gt = next(r for r in entry.rows if r.node == "gt")
    assert (gt.op, gt.shape, gt.dtype, gt.bits, gt.gemm) == ("aten.gt.Scalar", [64, 256], "bool", 1, "")
    t = mlp_report.totals
    assert t["graphs"] == 1 and t["bytes_after"] == plan.bytes_after < t["bytes_before"] == plan.bytes_before
    assert t["step_time_after_s"] > t["step_time_before_s"] > 0
    assert math.isclose(sum(r.variance_share for r in entry.rows), 1.0, rel_tol=1e-6)
    assert all(r.reason for r in entry.rows)
    assert set(entry.code) == {"fw_before", "fw_after", "bw_before", "bw_after"}
    assert "quantize_pack" in entry.code["fw_after"] and "quantize_pack" not in entry.code["fw_before"]
    assert isinstance(mlp_report.graphs[0]["bw_after"], torch.fx.GraphModule)
    budgets = [p["budget"] for p in entry.frontier]
    assert budgets[0] == 1.0 and entry.frontier[0]["time_s"] == 0  # no budget: nothing compressed
    sizes = [p["bytes"] for p in entry.frontier]
    assert sizes == sorted(sizes, reverse=True)  # tighter budgets, fewer bytes


def test_text_table_fits_100_columns(mlp_report):
    text = mlp_report.to_text()
    assert str(mlp_report) == text
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    assert lines[0].startswith("fxlowbit report: 1 graph(s); saved activations")
    header = next(ln for ln in lines if ln.startswith("node "))
    assert header.split() == HEADER
    listed = [ln.split()[0] for ln in lines[lines.index(header) + 1 :] if ln and ln[0].isalpha()][:6]
    assert listed == [r.node for r in mlp_report.entries[0].rows if r.bytes_before][:6]
    assert "graph-input aliases saved as they are" in text  # parameters: counted, not listed
    assert "why:" in text and "- kept: the user's batch: kept as it is" in text


def test_rich_text_fits_100_columns(mlp_report):
    pytest.importorskip("rich")
    text = mlp_report.to_text(rich=True)
    assert max(map(len, text.splitlines())) <= 100
    assert any(ln.split() == HEADER for ln in text.splitlines())


def test_json_round_trip(mlp_report):
    doc = json.loads(mlp_report.to_json())
    assert doc["schema"] == SCHEMA and doc["totals"] == mlp_report.totals
    (graph,) = doc["graphs"]
    assert {"index", "status", "budget", "rows", "code", "frontier", "inductor_code"} <= set(graph)
    assert set(graph["rows"][0]) == set(HEADER_FIELDS)
    back = Report.from_json(mlp_report.to_json())
    assert back.to_json() == mlp_report.to_json()
    assert back.entries[0].rows == mlp_report.entries[0].rows and back.graphs == [{}]
    assert back.to_text() == mlp_report.to_text()
    with pytest.raises(ValueError, match="unsupported report schema"):
        Report.from_json(json.dumps({**doc, "schema": "fxlowbit.report/9"}))


HEADER_FIELDS = ["node", "op", "layer", "shape", "dtype", "form", "bits", "gemm", "bytes_before",
                 "bytes_after", "time_s", "variance", "variance_share", "reason"]  # fmt: skip


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.seen, self.attrs, self.th = [], [], [], []
        self.in_th = False

    def handle_starttag(self, tag, attrs):
        self.seen.append(tag)
        self.attrs += attrs
        if tag not in ("meta", "br"):
            self.stack.append(tag)
        self.in_th = tag == "th"

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()
        self.in_th = False

    def handle_data(self, data):
        if self.in_th:
            self.th.append(data)


def test_html_is_self_contained_and_well_formed(mlp_report):
    page = mlp_report.to_html()
    assert page.startswith("<!DOCTYPE html>")
    tags = _Tags()
    tags.feed(page)
    tags.close()
    assert tags.stack == []  # every element closed, properly nested
    assert tags.seen.count("style") == 1 and "script" not in tags.seen and "link" not in tags.seen
    assert not [v for k, v in tags.attrs if k in ("src", "href")]  # no external assets
    assert tags.seen.count("details") >= 4 and tags.seen.count("pre") >= 4  # the four graphs
    assert {"node", "layer", "form", "bits", "gemm", "before", "after", "reason", "budget"} <= set(tags.th)
    assert 'id="graph-0"' in page and "forward graph after rewriting" in page


def test_plot_png_has_the_expected_axes(mlp_report, tmp_path):
    path = tmp_path / "mem.png"
    fig = mlp_report.plot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    mem, front = fig.axes
    assert (mem.get_title(), mem.get_xlabel()) == ("Memory per layer", "saved activation KB")
    assert "net.3" in [t.get_text() for t in mem.get_yticklabels()]
    assert [c.get_label() for c in mem.containers] == ["before", "after"]
    assert front.get_title().startswith("Budget frontier") and front.get_xscale() == "log"
    assert front.get_ylabel() == "estimated added step time, ms"


def test_last_report_one_entry_per_graph():
    def f(x, w):
        y = torch.relu(x @ w)
        torch._dynamo.graph_break()
        return torch.nn.functional.gelu(y @ w.t()).sum()

    x, w = torch.randn(128, 64), torch.randn(64, 256, requires_grad=True)
    torch.compile(f, backend="lowbit", options=EAGER)(x, w).backward()
    report = fxlowbit.last_report()
    assert [e.index for e in report.entries] == [0, 1]
    assert all(e.rows and e.code["fw_before"] != e.code["fw_after"] for e in report.entries)
    fxlowbit.reset()
    assert fxlowbit.last_report().entries == [] and record.records() == []


def test_explain_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = SmallCNN()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 1, 8, 8)
    first = fxlowbit.explain(model, x, bits=4, **EAGER)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN statistics too
    again = fxlowbit.explain(model, x, bits=4, **EAGER)  # compiles afresh: Dynamo's cache not reused
    assert len(first.entries) == len(again.entries) == 1
    assert first.entries[0].status == "uniform 4-bit" and first.entries[0].step_time_s > 0
    assert {r.bits for r in first.entries[0].rows if r.form == Form.QUANT} <= {4, 5, 6}


def test_explain_keyword_inputs_and_bad_options():
    f = torch.nn.Linear(64, 64)
    report = fxlowbit.explain(
        lambda x=None: torch.tanh(f(x)), example_kwargs={"x": torch.randn(64, 64)}, **EAGER
    )
    assert report.entries and report.totals["bytes_before"] > 0
    with pytest.raises(ValueError, match="unknown option"):
        fxlowbit.explain(f, torch.randn(4, 64), budget=0.1)
    assert "nothing requires grad" in fxlowbit.explain(lambda x: x * 2, torch.randn(4), **EAGER).note


def _decision(form, bits=32, why="", masks=0, nbytes=65536, variance=0.0):
    return Decision("t", "aten.mul.Tensor", (128, 128), "float32", form, bits, nbytes, nbytes // 4, why,
                    masks=masks, variance=variance)  # fmt: skip


def test_reasons_one_line_each():
    plan = Plan((), budget=1000, variance_ratio=0.02)
    cfg = fxlowbit.LowbitConfig(min_bytes=8192)
    cases = {
        (Form.KEEP, "below min_bytes=8192"): "kept: below size threshold (min_bytes=8192)",
        (Form.KEEP, "kept: cheapest in time within the budget"): "kept: budget met without compressing it",
        (Form.KEEP, "int64 tensor: kept exact"): "kept: int64 tensor: kept exact",
        (Form.RECOMPUTE, "replayed in the backward: 2 op(s) on x"): "recompute (cheaper than storing)",
        (Form.MASK, "bool mask: 1 bit, exact"): "mask: bool mask",
        (Form.QUANT, "4-bit stochastic rounding"): "quant, to meet the budget: 4-bit",
    }
    for (form, why), expected in cases.items():
        text = reason(_decision(form, why=why), plan, cfg)
        assert text.startswith(expected) and "\n" not in text, text
    uniform = Plan((), status="uniform 2-bit")
    assert reason(_decision(Form.QUANT, 2, "2-bit"), uniform, fxlowbit.LowbitConfig(bits=2)).startswith(
        "quant, uniform rule bits=2"
    )


def test_human_bytes():
    assert [report_text.human_bytes(n) for n in (8, 1024, 2_260_488, 3e9)] == ["8", "1.0K", "2.3M", "3.0G"]


def test_planner_logs_its_plan_at_info(caplog):
    with caplog.at_level(logging.INFO, logger="fxlowbit.planner"):
        fxlowbit.explain(MLP(), torch.randn(32, 64), **EAGER)
    recs = [r for r in caplog.records if r.name == "fxlowbit.planner"]  # a re-plan logs one more
    assert recs and all(r.levelno == logging.INFO and "total saved bytes" in r.getMessage() for r in recs)
    for name in ("analyze", "saved_views", "recompute", "rewrite_saved"):  # one logger per pass
        assert hasattr(__import__(f"fxlowbit.passes.{name}", fromlist=["log"]), "log")


def test_dump_dir_writes_graphs_and_plan(tmp_path, monkeypatch):
    monkeypatch.setenv(record.DUMP_ENV, str(tmp_path))
    torch.compile(MLP(), backend="lowbit", options=EAGER)(torch.randn(32, 64)).sum().backward()
    names = {p.name for p in tmp_path.iterdir()}
    record_files = {f"graph0_{k}.py" for k in ("bw_after", "bw_before", "fw_after", "fw_before")}
    assert record_files | {"graph0_plan.txt"} <= names
    # and the pair after each partition step that ran (fxlowbit/pipeline.py); nothing else
    steps = [s for s in fxlowbit.pipeline.STEPS if fxlowbit.counters[f"step.{s.name}"]]
    parts = {"dynamo": ("gm",), "partition": ("fw", "bw")}
    per_step = {f"graph0_{s.name}_{part}.py" for s in steps for part in parts[s.stage]}
    assert steps and names == record_files | {"graph0_plan.txt"} | per_step
    assert "quantize_pack" in (tmp_path / "graph0_fw_after.py").read_text()
    assert "total saved bytes" in (tmp_path / "graph0_plan.txt").read_text()


def test_dump_dir_with_inductor_writes_generated_code(tmp_path, monkeypatch):
    """Inductor's code of both graphs is kept in the report and written (about 10 s to compile)."""
    monkeypatch.setenv(record.DUMP_ENV, str(tmp_path))
    w = torch.randn(64, 256, requires_grad=True)
    f = torch.compile(lambda x: torch.relu(x @ w).sum(), backend="lowbit", options={"inner": "inductor"})
    f(torch.randn(64, 64)).backward()
    (entry,) = fxlowbit.last_report().entries
    assert set(entry.inductor_code) == {"fw", "bw"}
    for part in ("fw", "bw"):
        code = (tmp_path / f"graph0_{part}_inductor.py").read_text()
        assert code == entry.inductor_code[part] and "def call(" in code


def test_recording_errors_never_break_a_compile(tmp_path, monkeypatch, caplog):
    def boom(rec):
        raise OSError("disk full")

    monkeypatch.setenv(record.DUMP_ENV, str(tmp_path))
    monkeypatch.setattr(record, "_dump", boom)
    with caplog.at_level(logging.WARNING, logger="fxlowbit.record"):
        torch.compile(MLP(), backend="lowbit", options=EAGER)(torch.randn(32, 64)).sum().backward()
    assert fxlowbit.last_plans() and "graph not recorded for reports (OSError: disk full)" in caplog.text


def test_layer_names_are_spelt_as_the_filter_globs_match_them():
    """One module-path spelling (passes/linears.module_name) for reports and *_filter globs:
    a ModuleList's children are ``blocks.0``, not ``blocks[0]``."""
    import fnmatch

    from fxlowbit.examples import TinyGPT, char_batches, stdlib_text

    x, y = next(char_batches(stdlib_text(), 2, 32, 1))
    torch.manual_seed(0)
    report = fxlowbit.explain(TinyGPT(), x, y, inner="eager", calibrate_every=0)
    layers = {r.layer for e in report.entries for r in e.rows if r.layer}
    assert layers and not any("[" in name or "'" in name for name in layers), layers
    assert any(fnmatch.fnmatchcase(name, "blocks.0.*") for name in layers), layers
