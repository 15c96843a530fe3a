"""Race llama.cpp or bitnet.cpp and bitnet-cli side by side on this machine, in one run, on the same 2B4T-shaped model.

    python benchmarks/compare_llamacpp.py --llama-bench PATH [--llama-quantize PATH] [--threads 1,2] [--repeat 3]
    python benchmarks/compare_llamacpp.py --runtime bitnet.cpp --llama-bench BITNET_CPP/build/bin/llama-bench

Both sides run the synthetic 2B4T shape (the file `bitnet bench --shape 2b4t` uses), the other
runtime from our own GGUF export of it (`bitnet pack --to gguf`), head for head. llama.cpp (TQ2_0):
  ours f16 head   vs  TQ2_0 + f16 head   (export of the f16 file)
  ours int8 head  vs  TQ2_0 + Q8_0 head  (export of the int8 file: the same int8 values)
  ours int8 head  vs  TQ2_0 + Q6_K head  (llama-quantize of the f16 export: their usual small head)
  ours q4 head    vs  TQ2_0 + Q4_K head  (llama-quantize of the f16 export: the nearest size, 4.5 bits)
bitnet.cpp (I2_S, `--gguf-type i2_s`, the layout its x86 build reads):
  ours f16 head   vs  I2_S + f16 head    (bitnet.cpp's default)
  ours int8 head  vs  I2_S + Q6_K head   (its llama-quantize of the f16 export: I2_S tensors copied, the
                                          head made Q6_K by ggml's own quantiser, which is faster than ours)
  ours <6-bit type> head vs I2_S + Q6_K head, for each 6-bit-class type in our head traits table
Each round runs, per thread count and pair, one llama-bench (`-p 128 -n 64 -r 1`) then one of our
e2e workers (pp128, tg64), so drift in the machine's load hits both sides alike; the memory-read
bandwidth is measured before every pair too. Figures are medians over the rounds (min-max beside).
Writes COMPARE.md and compare.json (COMPARE_BITNETCPP.md and compare_bitnetcpp.json for bitnet.cpp)
next to this script (or --out), and with --plot PNG the thread scaling of both sides (pp128, tg64 per
pair). Run it on an idle machine.

    python benchmarks/compare_llamacpp.py --render t16.json t8.json t2.json --out DIR --plot DIR/scaling.png

merges runs of other thread counts (one run per thread count keeps each finished count's figures when
a time limit stops the next one) into one report and JSON, and plots them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from bitnet_cli.bench import roofline, suite, target
from bitnet_cli.bench.anchors import (GENERATE, PROMPT, cpu_busy_fraction, llama_bench_once, ours_once, report_header,
                                      write_with_tool)
from bitnet_cli.bench.shapes import bytes_per_token
from bitnet_cli.bench.stats import summarize
from bitnet_cli.errors import BitnetError, run_script
from bitnet_cli.gguf.reader import GGUFFile
from bitnet_cli.pack.embeddings import EMBEDDING_TYPES
from bitnet_cli.pack.gguf import export_gguf
from run import _stat, _table  # the sibling script's markdown helpers

HERE = Path(__file__).resolve().parent
SHAPE = "2b4t"
BANDWIDTH_REPEAT = 3
BUSY_CPU = 0.25  # CPU busy with other work just before the run, above which the figures are only trials



@dataclass(frozen=True)
class Runtime:
    """One runtime we race: the GGUF type its ternary weights get and the pairs, head for head."""

    name: str
    weights: str  # ggml type name of every ternary weight in its file
    gguf_type: str  # our exporter's --gguf-type for it
    # (pair name, our embeddings, the embeddings of the packed file their GGUF is exported from, their head)
    pairs: tuple[tuple[str, str, str, str], ...]
    quantize_heads: tuple[str, ...]  # heads made by its llama-quantize from the f16 export (others: our exporter)
    report: str  # file stem of the written report: <REPORT>.md and <report>.json
    layout: str  # how the ternary weights are stored in its file, for the report


RUNTIMES = {
    "llama.cpp": Runtime("llama.cpp", "TQ2_0", "tq2_0", (
        ("f16 head", "f16", "f16", "f16"),
        ("int8 head vs Q8_0", "int8", "int8", "q8_0"),
        ("int8 head vs Q6_K", "int8", "f16", "q6_k"),
        ("q4 head vs Q4_K", "q4", "f16", "q4_k"),
    ), ("q6_k", "q4_k"), "compare", "TQ2_0, d = 1, gamma as a separate F32 scale tensor"),
    "bitnet.cpp": Runtime("bitnet.cpp", "I2_S", "i2_s", (
        ("f16 head", "f16", "f16", "f16"),
        ("int8 head vs Q6_K", "int8", "f16", "q6_k"),
        *((f"{name} head vs Q6_K", name, "f16", "q6_k") for name in EMBEDDING_TYPES if name.startswith("q6")),
    ), ("q6_k",), "compare_bitnetcpp", "I2_S: 2-bit codes in 128-value blocks, the tensor's f32 scale after them"),
}


def gguf_tensor_types(path: Path) -> dict:
    """{ggml type name: tensor count} and the token embedding's (= the tied head's) type. Our own reader:
    pip's gguf does not know bitnet.cpp's I2_S."""
    with GGUFFile.open(path) as f:
        tensors = list(f.tensors.values())
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    head = next(t.type_name for t in tensors if t.name == "token_embd.weight")
    return {"counts": counts, "head": head, "tensor_bytes": sum(t.nbytes for t in tensors)}


def packed_file(embeddings: str) -> Path:
    """Our cached synthetic 2B4T file (written once)."""
    return target.from_shape(SHAPE, embeddings).ensure_file(
        progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))


def their_file(runtime: Runtime, source: Path, head: str, quantize: str | None) -> Path:
    """The GGUF for the other runtime, exported from our file (and quantized) once, cached beside it."""
    exported = source.with_suffix(f".{runtime.gguf_type}.gguf")  # head: F16 from f16 rows, Q8_0 from int8 ones
    if not exported.exists():
        print(f"  exporting {exported.name}", file=sys.stderr, flush=True)
        export_gguf(source, exported, runtime.gguf_type)
    if head not in runtime.quantize_heads:
        return exported
    out = source.with_suffix(f".{runtime.gguf_type}-{head}.gguf")
    if not out.exists():
        if not quantize:
            raise BitnetError(f"{out} is not made yet: the {head.upper()}-head pair needs --llama-quantize PATH once")
        print(f"  llama-quantize {out.name}", file=sys.stderr, flush=True)
        write_with_tool(out, lambda tmp: [quantize, "--allow-requantize", "--token-embedding-type", head,
                                          str(exported), str(tmp), runtime.weights])
    return out


def check_types(runtime: Runtime, path: Path, head: str) -> dict:
    """What the file really holds: the expected head type and the runtime's type for every ternary weight."""
    types = gguf_tensor_types(path)
    if types["head"].lower() != head:
        raise BitnetError(f"{path}: token_embd.weight is {types['head']}, expected {head.upper()}")
    unexpected = set(types["counts"]) - {runtime.weights, "F32", types["head"]}
    if unexpected:
        raise BitnetError(f"{path}: unexpected tensor types {sorted(unexpected)} "
                          f"(expected {runtime.weights}, F32, {types['head']})")
    return types


