"""What the sensitivity probes cost, against the training step they serve.

Trains a model with ``backend="lowbit"`` (cost-model planner, Inductor inner) and probes every
``--every`` steps so that several probes land in a short run. The time spent in probes (the probe
step's eager replay with one backward per probed tensor, and the next step's exact gradient for
the minibatch variance) is measured by timing those calls; compiling a new plan variant after a
re-plan is a one-time cost (at most ``max_variants - 1`` times per graph) reported apart; the
compiled step time is the median of the steps without probes. The fraction at a schedule of ``N`` steps is
``probe time / (N * step time)``, printed for the default ``calibrate_every=1000`` and for
``--every``.

    python benchmarks/calibration.py --model tinygpt --out benchmarks/results/calibration_cpu.json
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import causal_lm, meta, time_ms, write_json  # benchmarks/ is the script's directory

import fxlowbit
from fxlowbit import backend, calibrate, examples


def _model(name: str):
    if name == "tinygpt":
        model = examples.TinyGPT()
        batches = examples.char_batches(examples.stdlib_text(), 8, 64, 10_000)
        return model, batches
    if name == "gpt2":
        model = causal_lm("gpt2", vocab_size=examples.HF_VOCAB, n_embd=256, n_layer=4, n_head=4,
                          n_positions=128, bos_token_id=2, eos_token_id=3)  # fmt: skip
        gen = torch.Generator().manual_seed(0)

        def batches():
            while True:
                idx = torch.randint(4, examples.HF_VOCAB, (4, 128), generator=gen)
                yield (examples.hf_batch("gpt2", idx),)

        return model, batches()
    raise ValueError(f"unknown model {name!r}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tinygpt", choices=("tinygpt", "gpt2"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--inner", default="inductor", choices=("inductor", "eager"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fxlowbit.reset()

    spent: list[float] = []  # seconds measuring: probes and the next step's exact gradient
    compiled_s: list[float] = []  # seconds compiling new plan variants (one-time, bounded)
    depth = [0]
    originals = {n: getattr(calibrate, n) for n in ("probe_sensitivity", "exact_gradient")}
    original_replan = backend.Adaptive.replan

    def timed(fn):
        def wrapper(*a, **k):
            if depth[0]:  # called inside a timed call: counted there
                return fn(*a, **k)
            out: list = [None, None]  # the result, or the exception (timed too: the backend catches it)

            def call():
                try:
                    out[0] = fn(*a, **k)
                except Exception as err:
                    out[1] = err

            depth[0] += 1
            try:
                spent.append(time_ms(call) / 1e3)
            finally:
                depth[0] -= 1
            if out[1] is not None:
                raise out[1]
            return out[0]

        return wrapper

    def replan(self, *a, **k):
        n = len(self.variants)
        ms = time_ms(lambda: original_replan(self, *a, **k))
        if len(self.variants) > n:
            compiled_s.append(ms / 1e3)

    for n, fn in originals.items():
        setattr(calibrate, n, timed(fn))
    backend.Adaptive.replan = replan
    try:
        model, batches = _model(args.model)
        options = {
            "inner": args.inner,
            "calibrate_every": args.every,
            "memory_budget": args.budget,
            "seed": 0,
        }
        compiled = torch.compile(model, backend="lowbit", options=options)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        step_s, probe_steps = [], []
        for i in range(args.steps):
            batch = next(batches)
            n_before = len(spent) + len(compiled_s)

            def step(batch=batch):
                out = compiled(**batch[0]) if isinstance(batch[0], dict) else compiled(*batch)
                (out.loss if hasattr(out, "loss") else out).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            dt = time_ms(step) / 1e3
            if len(spent) + len(compiled_s) > n_before:
                probe_steps.append(i)
            elif i >= 3:  # after compilation and warm-up
                step_s.append(dt)
    finally:
        for n, fn in originals.items():
            setattr(calibrate, n, fn)
        backend.Adaptive.replan = original_replan

    step = statistics.median(step_s)
    probes = fxlowbit.counters["probes"]
    per_probe = sum(spent) / max(probes, 1)  # a probe and its second gradient
    row = {
        "model": args.model,
        "step_ms": step * 1e3,
        "probes": probes,
        "probe_ms_each": per_probe * 1e3,
        "plan_variants": fxlowbit.counters["plan_variants"],
        "variant_compile_s": compiled_s,
        "fraction_at_default_1000": per_probe / (1000 * step),
        f"fraction_at_{args.every}": per_probe / (args.every * step),
        "probe_steps": probe_steps,
    }
    result = {**meta(args, "lowbit probes"), "rows": [row]}
    print(
        f"| model | step ms | probes | ms per probe | cost at every=1000 | cost at every={args.every} "
        "| variant compiles, s (one-time) |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {row['step_ms']:.1f} | {probes} | {row['probe_ms_each']:.0f} | "
        f"{100 * row['fraction_at_default_1000']:.2f}% | {100 * row[f'fraction_at_{args.every}']:.1f}% | "
        f"{', '.join(f'{x:.1f}' for x in compiled_s) or '-'} |"
    )
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
