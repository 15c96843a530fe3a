"""Race bitnet.cpp and bitnet-cli on the Llama3-8B-1.58 shape (the Llama family), side by side in one run.

    python benchmarks/llama_vs_bitnetcpp.py --bitnet-cpp /tmp/anchors/bitnet.cpp/build/bin [--threads 1,2]
        [--repeat 3] [--layers 32] [--workdir /tmp/anchors/llama3-8b] [--out benchmarks]

bitnet.cpp side: an F16 GGUF of architecture `llama` (what bitnet.cpp's convert-hf-to-gguf-bitnet.py
makes of HF1BitLLM/Llama3-8B-1.58: ternary weights as f16 values, an untied f16 `output.weight`,
SiLU FFN, no sub-norms) with random trits x 0.03 and a synthetic 128,256-token SentencePiece
vocabulary, written tensor by tensor (it is ~16 GB at 32 layers), then bitnet.cpp's own
`llama-quantize ... I2_S` (token embedding and head stay f16: bitnet.cpp's default). The F16 file
is deleted once quantised unless --keep-f16.

bitnet-cli side: the synthetic `llama3-8b-1.58` file that `bitnet bench --shape llama3-8b-1.58`
uses (random trits, f16 untied head), run by the same e2e worker as `bitnet bench`.

Each round runs, per thread count, one llama-bench (`-p 128 -n 64 -r 1`) then one of our e2e
workers (pp128, tg64), so drift in the machine's load hits both sides alike. Figures are medians
over the rounds (min-max beside). Writes LLAMA_VS_BITNETCPP.md and llama_vs_bitnetcpp.json next to
this script (or --out). Run it on an idle machine: nothing here is timed by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from bitnet_cli.arch import ModelDims, preset_fields
from bitnet_cli.bench import suite, target
from bitnet_cli.bench.anchors import (GENERATE, PROMPT, cpu_busy_fraction, llama_bench_once, ours_once, report_header,
                                      write_with_tool)
from bitnet_cli.bench.stats import summarize
from bitnet_cli.errors import BitnetError, run_script
from run import _stat, _table

HERE = Path(__file__).resolve().parent
SHAPE = "llama3-8b-1.58"


def write_f16_llama_gguf(out: Path, d: ModelDims, seed: int = 0) -> None:
    """An F16 GGUF of architecture `llama` with d's shape, streamed one tensor at a time."""
    import gguf

    rng = np.random.default_rng(seed)
    H, F, V, hd = d.hidden_size, d.intermediate_size, d.vocab_size, d.head_dim
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(f"synthetic-{SHAPE}")
    w.add_context_length(d.max_position_embeddings)
    w.add_embedding_length(H)
    w.add_block_count(d.num_layers)
    w.add_feed_forward_length(F)
    w.add_head_count(d.num_heads)
    w.add_head_count_kv(d.num_kv_heads)
    w.add_rope_freq_base(d.rope_theta)
    w.add_layer_norm_rms_eps(d.rms_norm_eps)
    w.add_rope_dimension_count(hd)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"t{i}".encode() for i in range(V - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (V - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * V)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    # (name, shape, dtype, maker): tensors in file order; makers run only while writing
    def ternary(rows, cols):
        return lambda: rng.integers(-1, 2, size=(rows, cols), dtype=np.int8).astype(np.float16) * np.float16(0.03)

    def normal(rows, cols):
        return lambda: rng.standard_normal((rows, cols), dtype=np.float32).astype(np.float16)

    def ones(n):
        return lambda: np.ones(n, np.float32)

    plan = [("token_embd.weight", (V, H), np.float16, normal(V, H)), ("output_norm.weight", (H,), np.float32, ones(H)),
            ("output.weight", (V, H), np.float16, normal(V, H))]
    for i in range(d.num_layers):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (H,), np.float32, ones(H)), (p + "ffn_norm.weight", (H,), np.float32, ones(H))]
        for name, proj in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                           ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                           ("ffn_down", "mlp.down_proj")):
            n, k = d.projection_shape(proj)
            plan.append((p + name + ".weight", (n, k), np.float16, ternary(n, k)))
    for name, shape, dtype, _ in plan:
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, _, _, make) in enumerate(plan):
        print(f"\r  writing {out.name}: tensor {i + 1}/{len(plan)}", end="", file=sys.stderr, flush=True)
        w.write_tensor_data(make())
    print(file=sys.stderr)
    w.close()


def their_file(args, d: ModelDims) -> Path:
    """bitnet.cpp's I2_S file of the shape, made once in --workdir."""
    i2s = args.workdir / f"{SHAPE}-{d.num_layers}l.i2_s.gguf"
    if i2s.exists():
        return i2s
    f16 = args.workdir / f"{SHAPE}-{d.num_layers}l.f16.gguf"
    if not f16.exists():
        tmp = f16.with_name(f".{f16.name}.tmp")
        try:
            write_f16_llama_gguf(tmp, d)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, f16)
    print(f"  llama-quantize {f16.name} {i2s.name} I2_S", file=sys.stderr, flush=True)
    # one thread: with more, bitnet.cpp's llama-quantize writes I2_S chunks at 4x their offsets
    write_with_tool(i2s, lambda tmp: [str(args.bitnet_cpp / "llama-quantize"), str(f16), str(tmp), "I2_S", "1"])
    if not args.keep_f16:
        f16.unlink()
    return i2s