def measure(args, threads: list[int]) -> dict:
    files = {}
    runtime = RUNTIMES[args.runtime]
    pairs = [pair for pair in runtime.pairs if args.pairs is None or pair[0] in args.pairs]
    for name, emb, source, head in pairs:
        theirs = their_file(runtime, packed_file(source), head, args.llama_quantize)
        files[name] = {"ours": packed_file(emb), "theirs": theirs, "their_types": check_types(runtime, theirs, head)}

    results = {"machine": suite.machine() | {"cpu_busy_before": cpu_busy_fraction()},
               "settings": {"threads": threads, "rounds": args.repeat, "prompt": PROMPT, "generate": GENERATE}}
    samples: dict = {}
    bandwidth: dict = {th: [] for th in threads}
    build = None
    for r in range(args.repeat):
        for th in threads:
            for name, *_ in pairs:
                print(f"  round {r + 1}/{args.repeat}, {th} thread(s), {name}", file=sys.stderr, flush=True)
                bandwidth[th].append(roofline.measure_bandwidth(th, BANDWIDTH_REPEAT)["median"])
                f = files[name]
                theirs = llama_bench_once(args.llama_bench, f["theirs"], th)
                build = theirs["build"]
                ours = ours_once(f["ours"], th)
                for side, rates in (("theirs", theirs["rates"]), ("ours", ours)):
                    for test, rate in rates.items():
                        samples.setdefault((name, th, side, test), []).append(rate)
    results["machine"]["load_average_end"] = round(os.getloadavg()[0], 2)
    results["runtime"], results["their_build"] = runtime.name, build
    results["bandwidth_gbps"] = {str(th): summarize(v) for th, v in bandwidth.items()}

    rows = []
    for name, emb, *_ in pairs:
        f = files[name]
        our_bytes = bytes_per_token(target.from_shape(SHAPE, emb).config, emb)["total"]
        their_bytes = f["their_types"]["tensor_bytes"]  # the tied head is read in full: every tensor once
        for th in threads:
            bw = results["bandwidth_gbps"][str(th)]["median"]
            ceiling = {"ours": 1e9 * bw / our_bytes, "theirs": 1e9 * bw / their_bytes}
            row = {"pair": name, "threads": th, "ours_file": str(f["ours"]), "theirs_file": str(f["theirs"]),
                   "ours_bytes": f["ours"].stat().st_size, "theirs_bytes": f["theirs"].stat().st_size,
                   "their_types": f["their_types"], "ours_bytes_per_token": our_bytes,
                   "theirs_bytes_per_token": their_bytes}
            for test in (f"pp{PROMPT}", f"tg{GENERATE}"):
                for side in ("ours", "theirs"):
                    row[f"{side}_{test}"] = summarize(samples[(name, th, side, test)])
                row[f"{test}_ratio"] = row[f"ours_{test}"]["median"] / row[f"theirs_{test}"]["median"]
            for side in ("ours", "theirs"):
                row[f"{side}_pct_of_ceiling"] = 100.0 * row[f"{side}_tg{GENERATE}"]["median"] / ceiling[side]
            rows.append(row)
    results["rows"] = rows
    return results


