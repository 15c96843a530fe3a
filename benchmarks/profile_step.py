"""Where a compiled training micro-step's GPU time goes: int8 BitLinear against the plain path and bf16.

    python benchmarks/profile_step.py [--preset small] [--batch 32] [--seq 1024] [--variants int8,bitnet,none]

Builds the model of a preset (random init, random tokens, the benchmarks' 8192-token vocabulary),
compiles it, runs forward + backward micro-steps under bf16 autocast (the ternary-weight refresh
once per step, as the trainer does) and prints, for each variant, the mean micro-step time, the
GPU time per micro-step by kind of kernel (the int8 products, cuBLAS products, attention, the
Triton kernels inductor generates, the rest) and the top kernels of a torch.profiler trace.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's bitnet_cli
from bitnet_cli.model import BitNetConfig, BitNetForCausalLM  # noqa: E402
from bitnet_cli.train import int8_linear  # noqa: E402
from bitnet_cli.train.recipe import PRESETS  # noqa: E402


def kernel_kind(name: str) -> str:
    """A profiler event's kind of kernel, by its name."""
    n = name.lower()
    if n.startswith("_int8_mm"):  # both int8 product kernels (pointer loads, TMA)
        return "int8 products"
    if n.startswith("_quantize_grad_rows") or (n.startswith("triton_") and "round" in n):
        # the output gradient's rounding (bitnet::quantize_grad_rows), and the kernels inductor fused the
        # activations' per-token rounding into (the RMSNorm or activation before a projection)
        return "int8 quantisers"
    if any(s in n for s in ("softmax", "nll_loss", "cross_entropy")):
        return "loss (softmax, cross-entropy)"
    if n.startswith("triton_"):  # inductor's names list the ops it fused
        return "inductor kernels"
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")):
        return "cuBLAS products"
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--variants", default="int8,bitnet,none")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--top", type=int, default=22)
    args = ap.parse_args()
    dims = dict(PRESETS[args.preset].fields)
    dims["vocab_size"] = args.vocab
    for v in args.variants.split(","):
        torch.manual_seed(0)
        cfg = BitNetConfig(**dims, quant="none" if v == "none" else "bitnet", max_position_embeddings=args.seq,
                           bos_token_id=None, eos_token_id=None)
        model = BitNetForCausalLM(cfg).cuda().train()
        if v == "int8":
            int8_linear.enable(model, int8_grad=True, cache=True)
        fwd = torch.compile(model)
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda")

        def step():
            if v == "int8":
                int8_linear.refresh(model)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = fwd(x)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x.reshape(-1))
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.grad = None
                    p.add_(0)  # an optimiser step: the weights' version moves

        t0 = time.perf_counter()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = 10
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / n
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        tok = args.batch * args.seq
        print(f"\n=== {args.preset} {v}: {dt * 1e3:.1f} ms per micro-step ({tok / dt:,.0f} tok/s), warm-up {warm:.0f} s")
        kinds: dict[str, float] = {}
        for e in prof.key_averages():
            us = e.device_time_total / 3  # three profiled micro-steps
            if us > 0:
                kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + us
        print("GPU ms per micro-step: " + ", ".join(f"{k} {us / 1e3:.2f}" for k, us in
                                                   sorted(kinds.items(), key=lambda kv: -kv[1])))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))
        del model, fwd
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
