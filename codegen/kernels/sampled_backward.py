"""The sampled linear's backward (VCAS): the GEMMs of a linear layer's backward on sampled token rows.

The layer's forward is exactly ``F.linear(x, w, b)``. Backward, with ``g`` the output gradient
flattened to ``(N, out)`` and ``x`` to ``(N, in)`` (Wang, Chen, Zhu 2024, "Efficient
Backpropagation with Variance-Controlled Adaptive Sampling"):

- grad-input ``dx_i = g_i w``: row ``i`` is kept with probability ``q_i = min(1, c ||g_i||)``;
- grad-weight ``dw = sum_i g_i^T x_i``: term ``i`` kept with ``q_i = min(1, c ||g_i|| ||x_i||)``
  (leverage scores: ``||g_i^T x_i||_F = ||g_i|| ||x_i||``, the variance-optimal Bernoulli choice);
- ``db = g.sum(0)`` exactly.

``c`` is water-filled so that ``sum_i q_i = keep * N`` (:func:`keep_probabilities`); rows with a zero
score get ``q_i = 0`` and are never kept, so rows another sampled layer already dropped cost nothing.
Kept rows are reweighted by ``1 / q_i``: each estimate is unbiased and adds, in expectation, a
squared Frobenius error of ``sum_i (1/q_i - 1) ||a_i||^2`` (``a_i`` row ``i``'s contribution;
:func:`added_variance`). ``q_i`` is rounded up to the draws' 2**-24 grid and the draw is
``u_i < q_i``, so ``P(kept) == q_i`` exactly and the reweighting uses the true inclusion probability.
The draws are ``hash_uniform(seed, N, 2)``: column 0 for grad-input, 1 for grad-weight (two
independent streams; row ``i``'s draws do not depend on ``N``), identical on every device.

Work: the kept rows are gathered (``index_select``), multiplied, and scattered (``index_copy_``
into a ``dx`` whose dropped rows are zero-filled): the GEMMs run on about ``keep * N`` rows.
``keep >= 1`` (and non-finite gradients, whose NaN/Inf then propagate as F.linear's would) take
F.linear's own backward calls, bit for bit. Norms, probabilities and reweighting are fp32
(water-filling in fp64) whatever the dtype; the reweighting never overflows a finite fp16 operand:
``dx`` rows are scaled after their GEMM, and in fp16 grad-weight splits ``1/q_i`` between ``g_i``
and ``x_i`` so both scaled rows have norm ``sqrt(||g_i|| ||x_i|| / q_i) = c**-0.5`` (fp32/bf16
scale ``g_i`` alone: ``1/q_i <= 2**24``, far inside their range). The kept row count is read on
the host (one sync on CUDA).

:func:`backward` is shared by ``fxlowbit::sampled_linear_backward`` (:mod:`.sampled_linear`) and
the keyed op of the ``sampling`` option (:mod:`.sampling_state`); :func:`sampled_linear_reference`
(dense masking in fp64), :func:`added_variance` and :func:`flops` state what it should give and cost.
"""

from __future__ import annotations

import torch

from .quant import hash_uniform

__all__ = [
    "STATS",
    "keep_probabilities",
    "backward",
    "fake_grads",
    "sampled_linear_reference",
    "added_variance",
    "flops",
]

# what the backward writes into ``stats`` (float64, 6 elements), in this order
STATS = ("var_input", "var_weight", "norm2_input", "norm2_weight", "kept_input", "kept_weight")
_GRID = 2.0**24  # hash_uniform's resolution: u = k * 2**-24


