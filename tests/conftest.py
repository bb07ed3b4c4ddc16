"""Test set-up: Triton kernels run in the interpreter on machines without a GPU; one thread per
torch op keeps timings steady on small CI machines; the default options plan with the shipped
profile, whatever ``fxlowbit-profile --save`` kept on this machine (tests that want a saved one
write it to this empty folder)."""

import os
import tempfile

import torch

os.environ["FXLOWBIT_PROFILE_DIR"] = tempfile.mkdtemp(prefix="fxlowbit-test-profiles-")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fxlowbit  # noqa: E402,F401
from fxlowbit.codegen.kernels import quant_cpu  # noqa: E402

torch.set_num_threads(1)  # tiny ops: thread start-up costs more than it saves on 2 cores


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch, with no recorded plans and zeroed fxlowbit counters (and no
    CPU kernel still compiling in the background from the previous test).

    AOTAutograd's cache is off in the test process: a hit skips the partition and the rewrites
    (the plan comes back from the journal), so a test that spies on them would see nothing when
    the suite runs a second time on the same Inductor cache (CI's did). Cache hits are tested in
    fresh processes with their own cache folders (test_compile_cache.py)."""
    quant_cpu.wait()
    torch._dynamo.reset()
    fxlowbit.reset(kernels=False)  # compiled CPU kernel families hold no model state: keep them
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    quant_cpu.wait()
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
