"""Training throughput of recipes/small.yaml on one GPU: tokens/s, MFU, quantisation overhead.

    python benchmarks/train_gpu.py [--steps 40] [--out results.json]

Runs the real trainer (``bitnet_cli.train.train``) for BitNet b1.58 and for the same model with
``quant: none``, eager and torch.compile'd, and reports the median tokens/s of the logged
windows after warm-up (compilation excluded), MFU against the GPU's dense bf16 peak, and the
share of the BitNet step time that the quantisation costs: 1 - t(none) / t(bitnet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(quant: str, compile_: bool, steps: int, extra: list[str]) -> dict:
    from bitnet_cli.train import load_recipe, train
    from bitnet_cli.train.loop import model_config, peak_flops, pick_device

    overrides = [f"model.quant={quant}", f"train.compile={str(compile_).lower()}", f"train.steps={steps}",
                 "train.tokens=null", "train.log_every=5", "train.eval_every=100000",
                 "train.checkpoint_every=100000", "train.eval_batches=2", *extra]
    recipe = load_recipe(REPO / "recipes" / "small.yaml", overrides)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = train(recipe, out_dir=Path(d) / "run", progress=False)
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > steps // 2]
    tps = statistics.median(windows)
    fpt = model_config(recipe, None).arch.training_flops_per_token(recipe.train.seq_len)
    peak = peak_flops(pick_device(recipe.train.device))
    return {"quant": quant, "compile": compile_, "tokens_per_s": round(tps), "step_s": round(
        recipe.train.batch_size * recipe.train.grad_accum * recipe.train.seq_len / tps, 4),
            "mfu": round(fpt * tps / peak, 4) if peak else None, "flops_per_token": fpt,
            "parameters": res.parameters, "final_loss": res.train_loss, "wall_s": round(wall, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="train_gpu.json")
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides")
    ap.add_argument("--modes", default="eager,compile")
    args = ap.parse_args()
    import torch

    results = []
    for compile_ in [m == "compile" for m in args.modes.split(",")]:
        for quant in ("bitnet", "none"):
            try:
                r = run(quant, compile_, args.steps, args.set)
            except Exception:
                traceback.print_exc()
                r = {"quant": quant, "compile": compile_, "error": traceback.format_exc(limit=3)}
            print(json.dumps(r), flush=True)
            results.append(r)
    by = {(r["quant"], r["compile"]): r for r in results if "error" not in r}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{gpu}  recipes/small.yaml  steps={args.steps}")
    print(f"{'mode':8} {'quant':7} {'tok/s':>10} {'step s':>8} {'MFU':>6}")
    for (q, c), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{'compile' if c else 'eager':8} {q:7} {r['tokens_per_s']:>10,} {r['step_s']:>8.3f} "
              f"{(r['mfu'] or 0):>6.1%}")
    for c in (False, True):
        if ("bitnet", c) in by and ("none", c) in by:
            overhead = 1 - by[("none", c)]["step_s"] / by[("bitnet", c)]["step_s"]
            print(f"quantisation overhead ({'compile' if c else 'eager'}): {overhead:.1%} of the BitNet step")
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
