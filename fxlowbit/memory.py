"""Saved-activation bytes, measured independently of our own bookkeeping.

After the forward, walk the autograd graph from ``loss.grad_fn`` and add up the unique storages
of every saved tensor, leaving out parameter storages. Works for built-in autograd nodes
(``_saved_*`` attributes) and custom Functions such as compiled graphs (``saved_tensors``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["saved_activation_bytes", "saved_tensors"]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


def saved_tensors(root: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor saved for backward in the autograd graph behind ``root``."""
    out: list[torch.Tensor] = []
    seen = set()
    stack = [root.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for attr in dir(fn):
            if attr.startswith("_saved_"):
                try:
                    out.extend(_tensors(getattr(fn, attr)))
                except RuntimeError:  # freed already (retain_graph=False after backward)
                    pass
        if hasattr(fn, "saved_tensors"):
            try:
                out.extend(_tensors(fn.saved_tensors))
            except RuntimeError:
                pass
        stack.extend(f for f, _ in fn.next_functions)
    return out


def saved_activation_bytes(root: torch.Tensor, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages saved behind ``root``, minus those of ``exclude``
    (pass ``model.parameters()``)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}
    for t in saved_tensors(root):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in excluded or st.nbytes() == 0:
            continue
        storages[ptr] = st.nbytes()
    return sum(storages.values())
