"""Rich tables for a `bitnet bench` result dict (the same dict `--json` prints)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape

from bitnet_cli.bench import anchors
from bitnet_cli.tables import Table


def _stat(s: dict, fmt: str = "{:.1f}") -> str:
    """'median (min-max)' when there was more than one run."""
    text = fmt.format(s["median"])
    if s.get("n", 1) > 1:
        text += f" [dim]({fmt.format(s['min'])}-{fmt.format(s['max'])})[/]"
    return text


def fmt_bytes(n: int) -> str:
    """Bytes in MB, or kB/GB where MB would read 0 or need more than four digits."""
    if n < 1e6:
        return f"{n / 1e3:,.0f} kB"
    return f"{n / 1e6:,.0f} MB" if n < 1e10 else f"{n / 1e9:,.1f} GB"


def print_report(results: dict, console: Console) -> None:
    m, model = results["machine"], results["model"]
    per_token = model["bytes_per_token"]
    console.print(f"[bold]{escape(model['name'])}[/] ({model['embeddings']} embeddings, {model.get('layout', 'i2')} ternary "
                  f"layout) on {m['cpu']}, "
                  f"{m['logical_cpus']} logical CPUs, kernels: {', '.join(m['isas']) or 'not built'}; "
                  f"load average {m.get('load_average')}; median of {results['settings']['repeat']} run(s), "
                  "(min-max) in grey")
    if "isa" in results["settings"]:
        console.print(f"instruction set: {isa_summary(results['settings']['isa'], model.get('layout', 'i2'))}",
                      soft_wrap=True)
    if "e2e" in results and "kv_cache" in results["settings"]:  # results saved before --kv-cache lack it
        console.print(f"KV cache: {results['settings']['kv_cache']} (--kv-cache)")
    console.print(f"bytes streamed per decoded token: {fmt_bytes(per_token['total'])} = ternary {fmt_bytes(per_token['ternary'])}"
                  f" + head {fmt_bytes(per_token['head'])} + norms {fmt_bytes(per_token['norms'])}")
    if "roofline" in results:
        _roofline(results, console)
    if "kernels" in results:
        _kernels(results["kernels"], console)
    if "e2e" in results:
        _e2e(results, console)
        if results["settings"].get("clipped"):
            console.print(f"[yellow]note:[/] e2e lengths cut to the model's context window: "
                          f"{', '.join(results['settings']['clipped'])}", soft_wrap=True)
    if results["summary"].get("time_per_token"):
        _time_per_token(results["summary"]["time_per_token"], console)
    if results["summary"].get("anchors"):
        _anchors(results["summary"]["anchors"], results["settings"], console)
    if results["summary"].get("layouts"):
        _layouts(results["summary"]["layouts"], console)


ISA_SOURCES = {"option": "--isa", "env": "$BITNET_ISA", "rule": "the rule (the widest this CPU has)",
               "cache": "the autotune, cached", "autotune": "the autotune, measured now",
               "busy": "the rule (the autotune met other load; the next run measures again)"}


def isa_summary(choice: dict, layout: str) -> str:
    """'avx2, from the rule ...' or 'avx2 for 1 token, avx512vnni for more, from the autotune ...'."""
    ops = choice["choice"][layout]
    used = ops["gemv"] if ops["gemv"] == ops["gemm"] else f"{ops['gemv']} for 1 token, {ops['gemm']} for more"
    return f"{used}, chosen by {ISA_SOURCES[choice['source']]}"


def _pct(value: float, goal: float = 85.0) -> str:
    """A percent of the roofline, green once it reaches the project's goal (issue 6: 85%)."""
    return f"[{'green' if value >= goal else 'yellow'}]{value:.0f}%[/]"


def _roofline(results: dict, console: Console) -> None:
    decode = {d["threads"]: d for d in results["summary"]["decode_vs_roofline"]}
    table = Table(title="Decode roofline: memory-read bandwidth / bytes per token")
    for col in ("threads", "bandwidth GB/s", "decode ceiling tok/s", "measured tg tok/s", "% of ceiling (goal 85%)"):
        table.add_column(col, justify="right")
    for row in results["roofline"]:
        d = decode.get(row["threads"], {})
        table.add_row(str(row["threads"]), _stat(row["bandwidth_gbps"]),
                      f"{row['decode_ceiling_tps']['median']:.1f}",
                      f"{d['tg_tps']:.1f}" if d else "-",
                      _pct(d["pct_of_ceiling"]) if "pct_of_ceiling" in d else "-")
    console.print(table)


