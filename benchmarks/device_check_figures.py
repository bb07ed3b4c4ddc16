"""One short text of key figures per benchmark result, for benchmarks/device_check.py's summary table.

Each reader takes the script's JSON as written; a result it cannot read gives a note, never an error
(a benchmark whose output changed shape must not stop the summary).
"""

from __future__ import annotations

from collections.abc import Callable


def _f(v, fmt: str = ".3g") -> str:
    return "-" if v is None or isinstance(v, str) else format(v, fmt)


def pack_kernels(res: dict) -> str:
    # per dtype: copy GB/s, then the best provider's % of copy for each op
    out = []
    for dt in dict.fromkeys(r["dtype"] for r in res["rows"]):
        rows = [r for r in res["rows"] if r["dtype"] == dt]
        copy = next(r["gbps"] for r in rows if r["op"] == "copy")
        best: dict[str, float] = {}
        for r in rows:
            if r["op"] != "copy":
                best[r["op"]] = max(best.get(r["op"], 0.0), r["pct_copy"])
        ops = " ".join(f"{op} {pct:.0f}%" for op, pct in best.items())
        out.append(f"{dt.removeprefix('torch.')}: copy {copy:.0f} GB/s, best % of copy: {ops}")
    return "; ".join(out)


def gpu_step(res: dict) -> str:
    out = []
    for r in res["rows"]:
        if "error" in r or "skipped" in r:
            out.append(f"{r['label']} {r.get('error') or r.get('skipped')}")
        elif "step_ms" in r:
            peak = f", peak {r['peak_ratio']:.2f}x" if r.get("peak_ratio") is not None else ""
            ratio, saved = _f(r.get("step_ratio"), ".2f"), _f(r.get("saved_ratio"), ".1f")
            sqnr = _f(r["grad_sqnr_db"], ".0f")
            out.append(f"{r['label']} {r['step_ms']:.1f} ms ({ratio}x), saved {saved}x less{peak}, {sqnr} dB")
        else:  # built, not timed (the run was stopped)
            saved = f"{r['saved_MB']:.0f}"
            out.append(f"{r['label']} compiled in {r['compile_s']} s, saved {saved} MB, not timed")
    return "; ".join(out)


def gemm(res: dict) -> str:
    shown = ("int8", "fp8", "int8+quant", "fp8+quant", "linear_int8", "linear_fp8")
    by_shape: dict[str, list[str]] = {}
    for r in res["rows"]:
        if r["provider"] in shown:
            cell = "err" if "error" in r else f"{_f(r.get('speedup_vs_bf16'), '.2f')}x"
            by_shape.setdefault("x".join(map(str, r["shape"])), []).append(f"{r['provider']} {cell}")
    return "vs bf16: " + "; ".join(f"{s}: {', '.join(c)}" for s, c in by_shape.items())


def sparse24_gemm(res: dict) -> str:
    return "2:4 vs dense: " + ", ".join(f"{r['shape']} {r['speedup']:.2f}x" for r in res["gemm"])


def profile(res: dict) -> str:
    bits = sorted(res["pack_gbps"], key=int)
    pack = "/".join(_f(res["pack_gbps"][b]) for b in bits)
    unpack = "/".join(_f(res["unpack_gbps"][b]) for b in bits)
    quant = ", ".join(f"{k} {_f(v)}" for k, v in res.get("gemm_quant_gbps", {}).items())
    mm = ", ".join(f"{dt} {_f(t.get('large'))}" for dt, t in res["matmul_tflops"].items())
    return (f"GB/s: copy {_f(res['copy_gbps'])}, pack {'/'.join(bits)}-bit {pack}, unpack {unpack}, "
            f"mask {_f(res['mask_gbps'])}, GEMM quant {quant}; large-GEMM TFLOP/s: {mm}")  # fmt: skip


def linear_ce(res: dict) -> str:
    out = []
    for r in res["rows"]:
        if r.get("provider") != "inductor":
            speed = _f(r.get("speedup_vs_inductor"), ".2f")
            out.append(f"{r['shape']} {r['provider']} {r['ms']:.2f} ms ({speed}x inductor), "
                       f"saved {r['saved_mb']:.0f} MB")  # fmt: skip
        else:
            out.append(f"{r['shape']} inductor {r['ms']:.2f} ms, saved {r['saved_mb']:.0f} MB")
    return "; ".join(out)


READERS: dict[str, Callable[[dict], str]] = {
    "pack_kernels": pack_kernels,
    "gpt2_small": gpu_step,
    "gemm": gemm,
    "sparse24_gemm": sparse24_gemm,
    "profile": profile,
    "linear_ce": linear_ce,
    "gpt2_medium": gpu_step,
}


def figures(name: str, result: dict | None) -> str | None:
    """The key figures of benchmark ``name``'s JSON ``result`` (None: no result)."""
    if result is None:
        return None
    reader = READERS.get(name)
    if reader is None:
        return f"{len(result.get('rows', []))} rows" if isinstance(result, dict) else None
    try:
        return reader(result)
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as err:
        return f"(figures unreadable: {type(err).__name__}: {err}; see the JSON)"
