"""Float-to-ternary conversion, the experiment of issue 17 (results: benchmarks/convert_fp.md).

    python benchmarks/convert_fp.py --corpus ../shared/data/corpus/gutenberg_books.jsonl.gz \\
        --wikitext ../shared/data/corpus/wikitext-2-raw/test.txt --out runs/convert_fp

Trains, on one corpus, at equal fine-tuning tokens:

1. the float model (recipes/small.yaml with quant: none), ``--float-tokens``;
2. post-training ternarisation of (1): its weights ternarised as they are (no training), scored in
   torch and packed and run on the C engine;
3. ternary fine-tuning from (1), no warm-up, no distillation;
4. the same with the quantisation warm-up (quant.warmup_steps);
5. with warm-up and distillation from (1): recipes/convert-small.yaml;
6. BitNet b1.58 from scratch, as many tokens as (1);

(3)-(5) get ``--ft-fraction`` of (6)'s tokens. Every model is scored the same way afterwards:
validation loss on the held-out tail of the corpus (the trainer's split, ``--val-windows``
windows) and WikiText-2 word perplexity by lm-eval's definition (its ``wikitext`` task: the
detokenised test articles, rolling windows of the model's context, log-likelihood over the
words of the raw article), computed here in torch so the GPU machine needs no lm-eval;
``--check-wikitext`` compares it with ``bitnet eval --tasks wikitext`` (CPU, lm-eval installed).

Independent runs go in parallel (``--parallel``): (1) with (6), then (3), (4) and (5), as
subprocesses on one GPU. Everything lands in --out: runs, results.json, convert_fp.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's bitnet_cli, as the training subprocesses (cwd REPO) use
SETTINGS = {
    1: "float model",
    2: "post-training ternarisation of (1)",
    3: "ternary fine-tuning from (1), no warm-up",
    4: "  + quantisation warm-up",
    5: "  + warm-up + distillation",
    6: "BitNet b1.58 from scratch",
}


# ----------------------------------------------------------------------------- runs


def train_cmd(recipe: Path, out: Path, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "bitnet_cli.cli", "train", str(recipe), "--out", str(out), "--no-progress",
            *[a for s in sets for a in ("--set", s)]]


def run_all(jobs: dict[str, list[str]], root: Path, parallel: bool) -> dict[str, float]:
    """Run the train commands (in parallel or one by one); stop at the first failure. -> seconds each."""
    procs, seconds = {}, {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start(name):
        log = open(root / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(jobs[name], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO),
                       time.perf_counter(), log)

    def finish(name):
        p, t0, log = procs.pop(name)
        rc = p.wait()
        log.close()
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"  {name}: exit {rc} after {seconds[name]} s", flush=True)
        if rc != 0:
            for other in list(procs):
                procs[other][0].kill()
            sys.exit(f"{name} failed; see {root / (name + '.log')}:\n" + (root / f"{name}.log").read_text()[-3000:])

    for name in jobs:
        start(name)
        if not parallel:
            finish(name)
    for name in list(procs):
        finish(name)
    return seconds


def ptq_checkpoint(float_final: Path, out: Path) -> Path:
    """(2): the float checkpoint declared ternary as it is (its config gains the online quantisation block)."""
    from bitnet_cli.model import ONLINE_QUANT

    out.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(float_final / f, out / f)
    cfg = json.loads((float_final / "config.json").read_text())
    cfg["quantization_config"] = dict(ONLINE_QUANT)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


# ----------------------------------------------------------------------------- scoring


def wikitext_word_perplexity(model, tok, prefix_id: int, max_len: int, pages: list[str], device) -> float:
    """lm-eval's word_perplexity: exp(-sum of rolling log-likelihoods / words of the raw articles).

    Rolling windows with context_len 1 (lm_eval.utils.get_rolling_token_windows): the prefix token,
    then the article's tokens in disjoint chunks of max_len predictions, each chunk seeing the
    max_len tokens before its targets.
    """
    import torch
    import torch.nn.functional as F

    from bitnet_cli.eval.wikitext import wikitext_detokenizer

    total_ll, words = 0.0, 0
    for page in pages:
        ids = tok.encode(wikitext_detokenizer(page)).ids
        seq = [prefix_id] + ids
        for a in range(0, len(ids), max_len):
            b = min(a + max_len, len(ids))
            start = max(0, b - max_len)
            inp = torch.tensor([seq[start:b]], device=device)
            with torch.no_grad():
                logits = model(inp)[0, -(b - a):].float()
            tgt = torch.tensor(ids[a:b], device=device)
            total_ll += F.log_softmax(logits, -1).gather(1, tgt[:, None]).sum().item()
        words += len(re.split(r"\s+", page))
    return math.exp(-total_ll / words)


def val_loss(model, data, windows: int, batch: int, device) -> float:
    """Mean cross-entropy over ``windows`` evenly spaced windows of the held-out split."""
    import torch
    import torch.nn.functional as F

    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in data.val_batches(max(1, windows // batch), batch, 0, 1):
            logits = model(x.to(device)).float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                     reduction="sum").item()
            n += y.numel()
    return total / n


def score(ckpt: Path, data, pages, args, device, quant: str | None = None) -> dict:
    import torch

    from bitnet_cli.model import BitNetForCausalLM
    from bitnet_cli.tokenizer import special_id
    from bitnet_cli.train.data import load_tokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = BitNetForCausalLM.from_pretrained(ckpt, dtype=torch.float32, device=device, quant=quant)
    tok = load_tokenizer(ckpt / "tokenizer.json")
    bos, eos = (special_id(kind, tok, {}, {}, guess=True) for kind in ("bos", "eos"))
    prefix = bos if bos is not None else eos
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        if pages is None:
            return {"val_loss": round(val_loss(model, data, args.val_windows, 8, device), 4)}
        return {"wikitext2_word_ppl": round(wikitext_word_perplexity(
            model, tok, prefix, model.config.max_position_embeddings, pages, device), 2)}


def engine_val_loss(packed: Path, data, windows: int) -> float:
    """Validation loss of a packed file on the C engine (the same windows as val_loss)."""
    import numpy as np

    from bitnet_cli.engine import Engine

    total, n = 0.0, 0
    with Engine.load(packed, ctx_size=data.seq_len) as eng:
        for x, y in data.val_batches(windows, 1, 0, 1):
            logits = eng.forward(x[0].tolist())
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            total += float((logz - logits[np.arange(len(logits)), y[0].numpy()]).sum())
            n += y.numel()
    return total / n


def ptq_on_engine(ptq: Path, root: Path, args, corpus: Path, data, device) -> dict:
    """(2) packed and run on the C engine, against torch on the same few windows."""
    import torch

    from bitnet_cli.model import BitNetForCausalLM
    from bitnet_cli.pack.convert import pack_checkpoint

    out = {}
    try:
        pack_checkpoint(ptq, root / "ptq.bin", force=True)
        ref = BitNetForCausalLM.from_pretrained(ptq, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out["torch_val_loss_engine_windows"] = round(val_loss(ref, data, args.engine_windows, 1, device), 4)
        # in a child process: a fault in the engine must not take the other figures with it
        child = subprocess.run([sys.executable, __file__, "--engine-check", str(root / "ptq.bin"), "--corpus",
                                str(corpus), "--wikitext", str(args.wikitext), "--out", str(root),
                                "--engine-windows", str(args.engine_windows), "--base", args.base,
                                *sum((["--set", x] for x in args.sets), []),
                                *sum((["--set-base", x] for x in args.sets_base), [])],
                               capture_output=True, text=True, timeout=600, cwd=REPO)
        if child.returncode != 0:
            raise RuntimeError(f"exit {child.returncode}: {child.stderr[-500:]}")
        out["engine_val_loss"] = json.loads(child.stdout.strip().splitlines()[-1])["engine_val_loss"]
        print(f"  (2) packed, C engine, {args.engine_windows} windows: val loss {out['engine_val_loss']} "
              f"(torch {out['torch_val_loss_engine_windows']})", flush=True)
    except Exception as e:  # noqa: BLE001 - the torch figures stand without the engine's
        out["engine_error"] = f"{type(e).__name__}: {e}"
        print(f"  (2) packed: {out['engine_error']}", flush=True)
    return out


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def plot(runs: dict[str, list[dict]], out_png: Path, ptq_val: float | None = None) -> None:
    """Validation loss against training tokens for every run, and the lambda schedules.

    ``runs``: metrics.jsonl rows by run name (float, scratch, ft_plain, ft_warmup, ft_distill).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def val(rows):
        return [(r["tokens"] / 1e6, r["val_loss"]) for r in _with_tokens(rows) if "val_loss" in r]

    style = {"ft_plain": ("tab:red", "(3) fine-tuned, no warm-up"),
             "ft_warmup": ("tab:orange", "(4) + quantisation warm-up"),
             "ft_distill": ("tab:green", "(5) + warm-up + distillation")}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for name, (color, label) in style.items():
        if name in runs:
            ax.plot(*zip(*val(runs[name])), "o-", ms=3, color=color, label=label)
            lam = [(r["tokens"] / 1e6, r["quant_lambda"]) for r in runs[name] if "quant_lambda" in r]
            ax2.plot(*zip(*(lam or [(r["tokens"] / 1e6, 1.0) for r in runs[name] if "loss" in r])), color=color,
                     label=label)
    if "scratch" in runs:
        ax.plot(*zip(*val(runs["scratch"])), "s--", ms=3, color="tab:purple", label="(6) BitNet from scratch")
    if "float" in runs:
        ax.plot(*zip(*val(runs["float"])), "^:", ms=3, color="tab:blue", label="(1) float model (its training)")
    if ptq_val is not None:
        ax.axhline(ptq_val, color="black", ls="-.", label=f"(2) post-training ternarisation {ptq_val:.2f}")
    ax.set_xlabel("training tokens (millions): fine-tuning only for (3)-(5)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_ylim(4.8, 6.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.set_xlabel("fine-tuning tokens (millions)")
    ax2.set_ylabel("quantisation lambda")
    ax2.set_ylim(-0.03, 1.05)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _with_tokens(rows: list[dict]) -> list[dict]:
    """val_loss rows carry only the step: give them the tokens of the training row of that step."""
    tokens = {r["step"]: r["tokens"] for r in rows if "tokens" in r}
    per_step = next((r["tokens"] // r["step"] for r in rows if "tokens" in r), 0)
    return [{**r, "tokens": tokens.get(r["step"], r["step"] * per_step)} for r in rows]


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, help="the training corpus (required unless --plot-from)")
    ap.add_argument("--wikitext", type=Path, help="wikitext-2-raw/test.txt (required unless --plot-from)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", default="small", help="recipe of (1) and (6): small (GPU) or tiny (a CPU check)")
    ap.add_argument("--convert", default="convert-small", help="recipe of (5)")
    ap.add_argument("--float-tokens", type=float, default=16e6, help="tokens of (1) and (6)")
    ap.add_argument("--ft-fraction", type=float, default=1 / 3, help="fine-tuning tokens of (3)-(5) / (6)'s")
    ap.add_argument("--val-windows", type=int, default=64, help="held-out windows each model is scored on")
    ap.add_argument("--wikitext-pages", type=int, default=0, help="score only the first N articles (0: all)")
    ap.add_argument("--engine-windows", type=int, default=4, help="windows (2) is scored on by the C engine")
    ap.add_argument("--parallel", action="store_true", help="run independent trainings at the same time")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override for every run")
    ap.add_argument("--set-base", dest="sets_base", action="append", default=[], help="override for (1) and (6)")
    ap.add_argument("--set-ft", dest="sets_ft", action="append", default=[], help="override for (3), (4) and (5)")
    ap.add_argument("--check-wikitext", action="store_true", help="also run `bitnet eval --tasks wikitext` on (1)")
    ap.add_argument("--runs", default="float,scratch,ft_plain,ft_warmup,ft_distill",
                    help="which trainings to run (a subset re-runs part of the experiment; the others are skipped)")
    ap.add_argument("--plot-from", type=Path, help="only redraw convert_fp.png from a saved metrics file "
                                                   "(benchmarks/convert_fp.json) into --out")
    ap.add_argument("--engine-check", type=Path, help=argparse.SUPPRESS)  # the child process of (2)'s engine run
    args = ap.parse_args()

    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.plot_from:
        saved = json.loads(args.plot_from.read_text())
        plot(saved["runs"], root / "convert_fp.png", saved.get("results", {}).get("2", {}).get("val_loss"))
        return
    if args.corpus is None or args.wikitext is None:
        ap.error("--corpus and --wikitext are required")

    import torch

    corpus = args.corpus.resolve()
    common = [f"data.files=[{corpus}]", *args.sets]
    base = REPO / "recipes" / f"{args.base}.yaml"
    conv = REPO / "recipes" / f"{args.convert}.yaml"

    # Tokenise once before the parallel runs (they would all do it at the same time).
    from bitnet_cli.train import load_recipe
    from bitnet_cli.train.data import (TokenData, cache_root, corpus_hash, prepare_tokenizer, resolve_files,
                                       tokenize_to_memmap)
    from bitnet_cli.eval.wikitext import wikitext_pages
    from bitnet_cli.train.loop import total_steps

    t0 = time.perf_counter()
    r_float = load_recipe(base, [*common, "model.quant=none", f"train.tokens={args.float_tokens}", "train.steps=null",
                                 *args.sets_base])
    files = resolve_files(r_float.data, r_float.base_dir)
    digest = corpus_hash(files)
    tok, _ = prepare_tokenizer(r_float.data, files, r_float.base_dir, digest)
    bin_path = tokenize_to_memmap(files, tok, cache_root(r_float.data), digest)
    data = TokenData.open(bin_path, r_float.data.val_fraction, r_float.train.seq_len, r_float.seed)
    if args.engine_check:
        print(json.dumps({"engine_val_loss": round(engine_val_loss(args.engine_check, data, args.engine_windows), 4)}))
        return
    print(f"corpus: {len(data.tokens):,} tokens ({data.n_val:,} held out), {time.perf_counter() - t0:.0f} s",
          flush=True)

    ft_tokens = args.float_tokens * args.ft_fraction
    full = [f"train.tokens={args.float_tokens}", "train.steps=null", *args.sets_base]
    ft = [f"train.tokens={ft_tokens}", "train.steps=null", f"model.init_from={root / 'float'}", *args.sets_ft]
    wanted = set(args.runs.split(","))
    jobs = {
        "float": train_cmd(base, root / "float", [*common, *full, "model.quant=none"]),
        "scratch": train_cmd(base, root / "scratch", [*common, *full, "model.quant=bitnet"]),
        "ft_plain": train_cmd(conv, root / "ft_plain", [*common, *ft, "quant.warmup_steps=0", "distill.alpha=0"]),
        "ft_warmup": train_cmd(conv, root / "ft_warmup", [*common, *ft, "distill.alpha=0"]),
        "ft_distill": train_cmd(conv, root / "ft_distill", [*common, *ft]),
    }
    timing = {}
    # At most two small-model trainings share the GPU: three of them (fp32 logits of a 32k vocabulary,
    # a teacher beside one) outgrow an H200's 140 GB.
    for phase in (("float", "scratch"), ("ft_plain", "ft_warmup"), ("ft_distill",)):
        todo = {k: jobs[k] for k in phase if k in wanted}
        if todo:
            print(f"training {', '.join(todo)}", flush=True)
            timing.update(run_all(todo, root, args.parallel))

    print("scoring", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pages = wikitext_pages(args.wikitext.read_text(encoding="utf-8"))
    if args.wikitext_pages:
        pages = pages[: args.wikitext_pages]
    runs = {1: root / "float", 3: root / "ft_plain", 4: root / "ft_warmup", 5: root / "ft_distill", 6: root / "scratch"}
    ckpts = {str(s): run / "final" for s, run in runs.items() if (run / "final" / "config.json").is_file()}
    ckpts["2"] = ptq = ptq_checkpoint(root / "float" / "final", root / "ptq")
    results: dict[str, dict] = {s: {} for s in ckpts}
    save = lambda: (root / "results.json").write_text(json.dumps({"settings": SETTINGS, "results": results}, indent=2))  # noqa: E731
    # validation loss of every model first (cheap), then WikiText-2: a time limit still leaves the first
    for what in ("val", "wikitext"):
        for s in sorted(ckpts, key=lambda k: (k != "5", k != "2", k)):
            results[s].update(score(ckpts[s], data, pages if what == "wikitext" else None, args, device))
            print(f"  ({s}) {results[s]}", flush=True)
            save()
    if args.engine_windows:
        results["2"].update(ptq_on_engine(ptq, root, args, corpus, data, device))
        save()

    r_ft = load_recipe(conv, [*common, *ft])
    r_full = load_recipe(base, [*common, *full])
    tokens_per_step = r_full.train.batch_size * r_full.train.grad_accum * r_full.train.seq_len
    meta = {
        "float_tokens": total_steps(r_full) * tokens_per_step,
        "ft_tokens": total_steps(r_ft) * r_ft.train.batch_size * r_ft.train.grad_accum * r_ft.train.seq_len,
        "steps_full": total_steps(r_full), "steps_ft": total_steps(r_ft),
        "quant_warmup_steps": r_ft.quant.warmup_steps, "distill_alpha": r_ft.distill.alpha,
        "val_windows": args.val_windows, "wikitext_pages": len(pages), "seconds": timing,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    if args.check_wikitext:
        from bitnet_cli.eval.runner import evaluate

        got = evaluate(root / "float" / "final", ["wikitext"], limit=args.wikitext_pages or None,
                       data_dir=args.wikitext.parent.parent.parent / "eval")
        meta["bitnet_eval_wikitext_word_ppl_float"] = got["results"]["wikitext"]["word_perplexity,none"]
        print(f"  bitnet eval --tasks wikitext on (1): {meta['bitnet_eval_wikitext_word_ppl_float']}", flush=True)
    out = {"settings": SETTINGS, "results": results, "meta": meta}
    (root / "results.json").write_text(json.dumps(out, indent=2))
    names = {1: "float", 3: "ft_plain", 4: "ft_warmup", 5: "ft_distill", 6: "scratch"}
    plot({names[k]: read_metrics(run) for k, run in runs.items() if (run / "metrics.jsonl").is_file()},
         root / "convert_fp.png", results.get("2", {}).get("val_loss"))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
