"""One `bitnet bench` run: the chosen sections over a thread sweep, as one JSON-ready dict.

Sections: `roofline` (memory bandwidth and the decode ceiling), `kernels` (micro-benchmarks
per weight shape) and `e2e` (load, ppN, tgN on the packed file). The summary ties them
together: decode speed as a percent of the ceiling, GEMV bandwidth as a percent of the
measured bandwidth, and, on the 2B4T shape, our figures next to other runtimes'.
"""

from __future__ import annotations

import datetime
import os
import platform

import numpy as np

from bitnet_cli import __version__, kernels
from bitnet_cli.bench import anchors, e2e, micro, roofline
from bitnet_cli.bench.shapes import bytes_per_token
from bitnet_cli.bench.target import Target, context_length, describe
from bitnet_cli.engine import DEFAULT_KV_CACHE, kv_cache_type
from bitnet_cli.errors import BitnetError

SCHEMA = "bitnet-cli/bench/1"
SECTIONS = ("roofline", "kernels", "e2e")


def parse_int_list(text: str, what: str, minimum: int = 1) -> list[int]:
    """'1,2,4' -> [1, 2, 4], with a message naming `what` for anything that is not an int >= minimum."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise BitnetError(f"{what}: {part!r} is not a whole number (expected a list like 1,2,4)") from None
        if value < minimum:
            raise BitnetError(f"{what}: {value} is out of range (must be at least {minimum})")
        if value not in values:
            values.append(value)
    return values


def parse_sections(sections: str) -> list[str]:
    chosen = [s.strip() for s in sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise BitnetError(f"sections: unknown section {', '.join(unknown) or repr(sections)}; choose from "
                          f"{','.join(SECTIONS)}", param="sections")
    return [s for s in SECTIONS if s in chosen]


def machine() -> dict:
    cpu = kernels.cpu_model()
    try:
        from bitnet_cli.bench import kernels_api

        isas = kernels_api.available_isas()
    except BitnetError:
        isas = []
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "isas": isas, "platform": platform.platform(),
        # other work on the machine skews every figure: record how busy it was
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "numpy": np.__version__, "bitnet_cli": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def fit_to_context(prompts: list[int], generate: int, context: int) -> tuple[list[int], int, list[str]]:
    """e2e lengths cut to the model's context window, and what was cut ("pp512 -> pp128", ...)."""
    fitted, clipped = [], []
    for n in prompts:
        if n > context:
            clipped.append(f"pp{n} -> pp{context}")
            n = context
        if n not in fitted:
            fitted.append(n)
    if generate > context:
        clipped.append(f"tg{generate} -> tg{context}")
        generate = context
    return fitted, generate, clipped


def run_layouts(targets: list[Target], threads: list[int], repeat: int, sections: list[str], **kwargs) -> dict:
    """run() on the first target; then, for each other target (the same model in another ternary
    layout, `--layout i2,tq1`), its ternary kernels and e2e under "layouts" (keyed by layout, with
    its own bytes per token and roofline from the bandwidth measured once), and the layouts side
    by side in summary["layouts"]."""
    results = run(targets[0], threads, repeat, sections, **kwargs)
    if len(targets) > 1:
        results["layouts"] = {}
        for target in targets[1:]:
            other = run(target, threads, repeat, sections, impls=("ternary",), bandwidth=results.get("roofline"),
                        **kwargs)
            results["layouts"][target.layout] = {key: other[key] for key in ("model", "roofline", "kernels", "e2e",
                                                                             "summary") if key in other}
        results["summary"]["layouts"] = compare_layouts(results)
    return results


