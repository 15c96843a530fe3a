"""Load test of `bitnet serve` (and llama.cpp's `llama-server` side by side): aggregate generated
tokens/s with 1, 4, 8 and 16 concurrent streams, and p50/p99 time to first token and inter-token
latency at each level, for each request mix; the engine's batched decode step beside a prefill
chunk; pp128 without the server; the memory each extra slot costs; and issue 16's targets as ratios.

    python benchmarks/serve_load.py --shape 2b4t --threads 2 [--streams 1,4,8,16] [--mix 128x64,32x256] \\
        [--kv-cache f32|f16] [--llama-server /tmp/anchors/llama.cpp/build/bin/llama-server] [--out DIR]
    python benchmarks/serve_load.py --shape tiny --threads 1 --mix 32x16   # a quick check

The model is the synthetic shape `bitnet bench --shape` uses (random trits: speed does not depend
on the values), or --model FILE. llama-server gets our own GGUF export of the same file (TQ2_0,
`bitnet pack --to gguf`) and the same --parallel, --threads and context per slot. Each stream is a
client that sends --requests streaming completions one after another: a fresh random prompt (so no
prefix is shared) and a fixed number of generated tokens, greedy, through end-of-sequence tokens
(`ignore_eos`), so both servers do the same work. A mix PxG is P prompt tokens and G generated ones
per request: the default 128x64 is prefill-dominated (a prompt costs a prefill pass of P tokens,
as much as P decode rows of a full batch), 32x256 decode-dominated. Levels run in increasing order,
each server in turn, after a warm-up request. Figures:
  tok/s          generated tokens of all streams / the level's wall time
  steady tok/s   token chunks / s while every stream generates (the last stream's first token to the
                 first stream's last): the batched decode rate, without the level's ramp-up and tail
  TTFT p50/p99   request sent -> first token's chunk
  ITL p50/p99    gaps between consecutive token chunks of one stream (a server that sends several
                 tokens in one chunk shows fewer, longer gaps)
  RSS            the server's resident memory after the level (weights + KV caches in use)
  engine busy    ours only (its /health counters around the level): the share of the level's wall
                 time inside engine steps (forward_batch); rows/step: decode rows per step
  engine steps   in this process, no HTTP: one Engine.forward_batch of M decode rows (M sequences,
                 one token each, every logits row wanted) against one prefill chunk of M tokens of
                 one sequence (its last row wanted), interleaved, medians of --step-repeats
  pp128, tg64    `bitnet bench --what e2e --prompts 128 --generate 64` on the same file and threads,
                 medians of --step-repeats runs (before the servers)
  targets        8 streams / 1 stream (>= 2.5x), 16 streams / pp128 (>= 0.75), and at 8 streams ours /
                 llama-server's tokens/s (>= 1.5x) with both TTFT p50 (ours no worse)
  bytes per slot (RSS of the --parallel server after the largest level - RSS of a one-slot server
                 after the same requests one at a time) / (parallel - 1), beside the KV cache a
                 slot's positions take (KV caches are allocated zeroed: pages count once written)
Writes serve_load.json and SERVE_LOAD.md into --out (default: beside this script). Run it on an
idle machine: the figures are the machine's, not the code's, when anything else is running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bitnet_cli.arch import ModelDims
from bitnet_cli.bench import target
from bitnet_cli.engine import DEFAULT_KV_CACHE, kv_bytes_per_position, kv_cache_type
from bitnet_cli.errors import BitnetError, run_script

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REFERENCE_PROMPT, REFERENCE_GENERATE = 128, 64  # the e2e run the streams are held against
TARGET_X8, TARGET_X16_PP, TARGET_X8_LLAMA = 2.5, 0.75, 1.5  # issue 16


class ServerProcess:
    """A server subprocess, its base URL, and how to stop it. Its output goes to files, not pipes: a
    server that logs more than a pipe holds (llama-server logs every slot's work) would block on a
    pipe nobody reads, and the files give the tail of its log when it fails."""

    def __init__(self, name: str, cmd: list[str], url: str | None, logs: Path, env=None):
        self.name, self.cmd = name, cmd
        stem = logs / name.replace(" ", "-")
        self.stdout_path, self.stderr_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True, env=env)
        self.url = url
        self.info: dict = {}

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's stderr (its log), for error messages."""
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:].strip()

    def failed(self, what: str) -> BitnetError:
        code = self.proc.poll()
        state = f"exited with {code}" if code is not None else "still running"
        return BitnetError(f"{self.name} {what} ({state}); its log ends:\n{self.log_tail()}")

    def first_line(self, timeout: float = 600) -> str:
        """The first line the server prints on stdout (bitnet serve --json: its address and sizes)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.stdout_path.read_text()
            if "\n" in text:
                return text.split("\n", 1)[0]
            if self.proc.poll() is not None:
                raise self.failed("did not start")
            time.sleep(0.1)
        raise self.failed(f"printed nothing in {timeout:.0f} s")

    def rss_bytes(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def wait_ready(self, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise self.failed("did not become ready")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise self.failed(f"did not become ready in {timeout:.0f} s")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.returncode


def start_ours(model: Path, args, parallel: int, logs: Path) -> ServerProcess:
    cmd = [sys.executable, "-m", "bitnet_cli.cli", "serve", str(model), "--port", "0", "--json",
           "--threads", str(args.threads), "--parallel", str(parallel), "--ctx-size", str(args.ctx_size),
           "--max-queue", str(max(args.streams) * 2), "--kv-cache", args.kv_cache]
    s = ServerProcess("bitnet serve" if parallel == args.parallel else f"bitnet serve {parallel} slot", cmd, None, logs)
    s.info = json.loads(s.first_line())
    s.url = s.info["url"].removesuffix("/v1")
    s.wait_ready()
    return s


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_llama(binary: str, gguf: Path, args, logs: Path) -> ServerProcess:
    port = free_port()
    # llama-server divides -c among its slots: the same context per sequence as ours
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
           "-tb", str(args.threads), "--parallel", str(args.parallel), "-c", str(args.ctx_size * args.parallel),
           "--cont-batching", "--no-warmup"]
    s = ServerProcess("llama-server", cmd, f"http://127.0.0.1:{port}", logs)
    s.wait_ready()
    return s


def their_gguf(packed: Path, fresh: bool = False) -> Path:
    """Our TQ2_0 GGUF export of the packed file, made once beside it (again with fresh)."""
    from bitnet_cli.pack.gguf import export_gguf

    out = packed.with_suffix(".tq2_0.gguf")
    if fresh or not out.exists():
        out.unlink(missing_ok=True)
        print(f"  exporting {out.name}", file=sys.stderr, flush=True)
        export_gguf(packed, out, "tq2_0")
    return out


def one_request(client: httpx.Client, url: str, prompt: list[int], generate: int, model: str,
                sampled: bool = False) -> dict:
    """One streaming completion: send time, and the arrival time of every token chunk. Greedy, or
    with `sampled` the server's default sampling (no temperature sent: 1, and no top-k limit)."""
    body = {"model": model, "prompt": prompt, "max_tokens": generate, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}, **({} if sampled else {"temperature": 0})}
    t0 = time.perf_counter()
    arrivals: list[float] = []
    tokens = None  # the server's own count (usage), when it sends one
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise BitnetError(f"{url}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise BitnetError(f"{url}: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens", tokens)
            choice = (chunk.get("choices") or [{}])[0]
            if choice.get("text") or (choice.get("finish_reason") is None and "text" in choice):
                arrivals.append(time.perf_counter())
    return {"sent": t0, "arrivals": arrivals, "tokens": len(arrivals) if tokens is None else tokens}


def steady_rate(results: list[list[dict]]) -> float | None:
    """Token chunks per second while every stream is generating: from the last stream's first token
    to the first stream's last one (the level's ramp-up, every prompt waiting for its prefill, and
    its tail, streams finishing one by one, left out). None when that window is empty."""
    firsts = [rs[0]["arrivals"][0] for rs in results if rs and rs[0]["arrivals"]]
    lasts = [rs[-1]["arrivals"][-1] for rs in results if rs and rs[-1]["arrivals"]]
    if not firsts or len(firsts) < len(results) or len(lasts) < len(results):
        return None
    start, end = max(firsts), min(lasts)
    if end <= start:
        return None
    chunks = sum(start < t <= end for rs in results for r in rs for t in r["arrivals"])
    return round(chunks / (end - start), 2)


def run_level(url: str, model: str, streams: int, mix: tuple[int, int], args, vocab: int, seed: int) -> dict:
    prompt, generate = mix
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(2, vocab, prompt)] for _ in range(streams * args.requests)]
    results: list[list[dict]] = [[] for _ in range(streams)]
    errors: list[BaseException] = []

    def client_loop(i: int) -> None:
        try:
            for k in range(args.requests):
                # a connection per request: llama-server may close a kept-alive one after a streamed response,
                # and the stream's next request then failed with "Server disconnected" (session 18)
                with httpx.Client(timeout=None) as client:
                    results[i].append(one_request(client, url, prompts[i * args.requests + k], generate, model,
                                                   args.sampled))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    reqs = [r for rs in results for r in rs]
    tokens = sum(r["tokens"] for r in reqs)
    steady = steady_rate(results)
    ttft = np.array([r["arrivals"][0] - r["sent"] for r in reqs if r["arrivals"]])
    itl = np.concatenate([np.diff(r["arrivals"]) for r in reqs if len(r["arrivals"]) > 1] or [np.zeros(0)])

    def pct(a, q):
        return round(float(np.percentile(a, q)) * 1000, 2) if a.size else None

    return {"streams": streams, "requests": len(reqs), "generated_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "steady_tokens_per_s": steady,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
            "short_requests": sum(r["tokens"] != generate for r in reqs)}


