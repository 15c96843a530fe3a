"""Load test of `bitnet serve` (and llama.cpp's `llama-server` side by side): aggregate generated
tokens/s with 1, 4, 8 and 16 concurrent streams, and p50/p99 time to first token and inter-token
latency at each level.

    python benchmarks/serve_load.py --shape 2b4t --threads 2 [--streams 1,4,8,16] \\
        [--llama-server /tmp/anchors/llama.cpp/build/bin/llama-server] [--out DIR]
    python benchmarks/serve_load.py --shape tiny --threads 1 --prompt 32 --generate 16   # a quick check

The model is the synthetic shape `bitnet bench --shape` uses (random trits: speed does not depend
on the values), or --model FILE. llama-server gets our own GGUF export of the same file (TQ2_0,
`bitnet pack --to gguf`) and the same --parallel, --threads and context per slot. Each stream is a
client that sends --requests streaming completions one after another: a fresh random prompt of
--prompt token ids (so no prefix is shared) and --generate tokens, greedy, through end-of-sequence
tokens (`ignore_eos`), so both servers do the same work. Levels run in increasing order, each
server in turn, after a warm-up request. Figures:
  tok/s          generated tokens of all streams / the level's wall time
  TTFT p50/p99   request sent -> first token's chunk
  ITL p50/p99    gaps between consecutive token chunks of one stream (a server that sends several
                 tokens in one chunk shows fewer, longer gaps)
  RSS            the server's resident memory after the level (weights + KV caches in use)
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
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bitnet_cli.bench import target
from bitnet_cli.errors import BitnetError, run_script

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class ServerProcess:
    """A server subprocess, its base URL, and how to stop it."""

    def __init__(self, name: str, cmd: list[str], url: str | None, env=None):
        self.name, self.cmd = name, cmd
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        self.url = url
        self.info: dict = {}

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
                raise BitnetError(f"{self.name} exited with {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise BitnetError(f"{self.name} did not become ready in {timeout:.0f} s")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.returncode


def start_ours(model: Path, args) -> ServerProcess:
    cmd = [sys.executable, "-m", "bitnet_cli.cli", "serve", str(model), "--port", "0", "--json",
           "--threads", str(args.threads), "--parallel", str(args.parallel), "--ctx-size", str(args.ctx_size),
           "--max-queue", str(max(args.streams) * 2)]
    s = ServerProcess("bitnet serve", cmd, None)
    line = s.proc.stdout.readline()
    if not line:
        raise BitnetError(f"bitnet serve did not start: {s.proc.stderr.read()[-2000:]}")
    s.info = json.loads(line)
    s.url = s.info["url"].removesuffix("/v1")
    s.wait_ready()
    return s


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_llama(binary: str, gguf: Path, args) -> ServerProcess:
    port = free_port()
    # llama-server divides -c among its slots: the same context per sequence as ours
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
           "-tb", str(args.threads), "--parallel", str(args.parallel), "-c", str(args.ctx_size * args.parallel),
           "--cont-batching", "--no-warmup"]
    s = ServerProcess("llama-server", cmd, f"http://127.0.0.1:{port}")
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


def one_request(client: httpx.Client, url: str, prompt: list[int], generate: int, model: str) -> dict:
    """One streaming completion: send time, and the arrival time of every token chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": generate, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
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


def run_level(url: str, model: str, streams: int, args, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(2, vocab, args.prompt)] for _ in range(streams * args.requests)]
    results: list[list[dict]] = [[] for _ in range(streams)]
    errors: list[BaseException] = []

    def client_loop(i: int) -> None:
        try:
            with httpx.Client(timeout=None) as client:
                for k in range(args.requests):
                    results[i].append(one_request(client, url, prompts[i * args.requests + k], args.generate, model))
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
    ttft = np.array([r["arrivals"][0] - r["sent"] for r in reqs if r["arrivals"]])
    itl = np.concatenate([np.diff(r["arrivals"]) for r in reqs if len(r["arrivals"]) > 1] or [np.zeros(0)])

    def pct(a, q):
        return round(float(np.percentile(a, q)) * 1000, 2) if a.size else None

    return {"streams": streams, "requests": len(reqs), "generated_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
            "short_requests": sum(r["tokens"] != args.generate for r in reqs)}


