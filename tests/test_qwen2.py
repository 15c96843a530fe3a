"""The qwen2 family (Qwen2ForCausalLM with BitLinear projections: Llama with float q/k/v biases)
against transformers' own Qwen2ForCausalLM carrying the bitnet quantization_config: our torch
forward, the packed file (format version 3, with bias tensors) on the C engine, greedy decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (assert_engine_matches, assert_greedy_matches_transformers, load_hf_llama_reference,
                      make_llama_checkpoint)

from bitnet_cli.model import BitNetForCausalLM

QKV = ("q_proj", "k_proj", "v_proj")
# (convention, make_llama_checkpoint kwargs): online bf16-style latent weights with a tied head, and
# HF1BitLLM's offline uint8 layout (weight_scale divided) with an untied one. As in test_llama.py, the
# seeds put no activation within float rounding of an int8 boundary (transformers adds the bias inside
# its float product, the engine after its exact integer one); the numpy reference, which computes as
# the engine does, is held to 1e-3 as well.
CASES = {
    "online-tied": ("online", dict(tie_word_embeddings=True, seed=6)),
    "bitlinear-untied": ("bitlinear-default", dict(num_key_value_heads=1, seed=2)),
    # AutoBitLinear offline multiplies the bias by weight_scale too (it is inside its product)
    "autobitlinear-offline": ("autobitlinear-offline", dict(seed=3)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def qwen2(request, tmp_path_factory, test_tokenizer_dir):
    """(HF checkpoint, packed file, convention) of one case; f16-representable embeddings."""
    from bitnet_cli.pack import pack_checkpoint

    convention, kwargs = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    ckpt = make_llama_checkpoint(tmp / "hf", test_tokenizer_dir, convention=convention, architecture="Qwen2",
                                 initializer_range=0.1, **kwargs)
    pack_checkpoint(ckpt, tmp / "model.bin")
    return ckpt, tmp / "model.bin", convention


def test_torch_logits_match_transformers(qwen2):
    ckpt, _, _ = qwen2
    ref, ours = load_hf_llama_reference(ckpt), BitNetForCausalLM.from_pretrained(ckpt)
    assert ours.config.family == "qwen2" and ours.model.layers[1].self_attn.v_proj.bias is not None
    ids = torch.randint(0, 389, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_packed_qwen2_holds_the_biases_and_matches_transformers_on_the_engine(qwen2):
    from safetensors.numpy import load_file

    from bitnet_cli.pack import PackedModel, reference

    ckpt, packed, convention = qwen2
    ids = np.random.default_rng(0).integers(2, 389, 100)
    with torch.no_grad():
        want = load_hf_llama_reference(ckpt)(torch.from_numpy(ids[None])).logits[0].numpy()
    source = load_file(str(ckpt / "model.safetensors"))
    with PackedModel.open(packed) as pm:
        assert pm.metadata["format_version"] == "3" and pm.dims.family == "qwen2"
        biases = [n for n in pm.names if n.endswith(".bias")]
        assert sorted(biases) == sorted(f"model.layers.{i}.self_attn.{p}.bias" for i in range(2) for p in QKV)
        for name in biases:  # stored as the engine adds them: after the rescale
            scale = source[name.replace(".bias", ".weight_scale")] if convention == "autobitlinear-offline" else 1
            np.testing.assert_array_equal(pm.tensor(name), source[name] * scale)
        ref = reference.forward(pm, ids)
    assert_engine_matches(packed, ids, want, ref)  # the batched forward (serve) included


def test_packed_qwen2_greedy_64_tokens_match_transformers(qwen2):
    ckpt, packed, _ = qwen2
    assert_greedy_matches_transformers(ckpt, packed)


def test_a_version_2_file_claiming_qwen2_is_refused(qwen2, tmp_path):
    """A reader must not run a qwen2 file without its biases: version 2 cannot hold them."""
    from bitnet_cli.errors import BitnetError
    from bitnet_cli.pack import PackedModel

    _, packed, _ = qwen2
    data = packed.read_bytes()
    (tmp_path / "v2.bin").write_bytes(data.replace(b'"format_version":"3"', b'"format_version":"2"', 1))
    with pytest.raises(BitnetError, match="needs format version 3 but the file says 2"):
        PackedModel.open(tmp_path / "v2.bin")
