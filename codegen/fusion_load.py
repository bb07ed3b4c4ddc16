"""Loading generated fusions: :func:`kernel` writes a spec's Triton source (:mod:`.fusion_source`)
to a file, under ``FXLOWBIT_DUMP_DIR`` or a temporary directory (Triton needs the source in a
file), imports it and keeps its compiled ``_fused_kernel``, once per process and spec.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from .fusion_source import source, source_consumer
from .fusion_spec import Spec

__all__ = ["kernel"]

_KERNELS: dict[str, object] = {}


def kernel(spec: Spec):
    """The compiled ``_fused_kernel`` of ``spec`` (a producer, or a consumer when its first input
    is "decoded"), generated once per process and spec; Triton needs the source in a file, written
    under ``FXLOWBIT_DUMP_DIR`` or a temporary directory."""
    consumer = spec.inputs[:1] == ("decoded",)
    text = source_consumer(spec) if consumer else source(spec)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    if digest not in _KERNELS:
        folder = Path(os.environ.get("FXLOWBIT_DUMP_DIR") or Path(tempfile.gettempdir()) / "fxlowbit_kernels")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{'fused_unpack' if consumer else 'fused_pack'}_{digest}.py"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        name = f"fxlowbit_generated_{digest}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None  # a .py file has a loader
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        _KERNELS[digest] = module._fused_kernel
    return _KERNELS[digest]
