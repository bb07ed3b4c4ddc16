"""CPU pack and decode for the ops path, and the row-wise int8 quantizers of low-bit GEMM operands
(``fxlowbit::quantize_int8``, family ``int8rn``: forward operands and weights, rounded to nearest;
``fxlowbit::quantize_int8_sr``, family ``int8sr``: gradients, rounded stochastically; one family per
row length and dtype, rows symbolic): one AOTInductor kernel per family, compiled once per machine.

Why. Tracing the pure-torch references into every graph (``kernels="inline"``) lets Inductor fuse
them with producers and consumers, but it then generates C++ for the whole quantizer once per saved
tensor: on the demo's TinyGPT the first step took 82 s against Inductor's 18 s (2 cores, empty
Inductor cache, 2026-12-05), most of it Inductor's C++ code generation of the forward's pack
kernels. Here a *family* (operation, bits, group size, dtype) is exported with the number of groups
symbolic and compiled ahead of time by AOTInductor into a package beside Inductor's cache; every
graph, layer and shape reuses it, and the next process loads it in milliseconds (3-6 ms against
about 1.9 s for a Dynamo-captured family read back from Inductor's cache, which stalled GPT-2's
second training step 10.9 s; 2 cores, 2026-12-05).

Bits. The compiled bodies evaluate exactly the operations of :func:`.quant.quantize_pack_reference`
and :func:`.quant.dequantize_unpack_reference` on all-finite groups (the common case), so they
return the same bits (tests/codegen/test_quant_cpu.py). Tensors holding NaN or Inf (seen from the
groups' min and max, so all-finite tensors pay no extra pass), single groups and float64 take the
eager references. A family that fails to compile (no C++ compiler, say) warns
once, is counted in :data:`counters` and runs the eager reference from then on.

Off the critical path. A family's first compile runs in a child process at the lowest priority
(:data:`BACKGROUND`; one pack family took 16 s to compile on 2 cores, 2026-12-05); until it exits
the family's calls run the eager reference, which gives the same bits, so when the switch happens
changes no result. ``FXLOWBIT_CPU_COMPILE=sync`` waits for the child on first use instead: the
export cannot run inside the op's call in a compiled graph (torch.export fails there). A child,
not a thread: export patches ``torch.nn.Module.__call__`` process-wide, so a compile on a thread
breaks the training thread's module calls. :func:`wait` waits for the children; a process that
exits stops those still running.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ... import state
from . import int8_gemm as I8
from . import quant as Q

__all__ = [
    "quantize_pack",
    "dequantize_unpack",
    "quantize_int8_rn",
    "quantize_int8_sr",
    "counters",
    "families",
    "clear",
    "wait",
    "BACKGROUND",
]

log = logging.getLogger(__name__)

BACKGROUND = os.environ.get("FXLOWBIT_CPU_COMPILE", "background") != "sync"
# compile in this process, not in a child: only for direct calls outside compiled graphs (tests)
IN_PROCESS = False
# in fxlowbit.state.STATE (fxlowbit.reset() clears them); counters: "compiled" / "reference" /
# "pending" calls, "compile_failures"
counters: Counter = state.STATE.kernel_counters
_families: dict[tuple, _Family] = state.STATE.families
_broken: set[tuple] = state.STATE.broken_families


def families() -> list[tuple]:
    """The families used in this process: (operation, bits, group size, dtype)."""
    return list(_families)


@atexit.register
def _stop_children() -> None:
    """A process that ends before its children finish does not need their kernels: stop them."""
    for family in list(_families.values()):
        if family.proc is not None and family.proc.poll() is None:
            family.proc.terminate()


@atexit.register
def _unload() -> None:
    """Drop the loaded packages before the interpreter's teardown: a loader removes the folder it
    unpacked its package into (``/tmp/aotinductor_*``, 1.5 MB) when it is destroyed, which module
    globals never are, so every process left one per family behind."""
    for family in list(_families.values()):
        family.fn = None


def wait() -> None:
    """Wait for the families compiling in child processes."""
    for family in list(_families.values()):
        if family.proc is not None:
            family.proc.wait()


def clear() -> None:
    """Forget the compiled families and the counters (after the compiles in flight finish)."""
    wait()
    _families.clear()
    _broken.clear()
    counters.clear()


def _pack_finite(flat: torch.Tensor, seed: torch.Tensor, bits: int, group_size: int):
    """``quantize_pack_reference`` of all-finite whole groups ``flat`` with ``hash_uniform(seed)``
    noise, each plane computed from its own columns (no full-size noise or codes in memory), and
    whether every group's meta is finite (a 0-dim bool: when not, the caller quantizes again with
    the reference, which handles NaN and Inf; checked in the kernel, not by a pass of its own)."""
    g = flat.float().view(-1, group_size)
    key = Q.seed_key(seed)
    lo, hi = g.amin(1), g.amax(1)
    usable = torch.full_like(lo, (1 << bits) - 1)
    scale, half, inv = Q.group_affine(lo, hi, usable)

    def plane(sl: slice) -> torch.Tensor:
        return Q.codes_of(g[:, sl], Q.noise_columns(key, g.shape[0], group_size, sl), lo, half, inv, usable)

    meta = torch.stack([lo, scale], 1)
    return Q.pack_planes(plane, bits, group_size), meta, torch.isfinite(meta).all()


def _decode_finite(
    codes: torch.Tensor, meta: torch.Tensor, bits: int, dtype: torch.dtype
) -> tuple[torch.Tensor]:
    """``dequantize_unpack_reference`` of flat codes and meta of groups without NaN/Inf: flat
    ``(n * G,)`` ``dtype`` (a 1-tuple: every family returns a tuple)."""
    n = meta.numel() // 2
    return (Q.decode_groups(codes.view(n, -1), meta.view(n, 2), bits, specials=False).reshape(-1).to(dtype),)


def _int8_rows_sr(flat: torch.Tensor, seed: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.int8_gemm.quantize_int8_rowwise` of ``flat`` viewed as (rows, ``cols``), rounded
    stochastically with :func:`.int8_gemm.rowwise_noise` of ``seed``: a low-bit GEMM's gradient
    operand (codegen/kernels/lowbit_linear.py)."""
    return I8.quantize_int8_sr_reference(flat.view(-1, cols), seed)


