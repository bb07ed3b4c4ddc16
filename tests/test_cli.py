"""The ``fxlowbit`` command through subprocesses: help, explain in each format (a factory from a
module or from a file, inputs from specs or from the factory), plot, dumps and errors. The demo's
own run is tested in test_main.py."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fxlowbit.cli import load_factory, main, parse_input_spec
from fxlowbit.report import Report

MLP_ARGS = ["explain", "fxlowbit.examples:MLP", "--input", "x=float32[64,64]", "--budget", "0.2"]


def _run(*args, cwd=None, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "fxlowbit", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_help_names_every_command():
    top = _run("--help").stdout
    for word in ("demo", "profile", "explain", "examples:", "input specs", "vocab=100"):
        assert word in top
    explain = _run("explain", "--help").stdout
    for flag in (
        "MODULE:FACTORY",
        "--input SPEC",
        "--format {text,json,html}",
        "--plot",
        "--dump",
        "--budget",
    ):
        assert flag in explain


@pytest.mark.parametrize("command, flag", [("demo", "--quick"), ("profile", "--out")])
def test_subcommand_help_in_process(command, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and flag in capsys.readouterr().out


def test_explain_text():
    out = _run(*MLP_ARGS).stdout
    lines = out.splitlines()
    assert lines[0].startswith("fxlowbit report: 1 graph(s)") and max(map(len, lines)) <= 100
    assert any(ln.split()[:3] == ["node", "op", "shape"] for ln in lines) and "why:" in lines


def test_explain_json_html_plot_and_dump(tmp_path):
    for fmt in ("json", "html"):
        extra = (
            ["--plot", str(tmp_path / "mem.png"), "--dump", str(tmp_path / "dump")] if fmt == "json" else []
        )
        proc = _run(*MLP_ARGS, "--format", fmt, "--out", str(tmp_path / f"r.{fmt}"), *extra)
        assert f"wrote {tmp_path / f'r.{fmt}'}" in proc.stderr and proc.stdout == ""
    report = Report.from_json((tmp_path / "r.json").read_text())
    assert report.entries[0].options["memory_budget"] == 0.2 and report.entries[0].options["inner"] == "eager"
    assert "<details>" in (tmp_path / "r.html").read_text()
    assert (tmp_path / "mem.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "dump" / "graph0_plan.txt").exists()


def test_explain_factory_from_a_file_returning_model_and_inputs(tmp_path):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Net(torch.nn.Module):
                def __init__(self, width):
                    super().__init__()
                    self.fc = torch.nn.Linear(32, width)

                def forward(self, x, scale=1.0):
                    return torch.nn.functional.silu(self.fc(x)) * scale

            def make(width=128):
                return Net(width), {"x": torch.randn(64, 32), "scale": 2.0}
            """
        )
    )
    by_file = _run(
        "explain", str(tmp_path / "my_models.py") + ":make", "--arg", "width=256", "--format", "json"
    )
    by_module = _run("explain", "my_models:make", "--bits", "4", "--format", "json", cwd=tmp_path)
    wide, narrow = (json.loads(p.stdout) for p in (by_file, by_module))
    batch = 64 * 32 * 4  # the input x, saved for the weight gradient: counted, the same in both
    assert wide["totals"]["bytes_before"] - batch == 2 * (narrow["totals"]["bytes_before"] - batch) > 0
    assert narrow["graphs"][0]["status"] == "uniform 4-bit"


def test_explain_error_is_one_line():
    proc = _run("explain", "fxlowbit.examples:MLP", "--input", "x=float32(4)", check=False)
    assert proc.returncode == 2 and "bad input spec" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["fxlowbit.examples:MLP"], "give example inputs with --input"),
        (["fxlowbit.examples:Nope", "--input", "float32[4,64]"], "Nope"),
        (["fxlowbit.examples:MLP", "--input", "float32[4,64]", "--option", "colour=1"], "unknown option"),
        (["fxlowbit.examples:MLP", "--input", "float32[4,64]", "--arg", "width"], "KEY=VALUE"),
    ],
)
def test_explain_errors_in_process(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["explain", *args, "--threads", "0"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_parse_input_spec():
    name, t = parse_input_spec("input_ids=int64[2,32]:vocab=100")
    assert (name, t.shape, t.dtype) == ("input_ids", (2, 32), torch.int64)
    assert 0 <= int(t.min()) <= int(t.max()) < 100
    name, t = parse_input_spec(" bfloat16[3, 5]:grad=1 ", seed=3)
    assert (name, t.shape, t.dtype, t.requires_grad) == (None, (3, 5), torch.bfloat16, True)
    assert parse_input_spec("bool[7]")[1].dtype == torch.bool
    assert torch.equal(parse_input_spec("float32[4]", seed=1)[1], parse_input_spec("float32[4]", seed=1)[1])
    for bad in ("x=float32", "x=floaty[2]", "x=int64[2]:vocab=a", "x=int64[2]:size=3"):
        with pytest.raises(ValueError, match="bad input spec"):
            parse_input_spec(bad)
    assert load_factory("fxlowbit.examples:TinyGPT").__name__ == "TinyGPT"
    with pytest.raises(ValueError, match="MODULE:FACTORY"):
        load_factory("fxlowbit.examples")
