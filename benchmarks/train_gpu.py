"""Training throughput on one GPU: tokens/s, step time, MFU, and the int8 BitLinear against bf16.

    python benchmarks/train_gpu.py [--steps 40] [--modes eager,compile] [--variants int8,bitnet,none]
    python benchmarks/train_gpu.py --recipe recipes/bitnet-b1.58-700m.yaml --variants int8,none \\
        --modes compile --set train.grad_accum=1 --steps 20
    python benchmarks/train_gpu.py --curve 300 --set train.grad_accum=1   # loss curves, int8 vs plain
    python benchmarks/train_gpu.py --curve 1200 --parallel --set train.grad_accum=1 \\
        --set 'data.files=[/data/gutenberg_books.jsonl.gz]' --set train.eval_batches=20
    python benchmarks/train_gpu.py --modes compile --variants int8,none --steps 30 --profile
    python benchmarks/train_gpu.py --modes compile --variants int8,int8+RESIDUAL_ROWS,int8-GATED_GRAD,none
    python benchmarks/train_gpu.py --modes compile --variants int8,int8@default,none   # int8 without CUDA graphs

Runs the real trainer (``bitnet_cli.train.train``) on the bundled corpus for each variant:
``int8`` (BitNet b1.58 with ``train.int8_matmul: on``: int8 tensor-core products; the weight gradient in bf16),
``int8w`` (the same with ``train.int8_grad_weight: on``: the weight gradient on int8 products too), ``bitnet``
(the same model with ``int8_matmul: off``: fake-quantised bf16 products, the reference path)
and ``none`` (the same architecture in full precision, ``quant: none``). A variant may carry int8 switches
(README's "Environment variables"): ``int8+RESIDUAL_ROWS`` runs ``int8`` with ``BITNET_INT8_RESIDUAL_ROWS=1``,
``int8-GATED_GRAD`` with ``BITNET_INT8_GATED_GRAD=0``, and ``@MODE`` at the end sets ``BITNET_COMPILE_MODE``
(``int8@default``: the int8 step without the CUDA graphs ``train.cuda_graphs: auto`` gives it; ``none@reduce-overhead``:
the float step under them), each for that run alone, so that one process (one machine, one compile cache) measures a
switch against the default back to back. It reports the median
tokens/s of the logged windows after warm-up (compilation excluded), the step time, MFU against
the GPU's dense bf16 peak, and each variant's step time over ``none``'s. A variant named more than once
(``--variants none,int8,none,int8``) runs each time, alternately: the table shows the median of its runs and each
run's step time, and the JSON's ``summary`` the same rows. No run saves its final
checkpoint, and a timing run does not evaluate either (at the paper shapes that is minutes of
writing and compiling that the figures leave out anyway); the JSON is rewritten after each run,
so a run cut off by a time limit keeps the ones before it, and ``--run-dir`` keeps each run's
directory (its metrics.jsonl row by row).

``--curve N`` trains ``bitnet`` and each of ``--curve-variants`` (``int8``) for N steps from the same seed and
batches and reports how far apart each one's loss curve is from ``bitnet``'s over the first ``--check`` steps
(300) and over the whole run, and the final train and validation losses (the GPU check that the fast path
trains like the plain one). ``--parallel`` trains them side by side on the one GPU (the curves do not depend on
speed), in less wall time.

The int8 variant runs, per product shape, the faster of the two int8 product kernels (pointer loads,
persistent TMA); ``BITNET_INT8_MM=pointer`` or ``tma`` in the environment runs one of them everywhere
(bitnet_cli/train/int8_triton.py). ``BITNET_INT8_REFRESH`` picks the per-step ternary refresh (``graph``
by default) and ``BITNET_COMPILE_MODE`` torch.compile's mode; each run's JSON records its ``BITNET_*`` environment.

``--profile`` also traces two optimiser steps of each run (the two before the timed windows, so
the figures above stay untraced) and reports per step: the wall time, the GPU's busy time by kind
of kernel (benchmarks/profile_step.py's kinds), the time the GPU sat idle, the top kernels, and where the idle
time fell (the kernels before and after each wait of 10 us or more).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's bitnet_cli, not an installed one
VARIANTS = {"int8": ["model.quant=bitnet", "train.int8_matmul=on", "train.int8_grad_weight=off"],
            "int8w": ["model.quant=bitnet", "train.int8_matmul=on", "train.int8_grad_weight=on"],
            "bitnet": ["model.quant=bitnet", "train.int8_matmul=off"],
            "none": ["model.quant=none", "train.int8_matmul=off"]}
# The paper recipes read data/*.txt; the benchmark measures speed, so any corpus will do.
BUNDLED = ["data.files=[bundled:tinyshakespeare]", "data.tokenizer.vocab_size=8192", "data.val_fraction=0.05"]


def variant_switches(spec: str) -> tuple[str, dict[str, str]]:
    """``"int8+ROPE_ROWS-GATED_GRAD@reduce-overhead"`` -> ``("int8", {"BITNET_INT8_ROPE_ROWS": "1",
    "BITNET_INT8_GATED_GRAD": "0", "BITNET_COMPILE_MODE": "reduce-overhead"})``: a variant of :data:`VARIANTS`, the
    on/off switches its run sets and, after ``@``, torch.compile's mode for that run (``loop.COMPILE_MODES``)."""
    from bitnet_cli.train.loop import COMPILE_MODES

    m = re.fullmatch(r"([a-z0-9]+)((?:[+-][A-Z][A-Z0-9_]*)*)(?:@([a-z-]+))?", spec)
    if not m or m.group(1) not in VARIANTS or (m.group(3) and m.group(3) not in COMPILE_MODES):
        raise SystemExit(f"error: variant {spec!r}: expected one of {', '.join(VARIANTS)}, then +SWITCH or -SWITCH "
                         f"(BITNET_INT8_SWITCH=1 or 0), then optionally @MODE ({', '.join(COMPILE_MODES)}), "
                         "e.g. int8+RESIDUAL_ROWS@reduce-overhead")
    switches = re.findall(r"([+-])([A-Z][A-Z0-9_]*)", m.group(2))
    env = {f"BITNET_INT8_{name}": "1" if sign == "+" else "0" for sign, name in switches}
    return m.group(1), env | ({"BITNET_COMPILE_MODE": m.group(3)} if m.group(3) else {})