def keep_probabilities(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Inclusion probabilities ``q`` (fp32, shape of ``scores``) with ``q_i = min(1, c s_i)`` and
    ``sum q = keep * N``, rounded up to the 2**-24 grid (so the sum exceeds it by < N * 2**-24).

    Water-filling: with ``s`` sorted descending and ``tail_k = sum_{j>=k} s_j``, ``c_k = (T - k) /
    tail_k`` (``T = keep * N``) is the scale with ``k`` rows clamped at 1; the first ``k`` with
    ``c_k s_k <= 1`` is consistent (``c_k`` grows with ``k`` while the condition fails, so the ``k``
    larger rows stay clamped) and exists for some ``k < T``. Then ``sum q = k + c_k tail_k = T``.
    Zero scores get 0; when ``T`` reaches the number of positive scores they all get 1. Scores must
    be finite and non-negative.

        >>> keep_probabilities(torch.tensor([4.0, 1.0, 1.0, 0.0]), 0.5)  # T = 2: one clamped row
        tensor([1.0000, 0.5000, 0.5000, 0.0000])
    """
    s = scores.reshape(-1).double()
    positive = s > 0
    target = float(keep) * s.numel()
    if target >= int(positive.sum()):
        return positive.to(torch.float32).view(scores.shape)
    sd = s.sort(descending=True).values
    tail = sd.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{j >= k} sd[j] (> 0 for every k < T)
    k = torch.arange(s.numel(), dtype=torch.float64, device=s.device)
    c = (target - k) / tail
    first = int(((k < target) & (c * sd <= 1)).to(torch.uint8).argmax())  # first True
    p = (c[first] * s).clamp(max=1.0)
    return (torch.ceil(p * _GRID) / _GRID).to(torch.float32).view(scores.shape)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _norms(t2d: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t2d, dim=1, dtype=torch.float32)  # (N,), fp32 for fp16/bf16 too


def _probabilities(g2d, x2d, keep_input: float, keep_weight: float, need_input: bool, need_weight: bool):
    """(q_input, q_weight, ||g_i||, ||x_i||): a q is ``None`` where that GEMM is dense (not needed,
    keep >= 1, or a non-finite score); norms fp32 (N,), ``None`` where not computed."""
    sample_w = need_weight and keep_weight < 1
    gn = _norms(g2d) if (need_input and keep_input < 1) or sample_w else None
    xn = _norms(x2d) if sample_w else None
    q_in = q_w = None
    if need_input and keep_input < 1 and gn is not None and bool(torch.isfinite(gn).all()):
        q_in = keep_probabilities(gn, keep_input)
    if sample_w and gn is not None and xn is not None:
        sw = gn.double() * xn.double()  # ||g_i^T x_i||_F, fp64: the product cannot overflow
        q_w = keep_probabilities(sw, keep_weight) if bool(torch.isfinite(sw).all()) else None
    return q_in, q_w, gn, xn


def _as_f32(keep) -> float:
    """A keep ratio as the op sees it: a Python 0.3 and ``torch.tensor(0.3)`` give the same q."""
    return float(torch.as_tensor(keep, dtype=torch.float32))


def _draws(seed: torch.Tensor, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    u = hash_uniform(seed.to(device), n, 2)  # (N, 2): element 2i + j
    return u[:, 0], u[:, 1]


def _dense_input(g2d, w, x_colmajor: bool):
    # F.linear's backward (mm_mat1_backward): a column-major x gets its gradient as (w^T g^T)^T
    return w.t().mm(g2d.t()).t().contiguous() if x_colmajor else g2d.mm(w)


def _dense_weight(g2d, w, x2d):
    # mm_mat2_backward of mat2 = w.t(), then the transpose's backward
    if w.stride(1) == 1 and w.stride(0) == w.shape[1]:
        return g2d.t().mm(x2d)
    return x2d.t().mm(g2d).t().contiguous()


def _sq(t: torch.Tensor) -> float:
    """Squared Frobenius norm, fp32 row norms summed in fp64 (stats only)."""
    return float(_norms(_flat(t)).double().square().sum())


def _sampled_input(g2d, w, q, u, stats: bool):
    """(dx (N, in), kept rows, fp64 squared norms of the kept rows of ``g w`` (stats only) and
    their q): the GEMM runs on the kept rows only."""
    kept = u < q
    idx = kept.nonzero().squeeze(1)  # (k,)
    dx = g2d.new_empty((g2d.shape[0], w.shape[1]))
    dx.index_fill_(0, (~kept).nonzero().squeeze(1), 0)  # each row written once: zeros or a product
    rows = g2d.index_select(0, idx).mm(w)  # (k, out) @ (out, in)
    qk = q.index_select(0, idx)
    norm2 = _norms(rows).double().square() if stats else None
    # scaled after the GEMM in fp32 (in place for fp32): never overflows an operand
    dx.index_copy_(0, idx, rows.float().mul_(qk.reciprocal()[:, None]).to(rows.dtype))
    return dx, idx.numel(), norm2, qk.double()


def _sampled_weight(g2d, x2d, q, u, gn, xn):
    """(dw (out, in), kept rows): ``sum_k (a_k g_k)^T (b_k x_k)`` over kept rows, ``a_k b_k = 1/q_k``;
    ``gn``, ``xn``: the row norms the probabilities came from. fp32/bf16: ``a = 1/q <= 2**24``
    (overflows only a gradient above 2e31); fp16: the split is balanced, both scaled rows get norm
    ``sqrt(||g|| ||x|| / q)`` (``c**-0.5`` for the unclamped rows; clamped ones stay as they are)."""
    idx = (u < q).nonzero().squeeze(1)
    gk, xk = g2d.index_select(0, idx), x2d.index_select(0, idx)  # (k, out), (k, in)
    qk = q.index_select(0, idx).double()
    if g2d.dtype != torch.float16:
        return gk.float().mul_(qk.reciprocal().float()[:, None]).to(g2d.dtype).t().mm(xk), idx.numel()
    gk_n, xk_n = gn.index_select(0, idx).double(), xn.index_select(0, idx).double()
    a = torch.where(qk < 1, (xk_n / (qk * gk_n)).sqrt(), 1.0).float()[:, None]
    b = torch.where(qk < 1, (gk_n / (qk * xk_n)).sqrt(), 1.0).float()[:, None]
    return gk.float().mul_(a).half().t().mm(xk.float().mul_(b).half()), idx.numel()


def backward(
    grad: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    ki: float,
    kw: float,
    seed: torch.Tensor,
    want: bool,
    x_colmajor: bool,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """The backward at keep ratios ``ki``, ``kw`` (floats): (dx, dw, db, figures): the :data:`STATS`
    figures, computed only when ``want``, and a 7th, ``sum_i ||g_i||^2 ||x_i||^2`` when dw was
    sampled (else 0): with ``||dw||^2`` it estimates dw's minibatch variance. Shared by
    ``fxlowbit::sampled_linear_backward`` and the keyed op the ``sampling`` option uses
    (codegen/kernels/sampling_state.py)."""
    g2d = _flat(grad)
    n, d_in = g2d.shape[0], weight.shape[1]
    x2d = _flat(x) if x is not None else None
    q_in, q_w, gn, xn = _probabilities(g2d, x2d, ki, kw, need_input, need_weight)
    u_in, u_w = _draws(seed, n, grad.device) if q_in is not None or q_w is not None else (None, None)
    fig = [0.0] * 7  # see STATS (+ sum ||g_i||^2 ||x_i||^2); computed only when asked for
    dx, dw, db = (grad.new_empty((0,)) for _ in range(3))  # distinct: outputs may not alias
    if need_input:
        if q_in is None:
            dx = _dense_input(g2d, weight, x_colmajor)
            fig[2], fig[4] = (_sq(dx) if want else 0.0), n
        else:
            dx, fig[4], norm2, qk = _sampled_input(g2d, weight, q_in, u_in, want)
            if norm2 is not None:  # Horvitz-Thompson: unbiased for sum ||a||^2 and sum (1/q - 1) ||a||^2
                fig[0], fig[2] = float(((1 / qk - 1) * norm2 / qk).sum()), float((norm2 / qk).sum())
        dx = dx.view(*grad.shape[:-1], d_in)
    if need_weight:
        assert x2d is not None, "fxlowbit sampled_linear: the weight gradient needs the saved x"
        if q_w is None:
            dw = _dense_weight(g2d, weight, x2d)
            fig[3], fig[5] = (_sq(dw) if want else 0.0), n
        else:
            dw, fig[5] = _sampled_weight(g2d, x2d, q_w, u_w, gn, xn)
            if want:
                q, sw2 = q_w.double(), (gn.double() * xn.double()).square()
                fig[1] = float(torch.where(q > 0, (1 / q - 1) * sw2, 0.0).sum())  # exact expectation
                fig[6] = float(sw2.sum())
                # E||dw_hat||^2 = ||dw||^2 + var: unbiased, clamped at 0 (dips below only at a far too
                # small keep)
                fig[3] = max(0.0, _sq(dw) - fig[1])
    if need_bias:
        db = g2d.sum(0)
    return dx, dw, db, fig


def fake_grads(grad, weight, need_input: bool, need_weight: bool, need_bias: bool):
    """Empty (dx, dw, db) of a linear backward's shapes; (0,) where not needed (the fake kernels)."""
    empty = lambda: grad.new_empty((0,))  # noqa: E731
    dx = grad.new_empty((*grad.shape[:-1], weight.shape[1])) if need_input else empty()
    dw = weight.new_empty(weight.shape) if need_weight else empty()
    db = grad.new_empty((weight.shape[0],)) if need_bias else empty()
    return dx, dw, db


def sampled_linear_reference(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    keep_input: float,
    keep_weight: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`.sampled_linear.sampled_linear` with the same probabilities and draws, by dense
    masking in fp64: ``m_i = kept_i / q_i`` (1 everywhere for a dense GEMM), ``dx = (m g) w``,
    ``dw = (m g)^T x``, ``db = g.sum(0)``; returns fp64 ``(dx (..., in), dw, db)``."""
    g2d, x2d = _flat(grad), _flat(x)
    q_in, q_w, _, _ = _probabilities(g2d, x2d, _as_f32(keep_input), _as_f32(keep_weight), True, True)
    u_in, u_w = _draws(seed, g2d.shape[0], grad.device)
    g64 = g2d.double()

    def mask(q, u):
        if q is None:
            return torch.ones_like(g64[:, 0])
        return torch.where(u < q, 1 / q.double(), 0.0)

    dx = (mask(q_in, u_in)[:, None] * g64) @ weight.double()
    dw = (mask(q_w, u_w)[:, None] * g64).t() @ x2d.double()
    return dx.view(*grad.shape[:-1], weight.shape[1]), dw, g64.sum(0)


def added_variance(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, keep_input: float, keep_weight: float
) -> tuple[float, float]:
    """Expected squared Frobenius error ``(E||dx_hat - dx||^2, E||dw_hat - dw||^2)`` the samplers add at
    these keep ratios, for output gradient ``g`` (..., out) and input ``x`` (..., in): Bernoulli rows
    are independent, so each is ``sum_i (1/q_i - 1) ||a_i||^2`` with ``a_i = g_i w`` (computed
    exactly here, in fp64) and ``||g_i^T x_i||_F = ||g_i|| ||x_i||``. Same ``q`` as the backward's.

        >>> g, x, w = torch.randn(64, 16), torch.randn(64, 32), torch.randn(16, 32)
        >>> v_in, v_w = added_variance(g, x, w, 0.5, 0.25)
    """
    g2d, x2d = _flat(g), _flat(x)
    q_in, q_w, gn, xn = _probabilities(g2d, x2d, _as_f32(keep_input), _as_f32(keep_weight), True, True)

    def total(q, norm2):
        q = q.double()
        return float(torch.where(q > 0, (1 / q - 1) * norm2, 0.0).sum())

    v_in = v_w = 0.0
    if q_in is not None:
        v_in = total(q_in, torch.linalg.vector_norm(g2d.double() @ weight.double(), dim=1) ** 2)
    if q_w is not None and gn is not None and xn is not None:
        v_w = total(q_w, (gn.double() * xn.double()).square())
    return v_in, v_w


def flops(n: int, d_in: int, d_out: int, keep_input: float, keep_weight: float) -> float:
    """Expected FLOPs of the two backward GEMMs: ``2 * d_in * d_out * N * (keep_input + keep_weight)``
    (ratios capped at 1; fewer when fewer than ``keep * N`` rows have a nonzero score). The dense
    backward is ``flops(n, d_in, d_out, 1, 1)``; gathers and scatters (O(N (d_in + d_out))) excluded.

        >>> flops(4096, 512, 512, 0.5, 0.25) / flops(4096, 512, 512, 1, 1)
        0.375
    """
    return 2.0 * d_in * d_out * n * (min(float(keep_input), 1.0) + min(float(keep_weight), 1.0))
