"""quantization_config use_rms_norm: transformers' BitLinear / AutoBitLinear put an RMSNorm (its own
weight `<proj>.rms_norm.weight`, eps `rms_norm_eps`) on every projection's input before quantising it.
Against transformers' own models with it: our torch forward, the packed file (format version 3) on the
C engine in both forwards, greedy decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (assert_engine_matches, assert_greedy_matches_transformers, load_hf_llama_reference,
                      make_llama_checkpoint)

from bitnet_cli.errors import BitnetError
from bitnet_cli.model import BitNetForCausalLM

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
# (architecture, convention, make_llama_checkpoint kwargs). As in test_llama.py, the seeds put no
# activation within float rounding of an int8 boundary over the 48 tokens compared (two norms before
# each quantisation meet one more often than one, hence fewer tokens than there); the numpy
# reference, which computes as the engine does, is held to 1e-3 as well.
CASES = {
    "llama-online": ("Llama", "online", dict(seed=2)),
    "llama-bitlinear": ("Llama", "bitlinear-default", dict(num_key_value_heads=1, seed=2)),
    "qwen2-autobitlinear": ("Qwen2", "autobitlinear-offline", dict(tie_word_embeddings=True, seed=3)),
}
EPS = 1e-6  # transformers' BitNetQuantConfig default, written out


@pytest.fixture(scope="module", params=sorted(CASES))
def normed(request, tmp_path_factory, test_tokenizer_dir):
    """(HF checkpoint, packed file) of one case; f16-representable embeddings."""
    from bitnet_cli.pack import pack_checkpoint

    architecture, convention, kwargs = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    ckpt = make_llama_checkpoint(tmp / "hf", test_tokenizer_dir, convention=convention, architecture=architecture,
                                 initializer_range=0.1, bitlinear_norm_eps=EPS, **kwargs)
    pack_checkpoint(ckpt, tmp / "model.bin")
    return ckpt, tmp / "model.bin"


def test_torch_logits_match_transformers(normed):
    ckpt, _ = normed
    ref, ours = load_hf_llama_reference(ckpt), BitNetForCausalLM.from_pretrained(ckpt)
    assert type(ref.model.layers[0].mlp.down_proj.rms_norm).__name__ == "LlamaRMSNorm"  # transformers built them
    assert ours.config.arch.bitlinear_norm_eps == EPS and ours.model.layers[1].mlp.up_proj.rms_norm is not None
    ids = torch.randint(0, 389, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_packed_file_holds_the_norms_and_matches_transformers_on_the_engine(normed):
    from safetensors.numpy import load_file

    from bitnet_cli.pack import PackedModel, reference

    ckpt, packed = normed
    ids = np.random.default_rng(0).integers(2, 389, 48)
    with torch.no_grad():
        want = load_hf_llama_reference(ckpt)(torch.from_numpy(ids[None])).logits[0].numpy()
    source = load_file(str(ckpt / "model.safetensors"))
    with PackedModel.open(packed) as pm:
        assert pm.metadata["format_version"] == "3" and pm.dims.bitlinear_norm_eps == EPS
        assert pm.config["quantization_config"] == {"use_rms_norm": True, "rms_norm_eps": EPS}
        for i in range(2):
            for proj in PROJECTIONS:
                name = f"model.layers.{i}.{proj}.rms_norm.weight"
                np.testing.assert_array_equal(pm.tensor(name), source[name])
        ref = reference.forward(pm, ids)
    assert_engine_matches(packed, ids, want, ref)  # the batched forward (serve) included


def test_greedy_64_tokens_match_transformers(normed):
    assert_greedy_matches_transformers(*normed)


def test_norms_without_the_flag_are_refused(normed, tmp_path):
    """A checkpoint carrying `<proj>.rms_norm.weight` whose config does not say use_rms_norm: running it
    without them would compute another function, so neither torch nor pack takes it."""
    from bitnet_cli.pack import pack_checkpoint

    ckpt, _ = normed
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ckpt.iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["quantization_config"]["use_rms_norm"]
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BitnetError, match=r"rms_norm\.weight"):
        BitNetForCausalLM.from_pretrained(plain)
    with pytest.raises(BitnetError, match=r"rms_norm\.weight'? is a projection's input norm.*use_rms_norm"):
        pack_checkpoint(plain, tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize("qc,message", [
    ({"use_rms_norm": "yes"}, "quantization_config.use_rms_norm must be true or false, got 'yes'"),
    ({"use_rms_norm": True, "rms_norm_eps": 0}, "quantization_config.rms_norm_eps must be a positive finite"),
    ({"use_rms_norm": True, "rms_norm_eps": None}, "quantization_config.rms_norm_eps must be a positive finite"),
])
def test_bad_use_rms_norm_fields_are_refused_by_name(qc, message):
    from bitnet_cli.arch import ModelDims, bitnet_config

    config = bitnet_config(dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=2, quantization_config={"quant_method": "bitnet", **qc}))
    with pytest.raises(BitnetError, match=message):
        ModelDims.from_config(config, "config.json")


def test_gguf_export_of_a_bitnet_model_with_them_is_refused():
    """No GGUF architecture norms each projection's input, not even bitnet.cpp's BitNet b1.58 graph."""
    from bitnet_cli.arch import ModelDims, bitnet_config
    from bitnet_cli.pack.gguf import check_gguf_shapes

    fields = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=2,
                  tie_word_embeddings=True)
    check_gguf_shapes(ModelDims.from_config(bitnet_config(fields)), "i2_s", "config.json", "f16")
    dims = ModelDims.from_config(bitnet_config(dict(fields, quantization_config={
        "quant_method": "bitnet", "use_rms_norm": True})))
    assert dims.family == "bitnet" and dims.bitlinear_norm_eps == 1e-6  # transformers' default eps
    with pytest.raises(BitnetError, match="use_rms_norm"):
        check_gguf_shapes(dims, "i2_s", "config.json", "f16")


def test_info_names_the_biases_and_the_norms(normed):
    from typer.testing import CliRunner

    from bitnet_cli.cli import app

    ckpt, packed = normed
    result = CliRunner().invoke(app, ["info", str(packed)])
    text = " ".join(result.output.replace("\u2502", " ").split())  # rich wraps cells at 80 columns
    assert result.exit_code == 0, result.output
    assert "projection input norms (use_rms_norm, eps 1e-06)" in text
    assert ("q/k/v biases" in text) == ("Qwen2" in json.loads((ckpt / "config.json").read_text())["architectures"][0])
