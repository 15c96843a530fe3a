"""Where a compiled training micro-step's GPU time goes: int8 BitLinear against the plain path and bf16.

    python benchmarks/profile_step.py [--preset small] [--batch 32] [--seq 1024] [--variants int8,bitnet,none]

Builds the model of a preset (random init, random tokens), compiles it, runs forward + backward
micro-steps under bf16 autocast (the ternary-weight refresh once per step, as the trainer does)
and prints the mean step time and the top kernels of a torch.profiler trace for each variant.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--variants", default="int8,bitnet,none")
    ap.add_argument("--top", type=int, default=22)
    args = ap.parse_args()
    dims = dict(PRESETS[args.preset])
    dims.setdefault("vocab_size", 32000)
    dims.pop("tie_word_embeddings", None)
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
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))
        del model, fwd
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
