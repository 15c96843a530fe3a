"""GGUF files written by bitnet.cpp's own tools (tests/fixtures/make_gguf_fixtures.py made tests/data/gguf):
our import of each matches our import of the transformers checkpoint they came from, rebuilt here from its seed."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from bitnet_cli.gguf import quants
from bitnet_cli.gguf.reader import GGUFFile
from bitnet_cli.pack import PackedModel, pack_checkpoint
from conftest import make_hf_checkpoint

DATA = Path(__file__).parent / "data" / "gguf"
MODELS = {  # as tests/fixtures/make_gguf_fixtures.py built them
    "a": dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, seed=11),
    "b": dict(hidden_size=256, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, seed=12),
}


@pytest.fixture(scope="module")
def hf_packed(tmp_path_factory):
    """Our f16 pack of each source checkpoint, rebuilt from its seed with the committed tokenizer."""
    root = tmp_path_factory.mktemp("fixture_src")
    tok = root / "tok"
    tok.mkdir()
    shutil.copy(DATA / "tokenizer_small.json", tok / "tokenizer.json")
    (tok / "tokenizer_config.json").write_text('{"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}')
    out = {}
    for name, kw in MODELS.items():
        ckpt = make_hf_checkpoint(root / name, tok, vocab_size=300, **kw)
        out[name] = (pack_checkpoint(ckpt, root / f"{name}.bin").output, transformers_ternary(ckpt))
    return out


def transformers_ternary(ckpt: Path) -> dict:
    """name -> (trits, gamma) as transformers' BitNet (and bitnet.cpp's preprocess) compute them, in torch:
    s = 1 / clamp(mean|W|, 1e-5), T = clamp(round(W s), -1, 1), gamma = 1 / s. torch's fp32 mean depends on
    its thread count in the last bit, so gammas are compared to one ulp here, and bit for bit with the file."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for name, w in load_file(ckpt / "model.safetensors").items():
        if w.ndim == 2 and "embed_tokens" not in name:
            s = 1 / w.float().abs().mean().clamp(min=1e-5)
            out[name] = ((w * s).round().clamp(-1, 1).to(torch.int8).numpy(), (1 / s).numpy())
    return out


def stored_scales(path: Path) -> dict:
    """GGUF tensor name -> the ternary scale as the file stores it: I2_S's trailing float32, or max|w| of floats."""
    out = {}
    with GGUFFile.open(path) as gf:
        for t in gf.tensors.values():
            if t.type_name == "I2_S":
                out[t.name] = gf.raw(t.name, t.count // 4, 4).view("<f4")[0]
            elif t.type_name == "F32" and len(t.dims) == 2 and t.name != "token_embd.weight":
                out[t.name] = np.abs(gf.raw(t.name).view("<f4")).max()
    return out


def gguf_path(name: str, tmp_path: Path) -> Path:
    if name.endswith(".gz"):
        out = tmp_path / name[:-3]
        with gzip.open(DATA / name) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return out
    return DATA / name


def greedy(path, n=32):
    """n greedy tokens after a prompt, never stopping early (an EOS is just another token here)."""
    from bitnet_cli.engine import Engine

    with Engine.load(path, threads=1) as e:
        ids = e.encode("To be, or not to be")
        logits = e.forward(ids, 0, all_logits=False)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(logits[-1])))
            logits = e.forward(out[-1:], len(ids) + len(out) - 1, all_logits=False)
        return out


def compare(ours, ref, source: Path, exact_embedding: bool):
    from bitnet_cli.arch import gguf_name

    ref, ternary = ref
    stored = stored_scales(source)
    with PackedModel.open(ours) as a, PackedModel.open(ref) as b:
        assert a.dims == b.dims and a.names == b.names
        for name in a.names:
            if name in ternary:
                trits, gamma = a.ternary(name)
                np.testing.assert_array_equal(trits, ternary[name][0], err_msg=name)
                assert gamma == stored[gguf_name(name)], name  # the scale bitnet.cpp stored, kept bit for bit
                assert abs(gamma - ternary[name][1]) <= np.spacing(gamma), name  # which is transformers'
            elif name.endswith("_scale") and name[: -len("_scale")] in ternary:
                continue
            elif "embed_tokens" not in name or exact_embedding:
                np.testing.assert_array_equal(a.tensor(name), b.tensor(name), err_msg=name)
        assert a.tokenizer_config["eos_token"] == "<|end_of_text|>"
        assert "BITNETAssistant" in a.tokenizer_config["chat_template"]  # the converter's template, carried over


