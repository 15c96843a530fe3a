"""bitnet_cli.arch (the one model description) and the small shared helpers (tokens, files)."""

from __future__ import annotations

import pytest

from bitnet_cli import arch
from bitnet_cli.arch import (
    FAMILY_BY_MODEL_TYPE, PRESETS, ModelDims, bitnet_config, gguf_name, layer_tensor, split_layer_tensor,
)
from bitnet_cli.errors import BitnetError

CONFIG_2B4T = bitnet_config(PRESETS["2b4t"].fields)


def test_2b4t_preset_is_the_published_shape():
    d = ModelDims.from_config(CONFIG_2B4T)
    assert (d.hidden_size, d.intermediate_size, d.num_layers, d.num_heads, d.num_kv_heads, d.vocab_size) == \
        (2560, 6912, 30, 20, 5, 128256)
    assert d.head_dim == 128 and d.kv_dim == 640 and d.tie_word_embeddings
    assert d.ternary_parameters() == 30 * (2 * 2560 * 2560 + 2 * 640 * 2560 + 3 * 6912 * 2560)


def test_train_and_bench_read_the_same_presets():
    """`bitnet train` (model.preset) and `bitnet bench --shape` (synthetic models) build one shape per name."""
    from bitnet_cli.pack.synthetic import shape_config
    from bitnet_cli.train.recipe import ModelSpec

    for name in PRESETS:
        trained = ModelSpec(preset=name).resolved()
        benched = shape_config(name)
        assert all(trained[k] == benched[k] for k in PRESETS[name].fields if k != "model_type"), name
        # a family's preset names its model_type; a recipe calls it model.family
        assert FAMILY_BY_MODEL_TYPE[benched["model_type"]] == trained["family"], name
    assert shape_config("700m")["num_attention_heads"] == ModelSpec(preset="700m").resolved()["num_attention_heads"]


@pytest.mark.parametrize("edit, key", [
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_attention_heads": "8"}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"head_dim": 60}, "head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "RoPE scaling"),
    ({"rope_parameters": [1]}, "rope_parameters"),
    ({"rms_norm_eps": -1}, "rms_norm_eps"),
    ({"quantization_config": {"use_rms_norm": 1}}, "use_rms_norm"),
])
def test_bad_configs_name_the_key(edit, key):
    with pytest.raises(BitnetError, match=f"where: .*{key}"):
        ModelDims.from_config({**CONFIG_2B4T, **edit}, "where")


def test_the_torch_config_is_checked_by_the_same_parser():
    from bitnet_cli.model import BitNetConfig

    with pytest.raises(BitnetError, match="num_key_value_heads=3 must divide num_attention_heads=4"):
        BitNetConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(BitnetError, match="config.json: llama3 RoPE scaling needs a positive number for 'factor'"):
        BitNetConfig.from_hf_dict({**CONFIG_2B4T, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}})
    with pytest.raises(BitnetError, match="config.json: RoPE scaling rope_type='yarn' is not supported"):
        BitNetConfig.from_hf_dict({**CONFIG_2B4T, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})


def test_every_table_row_names_one_tensor_everywhere():
    d = ModelDims.from_config(CONFIG_2B4T)
    names = {layer_tensor(3, row.name) for row in (*d.projections(), *d.layer_norms())}
    assert len(names) == 11
    for name in names:
        assert split_layer_tensor(name)[:2] == (3, name[len("model.layers.3."):-len(".weight")])
        assert gguf_name(name).startswith("blk.3.") and gguf_name(name).endswith(".weight")
    assert gguf_name("model.layers.3.mlp.up_proj.weight_scale") == "blk.3.ffn_up.scale"
    assert gguf_name(arch.EMBED) == "token_embd.weight"
    with pytest.raises(ValueError):
        split_layer_tensor("lm_head.weight")


def test_special_ids_follow_the_tokenizer_config_then_config_json():
    from bitnet_cli.tokenizer import BOS, EOS, special_id, train_bpe

    tok = train_bpe(["hello world, hello there"] * 20, 300)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    assert special_id("bos", tok, {"bos_token": {"content": EOS}}, {}) == 1  # AddedToken form
    assert special_id("eos", tok, {"eos_token": "<nope>"}, {"eos_token_id": [7, 8]}) == 7
    assert special_id("eos", tok, {}, {"eos_token_id": 400}, vocab_size=300) is None
    assert special_id("eos", tok, {}, {}) is None and special_id("eos", tok, {}, {}, guess=True) == 1


def test_one_cache_root(monkeypatch, tmp_path):
    from bitnet_cli.bench.target import default_cache_dir
    from bitnet_cli.files import cache_root
    from bitnet_cli.train.data import cache_root as token_cache_root
    from bitnet_cli.train.recipe import DataSpec

    monkeypatch.delenv("BITNET_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "bitnet-cli"
    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "mine"))
    assert token_cache_root(DataSpec()) == cache_root() == tmp_path / "mine"
    assert default_cache_dir() == tmp_path / "mine" / "synthetic"