def warm_up(server: ServerProcess, model: str, prompt: int) -> None:
    print(f"{server.name}: warm-up", file=sys.stderr, flush=True)
    try:
        with httpx.Client(timeout=None) as client:
            one_request(client, server.url, list(range(2, 2 + prompt)), 4, model)
    except (httpx.HTTPError, BitnetError) as e:
        raise server.failed(f"failed its warm-up request: {type(e).__name__}: {e}") from None


ENGINE_COUNTERS = ("engine_steps", "engine_seconds", "decode_rows", "prompt_rows")


def engine_counters(url: str) -> dict | None:
    """What our server's engine has run since it started (its /health), None for llama-server."""
    health = httpx.get(url + "/health", timeout=10).json()
    return {k: health[k] for k in ENGINE_COUNTERS} if all(k in health for k in ENGINE_COUNTERS) else None


def engine_share(before: dict | None, after: dict | None, wall_s: float) -> dict | None:
    """A level's engine work from the counters around it: the share of the level's wall time spent
    in engine steps (the rest: sampling, the scheduler, and steps waiting for requests), the steps,
    the decode rows per step and the prompt tokens prefilled."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in ENGINE_COUNTERS}
    return {"busy": round(d["engine_seconds"] / wall_s, 4), "steps": d["engine_steps"],
            "decode_rows_per_step": round(d["decode_rows"] / d["engine_steps"], 2) if d["engine_steps"] else 0.0,
            "prompt_rows": d["prompt_rows"]}


def bench_server(server: ServerProcess, model: str, mix: tuple[int, int], args, vocab: int) -> list[dict]:
    rows = []
    for level in args.streams:
        try:
            before = engine_counters(server.url)
            row = run_level(server.url, model, level, mix, args, vocab, seed=level)
            row["engine"] = engine_share(before, engine_counters(server.url), row["wall_s"])
        except (httpx.HTTPError, BitnetError) as e:
            raise server.failed(f"failed at {level} streams: {type(e).__name__}: {e}") from None
        row["rss_bytes"] = server.rss_bytes()
        print(f"{server.name} {mix[0]}x{mix[1]}: {level} streams: {row['tokens_per_s']} tok/s, "
              f"TTFT p50 {row['ttft_ms_p50']} ms, ITL p50 {row['itl_ms_p50']} ms", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def engine_steps(packed: Path, args, vocab: int) -> dict:
    """One batched decode step of M rows against one prefill chunk of M tokens, in this process: what
    a step of the server's scheduler costs without HTTP, sampling or Python around it."""
    from bitnet_cli.engine import Engine

    n = max(args.steps)
    fill = args.mixes[0][0]  # the positions every sequence has cached: the first mix's prompt
    if fill + max(n, args.step_repeats + 1) > args.ctx_size:
        raise BitnetError("the first mix's prompt + the largest --steps level must fit --ctx-size")
    rng = np.random.default_rng(0)
    print(f"engine steps: filling {n + 1} sequences with {fill} tokens", file=sys.stderr, flush=True)
    with Engine.load(packed, threads=args.threads, ctx_size=args.ctx_size, kv_cache=args.kv_cache) as eng:
        eng.set_sequences(n + 1)  # sequences 0..n-1 decode; sequence n takes the prefill chunks
        seqs = [s for s in range(n + 1) for _ in range(fill)]
        eng.forward_batch(rng.integers(2, vocab, len(seqs)), seqs, [p for _ in range(n + 1) for p in range(fill)],
                          [False] * len(seqs))
        rows = []
        for m in args.steps:
            tokens = rng.integers(2, vocab, m)
            decode, prefill = [], []
            for r in range(args.step_repeats + 1):  # the first round warms up, untimed
                t0 = time.perf_counter()
                eng.forward_batch(tokens, list(range(m)), [fill + r] * m, [True] * m)
                t1 = time.perf_counter()
                eng.forward_batch(tokens, [n] * m, list(range(fill, fill + m)), [False] * (m - 1) + [True])
                t2 = time.perf_counter()
                if r:
                    decode.append(t1 - t0), prefill.append(t2 - t1)
            d, p = float(np.median(decode)), float(np.median(prefill))
            rows.append({"rows": m, "decode_step_ms": round(d * 1000, 2), "decode_tok_s": round(m / d, 2),
                         "prefill_chunk_ms": round(p * 1000, 2), "prefill_tok_s": round(m / p, 2)})
            print(f"engine steps: {m} rows: decode step {d * 1000:.1f} ms, prefill chunk {p * 1000:.1f} ms",
                  file=sys.stderr, flush=True)
    return {"cached_positions": fill, "repeats": args.step_repeats, "rows": rows}


