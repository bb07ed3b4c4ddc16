"""Pack/unpack kernel bandwidth on a GPU against the device's own copy bandwidth, one run.

Providers: ``copy`` (``dst.copy_(src)`` of the input: the ceiling), ``inductor`` (our pure-torch
traceable pack/decode compiled by ``torch.compile``: what the inline path gets), ``triton`` (the
hand-written kernels of ``codegen/kernels/*_triton.py``, when present). Bytes counted: every input
read once plus every output written once (codes, scales, masks); GB/s over the median time of 100
calls after 25 warm-up calls, each timed with CUDA events after flushing L2 (``_common.time_ms``, as
``triton.testing.do_bench`` flushes); ``% copy`` is that over the copy's GB/s on the same tensor.

    python benchmarks/pack_kernels.py --out benchmarks/results/kernels_h100.json
    TRITON_INTERPRET=1 python benchmarks/pack_kernels.py --cpu-smoke  # tiny sizes on a CPU, no compile,
                                                                    # Triton kernels interpreted: it runs
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys

import torch
from _common import DTYPES, meta, time_ms, write_json

from fxlowbit.codegen.kernels import bitmask, quant


def _bench(fn) -> float:
    """Median ms of a kernel on the GPU: L2 flushed before each of 100 timed calls."""
    return time_ms(fn, 100, warmup=25, device="cuda", flush_l2=True)


def _cpu_bench(fn) -> float:
    """Median ms of one call after one warm-up (the smoke run: timings are no figure)."""
    return time_ms(fn, 1, warmup=1)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _triton():
    try:
        return (importlib.import_module("fxlowbit.codegen.kernels.quant_triton"),
                importlib.import_module("fxlowbit.codegen.kernels.bitmask_triton"))  # fmt: skip
    except Exception as err:  # absent, or broken on this machine: the row says so
        print(f"triton kernels unavailable: {type(err).__name__}: {err}")
        return None


def run(numel: int, dtype: torch.dtype, bits_list, group_size: int, smoke: bool = False) -> list[dict]:
    dev = torch.device("cpu" if smoke else "cuda")
    bench = _cpu_bench if smoke else _bench
    torch._dynamo.reset()  # bits are specialised: a fresh cache per size keeps under the recompile limit
    x = torch.randn(numel, device=dev, dtype=dtype)
    seed = torch.tensor(1234, device=dev, dtype=torch.int64)
    rows = []
    dst = torch.empty_like(x)
    copy_ms = bench(lambda: dst.copy_(x))
    copy_gbps = 2 * _nbytes(x) / copy_ms / 1e6
    rows.append(dict(op="copy", provider="copy", numel=numel, dtype=str(dtype), ms=copy_ms, gbps=copy_gbps))
    tri = _triton()

    def add(op, provider, fn, nbytes):
        ms = bench(fn)
        gbps = nbytes / ms / 1e6
        rows.append(dict(op=op, provider=provider, numel=numel, dtype=str(dtype), ms=ms, gbps=gbps,
                         pct_copy=100 * gbps / copy_gbps))  # fmt: skip

    shape, stride = list(x.shape), list(x.stride())
    # the smoke run skips compilation (minutes of Inductor on a CPU): the traceable code runs eagerly
    jit = (lambda fn: fn) if smoke else functools.partial(torch.compile, dynamic=False)
    pack = jit(quant.quantize_pack_traceable)
    decode = jit(quant.dequantize_unpack_traceable)
    part = functools.partial
    for bits in bits_list:
        codes, qm = pack(x, seed, bits, group_size)
        moved = _nbytes(x, codes, qm)
        add(f"pack{bits}", "inductor", part(pack, x, seed, bits, group_size), moved)
        add(
            f"unpack{bits}",
            "inductor",
            part(decode, codes, qm, bits, group_size, shape, dtype),
            moved,
        )
        if tri is not None:
            qt = tri[0]
            add(
                f"pack{bits}",
                "triton",
                part(qt.quantize_pack_triton, x, bits, group_size, seed),
                moved,
            )
            unpack = part(qt.dequantize_unpack_triton, codes, qm, bits, group_size, shape, stride, dtype)
            add(f"unpack{bits}", "triton", unpack, moved)
    mask = x > 0
    packm = jit(bitmask.pack_mask_traceable)
    unpackm = jit(bitmask.unpack_mask_traceable)
    packed = packm(mask)
    moved = _nbytes(mask, packed)
    add("mask_pack", "inductor", part(packm, mask), moved)
    add("mask_unpack", "inductor", part(unpackm, packed, shape), moved)
    if tri is not None:
        bt = tri[1]
        add("mask_pack", "triton", part(bt.pack_mask_triton, mask), moved)
        add("mask_unpack", "triton", part(bt.unpack_mask_triton, packed, shape, stride), moved)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--numel", type=lambda s: [int(eval(v)) for v in s.split(",")], default=[1 << 26, 1 << 22]
    )
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--group-size", type=int, default=256)
    ap.add_argument("--out")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="CPU, 2**14 elements, no compile: it runs (figures meaningless)",
    )
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.numel = [1 << 14]
    elif not torch.cuda.is_available():
        sys.exit("pack_kernels.py needs a CUDA device (--cpu-smoke checks that it runs)")
    rows = []
    for numel in args.numel:
        for d in args.dtypes.split(","):
            bits = [int(b) for b in args.bits.split(",")]
            rows += run(numel, DTYPES[d], bits, args.group_size, args.cpu_smoke)
    print(f"{'op':<12} {'provider':<9} {'numel':>10} {'dtype':<15} {'ms':>8} {'GB/s':>8} {'% copy':>7}")
    for r in rows:
        print(f"{r['op']:<12} {r['provider']:<9} {r['numel']:>10} {r['dtype']:<15} {r['ms']:>8.4f} "
              f"{r['gbps']:>8.1f} {r.get('pct_copy', 100.0):>7.1f}")  # fmt: skip
    setup = "pack/unpack bandwidth vs device copy"
    if args.cpu_smoke:
        setup = "CPU smoke run: tiny size, no compile (the inductor rows ran eagerly), timings meaningless"
    result = {"meta": meta(args, setup), "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
