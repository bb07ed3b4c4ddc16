"""Inductor's CPU kernels of lowbit's graphs, compiled a few translation units at a time.

Why. Inductor's Python wrapper compiles each C++ kernel of a graph on its own: one compiler
process, one shared library and one Python module per kernel. On this project's 2-core CPU VM
(torch 2.13, g++ with Inductor's precompiled header, 2026-12-07) that costs 0.44-0.71 s per kernel
whatever its size: the 60 distinct kernels of T5's lowbit forward and backward took 32.1 s of
compiler time one by one, 4.0 s in one translation unit, 2.1 s and 2.5 s in two units
(``benchmarks/cpu_kernel_units.py``, ``benchmarks/results/cpu_kernel_units_t5_cpu.json``).
Recompute makes more kernels than Inductor's own partition does (T5's backward: 36 against 16),
and this fixed cost per kernel was most of what lowbit's first step paid over Inductor's (issue 17).

How. While :func:`batched` is active on a thread (the backend wraps its ``compile_fx`` call and the
inner compiler, so the backward compiled at the first ``backward()`` and the graphs AOTAutograd's
cache serves are covered too), ``AsyncCompile.cpp_pybinding`` defers the kernels whose source has
Inductor's usual shape (``#include`` lines, then one ``extern "C" void kernel(...)`` and no
preprocessor definitions) instead of compiling each. The generated module's
``async_compile.wait(globals())`` then compiles the deferred kernels together: one unit per compile
thread (at least :data:`MIN_PER_UNIT` kernels each), each kernel in its own C++ namespace, with one
Python binding per kernel, through Inductor's own ``CppCodeCache`` (same compiler, flags and
precompiled header; the unit is cached on disk under the hash of its source, so a second process
compiles nothing) on Inductor's compile threads. Each kernel becomes the same machine code, called
through the same kind of binding, so the step time does not change.

Never silent, never lost. A unit that fails to compile warns once and its kernels compile one by
one as Inductor would (counted in ``cpu_kernel_units_failed``); kernels of another shape are never
deferred (``cpu_kernels_unbatched``). Graphs compiled outside :func:`batched` (plain Inductor in the
same process) are untouched. ``FXLOWBIT_CPU_KERNEL_UNITS=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from ..state import STATE

__all__ = ["batched", "install", "enabled", "MIN_PER_UNIT", "combined_source"]

log = logging.getLogger(__name__)

ENV = "FXLOWBIT_CPU_KERNEL_UNITS"
# a unit holds at least this many kernels, leaving compile threads idle rather than splitting
# further: a compiler run's fixed cost is about seven kernels' worth of code in a unit (T5 above:
# 0.44 s or more per run against (4.0 - 0.44) / 60 = 0.06 s per kernel in a unit)
MIN_PER_UNIT = 4
_PREFIX = re.compile(r'\A(?:\s*#include [^\n]*\n|\s*\n)*\s*extern "C"\s+void\s+kernel\(')
_DIRECTIVE = re.compile(r"^\s*#\s*(define|undef|include|pragma\s+once)\b", re.M)
# Thread-scoped and transient: the kernels one generated module registered before its wait() (they
# never outlive one Inductor compile, so they are not fxlowbit.state.STATE's)
_local = threading.local()


def enabled() -> bool:
    """Whether lowbit's graphs compile their CPU kernels in units (``FXLOWBIT_CPU_KERNEL_UNITS``)."""
    return os.environ.get(ENV, "1") != "0"


def _active() -> bool:
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def batched() -> Iterator[None]:
    """Compile the CPU kernels of the Inductor graphs loaded on this thread meanwhile in units."""
    if not enabled():
        yield
        return
    install()
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        if not _local.depth:  # a module that never reached its wait() leaves no kernels to the next
            _local.batch = None


def wrap(inner_compile: Callable[..., Any]) -> Callable[..., Any]:
    """``inner_compile`` under :func:`batched` (the backward compiles at the first ``backward()``,
    outside the backend's call)."""

    @functools.wraps(inner_compile)
    def compile_inner(*args: Any, **kwargs: Any) -> Any:
        with batched():
            return inner_compile(*args, **kwargs)

    return compile_inner