def e2e_reference(packed: Path, args) -> dict:
    """`bitnet bench --what e2e --prompts 128 --generate 64` on the same file and threads (its own
    worker process, --step-repeats loads): pp128, the ceiling the batched streams are held to, and
    tg64, one stream decoding without the server."""
    from bitnet_cli.bench import e2e

    print(f"e2e: pp{REFERENCE_PROMPT} and tg{REFERENCE_GENERATE}, {args.step_repeats} runs", file=sys.stderr, flush=True)
    row = e2e.run(packed, [args.threads], args.step_repeats, prompts=(REFERENCE_PROMPT,), generate=REFERENCE_GENERATE,
                  kv_cache=args.kv_cache)[0]
    return {"repeats": args.step_repeats} | {name: round(s["median"], 2) for name, s in row["tokens_per_s"].items()}


def targets(mix: dict, e2e_rates: dict | None) -> dict:
    """Issue 16's targets for one mix, as ratios: 8 streams against one, 16 streams against pp128,
    and at 8 streams our aggregate tokens/s and TTFT p50 against llama-server's."""
    ours = {r["streams"]: r for r in mix["servers"].get("bitnet serve", [])}
    theirs = {r["streams"]: r for r in mix["servers"].get("llama-server", [])}
    out = {}
    if 1 in ours and 8 in ours:
        out["x8_over_1"] = round(ours[8]["tokens_per_s"] / ours[1]["tokens_per_s"], 2)
    pp = (e2e_rates or {}).get(f"pp{REFERENCE_PROMPT}")
    if 16 in ours and pp:
        out["x16_over_pp"] = round(ours[16]["tokens_per_s"] / pp, 2)
    if 8 in ours and 8 in theirs:
        out["x8_over_llama_server"] = round(ours[8]["tokens_per_s"] / theirs[8]["tokens_per_s"], 2)
        out["ttft_p50_ms_8"] = {"ours": ours[8]["ttft_ms_p50"], "llama-server": theirs[8]["ttft_ms_p50"]}
    return out


