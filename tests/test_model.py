"""Our torch BitNet b1.58 against transformers' BitNetForCausalLM, both ways round."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_hf_reference, make_hf_checkpoint
from safetensors.torch import load_file, save_file

from bitnet_cli.errors import BitnetError
from bitnet_cli.model import BitNetConfig, BitNetForCausalLM, ternarize


def _ids(vocab: int, shape=(2, 48), seed=1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quantized,tied", [(True, True), (True, False), (False, False)])
def test_logits_match_transformers(tmp_path, test_tokenizer_dir, quantized, tied):
    ckpt = make_hf_checkpoint(tmp_path / "hf", test_tokenizer_dir, quantized=quantized, tie_word_embeddings=tied,
                              num_key_value_heads=2, seed=3)
    ref = load_hf_reference(ckpt)
    ours = BitNetForCausalLM.from_pretrained(ckpt)
    assert ours.config.quant == ("bitnet" if quantized else "none")
    ids = _ids(389)
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == (2, 48, 389) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("quant", ["bitnet", "none"])
def test_our_checkpoint_loads_in_transformers(tmp_path, quant):
    config = BitNetConfig(vocab_size=300, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, quant=quant,
                          rope_theta=10000.0)
    torch.manual_seed(0)
    ours = BitNetForCausalLM(config).eval()
    ours.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert ("quantization_config" in cfg) == (quant == "bitnet")
    assert "lm_head.weight" not in load_file(str(tmp_path / "ck" / "model.safetensors"))
    ref = load_hf_reference(tmp_path / "ck")
    ids = _ids(300, (1, 64))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    # ...and back: the round trip is exact.
    again = BitNetForCausalLM.from_pretrained(tmp_path / "ck")
    assert again.config.rope_theta == 10000.0 and again.config.quant == quant
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_ternarize_is_transformers_arithmetic():
    from transformers.integrations.bitnet import WeightQuant

    w = torch.randn(37, 53, generator=torch.Generator().manual_seed(0)) * 0.02
    trits, gamma = ternarize(w)
    assert trits.dtype == torch.int8 and set(trits.unique().tolist()) <= {-1, 0, 1}
    assert gamma.dtype == torch.float32 and gamma.item() == pytest.approx(w.abs().mean().item())
    assert torch.equal(trits.float() * gamma, WeightQuant.forward(None, w))  # bit for bit
    # An all-zero tensor is clamped, not divided by zero.
    t0, g0 = ternarize(torch.zeros(4, 4))
    assert g0.item() == pytest.approx(1e-5) and not t0.any()


@pytest.mark.parametrize("shape,scale,dtype", [((64, 96), 0.02, torch.float32), ((200, 389), 1.0, torch.float32),
                                               ((7, 1000), 0.05, torch.bfloat16), ((128, 128), 3e-6, torch.float32)])
def test_ternarize_agrees_with_the_numpy_twin(shape, scale, dtype):
    from bitnet_cli.pack.ternary import ternarize as np_ternarize

    w = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * scale).to(dtype)
    trits, gamma = ternarize(w)
    np_trits, np_gamma = np_ternarize(w.float().numpy())
    assert (trits.numpy() == np_trits).all()
    assert gamma.numpy().tobytes() == np.float32(np_gamma).tobytes()


def test_straight_through_gradients_reach_latent_weights():
    config = BitNetConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = BitNetForCausalLM(config)
    ids = _ids(50, (2, 16))
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sharded_and_bf16_checkpoints(tmp_path, test_tokenizer_dir):
    ckpt = make_hf_checkpoint(tmp_path / "hf", test_tokenizer_dir, tie_word_embeddings=False, seed=5)
    full = BitNetForCausalLM.from_pretrained(ckpt)
    sd = load_file(str(ckpt / "model.safetensors"))
    names = sorted(sd)
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(shard / fname))
        weight_map.update({k: fname for k in part})
    (shard / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = _ids(389, (1, 20))
    with torch.no_grad():
        assert torch.equal(BitNetForCausalLM.from_pretrained(shard)(ids), full(ids))
    bf16 = BitNetForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert bf16(ids).dtype == torch.bfloat16


def test_bad_checkpoints_name_the_problem(tmp_path, test_tokenizer_dir):
    with pytest.raises(BitnetError, match="no config.json"):
        BitNetForCausalLM.from_pretrained(tmp_path)
    ckpt = make_hf_checkpoint(tmp_path / "hf", test_tokenizer_dir)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["hidden_size"] = 128
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BitnetError, match="model.embed_tokens.weight has shape"):
        BitNetForCausalLM.from_pretrained(ckpt)
    cfg["hidden_size"] = 96
    cfg["quantization_config"]["quantization_mode"] = "offline"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BitnetError, match="offline"):
        BitNetForCausalLM.from_pretrained(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    del cfg["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BitnetError, match="cannot read safetensors"):
        BitNetForCausalLM.from_pretrained(ckpt)


@pytest.mark.parametrize("tied", [True, False])
def test_arch_counts_match_the_torch_modules(tied):
    """bitnet_cli.arch counts parameters and FLOPs from the description; the torch model is built
    from the same tables, so its real tensors must add up to the same numbers."""
    c = BitNetConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = BitNetForCausalLM(c)
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert c.arch.training_flops_per_token(seq_len=10) == 6 * n_matmul + 12 * 2 * 64 * 10
    assert c.arch.parameters() == sum(p.numel() for p in model.parameters())
    assert c.arch.parameters(exclude_embeddings=True) == c.arch.parameters() - 1000 * 64
    assert c.arch.ternary_parameters() == sum(m.weight.numel() for m in model.modules()
                                              if isinstance(m, torch.nn.Linear) and m is not model.lm_head)


def test_bitlinear_straight_through_values_and_gradients():
    from bitnet_cli.model import BitLinear, _quant_activation, _quant_weight

    torch.manual_seed(0)
    lin = BitLinear(24, 8)
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = lin(x)
    with torch.no_grad():
        exact = lin(x)
    assert torch.allclose(y, exact, rtol=0, atol=1e-6)  # the STE form computes the same values
    g = torch.randn_like(y)
    y.backward(g)
    # straight-through: the gradients of F.linear(q(x), q(W)) as if q were the identity
    xq, wq = _quant_activation(x.detach()), _quant_weight(lin.weight.detach())
    assert torch.allclose(x.grad, g @ wq, atol=1e-6)
    assert torch.allclose(lin.weight.grad, g.reshape(-1, 8).T @ xq.reshape(-1, 24), atol=1e-5)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
def test_the_compiled_forward_is_one_graph_reading_the_rope_tables_of_one_op(scaling):
    """torch.compile sees RoPE's cos/sin as the outputs of one opaque op (bitnet::rope_tables), which
    inductor cannot recompute per element of q and k, and the model traces without a graph break."""
    config = BitNetConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          bos_token_id=None, eos_token_id=None, rope_scaling=scaling)
    model = BitNetForCausalLM(config)
    ids = _ids(50, (1, 24))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(disable=False):  # conftest turns compilation off for the other tests
        explained = torch._dynamo.explain(lambda t: model(t))(ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    ops = (torch.ops.bitnet.rope_tables, torch.ops.bitnet.rope_tables.default)
    calls = [n for g in explained.graphs for n in g.graph.nodes if n.target in ops]
    assert len(calls) == 1
