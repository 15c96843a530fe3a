"""How far an int8 weight gradient would be from the exact one, against the bf16 one the trainer computes.

    python benchmarks/int8_grad_weight_error.py [--tokens 8192] [--n 768] [--k 768] [--block 128] [--device cpu]

The int8 BitLinear (bitnet_cli/train/int8_linear.py) keeps grad_weight ``dW = G^T @ X~`` in bf16. An int8 product
for it would reduce over the tokens, so its operands need a scale per block of tokens and per column (the output
gradient G [T, N] and the activations X~ [T, K] each rounded to int8 per ``--block`` tokens and per column, absmax
scaling, as DeepSeek-V3's blockwise quantisation does): ``dW[n, k] = sum_b sG[b, n] sX[b, k] (Gq_b^T Xq_b)[n, k]``,
whose integer products are exact. This script measures the relative error ``|dW - dW_exact| / |dW_exact|``
(Frobenius; dW_exact in float64 from the same bf16 operands) of that int8 form and of the trainer's bf16 product
(fp32 accumulation, a bf16 result), for normal inputs and heavy-tailed ones (log-normal magnitudes, random signs:
activations and gradients with outlier columns, as trained models have).

The second form (``rel_err_int8_g_only``) keeps the activation side exact: the trainer's X~ is ``q / s`` with q the
forward's int8 rows and s their per-token scale, so ``dW[n, k] = sum_t (G[t, n] / s_t) q[t, k]``, and only
``G' = G / s`` (per token) is rounded, per block of tokens and per column:
``dW = sum_b (Gq'_b^T q_b)[n, k] / sG'[b, n]`` (int8_linear.int8_grad_weight_reference). Its error is measured
against the exact ``G^T X~`` (float64), the product the plain path rounds, as is the bf16 product of the same X~
(``rel_err_bf16_deq``, the trainer's grad_weight). Prints one JSON line per case and writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's bitnet_cli
from bitnet_cli.train.int8_linear import GRAD_ABSMAX_FLOOR, quantize_rows  # noqa: E402


def blockwise_int8(t: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` [T, C] rounded to int8 per block of ``block`` rows and per column: ``(q [T, C] int8, scale [T / block, C]
    fp32)`` with ``t ~= q / scale`` (absmax: ``scale = 127 / max|t|`` over the block's column, floored as the
    trainer floors gradients' absmax)."""
    tf = t.float().reshape(-1, block, t.shape[1])
    scale = 127.0 / tf.abs().amax(dim=1).clamp(min=GRAD_ABSMAX_FLOOR)
    q = (tf * scale[:, None, :]).round().clamp(-128, 127).to(torch.int8)
    return q.reshape(t.shape), scale


def int8_grad_weight(g: torch.Tensor, x: torch.Tensor, block: int) -> torch.Tensor:
    """``g^T @ x`` (fp64) from blockwise int8 operands: exact integer products per block, then the two scales."""
    gq, sg = blockwise_int8(g, block)
    xq, sx = blockwise_int8(x, block)
    out = torch.zeros(g.shape[1], x.shape[1], dtype=torch.float64, device=g.device)
    for b in range(sg.shape[0]):
        rows = slice(b * block, (b + 1) * block)
        # |sum| <= 128 * 128 * block: exact in fp64 (and in fp32 for block <= 1024)
        prod = gq[rows].double().t() @ xq[rows].double()
        out += prod / (sg[b].double()[:, None] * sx[b].double()[None, :])
    return out


def int8_grad_weight_g_only(g: torch.Tensor, q: torch.Tensor, s: torch.Tensor, block: int) -> torch.Tensor:
    """``g^T @ (q / s)`` (fp64) with only ``G' = g / s`` rounded, per ``block`` tokens and per column: exact integer
    products per block against the forward's int8 rows ``q``, each scaled by its (block, column) scale."""
    gq, sg = blockwise_int8(g.float() / s[:, None], block)
    out = torch.zeros(g.shape[1], q.shape[1], dtype=torch.float64, device=g.device)
    for b in range(sg.shape[0]):
        rows = slice(b * block, (b + 1) * block)
        out += (gq[rows].double().t() @ q[rows].double()) / sg[b].double()[:, None]
    return out


def sample(kind: str, shape: tuple[int, int], scale: float, gen: torch.Generator, device: str) -> torch.Tensor:
    """bf16 ``shape``: ``normal`` N(0, 1) or ``lognormal`` (exp(N(0, 1)) magnitudes, random signs, and columns
    scaled by a log-normal factor too: a few columns far larger than the rest), times ``scale``."""
    if kind == "normal":
        t = torch.randn(shape, generator=gen)
    else:
        t = torch.randn(shape, generator=gen).exp() * torch.randn(shape, generator=gen).sign()
        t = t * torch.randn(1, shape[1], generator=gen).exp()
    return (t * scale).to(torch.bfloat16).to(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--n", type=int, default=768, help="output features (the output gradient's columns)")
    ap.add_argument("--k", type=int, default=768, help="input features (the activations' columns)")
    ap.add_argument("--block", type=int, default=128, help="tokens per int8 scaling block")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.tokens % args.block or min(args.tokens, args.n, args.k, args.block) < 1:
        sys.exit("error: --tokens must be a positive multiple of --block, and --n, --k positive")
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for kind in ("normal", "lognormal"):
        # training-sized output gradients (a loss averaged over 32k tokens: about 3e-5 an entry) and O(1) activations
        g = sample(kind, (args.tokens, args.n), 3e-5, gen, args.device)
        x = sample(kind, (args.tokens, args.k), 1.0, gen, args.device)
        exact = g.double().t() @ x.double()
        bf16 = (g.t() @ x).to(torch.bfloat16)
        q, s = quantize_rows(x)
        x_deq = q.double() / s.double()[:, None]  # X~ before the trainer rounds it to bf16
        exact_deq = g.double().t() @ x_deq
        bf16_deq = (g.t() @ x_deq.to(torch.bfloat16)).to(torch.bfloat16)
        row = {"inputs": kind, "tokens": args.tokens, "n": args.n, "k": args.k, "block": args.block,
               "rel_err_bf16": round(rel(bf16, exact), 6), "rel_err_int8": round(rel(int8_grad_weight(g, x, args.block), exact), 6),
               "rel_err_bf16_deq": round(rel(bf16_deq, exact_deq), 6),
               "rel_err_int8_g_only": round(rel(int8_grad_weight_g_only(g, q, s, args.block), exact_deq), 6)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
