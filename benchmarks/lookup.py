"""Prompt lookup decoding (`bitnet run --lookup N`): decode speed with and without drafts, side by side.

    python benchmarks/lookup.py MODEL [--lookup 4] [--tokens 128] [--repeat 5] [--threads 2] [--out lookup.json]

Three workloads, each run without drafts and with them, alternately, `--repeat` times (medians):
- copy: a TinyShakespeare passage, a blank line, then its first line again: greedy decoding of a
  trained model goes on copying, the case drafts are for (edits, quotes, repeated keys);
- count: "1, 2, 3, ..., 12," decoded greedily: a continuation that repeats itself (a random
  model's greedy text falls into a loop, where most drafts are accepted);
- free: a short prompt sampled at temperature 0.8, where drafts rarely match (their cost).
Each pair must give the same text (the script fails otherwise): drafts change only the time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bitnet_cli.engine import Engine
from bitnet_cli.errors import BitnetError, run_script
from bitnet_cli.files import bundled_corpus


def workloads(engine: Engine) -> dict[str, tuple[str, dict]]:
    """The prompts and sampling of each workload; the passage is cut to half the model's context."""
    lines = bundled_corpus().read_text(encoding="utf-8")[2000:4000].split("\n")[1:-1]
    while len(engine.encode("\n".join(lines) * 2)) > engine.ctx_size // 2:
        lines.pop()
    passage = "\n".join(lines) + "\n"
    return {"copy": (passage + "\n" + lines[0] + "\n", dict(temperature=0)),
            "count": (", ".join(str(i) for i in range(1, 13)) + ",", dict(temperature=0)),
            "free": ("ROMEO:", dict(temperature=0.8, seed=1))}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--lookup", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    results = {"model": str(args.model), "lookup": args.lookup, "tokens": args.tokens, "repeat": args.repeat}
    with Engine.load(args.model, threads=args.threads) as engine:
        results.update(threads=engine.threads, isa=engine.isa)
        for name, (prompt, kw) in workloads(engine).items():
            tokens = min(args.tokens, engine.ctx_size - len(engine.encode(prompt)) - 1)
            runs: dict[int, list] = {0: [], args.lookup: []}
            texts: dict[int, str] = {}
            for _ in range(args.repeat):
                for lookup in runs:
                    gen = engine.generate(prompt, max_tokens=tokens, lookup=lookup, **kw)
                    texts[lookup] = "".join(gen)
                    runs[lookup].append(gen.stats)
            if texts[0] != texts[args.lookup]:
                raise BitnetError(f"{name}: the text with --lookup {args.lookup} differs from the text without")
            row = {}
            for lookup, stats in runs.items():
                row[f"lookup_{lookup}"] = {
                    "tokens_per_s": round(statistics.median(s.generation_tokens_per_s for s in stats), 2),
                    "generated": stats[0].generated_tokens, "drafted": stats[0].drafted_tokens,
                    "accepted": stats[0].accepted_tokens}
            row["speedup"] = round(row[f"lookup_{args.lookup}"]["tokens_per_s"] / row["lookup_0"]["tokens_per_s"], 3)
            results[name] = row
            print(f"{name}: {row}", file=sys.stderr)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    run_script(main)
