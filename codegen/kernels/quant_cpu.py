"""CPU pack and decode for the ops path: one Inductor kernel per family, compiled once per process.

Why. Tracing the pure-torch references into every graph (``kernels="inline"``) lets Inductor fuse
them with producers and consumers, but it then generates C++ for the whole quantizer once per saved
tensor: on the demo's TinyGPT the first step took 82 s against Inductor's 18 s (2 cores, empty
Inductor cache, 2026-12-05), most of it Inductor's C++ code generation of the forward's pack
kernels. Here a *family* (operation, bits, group size, dtype) is compiled once, with symbolic
sizes, and every graph, layer and shape of the process reuses it (the next process reads it from
Inductor's on-disk cache).

Bits. The compiled bodies evaluate exactly the operations of :func:`.quant.quantize_pack_reference`
and :func:`.quant.dequantize_unpack_reference` on all-finite groups (the common case), so they
return the same bits (tests/codegen/test_quant_cpu.py). Tensors holding NaN or Inf (seen from the
groups' min and max, so all-finite tensors pay no extra pass), single groups and float64 take the
eager references. A family that fails to compile (no C++ compiler, say) warns
once, is counted in :data:`counters` and runs the eager reference from then on.

Off the critical path. A family's first compile runs in a child process (:data:`BACKGROUND`, env
``FXLOWBIT_CPU_COMPILE=sync`` to compile on first use instead), which writes Inductor's on-disk
cache; until it exits the family's calls run the eager reference, which gives the same bits, so
when the switch happens changes no result; then this process compiles the family from that cache
(about a second). The first training step does not wait for a kernel compile (one pack family
took 5-9 s to compile cold on 2 cores, 2026-12-05). A child, not a thread: tracing patches
``torch.nn.Module.__call__`` process-wide, so a compile on a thread breaks the training thread's
module calls. :func:`wait` waits for the children; a process that exits stops those still running.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ... import state
from . import quant as Q

__all__ = ["quantize_pack", "dequantize_unpack", "counters", "families", "clear", "wait", "BACKGROUND"]

log = logging.getLogger(__name__)

BACKGROUND = os.environ.get("FXLOWBIT_CPU_COMPILE", "background") != "sync"
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
    noise, each plane computed from its own columns (no full-size noise or codes in memory)."""
    g = flat.float().view(-1, group_size)
    key = Q.seed_key(seed)
    lo, hi = g.amin(1), g.amax(1)
    usable = torch.full_like(lo, (1 << bits) - 1)
    scale, half, inv = Q.group_affine(lo, hi, usable)

    def plane(sl: slice) -> torch.Tensor:
        return Q.codes_of(g[:, sl], Q.noise_columns(key, g.shape[0], group_size, sl), lo, half, inv, usable)

    return Q.pack_planes(plane, bits, group_size), torch.stack([lo, scale], 1)


def _decode_finite(
    codes: torch.Tensor, meta: torch.Tensor, bits: int, dtype: torch.dtype
) -> tuple[torch.Tensor]:
    """``dequantize_unpack_reference`` of flat codes and meta of groups without NaN/Inf: flat
    ``(n * G,)`` ``dtype`` (a 1-tuple: every family returns a tuple)."""
    n = meta.numel() // 2
    return (Q.decode_groups(codes.view(n, -1), meta.view(n, 2), bits, specials=False).reshape(-1).to(dtype),)


def _arg(i: int) -> Callable[[tuple], Any]:
    return lambda args: args[i]


def _size(i: int, dim: int) -> Callable[[tuple], Any]:
    return lambda args: args[i].size(dim)