def paired_kernels(rows: list[dict]) -> list[dict]:
    """Kernel rows grouped by shape x tokens x threads: {"n", "k", "tokens", "threads", "used_by", impl: row}."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r["n"], r["k"], r["tokens"], r["threads"])
        group = groups.setdefault(key, dict(zip(("n", "k", "tokens", "threads"), key),
                                            used_by=",".join(p.removesuffix("_proj") for p in r["projections"])))
        group[r["impl"]] = r
    return list(groups.values())


def _kernels(rows: list[dict], console: Console) -> None:
    """One line per shape x tokens x threads: ours, then the dense int8 and f32 BLAS comparisons (medians)."""
    isas = sorted({r["backend"] for r in rows if r["impl"] == "ternary"})
    # No vertical rules, one-space gaps and the comparisons as ratios alone: the eleven columns fit 80
    # terminal columns on the 2B4T shapes (GOPS, the comparisons' times and min-max are in --json).
    table = Table(title=f"Kernels per weight shape, medians, weights streamed from DRAM: ternary ({', '.join(isas)}) "
                        "vs dense int8 rows and f32 numpy BLAS (x = their time / ours); % pk = G MAC/s over the "
                        "ISA's measured integer MAC peak x threads",
                  box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("N x K", "used by", "tok", "thr", "us", "GB/s", "% bw", "GMAC/s", "% pk", "int8 x", "f32 x"):
        table.add_column(col, justify="left" if col == "used by" else "right", no_wrap=True)
    for g in paired_kernels(rows):
        ours = g.get("ternary")
        cells = [f"{g['n']}x{g['k']}", g["used_by"], str(g["tokens"]), str(g["threads"])]
        cells += ([f"{ours['seconds']['median'] * 1e6:,.0f}", f"{ours['gbps']['median']:.1f}",
                   f"{ours['pct_of_bandwidth']:.0f}%" if "pct_of_bandwidth" in ours else "",
                   f"{ours['gmacs']['median']:.1f}",
                   f"{ours['pct_of_peak']:.0f}%" if "pct_of_peak" in ours else ""] if ours else ["-"] * 5)
        for impl in ("int8", "f32"):
            dense = g.get(impl)
            cells.append(f"{dense['seconds']['median'] / ours['seconds']['median']:.1f}x" if ours and dense else "-")
        table.add_row(*cells)
    console.print(table)


def _e2e(results: dict, console: Console) -> None:
    rows = results["e2e"]
    table = Table(title=f"End to end ({fmt_bytes(results['model'].get('file_bytes', 0))} file), tokens/s")
    names = list(rows[0]["tokens_per_s"]) if rows else []
    for col in ["threads", "load s", *names, "peak RSS"]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["threads"]), _stat(r["load_s"], "{:.2f}"),
                      *(_stat(r["tokens_per_s"][n]) for n in names), fmt_bytes(r["peak_rss_bytes"]))
    console.print(table)


def _time_per_token(rows: list[dict], console: Console) -> None:
    table = Table(title="Where a token's time goes (estimate): ternary products timed in the kernel section vs "
                        "the rest (head, attention, norms, overhead)")
    for col in ("threads", "test", "ms per token", "ternary ms", "share", "rest ms"):
        table.add_column(col, justify="left" if col == "test" else "right")
    for r in rows:
        share = f"{r['ternary_pct']:.0f}%" if "ternary_pct" in r else "n/a *"
        rest = f"{r['rest_ms']:.3g}" if "rest_ms" in r else "n/a *"
        table.add_row(str(r["threads"]), r["test"], f"{r['total_ms']:.3g}", f"{r['ternary_ms']:.3g}", share, rest)
    console.print(table)
    if any("ternary_pct" not in r for r in rows):
        console.print("[dim]* n/a: the kernels alone, timed with their weights streamed from DRAM, took longer than "
                      "the whole token in the engine (a model that stays in cache, or noise between the runs), so "
                      "the split cannot be estimated[/]", soft_wrap=True)


def _layouts(comparison: dict, console: Console) -> None:
    """The ternary layouts of one run side by side (`--layout i2,tq1`); x = the first layout's
    time / this one's (above 1: this layout is faster)."""
    first, others = comparison["layouts"][0], comparison["layouts"][1:]
    rows = comparison["e2e"]
    if rows:
        tests = list(rows[0]["tokens_per_s"])
        tg = next(t for t in tests if t.startswith("tg"))
        table = Table(title=f"Ternary layouts end to end, tokens/s (x = {tg} against {first})")
        for col in ("threads", "layout", "bytes/token", *tests, "% of ceiling", "x"):
            table.add_column(col, justify="left" if col == "layout" else "right")
        base = {r["threads"]: r for r in rows if r["layout"] == first}
        for r in rows:
            ref = base.get(r["threads"])
            table.add_row(str(r["threads"]), r["layout"], fmt_bytes(r["bytes_per_token"]),
                          *(f"{r['tokens_per_s'][t]:.1f}" for t in tests),
                          _pct(r["pct_of_ceiling"]) if "pct_of_ceiling" in r else "-",
                          f"{r['tokens_per_s'][tg] / ref['tokens_per_s'][tg]:.2f}" if ref else "-")
        console.print(table)
    if comparison["kernels"]:
        table = Table(title=f"Ternary layouts per weight shape, us per call (x = {first}'s time / the layout's)",
                      box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
        for col in ("N x K", "used by", "tok", "thr", *(f"{l} us" for l in comparison["layouts"]),
                    *(f"{l} x" for l in others)):
            table.add_column(col, justify="left" if col == "used by" else "right", no_wrap=True)
        for g in comparison["kernels"]:
            sec = g["seconds"]
            table.add_row(f"{g['n']}x{g['k']}", ",".join(p.removesuffix("_proj") for p in g["used_by"]),
                          str(g["tokens"]), str(g["threads"]),
                          *(f"{sec[l] * 1e6:,.0f}" if l in sec else "-" for l in comparison["layouts"]),
                          *(f"{sec[first] / sec[l]:.2f}" if first in sec and l in sec else "-" for l in others))
        console.print(table)


def anchor_label(row: dict) -> str:
    """'llama.cpp TQ2_0/Q6_K': runtime, weight type and output-head type."""
    return f"{row['runtime']} {row['weights'].split()[0]}" + (f"/{row['head']}" if row["head"] else "")


def _anchors(comparison: dict, settings: dict, console: Console) -> None:
    tg = f"tg{settings['generate']}"
    table = Table(title="Against other runtimes on this shape (x = ours / theirs)",
                  caption=f"theirs: {comparison['source']}, {comparison['date']}")
    table.add_column("runtime weights/head", min_width=max(len(anchor_label(r)) for r in comparison["rows"]))
    for col in ("thr", "pp128\ntheirs", "pp128\nours", "x", "tg64\ntheirs", f"{tg}\nours", "x"):
        table.add_column(col, justify="right")
    for r in comparison["rows"]:
        ratio = lambda key: f"[{'green' if r[key] >= 1 else 'red'}]{r[key]:.2f}[/]" if key in r else "-"
        value = lambda key: f"{r[key]:.1f}" if key in r else "-"
        table.add_row(escape(anchor_label(r)), str(r["threads"]),
                      value("anchor_pp128"), value("ours_pp128"), ratio("pp128_ratio"),
                      value("anchor_tg64"), value(f"ours_{tg}"), ratio("tg_ratio"))
    console.print(table)
    (lo1, hi1), (lo2, hi2) = anchors.BANDWIDTH_GBPS[1], anchors.BANDWIDTH_GBPS[2]
    console.print(f"[dim]their machine's read bandwidth: {lo1:.0f}-{hi1:.0f} GB/s at 1 thread, "
                  f"{lo2:.0f}-{hi2:.0f} GB/s at 2: compare only on similar hardware[/]")