def compare_layouts(results: dict) -> dict:
    """Decode/prefill speed and ternary kernel times of each layout of a run_layouts() result."""
    runs = {results["model"]["layout"]: results} | results["layouts"]
    e2e_rows, kernel_rows = [], {}
    for layout, r in runs.items():
        ceilings = {d["threads"]: d for d in r["summary"]["decode_vs_roofline"]}
        for e in r.get("e2e", []):
            row = {"layout": layout, "threads": e["threads"], "bytes_per_token": r["model"]["bytes_per_token"]["total"],
                   "tokens_per_s": {name: s["median"] for name, s in e["tokens_per_s"].items()}}
            if "pct_of_ceiling" in ceilings.get(e["threads"], {}):
                row["pct_of_ceiling"] = ceilings[e["threads"]]["pct_of_ceiling"]
            e2e_rows.append(row)
        for k in r.get("kernels", []):
            if k["impl"] == "ternary":
                key = (k["n"], k["k"], k["tokens"], k["threads"])
                group = kernel_rows.setdefault(key, dict(zip(("n", "k", "tokens", "threads"), key), seconds={},
                                                         used_by=k["projections"]))
                group["seconds"][layout] = k["seconds"]["median"]
    e2e_rows.sort(key=lambda row: row["threads"])  # stable: layouts in run order within a thread count
    return {"layouts": list(runs), "e2e": e2e_rows, "kernels": list(kernel_rows.values())}


def run(target: Target, threads: list[int], repeat: int, sections: list[str],
        prompts=e2e.PROMPTS, generate=e2e.GENERATE, tokens=micro.TOKENS, progress=None, isa: str | None = None,
        impls=micro.IMPLS, bandwidth: list[dict] | None = None, kv_cache: str = DEFAULT_KV_CACHE) -> dict:
    """Every chosen section; ``isa`` forces our kernels' instruction set (default: $BITNET_ISA, else the autotune's choice);
    ``kv_cache``: the e2e engine's KV cache element type (bitnet_cli.engine.KV_CACHE_TYPES).
    ``impls``: the kernel section's implementations; ``bandwidth``: roofline rows measured before
    (for another model), whose bandwidths give this one's ceilings instead of measuring again."""
    if repeat < 1:
        raise BitnetError(f"repeat must be at least 1, got {repeat}", param="repeat")
    if generate < 1:
        raise BitnetError(f"generate must be at least 1, got {generate}", param="generate")
    per_token = bytes_per_token(target.config, target.embeddings, target.layout)
    prompts, generate, clipped = fit_to_context(list(prompts), generate, context_length(target))
    results = {
        "schema": SCHEMA,
        "machine": machine(),
        "model": describe(target) | {"bytes_per_token": per_token},
        "settings": {"threads": threads, "repeat": repeat, "sections": sections,
                     "prompts": list(prompts), "generate": generate, "tokens": list(tokens),
                     # which ISA runs what, and whether the option, $BITNET_ISA, the rule or the
                     # autotune (or its cache) chose it
                     "isa": kernels.isa_choice(isa), "kv_cache": kv_cache_type(kv_cache)},
    }
    if clipped and "e2e" in sections:
        results["settings"]["clipped"] = clipped
    if "roofline" in sections:
        results["roofline"] = ([roofline.ceiling_row(r["threads"], r["bandwidth_gbps"], per_token) for r in bandwidth]
                               if bandwidth else roofline.run(per_token, threads, repeat, progress=progress))
    if "kernels" in sections:
        results["kernels"] = micro.run(target.config, threads, repeat, tokens=tokens, impls=impls, progress=progress,
                                       isa=isa, ternary_layout=target.layout)
        if progress:
            progress("integer MAC peak")
        results["machine"]["mac_peak_gmacs"] = {
            name: kernels.mac_peak(name) / 1e9 for name in sorted({r["backend"] for r in results["kernels"]
                                                                    if r["impl"] == "ternary"})}
    if "e2e" in sections:
        path = target.ensure_file(progress)
        results["model"]["file_bytes"] = path.stat().st_size
        results["e2e"] = e2e.run(path, threads, repeat, prompts, generate, progress=progress, isa=isa,
                                 kv_cache=kv_cache)
    results["summary"] = summarize(results, target.shape)
    return results


