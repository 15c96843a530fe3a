"""A batched decode step with an f32 against an f16 KV cache (`--kv-cache`), in this process.

    python benchmarks/kv_cache_step.py [--shape 2b4t] [--embeddings q6] [--threads 2] [--rows 16] \\
        [--positions 32,288,900] [--repeats 5]

Two engines on the same synthetic model (the file `bitnet bench --shape` uses), one per cache type.
Each fills one sequence with max(positions) random tokens and copies it into --rows sequences
(bn_copy_prefix: attention's cost does not depend on the values); then one Engine.forward_batch of
--rows decode rows (one token per sequence, every logits row wanted, as the server's steps are)
at each cached length, the two cache types interleaved, a pause between steps so that one engine's
idle pool threads never spin against the other's step. Prints and returns the medians of
--repeats rounds per length and type. Attention alone: `make -C kernels bench ARGS="2 1 attention 32
288 900"`. Run it on an idle machine and state the load average: the figures are the machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's bitnet_cli
from bitnet_cli.bench import target  # noqa: E402
from bitnet_cli.engine import KV_CACHE_TYPES, Engine  # noqa: E402
from bitnet_cli.errors import run_script  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="2b4t")
    p.add_argument("--embeddings", default="q6")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--positions", default="32,288,900")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    positions = [int(x) for x in args.positions.split(",") if x.strip()]
    fill = max(positions)
    packed = target.from_shape(args.shape, args.embeddings).ensure_file(progress=lambda t: print(t, file=sys.stderr))
    load = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    engines = {}
    for kv in KV_CACHE_TYPES:
        eng = Engine.load(packed, threads=args.threads, ctx_size=fill + 1, kv_cache=kv)
        eng.set_sequences(args.rows)
        ids = rng.integers(2, eng.vocab_size, fill)
        t0 = time.perf_counter()
        eng.forward_batch(ids, [0] * fill, list(range(fill)), [False] * fill)
        for s in range(1, args.rows):
            eng.copy_prefix(0, s, fill)
        print(f"{kv}: {fill} positions filled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        engines[kv] = eng
    tokens = rng.integers(2, engines["f32"].vocab_size, args.rows)
    times = {(n, kv): [] for n in positions for kv in engines}
    for r in range(args.repeats + 1):  # the first round warms up, untimed
        for n in positions:
            for kv, eng in engines.items():
                time.sleep(0.05)
                t0 = time.perf_counter()
                eng.forward_batch(tokens, list(range(args.rows)), [n] * args.rows, [True] * args.rows)
                if r:
                    times[(n, kv)].append(time.perf_counter() - t0)
    rows = []
    for n in positions:
        row = {"positions": n} | {f"{kv}_ms": round(float(np.median(times[(n, kv)])) * 1000, 1) for kv in engines}
        row["f16_speedup"] = round(row["f32_ms"] / row["f16_ms"], 3)
        rows.append(row)
        print(f"{args.rows}-row step at {n} cached positions: f32 {row['f32_ms']} ms, f16 {row['f16_ms']} ms "
              f"({row['f16_speedup']}x), medians of {args.repeats}", flush=True)
    for eng in engines.values():
        eng.close()
    print(json.dumps({"load_average": [round(load, 2), round(os.getloadavg()[0], 2)], "threads": args.threads,
                      "rows": args.rows, "model": packed.name, "steps": rows}))
    return 0


if __name__ == "__main__":
    run_script(main)
