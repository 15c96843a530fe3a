"""`bitnet eval MODEL --file TEXT`: the perplexity of a text as llama.cpp's llama-perplexity computes it.

The reference is transformers' own BitNetForCausalLM on the same checkpoint, scored in the test by the method
bitnet_cli/eval/perplexity.py documents (chunks of ctx tokens, BOS first, the second half scored); the text is
TinyShakespeare through a tokenizer trained on it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_hf_checkpoint
from typer.testing import CliRunner

from bitnet_cli.cli import app
from bitnet_cli.errors import BitnetError
from bitnet_cli.eval.perplexity import chunks_of, perplexity

CTX = 64


@pytest.fixture(scope="module")
def ppl_model(tmp_path_factory, test_tokenizer_dir):
    """(checkpoint dir, packed file) of one small model (f16, so packing its embeddings loses nothing)."""
    from bitnet_cli.pack import pack_checkpoint

    root = tmp_path_factory.mktemp("ppl_model")
    ckpt = make_hf_checkpoint(root / "ckpt", test_tokenizer_dir, torch_dtype="float16", initializer_range=0.15)
    pack_checkpoint(ckpt, root / "model.bin")
    return ckpt, root / "model.bin"


@pytest.fixture(scope="module")
def text(shakespeare) -> str:
    return shakespeare.read_text(encoding="utf-8")[20000:24000]


def _reference_nll(ckpt, text: str, ctx: int) -> np.ndarray:
    """Every scored token's NLL by transformers' model, chunked as llama-perplexity chunks."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BitNetForCausalLM

    model = BitNetForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    bos = model.config.bos_token_id
    tokens = [bos] + Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    nll, first = [], ctx // 2
    for start in range(0, len(tokens) - ctx + 1, ctx):
        chunk = torch.tensor([[bos] + tokens[start + 1:start + ctx]])
        with torch.inference_mode():
            logits = model(chunk).logits[0, first:-1].double()
        nll.append(torch.nn.functional.cross_entropy(logits, chunk[0, first + 1:], reduction="none").numpy())
    return np.concatenate(nll)


def test_perplexity_is_transformers_chunked_as_llama_cpp(ppl_model, text):
    """The C engine (packed) and our torch model (checkpoint) give transformers' perplexity and llama.cpp's
    +/- (its formula over the reference's own NLLs)."""
    ckpt, packed = ppl_model
    nll = _reference_nll(ckpt, text, CTX)
    want = math.exp(nll.mean())
    want_err = want * math.sqrt(((nll ** 2).mean() - nll.mean() ** 2) / (nll.size - 1))
    for model, rel in ((ckpt, 1e-5), (packed, 1e-3)):
        got = perplexity(model, text, ctx_size=CTX, threads=1)
        assert got.scored_tokens == nll.size and got.chunks == nll.size // (CTX - CTX // 2 - 1)
        assert got.perplexity == pytest.approx(want, rel=rel), model
        assert got.stderr == pytest.approx(want_err, rel=10 * rel)
        assert math.exp(np.mean(got.chunk_nll)) == pytest.approx(got.perplexity, rel=1e-9)  # equal-sized chunks
    assert 20 < want < 2000  # a random model over a 389-token vocabulary: about chance, but not flat


def test_chunks_replace_the_first_token_by_bos_and_drop_the_tail():
    tokens = [7] + list(range(100, 125))  # 26 tokens: BOS and 25
    assert chunks_of(tokens, 10, bos=7) == [[7] + list(range(100, 109)), [7] + list(range(110, 119))]
    assert chunks_of(tokens, 10, bos=None, chunks=1) == [tokens[:10]]
    assert chunks_of(tokens, 10, bos=7, chunks=5) == chunks_of(tokens, 10, bos=7)  # only whole chunks


