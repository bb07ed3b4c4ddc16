"""One step's gradient error from low-bit GEMMs, per model: the gradient of one batch with every
linear's GEMMs in the given formats (``gemm`` option, planner off, eager inner compiler) against
the plain model's, as a share of the gradient's power and of the minibatch variance (estimated
from a second batch, capped by the power: the unit fxlowbit's variance limit uses).

    python benchmarks/gemm_grad_error.py [--models llama,gpt2] [--out results.json]

Issue 18's models and sizes (``benchmarks/speed.py``'s builder: 4 layers, hidden 256, batch 8x128
characters of standard-library source). It asks whether a step's gradient error tells the models'
training losses apart under INT8 GEMMs (it did not, 2026-12-07: README, issue 18's section).
"""

from __future__ import annotations

import argparse
import sys

import _common  # benchmarks/ is the script's directory
import speed
import torch

import fxlowbit
from fxlowbit import examples

FORMATS = {"fwd int8": ("int8", "off", "off"), "fwd+gi int8": ("int8", "int8", "off"), "all int8": "int8"}


def batches(a, n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = examples.stdlib_text()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        i = torch.randint(0, data.numel() - a.seq - 1, (a.batch,), generator=g)
        x = torch.stack([data[j : j + a.seq] for j in i])
        y = torch.stack([data[j + 1 : j + a.seq + 1] for j in i])
        out.append((x, y))
    return out


def gradient(name: str, a, batch, gemm) -> torch.Tensor:
    """The flat gradient of one step of the seeded model ``name`` (``gemm`` None: uncompiled)."""
    torch.manual_seed(0)
    model = speed.build(name, a)
    f = model
    if gemm is not None:
        torch._dynamo.reset()
        fxlowbit.reset()
        options = {"inner": "eager", "passes": {"plan": False}, "gemm": gemm}
        f = torch.compile(model, backend="lowbit", options=options)
    x, y = batch
    f(input_ids=x, labels=y).loss.backward()
    return _common.flat_grad(model).double()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama,gpt2")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    a.layers, a.hidden, a.intermediate, a.heads, a.vocab, a.seq, a.batch = 4, 256, 1024, 4, 128, 128, 8
    torch.set_num_threads(1)
    rows = []
    for name in a.models.split(","):
        b0, b1 = batches(a)
        g0, g1 = gradient(name, a, b0, None), gradient(name, a, b1, None)
        power = float((g0**2).sum())
        unit = min(float(((g0 - g1) ** 2).sum()) / 2, power)
        for label, gemm in FORMATS.items():
            err = float(((gradient(name, a, b0, gemm) - g0) ** 2).sum())
            rows.append({"model": name, "gemms": label, "of_power": err / power, "of_minibatch": err / unit})
            print(f"| {name} | {label} | {err / power:.3g} | {err / unit:.3g} |", flush=True)
    result = {"meta": _common.meta(a, "one step, eager, planner off"), "rows": rows}
    if a.out:
        _common.write_json(a.out, result)
    else:
        print(result["rows"], file=sys.stderr)


if __name__ == "__main__":
    main()
