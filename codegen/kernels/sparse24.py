"""2:4 structured sparsity for training: weight masks and MVUE gradient sparsification.

Masks. A weight ``w`` (out, in) is 2:4 along its rows when every group of 4 consecutive elements of
a row holds at most 2 non-zeros: what the forward GEMM ``x @ (w*m)^T`` needs on sparse tensor cores.
The grad-input GEMM ``g @ (w*m)`` reads ``w^T``, so training wants the mask *transposable*: 2:4
along rows and along columns. :func:`transposable_mask` picks, per 4x4 block, the one of the 90
4x4 binary patterns with exactly 2 ones in every row and every column that keeps the most ``|w|``
(scores of all blocks against all patterns are one matmul ``(blocks, 16) @ (16, 90)``; ties go to
the first pattern in :data:`PATTERNS`' order). :func:`plain_mask` keeps the 2 largest ``|w|`` of
every row group of 4: it keeps at least as much (a relaxation) but only ``w*m`` is 2:4.

MVUE. The grad-weight GEMM ``dw = g^T @ x`` contracts over tokens, so :func:`mvue24` makes ``g``
2:4 along that axis without bias: in each group of 4 with ``a = |x|`` it keeps element ``i`` with
probability ``p_i = min(1, 2 a_i / sum a)`` (capped: the largest element, if ``2 a_max >= sum a``,
gets ``p = 1`` and the others share the second slot, ``p_j = a_j / sum_{k != max} a_k``), so
``sum p = min(2, nnz)``; kept values are divided by their ``p``. These ``p`` minimise the added
variance ``sum a_i^2 (1/p_i - 1)`` among unbiased 2-of-4 estimators (Chmiel et al., ICLR 2023).
Sampling is systematic: probabilities in integer units of ``R = 2**24`` (``P_i = round(p_i R)``,
the rounding residual moved onto one element so that ``sum P = min(2, nnz) R`` exactly), cumulative
sums ``K``, one uniform integer ``U`` in ``[0, R)`` per group; element ``i`` is kept when
``U`` or ``U + R`` lies in ``[K_{i-1}, K_i)``. So exactly ``min(2, nnz)`` elements survive, each
with probability ``P_i / R`` exactly, and dividing by ``P_i / R`` makes ``E[out] = x`` exactly for
the 2**24 values of ``U`` (elements with ``p < 2**-25`` of their group may get ``P = 0`` and are
dropped: a bias below ``2**-24`` of the group's L1 norm, the resolution of the noise itself).
``U`` comes from :func:`~.quant.hash_uniform` (one counter-hash per group), so a seed reproduces
the result on any device. Groups holding NaN/Inf are passed through unchanged (training diverged;
hiding it helps no one). The result is cast back to ``x``'s dtype (fp16 can overflow: a kept value
grows to at most the group's L1 norm).

The sparse linear that uses both is in :mod:`.sparse24_linear`.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .quant import hash_uniform

__all__ = [
    "PATTERNS",
    "transposable_mask",
    "plain_mask",
    "is_24",
    "masked_weight",
    "mvue24_probabilities",
    "mvue24_reference",
    "mvue24",
]

_R = 1 << 24  # probability unit of the MVUE sampler: the resolution of hash_uniform's noise
_CHUNK = 1 << 16  # 4x4 blocks scored per matmul: bounds the (blocks, 90) score tensor to 23 MB


def _patterns() -> torch.Tensor:
    """The 90 4x4 0/1 matrices with two ones in every row and column, flattened row-major."""
    rows = [r for r in itertools.product((0, 1), repeat=4) if sum(r) == 2]  # 6 rows
    blocks = [b for b in itertools.product(rows, repeat=4) if all(sum(c) == 2 for c in zip(*b, strict=True))]
    return torch.tensor(blocks, dtype=torch.float32).view(len(blocks), 16)


PATTERNS = _patterns()  # (90, 16) fp32


def check_weight(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2 or w.shape[0] % 4 or w.shape[1] % 4:
        raise ValueError(
            f"fxlowbit sparse24: {what} needs a 2-D weight (out, in) with both sizes multiples of 4, "
            f"got shape {tuple(w.shape)}"
        )
    if not w.is_floating_point():
        raise ValueError(f"fxlowbit sparse24: {what} needs a floating-point weight, got {w.dtype}")


def transposable_mask(w: torch.Tensor) -> torch.Tensor:
    """Bool mask of ``w``'s shape, 2:4 along rows and columns, keeping the most ``|w|`` per 4x4 block.

    >>> m = transposable_mask(torch.randn(8, 12))
    >>> bool(is_24(m) and is_24(m.t()))
    True
    """
    check_weight(w, "transposable_mask")
    out, inp = w.shape
    # w: (out, in) -> blocks: (out/4 * in/4, 16), each block's 4x4 entries row-major
    blocks = w.detach().abs().float().reshape(out // 4, 4, inp // 4, 4).transpose(1, 2).reshape(-1, 16)
    pats = PATTERNS.to(w.device)
    best = torch.cat([(c @ pats.T).argmax(1) for c in blocks.split(_CHUNK)])  # (blocks,)
    mask = pats[best].bool()  # (blocks, 16)
    return mask.view(out // 4, inp // 4, 4, 4).transpose(1, 2).reshape(out, inp)


def plain_mask(w: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping the 2 largest ``|w|`` of every group of 4 along rows (2:4 for ``w`` only)."""
    check_weight(w, "plain_mask")
    a = w.detach().abs().float().reshape(w.shape[0], -1, 4)  # (out, in/4, 4)
    top = a.topk(2, dim=-1).indices
    return torch.zeros_like(a, dtype=torch.bool).scatter_(-1, top, True).view(w.shape)