def traced_steps(steps: int, record: dict):
    """Patch the trainer's optimiser step so that steps ``steps // 2 - 2`` and ``- 1`` (logged in the
    window that ends at ``steps // 2``, which the median leaves out) run under torch.profiler; their
    summary goes into ``record``. Returns the function that undoes the patch."""
    import torch
    from profile_step import kernel_kind

    from bitnet_cli.train import loop

    original = loop._Run.train_step
    traced = (steps // 2 - 2, steps // 2 - 1)
    walls, kinds, kernels, gaps = [], {}, {}, {}

    def train_step(self, step, total):
        if step not in traced:
            return original(self, step, total)
        # Without a GPU (a smoke test of this script) the CPU ops are traced instead, nested ones twice.
        gpu = torch.cuda.is_available()
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        sync()
        activity = torch.profiler.ProfilerActivity.CUDA if gpu else torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[activity]) as prof:
            t0 = time.perf_counter()
            out = original(self, step, total)
            sync()
            walls.append(time.perf_counter() - t0)
        idle_gaps(prof, gpu, gaps)
        for e in prof.key_averages():
            us = e.device_time_total if gpu else e.self_cpu_time_total
            if us > 0:
                kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + us / 1e3
                ms, calls = kernels.get(e.key, (0.0, 0))
                kernels[e.key] = ms + us / 1e3, calls + e.count
        if len(walls) == len(traced):
            n = len(walls)
            wall, busy = 1e3 * sum(walls) / n, sum(kinds.values()) / n
            record.update({"steps_traced": n, "wall_ms": round(wall, 2), "gpu_busy_ms": round(busy, 2),
                           "gpu_idle_ms": round(wall - busy, 2),
                           "kinds_ms": {k: round(v / n, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                           # every kernel of 0.05 ms a step or more: [name, ms, launches] per step
                           "top_kernels_ms": [[k[:120], round(ms / n, 3), calls // n] for k, (ms, calls) in
                                              sorted(kernels.items(), key=lambda kv: -kv[1][0]) if ms / n >= 0.05],
                           # where the GPU waited: [kernel before, kernel after, ms, gaps] per step, by total
                           "idle_gaps_ms": [[a[:80], b[:80], round(ms / n, 3), count / n] for (a, b), (ms, count) in
                                            sorted(gaps.items(), key=lambda kv: -kv[1][0])[:15]]})
        return out

    loop._Run.train_step = train_step
    return lambda: setattr(loop._Run, "train_step", original)


def idle_gaps(prof, gpu: bool, gaps: dict, least_us: float = 10.0) -> None:
    """Add the traced step's idle stretches of ``least_us`` or more to ``gaps``, keyed by the kernels on either
    side: (before, after) -> (ms, count). Kernels on several streams may overlap; a gap is time no kernel runs."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if (e.device_type == DeviceType.CUDA) == gpu and e.time_range.end > e.time_range.start)
    if not spans:
        return
    end, last = spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start - end >= least_us:
            ms, count = gaps.get((last, name), (0.0, 0))
            gaps[(last, name)] = ms + (start - end) / 1e3, count + 1
        if stop > end:
            end, last = stop, name


def int8_tiles() -> dict:
    """The int8 product kernel that ran ($BITNET_INT8_MM), the tile each kernel's autotuner chose per
    product shape (M, N, K) in this process, and (``auto``) the kernel chosen per shape."""
    from bitnet_cli.train import int8_triton

    def tile(c) -> str:
        return f"{c.kwargs['BM']}x{c.kwargs['BN']}x{c.kwargs['BK']} w{c.num_warps} s{c.num_stages}"

    return {"int8_kernel": int8_triton.default_kernel(),
            "int8_tiles": {f"{name} {tuple(key[:3])}": tile(c) for name, kernel in
                           (("pointer", int8_triton._int8_mm_kernel), ("tma", int8_triton._int8_mm_tma_kernel))
                           for key, c in kernel.cache.items()},
            # $BITNET_INT8_MM=auto: the kernel timed faster per product shape
            "int8_auto_choice": {str(key[:3]): k for key, k in int8_triton._FASTER.items()}}


def run(recipe_path: Path, variant: str, compile_: bool, steps: int, extra: list[str], log_every: int = 5,
        profile: bool = False, timing: bool = True, run_dir: str | None = None) -> dict:
    """One training run of ``variant`` (no final checkpoint); ``timing``: no final evaluation either;
    ``run_dir``: where the run's directory goes (default: a temporary one, removed)."""
    from bitnet_cli.train import load_recipe, loop, train
    from bitnet_cli.train.loop import model_config, peak_flops, pick_device

    base, switches = variant_switches(variant)
    overrides = [*BUNDLED, *VARIANTS[base], f"train.compile={str(compile_).lower()}", f"train.steps={steps}",
                 "train.tokens=null", f"train.log_every={log_every}", "train.eval_every=100000",
                 "train.checkpoint_every=100000", "train.eval_batches=2", *extra]
    recipe = load_recipe(recipe_path, overrides)
    import torch

    # Each variant compiles its own graphs: a switch read while tracing (BITNET_INT8_FP8_GRAD_WEIGHT) is no guard,
    # so a model of the same structure must not reuse the previous variant's.
    torch._dynamo.reset()
    if torch.cuda.is_available():  # each variant's own peak, not the largest of the runs before it in this process
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    traced: dict = {}
    undo = traced_steps(steps, traced) if profile else None
    from bitnet_cli.train import int8_linear

    chosen: list[str] = []  # the backward's optional parts the int8 path turned on (enabled_switches)
    enable = int8_linear.enable

    def enable_and_note(model, *args, **kwargs):
        n = enable(model, *args, **kwargs)
        chosen[:] = int8_linear.enabled_switches(model)
        return n

    int8_linear.enable = enable_and_note
    saved = loop._Run.save, loop._Run.evaluate
    loop._Run.save = lambda self, target, step, seconds: None
    if timing:
        loop._Run.evaluate = lambda self: float("nan")
    with tempfile.TemporaryDirectory() as d:
        out_dir = Path(run_dir or d) / f"{recipe_path.stem}-{variant}-{'compile' if compile_ else 'eager'}"
        t0 = time.perf_counter()
        outer = {k: os.environ.get(k) for k in switches}
        os.environ.update(switches)
        try:
            res = train(recipe, out_dir=out_dir, progress=False)
        finally:
            loop._Run.save, loop._Run.evaluate = saved
            int8_linear.enable = enable
            for k, v in outer.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
            if undo:
                undo()
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > steps // 2]
    tps = statistics.median(windows)
    config = model_config(recipe, recipe.data.tokenizer.vocab_size)
    fpt = config.arch.training_flops_per_token(recipe.train.seq_len)
    peak = peak_flops(pick_device(recipe.train.device))
    t = recipe.train
    env = {k: v for k, v in sorted({**os.environ, **switches}.items()) if k.startswith(("BITNET_", "TORCHINDUCTOR_"))
           and k != "BITNET_SHARED_DATA"}
    return {"recipe": recipe_path.name, "variant": variant, "compile": compile_, "batch_size": t.batch_size,
            "env": env, **({"int8_backward": chosen} if base == "int8" else {}),
            "grad_accum": t.grad_accum, "seq_len": t.seq_len, "tokens_per_s": round(tps),
            "step_s": round(t.batch_size * t.grad_accum * t.seq_len / tps, 4),
            "mfu": round(fpt * tps / peak, 4) if peak else None, "flops_per_token": fpt,
            "parameters": res.parameters, "final_loss": res.train_loss,
            **({} if timing else {"val_loss": res.val_loss}), "wall_s": round(wall, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
            **(int8_tiles() if base == "int8" and torch.cuda.is_available() else {}),
            "losses": [[r["step"], r["loss"]] for r in rows if "loss" in r], **({"profile": traced} if traced else {})}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "small.yaml"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="train_gpu.json")
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides")
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--variants", default="int8,bitnet,none")
    ap.add_argument("--curve", type=int, default=0, help="train int8 and bitnet N steps and compare the losses")
    ap.add_argument("--check", type=int, default=300, help="--curve: also compare the first CHECK steps")
    ap.add_argument("--curve-variants", default="int8", help="--curve: the variants compared with bitnet")
    ap.add_argument("--parallel", action="store_true", help="--curve: train the variants side by side")
    ap.add_argument("--run-dir", help="keep the runs' directories here (default: temporary)")
    ap.add_argument("--profile", action="store_true", help="trace two steps of each run (GPU time by kind)")
    args = ap.parse_args()
    import torch

    recipe = Path(args.recipe)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if args.curve:
        curve(recipe, gpu, args)
        return

    variants = args.variants.split(",")
    for v in variants:  # a misspelt variant fails here, before the first run's minutes on the GPU
        variant_switches(v)
    results = []
    for compile_ in [m == "compile" for m in args.modes.split(",")]:
        for variant in variants:
            try:
                r = run(recipe, variant, compile_, args.steps, args.set, profile=args.profile, run_dir=args.run_dir)
            except Exception:
                traceback.print_exc()
                r = {"variant": variant, "compile": compile_, "error": traceback.format_exc(limit=3)}
            print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "profile")}), flush=True)
            results.append(r)
            Path(args.out).write_text(json.dumps({"gpu": gpu, "steps": args.steps, "overrides": args.set,
                                                  "results": results}, indent=1))
    rows = summary(results)
    Path(args.out).write_text(json.dumps({"gpu": gpu, "steps": args.steps, "overrides": args.set, "results": results,
                                          "summary": rows}, indent=1))
    print(f"\n{gpu}  {recipe.name}  steps={args.steps}  {' '.join(args.set)}")
    width = max(7, *map(len, variants))
    print(f"{'mode':8} {'variant':{width}} {'batch':>6} {'tok/s':>10} {'step s':>8} {'runs (step s)':>22} {'MFU':>6} "
          f"{'vs none':>8}")
    for row in rows:
        runs = ", ".join(f"{x:.4f}" for x in row["step_s_runs"]) if len(row["step_s_runs"]) > 1 else ""
        ratio = f"{row['vs_none']:.3f}x" if row["vs_none"] else "-"
        print(f"{'compile' if row['compile'] else 'eager':8} {row['variant']:{width}} {row['batch']:>6} "
              f"{row['tokens_per_s']:>10,} {row['step_s']:>8.4f} {runs:>22} {(row['mfu'] or 0):>6.1%} {ratio:>8}")
    for r in results:
        if "profile" in r:
            v, c, p = r["variant"], r["compile"], r["profile"]
            print(f"\n{'compile' if c else 'eager'} {v}: traced step {p['wall_ms']:.1f} ms, GPU busy "
                  f"{p['gpu_busy_ms']:.1f}, idle {p['gpu_idle_ms']:.1f}; " +
                  ", ".join(f"{k} {ms:.1f}" for k, ms in p["kinds_ms"].items()))
            for name, ms, calls in p["top_kernels_ms"][:12]:
                print(f"  {ms:8.3f} ms  {calls:>4}x  {name[:94]}")
            print("  idle, between:")
            for before, after, ms, count in p["idle_gaps_ms"][:8]:
                print(f"  {ms:8.3f} ms  {count:>4}x  {before[:45]} -> {after[:45]}")


