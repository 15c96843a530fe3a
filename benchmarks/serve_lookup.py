"""Prompt lookup in the server's scheduler (`bitnet serve --lookup N`): generated tokens per second with and without
drafts, side by side, on prompts whose continuation repeats them (a list of assignments, twice), greedy.

    python benchmarks/serve_lookup.py                      # the synthetic 2B4T shape, 1 and 4 streams, 2 threads
    python benchmarks/serve_lookup.py MODEL.bin --streams 1,8 --lookup 4 --threads 16

Each level runs lookup 0 and N alternately, --repeat times, in one process; the figure is the median. The time
includes the prompts' prefill (about 200 tokens a stream). Replies are the same with and without drafts (the
scheduler's test holds them to Engine.generate); this measures only what the drafts save or cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from bitnet_cli.bench.target import from_shape
from bitnet_cli.engine import Engine
from bitnet_cli.sampling import SamplingParams
from bitnet_cli.serve.scheduler import DoneEvent, ErrorEvent, Job, Scheduler


def repeating_prompt(engine: Engine, k: int) -> list[int]:
    return engine.encode(" ".join(f"item{i} = value{i};" for i in range(k, k + 20)) * 2)


def run_level(engine: Engine, streams: int, lookup: int, tokens: int) -> dict:
    scheduler = Scheduler(engine, streams, streams, lookup=lookup)
    try:
        done, events = [threading.Event() for _ in range(streams)], [[] for _ in range(streams)]

        def sink(i):
            def put(event):
                events[i].append(event)
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    done[i].set()
            return put

        jobs = [Job(repeating_prompt(engine, i), tokens, SamplingParams(0, 0, 1.0, 1.0), None, sink(i), ignore_eos=True)
                for i in range(streams)]
        t0 = time.perf_counter()
        scheduler.submit(jobs)
        for d in done:
            d.wait()
        seconds = time.perf_counter() - t0
        errors = [e.message for ev in events for e in ev if isinstance(e, ErrorEvent)]
        if errors:
            raise SystemExit(f"serve_lookup: {errors[0]}")
        generated = sum(e.completion_tokens for ev in events for e in ev if isinstance(e, DoneEvent))
        return {"tok_s": generated / seconds, "drafted": scheduler.draft_rows, "accepted": scheduler.accepted_drafts}
    finally:
        scheduler.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", type=Path, help="a packed model (default: the synthetic --shape)")
    p.add_argument("--shape", default="2b4t")
    p.add_argument("--streams", default="1,4", help="concurrent sequences per level, comma-separated")
    p.add_argument("--lookup", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per stream")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = p.parse_args()
    model = args.model or from_shape(args.shape, embeddings="q6").ensure_file()  # cached as `bitnet bench` does
    rows = []
    with Engine.load(model, threads=args.threads, ctx_size=1024, kv_cache="f16") as engine:
        for streams in [int(s) for s in args.streams.split(",")]:
            runs = {0: [], args.lookup: []}
            for _ in range(args.repeat):
                for lookup in runs:
                    runs[lookup].append(run_level(engine, streams, lookup, args.tokens))
            plain, drafted = (statistics.median(r["tok_s"] for r in runs[k]) for k in runs)
            last = runs[args.lookup][-1]
            rows.append({"streams": streams, "tok_s": round(plain, 2), "tok_s_lookup": round(drafted, 2),
                         "ratio": round(drafted / plain, 3), "drafted": last["drafted"], "accepted": last["accepted"]})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": str(model), "threads": args.threads, "lookup": args.lookup,
                                        "tokens": args.tokens, "levels": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