def _int8_rows_rn(flat: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.int8_gemm.quantize_int8_rowwise` of ``flat`` viewed as (rows, ``cols``), rounded to
    nearest: a low-bit GEMM's forward operand or weight (codegen/kernels/lowbit_linear.py)."""
    return I8.quantize_int8_rowwise(flat.view(-1, cols))


def _package_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "fxlowbit" / "kernels"


@functools.cache
def _version() -> str:
    """The compiled bodies' sources and torch's version: a changed checkout never loads another's
    kernels."""
    from torch._inductor.custom_graph_pass import get_hash_for_files

    sources = get_hash_for_files((str(Q.__file__), str(I8.__file__), __file__))
    return hashlib.sha256(sources + torch.__version__.encode()).hexdigest()[:16]


class _Body(torch.nn.Module):
    """A family's body with its constants bound, for ``torch.export``."""

    def __init__(self, body: Callable, consts: tuple) -> None:
        super().__init__()
        self.body, self.consts = body, consts

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None):
        return self.body(a, *self.consts) if b is None else self.body(a, b, *self.consts)


class _Family:
    """One compiled kernel: ``body`` with the family's constants bound, exported with the number of
    groups symbolic (at least two: sizes 0 and 1 are always specialised) and compiled ahead of time
    by AOTInductor into a package beside Inductor's cache (:func:`_package_dir`), which any later
    process of this checkout and torch loads in milliseconds: no Dynamo, no tracing, and neither a
    new shape nor ``torch._dynamo.reset()`` (which every test and some training scripts call)
    compiles it again. The package is keyed by the torch thread count at first use too (Inductor
    bakes it into the C++).

    Inputs must be flat contiguous tensors of the family's dtype holding whole groups, at least
    two; the pack's seed a 0-dim int64 tensor."""

    def __init__(self, key: tuple, body: Callable, consts: tuple):
        self.key = key
        self.module = _Body(body, consts)
        self.fn: Callable | None = None
        self.proc: subprocess.Popen | None = None  # the child compiling it (BACKGROUND)
        self.threads = torch.get_num_threads()
        name = "-".join(map(str, key))
        self.path = _package_dir() / f"{name}-t{self.threads}-{_version()}.pt2"

    def compile(self) -> None:
        """Export and compile the package (here: the child, or on first use with ``sync``)."""
        from torch.export import Dim, export

        args = _example(self.key)
        groups, n = Dim("groups", min=2), _EXAMPLE_GROUPS
        a = args[0]
        dynamic: dict = {"a": {0: (a.numel() // n) * groups}}
        if self.key[0] in ("pack", "int8sr"):
            dynamic["b"] = None  # the seed
        elif self.key[0] == "decode":
            dynamic["b"] = {0: (args[1].numel() // n) * groups}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations inside export
            program = export(self.module, args, dynamic_shapes=dynamic)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.stem}.{os.getpid()}.tmp.pt2")
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
            os.replace(tmp, self.path)  # whole or absent: another process may be loading it
        finally:
            tmp.unlink(missing_ok=True)

    def _load(self) -> Callable:
        model = torch._inductor.aoti_load_package(str(self.path))
        # the loader's boxed run: the model's own call spends about 25 us a call flattening and
        # unflattening arguments our flat tensors do not need (64 groups of 256, 1 thread)
        loader = getattr(model, "loader", None)
        run = getattr(loader, "boxed_run", None)
        self.fn = (lambda *args: run(list(args))) if run is not None else model
        return self.fn

    def child_command(self) -> list[str]:
        return [sys.executable, "-m", __name__, json.dumps([*self.key, self.threads])]

    def _compile_in_child(self) -> None:
        env = {**os.environ, "FXLOWBIT_CPU_COMPILE": "sync"}
        # at the lowest priority while training goes on; sync's caller waits for it, so not then
        self.proc = subprocess.Popen(
            self.child_command(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_lowest_priority if BACKGROUND else None,
        )  # fmt: skip

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The kernel's outputs, or None while a child process compiles it."""
        fn = self.fn
        if fn is None:
            if not self.path.exists():
                if self.proc is None and not IN_PROCESS:
                    try:
                        self._compile_in_child()
                    except OSError as err:  # no child processes here: compile on the spot
                        log.info("fxlowbit: compiling %s here (%s)", self.key, err)
                if self.proc is not None:
                    if BACKGROUND and self.proc.poll() is None:
                        return None
                    # sync: wait for the child. Not an export here: this call may run inside a
                    # compiled graph (dispatch keys excluded, fake modes about), where
                    # torch.export fails ("SymInt ... is not tracked with proxy")
                    self.proc.wait()
            if not self.path.exists():  # a child that failed, or none: compile here (or fail here)
                self.compile()
            fn = self._load()
        return tuple(fn(*args))


def _lowest_priority() -> None:
    """In the child, before it runs: the training process keeps the cores it needs."""
    os.nice(19)


_EXAMPLE_GROUPS = 4


def _example(key: tuple) -> tuple[torch.Tensor, ...]:
    """Inputs of family ``key`` (:data:`_EXAMPLE_GROUPS` groups) to export it with: the program
    depends on the dtypes and the symbolic number of groups only."""
    op, bits, group_size, dtype_name = key
    dtype = getattr(torch, dtype_name)
    x = torch.linspace(-1, 1, _EXAMPLE_GROUPS * group_size).to(dtype)
    seed = torch.tensor(1, dtype=torch.int64)
    if op == "int8rn":
        return (x,)
    if op in ("pack", "int8sr"):
        return x, seed
    noise = Q.hash_uniform(seed, _EXAMPLE_GROUPS, group_size)
    codes, meta = Q.quantize_pack_reference(x, bits, group_size, noise)
    return codes.reshape(-1), meta.reshape(-1)


def _main(argv: list[str]) -> None:
    """``python -m fxlowbit.codegen.kernels.quant_cpu KEY``: compile family KEY (JSON: operation,
    bits, group size, dtype, torch threads) into its package for the parent process."""
    *key, threads = json.loads(argv[0])
    torch.set_num_threads(threads)
    fn = _family(key[0], _BODIES[key[0]], key[1], key[2], getattr(torch, key[3]))
    assert fn is not None
    fn.compile()


def _family(op: str, body: Callable, bits: int, group_size: int, dtype: torch.dtype) -> _Family | None:
    """The compiled ``body`` of this family (None once it failed to compile)."""
    key = (op, bits, group_size, str(dtype).removeprefix("torch."))
    fn = _families.get(key)
    if fn is None and key not in _broken:
        consts = {"pack": (bits, group_size), "int8sr": (group_size,), "int8rn": (group_size,)}
        fn = _families[key] = _Family(key, body, consts.get(op, (bits, dtype)))
    return fn


def _run(fn: _Family | None, args: tuple):
    if fn is None:
        return None
    try:
        out = fn(*args)
    except Exception as err:  # a machine that cannot compile still trains: on the eager reference
        key = fn.key
        _families.pop(key, None)
        _broken.add(key)
        counters["compile_failures"] += 1
        root = getattr(err, "inner_exception", None) or err  # Dynamo wraps the backend's error
        why = " ".join(f"{type(root).__name__}: {root}".split())  # one line
        warnings.warn(
            f"fxlowbit: could not compile the CPU {key[0]} kernel for {key[1:]} ({why}); it runs the "
            "slower eager reference",
            stacklevel=4,
        )
        return None
    counters["compiled" if out is not None else "pending"] += 1
    return out


_BODIES: dict[str, Callable] = {
    "pack": _pack_finite, "decode": _decode_finite, "int8sr": _int8_rows_sr, "int8rn": _int8_rows_rn,
}  # fmt: skip

if __name__ == "__main__":
    _main(sys.argv[1:])


def _compilable(dtype: torch.dtype) -> bool:
    return dtype in Q.DTYPES


def quantize_pack(x: torch.Tensor, bits: int, group_size: int, seed: torch.Tensor):
    """:func:`.quant.quantize_pack_reference` with ``hash_uniform(seed)`` noise, same bits."""
    flat = x.reshape(-1)
    n = flat.numel()
    if n > group_size and _compilable(x.dtype) and seed.dim() == 0 and seed.dtype == torch.int64:
        pad = (-n) % group_size
        if pad:  # the compiled body sees whole groups: one family for every size
            flat = torch.cat([flat, flat[-1:].expand(pad)])
        fn = _family("pack", _pack_finite, bits, group_size, x.dtype)
        out = _run(fn, (flat.detach(), seed))
        # a NaN or Inf in a group makes its min, max or scale non-finite: only such tensors (rare)
        # are quantized again, by the reference, which stores them exactly
        if out is not None and bool(out[2]):
            return out[0], out[1]
    counters["reference"] += 1
    n_groups = -(-n // group_size)
    return Q.quantize_pack_reference(x, bits, group_size, Q.hash_uniform(seed, n_groups, group_size))


def dequantize_unpack(
    codes: torch.Tensor,
    meta: torch.Tensor,
    bits: int,
    group_size: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    stride: Sequence[int] | None = None,
) -> torch.Tensor:
    """:func:`.quant.dequantize_unpack_reference`, same bits."""
    numel = math.prod(shape)
    if (
        len(meta) > 1
        and _compilable(dtype)
        and not bool((meta[:, 1].contiguous().view(torch.int32) < 0).any())
    ):
        fn = _family("decode", _decode_finite, bits, group_size, dtype)
        out = _run(fn, (codes.reshape(-1).detach(), meta.reshape(-1).detach()))
        if out is not None:
            out = out[0][:numel].view(list(shape))
            if stride is not None and tuple(out.stride()) != tuple(stride):
                out = torch.empty_strided(list(shape), list(stride), dtype=dtype).copy_(out)
            return out
    counters["reference"] += 1
    return Q.dequantize_unpack_reference(codes, meta, bits, group_size, list(shape), dtype, stride)


def _int8_rows(
    op: str, x: torch.Tensor, extra: tuple, reference: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Family ``op`` (an int8 row-wise quantizer, one per (cols, dtype)) on ``x`` (rows, cols) and
    ``extra``; ``reference()`` for a single row, an empty row or a dtype no family compiles, and
    while the family compiles."""
    rows, cols = x.shape
    if rows > 1 and cols > 0 and _compilable(x.dtype):
        out = _run(_family(op, _BODIES[op], 8, cols, x.dtype), (x.detach().contiguous().view(-1), *extra))
        if out is not None:
            return out[0], out[1]
    counters["reference"] += 1
    return reference()


def quantize_int8_sr(x: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.int8_gemm.quantize_int8_rowwise` of ``x`` (rows, cols) with
    ``rowwise_noise(seed)``, same bits: one family per (cols, dtype), rows symbolic."""
    if seed.dim() != 0 or seed.dtype != torch.int64:  # the family takes a 0-dim int64 seed
        counters["reference"] += 1
        return I8.quantize_int8_sr_reference(x, seed)
    return _int8_rows("int8sr", x, (seed,), lambda: I8.quantize_int8_sr_reference(x, seed))


def quantize_int8_rn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.int8_gemm.quantize_int8_rowwise` of ``x`` (rows, cols) rounded to nearest, same bits:
    one family per (cols, dtype), rows symbolic."""
    return _int8_rows("int8rn", x, (), lambda: I8.quantize_int8_rowwise(x))
