"""Benchmark `bitnet pack` on a 2B4T-shaped bf16 checkpoint (random weights, ~4.8 GB).

    python benchmarks/pack_2b4t.py [--workdir /tmp] [--keep]

Writes the checkpoint tensor by tensor (no torch, never the whole model in memory), then
runs `bitnet pack` under `/usr/bin/time -v` for f16 and int8 embeddings and prints wall
time, peak RSS and file sizes as JSON. Deletes everything it wrote unless --keep.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bitnet_cli.arch import ModelDims
from bitnet_cli.pack.synthetic import shape_config, synthetic_tokenizer
from bitnet_cli.tokenizer import BOS, EOS


def write_bf16_checkpoint(out: Path, shape: str = "2b4t", seed: int = 0) -> Path:
    """An HF-layout bf16 BitNet checkpoint with random weights, streamed to one safetensors file."""
    config = shape_config(shape)
    config["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                     "quantization_mode": "online"}
    config["torch_dtype"] = "bfloat16"
    d = ModelDims.from_config(config)
    tensors = [(name, shape) for name, shape, _ in d.hf_tensors()]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shp in tensors:
        nbytes = int(np.prod(shp)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(out / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shp in tensors:
            rows = shp[0]
            step = max(1, (1 << 24) // int(np.prod(shp[1:], dtype=np.int64)))
            for start in range(0, rows, step):
                n = min(step, rows - start)
                if "norm" in name:
                    x = 1 + 0.05 * rng.standard_normal((n, *shp[1:]), dtype=np.float32)
                else:
                    x = 0.02 * rng.standard_normal((n, *shp[1:]), dtype=np.float32)
                f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(synthetic_tokenizer(d.vocab_size))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    return out


def timed(cmd: list[str]) -> dict:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for kind in ("User", "System"))
    return {"wall_s": round(seconds, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": round(rss_kb / 1024, 1),
            "stdout": proc.stdout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and packed files")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bitnet-pack-bench-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        ckpt = write_bf16_checkpoint(work / "ckpt")
        report = {"checkpoint_bytes": (ckpt / "model.safetensors").stat().st_size,
                  "checkpoint_write_s": round(time.perf_counter() - t0, 1)}
        for emb in ("f16", "int8"):
            out = work / f"2b4t-{emb}.bin"
            run = timed([sys.executable, "-m", "bitnet_cli.cli", "pack", str(ckpt), str(out),
                         "--embeddings", emb, "--json"])
            summary = json.loads(run.pop("stdout"))
            report[emb] = {**run, "file_bytes": summary["file_bytes"],
                           "ternary_bits_per_weight": summary["ternary_bits_per_weight"],
                           "bits_per_weight": summary["bits_per_weight"],
                           "compression_ratio": summary["compression_ratio"]}
            verify = timed([sys.executable, "-m", "bitnet_cli.cli", "info", str(out), "--verify", "--json"])
            report[emb]["verify_wall_s"] = verify["wall_s"]
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
