"""The CPU pack/decode kernels compiled once per family (codegen/kernels/quant_cpu.py).

Contract: the same bits as the eager references (quant.quantize_pack_reference with
hash_uniform noise, quant.dequantize_unpack_reference) for every input, so ``torch.equal`` on codes,
meta and decoded values, over odd sizes, fp32/bf16/fp16, non-contiguous inputs and non-finite
values (those take the reference, and the test proves that the compiled path's result was not
used for them). One compilation per family, whatever the shapes, and none after
``torch._dynamo.reset()`` or in a later process (the package is loaded).
"""

import sys

import pytest
import torch

from fxlowbit.codegen import ops, rng
from fxlowbit.codegen.kernels import quant as Q
from fxlowbit.codegen.kernels import quant_cpu as C

SEED = torch.tensor(0x1234_5678_9ABC, dtype=torch.int64)


@pytest.fixture(autouse=True)
def _compile_on_first_use(monkeypatch):
    """These tests count compiled calls: families compile on first use, in this process (the
    background compile, the default, and sync's child have their own tests)."""
    monkeypatch.setattr(C, "BACKGROUND", False)
    monkeypatch.setattr(C, "IN_PROCESS", True)


def _reference(x, bits, group_size=256, seed=SEED):
    n_groups = -(-x.numel() // group_size)
    return Q.quantize_pack_reference(x, bits, group_size, Q.hash_uniform(seed, n_groups, group_size))


def _same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


# every width in fp32, both half types at two widths (each family is a 16 s AOTInductor compile on
# 2 cores: the whole cross product would add two minutes to CI for no other code path)
@pytest.mark.parametrize(
    ("bits", "dtype"),
    [(2, torch.float32), (4, torch.float32), (8, torch.float32), (4, torch.bfloat16), (8, torch.float16)],
)
def test_same_bits_as_the_reference_over_sizes_and_dtypes(bits, dtype):
    calls = C.counters["compiled"]
    for n in (257, 512, 3001, 65536 + 7):  # whole and partial last groups
        x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3 + 1).to(dtype)
        got = C.quantize_pack(x, bits, 256, SEED)
        assert _same(got, _reference(x, bits))
        want = Q.dequantize_unpack_reference(*got, bits, 256, [n], dtype)
        assert torch.equal(C.dequantize_unpack(*got, bits, 256, [n], dtype), want)
    assert C.counters["compiled"] - calls == 8  # every call above ran a compiled kernel


