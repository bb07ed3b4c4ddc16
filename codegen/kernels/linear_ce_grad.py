"""Linear + cross-entropy with its gradients formed in the forward, chunk by chunk over tokens.

Maths (as :mod:`.linear_ce`): ``y = h w^T + b``, logits ``z = scale y`` or ``c tanh(scale y / c)``,
per-token loss ``(1 - eps) (lse - z_t) + eps (lse - mean_v z)`` (label smoothing ``eps``), 0 where
``t == ignore_index``; mean (over the other tokens), sum or none. Gradient: ``dz = softmax(z) -
(1 - eps) onehot(t) - eps / V``, ``dy = dz * dz/dy`` (``scale``, or ``scale (1 - (z/c)^2)``),
``dh = dy w``, ``dw = dy^T h``, ``db = sum_i dy``.

:func:`linear_ce_grad_reference` forms them while the logits are at hand (Liger-Kernel's scheme):
per chunk of tokens one GEMM builds the chunk's logits, a cache-sized block of rows at a time turns
them into ``dy`` in place (fp32 maths, rounded once to the GEMM dtype, as the unfused backward
does), then one GEMM gives the chunk's dh rows and one adds its share of dw. No tensor of tokens x
vocab exists and no logit is built twice: the same three GEMMs as the unfused loss, through aten
(MKL / oneDNN / cuBLAS). Ignored tokens are dropped before the GEMMs on CPU (on CUDA they are
masked: no host sync). For mean / sum it returns the reduced loss and the reduced loss's
gradients, so the backward of its op (``fxlowbit::linear_ce_fwd_grad``, :mod:`.linear_ce_grad_op`)
only scales them by the output gradient. For ``reduction="none"`` it returns per-token losses and
per-token dh rows only: a weight gradient cannot be summed before the per-token output gradients
are known (:func:`.linear_ce.linear_cross_entropy` recomputes in the backward then). A caller
that has the logits anyway (a model returning them) hands them over: they are read chunk by
chunk, not rebuilt.

Precision: reductions and dw's sum over chunks in fp32 (fp64 for fp64 inputs); GEMMs in the
inputs' dtype with fp32 accumulation inside. Tokens per chunk come from the cost model
(:func:`chunk_rows`); the block of rows the elementwise part works on fits the core's L2 cache.
The elementwise part is a few torch ops per block; no Triton kernel yet (on CUDA it would fuse
them, but that is unmeasured: no GPU was lent). The backward's multiplications are plain aten
ops, so the planner may store dh / dw compressed when a budget needs it.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from ...costmodel import HardwareProfile, load_profile
from ..dtypes import FLOATS

__all__ = [
    "linear_ce_grad_reference",
    "chunk_rows",
    "cache_bytes",
    "check_inputs",
]

CHUNK_ROWS: int | None = None  # tests: a fixed number of tokens per chunk instead of the cost model's
CHUNK_SLACK = 0.05  # the smallest chunk whose estimated time is within this of the best (less memory)
MASK_IGNORED: bool | None = None  # tests: the CUDA way (mask ignored tokens, no host sync) on CPU
FRESH_BYTES, FAULT_GBPS = 32 << 20, 2.0  # CPU: glibc's largest reused block; first-touch rate (measured)
CUDA_BLOCK_BYTES = 256 << 20  # CUDA: fp32 temporaries of the elementwise part at most this large
_FLOATS = (*FLOATS, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


def check_inputs(h, w, b, target) -> None:
    """ValueError unless h (N, H), w (V, H), b (V,) or None are floating point and target is integer
    (N,): the inputs' check of both paths (:mod:`.linear_ce`, this module) and the Triton kernels."""
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(
            f"fxlowbit linear_ce: need h (N, H) and w (V, H), got {tuple(h.shape)} and {tuple(w.shape)}"
        )
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"fxlowbit linear_ce: bias must be ({w.shape[0]},), got {tuple(b.shape)}")
    if tuple(target.shape) != (h.shape[0],) or target.dtype.is_floating_point:
        raise ValueError(
            f"fxlowbit linear_ce: target must be integer ({h.shape[0]},), got {target.dtype} "
            f"{tuple(target.shape)}"
        )
    for name, t in (("h", h), ("w", w), ("b", b)):
        if t is not None and t.dtype not in _FLOATS:
            raise ValueError(f"fxlowbit linear_ce: {name} must be floating point, got {t.dtype}")


