import pytest
import torch

from fxlowbit import LowbitConfig


def test_defaults_are_valid():
    cfg = LowbitConfig.from_options(None)
    assert cfg.bits is None and cfg.mode == "balanced" and cfg.inner == "inductor" and cfg.group_size == 256


def test_unknown_option_names_it_and_lists_valid():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bitz'\].*valid options: \[.*'bits'"):
        LowbitConfig.from_options({"bitz": 4})


@pytest.mark.parametrize(
    "options,match",
    [
        ({"bits": 3}, r"bits=3 is invalid; valid values: \(None, 2, 4, 8\)"),
        ({"inner": "tvm"}, r"inner='tvm' is invalid; valid values: \('inductor', 'eager'\)"),
        ({"group_size": 100}, r"group_size=100 is invalid"),
        ({"group_size": 0}, r"group_size=0 is invalid"),
        ({"min_bytes": -1}, r"min_bytes=-1"),
        ({"seed": "x"}, r"seed='x'"),
        ({"strict": "yes"}, r"strict='yes' must be a bool"),
        ({"passes": {"nope": False}}, r"unknown pass name\(s\) \['nope'\].*valid: \("),
    ],
)
def test_bad_values_raise(options, match):
    with pytest.raises(ValueError, match=match):
        LowbitConfig.from_options(options)


def test_bad_option_surfaces_through_torch_compile():
    model = torch.compile(torch.nn.Linear(4, 4), backend="lowbit", options={"bits": 5})
    with pytest.raises(Exception, match="bits=5 is invalid"):
        model(torch.randn(2, 4))


@pytest.mark.parametrize(
    "opts,device,inline,quant_op",
    [
        ({}, "cpu", True, True),  # hybrid: quantizing packs call the compiled op
        ({}, "cuda", False, False),
        ({"kernels": "inline"}, "cpu", True, False),
        ({"kernels": "inline"}, "cuda", True, False),
        ({"kernels": "hybrid"}, "cuda", True, True),
        ({"kernels": "ops"}, "cpu", False, False),
        ({"kernels": "inline", "inner": "eager"}, "cpu", False, False),
        ({"kernels": "hybrid", "inner": "eager"}, "cpu", False, False),
    ],
)
def test_kernels_option_picks_inline_or_ops(opts, device, inline, quant_op):
    cfg = LowbitConfig.from_options(opts)
    assert cfg.inline_kernels(device) is inline
    assert cfg.quant_op(device) is quant_op


def test_bad_kernels_option_names_the_choices():
    with pytest.raises(ValueError, match="kernels='cuda'.*'inline', 'hybrid', 'ops'"):
        LowbitConfig.from_options({"kernels": "cuda"})


def test_kernels_triton_is_the_old_name_of_ops():
    """The opaque ops run Triton only on CUDA, so the option value says "ops"; "triton" still works,
    with a FutureWarning naming the new value, and is stored as "ops"."""
    with pytest.warns(FutureWarning, match='kernels="ops"'):
        cfg = LowbitConfig.from_options({"kernels": "triton"})
    assert cfg.kernels == "ops" and not cfg.inline_kernels("cpu") and not cfg.inline_kernels("cuda")
