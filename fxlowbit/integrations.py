"""Make ``backend="lowbit"`` usable from training stacks that check backend names against a list.

Hugging Face ``accelerate`` (and so ``transformers.Trainer`` with
``TrainingArguments(torch_compile=True, torch_compile_backend="lowbit")``) turns the backend name
into its ``DynamoBackend`` enum, which only knows PyTorch's built-in backends and raises
``ValueError: 'LOWBIT' is not a valid DynamoBackend``. :func:`install` teaches the enum every
backend registered with ``torch._dynamo`` (``lowbit`` and any configured variant registered as
below), as soon as ``accelerate.utils.dataclasses`` is imported, or at once if it already is;
``import fxlowbit`` calls it. Nothing else of accelerate changes, and nothing is imported early.

Trainer passes no backend options; register a configured variant under its own (lower-case) name:

    >>> import functools, torch, fxlowbit
    >>> torch._dynamo.register_backend(
    ...     name="lowbit_m01", compiler_fn=functools.partial(fxlowbit.lowbit, options={"memory_budget": 0.1})
    ... )  # doctest: +SKIP
    >>> # TrainingArguments(..., torch_compile=True, torch_compile_backend="lowbit_m01")
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

log = logging.getLogger(__name__)

__all__ = ["install", "patch_accelerate"]

_TARGET = "accelerate.utils.dataclasses"


def _registered(name: str) -> bool:
    from torch._dynamo import list_backends

    return name.lower() in list_backends(exclude_tags=())


def patch_accelerate(module) -> bool:
    """Let ``module.DynamoBackend(name)`` accept any backend registered with ``torch._dynamo``
    (through the enum's ``_missing_`` hook). Returns whether the enum was patched."""
    enum_cls = getattr(module, "DynamoBackend", None)
    if enum_cls is None or getattr(enum_cls, "_fxlowbit_patched", False):
        return False
    original = enum_cls.__dict__.get("_missing_")

    def _missing_(cls, value):
        if isinstance(value, str) and _registered(value):
            key = value.upper()
            member = cls._value2member_map_.get(key)
            if member is None:  # one pseudo-member per name, as Enum makes for its own values
                member = str.__new__(cls, key)
                member._name_, member._value_ = key, key
                cls._value2member_map_[key] = member
                cls._member_map_.setdefault(key, member)
            return member
        return original.__func__(cls, value) if original is not None else None

    enum_cls._missing_ = classmethod(_missing_)
    enum_cls._fxlowbit_patched = True
    log.debug("accelerate's DynamoBackend now accepts torch._dynamo's registered backends")
    return True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`patch_accelerate` right after ``accelerate.utils.dataclasses`` executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module = spec.loader.exec_module

        def run(module):
            exec_module(module)
            patch_accelerate(module)

        spec.loader.exec_module = run  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Patch accelerate now if it is imported, else as soon as it is (idempotent)."""
    if _TARGET in sys.modules:
        patch_accelerate(sys.modules[_TARGET])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
