"""Inductor's CPU kernels of lowbit's graphs compiled a few translation units at a time
(codegen/cpu_batch.py): the same results bit for bit as one kernel per unit, on the default path
and on handwritten kernels with every argument kind; a unit that fails falls back to one by one
with one warning; plain Inductor in the same process is untouched. (A second process compiling
nothing: tests/test_compile_cache.py.)"""

import warnings

import pytest
import torch

import fxlowbit
from fxlowbit.codegen import cpu_batch
from fxlowbit.examples import TinyGPT, char_batches, stdlib_text

# Inductor's shape of a CPU kernel: the prefix header, then one extern "C" kernel
AXPB = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const float* in_ptr0,
                       float* out_ptr0,
                       const int64_t ks0,
                       const float scale)
{
    for (int64_t i = 0; i < ks0; i++) { out_ptr0[i] = in_ptr0[i] * scale + 1.0f; }
}
"""
COUNT = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const bool* in_ptr0, int64_t* out_ptr0, const int64_t ks0)
{
    int64_t n = 0;
    for (int64_t i = 0; i < ks0; i++) { n += in_ptr0[i]; }
    out_ptr0[0] = n;
}
"""
AXPB_TYPES = ["const float*", "float*", "const int64_t", "const float"]
COUNT_TYPES = ["const bool*", "int64_t*", "const int64_t"]


def test_batchable_takes_inductors_shape_only():
    assert cpu_batch.batchable(AXPB) and cpu_batch.batchable(COUNT)
    assert not cpu_batch.batchable(AXPB.replace("#include", "#define X 1\n#include"))
    assert not cpu_batch.batchable(AXPB + "\n#define LEAK 1\n")  # a macro would reach the next kernel
    assert not cpu_batch.batchable(AXPB + '\nextern "C" void other() {}\n')
    assert not cpu_batch.batchable(AXPB.replace('extern "C"  void  kernel(', "void kernel("))
    assert not cpu_batch.batchable("static int helper() { return 1; }\n" + AXPB)


def test_a_unit_calls_each_kernel_with_each_argument_kind():
    batch = cpu_batch._Batch()
    # five kernels: two units on two compile threads (at least MIN_PER_UNIT... or one), each right
    deferred = [batch.add(AXPB_TYPES, AXPB), batch.add(COUNT_TYPES, COUNT)]
    deferred += [batch.add(AXPB_TYPES, AXPB.replace("1.0f", f"{k}.0f")) for k in (2, 3, 4)]
    x = torch.randn(37)
    for k, d in zip((1, 2, 3, 4), [deferred[0], *deferred[2:]], strict=True):
        out = torch.empty(37)
        d(x, out, 37, 0.5)
        torch.testing.assert_close(out, x * 0.5 + k, rtol=0, atol=0)
    flags, total = torch.rand(101) > 0.5, torch.zeros(1, dtype=torch.int64)
    deferred[1](flags, total, 101)
    assert int(total) == int(flags.sum())
    assert fxlowbit.counters["cpu_kernels_batched"] == 5 and fxlowbit.counters["cpu_kernel_units"] >= 1
    with pytest.raises(TypeError, match="tuple of 4 arguments"):
        deferred[0].result()(x, out, 37)


def test_one_compile_thread_compiles_the_unit_in_the_calling_thread():
    """With one compile thread Inductor compiles synchronously and its wait() waits for nothing:
    the generated module's wait() still swaps the deferred kernels for compiled ones."""
    from torch._inductor import config
    from torch._inductor.async_compile import AsyncCompile

    scope = {}
    with config.patch(compile_threads=1), cpu_batch.batched():
        compiler = AsyncCompile()
        for k in range(5):
            scope[f"k{k}"] = compiler.cpp_pybinding(AXPB_TYPES, AXPB.replace("1.0f", f"{k + 10}.0f"))
        assert all(isinstance(v, cpu_batch._Deferred) for v in scope.values())
        compiler.wait(scope)
    assert not any(isinstance(v, cpu_batch._Deferred) for v in scope.values())
    x, out = torch.randn(9), torch.empty(9)
    scope["k3"](x, out, 9, -1.0)
    torch.testing.assert_close(out, 13 - x, rtol=0, atol=0)
    assert fxlowbit.counters["cpu_kernels_batched"] == 5 and fxlowbit.counters["cpu_kernel_units"] == 1


def test_a_unit_that_fails_compiles_its_kernels_one_by_one_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpu_batch, "MIN_PER_UNIT", 100)  # one unit
    batch = cpu_batch._Batch()
    good = batch.add(AXPB_TYPES, AXPB)
    bad = batch.add(COUNT_TYPES, COUNT.replace("n += in_ptr0[i];", "n += undeclared;"))
    x, out = torch.randn(5), torch.empty(5)
    with pytest.warns(UserWarning, match="one unit failed.*one by one"):
        good(x, out, 5, 2.0)
    torch.testing.assert_close(out, x * 2 + 1, rtol=0, atol=0)
    assert fxlowbit.counters["cpu_kernel_units_failed"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process; the bad kernel fails as Inductor's would
        with pytest.raises(Exception, match="undeclared"):
            bad.result()


def _train_tinygpt(dtype: torch.dtype, options: dict, steps: int = 2) -> list[torch.Tensor]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyGPT(layers=1).to(dtype)
    compiled = torch.compile(model, backend="lowbit", options={"seed": 0, **options})
    for x, y in char_batches(stdlib_text(), 4, 32, steps, seed=0):
        model.zero_grad()
        compiled(x, y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "dtype, options",
    [(torch.float32, {}), (torch.bfloat16, {"memory_budget": 0.1})],
    ids=["fp32", "bf16-0.1"],
)
def test_default_path_gives_the_same_gradients_bit_for_bit(monkeypatch, dtype, options):
    """The demo's model on the default path (planner, Inductor; in bf16 at a budget that rounds
    saved tensors): its kernels compile in units, and the gradients equal those of one kernel per
    unit, bit for bit."""
    monkeypatch.setenv(cpu_batch.ENV, "0")
    one_by_one = _train_tinygpt(dtype, options)
    assert fxlowbit.counters["cpu_kernels_batched"] == 0
    fxlowbit.reset(kernels=False)
    monkeypatch.setenv(cpu_batch.ENV, "1")
    units = _train_tinygpt(dtype, options)
    assert fxlowbit.counters["graphs_rewritten"] == 1
    from torch._inductor.async_compile import get_compile_threads

    batched, n_units = fxlowbit.counters["cpu_kernels_batched"], fxlowbit.counters["cpu_kernel_units"]
    assert batched >= 8 and 2 <= n_units <= 2 * max(1, get_compile_threads())  # forward and backward
    assert fxlowbit.counters["cpu_kernel_units_failed"] == 0
    for a, b in zip(one_by_one, units, strict=True):
        assert torch.equal(a, b)


def test_plain_inductor_in_the_same_process_is_untouched():
    cpu_batch.install()

    @torch.compile(backend="inductor")
    def f(x):
        return torch.nn.functional.gelu(x).sum(-1) * 3

    x = torch.randn(8, 33)
    torch.testing.assert_close(f(x), torch.nn.functional.gelu(x).sum(-1) * 3)
    assert fxlowbit.counters["cpu_kernels_batched"] == 0 and fxlowbit.counters["cpu_kernels_unbatched"] == 0
