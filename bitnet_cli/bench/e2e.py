"""End-to-end speed of the engine: load time, prompt processing (ppN) and generation (tgN).

Each thread count runs in a fresh worker process (`python -m bitnet_cli.bench.e2e`) so that
its peak RSS is the engine's alone, not the benchmark's, and so that a crash in the engine
becomes an error message rather than the end of the benchmark. The worker reports one JSON
object per line on stdout.

The tests follow llama-bench: ppN evaluates an N-token prompt from an empty cache in one call;
tgN decodes N tokens one at a time from an empty cache. Token ids are random (speed does not
depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bitnet_cli.bench.stats import summarize
from bitnet_cli.engine import DEFAULT_KV_CACHE
from bitnet_cli.errors import BitnetError

PROMPTS = (128, 512)
GENERATE = 128


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    /proc's VmHWM belongs to the address space, which exec replaces; ru_maxrss is inherited
    from the parent across fork+exec, so a worker would report the benchmark's own peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _measure(path: str, threads: int, repeat: int, prompts: list[int], generate: int, emit,
             isa: str | None = None, kv_cache: str = DEFAULT_KV_CACHE) -> dict:
    """Runs inside the worker: load the engine `repeat` times and time every test each time."""
    import numpy as np

    from bitnet_cli.engine import Engine

    ctx = max(prompts + [generate])
    rng = np.random.default_rng(0)
    loads, rates = [], {f"pp{n}": [] for n in prompts} | {f"tg{generate}": []}
    huge_pages = False
    for r in range(repeat):
        t0 = time.perf_counter()
        engine = Engine.load(path, threads=threads, ctx_size=ctx, isa=isa, kv_cache=kv_cache)
        loads.append(time.perf_counter() - t0)
        huge_pages = engine.huge_pages
        ids = rng.integers(0, engine.vocab_size, size=ctx).tolist()
        # warm-up, as llama-bench does: one full prompt pass brings the weights, the KV cache and
        # the clock up to speed (the first passes after a load measured up to 20% slower)
        engine.forward(ids[:min(prompts)], n_past=0, all_logits=False)
        for n in prompts:
            emit({"event": "progress", "what": f"pp{n}", "repeat": r})
            t0 = time.perf_counter()
            engine.forward(ids[:n], n_past=0, all_logits=False)
            rates[f"pp{n}"].append(n / (time.perf_counter() - t0))
        emit({"event": "progress", "what": f"tg{generate}", "repeat": r})
        t0 = time.perf_counter()
        for pos in range(generate):
            engine.forward(ids[pos : pos + 1], n_past=pos, all_logits=False)
        rates[f"tg{generate}"].append(generate / (time.perf_counter() - t0))
        engine.close()
    return {
        "threads": threads,
        "load_s": summarize(loads),
        "tokens_per_s": {name: summarize(v) for name, v in rates.items()},
        "peak_rss_bytes": peak_rss_bytes(),
        "huge_pages": huge_pages,  # weights read into transparent huge pages (see bitnet_cli.engine)
    }


def run(path: Path, threads: list[int], repeat: int, prompts=PROMPTS, generate=GENERATE,
        progress=None, isa: str | None = None, kv_cache: str = DEFAULT_KV_CACHE) -> list[dict]:
    """End-to-end figures for `path` at each thread count (one worker process each), on the
    kernels of ``isa`` (default: kernels.resolve_isa's: $BITNET_ISA, else the autotune's choice),
    with a KV cache of ``kv_cache`` elements (bitnet_cli.engine.KV_CACHE_TYPES).

    `progress(description)` is called as the worker moves from test to test.
    """
    rows = []
    for th in threads:
        cmd = [sys.executable, "-m", "bitnet_cli.bench.e2e", str(path), "--threads", str(th),
               "--repeat", str(repeat), "--prompts", ",".join(map(str, prompts)), "--generate", str(generate),
               "--kv-cache", kv_cache]
        if isa:
            cmd += ["--isa", isa]
        if progress:
            progress(f"e2e {th}t: loading")
        result, error = None, None
        with tempfile.TemporaryFile("w+") as stderr_file:  # a file, so a chatty worker never blocks
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr_file, text=True,
                                    env=os.environ | {"PYTHONUNBUFFERED": "1"})
            for line in proc.stdout:
                msg = json.loads(line)
                if msg["event"] == "progress" and progress:
                    progress(f"e2e {th}t: {msg['what']} (run {msg['repeat'] + 1}/{repeat})")
                elif msg["event"] == "result":
                    result = msg["result"]
                elif msg["event"] == "error":
                    error = msg
            code = proc.wait()
            stderr_file.seek(0)
            stderr = stderr_file.read()
        if error:
            param = error.get("param")
            raise BitnetError(error["message"], param=tuple(param) if isinstance(param, list) else param)
        if code != 0 or result is None:
            tail = stderr.strip().splitlines()[-1:] or ["no output"]
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            raise BitnetError(f"end-to-end benchmark of {path} with {th} threads failed ({how}): {tail[0]}")
        result["file_bytes"] = path.stat().st_size
        rows.append(result)
    return rows


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitnet_cli.bench.e2e")
    parser.add_argument("path")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--prompts", default=",".join(map(str, PROMPTS)))
    parser.add_argument("--generate", type=int, default=GENERATE)
    parser.add_argument("--isa", default=None)
    parser.add_argument("--kv-cache", default=DEFAULT_KV_CACHE)
    args = parser.parse_args(argv)

    def emit(msg: dict) -> None:
        print(json.dumps(msg), flush=True)

    try:
        prompts = [int(p) for p in args.prompts.split(",") if p]
        emit({"event": "result",
              "result": _measure(args.path, args.threads, args.repeat, prompts, args.generate, emit, args.isa,
                                 args.kv_cache)})
    except BitnetError as e:
        emit({"event": "error", "message": str(e), "param": e.param})  # the parent's message names the option
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
