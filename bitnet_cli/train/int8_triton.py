"""The Triton kernels behind ``bitnet::int8_mm`` and ``bitnet::quantize_grad_rows`` (see
int8_linear.py for the arithmetic).

``C[M, N] = (A[M, K] @ B[N, K]^T)`` accumulated in int32 on the int8 tensor cores (wgmma on
Hopper, mma on Ampere), then ``* row_mul[m] (* col_mul[n])`` in fp32 and one rounding to the
output dtype in the epilogue: the dequantisation costs no pass over memory. Both operands are
K-contiguous, the layout 8-bit tensor-core operands need. The tile shape is autotuned per
(M, N, K). int8_mm_reference in int8_linear.py is the same function in plain torch, tested
against this. ``quantize_grad_rows`` is the same for ``quantize_grad_rows_reference``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from bitnet_cli.train.int8_linear import GRAD_ABSMAX_FLOOR

try:  # Triton 3.x; older releases kept libdevice under the CUDA backend's module
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    from triton.language.extra.cuda import libdevice

# Triton's interpreter (TRITON_INTERPRET=1: the kernels run on the CPU, how the tests check their
# logic without a GPU) has no libdevice; there :func:`_rint` rounds with floor instead. The GPU keeps
# libdevice's rint: the floor form's ``v - floor(v)`` may be contracted with the product forming v
# into one fma, which would move rounding ties.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


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


@triton.jit
def _scaled_part(ptr, stride, col_ptr, row, N: tl.constexpr, B: tl.constexpr):
    """One part of the output gradient's row as fp32, times its columns' scales (0 past N)."""
    c = tl.arange(0, B)
    mask = c < N
    g = tl.load(ptr + row * stride + c, mask=mask, other=0.0).to(tl.float32)
    return g * tl.load(col_ptr + c, mask=mask, other=0.0)


@triton.jit
def _rint(v):
    """Round to nearest, ties to even (torch.round)."""
    if INTERPRETED:
        r = tl.floor(v)
        frac = v - r
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        return tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
    else:
        return libdevice.rint(v)


@triton.jit
def _store_rounded(q_ptr, g, s, N: tl.constexpr, B: tl.constexpr):
    c = tl.arange(0, B)
    q = tl.minimum(tl.maximum(_rint(g * s), -128.0), 127.0)
    tl.store(q_ptr + c, q.to(tl.int8), mask=c < N)


@triton.jit
def _quantize_grad_rows_kernel(p0, p1, p2, stride0, stride1, stride2, col_ptr, q_ptr, s_ptr, N_ALL,
                               N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                               B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, FLOOR: tl.constexpr):
    # One row per program, its (up to three) parts held in registers: one read of each, one write.
    row = tl.program_id(0).to(tl.int64)
    g0 = _scaled_part(p0, stride0, col_ptr, row, N0, B0)
    g1 = _scaled_part(p1, stride1, col_ptr + N0, row, N1, B1)
    g2 = _scaled_part(p2, stride2, col_ptr + N0 + N1, row, N2, B2)
    amax = tl.maximum(tl.maximum(tl.max(tl.abs(g0), 0), tl.max(tl.abs(g1), 0)), tl.max(tl.abs(g2), 0))
    # The scale as a vector of equal lanes, as the reference's fp32 ``127 / max(absmax, floor)`` is
    # computed by torch (``__rtruediv__``: the reciprocal, correctly rounded, then times 127); div_rn
    # because Triton's own fp32 ``/`` may be approximate.
    lanes = tl.arange(0, B0)
    s = tl.div_rn(tl.full([B0], 1.0, tl.float32), tl.zeros([B0], tl.float32) + tl.maximum(amax, FLOOR)) * 127.0
    tl.store(s_ptr + row + lanes, s, mask=lanes == 0)
    s_one = tl.max(s, 0)
    q_row = q_ptr + row * N_ALL
    _store_rounded(q_row, g0, s_one, N0, B0)
    _store_rounded(q_row + N0, g1, s_one, N1, B1)
    _store_rounded(q_row + N0 + N1, g2, s_one, N2, B2)


def quantize_grad_rows(parts: list[torch.Tensor], col_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    assert 1 <= len(parts) <= 3 and all(p.dim() == 2 and p.shape[0] == parts[0].shape[0] for p in parts)
    parts = [p if p.stride(-1) == 1 else p.contiguous() for p in parts]
    m = parts[0].shape[0]
    widths = [p.shape[1] for p in parts]
    n = sum(widths)
    assert col_scale.shape == (n,)
    q = torch.empty((m, n), dtype=torch.int8, device=parts[0].device)
    s = torch.empty((m,), dtype=torch.float32, device=parts[0].device)
    # Absent parts: width 0 (all lanes masked), pointing at part 0, which they never read.
    ptrs = parts + [parts[0]] * (3 - len(parts))
    widths += [0] * (3 - len(widths))
    blocks = [triton.next_power_of_2(max(w, 16)) for w in widths]
    total = sum(blocks)
    warps = 4 if total <= 4096 else 8 if total <= 16384 else 16
    _quantize_grad_rows_kernel[(m,)](*ptrs, *(p.stride(0) for p in ptrs), col_scale.float().contiguous(), q, s, n,
                                     N0=widths[0], N1=widths[1], N2=widths[2], B0=blocks[0], B1=blocks[1],
                                     B2=blocks[2], FLOOR=GRAD_ABSMAX_FLOOR, num_warps=warps)
    return q, s
