"""The Llama-architecture 1.58-bit family (Llama3-8B-1.58, Falcon3-*-1.58bit, Falcon-E) against
transformers' own LlamaForCausalLM carrying the bitnet quantization_config, in every storage
convention: our torch forward, the packed file on the C engine, greedy decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import LLAMA3_ROPE, LLAMA_CONVENTIONS, load_hf_llama_reference, make_llama_checkpoint

from bitnet_cli.errors import BitnetError
from bitnet_cli.model import BitNetConfig, BitNetForCausalLM, bitnet_convention


def _ids(vocab: int, shape=(2, 80), seed=1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("convention", sorted(LLAMA_CONVENTIONS))
@pytest.mark.parametrize("llama3", [False, True])
def test_torch_logits_match_transformers(tmp_path, convention, llama3):
    """max |ours - transformers| <= 1e-4 in fp32, untied head, GQA, with and without llama3 RoPE
    (positions past original_max_position_embeddings=64, where its scaling matters)."""
    ckpt = make_llama_checkpoint(tmp_path / "ck", convention=convention, rope_scaling=LLAMA3_ROPE if llama3 else None,
                                 seed=3)
    ref = load_hf_llama_reference(ckpt)
    ours = BitNetForCausalLM.from_pretrained(ckpt)
    assert ours.config.family == "llama" and ours.config.activation == "silu" and not ours.config.sub_norms
    assert (ours.config.rope_scaling is not None) == llama3
    ids = _ids(389)
    with torch.no_grad():
        diff = (ref(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4


def test_head_dim_not_hidden_over_heads(tmp_path):
    """head_dim given explicitly (heads x head_dim != hidden_size), as Falcon3's 256-wide heads allow."""
    ckpt = make_llama_checkpoint(tmp_path / "ck", convention="bitlinear", head_dim=32, seed=4)
    ref, ours = load_hf_llama_reference(ckpt), BitNetForCausalLM.from_pretrained(ckpt)
    ids = _ids(389, (1, 40))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_scale_convention_matters(tmp_path):
    """Reading a bitlinear checkpoint as autobitlinear (multiply instead of divide) changes the
    logits: the test above would catch a convention mix-up."""
    ckpt = make_llama_checkpoint(tmp_path / "ck", convention="bitlinear", seed=5)
    right = BitNetForCausalLM.from_pretrained(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["linear_class"] = "autobitlinear"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    wrong = BitNetForCausalLM.from_pretrained(ckpt)
    ids = _ids(389, (1, 20))
    with torch.no_grad():
        assert (right(ids) - wrong(ids)).abs().max().item() > 1e-2


@pytest.mark.parametrize("qc,missing", [
    ({"linear_class": "bitlinear"}, "quant_method"),
    ({"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "online"}, "linear_class"),
    ({"quant_method": "bitnet", "use_rms_norm": True}, "use_rms_norm"),
    ({"quant_method": "bitnet", "linear_class": "fancy"}, "linear_class"),
    ({"quant_method": "gptq"}, "quant_method"),
])
def test_undeterminable_convention_is_refused_by_key(qc, missing):
    with pytest.raises(BitnetError, match=missing):
        bitnet_convention(qc, "config.json")


def test_conventions_follow_transformers_defaults():
    assert bitnet_convention(None, "c") is None
    assert bitnet_convention({"quant_method": "bitnet"}, "c") == ("offline", "divide")
    assert bitnet_convention({"quant_method": "bitnet", "linear_class": "autobitlinear"}, "c") == ("offline", "multiply")
    assert bitnet_convention(dict(LLAMA_CONVENTIONS["online"]), "c") == ("online", "multiply")


def test_offline_checkpoint_missing_weight_scale_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = make_llama_checkpoint(tmp_path / "ck", convention="bitlinear", seed=6)
    state = load_file(str(ckpt / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(BitnetError, match=r"model\.layers\.1\.mlp\.up_proj\.weight_scale"):
        BitNetForCausalLM.from_pretrained(ckpt)


def test_our_llama_checkpoint_loads_in_transformers(tmp_path):
    """A llama-family model of ours (llama3 RoPE, untied) saved and run by transformers, and back."""
    config = BitNetConfig(vocab_size=300, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          family="llama", hidden_act="silu", rope_theta=10000.0, rope_scaling=LLAMA3_ROPE,
                          bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    ours = BitNetForCausalLM(config).eval()
    ours.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_act"] == "silu"
    ref = load_hf_llama_reference(tmp_path / "ck")
    ids = _ids(300, (1, 100))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max().item() <= 1e-4
        again = BitNetForCausalLM.from_pretrained(tmp_path / "ck")
        assert again.config.rope_scaling == ours.config.rope_scaling
        assert torch.equal(again(ids), ours(ids))


def test_family_and_activation_must_agree():
    with pytest.raises(BitnetError, match="silu"):
        BitNetConfig(family="llama", hidden_act="relu2")
    with pytest.raises(BitnetError, match="family"):
        BitNetConfig(family="gpt2")