def batchable(source: str) -> bool:
    """Whether ``source`` has the shape a unit can hold: ``#include`` lines, then Inductor's one
    ``extern "C" void kernel(``, and no macro definitions or includes after it."""
    m = _PREFIX.match(source)
    if m is None or source.count('extern "C"') != 1:
        return False
    return _DIRECTIVE.search(source, m.end()) is None


def _split(source: str) -> tuple[list[str], str]:
    """(its #include lines, the rest with the kernel as a C++ function ``kernel``)."""
    m = _PREFIX.match(source)
    assert m is not None
    head = source[: m.end()].splitlines()
    includes = [ln.strip() for ln in head if ln.strip().startswith("#include")]
    return includes, "void kernel(" + source[m.end() :]


def _binding(i: int, argtypes: list[str]) -> str:
    args = ", ".join(
        f"fxlowbit_unit::arg<{t.replace('const ', '')}>(args, {n})" for n, t in enumerate(argtypes)
    )
    return (
        f"static PyObject* kernel_{i}_py(PyObject*, PyObject* args) {{\n"
        f"    try {{\n"
        f"        if (!fxlowbit_unit::arity(args, {len(argtypes)})) return nullptr;\n"
        f"        k{i}::kernel({args});\n"
        f"        Py_RETURN_NONE;\n"
        f"    }} catch (std::exception const& e) {{\n"
        f"        PyErr_SetString(PyExc_RuntimeError, e.what());\n"
        f"    }} catch (...) {{\n"
        f'        PyErr_SetString(PyExc_RuntimeError, "unhandled C++ exception");\n'
        f"    }}\n"
        f"    return nullptr;\n"
        f"}}\n"
    )


# The Python side of a unit: Inductor's convention for its kernels' bindings (the tensor's data
# pointer through the function whose address _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR holds, which
# Inductor's loader sets; ints, floats and addresses as Python numbers), one method per kernel.
_BINDING_HEAD = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cerrno>
#include <cstdlib>
#include <stdexcept>
#include <type_traits>

namespace fxlowbit_unit {
static void* (*tensor_data_ptr)(PyObject* obj) = nullptr;

template <typename T> static inline T arg(PyObject* args, Py_ssize_t n) {
    static_assert(std::is_pointer_v<T>, "a kernel argument is a pointer or a number");
    return static_cast<T>(tensor_data_ptr(PyTuple_GET_ITEM(args, n)));
}
template <> inline int64_t arg<int64_t>(PyObject* args, Py_ssize_t n) {
    auto v = PyLong_AsSsize_t(PyTuple_GET_ITEM(args, n));
    if (v == -1 && PyErr_Occurred()) throw std::runtime_error("expected an int argument");
    return v;
}
template <> inline uintptr_t arg<uintptr_t>(PyObject* args, Py_ssize_t n) {
    auto v = PyLong_AsVoidPtr(PyTuple_GET_ITEM(args, n));
    if (v == reinterpret_cast<void*>(-1) && PyErr_Occurred()) throw std::runtime_error("expected an address");
    return reinterpret_cast<uintptr_t>(v);
}
template <> inline float arg<float>(PyObject* args, Py_ssize_t n) {
    auto v = PyFloat_AsDouble(PyTuple_GET_ITEM(args, n));
    if (v == -1.0 && PyErr_Occurred()) throw std::runtime_error("expected a float argument");
    return static_cast<float>(v);
}
static bool arity(PyObject* args, Py_ssize_t n) {
    if (!PyTuple_CheckExact(args) || PyTuple_GET_SIZE(args) != n) {
        PyErr_Format(PyExc_TypeError, "kernel takes a tuple of %zd arguments", n);
        return false;
    }
    return true;
}
}  // namespace fxlowbit_unit
"""

_BINDING_TAIL = r"""
static struct PyModuleDef fxlowbit_unit_module = {
    PyModuleDef_HEAD_INIT, "kernel", NULL, -1, fxlowbit_unit_methods};