def _check_targets(target, valid, vocab: int, device) -> None:
    if device.type != "cuda" and not bool(((target >= 0) & (target < vocab) | ~valid).all()):
        raise ValueError(f"fxlowbit linear_ce: a target is outside [0, {vocab}) and not ignore_index")


# -- sizes -----------------------------------------------------------------------------------------
@functools.cache
def _profile(kind: str) -> HardwareProfile:
    return load_profile("cpu" if kind == "cpu" else None)


def chunk_rows(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, profile: HardwareProfile) -> int:
    """Tokens per chunk: the fewest (a power of two, or all) whose estimated time is within
    ``CHUNK_SLACK`` of the best. Each chunk runs three GEMMs of ``2 n vocab hidden`` FLOPs (the
    profile's throughput grows with size) and streams ``vocab x hidden`` values that do not shrink
    with it: the weight, read twice, and with more than one chunk dw's fp32 sum, read and written
    (on CPU in bf16/fp16 also the chunk's own product, written and read). The chunk's logits buffer
    (n x vocab) is allocated once per call; on CPU one over ``FRESH_BYTES`` comes as fresh pages
    every call (glibc maps large blocks anew), touched at ``FAULT_GBPS``. Smaller chunks hold less.

        >>> chunk_rows(8192, 50257, 768, torch.float32, load_profile("cpu"))
        512
    """
    tokens = max(int(tokens), 1)
    if CHUNK_ROWS:
        return min(CHUNK_ROWS, tokens)
    name = str(dtype).removeprefix("torch.")
    size = dtype.itemsize
    acc = 2 * max(size, 4) + (2 * size if profile.kind == "cpu" and size < 4 else 0)
    weights = vocab * hidden * 2 * size / (profile.copy_gbps * 1e9)
    accumulate = vocab * hidden * acc / (profile.copy_gbps * 1e9)

    def estimate(n: int) -> float:
        chunks, buffer = math.ceil(tokens / n), n * vocab * size
        t = chunks * (3 * profile.matmul_time(2.0 * n * vocab * hidden, name) + weights)
        t += chunks * accumulate if chunks > 1 else 0.0
        fresh = profile.kind == "cpu" and buffer > FRESH_BYTES
        return t + (buffer / (FAULT_GBPS * 1e9) if fresh else 0.0)

    sizes = sorted({min(tokens, 1 << k) for k in range(4, 24)})
    times = [estimate(n) for n in sizes]
    best = min(times)
    return next(n for n, t in zip(sizes, times, strict=True) if t <= (1 + CHUNK_SLACK) * best)


@functools.cache
def cache_bytes(device_type: str = "cpu") -> int:
    """Bytes of the cache a chunk's logits should stay in: a core's L2 on CPU (1 MiB when the OS
    does not say), the L2 on CUDA (H100: 50 MiB)."""
    size = 0
    if device_type == "cuda" and torch.cuda.is_available():
        size = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
    elif device_type != "cuda":
        try:
            size = os.sysconf("SC_LEVEL2_CACHE_SIZE")
        except (ValueError, OSError, AttributeError):
            size = 0
    return size if size and size > 0 else (50 << 20 if device_type == "cuda" else 1 << 20)