@pytest.mark.parametrize("fixture, model, kind", [
    ("a-f32.gguf.gz", "a", "F32"),  # bitnet.cpp's converter before quantising: floats, ternary x one scale
    ("a-i2_s-f16.gguf", "a", "F16"),  # llama-quantize I2_S, F16 head
])
def test_lossless_fixtures_import_identical_to_the_hf_checkpoint(hf_packed, tmp_path, fixture, model, kind):
    src = gguf_path(fixture, tmp_path)
    summary = pack_checkpoint(src, tmp_path / "m.bin")
    assert summary.embeddings == "f16"
    compare(tmp_path / "m.bin", hf_packed[model], src, exact_embedding=True)
    assert greedy(tmp_path / "m.bin") == greedy(hf_packed[model][0])
    with GGUFFile.open(src) as gf:
        assert gf.metadata["general.architecture"] == "bitnet-25"
        assert gf.tensor("token_embd.weight").type_name == kind


@pytest.mark.parametrize("fixture, model, kind, embeddings, how", [
    ("a-i2_s-q4_0.gguf", "a", "Q4_0", None, "dequantised exactly"),  # the default for Q4_0: f16, the closest
    ("b-i2_s-q6_k.gguf", "b", "Q6_K", "f16", "dequantised exactly"),
    ("b-i2_s-q6_k.gguf", "b", "Q6_K", None, "its codes and scales converted as they are"),  # default: q6, lossless
])
def test_quantised_head_fixtures_keep_trits_and_dequantise_the_head_exactly(hf_packed, tmp_path, fixture, model, kind,
                                                                            embeddings, how):
    summary = pack_checkpoint(DATA / fixture, tmp_path / "m.bin", embeddings=embeddings)
    stored = embeddings or {"Q4_0": "f16", "Q6_K": "q6"}[kind]
    assert summary.embeddings == stored
    note = next(n for n in summary.notes if "'token_embd.weight'" in n)
    assert f"({kind}, {how}) stored as {stored} embeddings" in note
    assert note.endswith("lossless") == (stored == "q6")
    compare(tmp_path / "m.bin", hf_packed[model], DATA / fixture, exact_embedding=False)
    with GGUFFile.open(DATA / fixture) as gf, PackedModel.open(tmp_path / "m.bin") as pm, \
            PackedModel.open(hf_packed[model][0]) as ref:
        t = gf.tensor("token_embd.weight")
        exact = quants.dequantize(kind, gf.raw(t.name), t.dims[0])
        np.testing.assert_array_equal(pm.embedding(), exact if stored == "q6" else exact.astype(np.float16).astype(np.float32))
        err = np.abs(exact - ref.embedding()).max()
        # ggml maps a block's largest-magnitude value to -8 (-32) steps, so the other sign clips by up to one step
        bound = {"Q4_0": 1 / 7, "Q6_K": 1 / 30}[kind]
        assert 0 < err < bound * np.abs(ref.embedding()).max()  # a quantised copy of the same matrix


def test_tokenizer_from_bitnet_cpp_converter_encodes_like_the_original(tmp_path):
    from tokenizers import Tokenizer

    from bitnet_cli.gguf.tokenizer import rebuild

    with gzip.open(DATA / "tokenizer_1k.json.gz") as f:
        original = Tokenizer.from_str(f.read().decode())
    with GGUFFile.open(DATA / "tokenizer_1k.gguf") as gf:
        assert "tokenizer.ggml.pre" not in gf.metadata  # bitnet.cpp's converter does not record it
        text, config, note = rebuild(gf.metadata, str(gf.path), len(gf.metadata["tokenizer.ggml.tokens"]))
    assert "inferred llama3" in note
    rebuilt = Tokenizer.from_str(text)
    corpus = (Path(__file__).parents[1] / "bitnet_cli" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    samples = [corpus[i:i + 300] for i in range(0, 60_000, 300)] + [
        "Numbers 1234567 and 3.14159, dates 2026-12-02!", "  leading  and trailing   ", "tabs\tand\r\nCRLF\n\n\n",
        "ünïcödé café naïve 😀 日本語", "<|begin_of_text|>special<|end_of_text|>", "I'm you're WE'LL they'VE", ""]
    for s in samples:
        assert rebuilt.encode(s, add_special_tokens=False).ids == original.encode(s, add_special_tokens=False).ids, s
        assert rebuilt.decode(original.encode(s).ids) == original.decode(original.encode(s).ids)
    assert config == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