def targets_line(t: dict) -> str:
    parts = []
    if "x8_over_1" in t:
        parts.append(f"8 streams {t['x8_over_1']:.2f}x one stream (target >= {TARGET_X8:g}x)")
    if "x16_over_pp" in t:
        parts.append(f"16 streams {t['x16_over_pp']:.2f} of pp{REFERENCE_PROMPT} (target >= {TARGET_X16_PP:g})")
    if "x8_over_llama_server" in t:
        ttft = t["ttft_p50_ms_8"]
        parts.append(f"8 streams {t['x8_over_llama_server']:.2f}x llama-server's tokens/s (target >= "
                     f"{TARGET_X8_LLAMA:g}x), TTFT p50 {ttft['ours']} ms against {ttft['llama-server']} ms "
                     "(target: no worse)")
    return "Targets (issue 16): " + "; ".join(parts) + "." if parts else ""


def slot_bytes(packed: Path, args, vocab: int, logs: Path) -> list[int | None]:
    """RSS of a one-slot server after a warm-up and one request of each mix, one value per mix."""
    server = start_ours(packed, args, 1, logs)
    rss = []
    try:
        warm_up(server, server.info["model"], args.mixes[0][0])
        with httpx.Client(timeout=None) as client:
            for i, (prompt, generate) in enumerate(args.mixes):
                one_request(client, server.url, list(range(2 + i, 2 + i + prompt)), generate, server.info["model"])
                rss.append(server.rss_bytes())
    finally:
        server.stop()
    return rss