def markdown(results: dict, command: str, note: str | None) -> str:
    m, s = results["machine"], results["settings"]
    runtime = RUNTIMES[results.get("runtime", "llama.cpp")]
    build = results.get("their_build") or results["llama_cpp"]  # the key of reports written before --runtime
    pp, tg = f"pp{s['prompt']}", f"tg{s['generate']}"
    busy = m.get("cpu_busy_before")
    generated, machine = report_header(results, command, ", per pair and thread count")
    parts = [
        f"# bitnet-cli vs {runtime.name}, side by side",
        generated,
        machine + "\n"
        f"- {runtime.name}: build {build['build_commit']} ({build['build_number']}), backends {build['backends']}, "
        f"CPU {build['cpu_info']}\n"
        "- Model: synthetic 2B4T shape (random trits; speed does not depend on the values), "
        f"{runtime.name} running our GGUF export ({runtime.layout})",
    ]
    if busy is not None and busy > BUSY_CPU:
        parts.append(f"> **Busy machine** ({100 * busy:.0f}% of the CPU busy before the run): other work shared the "
                     "cores and the memory bandwidth, so these are trial figures, not results.")
    if note:
        parts.append(f"> {note}")
    parts += ["## Files", _table(
        ["pair", "our file MB", "their file MB", "their tensor types", "bytes/token ours MB", "theirs MB"],
        [[r["pair"], f"{r['ours_bytes'] / 1e6:,.0f}", f"{r['theirs_bytes'] / 1e6:,.0f}",
          ", ".join(f"{k} x{v}" for k, v in sorted(r["their_types"]["counts"].items())),
          f"{r['ours_bytes_per_token'] / 1e6:,.0f}", f"{r['theirs_bytes_per_token'] / 1e6:,.0f}"]
         for r in results["rows"] if r["threads"] == s["threads"][0]])]
    parts += ["## Read bandwidth (measured before every pair)", _table(
        ["threads", "GB/s"], [[th, _stat(bw)] for th, bw in results["bandwidth_gbps"].items()])]
    parts += ["## Speed (tokens/s)", "% of ceiling: tg over (read bandwidth / bytes each side streams per token).",
              _table(["pair", "threads", f"ours {pp}", f"theirs {pp}", "x", f"ours {tg}", f"theirs {tg}", "x",
                      "ours % of ceiling", "theirs % of ceiling"],
                     [[r["pair"], str(r["threads"]), _stat(r[f"ours_{pp}"]), _stat(r[f"theirs_{pp}"]),
                       f"{r[f'{pp}_ratio']:.2f}x", _stat(r[f"ours_{tg}"]), _stat(r[f"theirs_{tg}"]),
                       f"{r[f'{tg}_ratio']:.2f}x", f"{r['ours_pct_of_ceiling']:.0f}%",
                       f"{r['theirs_pct_of_ceiling']:.0f}%"] for r in results["rows"]])]
    return "\n\n".join(parts) + "\n"