PyMODINIT_FUNC PyInit_kernel(void) {
    const char* addr = std::getenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR");
    char* end = nullptr;
    errno = 0;
    uintptr_t value = addr ? std::strtoull(addr, &end, 10) : 0;
    if (!addr || errno != 0 || end == addr || value == 0) {
        PyErr_SetString(PyExc_RuntimeError, "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR is not set");
        return nullptr;
    }
    fxlowbit_unit::tensor_data_ptr = reinterpret_cast<void* (*)(PyObject*)>(value);
    return PyModule_Create(&fxlowbit_unit_module);
}
"""


def combined_source(kernels: list[tuple[list[str], str]]) -> str:
    """One translation unit of ``kernels`` ((argtypes, source) each, :func:`batchable`): their
    includes once, kernel ``i`` as ``k{i}::kernel``, and a module ``kernel`` whose ``kernel_{i}``
    calls it."""
    includes: dict[str, None] = {}
    bodies = []
    for i, (_, source) in enumerate(kernels):
        inc, body = _split(source)
        includes.update(dict.fromkeys(inc))
        bodies.append(f"namespace k{i} {{\n{body}\n}}  // namespace k{i}\n")
    bindings = "".join(_binding(i, argtypes) for i, (argtypes, _) in enumerate(kernels))
    table = "".join(f'    {{"kernel_{i}", kernel_{i}_py, METH_VARARGS, ""}},\n' for i in range(len(kernels)))
    methods = f"static PyMethodDef fxlowbit_unit_methods[] = {{\n{table}    {{NULL, NULL, 0, NULL}}}};\n"
    return "\n".join(includes) + "\n" + "".join(bodies) + _BINDING_HEAD + bindings + methods + _BINDING_TAIL


class _Batch:
    """The kernels one generated module deferred, compiled together on first need."""

    def __init__(self) -> None:
        self.kernels: list[tuple[list[str], str]] = []
        self.lock = threading.Lock()
        self.units: list[Callable[[], Any]] | None = None  # per unit: loads its module
        self.failed: set[int] = set()

    def add(self, argtypes: list[str], source: str) -> _Deferred:
        self.kernels.append((list(argtypes), source))
        return _Deferred(self, len(self.kernels) - 1)

    def start(self) -> list[Callable[[], Any]]:
        """Seal this batch (later kernels start another) and submit its units' compiles, once: kernel
        ``k`` goes to unit ``k % len(units)``, at index ``k // len(units)``. Returns the units."""
        from torch._inductor.async_compile import AsyncCompile, get_compile_threads

        with self.lock:
            if self.units is not None:
                return self.units
            if getattr(_local, "batch", None) is self:
                _local.batch = None
            n = len(self.kernels)
            threads = max(1, get_compile_threads() or 1)
            parts = max(1, min(threads, math.ceil(n / MIN_PER_UNIT)))
            submit = AsyncCompile.submit if threads > 1 else None
            self.units = [self._submit(self.kernels[u::parts], submit) for u in range(parts)]
            STATE.counters["cpu_kernels_batched"] += n
            STATE.counters["cpu_kernel_units"] += parts
            return self.units

    @staticmethod
    def _submit(kernels: list[tuple[list[str], str]], submit: Any) -> Callable[[], Any]:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        if len(kernels) == 1:  # a unit of one: Inductor's own binding (and its cache entry)
            argtypes, source = kernels[0]
            get = CppPythonBindingsCodeCache.load_pybinding_async(argtypes, source, submit_fn=submit)
            return lambda: _Single(get())
        try:
            return _unit_cache().load_async(combined_source(kernels), "cpu", submit_fn=submit)
        except Exception as err:  # the submit itself failed (writing the source, say)
            return functools.partial(_raise, err)

    def result(self, k: int) -> Callable[..., Any]:
        units = self.start()
        u, j = k % len(units), k // len(units)
        if u not in self.failed:  # (a failed unit's loader would compile it again)
            try:
                return getattr(units[u](), f"kernel_{j}")
            except Exception as err:
                self._failed(u, err)
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        argtypes, source = self.kernels[k]
        return CppPythonBindingsCodeCache.load_pybinding(argtypes, source)

    def _failed(self, u: int, err: Exception) -> None:
        """Unit ``u`` failed to compile: its kernels compile one by one; one warning per process."""
        with self.lock:
            if u in self.failed:
                return
            self.failed.add(u)
            STATE.counters["cpu_kernel_units_failed"] += 1
        first = (str(err).strip().splitlines() or [""])[0]
        log.info("fxlowbit: CPU kernel unit failed: %s", err)
        if "cpu_kernel_units_failed" not in STATE.warned:
            STATE.warned.add("cpu_kernel_units_failed")
            warnings.warn(
                f"fxlowbit: compiling Inductor's CPU kernels in one unit failed ({type(err).__name__}: "
                f"{first[:200]}); they compile one by one, as Inductor does (set {ENV}=0 to skip the "
                "units)",
                stacklevel=2,
            )


