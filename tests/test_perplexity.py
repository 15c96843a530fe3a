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


def test_perplexity_is_transformers_chunked_as_llama_cpp(tiny_packed, text):
    """The C engine (packed) and our torch model (checkpoint) give transformers' perplexity and llama.cpp's
    +/- (its formula over the reference's own NLLs)."""
    ckpt, packed = tiny_packed
    nll = _reference_nll(ckpt, text, CTX)
    want = math.exp(nll.mean())
    want_err = want * math.sqrt(((nll ** 2).mean() - nll.mean() ** 2) / (nll.size - 1))
    for model, rel in ((ckpt, 1e-4), (packed, 1e-3)):  # the README's bounds on agreement with transformers
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


def test_chunks_limit_what_is_scored(tiny_packed, text):
    ckpt, packed = tiny_packed
    whole = perplexity(packed, text, ctx_size=CTX, threads=1)
    two = perplexity(packed, text, ctx_size=CTX, chunks=2, threads=1)
    assert two.chunks == 2 and two.scored_tokens == 2 * (CTX - CTX // 2 - 1)
    assert two.chunk_nll == pytest.approx(whole.chunk_nll[:2], rel=1e-9) and two.text_tokens == whole.text_tokens


def test_bad_settings_are_named(tiny_packed, text):
    packed = tiny_packed[1]
    with pytest.raises(BitnetError, match="fewer than one chunk of ctx_size 64"):
        perplexity(packed, "To be", ctx_size=CTX)
    with pytest.raises(BitnetError, match="at least 3 tokens"):
        perplexity(packed, text, ctx_size=2)
    with pytest.raises(BitnetError, match="chunks 0"):
        perplexity(packed, text, chunks=0)
    with pytest.raises(BitnetError, match="ctx_size must be between 1 and 256"):
        perplexity(packed, text, ctx_size=512)  # more than the model's context: the engine's own words


# ---------------------------------------------------------------- against a base model (--kl-base)


def test_a_model_against_itself_diverges_by_nothing(tiny_packed, text):
    packed = tiny_packed[1]
    got = perplexity(packed, text, ctx_size=CTX, chunks=3, threads=1, base=packed).divergence
    assert got.kld == got.kld_max == 0.0 and got.same_top == 1.0 and got.same_top_stderr == 0.0
    assert got.base == str(packed)


def test_the_divergence_of_a_q4_head_is_kl_from_the_f16_one(tiny_packed, text, tmp_path):
    """A q4 head against the f16 one: KL(f16 || q4) per scored token equals torch's kl_div over both engines'
    logits, taken chunk by chunk with Engine.forward (not the backends' path); the packed file against its own
    checkpoint diverges far less."""
    import torch

    from bitnet_cli.engine import Engine
    from bitnet_cli.pack import pack_checkpoint

    ckpt, f16 = tiny_packed
    q4 = tmp_path / "q4.bin"
    pack_checkpoint(ckpt, q4, embeddings="q4")
    got = perplexity(q4, text, ctx_size=CTX, chunks=4, threads=1, base=f16)
    d = got.divergence
    with Engine.load(f16, threads=1) as base, Engine.load(q4, threads=1) as model:
        tokens = base.encode(text)
        chunks = chunks_of(tokens, CTX, base.bos_token_id, 4)
        first = CTX // 2
        p = torch.cat([torch.from_numpy(base.forward(c)[first:-1]).double().log_softmax(-1) for c in chunks])
        q = torch.cat([torch.from_numpy(model.forward(c)[first:-1]).double().log_softmax(-1) for c in chunks])
    kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).numpy()
    assert d.kld == pytest.approx(kl.mean(), rel=1e-6) and d.kld_max == pytest.approx(kl.max(), rel=1e-6)
    assert d.kld_median == pytest.approx(np.median(kl), rel=1e-6) and 0 < d.kld_median <= d.kld_p99 <= d.kld_max
    assert d.same_top == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).double().mean()))
    assert d.base_perplexity == pytest.approx(perplexity(f16, text, ctx_size=CTX, chunks=4).perplexity, rel=1e-12)
    packing = perplexity(f16, text, ctx_size=CTX, chunks=4, threads=1, base=ckpt).divergence
    assert packing.kld < d.kld / 10 and packing.same_top > 0.95


