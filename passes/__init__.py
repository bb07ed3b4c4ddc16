"""Graph passes (installed as fxlowbit.passes): one pass per module, each exposing ``run``."""

from . import analyze, recompute, rewrite_saved, saved_views

__all__ = ["saved_views", "analyze", "recompute", "rewrite_saved"]
