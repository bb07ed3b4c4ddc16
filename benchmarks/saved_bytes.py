"""Saved-activation bytes and gradient quality: lowbit against PyTorch's own memory savers.

For each model, one training step (forward + backward, fp32, CPU) under each provider:

- ``aot_eager``: the fp32 reference for bytes (and for the gradients of the exact providers);
- ``budget=B``: ``torch._functorch.config.activation_memory_budget=B`` with ``aot_eager``
  (min-cut recompute knapsack; exact gradients without dropout. With dropout it may recompute the
  dropout in the backward with a fresh mask, pytorch/pytorch#190758, hence ``--dropout`` 0 by
  default so every row's gradients compare with the same reference);
- ``fp8 pass``: Inductor's ``activation_quantization_aten_pass`` (fp8 e5m2 saved activations,
  implemented in ``torch/_functorch/partitioners.py``) run through ``aot_eager``. With its default
  options it only touches bf16 tensors of at least 100 MB, so on these fp32 models it does not fire
  (the row says so); the ``fp8 pass fp32`` row forces it on with
  ``allowed_dtypes=float32, size_in_mb=0, use_scaling=True`` (``use_scaling`` must be given: the
  pass's forward half defaults it to True and its backward half to False, which corrupts gradients).
  Forced on, it also quantizes the causal attention mask of GPT-2 and Llama; the mask holds -inf, its
  per-tensor scale ``max_fp8 / amax`` becomes 0 and the stored mask NaN, so those gradients are NaN;
- ``lowbit`` uncompressed (``passes={"plan": False}``: same decompositions, partition and
  dropout RNG; the gradient reference of the compressed rows) and ``lowbit`` at each bit width.

Saved bytes are walked from ``loss.grad_fn`` after the forward (``fxlowbit.saved_activation_bytes``,
parameters excluded). Gradient SQNR is over all parameter gradients concatenated, against the
provider's reference (``aot_eager`` or ``lowbit`` uncompressed). Step ms is the median of a few
forward+backward steps after compilation (noisy on shared CPUs; compile time is separate; lowbit's
pack/unpack run as pure-torch reference kernels with ``--inner eager``, so its step ms there is not a
speed claim).

    python benchmarks/saved_bytes.py --out benchmarks/results/saved_bytes_cpu.json
    python benchmarks/saved_bytes.py --models gpt2,llama --bits 4 --inner inductor
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
import warnings

if __name__ == "__main__":  # the quantize kernels run in the Triton interpreter without a GPU
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from _common import Case, Classify, flat_grad, meta, seeded, time_ms, write_json
from torch._dynamo.utils import counters

import fxlowbit
from fxlowbit import examples
from fxlowbit.examples import sqnr_db

MODELS = ("mlp", "cnn", "tinygpt", "gpt2", "bert", "llama")
BUDGETS = (0.5, 0.1)
FP8_FORCED = {"allowed_dtypes": "torch.float32", "size_in_mb": 0.0, "use_scaling": True}
VOCAB, SEQ, BATCH = examples.HF_VOCAB, examples.HF_SEQ, 4  # char-level: ASCII codes


def _text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return next(examples.char_batches(examples.stdlib_text(), BATCH, SEQ, steps=1, seed=0))


def hf_case(name: str, p: float) -> Case:
    """GPT-2 / BERT / Llama from small configs (see fxlowbit.examples.hf_model)."""
    idx, _ = _text_batch()
    return Case(name, seeded(lambda: examples.hf_model(name, p)), examples.hf_batch(name, idx),
                lambda m, b: m(**b).loss)  # fmt: skip


def make_case(name: str, p: float = 0.0) -> Case:
    """Model ``name`` with dropout probability ``p`` everywhere, its batch and its loss."""
    if name in ("gpt2", "bert", "llama"):
        return hf_case(name, p)
    if name == "tinygpt":
        idx, tgt = _text_batch()
        make = lambda: examples.TinyGPT(VOCAB, 64, 2, 4, SEQ, dropout=p)  # noqa: E731
        return Case(name, seeded(make), {"idx": idx, "targets": tgt}, lambda m, b: m(**b))
    x, y = examples.digits()
    x, y = x[:256], y[:256]
    if name == "mlp":
        return Case(
            name, seeded(lambda: Classify(examples.MLP(dropout=p))), {"x": x, "y": y}, lambda m, b: m(**b)
        )
    if name == "cnn":
        make = lambda: Classify(examples.SmallCNN(dropout=p))  # noqa: E731
        return Case(name, seeded(make), {"x": x.view(-1, 1, 8, 8), "y": y}, lambda m, b: m(**b))
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def measure(
    case: Case, backend: str, options: dict | None = None, steps: int = 3, ctx=contextlib.nullcontext
) -> dict:
    """One seeded step (bytes, flat gradient), then ``steps`` timed fwd+bwd steps."""
    torch._dynamo.reset()
    counters.clear()
    fxlowbit.reset()
    model = case.make().train()
    kwargs = {"options": options} if options is not None else {}
    compiled = torch.compile(model, backend=backend, **kwargs)
    # no on-disk AOTAutograd cache: a hit skips the partitioner (and fxlowbit's counters) and hides
    # the compile time
    no_cache = torch._functorch.config.patch(enable_autograd_cache=False)
    with ctx(), no_cache, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)  # same dropout masks for a provider and its reference
        first: dict = {}

        def first_step():
            first["loss"] = loss = case.loss(compiled, case.inputs)
            first["nbytes"] = fxlowbit.saved_activation_bytes(loss, model.parameters())
            loss.backward()

        first_ms = time_ms(first_step)
        grad = flat_grad(model)
        step_ms = None
        if steps:
            step_ms = time_ms(lambda: case.loss(compiled, case.inputs).backward(), steps,
                              before=lambda: model.zero_grad(set_to_none=True))  # fmt: skip
    return {
        "saved_bytes": first["nbytes"],
        "loss": first["loss"].item(),
        "grad": grad,
        "first_step_s": round(first_ms / 1e3, 2),
        "step_ms": round(step_ms, 2) if steps else None,
        "counters": {"fxlowbit": dict(fxlowbit.counters), "inductor": dict(counters["inductor"])},
    }


def _fp8_ctx(opts: dict):
    return lambda: torch._inductor.config.patch(
        post_grad_fusion_options={"activation_quantization_aten_pass": dict(opts)}
    )


def run_model(name: str, bits: list[int], inner: str, steps: int, p: float = 0.0) -> list[dict]:
    case = make_case(name, p)
    rows: list[dict] = []

    def add(provider, bits_, r, ref, note=""):
        row = {
            "model": name,
            "provider": provider,
            "bits": bits_,
            **{k: v for k, v in r.items() if k != "grad"},
        }
        row["reduction"] = rows[0]["saved_bytes"] / r["saved_bytes"] if rows else 1.0
        row["grad_sqnr_db"] = math.inf if ref is None else sqnr_db(ref, r["grad"])
        row["note"] = note
        if not torch.isfinite(r["grad"]).all():
            row["note"] += "; NON-FINITE gradients"
        rows.append(row)
        print(_fmt(row), flush=True)

    base = measure(case, "aot_eager", steps=steps)
    add("aot_eager", 32, base, None, "reference")
    for b in BUDGETS:
        r = measure(
            case,
            "aot_eager",
            steps=steps,
            ctx=lambda b=b: torch._functorch.config.patch(activation_memory_budget=b),
        )
        add(f"budget={b}", 32, r, base["grad"], "recompute; SQNR vs aot_eager")
    for label, opts in (("fp8 pass", {}), ("fp8 pass fp32", FP8_FORCED)):
        r = measure(case, "aot_eager", steps=steps, ctx=_fp8_ctx(opts))
        if not r["counters"].get("inductor", {}).get("activation_quantization_fwd_aten_pass"):
            rows.append(
                {
                    "model": name,
                    "provider": label,
                    "bits": 8,
                    "saved_bytes": None,
                    "reduction": None,
                    "grad_sqnr_db": None,
                    "step_ms": None,
                    "options": opts,
                    "note": "n/a: pass did not fire (default: bf16 only, tensors >= 100 MB)",
                }
            )
            print(_fmt(rows[-1]), flush=True)
            continue
        how = "forced on fp32" if opts else "default options"
        add(label, 8, {**r, "options": opts}, base["grad"], f"fp8 e5m2, {how}; SQNR vs aot_eager")
    opts = {"inner": inner, "seed": 0}
    ref = measure(case, "lowbit", {**opts, "passes": {"plan": False}}, steps=steps)
    add(
        "lowbit uncompressed",
        32,
        ref,
        base["grad"],
        f"inner={inner}; reference of the lowbit rows; SQNR vs aot_eager",
    )
    for b in bits:
        r = measure(case, "lowbit", {**opts, "bits": b}, steps=steps)
        add("lowbit", b, r, ref["grad"], f"inner={inner}; SQNR vs lowbit uncompressed")
    return rows


def _fmt(row: dict) -> str:
    def num(v, f):
        return "n/a" if v is None else ("inf" if v == math.inf else format(v, f))

    mb = None if row["saved_bytes"] is None else row["saved_bytes"] / 1e6
    return (
        f"| {row['model']} | {row['provider']} | {row['bits']} | {num(mb, '.3f')} | "
        f"{num(row['reduction'], '.2f')}{'x' if row['reduction'] else ''} | "
        f"{num(row['grad_sqnr_db'], '.1f')} | "
        f"{num(row['step_ms'], '.1f')} | {row['note']} |"
    )


def _meta(args) -> dict:
    return meta(
        args,
        f"fp32, train mode, dropout {args.dropout}; "
        f"LMs: batch {BATCH}x{SEQ} of stdlib text; MLP/CNN: 256 digits",
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {MODELS}")
    p.add_argument("--bits", default="8,4,2", help="lowbit bit widths, comma list")
    p.add_argument("--inner", default="eager", choices=("eager", "inductor"))
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first (0: no timing)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="dropout probability in every model (>0 shows pytorch#190758 in the budget rows)",
    )
    p.add_argument("--out", help="write the rows and run metadata as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bits = [int(b) for b in args.bits.split(",")]
    print("| model | provider | bits | saved MB | vs aot_eager | grad SQNR dB | step ms | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    t0 = time.perf_counter()
    rows = [
        r
        for m in args.models.split(",")
        for r in run_model(m.strip(), bits, args.inner, args.steps, args.dropout)
    ]
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.out:
        write_json(args.out, {"meta": _meta(args), "rows": rows})


if __name__ == "__main__":
    main()