def test_other_group_size_and_non_contiguous_input_and_strided_output():
    x = torch.randn(48, 40).t()  # (40, 48), column-major
    codes, meta = C.quantize_pack(x, 4, 64, SEED)
    assert _same((codes, meta), _reference(x, 4, 64))
    shape, stride = [40, 48], [1, 40]
    out = C.dequantize_unpack(codes, meta, 4, 64, shape, torch.float32, stride)
    want = Q.dequantize_unpack_reference(codes, meta, 4, 64, shape, torch.float32, stride)
    assert out.stride() == tuple(stride) and torch.equal(out, want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_take_the_reference_and_come_back_exactly(bad):
    x = torch.randn(1000)
    x[300] = bad
    before = C.counters["reference"]
    got = C.quantize_pack(x, 4, 256, SEED)
    assert C.counters["reference"] == before + 1  # the compiled result was discarded
    assert _same(got, _reference(x, 4))
    back = C.dequantize_unpack(*got, 4, 256, [1000], torch.float32)
    assert C.counters["reference"] == before + 2
    assert torch.equal(back[300:301], x[300:301]) or (bad != bad and back[300].isnan())


def test_finite_values_beyond_half_the_fp32_range_stay_on_the_compiled_path():
    # hi - lo overflows to Inf, yet lo, hi and the (halved) scale are finite: no false alarm
    x = torch.tensor([3e38, -3e38] * 300)
    before = C.counters["reference"]
    got = C.quantize_pack(x, 8, 256, SEED)
    assert C.counters["reference"] == before and _same(got, _reference(x, 8))


def test_single_groups_empty_and_float64_take_the_reference():
    before = C.counters["reference"]
    for x in (torch.randn(200), torch.randn(0), torch.randn(1000, dtype=torch.float64)):
        assert _same(C.quantize_pack(x, 4, 256, SEED), _reference(x, 4))
    assert C.counters["reference"] == before + 3


def test_one_compilation_per_family_whatever_the_shapes_and_none_after_a_dynamo_reset():
    key = ("pack", 2, 128, "float32")
    for n in (1000, 5000, 128 * 7, 77777):
        C.quantize_pack(torch.randn(n), 2, 128, SEED)
    family = C._families[key]
    assert family.fn is not None  # loaded: later calls go straight to the package
    torch._dynamo.utils.counters.clear()
    torch._dynamo.reset()
    x = torch.randn(4321)
    assert _same(C.quantize_pack(x, 2, 128, SEED), _reference(x, 2, 128))
    assert C._families[key] is family and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def _no_compiler(*args, **kwargs):
    raise RuntimeError("no C++ compiler")


@pytest.fixture
def fresh_packages(monkeypatch, tmp_path):
    """No family compiled yet: packages (and the children's) go to an empty directory."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_a_family_that_cannot_compile_warns_once_counts_and_runs_the_reference(monkeypatch, fresh_packages):
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", _no_compiler)
    x = torch.randn(3000, dtype=torch.float16)
    key = ("pack", 8, 512, "float16")
    C._families.pop(key, None)
    C._broken.discard(key)
    failures = C.counters["compile_failures"]
    with pytest.warns(UserWarning, match="could not compile the CPU pack kernel.*no C\\+\\+ compiler"):
        got = C.quantize_pack(x, 8, 512, SEED)
    assert _same(got, _reference(x, 8, 512))
    assert C.counters["compile_failures"] == failures + 1 and key in C._broken
    assert _same(C.quantize_pack(x, 8, 512, SEED), got)  # no second attempt, no second warning
    C._broken.discard(key)


def test_the_op_runs_the_compiled_kernel_on_cpu_unless_told_not_to(monkeypatch):
    x = torch.randn(2000)
    stream = rng.new_stream(7)
    calls = C.counters["compiled"]
    codes, meta = ops.quantize_pack(x, 4, 256, stream)
    assert C.counters["compiled"] == calls + 1
    monkeypatch.setattr(ops, "CPU_COMPILED", False)
    again = rng.new_stream(7)  # the same seed: the same noise
    assert _same(ops.quantize_pack(x, 4, 256, again), (codes, meta))
    assert C.counters["compiled"] == calls + 1


def test_a_child_process_compiles_the_family_while_the_reference_runs_with_the_same_bits(
    monkeypatch, fresh_packages
):
    monkeypatch.setattr(C, "BACKGROUND", True)
    monkeypatch.setattr(C, "IN_PROCESS", False)
    key = ("pack", 4, 64, "bfloat16")
    C._families.pop(key, None)
    x = torch.randn(5000).to(torch.bfloat16)
    pending, compiled = C.counters["pending"], C.counters["compiled"]
    first = C.quantize_pack(x, 4, 64, SEED)  # starts the child, returns the reference's result
    assert C.counters["pending"] == pending + 1 and C._families[key].proc is not None
    C.wait()
    assert C._families[key].proc.returncode == 0
    assert _same(C.quantize_pack(x, 4, 64, SEED), first)  # loaded from the child's package
    assert C._families[key].fn is not None and C.counters["compiled"] == compiled + 1
    assert _same(first, _reference(x, 4, 64))
    # a later process (here: a fresh family) loads the package on first use, no child, no compile
    C._families.pop(key)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", _no_compiler)
    assert _same(C.quantize_pack(x, 4, 64, SEED), first)
    assert C._families[key].proc is None and C.counters["compiled"] == compiled + 2


def test_a_child_that_fails_leaves_the_compile_here_which_fails_warns_and_falls_back(
    monkeypatch, fresh_packages
):
    monkeypatch.setattr(
        C._Family, "child_command", lambda self: [sys.executable, "-c", "raise SystemExit(3)"]
    )
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", _no_compiler)
    monkeypatch.setattr(C, "BACKGROUND", True)
    monkeypatch.setattr(C, "IN_PROCESS", False)
    key = ("pack", 2, 64, "float16")
    C._families.pop(key, None)
    C._broken.discard(key)
    x = torch.randn(3000, dtype=torch.float16)
    assert _same(C.quantize_pack(x, 2, 64, SEED), _reference(x, 2, 64))
    C.wait()
    assert C._families[key].proc.returncode == 3
    with pytest.warns(UserWarning, match="could not compile the CPU pack kernel.*no C\\+\\+ compiler"):
        assert _same(C.quantize_pack(x, 2, 64, SEED), _reference(x, 2, 64))
    assert key in C._broken
    C._broken.discard(key)


def test_children_still_compiling_at_exit_are_stopped_and_the_family_still_works(monkeypatch, fresh_packages):
    monkeypatch.setattr(C, "BACKGROUND", True)
    monkeypatch.setattr(C, "IN_PROCESS", False)
    key = ("pack", 8, 64, "bfloat16")
    C._families.pop(key, None)
    x = torch.randn(3000).to(torch.bfloat16)
    C.quantize_pack(x, 8, 64, SEED)
    proc = C._families[key].proc
    C._stop_children()  # what the interpreter runs at exit
    assert proc.wait() != 0
    assert _same(C.quantize_pack(x, 8, 64, SEED), _reference(x, 8, 64))  # compiled here instead
    assert C._families[key].fn is not None


def test_a_process_that_loaded_packages_leaves_no_unpacked_folder_behind(tmp_path):
    """The package loader unpacks into ``$TMPDIR/aotinductor_*`` and removes that folder only when
    it is destroyed; without ``quant_cpu._unload`` at exit every process left one per family."""
    import os
    import subprocess

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    code = (
        "import torch\n"
        "from fxlowbit.codegen.kernels import quant_cpu as C\n"
        "assert C.quantize_pack(torch.randn(4096), 4, 256, torch.tensor(3)) is not None\n"
        "assert C.counters['compiled'] == 1\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": cache_dir(),
           "FXLOWBIT_CPU_COMPILE": "sync"}  # fmt: skip
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    assert not list(tmp_path.glob("aotinductor_*"))


def test_sync_compiles_inside_a_compiled_graph(tmp_path):
    """``FXLOWBIT_CPU_COMPILE=sync`` used to export the family inside the op's call in the compiled
    graph, where torch.export fails ("SymInt ... is not tracked with proxy"): every family warned
    and ran the reference. Sync now waits for the child that compiles it. A fresh process and an
    empty cache, so the families really compile there."""
    import os
    import subprocess

    code = (
        "import warnings, torch, fxlowbit\n"
        "from fxlowbit.codegen.kernels import quant_cpu as C\n"
        "net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))\n"
        "c = torch.compile(net, backend='lowbit', options={'bits': 4, 'inner': 'eager'})\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error', UserWarning)\n"
        "    c(torch.randn(64, 256)).sum().backward()\n"
        "assert C.counters['compile_failures'] == 0 and C.counters['reference'] == 0, C.counters\n"
        "assert C.counters['compiled'] == 2, C.counters\n"
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "FXLOWBIT_CPU_COMPILE": "sync"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_int8_stochastic_rounding_family_same_bits_odd_rows_dtypes_non_contiguous_non_finite():
    """``quantize_int8_sr`` (a low-bit GEMM's gradient operand, passes/lower_linears.py): the bits of
    int8_gemm.quantize_int8_rowwise with rowwise_noise, one family per (columns, dtype) whatever the
    rows; rows with NaN or Inf come back as the reference's; a single row takes the reference."""
    from fxlowbit.codegen.kernels import int8_gemm as I8

    calls = C.counters["compiled"]
    for rows, dtype in ((300, torch.float32), (17, torch.float32), (5, torch.bfloat16)):
        x = (torch.randn(rows, 2 * 96, generator=torch.Generator().manual_seed(rows)) * 5)[:, ::2].to(dtype)
        x[1, 7], x[2, 3] = float("nan"), float("inf")
        got = C.quantize_int8_sr(x, SEED)
        want = I8.quantize_int8_rowwise(x, I8.rowwise_noise(SEED, rows, 96))
        assert torch.equal(got[0], want[0])
        assert torch.isclose(got[1], want[1], rtol=0, atol=0, equal_nan=True).all()
    assert C.counters["compiled"] - calls == 3
    assert {f for f in C.families() if f[0] == "int8sr"} >= {
        ("int8sr", 8, 96, "float32"),
        ("int8sr", 8, 96, "bfloat16"),
    }
    one, ref = torch.randn(1, 96), C.counters["reference"]
    assert torch.equal(
        C.quantize_int8_sr(one, SEED)[0], I8.quantize_int8_rowwise(one, I8.rowwise_noise(SEED, 1, 96))[0]
    )
    assert C.counters["reference"] == ref + 1


def test_int8_round_to_nearest_family_same_bits_odd_rows_dtypes_non_contiguous_non_finite():
    """``quantize_int8`` (a low-bit GEMM's forward operand or weight, passes/lower_linears.py): the
    bits of int8_gemm.quantize_int8_rowwise without noise, one family per (columns, dtype) whatever
    the rows, NaN and Inf rows included (the body is the reference); a single row takes the
    reference. The op ``fxlowbit::quantize_int8`` gives the same bits on a strided weight view."""
    from fxlowbit.codegen.kernels import int8_gemm as I8

    calls = C.counters["compiled"]
    for rows, dtype in ((300, torch.float32), (17, torch.float32), (5, torch.bfloat16), (3, torch.float16)):
        x = (torch.randn(rows, 2 * 80, generator=torch.Generator().manual_seed(rows)) * 5)[:, ::2].to(dtype)
        x[1, 7], x[2, 3] = float("nan"), float("inf")
        got = C.quantize_int8_rn(x)
        want = I8.quantize_int8_rowwise(x)
        assert torch.equal(got[0], want[0])
        assert torch.isclose(got[1], want[1], rtol=0, atol=0, equal_nan=True).all()
    assert C.counters["compiled"] - calls == 4
    assert {f for f in C.families() if f[0] == "int8rn"} >= {
        ("int8rn", 8, 80, "float32"),
        ("int8rn", 8, 80, "bfloat16"),
        ("int8rn", 8, 80, "float16"),
    }
    one, ref = torch.randn(1, 80), C.counters["reference"]
    assert torch.equal(C.quantize_int8_rn(one)[0], I8.quantize_int8_rowwise(one)[0])
    assert C.counters["reference"] == ref + 1
    w = torch.randn(80, 48)  # a weight read transposed, as the grad-input GEMM reads it
    got, want = torch.ops.fxlowbit.quantize_int8(w.t()), I8.quantize_int8_rowwise(w.t())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
