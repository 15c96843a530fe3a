"""What the output-head storage types cost in accuracy: perplexity of one trained model packed
with f16, int8, q6 and q4 embeddings, scored by the C engine on the same tokens.

    python benchmarks/head_formats.py CKPT_DIR [--text ../shared/data/corpus/wikitext-2-raw/test.txt]
                                      [--tokens 32768] [--window 512] [--threads 2] [--out head_formats.json]

CKPT_DIR is a training run (`bitnet train`) or an HF BitNet checkpoint. The text is tokenised
with the model's own tokenizer and cut into windows of --window tokens; each window is scored
from an empty cache (its first token predicts, the rest are predicted), so every format sees
exactly the same predictions to make. The ternary layers are identical across the files:
only the embedding lookup and the output head differ.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("f16", "int8", "q6", "q4")


def window_nll(engine, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given their prefixes, and the count."""
    logits = engine.forward(ids, n_past=0, all_logits=True)[:-1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
    target = logits[np.arange(len(ids) - 1), ids[1:]]
    return float((logz - target).sum()), len(ids) - 1


def perplexity(packed: Path, windows: list[list[int]], threads: int) -> dict:
    from bitnet_cli.engine import Engine

    nll, count, t0 = 0.0, 0, time.perf_counter()
    with Engine.load(packed, threads=threads) as engine:
        for w in windows:
            s, n = window_nll(engine, w)
            nll, count = nll + s, count + n
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens_scored": count,
            "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--text", type=Path, default=REPO.parent / "shared/data/corpus/wikitext-2-raw/test.txt")
    ap.add_argument("--tokens", type=int, default=32768, help="Tokens of the text to score (from its start).")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="Also write the results as JSON here.")
    args = ap.parse_args()

    from bitnet_cli.pack import PackedModel, pack_checkpoint
    from bitnet_cli.bench.shapes import bytes_per_token

    results = {"checkpoint": str(args.checkpoint), "text": str(args.text), "window": args.window, "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            out = Path(tmp) / f"{fmt}.bin"
            pack_checkpoint(args.checkpoint, out, embeddings=fmt)
            with PackedModel.open(out) as pm:
                if fmt == FORMATS[0]:
                    from tokenizers import Tokenizer

                    ids = Tokenizer.from_str(pm.tokenizer_json).encode(args.text.read_text()).ids[: args.tokens]
                    window = min(args.window, pm.dims.max_position_embeddings)
                    windows = [ids[i : i + window] for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) > 1]
                    results["model"] = {"hidden": pm.dims.hidden_size, "layers": pm.dims.num_layers,
                                        "vocab": pm.dims.vocab_size}
                head = bytes_per_token(pm.config, fmt)["head"]
                size = pm.file_size
            row = perplexity(out, windows, args.threads)
            row.update(file_bytes=size, head_bytes_per_token=head)
            results["formats"][fmt] = row
            print(f"{fmt:5s} perplexity {row['perplexity']:.4f}  (nll/token {row['nll_per_token']:.5f}, "
                  f"{row['tokens_scored']} tokens)  file {size / 1e6:.2f} MB  head {head / 1e6:.2f} MB/token", flush=True)
    base = results["formats"]["f16"]["perplexity"]
    for fmt in FORMATS[1:]:
        r = results["formats"][fmt]
        r["perplexity_vs_f16"] = r["perplexity"] / base - 1
        print(f"{fmt}: {100 * r['perplexity_vs_f16']:+.2f}% perplexity against f16")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
