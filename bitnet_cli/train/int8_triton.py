"""The Triton kernel behind ``bitnet::int8_mm`` (see int8_linear.py for the arithmetic).

``C[M, N] = (A[M, K] @ B[N, K]^T)`` accumulated in int32 on the int8 tensor cores (wgmma on
Hopper, mma on Ampere), then ``* row_mul[m] (* col_mul[n])`` in fp32 and one rounding to the
output dtype in the epilogue: the dequantisation costs no pass over memory. Both operands are
K-contiguous, the layout 8-bit tensor-core operands need. The tile shape is autotuned per
(M, N, K). int8_mm_reference in int8_linear.py is the same function in plain torch, tested
against this.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles for int8 on H100/H200 (and A100). The training shapes have short K (768-4096: 6-32 steps of
# 128), where the pipeline's fill and the epilogue weigh most, so deeper pipelines and wide tiles
# (fewer tiles, each reading A once per 256 columns) are offered beside the square ones; 64-deep
# K steps with five stages keep more loads in flight at the same shared memory (at most 192 KiB).
_CONFIGS = [
    triton.Config({"BM": 128, "BN": 256, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 256, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BM": 256, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BM": 128, "BN": 128, "BK": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=5),
    triton.Config({"BM": 256, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=5),
]


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BK"] == 0})
@triton.jit
def _int8_mm_kernel(a_ptr, b_ptr, c_ptr, row_mul_ptr, col_mul_ptr, M, N, K,
                    stride_am, stride_bn, stride_cm, HAS_COL_MUL: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    # Grouped order: GROUP_M row-tiles walk the columns together, so B tiles are reused from L2.
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # Out-of-range rows/columns read row 0 (wrap) instead of masking: their results are never stored.
    ra = tl.max_contiguous(tl.multiple_of(rm % M, BM), BM)
    rb = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    a_ptrs = a_ptr + ra[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rb[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        if EVEN_K:  # no mask: the loads stay plain 16-byte copies
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            left = K - k0
            a = tl.load(a_ptrs, mask=rk[None, :] < left, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BK
        b_ptrs += BK

    row_mul = tl.load(row_mul_ptr + rm, mask=rm < M, other=0.0)
    c = acc.to(tl.float32) * row_mul[:, None]
    if HAS_COL_MUL:
        col_mul = tl.load(col_mul_ptr + rn, mask=rn < N, other=0.0)
        c = c * col_mul[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_mm(a: torch.Tensor, b: torch.Tensor, row_mul: torch.Tensor, col_mul: torch.Tensor | None,
            out_dtype: torch.dtype) -> torch.Tensor:
    M, K = a.shape
    N = b.shape[0]
    assert b.shape[1] == K and a.dtype == b.dtype == torch.int8
    a, b = a.contiguous(), b.contiguous()
    row_mul = row_mul.float().contiguous()
    col_mul = None if col_mul is None else col_mul.float().contiguous()
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    _int8_mm_kernel[grid](a, b, c, row_mul, row_mul if col_mul is None else col_mul, M, N, K,
                          a.stride(0), b.stride(0), c.stride(0), HAS_COL_MUL=col_mul is not None)
    return c