def merge_runs(runs: list[dict]) -> dict:
    """One report's results from runs of the same runtime and pairs at other thread counts: rows and
    bandwidths side by side; per-run facts (command, date, load) joined in run order."""
    first = runs[0]
    for r in runs[1:]:
        if r.get("runtime") != first.get("runtime") or r["settings"]["rounds"] != first["settings"]["rounds"]:
            raise BitnetError("--render: the runs differ in runtime or rounds; merge only runs of one race")
    seen = [(row["pair"], row["threads"]) for r in runs for row in r["rows"]]
    if len(seen) != len(set(seen)):
        raise BitnetError("--render: two runs measured the same pair at the same thread count")
    pairs = list(dict.fromkeys(row["pair"] for r in runs for row in r["rows"]))
    threads = sorted({th for r in runs for th in r["settings"]["threads"]})
    machine = dict(first["machine"])
    for key in ("date", "load_average", "load_average_end"):
        machine[key] = " / ".join(str(r["machine"][key]) for r in runs)
    busy = [r["machine"].get("cpu_busy_before") for r in runs]
    machine["cpu_busy_before"] = None if None in busy else max(busy)
    return first | {
        "machine": machine, "settings": first["settings"] | {"threads": threads},
        "command": " ; ".join(r["command"] for r in runs),
        "bandwidth_gbps": dict(sorted(((t, bw) for r in runs for t, bw in r["bandwidth_gbps"].items()),
                                      key=lambda item: int(item[0]))),
        "rows": sorted((row for r in runs for row in r["rows"]), key=lambda row: (pairs.index(row["pair"]),
                                                                                   row["threads"])),
    }