def bench_server(server: ServerProcess, model: str, args, vocab: int) -> list[dict]:
    print(f"{server.name}: warm-up", file=sys.stderr, flush=True)
    with httpx.Client(timeout=None) as client:
        one_request(client, server.url, list(range(2, 2 + args.prompt)), 4, model)
    rows = []
    for level in args.streams:
        row = run_level(server.url, model, level, args, vocab, seed=level)
        row["rss_bytes"] = server.rss_bytes()
        print(f"{server.name}: {level} streams: {row['tokens_per_s']} tok/s, TTFT p50 {row['ttft_ms_p50']} ms, "
              f"ITL p50 {row['itl_ms_p50']} ms", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# `bitnet serve` under load ({m['date']})", "",
             f"Generated by `{m['command']}` on {m['machine']}. Model: {m['model']} ({m['embeddings']} head), "
             f"{m['threads']} threads, --parallel {m['parallel']}, {m['ctx_size']}-token context per slot; "
             f"each request: {m['prompt']} prompt tokens, {m['generate']} generated, greedy, "
             f"{m['requests']} requests per stream. KV cache: {m['kv_bytes_per_slot']} bytes per slot "
             f"({m['kv_bytes_per_token']} per token).", "",
             "| server | streams | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results["servers"].items():
        for r in rows:
            rss = f"{r['rss_bytes'] / 1e6:.0f}" if r.get("rss_bytes") else "-"
            lines.append(f"| {name} | {r['streams']} | {r['tokens_per_s']} | {r['ttft_ms_p50']} | {r['ttft_ms_p99']} "
                         f"| {r['itl_ms_p50']} | {r['itl_ms_p99']} | {rss} |")
    ours = {r["streams"]: r["tokens_per_s"] for r in results["servers"].get("bitnet serve", [])}
    if 1 in ours and ours[1]:
        lines += ["", "Aggregate speed-up over one stream (bitnet serve): " +
                  ", ".join(f"{s} streams {v / ours[1]:.2f}x" for s, v in ours.items() if s != 1)]
    if "llama_server_error" in results:
        lines += ["", f"llama-server failed during the run: {results['llama_server_error']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a packed model file (default: the synthetic --shape)")
    p.add_argument("--shape", default="2b4t", help="synthetic model shape (bitnet_cli.arch presets)")
    p.add_argument("--embeddings", default="f16", help="head of the synthetic model: f16, int8 or q4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,4,8,16", help="concurrency levels, comma-separated")
    p.add_argument("--parallel", type=int, help="server slots (default: the largest level)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--generate", type=int, default=64, help="generated tokens per request")
    p.add_argument("--requests", type=int, default=2, help="requests per stream, one after another")
    p.add_argument("--ctx-size", type=int, default=1024, help="context per slot")
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary, to run side by side")
    p.add_argument("--fresh-gguf", action="store_true", help="export the GGUF for llama-server again")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    args.parallel = args.parallel or max(args.streams)
    if args.prompt + args.generate > args.ctx_size:
        raise BitnetError("--prompt + --generate must fit --ctx-size")

    if args.model:
        tgt = target.from_file(args.model)
    else:
        tgt = target.from_shape(args.shape, args.embeddings)
    packed = tgt.ensure_file(progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    vocab = int(tgt.config["vocab_size"])
    results = {"servers": {}}
    ours = start_ours(packed, args)
    try:
        model = ours.info["model"]
        results["servers"]["bitnet serve"] = bench_server(ours, model, args, vocab)
    finally:
        ours.stop()
    if args.llama_server:
        theirs = start_llama(args.llama_server, their_gguf(packed, args.fresh_gguf), args)
        try:
            results["servers"]["llama-server"] = bench_server(theirs, "any", args, vocab)
        except (httpx.HTTPError, BitnetError) as e:  # their crash must not lose our figures
            results["llama_server_error"] = f"{type(e).__name__}: {e}"
            print(f"llama-server failed: {results['llama_server_error']}", file=sys.stderr, flush=True)
        finally:
            theirs.stop()
    c = tgt.config
    kv_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]) * 4
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python " + " ".join([sys.argv[0], *argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "model": tgt.name, "embeddings": tgt.embeddings, "threads": args.threads, "parallel": args.parallel,
        "ctx_size": args.ctx_size, "prompt": args.prompt, "generate": args.generate, "requests": args.requests,
        "kv_bytes_per_slot": ours.info["kv_bytes_per_slot"], "kv_bytes_per_token": kv_token,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "SERVE_LOAD.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    run_script(main)