def our_file(args, layers: int) -> Path:
    """Our synthetic file of the shape: `bitnet bench`'s cached one, or one of --layers in --workdir."""
    t = target.from_shape(SHAPE, "f16")
    if layers == t.config["num_hidden_layers"]:
        return t.ensure_file(progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    out = args.workdir / f"{SHAPE}-{layers}l.f16.bin"
    if not out.exists():
        from bitnet_cli.pack.synthetic import write_random_model

        print(f"  writing {out.name}", file=sys.stderr, flush=True)
        write_random_model(out, shape=dict(preset_fields(SHAPE), num_hidden_layers=layers), embeddings="f16")
    return out


def measure(args, threads: list[int]) -> dict:
    d = ModelDims.from_config(dict(target.from_shape(SHAPE, "f16").config, num_hidden_layers=args.layers))
    theirs_path, ours_path = their_file(args, d), our_file(args, args.layers)
    results = {"machine": suite.machine() | {"cpu_busy_before": cpu_busy_fraction()},
               "settings": {"threads": threads, "rounds": args.repeat, "prompt": PROMPT, "generate": GENERATE,
                            "layers": args.layers, "shape": SHAPE},
               "files": {"ours": str(ours_path), "theirs": str(theirs_path), "ours_bytes": ours_path.stat().st_size,
                         "theirs_bytes": theirs_path.stat().st_size}}
    samples: dict = {}
    build = None
    for r in range(args.repeat):
        for th in threads:
            print(f"  round {r + 1}/{args.repeat}, {th} thread(s)", file=sys.stderr, flush=True)
            theirs = llama_bench_once(str(args.bitnet_cpp / "llama-bench"), theirs_path, th)
            build = theirs["build"]
            for side, rates in (("theirs", theirs["rates"]), ("ours", ours_once(ours_path, th))):
                for test, rate in rates.items():
                    samples.setdefault((th, side, test), []).append(rate)
    results["machine"]["load_average_end"] = round(os.getloadavg()[0], 2)
    results["bitnet_cpp"] = build
    rows = []
    for th in threads:
        row = {"threads": th}
        for test in (f"pp{PROMPT}", f"tg{GENERATE}"):
            for side in ("ours", "theirs"):
                row[f"{side}_{test}"] = summarize(samples[(th, side, test)])
            row[f"{test}_ratio"] = row[f"ours_{test}"]["median"] / row[f"theirs_{test}"]["median"]
        rows.append(row)
    results["rows"] = rows
    return results


def markdown(results: dict, command: str) -> str:
    s, b, f = results["settings"], results["bitnet_cpp"], results["files"]
    pp, tg = f"pp{s['prompt']}", f"tg{s['generate']}"
    parts = [
        f"# bitnet-cli vs bitnet.cpp on the {s['shape']} shape ({s['layers']} layers)",
        *report_header(results, command, " per thread count"),
        f"- bitnet.cpp: build {b['build_commit']} ({b['build_number']}), CPU {b['cpu_info']}; I2_S of an F16 GGUF "
        f"of architecture llama, f16 token embedding and head ({f['theirs_bytes'] / 1e9:.2f} GB)",
        f"- bitnet-cli: synthetic {s['shape']} packed file, f16 untied head ({f['ours_bytes'] / 1e9:.2f} GB)",
        _table(["threads", f"ours {pp}", f"bitnet.cpp {pp}", "x", f"ours {tg}", f"bitnet.cpp {tg}", "x"],
               [[str(r["threads"]), _stat(r[f"ours_{pp}"]), _stat(r[f"theirs_{pp}"]), f"{r[f'{pp}_ratio']:.2f}x",
                 _stat(r[f"ours_{tg}"]), _stat(r[f"theirs_{tg}"]), f"{r[f'{tg}_ratio']:.2f}x"]
                for r in results["rows"]]),
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bitnet-cpp", type=Path, required=True,
                        help="bitnet.cpp's build/bin (llama-bench and llama-quantize)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--layers", type=int, default=preset_fields(SHAPE)["num_hidden_layers"],
                        help="decoder layers (fewer for a quick trial; both sides get the same)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/anchors") / SHAPE,
                        help="where bitnet.cpp's GGUF files are made (the F16 one needs ~16 GB)")
    parser.add_argument("--keep-f16", action="store_true", help="keep the F16 GGUF after quantising")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    threads = suite.parse_int_list(args.threads, "--threads")
    for tool in ("llama-bench", "llama-quantize"):
        if not os.access(args.bitnet_cpp / tool, os.X_OK):
            raise BitnetError(f"{args.bitnet_cpp / tool}: not an executable (give bitnet.cpp's build/bin)")
    if args.repeat < 1 or args.layers < 1:
        raise BitnetError("--repeat and --layers must be at least 1")
    if not args.out.is_dir():
        raise BitnetError(f"--out {args.out}: not a directory")
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = measure(args, threads)
    results["command"] = "python benchmarks/llama_vs_bitnetcpp.py " + shlex.join(argv)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "llama_vs_bitnetcpp.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "LLAMA_VS_BITNETCPP.md").write_text(markdown(results, results["command"]))
    print(f"wrote {args.out / 'LLAMA_VS_BITNETCPP.md'}")
    return 0


if __name__ == "__main__":
    run_script(main)
