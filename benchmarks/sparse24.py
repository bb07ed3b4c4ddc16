"""2:4 sparse training: what the masks keep, what MVUE costs in gradient variance, how a small
model trains, and (on CUDA) semi-structured GEMM time against dense.

- masks: Gaussian weights; fraction of sum |w| and of sum w^2 kept by the plain 2:4 mask (top 2 of
  every row group of 4) and by the transposable one (2:4 in w and w^T), and ms per mask.
- mvue: added variance of the grad-weight operand, as a fraction of sum g^2 (so 1.0 = the
  gradient's own energy), for MVUE and for uniform random 2-of-4 (scaled by 2), closed form and
  measured over draws; Gaussian and log-normal (sigma 1.5, skewed like real gradients) inputs.
- train: an MLP (64-256-256-10) on scikit-learn's digits, Adam, dense vs 2:4 variants
  (Sparse24State, masks refreshed every 50 steps); final train loss and test accuracy.
- gemm (CUDA only): F.linear dense vs semi-structured 2:4, bf16, ms and speedup. ``--gemm-only``
  runs this part alone (the device check's GEMM table); ``--gemm-only --cpu-smoke`` runs it on a
  CPU with tiny shapes, where semi-structured sparsity does not exist: the sparse column then
  times the masked dense weight (a stand-in, said in each row), so only the script is checked.

    python benchmarks/sparse24.py [--out results/sparse24_<device>.json] [--quick]
    python benchmarks/sparse24.py --gemm-only [--cpu-smoke] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from _common import meta, time_ms, write_json

from fxlowbit.codegen.kernels.sparse24 import (
    masked_weight,
    mvue24,
    mvue24_probabilities,
    mvue24_reference,
    plain_mask,
    transposable_mask,
)
from fxlowbit.codegen.kernels.sparse24_state import Sparse24State
from fxlowbit.examples import digits


def masks(shapes, device) -> list[dict]:
    rows = []
    for out, inp in shapes:
        w = torch.randn(out, inp, generator=torch.Generator().manual_seed(0)).to(device)
        for name, fn in (("plain", plain_mask), ("transposable", transposable_mask)):
            m = fn(w)
            rows.append(
                {
                    "shape": f"{out}x{inp}",
                    "mask": name,
                    "kept_l1": float((w.abs() * m).sum() / w.abs().sum()),
                    "kept_l2": float((w.square() * m).sum() / w.square().sum()),
                    "ms": time_ms(lambda fn=fn, w=w: fn(w), 3, device=device),
                }
            )
    return rows


def mvue(n, draws, device) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "gaussian": torch.randn(n, generator=gen),
        "lognormal1.5": torch.exp(1.5 * torch.randn(n, generator=gen)) * torch.randn(n, generator=gen).sign(),
    }
    rows = []
    for name, x in inputs.items():
        x = x.to(device)
        energy = x.double().square().sum()
        p = mvue24_probabilities(x.view(-1, 4).abs()).view(-1).double()
        closed = (x.double().square() * (1 / p.clamp(min=1e-30) - 1)).sum() / energy
        y = mvue24_reference(x.repeat(draws), torch.rand(draws * n // 4, generator=gen).to(device))
        measured = y.view(draws, n).double().var(0).sum() / energy
        keys = torch.rand(draws, n // 4, 4, generator=gen).to(device)
        keep = torch.zeros_like(keys, dtype=torch.bool).scatter_(-1, keys.topk(2, -1).indices, True)
        uni = torch.where(keep.view(draws, n), 2 * x, 0.0).double().var(0).sum() / energy
        g = x.repeat(1024 * 1024 // n).view(1024, 1024)  # (tokens, out), groups along tokens
        rows.append(
            {
                "input": name,
                "mvue_var_closed": float(closed),
                "mvue_var_measured": float(measured),
                "uniform_var_measured": float(uni),  # closed form: exactly 1
                "ratio_mvue_over_uniform": float(measured / uni),
                "mvue_ms_per_Melem": time_ms(lambda g=g: mvue24(g, 0, dim=0), 3, device=device),
            }
        )
    return rows


def _mlp():
    torch.manual_seed(0)
    return torch.nn.ModuleDict(
        {"fc1": torch.nn.Linear(64, 256), "fc2": torch.nn.Linear(256, 256), "fc3": torch.nn.Linear(256, 10)}
    )


def train(steps, variant) -> dict:
    x, y = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    net = _mlp()
    names = ("fc1", "fc2")  # the output layer (10 rows) stays dense, as usual
    st = None
    if variant != "dense":
        st = Sparse24State(
            {n: net[n].weight for n in names},
            refresh_every=50,
            dense_after_step=int(steps * 0.8) if variant.endswith("+dense_tail") else None,
            transposable="plain" not in variant,
            mvue="nomvue" not in variant,
            masked_grad="ste" not in variant,
        )
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)

    def forward(xb):
        h = xb
        for n in ("fc1", "fc2"):
            lin = net[n]
            h = F.relu(lin(h) if st is None else st.linear(n, h, lin.weight, lin.bias))
        return net["fc3"](h)

    losses = []
    for _ in range(steps):
        idx = tr[torch.randint(0, len(tr), (64,), generator=gen)]
        loss = F.cross_entropy(forward(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if st is not None:
            st.advance()
        losses.append(loss.item())
    with torch.no_grad():
        if st is not None and not st.dense:
            st.prune_()  # evaluate the deployed sparse model
        acc = (forward(x[te]).argmax(1) == y[te]).float().mean().item()
    return {"variant": variant, "train_loss_last50": statistics.mean(losses[-50:]), "test_acc": acc}


def gemm(shapes, device: str = "cuda") -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    # semi-structured 2:4 tensors are CUDA-only: on a CPU (smoke run) the masked dense weight
    # stands in for the sparse one, so every other line of this function still runs
    to_sparse = to_sparse_semi_structured if device == "cuda" else (lambda wm: wm.clone())
    path = "semi-structured" if device == "cuda" else "masked dense stand-in"
    rows = []
    for n, out, inp in shapes:
        w = torch.randn(out, inp, device=device, dtype=torch.bfloat16)
        wm = masked_weight(w, transposable_mask(w))
        x = torch.randn(n, inp, device=device, dtype=torch.bfloat16)
        ws = to_sparse(wm)
        dense = time_ms(lambda x=x, wm=wm: [F.linear(x, wm) for _ in range(20)], 5, device=device) / 20
        sparse = time_ms(lambda x=x, ws=ws: [F.linear(x, ws) for _ in range(20)], 5, device=device) / 20
        compress = time_ms(lambda wm=wm: to_sparse(wm), 5, device=device)
        rows.append({"shape": f"{n}x{inp}->{out}", "dense_ms": dense, "sparse_ms": sparse,
                     "speedup": dense / sparse, "compress_ms": compress,
                     "sparse_path": path})  # fmt: skip
    return rows


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def _gemm_only(args) -> int:
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("sparse24.py --gemm-only needs a CUDA device (--cpu-smoke checks that it runs)")
    if args.cpu_smoke:
        setup = "CPU smoke run: tiny shapes, masked dense stand-in for 2:4, timings meaningless"
        rows = gemm([(64, 32, 64), (48, 16, 32)], "cpu")
    else:
        setup = "sparse24 GEMM: F.linear bf16 dense vs semi-structured 2:4 (transposable mask)"
        rows = gemm(GEMM_SHAPES)
    result = {"meta": meta(args, setup), "gemm": rows}
    print(f"\ngemm\n{_table(rows)}")
    write_json(args.out, result)
    return 0


GEMM_SHAPES = [(8192, 4096, 4096), (8192, 11008, 4096), (8192, 4096, 11008)]  # (tokens, out, in)


def main(argv=None) -> int | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write JSON here")
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer draws and steps")
    ap.add_argument("--gemm-only", action="store_true", help="only the dense vs 2:4 GEMM table (CUDA)")
    ap.add_argument("--cpu-smoke", action="store_true", help="with --gemm-only: tiny shapes on a CPU")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.gemm_only:
        return _gemm_only(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(768, 768), (1024, 4096)] if args.quick else [(768, 768), (3072, 768), (4096, 4096)]
    result = {"meta": meta(args, "sparse24: masks, MVUE variance, digits MLP, semi-structured GEMM")}
    result["masks"] = masks(shapes, device)
    result["mvue"] = mvue(4096, 1000 if args.quick else 4000, device)
    steps = 300 if args.quick else 1000
    variants = ["dense", "24T", "24T-ste", "24T-nomvue", "24plain-nomvue", "24T+dense_tail"]
    result["train"] = [train(steps, v) for v in variants]
    if device == "cuda":
        result["gemm"] = gemm(GEMM_SHAPES)
    for key, rows in result.items():
        if key != "meta":
            print(f"\n{key}\n{_table(rows)}")
    write_json(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
