"""Other runtimes' speeds on the 2B4T shape: the figures `bitnet bench` prints beside ours, and
the helpers that race those runtimes against ours in one run (benchmarks/compare_llamacpp.py,
benchmarks/llama_vs_bitnetcpp.py).

Measured by the project on 2026-11-22 with `llama-bench -p 128 -n 64 -r 3` on a 2-core AMD EPYC
Zen 3 (AVX2) machine, idle, random ternary weights in the 2B4T shape; these rows are the record of
that measurement. They are only comparable with runs on the same kind of machine.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Callable

from bitnet_cli.bench import e2e
from bitnet_cli.errors import BitnetError

SOURCE = "llama-bench -p 128 -n 64 -r 3, 2-core AMD EPYC Zen 3 (AVX2), idle; 2B4T shape, random ternary weights"
DATE = "2026-11-22"
SHAPE = "2b4t"

# tokens/s; "tg64" is generation of 64 tokens (ours is tg128: same per-token cost at short context).
ANCHORS = [
    {"runtime": "llama.cpp", "weights": "TQ2_0 2.06 bpw", "head": "Q6_K", "file_mb": 812,
     "pp128": {1: 26.2, 2: 47.9}, "tg64": {1: 14.0, 2: 22.7}},
    {"runtime": "llama.cpp", "weights": "TQ2_0 2.06 bpw", "head": "f16", "file_mb": 1199,
     "pp128": {1: 26.2, 2: 50.4}, "tg64": {1: 12.0, 2: 19.5}},
    {"runtime": "llama.cpp", "weights": "TQ1_0 1.69 bpw", "head": "Q6_K", "file_mb": 714,
     "pp128": {1: 11.1, 2: 21.9}, "tg64": {1: 8.7, 2: 15.6}},
    {"runtime": "bitnet.cpp", "weights": "I2_S 2 bpw", "head": "f16", "file_mb": 1186,
     "pp128": {1: 45.2, 2: 89.4}, "tg64": {1: 12.4, 2: 21.3}},
    {"runtime": "bitnet.cpp", "weights": "I2_S 2 bpw", "head": "Q6_K", "file_mb": 799,
     "pp128": {1: 46.0, 2: 84.3}, "tg64": {1: 16.1, 2: 27.6}},
    {"runtime": "llama.cpp", "weights": "Q4_0 (dense 4-bit, for scale)", "head": None, "file_mb": 1447,
     "pp128": {1: 19.4, 2: 38.6}, "tg64": {1: 8.4, 2: 14.8}},
    {"runtime": "transformers", "weights": "bf16 BitNetForCausalLM", "head": None, "file_mb": None,
     "pp128": {}, "tg64": {2: 3.0}},
]

# Streaming-read bandwidth measured on that machine, GB/s (range over runs).
BANDWIDTH_GBPS = {1: (22.0, 27.0), 2: (33.0, 37.0)}


def anchors_for(shape: str | None) -> list[dict]:
    """The anchor rows that apply to a benchmark of `shape` (only the 2B4T shape has any)."""
    return ANCHORS if shape == SHAPE else []


# ---------------------------------------------------------------- racing another runtime in one run
# Each round runs one llama-bench of theirs, then one e2e worker of ours, so that drift in the
# machine's load hits both sides alike.

PROMPT, GENERATE = 128, 64  # pp128 and tg64, as in the rows above


def run_tool(cmd: list[str]) -> str:
    """Run another runtime's program; its stdout, or a BitnetError with the last line of its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BitnetError(f"{shlex.join(cmd)} failed (exit code {done.returncode}): {tail}")
    return done.stdout


def write_with_tool(out: Path, command: Callable[[Path], list[str]]) -> Path:
    """Run `command(tmp)`, a program that writes the file tmp (llama-quantize), and rename tmp to
    `out` once it succeeded: an interrupted or failed run leaves no `out`."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        run_tool(command(tmp))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return out


def llama_bench_once(llama_bench: str, path: Path, threads: int) -> dict:
    """One llama-bench repetition of pp128 and tg64: tokens/s per test, plus its build description."""
    cmd = [llama_bench, "-m", str(path), "-p", str(PROMPT), "-n", str(GENERATE), "-r", "1", "-t", str(threads),
           "-o", "json"]
    try:
        rows = json.loads(run_tool(cmd))
    except json.JSONDecodeError:
        raise BitnetError(f"{llama_bench}: output is not llama-bench's JSON (is it llama-bench?)") from None
    rates = {}
    for row in rows:
        name = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
        rates[name] = float(row["avg_ts"])
    build = {k: rows[0].get(k) for k in ("build_commit", "build_number", "cpu_info", "backends")}
    return {"rates": rates, "build": build}


def ours_once(path: Path, threads: int) -> dict:
    """One e2e worker of ours on `path`: tokens/s of pp128 and tg64."""
    row = e2e.run(path, [threads], 1, prompts=(PROMPT,), generate=GENERATE)[0]
    return {name: s["median"] for name, s in row["tokens_per_s"].items()}


def cpu_busy_fraction(seconds: float = 2.0) -> float | None:
    """The share of all CPUs busy over `seconds` (from /proc/stat), taken before the run starts:
    unlike the load average, it does not remember the benchmark's own threads or a job just ended."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return round(1 - (idle1 - idle0) / max(total1 - total0, 1), 3)


def report_header(results: dict, command: str, per: str) -> tuple[str, str]:
    """The first two lines of a race's markdown report: how it was run (one llama-bench then one e2e
    worker, `per` saying for what: ", per pair and thread count"), and the machine with how busy it was."""
    m, s = results["machine"], results["settings"]
    busy = m.get("cpu_busy_before")
    return (f"Generated by `{command}` on {m['date']}: {s['rounds']} interleaved rounds (one llama-bench "
            f"`-p {s['prompt']} -n {s['generate']} -r 1` then one bitnet-cli e2e worker{per}); "
            "tokens/s as the median over rounds (min-max in brackets); x = ours / theirs.",
            f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; {m['platform']}; bitnet-cli {m['bitnet_cli']}; "
            f"load average {m['load_average']} at start, {m['load_average_end']} at the end (these count the "
            "benchmark's own threads)"
            + (f"; CPU busy with other work just before the run: {100 * busy:.0f}%" if busy is not None else ""))