class _Family:
    """One compiled kernel: ``body`` with the family's constants bound, compiled by Inductor with
    symbolic sizes on first use. The compiled callable is captured from Dynamo's backend call and
    then called directly (the size arguments computed from the inputs), so neither a new shape nor
    ``torch._dynamo.reset()`` (which every test and some training scripts call) compiles it again.

    Inputs must be flat, detached, contiguous tensors of the family's dtype holding at least two
    groups: flat, so that no size of one input equals another's by chance and is specialised
    (Dynamo's "duck sizing"); detached, because Dynamo guards a view on its base; two groups,
    because sizes 0 and 1 are always specialised."""

    def __init__(self, key: tuple, body: Callable, consts: tuple[str, ...], dtype: torch.dtype):
        self.key = key
        self.fn: Callable | None = None
        self.proc: subprocess.Popen | None = None  # the child compiling it (BACKGROUND)
        self.getters: list[Callable[[tuple], Any]] = []

        # its own code object (Dynamo's per-code recompile limit never counts families together),
        # with the constants as literals (Dynamo would make int arguments symbolic)
        name = "fxlowbit_" + "_".join(map(str, key))
        scope: dict[str, Any] = {"body": body, "dtype": dtype}
        exec(f"def {name}(a, b):\n    return body(a, b, {', '.join(consts)})", scope)
        family: Callable = scope[name]
        self.traced: Callable = torch.compile(family, backend=self._capture, dynamic=True, fullgraph=True)

    def _capture(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        fn: Callable = compile_fx(gm, example_inputs)  # type: ignore[assignment]  # a callable for a graph
        getters: list[Callable[[tuple], Any]] = []
        for ph in gm.graph.find_nodes(op="placeholder"):
            source = ph.meta["grapharg"].source.name  # "L['a']" or "L['a'].size()[0]"
            m = re.fullmatch(r"L\['([ab])'\](?:\.size\(\)\[(\d+)\])?", source)
            if m is None:
                raise NotImplementedError(f"graph input {source}")
            i = "ab".index(m[1])
            getters.append(_arg(i) if m[2] is None else _size(i, int(m[2])))
        self.fn, self.getters = fn, getters
        # beside Dynamo's own counters (cleared with them): its unique_graphs counts this graph too
        torch._dynamo.utils.counters["fxlowbit"]["kernel_families"] += 1
        return fn

    def _compile_in_child(self) -> None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir(), "FXLOWBIT_CPU_COMPILE": "sync"}
        cmd = [sys.executable, "-m", __name__, json.dumps(list(self.key))]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The kernel's outputs, or None while a child process compiles it."""
        if self.fn is not None:
            return tuple(self.fn(*(get(args) for get in self.getters)))  # Inductor returns a list
        if BACKGROUND:
            if self.proc is None:
                try:
                    self._compile_in_child()
                except OSError as err:  # no child processes here: compile on the spot
                    log.info("fxlowbit: compiling %s here (%s)", self.key, err)
                    return tuple(self.traced(*args))
            if self.proc is not None and self.proc.poll() is None:
                return None
        # read from the child's cache entry (a failed child: compile here, and fail here if need be)
        return tuple(self.traced(*args))


def _example(key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of family ``key`` (4 groups) for the child that compiles it: the graph, and so
    Inductor's cache key, depends on the dtypes and symbolic sizes only."""
    op, bits, group_size, dtype_name = key
    dtype = getattr(torch, dtype_name)
    x = torch.linspace(-1, 1, 4 * group_size).to(dtype)
    seed = torch.tensor(1, dtype=torch.int64)
    if op == "pack":
        return x, seed
    codes, meta = Q.quantize_pack_reference(x, bits, group_size, Q.hash_uniform(seed, 4, group_size))
    return codes.reshape(-1), meta.reshape(-1)


def _main(argv: list[str]) -> None:
    """``python -m fxlowbit.codegen.kernels.quant_cpu KEY``: compile family KEY (JSON), which
    fills Inductor's on-disk cache for the parent process."""
    key = tuple(json.loads(argv[0]))
    body = _pack_finite if key[0] == "pack" else _decode_finite
    fn = _family(key[0], body, key[1], key[2], getattr(torch, key[3]))
    assert fn is not None
    fn(*_example(key))


def _family(op: str, body: Callable, bits: int, group_size: int, dtype: torch.dtype) -> _Family | None:
    """The compiled ``body`` of this family (None once it failed to compile)."""
    key = (op, bits, group_size, str(dtype).removeprefix("torch."))
    fn = _families.get(key)
    if fn is None and key not in _broken:
        consts = (str(bits), str(group_size)) if op == "pack" else (str(bits), "dtype")
        fn = _families[key] = _Family(key, body, consts, dtype)
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


if __name__ == "__main__":
    _main(sys.argv[1:])


def _compilable(dtype: torch.dtype) -> bool:
    return dtype in Q.DTYPES


def quantize_pack(x: torch.Tensor, bits: int, group_size: int, seed: torch.Tensor):
    """:func:`.quant.quantize_pack_reference` with ``hash_uniform(seed)`` noise, same bits."""
    flat = x.reshape(-1)
    n = flat.numel()
    if n > group_size and _compilable(x.dtype):
        pad = (-n) % group_size
        if pad:  # the compiled body sees whole groups: one family for every size
            flat = torch.cat([flat, flat[-1:].expand(pad)])
        fn = _family("pack", _pack_finite, bits, group_size, x.dtype)
        out = _run(fn, (flat.detach(), seed))
        # a NaN or Inf in a group makes its min, max or scale non-finite: only such tensors (rare)
        # are quantized again, by the reference, which stores them exactly
        if out is not None and bool(torch.isfinite(out[1]).all()):
            return out
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