def _raise(err: Exception) -> Any:
    raise err


class _Single:
    """A one-kernel unit's loaded kernel, under the name a unit's kernels have."""

    def __init__(self, kernel: Callable[..., Any]) -> None:
        self.kernel_0 = kernel


class _Deferred:
    """A deferred kernel: the generated module's ``wait()`` swaps it for the compiled kernel; a
    call before that (a wrapper that never waits) compiles its unit and calls it."""

    __slots__ = ("batch", "index", "kernel")

    def __init__(self, batch: _Batch, index: int) -> None:
        self.batch, self.index = batch, index
        self.kernel: Callable[..., Any] | None = None

    def result(self) -> Callable[..., Any]:
        if self.kernel is None:
            self.kernel = self.batch.result(self.index)
        return self.kernel

    def __call__(self, *args: Any) -> Any:
        return self.result()(*args)


@functools.cache
def _unit_cache() -> Any:
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    class UnitCodeCache(CppPythonBindingsCodeCache):
        """Inductor's compile-and-load of a C++ Python module (its flags, precompiled header, disk
        and process caches), for a whole unit; its module is named ``kernel`` like a kernel's."""

        cache: dict[str, Callable[[], Any]] = {}

    return UnitCodeCache


def install() -> None:
    """Patch ``AsyncCompile.cpp_pybinding`` and ``AsyncCompile.wait`` once: both act as before
    unless :func:`batched` is active on the calling thread (or the module holds deferred kernels)."""
    from torch._inductor.async_compile import AsyncCompile

    with STATE.lock:
        if not getattr(AsyncCompile.cpp_pybinding, "_fxlowbit", False):
            _patch(AsyncCompile)


def _patch(AsyncCompile: Any) -> None:
    cpp_pybinding, wait = AsyncCompile.cpp_pybinding, AsyncCompile.wait

    @functools.wraps(cpp_pybinding)
    def deferring_cpp_pybinding(self: Any, argtypes: list[str], source_code: str) -> Any:
        if not _active():
            return cpp_pybinding(self, argtypes, source_code)
        if not batchable(source_code):
            STATE.counters["cpu_kernels_unbatched"] += 1
            return cpp_pybinding(self, argtypes, source_code)
        batch = getattr(_local, "batch", None)
        if batch is None:
            batch = _local.batch = _Batch()
        return batch.add(argtypes, source_code)

    @functools.wraps(wait)
    def resolving_wait(self: Any, scope: dict[str, Any]) -> None:
        deferred = [(k, v) for k, v in scope.items() if isinstance(v, _Deferred)]
        if deferred:
            # submit every unit before waiting on the first (they compile on the pool meanwhile)
            for batch in dict.fromkeys(v.batch for _, v in deferred):
                batch.start()
            for k, v in deferred:
                scope[k] = v.result()
        return wait(self, scope)

    deferring_cpp_pybinding._fxlowbit = True  # type: ignore[attr-defined]
    AsyncCompile.cpp_pybinding = deferring_cpp_pybinding
    AsyncCompile.wait = resolving_wait
