"""Does training tolerate an fp8 weight gradient? The tiny recipe on the int8 path (on a CPU, the emulation of its
kernels) under bf16 autocast, its weight gradients as the trainer computes them (``plain``) or on fp8 operands
(int8_kernels.fp8_grad_weight: G in e4m3 or e5m2, X~ in e4m3, one scale per tensor and projection); same seed and
batches. Prints each run's loss curve and final validation loss as a JSON line.

    python benchmarks/fp8_grad_weight_curve.py --modes plain,e4m3,e5m2 --steps 300

An experiment, not a trainer option: it replaces ``int8_linear._grad_weights`` for the run (the products of
_Int8Linear and _GatedProduct; the default path).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's bitnet_cli
sys.path.insert(0, str(REPO / "benchmarks"))
import int8_kernels  # noqa: E402

from bitnet_cli.train import int8_linear as L  # noqa: E402
from bitnet_cli.train import load_recipe, train  # noqa: E402

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def run(mode: str, steps: int, recipe: str, extra: list[str]) -> dict:
    bf16_weights = L._grad_weights
    if mode != "plain":
        def fp8_weights(gs, x_deq, w_dtypes):
            return [int8_kernels.fp8_grad_weight([g], x_deq, FP8[mode]).to(t) for g, t in zip(gs, w_dtypes)]

        L._grad_weights = fp8_weights
    try:
        r = load_recipe(recipe, [f"train.steps={steps}", "train.int8_matmul=on", "train.precision=bf16",
                                 "train.checkpoint_every=100000", "train.eval_every=100000", "train.log_every=25",
                                 *extra])
        with tempfile.TemporaryDirectory() as d:
            res = train(r, out_dir=Path(d) / mode, progress=False)
            rows = [json.loads(x) for x in (Path(d) / mode / "metrics.jsonl").read_text().splitlines()]
    finally:
        L._grad_weights = bf16_weights
    return {"mode": mode, "steps": steps, "final_train": round(res.train_loss, 4), "val": round(res.val_loss, 4),
            "curve": [[row["step"], round(row["loss"], 4)] for row in rows if "loss" in row]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="plain,e4m3,e5m2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "tiny.yaml"))
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides")
    args = ap.parse_args()
    for mode in args.modes.split(","):
        if mode != "plain" and mode not in FP8:
            raise SystemExit(f"error: mode {mode!r}: expected plain, {', '.join(FP8)}")
    for mode in args.modes.split(","):
        print(json.dumps(run(mode, args.steps, args.recipe, args.set)), flush=True)


if __name__ == "__main__":
    main()
