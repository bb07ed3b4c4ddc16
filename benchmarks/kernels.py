"""Pack/unpack kernel bandwidth on a GPU against the device's own copy bandwidth, one run.

Providers: ``copy`` (``dst.copy_(src)`` of the input: the ceiling), ``inductor`` (our pure-torch
traceable pack/decode compiled by ``torch.compile``: what the inline path gets), ``triton`` (the
hand-written kernels of ``codegen/kernels/*_triton.py``, when present). Bytes counted: every input
read once plus every output written once (codes, scales, masks); GB/s over the median time of
``triton.testing.do_bench``; ``% copy`` is that over the copy's GB/s on the same tensor.

    python benchmarks/kernels.py --out benchmarks/results/kernels_h100.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys

import torch
from _common import meta, write_json

from fxlowbit.codegen.kernels import bitmask, quant

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _triton():
    try:
        return (importlib.import_module("fxlowbit.codegen.kernels.quant_triton"),
                importlib.import_module("fxlowbit.codegen.kernels.bitmask_triton"))  # fmt: skip
    except Exception as err:  # absent, or broken on this machine: the row says so
        print(f"triton kernels unavailable: {type(err).__name__}: {err}")
        return None


def run(numel: int, dtype: torch.dtype, bits_list, group_size: int) -> list[dict]:
    dev = torch.device("cuda")
    torch._dynamo.reset()  # bits are specialised: a fresh cache per size keeps under the recompile limit
    x = torch.randn(numel, device=dev, dtype=dtype)
    seed = torch.tensor(1234, device=dev, dtype=torch.int64)
    rows = []
    dst = torch.empty_like(x)
    copy_ms = _bench(lambda: dst.copy_(x))
    copy_gbps = 2 * _nbytes(x) / copy_ms / 1e6
    rows.append(dict(op="copy", provider="copy", numel=numel, dtype=str(dtype), ms=copy_ms, gbps=copy_gbps))
    tri = _triton()

    def add(op, provider, fn, nbytes):
        ms = _bench(fn)
        gbps = nbytes / ms / 1e6
        rows.append(dict(op=op, provider=provider, numel=numel, dtype=str(dtype), ms=ms, gbps=gbps,
                         pct_copy=100 * gbps / copy_gbps))  # fmt: skip

    shape, stride = list(x.shape), list(x.stride())
    pack = torch.compile(quant.quantize_pack_traceable, dynamic=False)
    decode = torch.compile(quant.dequantize_unpack_traceable, dynamic=False)
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
    packm = torch.compile(bitmask.pack_mask_traceable, dynamic=False)
    unpackm = torch.compile(bitmask.unpack_mask_traceable, dynamic=False)
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
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kernels.py needs a CUDA device")
    rows = []
    for numel in args.numel:
        for d in args.dtypes.split(","):
            rows += run(numel, DTYPES[d], [int(b) for b in args.bits.split(",")], args.group_size)
    print(f"{'op':<12} {'provider':<9} {'numel':>10} {'dtype':<15} {'ms':>8} {'GB/s':>8} {'% copy':>7}")
    for r in rows:
        print(f"{r['op']:<12} {r['provider']:<9} {r['numel']:>10} {r['dtype']:<15} {r['ms']:>8.4f} "
              f"{r['gbps']:>8.1f} {r.get('pct_copy', 100.0):>7.1f}")  # fmt: skip
    result = {"meta": meta(args, "pack/unpack bandwidth vs device copy"), "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
