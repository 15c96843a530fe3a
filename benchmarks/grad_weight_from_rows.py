"""Can the weight gradient read the int8 rows instead of a stored X~? (issue 19, session 30; benchmarks/RESULTS.md)

The int8 trainer stores X~, each rounded activation in bf16, for the weight gradient ``dW = G^T X~``; that store is
23% of the norm kernels' traffic at small.yaml (session 29). Forming X~ from the int8 rows inside the product would
drop it, if a product that converts one operand in registers kept up with cuBLAS. This times, at small's
weight-gradient shapes (32,768 tokens; G [M, N] bf16, the rows [M, K] int8), cuBLAS's ``g.t() @ x_deq`` against one
Triton kernel ``X~^T G`` (X~ the register operand, tokens split into ranges for short outputs) whose X~ is:

* mode 0: the int8 rows widened to bf16, unscaled (the conversion's floor; not the gradient),
* mode 1: the rows times each token's ``1 / s_x`` (one multiply),
* mode 2: a stored bf16 X~ read as the trainer's layout has it (no conversion: Triton's product alone).

Session 30 on an H100 (ms; the best tile of each mode; this kernel, run from a draft of this script):

| K x N | cuBLAS | mode 2 | mode 0 | mode 1 |
| --- | --- | --- | --- | --- |
| 768 x 768 | 0.065 | 0.116 | 0.150 | 0.147 |
| 768 x 2048 | 0.151 | 0.214 | 0.289 | 0.289 |
| 2048 x 768 | 0.153 | 0.220 | 0.292 | 0.286 |

Triton's product with token-major operands is already 1.4-1.8x cuBLAS's time before any conversion. The kernel that
formed X~ exactly as the norms do (``q / s_x`` correctly rounded, then bf16; commit 4d7f997, its sweep in
int8_kernels_h100_session30_grad_weight_from_rows.json) took 3.2-3.9x cuBLAS's time, and the small.yaml step 0.322 s
against 0.235 (train_gpu_h100_session30_small_rows.json). So this route needs a mixed-input kernel of CUTLASS's class,
not Triton's.

    python benchmarks/grad_weight_from_rows.py
"""

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from bitnet_cli.train import int8_linear as L


@triton.jit
def _kernel(g_ptr, q_ptr, inv_ptr, c_ptr, M, N, K, stride_g, stride_q, stride_cs, stride_c, SPLITS: tl.constexpr,
            BK: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, MODE: tl.constexpr):
    """One BK x BN tile of ``C_split[N, K]^T = X~[T, :]^T G[T, :]`` over the split's tokens T (stored transposed)."""
    pid_k = tl.program_id(0) // tl.cdiv(N, BN)
    pid_n = tl.program_id(0) % tl.cdiv(N, BN)
    split = tl.program_id(1)
    per_split = tl.cdiv(tl.cdiv(M, SPLITS), BT) * BT
    t0 = split * per_split
    t_end = tl.minimum(t0 + per_split, M)
    rk = pid_k * BK + tl.arange(0, BK)
    rn = pid_n * BN + tl.arange(0, BN)
    rt = tl.arange(0, BT)
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for t in range(t0, t_end, BT):
        tokens = t + rt
        g = tl.load(g_ptr + tokens[:, None].to(tl.int64) * stride_g + rn[None, :])
        x = tl.load(q_ptr + tokens[None, :].to(tl.int64) * stride_q + rk[:, None])
        if MODE == 0:
            x = x.to(tl.bfloat16)
        elif MODE == 1:
            x = (x.to(tl.float32) * tl.load(inv_ptr + tokens)[None, :]).to(tl.bfloat16)
        acc = tl.dot(x, g, acc)
    tl.store(c_ptr + split * stride_cs + rn[None, :].to(tl.int64) * stride_c + rk[:, None], acc)


def main(m: int = 32768) -> None:
    print(torch.cuda.get_device_name())
    for k, n in [(768, 768), (768, 2048), (2048, 768)]:  # small's K x N (q/k/v's parts, gate/up's, down_proj's)
        g = (torch.randn(m, n, device="cuda") * 1e-4).to(torch.bfloat16)
        q, s = L.quantize_rows(torch.randn(m, k, device="cuda"))
        q = q.contiguous()
        x_deq = (q.float() / s[:, None]).to(torch.bfloat16)
        inv = (1.0 / s).float()
        row = {"k": k, "n": n, "cublas": do_bench(lambda: g.t() @ x_deq, return_mode="median")}
        for mode in (0, 1, 2):
            for bk, bn, bt, warps, stages, splits in [(128, 128, 32, 4, 5, 4), (128, 256, 64, 8, 3, 2),
                                                      (128, 128, 64, 8, 4, 4), (128, 256, 32, 8, 4, 4)]:
                splits = splits if k * n <= 768 * 768 else max(1, splits // 2)
                c = torch.empty((splits, n, k), device="cuda")
                x = x_deq if mode == 2 else q
                grid = (triton.cdiv(k, bk) * triton.cdiv(n, bn), splits)

                def run():
                    _kernel[grid](g, x, inv, c, m, n, k, g.stride(0), x.stride(0), c.stride(0), c.stride(1),
                                  SPLITS=splits, BK=bk, BN=bn, BT=bt, MODE=mode, num_warps=warps, num_stages=stages)

                row[f"mode{mode}_{bk}x{bn}x{bt}_w{warps}"] = round(do_bench(run, return_mode="median"), 4)
        print(row, flush=True)


if __name__ == "__main__":
    main()