def _block_rows(vocab: int, device: torch.device, chunk: int) -> int:
    """Rows the elementwise part takes at once, two fp32 rows each (the logits and their
    log-softmax): on CPU within the L2 cache; on CUDA within ``CUDA_BLOCK_BYTES`` (a few kernels
    per block: launches stay few, the fp32 temporaries bounded)."""
    room = CUDA_BLOCK_BYTES if device.type == "cuda" else cache_bytes("cpu")
    return max(1, min(chunk, room // (8 * vocab)))


# -- the maths ---------------------------------------------------------------------------------------
def linear_ce_grad_reference(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    logits: torch.Tensor | None = None,
    ignore_index: int = -100,
    scale: float = 1.0,
    softcap: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    grad_h: bool = True,
    grad_w: bool = True,
    grad_b: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dh, dw, db): the loss (fp32; fp64 for fp64 inputs) reduced as asked, and the
    gradients of that loss in h's, w's and b's dtypes; a gradient not asked for (or db without a
    bias) is an empty (0,) tensor. ``reduction="none"`` takes ``grad_w = grad_b = False``: per-token
    losses and per-token dh rows. ``logits``: ``h w^T + b`` (N, V) when the caller has them anyway
    (a model that returns its logits): read chunk by chunk instead of rebuilt, never written."""
    check_inputs(h, w, b, target)
    if logits is not None and tuple(logits.shape) != (h.shape[0], w.shape[0]):
        raise ValueError(f"fxlowbit linear_ce: logits must be (N, V), got {tuple(logits.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fxlowbit linear_ce: reduction={reduction!r}; valid: {_REDUCTIONS}")
    grad_b = grad_b and b is not None
    if reduction == "none" and (grad_w or grad_b):
        raise ValueError("fxlowbit linear_ce: reduction='none' forms per-token dh only, not dw / db")
    (n, hid), v, dev = h.shape, w.shape[0], h.device
    mm = torch.promote_types(h.dtype, w.dtype)
    acc = torch.float64 if mm == torch.float64 else torch.float32
    hs, ws, bs = h.to(mm), w.to(mm), (b.to(mm) if b is not None else None)
    valid = target != ignore_index
    _check_targets(target, valid, v, dev)
    compact = dev.type != "cuda" if MASK_IGNORED is None else not MASK_IGNORED  # CPU: drop them
    # mypy cannot tie the optional rows / idx / buf / count to compact / total: the type: ignores
    # below mark uses that run only when compact (rows, idx), total > 0 (buf) or not compact (count)
    rows = valid.nonzero().squeeze(1) if compact else None
    count = rows.numel() if compact else valid.sum()  # type: ignore[union-attr]
    total = rows.numel() if compact else n  # type: ignore[union-attr]
    # every dy is multiplied by scale (dz/dy) and, for the mean, 1 / count before it is rounded
    alpha = scale / count if reduction == "mean" and compact and count else scale
    mask = (valid / count.clamp_min(1) if reduction == "mean" else valid).to(acc) if not compact else None  # type: ignore[union-attr]

    chunk = chunk_rows(total, v, hid, mm, _profile(dev.type))
    block = _block_rows(v, dev, chunk)
    need = grad_h or grad_w or grad_b
    tok_loss = torch.zeros(n, dtype=acc, device=dev)
    dh = torch.zeros((n, hid) if grad_h else 0, dtype=h.dtype, device=dev)
    split = mm != acc and dev.type == "cpu"  # CPU bf16/fp16: dw^T per chunk, summed in fp32
    dw_sum = torch.zeros(((hid, v) if split else (v, hid)) if grad_w else 0, dtype=acc, device=dev)
    db_sum = torch.zeros(v if grad_b else 0, dtype=acc, device=dev)
    buf = torch.empty((min(chunk, total), v), dtype=mm, device=dev) if total else None
    part = torch.empty((hid, v), dtype=mm, device=dev) if grad_w and split and total > chunk else None
    for n0 in range(0, total, chunk):
        n1 = min(n0 + chunk, total)
        idx = rows[n0:n1] if compact else None  # type: ignore[index]
        hc = hs.index_select(0, idx) if compact else hs[n0:n1]  # type: ignore[arg-type]  # (m, H)
        tc = target.index_select(0, idx) if compact else target[n0:n1].clamp(0, v - 1)  # type: ignore[arg-type]
        y = buf[: n1 - n0]  # type: ignore[index]  # (m, V): the chunk's logits (unless given), then its dy in place
        if logits is None and bs is not None:
            torch.addmm(bs, hc, ws.T, out=y)
        elif logits is None:
            torch.mm(hc, ws.T, out=y)
        for r0 in range(0, n1 - n0, block):
            r1 = min(r0 + block, n1 - n0)
            mk = mask[n0 + r0 : n0 + r1] if mask is not None else None
            if logits is None:
                z = y[r0:r1]
            else:  # the caller's: a block-sized copy, never the logits themselves
                z = logits.index_select(0, idx[r0:r1]) if compact else logits[n0 + r0 : n0 + r1].clone()  # type: ignore[index]
            loss = _rows(z, y[r0:r1], tc[r0:r1], acc, scale, softcap, label_smoothing, alpha, mk, need)
            if compact:
                tok_loss.index_copy_(0, idx[r0:r1], loss)  # type: ignore[index]
            else:
                tok_loss[n0 + r0 : n0 + r1] = torch.where(valid[n0 + r0 : n0 + r1], loss, 0.0)
        if not need:
            continue
        if grad_h:
            dhc = torch.mm(y, ws)  # (m, H)
            if compact:
                dh.index_copy_(0, idx, dhc.to(h.dtype))  # type: ignore[arg-type]
            else:
                dh[n0:n1].copy_(dhc)
        if grad_w:
            if split and part is None:  # one chunk: the GEMM's own fp32 accumulation is the sum
                dw_sum = torch.mm(hc.T.contiguous(), y)
            elif split:
                dw_sum.add_(torch.mm(hc.T.contiguous(), y, out=part))  # (H, V): the fast layout on CPU
            elif mm == acc:
                dw_sum.addmm_(y.T, hc)
            else:
                dw_sum.add_(_mm32(y.T, hc))
        if grad_b:
            db_sum.add_(y.sum(0, dtype=acc))
    if reduction == "none":
        loss_out = tok_loss
    else:
        loss_out = tok_loss.sum(dtype=torch.float64)  # (N,) values: an exact-enough sum is free
        loss_out = (loss_out / count if reduction == "mean" else loss_out).to(acc)
    dw = dw_sum.T if split and grad_w else dw_sum
    dw = dw.to(w.dtype).contiguous()
    return loss_out, dh, dw, db_sum.to(b.dtype if grad_b else acc)  # type: ignore[union-attr]  # grad_b: b is set


def _rows(z, out, t, acc, scale, softcap, eps, alpha, mask, need) -> torch.Tensor:
    """Per-token losses (acc dtype) of a block of logit rows ``z`` (m, V), scratch; with ``need``,
    ``out`` (m, V) in the GEMM dtype (``z`` itself, or not) gets ``dy * alpha`` (times ``mask``,
    per row, when given)."""
    zf = z if z.dtype == acc else z.to(acc)  # (m, V), the block's own copy for bf16/fp16
    th = None  # z is scratch: scale it in place
    if softcap > 0:
        th = zf.mul_(scale / softcap).tanh_()
        zf = th * softcap
    elif scale != 1.0:
        zf = zf.mul_(scale)
    lp = torch.log_softmax(zf, 1)  # (m, V)
    tt = t[:, None]
    loss = lp.gather(1, tt).squeeze(1).neg_()
    if eps:
        loss = loss.mul_(1 - eps).sub_(lp.mean(1), alpha=eps)
    if not need:
        return loss
    p = lp.exp_()
    p.scatter_add_(1, tt, torch.full(tt.shape, eps - 1.0, dtype=acc, device=p.device))
    if eps:
        p.sub_(eps / z.shape[1])
    if th is not None:
        p.mul_(th.square_().neg_().add_(1.0))  # dz/dy / scale = 1 - tanh^2
    if mask is not None:
        p.mul_(mask[:, None])
    torch.mul(p, alpha, out=out)
    return loss


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32 (cuBLAS's bf16 -> fp32 GEMM where torch has it)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return a.float() @ b.float()