def summary(results: list[dict]) -> list[dict]:
    """One row per (variant, mode) over its runs (``--variants none,int8,none,int8`` runs each twice, alternately):
    the median step time and tokens/s, each run's step time, and the step's ratio to ``none``'s median in the same
    mode. Failed runs are left out."""
    groups: dict[tuple[str, bool], list[dict]] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["variant"], r["compile"]), []).append(r)
    medians = {key: statistics.median(r["step_s"] for r in runs) for key, runs in groups.items()}
    rows = []
    for (variant, compile_), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = medians.get(("none", compile_))
        rows.append({"variant": variant, "compile": compile_,
                     "batch": f"{runs[0]['batch_size']}x{runs[0]['grad_accum']}",
                     "step_s": round(medians[(variant, compile_)], 4),
                     "step_s_runs": [r["step_s"] for r in runs],
                     "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs)),
                     "mfu": statistics.median(r["mfu"] for r in runs) if runs[0]["mfu"] is not None else None,
                     "vs_none": round(medians[(variant, compile_)] / base, 4) if base else None})
    return rows


def _curve_run(job: tuple) -> dict:
    recipe, variant, steps, extra, run_dir = job
    return run(recipe, variant, True, steps, extra, log_every=10, timing=False, run_dir=run_dir)


def curve(recipe: Path, gpu: str, args) -> None:
    """``--curve``: each of ``--curve-variants`` against the plain path (``bitnet``), same seed and batches."""
    variants = [v for v in args.curve_variants.split(",") if v]
    for v in variants:
        variant_switches(v)
    jobs = [(recipe, v, args.curve, args.set, args.run_dir) for v in [*variants, "bitnet"]]
    if args.parallel:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:  # CUDA needs fresh processes
            *runs, b = pool.map(_curve_run, jobs)
    else:
        *runs, b = map(_curve_run, jobs)
    out = {"gpu": gpu, "recipe": recipe.name, "steps": args.curve, "overrides": args.set, "bitnet": b["losses"],
           **{f"{k}_bitnet": b[k] for k in ("final_loss", "val_loss", "wall_s")}}
    lb = dict(map(tuple, b["losses"]))
    print(f"\n{gpu}  {recipe.name}  {args.curve} steps  {' '.join(args.set)}")
    for v, a in zip(variants, runs):
        la = dict(map(tuple, a["losses"]))
        common = [s for s in sorted(la) if s in lb]

        def diffs(steps):
            return [abs(la[s] - lb[s]) for s in steps] or [float("nan")]

        early = diffs([s for s in common if s <= args.check])
        late = diffs([s for s in common if s > args.curve // 2])
        tail = [s for s in common if s > args.curve - 100]  # the last 100 steps: less noise than one step's loss
        out.update({v: a["losses"], **{f"{k}_{v}": a[k] for k in ("final_loss", "val_loss", "wall_s")},
                    f"max_abs_diff_{v}": max(diffs(common)), f"max_abs_diff_first_{args.check}_{v}": max(early),
                    f"mean_abs_diff_first_{args.check}_{v}": statistics.mean(early),
                    f"mean_abs_diff_second_half_{v}": statistics.mean(late),
                    f"last100_mean_{v}": statistics.mean(la[s] for s in tail),
                    "last100_mean_bitnet": statistics.mean(lb[s] for s in tail),
                    f"val_loss_diff_{v}": a["val_loss"] - b["val_loss"]})
        for s in common:
            print(f"step {s:5d}  {v} {la[s]:.4f}  bitnet {lb[s]:.4f}  diff {la[s] - lb[s]:+.4f}")
        print(f"{v}: first {args.check} steps: max |diff| {max(early):.4f}, mean {statistics.mean(early):.4f}; "
              f"whole run: max {max(diffs(common)):.4f}, mean (2nd half) {statistics.mean(late):.4f}")
        print(f"{v}: final train loss {a['final_loss']:.4f}  bitnet {b['final_loss']:.4f}; mean of the last 100 "
              f"steps {out[f'last100_mean_{v}']:.4f} / {out['last100_mean_bitnet']:.4f}; val loss "
              f"{a['val_loss']:.4f} / {b['val_loss']:.4f} (diff {out[f'val_loss_diff_{v}']:+.4f})")
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