def summarize(results: dict, shape: str | None) -> dict:
    """Cross-section figures: percent of the roofline, and comparisons with the anchors."""
    bandwidth = {r["threads"]: r for r in results.get("roofline", [])}
    peaks = results.get("machine", {}).get("mac_peak_gmacs", {})
    for row in results.get("kernels", []):
        if row["tokens"] == 1 and row["threads"] in bandwidth:
            bw = bandwidth[row["threads"]]["bandwidth_gbps"]["median"]
            row["pct_of_bandwidth"] = 100.0 * row["gbps"]["median"] / bw
        if row["impl"] == "ternary" and row["backend"] in peaks:
            # one thread's peak times the threads (more threads than cores overstate the peak)
            row["pct_of_peak"] = 100.0 * row["gmacs"]["median"] / (peaks[row["backend"]] * row["threads"])
    decode = []
    for row in results.get("e2e", []):
        tg_name = f"tg{results['settings']['generate']}"
        entry = {"threads": row["threads"], "tg_tps": row["tokens_per_s"][tg_name]["median"]}
        if row["threads"] in bandwidth:
            ceiling = bandwidth[row["threads"]]["decode_ceiling_tps"]["median"]
            entry |= {"ceiling_tps": ceiling, "pct_of_ceiling": roofline.percent_of_ceiling(entry["tg_tps"], ceiling)}
        decode.append(entry)
    summary = {"decode_vs_roofline": decode, "time_per_token": time_per_token(results), "anchors": None}
    if anchors.anchors_for(shape) and results.get("e2e"):
        summary["anchors"] = compare_with_anchors(results["e2e"], results["settings"])
    return summary


def time_per_token(results: dict) -> list[dict]:
    """How much of each e2e token's time the ternary products account for, by the micro-benchmarks.

    For tgN: the GEMV times of every shape times its uses per token; for ppN (N among the kernel
    token counts): the GEMM times at N tokens, divided by N. The rest is the output head,
    attention, norms and overhead.
    """
    kernels = [r for r in results.get("kernels", []) if r["impl"] == "ternary"]
    rows = []
    for e in results.get("e2e", []):
        th = e["threads"]
        for name, rate in e["tokens_per_s"].items():
            tokens = 1 if name.startswith("tg") else int(name[2:])
            used = [r for r in kernels if r["threads"] == th and r["tokens"] == tokens]
            if not used:
                continue
            ternary = sum(r["seconds"]["median"] * r["per_token"] for r in used) / tokens
            total = 1.0 / rate["median"]
            row = {"threads": th, "test": name, "total_ms": 1e3 * total, "ternary_ms": 1e3 * ternary}
            # The kernels are timed with their weights streamed from DRAM; a model small enough to
            # stay in cache runs them faster inside the engine, and the estimate says nothing.
            if ternary <= total:
                row |= {"ternary_pct": 100.0 * ternary / total, "rest_ms": 1e3 * (total - ternary)}
            rows.append(row)
    return rows


def compare_with_anchors(e2e_rows: list[dict], settings: dict) -> dict:
    """Our pp128 and tg figures divided by each anchor's, at the thread counts both have."""
    tg_name = f"tg{settings['generate']}"
    rows = []
    for anchor in anchors.ANCHORS:
        for row in e2e_rows:
            th, ours = row["threads"], row["tokens_per_s"]
            entry = {"runtime": anchor["runtime"], "weights": anchor["weights"], "head": anchor["head"],
                     "threads": th}
            if th in anchor["pp128"] and "pp128" in ours:
                entry |= {"anchor_pp128": anchor["pp128"][th], "ours_pp128": ours["pp128"]["median"],
                          "pp128_ratio": ours["pp128"]["median"] / anchor["pp128"][th]}
            if th in anchor["tg64"]:
                entry |= {"anchor_tg64": anchor["tg64"][th], f"ours_{tg_name}": ours[tg_name]["median"],
                          "tg_ratio": ours[tg_name]["median"] / anchor["tg64"][th]}
            if len(entry) > 4:
                rows.append(entry)
    return {"source": anchors.SOURCE, "date": anchors.DATE, "rows": rows}
