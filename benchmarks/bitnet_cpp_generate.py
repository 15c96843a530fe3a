"""Run our I2_S GGUF export of a trained model in bitnet.cpp's llama-cli, greedily, and compare with `bitnet run`.

    python benchmarks/bitnet_cpp_generate.py CHECKPOINT [--bitnet-cpp /tmp/anchors/bitnet.cpp] [-n 48]

CHECKPOINT is a trained model (e.g. `bitnet train tiny --set model.intermediate_size=384 --out runs/t`:
I2_S needs every projection's input size a multiple of 128). The script packs it twice: our native
file (`bitnet run`) and `--to gguf --gguf-type i2_s` (bitnet.cpp's architecture `bitnet-b1.58`),
then for each prompt generates N tokens greedily in both: `bitnet run --temperature 0` and
bitnet.cpp's `llama-cli --temp 0 --top-k 1 -ignore-eos`. Both quantise activations to int8 per
token and accumulate exactly in integers, so on a well-trained model the texts agree; differences
can only come from float rounding (RMSNorm, attention, softmax) when two logits are within it.
Prints JSON: per prompt both texts, whether the texts (and their tokenisations) agree, and whether all do.
bitnet.cpp: build it from ../shared/anchors (README there); its older llama-cli echoes the prompt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ["ROMEO:\nBut soft, what light", "First Citizen:\nBefore we proceed any further", "KING HENRY:\nNow"]


def ours(packed: Path, prompt: str, n: int) -> str:
    from bitnet_cli.engine import Engine

    with Engine.load(packed, threads=1) as e:
        return "".join(e.generate(prompt, max_tokens=n, temperature=0))


def theirs(cli: Path, gguf: Path, prompt: str, n: int) -> str:
    p = subprocess.run([str(cli), "-m", str(gguf), "-p", prompt, "-n", str(n), "--temp", "0", "--top-k", "1",
                        "-t", "1", "-s", "0", "-c", "256", "--ignore-eos", "--no-warmup"],
                       capture_output=True, timeout=600)  # the text goes to stdout, the logs to stderr
    if p.returncode:
        sys.exit(f"llama-cli failed ({p.returncode}):\n{p.stderr.decode(errors='replace')[-3000:]}")
    out = p.stdout.decode("utf-8", errors="replace")  # a token cut inside a UTF-8 sequence: U+FFFD, as we print it
    i = out.find(prompt)  # the older llama-cli echoes the prompt
    return out[i + len(prompt):] if i >= 0 else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--bitnet-cpp", type=Path, default=Path("/tmp/anchors/bitnet.cpp"))
    ap.add_argument("-n", type=int, default=48)
    args = ap.parse_args()
    cli = args.bitnet_cpp / "build" / "bin" / "llama-cli"
    if not cli.is_file():
        sys.exit(f"{cli}: missing; build bitnet.cpp first (../shared/anchors/README.md)")
    from tokenizers import Tokenizer

    from bitnet_cli.pack import PackedModel, pack_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        packed, gguf = Path(tmp) / "m.bin", Path(tmp) / "m.gguf"
        pack_checkpoint(args.checkpoint, packed)
        pack_checkpoint(args.checkpoint, gguf, to="gguf", gguf_type="i2_s")
        with PackedModel.open(packed) as pm:
            tok = Tokenizer.from_str(pm.tokenizer_json)
        rows = []
        for prompt in PROMPTS:
            text = ours(packed, prompt, args.n)
            other = theirs(cli, gguf, prompt, args.n)
            ids = tok.encode(text, add_special_tokens=False).ids  # both texts in the same tokenisation
            other_ids = tok.encode(other[:len(text)], add_special_tokens=False).ids  # llama-cli ends with newlines
            rows.append({"prompt": prompt, "bitnet_run": text, "llama_cli": other, "tokens": args.n,
                         "same_tokens": ids == other_ids, "same_text": text == other[:len(text)] and len(other) >= len(text)})
    print(json.dumps({"checkpoint": str(args.checkpoint), "all_same": all(r["same_text"] for r in rows),
                      "results": rows}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
