"""Graph passes (installed as fxlowbit.passes): one pass per module, each exposing ``run``."""

from . import analyze, rewrite_saved

__all__ = ["analyze", "rewrite_saved"]