def test_chunks_limit_what_is_scored(ppl_model, text):
    ckpt, packed = ppl_model
    whole = perplexity(packed, text, ctx_size=CTX, threads=1)
    two = perplexity(packed, text, ctx_size=CTX, chunks=2, threads=1)
    assert two.chunks == 2 and two.scored_tokens == 2 * (CTX - CTX // 2 - 1)
    assert two.chunk_nll == pytest.approx(whole.chunk_nll[:2], rel=1e-9) and two.text_tokens == whole.text_tokens


def test_bad_settings_are_named(ppl_model, text):
    packed = ppl_model[1]
    with pytest.raises(BitnetError, match="fewer than one chunk of ctx_size 64"):
        perplexity(packed, "To be", ctx_size=CTX)
    with pytest.raises(BitnetError, match="at least 3 tokens"):
        perplexity(packed, text, ctx_size=2)
    with pytest.raises(BitnetError, match="chunks 0"):
        perplexity(packed, text, chunks=0)
    with pytest.raises(BitnetError, match="ctx_size must be between 1 and 256"):
        perplexity(packed, text, ctx_size=512)  # more than the model's context: the engine's own words


# ---------------------------------------------------------------- the command


def _cli(*args, input=None):
    return CliRunner().invoke(app, ["eval", *map(str, args)], input=input)


def test_cli_prints_writes_and_reads_stdin(ppl_model, text, tmp_path):
    packed = ppl_model[1]
    want = perplexity(packed, text, ctx_size=CTX, chunks=3, threads=1)
    source = tmp_path / "text.txt"
    source.write_text(text, encoding="utf-8")
    out = tmp_path / "ppl.json"
    r = _cli(packed, "-f", source, "-c", CTX, "--chunks", 3, "-t", 1, "-o", out)
    assert r.exit_code == 0, r.output
    assert f"perplexity {want.perplexity:.4f} +/- {want.stderr:.5f} (engine): 3 chunks of 64 tokens" in r.stdout
    saved = json.loads(out.read_text())
    assert saved["perplexity"] == pytest.approx(want.perplexity, rel=1e-12) and saved["file"] == str(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ppl.json", "text.txt"]  # no temp file left
    again = _cli(packed, "-f", source, "-c", CTX, "--chunks", 3, "-o", out)
    assert again.exit_code == 1 and "--force" in " ".join(again.output.split())
    r = _cli(packed, "-f", "-", "-c", CTX, "--chunks", 3, "-t", 1, "--json", input=text)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["perplexity"] == pytest.approx(want.perplexity, rel=1e-12)
    r = _cli(packed, "-f", source, "-o", source)
    assert r.exit_code == 1 and "is an input of this evaluation" in " ".join(r.output.split())
    assert source.read_text(encoding="utf-8") == text


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arc_easy"], "--tasks goes with lm-eval tasks, not with --file"),
    (["--limit", "3", "--num-fewshot", "1"], "--num-fewshot, --limit go with lm-eval tasks"),
    (["--data-dir", "."], "--data-dir goes with lm-eval tasks"),
    (["-c", "1"], "--ctx-size 1: a perplexity chunk needs at least 3 tokens"),
    (["-c", "1000"], "--ctx-size must be between 1 and 256"),
    (["--chunks", "0"], "--chunks 0: must be 1 or more"),
    (["-t", "0"], "--threads"),
])
def test_cli_bad_input(ppl_model, tmp_path, args, message):
    source = tmp_path / "text.txt"
    source.write_text("To be, or not to be: that is the question. " * 40, encoding="utf-8")
    r = _cli(ppl_model[1], "-f", source, *args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert message in " ".join(r.output.split()), r.output


def test_cli_chunks_without_a_file_is_named(ppl_model):
    r = _cli(ppl_model[1], "--tasks", "tinyshakespeare_heldout", "--chunks", 2)
    assert r.exit_code == 1 and "--chunks goes with --file" in " ".join(r.output.split()), r.output


def test_perplexity_of_a_packed_model_needs_neither_lm_eval_nor_torch(ppl_model, text, tmp_path):
    """The C engine's perplexity runs with the inference install alone (lm_eval and torch made unimportable)."""
    source = tmp_path / "text.txt"
    source.write_text(text, encoding="utf-8")
    code = ("import sys; sys.modules['lm_eval'] = None; sys.modules['torch'] = None\n"
            "from bitnet_cli.cli import app\n"
            f"app(['eval', {str(ppl_model[1])!r}, '-f', {str(source)!r}, '-c', '64', '--chunks', '2', '--json'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["chunks"] == 2
