"""Import a 2B4T-sized I2_S GGUF with `bitnet pack` and report wall time and peak RSS (issue: < 1.5 GB, < 60 s).

    python benchmarks/gguf_import.py [--workdir /tmp] [--bitnet-cpp /tmp/anchors/bitnet.cpp] [--anchors DIR] [--keep]
    python benchmarks/gguf_import.py --gguf A.gguf [--gguf B.gguf]      # time files made before

The GGUF is made the way the official one was: ../shared/anchors/gguf_b158.py writes an F16
`bitnet-b1.58` file of the 2B4T shape (random trits x 0.03, a synthetic 128,256-token
SentencePiece vocabulary) and bitnet.cpp's llama-quantize turns it into I2_S with an F16 head and
with a Q6_K head. Without a bitnet.cpp build, our own I2_S export of a synthetic 2B4T model
stands in. Each import runs in a child under `/usr/bin/time -v`; prints JSON.
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

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {"seconds": round(wall, 1), "peak_rss_mb": round(rss / 1024, 1)}


def gguf_files(work: Path, bcpp: Path, anchors: Path) -> dict[str, Path]:
    quantize = bcpp / "build" / "bin" / "llama-quantize"
    script = anchors / "gguf_b158.py"
    if quantize.is_file() and script.is_file():
        f16 = work / "f16.gguf"
        subprocess.run([sys.executable, script, f16], check=True)
        out = {}
        for head, extra in (("f16", []), ("q6_k", ["--token-embedding-type", "q6_k"])):
            out[f"bitnet.cpp I2_S, {head} head"] = work / f"i2s-{head}.gguf"
            # one thread: with more, bitnet.cpp's llama-quantize writes I2_S chunks at 4x their offsets (a broken file)
            subprocess.run([quantize, *extra, f16, out[f"bitnet.cpp I2_S, {head} head"], "I2_S", "1"], check=True,
                           capture_output=True)
        f16.unlink()
        return out
    from bitnet_cli.pack.gguf import export_gguf
    from bitnet_cli.pack.synthetic import write_random_model

    native = work / "synthetic.bin"
    write_random_model(native, "2b4t", "f16")
    out = {"bitnet-cli I2_S export, f16 head": work / "i2s.gguf"}
    export_gguf(native, out["bitnet-cli I2_S export, f16 head"], "i2_s")
    native.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--bitnet-cpp", type=Path, default=Path("/tmp/anchors/bitnet.cpp"))
    ap.add_argument("--anchors", type=Path, default=REPO.parent / "shared" / "anchors", help="holds gguf_b158.py")
    ap.add_argument("--keep", action="store_true", help="keep the made GGUF files (their paths are printed)")
    ap.add_argument("--gguf", type=Path, action="append", help="time this GGUF instead of making them (repeatable)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gguf_import.", dir=args.workdir))
    results = []
    try:
        files = {str(g): g for g in args.gguf} if args.gguf else gguf_files(work, args.bitnet_cpp, args.anchors)
        if args.keep:
            print(f"GGUF files kept: {' '.join(map(str, files.values()))}", file=sys.stderr)
        for label, gguf in files.items():
            out = work / "imported.bin"
            r = timed([sys.executable, "-m", "bitnet_cli.cli", "pack", gguf, out, "--force", "--json"])
            results.append({"gguf": label, "gguf_mb": round(gguf.stat().st_size / 1e6, 1),
                            "packed_mb": round(out.stat().st_size / 1e6, 1), **r})
            out.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