def is_24(t: torch.Tensor, dim: int = -1) -> bool:
    """Whether every group of 4 consecutive elements along ``dim`` has at most 2 non-zeros."""
    t = t.movedim(dim, -1)
    if t.shape[-1] % 4:
        return False
    return bool(((t != 0).reshape(*t.shape[:-1], -1, 4).sum(-1) <= 2).all())


def masked_weight(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w`` with the pruned entries zeroed (``where``, so a pruned Inf/NaN cannot leak as NaN)."""
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


# ------------------------------------------------------------------------------------------ MVUE


def _grouped(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """x -> (n_groups, 4), 4 consecutive elements along ``dim``, zero-padded; and the pad."""
    t = x.movedim(dim, -1)
    pad = (-t.shape[-1]) % 4
    if pad:
        t = F.pad(t, (0, pad))
    return t.reshape(-1, 4), pad


def _ungrouped(g: torch.Tensor, x: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    shape = list(x.movedim(dim, -1).shape)
    t = g.view(*shape[:-1], shape[-1] + pad)[..., : shape[-1]]
    return t.movedim(-1, dim).contiguous()


def mvue24_probabilities(a: torch.Tensor) -> torch.Tensor:
    """Keep probabilities ``p`` (n, 4) fp32 of non-negative group magnitudes ``a`` (n, 4) (see the
    module docstring): ``sum p = min(2, nnz)``, ``p = 0`` where ``a = 0``."""
    a = a.float()
    amax = a.amax(1, keepdim=True)
    a = a / torch.where(amax > 0, amax, 1.0)  # max 1, sum in [1, 4]: no overflow, same p
    s = a.sum(1, keepdim=True)
    p = 2 * a / torch.where(s > 0, s, 1.0)
    top = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.argmax(1, keepdim=True), True)
    rest = torch.where(top, 0.0, a)
    rs = rest.sum(1, keepdim=True)  # summed directly, not s - 1: exact for tiny others
    p_capped = torch.where(top, 1.0, rest / torch.where(rs > 0, rs, 1.0))
    p = torch.where(s <= 2, p_capped, p).clamp(0.0, 1.0)  # s <= 2 <=> 2 a_max >= sum a
    return torch.where(s > 0, p, 0.0)


def _integer_probabilities(a: torch.Tensor) -> torch.Tensor:
    """``round(p * R)`` as int32 (n, 4), adjusted so every row sums to ``min(2, nnz) * R`` exactly.

    The residual (a few units: fp32 rounding of p) goes to the non-zero element with the most room
    below ``R`` if positive, else to the largest; both have ``>= R/3`` room in every group with
    ``nnz >= 3`` (with ``nnz <= 2`` all non-zero ``p`` are exactly 1), so every ``P`` stays in
    ``[0, R]`` and zeros keep ``P = 0``."""
    big = torch.round(mvue24_probabilities(a) * _R).to(torch.int32)
    nz = a > 0
    total = nz.sum(1, keepdim=True).clamp(max=2).to(torch.int32) * _R
    r = total - big.sum(1, keepdim=True, dtype=torch.int32)
    room = torch.where(nz, _R - big, -1)
    j = torch.where(r > 0, room.argmax(1, keepdim=True), big.argmax(1, keepdim=True))
    return big.scatter_add(1, j, r)


def _check_mvue(x: torch.Tensor) -> None:
    if not x.is_floating_point() or x.dim() == 0:
        raise ValueError(
            f"fxlowbit sparse24: mvue24 needs a floating-point tensor with a dim, "
            f"got {x.dtype} {tuple(x.shape)}"
        )


def mvue24_reference(x: torch.Tensor, noise: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Unbiased 2:4 sparsification of ``x`` along ``dim`` (groups of 4 consecutive elements; a
    ragged end is zero-padded), with ``noise`` uniform in [0, 1), one per group in group order
    (``(n_groups,)`` or ``(n_groups, 1)``; values on the ``2**-24`` grid are used exactly).
    Returns a contiguous tensor of ``x``'s shape and dtype.

    >>> x = torch.tensor([4.0, 1.0, 0.0, 3.0])
    >>> y = mvue24_reference(x, torch.tensor([0.5]))
    >>> int((y != 0).sum())
    2
    """
    _check_mvue(x)
    g, pad = _grouped(x, dim)  # (n, 4)
    if noise.numel() != g.shape[0]:
        raise ValueError(f"fxlowbit sparse24: mvue24 needs {g.shape[0]} noise values, got {noise.numel()}")
    a = g.abs().float()
    big = _integer_probabilities(a)  # (n, 4) int32, rows sum to min(2, nnz) * R
    k_hi = big.cumsum(1, dtype=torch.int32)  # K_i
    k_lo = k_hi - big  # K_{i-1}
    u = (noise.reshape(-1, 1).float() * _R).to(torch.int32)  # (n, 1) integers in [0, R)

    def below(k):  # how many of the points U, U + R lie below k
        return (u < k).to(torch.int32) + (u < k - _R).to(torch.int32)

    keep = below(k_hi) - below(k_lo) > 0
    scaled = g.float() * (_R / big.clamp(min=1).float())  # x / p with p = P / R
    out = torch.where(keep, scaled, 0.0).to(x.dtype)
    out = torch.where(torch.isfinite(a).all(1, keepdim=True), out, g)  # NaN/Inf groups unchanged
    return _ungrouped(out, x, dim, pad)


def mvue24(x: torch.Tensor, seed: torch.Tensor | int, dim: int = -1) -> torch.Tensor:
    """:func:`mvue24_reference` with :func:`~.quant.hash_uniform` noise of ``seed`` (an int or an
    int64 scalar tensor), so one seed gives one result on any device or compiler."""
    _check_mvue(x)
    seed = torch.as_tensor(seed, dtype=torch.int64, device=x.device)
    n_groups = x.numel() // max(x.shape[dim], 1) * -(-x.shape[dim] // 4)
    return mvue24_reference(x, hash_uniform(seed, n_groups, 1), dim)
