"""Graph passes (installed as fxlowbit.passes): one pass per module, each exposing ``run``."""

from . import analyze, recompute, rewrite_saved

__all__ = ["analyze", "recompute", "rewrite_saved"]
