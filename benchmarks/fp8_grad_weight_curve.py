"""Does training tolerate an fp8 weight gradient? The tiny recipe on the int8 path (on a CPU, the emulation of its
kernels) under bf16 autocast, its weight gradients in bf16 (``plain``) or on fp8 products (``fp8``:
``$BITNET_INT8_FP8_GRAD_WEIGHT=1``, int8_linear.fp8_grad_weight: G and X~ in e4m3, one scale per tensor); same seed
and batches. Prints each run's loss curve and final validation loss as a JSON line.

    python benchmarks/fp8_grad_weight_curve.py --modes plain,fp8 --steps 300

The GPU's check is the 1,200-step small.yaml curve: ``python benchmarks/train_gpu.py --curve 1200
--curve-variants int8,int8+FP8_GRAD_WEIGHT --parallel ...`` (benchmarks/RESULTS.md, session 22).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's bitnet_cli

from bitnet_cli.train import load_recipe, train  # noqa: E402

SWITCH = "BITNET_INT8_FP8_GRAD_WEIGHT"
MODES = {"plain": "0", "fp8": "1"}


def run(mode: str, steps: int, recipe: str, extra: list[str]) -> dict:
    outer = os.environ.get(SWITCH)
    os.environ[SWITCH] = MODES[mode]
    try:
        r = load_recipe(recipe, [f"train.steps={steps}", "train.int8_matmul=on", "train.precision=bf16",
                                 "train.checkpoint_every=100000", "train.eval_every=100000", "train.log_every=25",
                                 *extra])
        with tempfile.TemporaryDirectory() as d:
            res = train(r, out_dir=Path(d) / mode, progress=False)
            rows = [json.loads(x) for x in (Path(d) / mode / "metrics.jsonl").read_text().splitlines()]
    finally:
        if outer is None:
            os.environ.pop(SWITCH)
        else:
            os.environ[SWITCH] = outer
    return {"mode": mode, "steps": steps, "final_train": round(res.train_loss, 4), "val": round(res.val_loss, 4),
            "curve": [[row["step"], round(row["loss"], 4)] for row in rows if "loss" in row]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="plain,fp8")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "tiny.yaml"))
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides")
    args = ap.parse_args()
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"error: mode {mode!r}: expected {', '.join(MODES)}")
    for mode in modes:
        print(json.dumps(run(mode, args.steps, args.recipe, args.set)), flush=True)


if __name__ == "__main__":
    main()
