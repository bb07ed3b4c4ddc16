"""Kernel families: each module holds the kernel(s) and its pure-torch ``*_reference``."""

import math


def linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a linear's forward, ``x (..., in) @ w (out, in)^T`` (dense-equivalent for a 2:4
    weight): the ``register_flop_formula`` of the linear ops (lowbit, sampled, 2:4), which passes
    shapes."""
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]