def test_the_base_keeps_the_f32_kv_cache(tiny_packed, text):
    """--kv-cache f16 --kl-base the same file: the f16 cache against the f32 one. It rounds keys and values, so the
    divergence is small but not zero (with f16 on both sides it would be exactly zero)."""
    packed = tiny_packed[1]
    got = perplexity(packed, text, ctx_size=CTX, chunks=3, threads=1, kv_cache="f16", base=packed)
    assert 0 < got.divergence.kld < 1e-3
    assert got.divergence.base_perplexity == pytest.approx(perplexity(packed, text, ctx_size=CTX, chunks=3).perplexity,
                                                          rel=1e-12)


def test_a_base_with_another_vocabulary_is_refused(tiny_packed, text, tmp_path, test_tokenizer_dir, shakespeare):
    from conftest import train_test_tokenizer

    wider = make_hf_checkpoint(tmp_path / "wider", test_tokenizer_dir, vocab_size=400)
    with pytest.raises(BitnetError, match="has 400 logits a token"):
        perplexity(tiny_packed[1], text, ctx_size=CTX, chunks=1, base=wider)
    other = make_hf_checkpoint(tmp_path / "other", train_test_tokenizer(shakespeare, tmp_path / "tok", 300).parent)
    with pytest.raises(BitnetError, match="reads the text as other tokens"):
        perplexity(tiny_packed[1], text, ctx_size=CTX, chunks=1, base=other)


# ---------------------------------------------------------------- the command


def _cli(*args, input=None):
    return CliRunner().invoke(app, ["eval", *map(str, args)], input=input)


def test_cli_prints_writes_and_reads_stdin(tiny_packed, text, tmp_path):
    packed = tiny_packed[1]
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
def test_cli_bad_input(tiny_packed, tmp_path, args, message):
    source = tmp_path / "text.txt"
    source.write_text("To be, or not to be: that is the question. " * 40, encoding="utf-8")
    r = _cli(tiny_packed[1], "-f", source, *args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert message in " ".join(r.output.split()), r.output


def test_cli_a_text_past_the_limit_is_named(tiny_packed, tmp_path, monkeypatch):
    from bitnet_cli import cli

    monkeypatch.setattr(cli, "TEXT_FILE_LIMIT", 1 << 20)
    source = tmp_path / "big.txt"
    source.write_text("x" * ((1 << 20) + 1), encoding="utf-8")
    r = _cli(tiny_packed[1], "-f", source)
    assert r.exit_code == 1 and "big.txt: the text is larger than 1 MiB" in " ".join(r.output.split()), r.output


@pytest.mark.parametrize("option", [["--chunks", 2], ["--kl-base", "model.bin"]])
def test_cli_file_options_without_a_file_are_named(tiny_packed, option):
    r = _cli(tiny_packed[1], "--tasks", "tinyshakespeare_heldout", *option)
    assert r.exit_code == 1 and f"{option[0]} goes with --file" in " ".join(r.output.split()), r.output


def test_cli_kl_base(tiny_packed, text, tmp_path):
    ckpt, packed = tiny_packed
    source = tmp_path / "text.txt"
    source.write_text(text, encoding="utf-8")
    r = _cli(packed, "-f", source, "-c", CTX, "--chunks", 2, "--kl-base", ckpt, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)["divergence"]
    assert d["base"] == str(ckpt) and 0 < d["kld"] < 0.01 and d["same_top"] > 0.9
    r = _cli(packed, "-f", source, "-c", CTX, "--chunks", 2, "--kl-base", packed)
    assert r.exit_code == 0, r.output
    assert "KL divergence mean 0.000000 +/- 0.000000" in " ".join(r.stdout.split())
    assert "same likeliest token 100.00%" in " ".join(r.stdout.split())
    r = _cli(packed, "-f", source, "--kl-base", tmp_path / "nope.bin")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"--kl-base {tmp_path / 'nope.bin'}: no such file or directory" in " ".join(r.output.split())


def test_perplexity_of_a_packed_model_needs_neither_lm_eval_nor_torch(tiny_packed, text, tmp_path):
    """The C engine's perplexity runs with the inference install alone (lm_eval and torch made unimportable)."""
    source = tmp_path / "text.txt"
    source.write_text(text, encoding="utf-8")
    code = ("import sys; sys.modules['lm_eval'] = None; sys.modules['torch'] = None\n"
            "from bitnet_cli.cli import app\n"
            f"app(['eval', {str(tiny_packed[1])!r}, '-f', {str(source)!r}, '-c', '64', '--chunks', '2', '--json'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["chunks"] == 2
