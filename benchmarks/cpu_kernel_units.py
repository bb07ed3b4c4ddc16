"""What Inductor's CPU kernels of one model's lowbit graphs cost to compile: one kernel per
compiler run (Inductor's way) against a few translation units (codegen/cpu_batch.py).

It trains one step of ``--model`` with lowbit at default options and one kernel per unit
(``FXLOWBIT_CPU_KERNEL_UNITS=0``), keeps the C++ source of every kernel Inductor generated for the
forward and the backward, then compiles them again in a fresh cache, timed with nothing else
compiling: each on its own, all in one unit, and in two units (this machine's compile threads,
timed one after the other here). Prints a table and JSON (``--out``).

    python benchmarks/cpu_kernel_units.py --model t5 --out benchmarks/results/cpu_kernel_units_t5_cpu.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxlowbit-units-capture-")
os.environ["FXLOWBIT_CPU_KERNEL_UNITS"] = "0"

from _common import meta, write_json  # noqa: E402  (benchmarks/ is the script's directory)


def capture(model: str) -> list[tuple[list[str], str]]:
    """The (argtypes, source) of every C++ kernel one lowbit training step of ``model`` compiles."""
    import torch
    from compile_time import task
    from torch._inductor.async_compile import AsyncCompile

    kernels: list[tuple[list[str], str]] = []
    original = AsyncCompile.cpp_pybinding

    def keep(self, argtypes, source_code):
        kernels.append((list(argtypes), source_code))
        return original(self, argtypes, source_code)

    AsyncCompile.cpp_pybinding = keep
    try:
        make, loss_of = task(model, 1)
        net = make()
        compiled = torch.compile(net, backend="lowbit")
        loss_of(compiled, 0).backward()
    finally:
        AsyncCompile.cpp_pybinding = original
    return kernels


def _fresh_cache() -> None:
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    from fxlowbit.codegen import cpu_batch

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxlowbit-units-")
    CppPythonBindingsCodeCache.cache_clear()
    cpu_batch._unit_cache().cache.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="t5")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    from fxlowbit.codegen import cpu_batch

    kernels = capture(args.model)
    kernels = list(dict.fromkeys((tuple(a), s) for a, s in kernels))  # Inductor compiles a source once
    kernels = [(list(a), s) for a, s in kernels if cpu_batch.batchable(s)]
    rows = []

    def timed(label: str, units: list[list[tuple[list[str], str]]]) -> None:
        _fresh_cache()
        seconds = []
        for unit in units:
            t0 = time.perf_counter()
            if len(unit) == 1:
                CppPythonBindingsCodeCache.load_pybinding(*unit[0])
            else:
                cpu_batch._unit_cache().load_async(cpu_batch.combined_source(unit), "cpu")()
            seconds.append(time.perf_counter() - t0)
        rows.append({"how": label, "units": len(units), "seconds": [round(s, 3) for s in seconds],
                     "total_s": round(sum(seconds), 3)})  # fmt: skip
        print(
            f"| {label} | {len(units)} | {sum(seconds):.2f} | {min(seconds):.2f}-{max(seconds):.2f} |",
            flush=True,
        )

    print(f"{len(kernels)} distinct C++ kernels in {args.model}'s lowbit graphs (forward and backward)\n")
    print("| how | compiler runs | total s | per run s |\n| --- | ---: | ---: | ---: |")
    _fresh_cache()
    CppPythonBindingsCodeCache.load_pybinding(*kernels[0])  # the precompiled header, built once
    timed("one kernel per run (Inductor)", [[k] for k in kernels])
    timed("all in one unit", [kernels])
    timed("two units", [kernels[0::2], kernels[1::2]])
    setup = (
        "one lowbit training step at default options, kernels captured with units off; "
        "compiled again in fresh caches"
    )
    out = {"meta": meta(args, setup), "model": args.model, "kernels": len(kernels),
           "chars": sum(len(s) for _, s in kernels), "rows": rows}  # fmt: skip
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()