def run_servers(packed: Path, args, vocab: int, kv_token: int, results: dict) -> int:
    """Every mix on our server (and llama-server's), into results["mixes"]; returns our KV bytes per slot."""
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        logs = Path(tmp)
        one_slot = slot_bytes(packed, args, vocab, logs) if args.parallel > 1 else [None] * len(args.mixes)
        ours = start_ours(packed, args, args.parallel, logs)
        try:
            model = ours.info["model"]
            warm_up(ours, model, args.mixes[0][0])
            for mix, rss1 in zip(results["mixes"], one_slot):
                rows = mix["servers"]["bitnet serve"] = bench_server(ours, model, (mix["prompt"], mix["generate"]),
                                                                     args, vocab)
                mix["kv_bytes_used_per_slot"] = kv_token * (mix["prompt"] + mix["generate"])
                if rss1 is not None and rows[-1]["rss_bytes"] is not None and max(args.streams) >= args.parallel:
                    mix["bytes_per_slot"] = (rows[-1]["rss_bytes"] - rss1) // (args.parallel - 1)
        finally:
            ours.stop()
        if args.llama_server:
            theirs = None
            try:
                theirs = start_llama(args.llama_server, their_gguf(packed, args.fresh_gguf), args, logs)
                warm_up(theirs, "any", args.mixes[0][0])
                for mix in results["mixes"]:
                    mix["servers"]["llama-server"] = bench_server(theirs, "any", (mix["prompt"], mix["generate"]),
                                                                  args, vocab)
            except BitnetError as e:  # their crash must not lose our figures
                print(f"llama-server failed: {e}", file=sys.stderr, flush=True)
                for mix in results["mixes"]:
                    if "llama-server" not in mix["servers"]:
                        mix["llama_server_error"] = str(e)
            finally:
                if theirs is not None:
                    theirs.stop()
    return ours.info["kv_bytes_per_slot"]


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# `bitnet serve` under load ({m['date']})", "",
             f"Generated by `{m['command']}` on {m['machine']} (load average {m['load_average']} at the start, "
             f"{m['load_average_end']} at the end). "
             f"Model: {m['model']} ({m['embeddings']} head), {m['threads']} threads, --parallel {m['parallel']}, "
             f"{m['ctx_size']}-token context per slot; {m['requests']} requests per stream, "
             f"{'sampled with the server defaults' if m.get('sampled') else 'greedy'}. "
             f"KV cache (--kv-cache {m['kv_cache']}): {m['kv_bytes_per_token']} bytes per token"
             + (f", {m['kv_bytes_per_slot']} per slot" if m["kv_bytes_per_slot"] else "")
             + "; llama-server runs its default f16 KV cache (no -ctk/-ctv given)."]
    for mix in (mix for mix in results["mixes"] if mix["servers"]):
        lines += ["", f"## {mix['prompt']} prompt tokens, {mix['generate']} generated per request", "",
                  "| server | streams | tok/s | steady tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
                  "| RSS MB | engine busy | rows/step |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, rows in mix["servers"].items():
            for r in rows:
                rss = f"{r['rss_bytes'] / 1e6:.0f}" if r.get("rss_bytes") else "-"
                eng = r.get("engine")
                busy = f"{eng['busy']:.1%}" if eng else "-"
                per_step = f"{eng['decode_rows_per_step']}" if eng else "-"
                steady = r.get("steady_tokens_per_s") or "-"
                lines.append(f"| {name} | {r['streams']} | {r['tokens_per_s']} | {steady} | {r['ttft_ms_p50']} "
                             f"| {r['ttft_ms_p99']} | {r['itl_ms_p50']} | {r['itl_ms_p99']} | {rss} | {busy} "
                             f"| {per_step} |")
        ours = {r["streams"]: r["tokens_per_s"] for r in mix["servers"].get("bitnet serve", [])}
        if ours.get(1):
            lines += ["", "Aggregate speed-up over one stream (bitnet serve): " +
                      ", ".join(f"{s} streams {v / ours[1]:.2f}x" for s, v in ours.items() if s != 1)]
        if mix.get("bytes_per_slot") is not None:
            lines += ["", f"Memory: {mix['bytes_per_slot']} bytes per extra slot (RSS, {m['parallel']} slots after "
                          f"{max(m['streams'])} streams against 1 slot after the same requests one at a time); the KV "
                          f"cache of the {mix['prompt'] + mix['generate']} positions a request fills is "
                          f"{mix['kv_bytes_used_per_slot']} bytes."]
        if mix.get("targets"):
            lines += ["", targets_line(mix["targets"])]
        if "llama_server_error" in mix:
            lines += ["", f"llama-server failed during the run: {mix['llama_server_error']}"]
    ref = results.get("e2e")
    if ref:
        lines += ["", f"## Without the server\n\n`bitnet bench --what e2e --prompts {REFERENCE_PROMPT} --generate "
                      f"{REFERENCE_GENERATE} --threads {m['threads']} --kv-cache {m.get('kv_cache', DEFAULT_KV_CACHE)}` on the "
                      f"same file, medians of {ref['repeats']} "
                      f"runs: pp{REFERENCE_PROMPT} {ref[f'pp{REFERENCE_PROMPT}']} tok/s, tg{REFERENCE_GENERATE} "
                      f"{ref[f'tg{REFERENCE_GENERATE}']} tok/s."]
    steps = results.get("engine_steps")
    if steps:
        lines += ["", f"## Engine steps (no HTTP; {steps['cached_positions']} positions cached per sequence, medians "
                      f"of {steps['repeats']} interleaved rounds)", "",
                  "| rows M | decode step ms | decode tok/s | x one-row step | prefill chunk ms | prefill tok/s |",
                  "|---:|---:|---:|---:|---:|---:|"]
        one = next((r["decode_step_ms"] for r in steps["rows"] if r["rows"] == 1), None)
        for r in steps["rows"]:
            x = f"{r['decode_step_ms'] / one:.2f}" if one else "-"
            lines.append(f"| {r['rows']} | {r['decode_step_ms']} | {r['decode_tok_s']} | {x} | {r['prefill_chunk_ms']} "
                         f"| {r['prefill_tok_s']} |")
    return "\n".join(lines) + "\n"


def parse_mixes(text: str) -> list[tuple[int, int]]:
    mixes = []
    for item in text.split(","):
        prompt, sep, generate = item.strip().partition("x")
        if not (sep and prompt.isdigit() and generate.isdigit() and int(prompt) > 0 and int(generate) > 0):
            raise BitnetError(f"--mix takes PROMPTxGENERATE items such as 128x64, got {item!r}")
        mixes.append((int(prompt), int(generate)))
    return mixes


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a packed model file (default: the synthetic --shape)")
    p.add_argument("--shape", default="2b4t", help="synthetic model shape (bitnet_cli.arch presets)")
    p.add_argument("--embeddings", default="f16", help="head of the synthetic model: f16, int8, q6 or q4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,4,8,16", help="concurrency levels, comma-separated ('': the engine steps only)")
    p.add_argument("--parallel", type=int, help="server slots (default: the largest level)")
    p.add_argument("--mix", default="128x64,32x256",
                   help="request mixes PROMPTxGENERATE (prompt tokens x generated tokens), comma-separated")
    p.add_argument("--requests", type=int, default=2, help="requests per stream, one after another")
    p.add_argument("--sampled", action="store_true", help="requests sample with the server's defaults "
                   "(temperature 1, no top-k) instead of greedy decoding")
    p.add_argument("--ctx-size", type=int, default=1024, help="context per slot")
    p.add_argument("--steps", default="1,4,8,16", help="rows of the engine-level decode steps ('' to skip)")
    p.add_argument("--step-repeats", type=int, default=5, help="interleaved rounds of each engine step")
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary, to run side by side")
    p.add_argument("--fresh-gguf", action="store_true", help="export the GGUF for llama-server again")
    p.add_argument("--kv-cache", default=DEFAULT_KV_CACHE, help="our KV cache element type (`bitnet serve --kv-cache`): "
                   "f32 or f16, llama-server's default")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    kv_cache_type(args.kv_cache)
    args.streams = [int(s) for s in args.streams.split(",") if s.strip()]  # none: the engine steps only
    args.steps = [int(s) for s in args.steps.split(",") if s.strip()]
    args.parallel = args.parallel or max(args.streams, default=1)
    args.mixes = parse_mixes(args.mix)
    if any(prompt + generate > args.ctx_size for prompt, generate in args.mixes):
        raise BitnetError("every --mix's prompt + generated tokens must fit --ctx-size")

    if args.model:
        tgt = target.from_file(args.model)
    else:
        tgt = target.from_shape(args.shape, args.embeddings)
    packed = tgt.ensure_file(progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    vocab = int(tgt.config["vocab_size"])
    kv_token = kv_bytes_per_position(ModelDims.from_config(tgt.config), args.kv_cache)
    load = os.getloadavg()[0]
    results: dict = {"mixes": [{"prompt": pr, "generate": g, "servers": {}} for pr, g in args.mixes]}
    if args.steps:
        results["engine_steps"] = engine_steps(packed, args, vocab)
    results["e2e"] = e2e_reference(packed, args)
    kv_slot = run_servers(packed, args, vocab, kv_token, results) if args.streams else None
    for mix in results["mixes"]:
        mix["targets"] = targets(mix, results["e2e"])
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python " + " ".join([sys.argv[0], *argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "load_average": round(load, 2), "load_average_end": round(os.getloadavg()[0], 2), "model": tgt.name, "embeddings": tgt.embeddings, "threads": args.threads,
        "parallel": args.parallel, "ctx_size": args.ctx_size, "streams": args.streams, "requests": args.requests, "sampled": args.sampled,
        "kv_cache": args.kv_cache, "kv_bytes_per_slot": kv_slot, "kv_bytes_per_token": kv_token,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "SERVE_LOAD.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    run_script(main)