def plot_scaling(results: dict, out: Path) -> Path:
    """pp and tg tokens/s against threads, ours (solid, filled dots) and theirs (dashed, open squares:
    a legend shows the marker, not the dash) per pair, min-max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rows = results["settings"], results["rows"]
    theirs = results.get("runtime", "llama.cpp")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, test in zip(axes, (f"pp{s['prompt']}", f"tg{s['generate']}")):
        for i, pair in enumerate(dict.fromkeys(r["pair"] for r in rows)):
            mine = sorted((r for r in rows if r["pair"] == pair), key=lambda r: r["threads"])
            xs = [r["threads"] for r in mine]
            for side, style, marker, label in (("ours", "-", "o", "bitnet-cli"), ("theirs", "--", "s", theirs)):
                stats = [r[f"{side}_{test}"] for r in mine]
                ys = [st["median"] for st in stats]
                ax.errorbar(xs, ys, yerr=[[y - st["min"] for y, st in zip(ys, stats)],
                                          [st["max"] - y for y, st in zip(ys, stats)]],
                            ls=style, marker=marker, mfc="none" if side == "theirs" else None, capsize=3,
                            color=f"C{i}", label=f"{label}, {pair}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(s["threads"], [str(t) for t in s["threads"]])
        ax.set(title=f"{test} (median of {s['rounds']} rounds)", xlabel="threads", ylabel="tokens/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"bitnet-cli vs {theirs}: {results['machine']['cpu']}, 2B4T shape", fontsize=10)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", choices=sorted(RUNTIMES), default="llama.cpp", help="the runtime to race")
    parser.add_argument("--llama-bench", help="path to that runtime's llama-bench (required unless --render)")
    parser.add_argument("--llama-quantize", help="path to that runtime's llama-quantize (makes its Q6_K- and "
                        "Q4_K-head files once)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--pairs", help="comma-separated pair names to run (default: all of the runtime's)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--note", help="a remark printed under the header, e.g. how busy the machine was")
    parser.add_argument("--render", type=Path, nargs="+", help="only rewrite the report from its .json, or "
                        "merge the .json of runs at other thread counts into one (no measuring)")
    parser.add_argument("--plot", type=Path, help="also write a PNG of the thread scaling, both sides")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        raise BitnetError(f"--out {args.out}: not a directory")
    if args.plot and not args.plot.parent.is_dir():
        raise BitnetError(f"--plot {args.plot}: directory {args.plot.parent} does not exist")
    if args.render:
        runs = []
        for path in args.render:
            try:
                runs.append(json.loads(path.read_text()))
            except (OSError, ValueError) as e:
                raise BitnetError(f"--render {path}: {e}") from None
        results = merge_runs(runs) if len(runs) > 1 else runs[0]
        stem = RUNTIMES[results.get("runtime", "llama.cpp")].report
        report = args.out / f"{stem.upper()}.md"
        report.write_text(markdown(results, results["command"], args.note))
        if len(runs) > 1:
            (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
        if args.plot:
            plot_scaling(results, args.plot)
        print(f"wrote {report}" + (f" and {args.plot}" if args.plot else ""))
        return 0
    if not args.llama_bench:
        raise BitnetError("--llama-bench PATH is required (or --render REPORT.json)")
    threads = suite.parse_int_list(args.threads, "--threads")
    if args.pairs is not None:
        args.pairs = args.pairs.split(",")
        known = [pair[0] for pair in RUNTIMES[args.runtime].pairs]
        if not args.pairs or set(args.pairs) - set(known):
            raise BitnetError(f"--pairs: {args.runtime}'s pairs are {', '.join(map(repr, known))}")
    if args.repeat < 1:
        raise BitnetError(f"--repeat must be at least 1, got {args.repeat}")
    for tool in (args.llama_bench, args.llama_quantize):
        if tool and not os.access(tool, os.X_OK):
            raise BitnetError(f"{tool}: not an executable file")
    results = measure(args, threads)
    command = results["command"] = shlex.join(["python", "benchmarks/compare_llamacpp.py", *argv])
    stem = RUNTIMES[args.runtime].report
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{stem.upper()}.md").write_text(markdown(results, command, args.note))
    if args.plot:
        plot_scaling(results, args.plot)
    print(f"wrote {args.out / f'{stem.upper()}.md'} and {stem}.json" + (f" and {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    run_script(main)
