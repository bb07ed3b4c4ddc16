"""Triton INT8 GEMM with the scale (+ bias) epilogue fused: :func:`.int8_gemm.int8_mm_reference`
bit for bit.

``a`` (M, K) and ``b`` (N, K) int8 codes (any strides), row scales ``sa`` (M,) and ``sb`` (N,)
fp32, optional bias (N,). One program per (BLOCK_M, BLOCK_N) output tile (grouped launch order for
L2 reuse) accumulates ``tl.dot`` of int8 tiles into int32, which is exact, then applies the
reference's epilogue in its order, ``((acc * sa) * sb) + bias`` in fp32, compiled without FMA
contraction (``enable_fp_fusion=False``) so every operation rounds as torch's does. bf16 outputs
are rounded in integers (``quant_triton_lib.bf16_bits``: the interpreter's own cast truncates).
Autotuned over tile shapes on CUDA; one small configuration under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .int8_gemm import check_mm
from .quant_triton_lib import bf16_bits

__all__ = ["int8_mm_triton", "CONFIGS"]


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":  # numpy per program: few, large tiles
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4)]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): int8 MMA wants BLOCK_K >= 32
        (128, 256, 128, 8, 3),
        (256, 128, 128, 8, 3),
        (128, 128, 128, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 64, 64, 4, 4),  # few tokens
        (64, 32, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


CONFIGS = _configs()


@triton.autotune(configs=CONFIGS, key=["M", "N", "K"])
@triton.jit
def _int8_mm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K, s_am, s_ak, s_bn, s_bk,
                    s_cm, s_cn, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n  # GROUP_M row tiles walk the column tiles together (L2 reuse)
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        k_ok = ks < K
        a = tl.load(a_ptr + rm[:, None] * s_am + ks[None, :] * s_ak, m_ok[:, None] & k_ok[None, :], 0)
        b = tl.load(b_ptr + rn[None, :] * s_bn + ks[:, None] * s_bk, k_ok[:, None] & n_ok[None, :], 0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # a (BM, BK) @ b (BK, BN): exact in int32
    # epilogue in the reference's order: ((acc * sa) * sb) + bias, fp32, no FMA contraction
    out = acc.to(tl.float32) * tl.load(sa_ptr + rm, m_ok, 0.0)[:, None]
    out = out * tl.load(sb_ptr + rn, n_ok, 0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, n_ok, 0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn
    c_ok = m_ok[:, None] & n_ok[None, :]
    if OUT_BF16:
        tl.store(c_ptrs, bf16_bits(out), c_ok)  # c_ptr: the bf16 output viewed as int16
    else:
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), c_ok)


def int8_mm_triton(
    a_q: torch.Tensor,
    b_q: torch.Tensor,
    sa: torch.Tensor,
    sb: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`.int8_gemm.int8_mm_reference` in one kernel: a (M, K), b (N, K) int8 (any strides),
    sa (M,), sb (N,) fp32, bias (N,) or None -> (M, N) ``out_dtype`` (fp32/bf16/fp16), contiguous.

        >>> a = torch.randint(-127, 128, (64, 96), dtype=torch.int8, device="cuda")  # doctest: +SKIP
        >>> b = torch.ones(32, 96, dtype=torch.int8, device="cuda")  # doctest: +SKIP
        >>> sa, sb = torch.ones(64, device="cuda"), torch.ones(32, device="cuda")  # doctest: +SKIP
        >>> out = int8_mm_triton(a, b, sa, sb)  # doctest: +SKIP
    """
    check_mm(a_q, b_q, sa, sb, bias, out_dtype, (torch.int8,), "int8_mm_triton")
    (m, k), n = a_q.shape, b_q.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0:
        return out
    if k == 0:  # nothing to accumulate: the epilogue alone
        from .int8_gemm import int8_mm_reference

        return int8_mm_reference(a_q, b_q, sa, sb, bias, out_dtype)
    c = out.view(torch.int16) if out_dtype == torch.bfloat16 else out
    sa, sb = sa.contiguous(), sb.contiguous()
    bias_arg = bias.contiguous() if bias is not None else sa  # unread without HAS_BIAS

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _int8_mm_kernel[grid](
        a_q, b_q, sa, sb, bias_arg, c, m, n, k, a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1),
        c.stride(0), c.stride(1), HAS_BIAS=bias is not None, OUT_BF16=out_dtype == torch.bfloat16,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out
