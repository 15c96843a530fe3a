"""Every input kind of `bitnet pack`: HF float, HF packed (both linear classes), sharded, hub cache, own."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bitnet_cli.errors import BitnetError
from bitnet_cli.pack import PackedModel, pack_checkpoint, reference
from conftest import make_hf_checkpoint, write_shards
from test_pack import f16_exact_embeddings, hf_logits, torch_weight_quant

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
IDS = np.random.default_rng(7).integers(0, 389, size=24)


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory, test_tokenizer_dir):
    return f16_exact_embeddings(make_hf_checkpoint(tmp_path_factory.mktemp("float"), test_tokenizer_dir, seed=5))


def make_hf_packed(src, dst, linear_class: str, scale_dtype: str = "float32"):
    """An offline-quantised HF checkpoint made with transformers' own `pack_weights`."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers.integrations.bitnet import pack_weights

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name in list(tensors):
        if any(f".{p}.weight" in name for p in PROJ):
            w = tensors[name].float()
            scale = 1.0 / w.abs().mean().clamp(min=1e-5)  # transformers' WeightQuant arithmetic
            trits = (w * scale).round().clamp(-1, 1)
            tensors[name] = pack_weights(trits.clone())
            stored = 1.0 / scale if linear_class == "autobitlinear" else scale
            tensors[name + "_scale"] = stored.reshape(1).to(getattr(torch, scale_dtype))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline"}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
def test_hf_packed_source_matches_transformers_and_float_source(linear_class, float_ckpt, tmp_path):
    packed_src = make_hf_packed(float_ckpt, tmp_path / "src", linear_class)
    summary = pack_checkpoint(packed_src, tmp_path / "a.bin")
    assert summary.source_kind == "hf-packed"
    pack_checkpoint(float_ckpt, tmp_path / "b.bin")
    with PackedModel.open(tmp_path / "a.bin") as a, PackedModel.open(tmp_path / "b.bin") as b:
        for i in range(2):
            for p in PROJ:
                name = f"model.layers.{i}.{p}.weight"
                np.testing.assert_array_equal(a.tensor(name), b.tensor(name))  # same trits, same bytes
                np.testing.assert_allclose(a.tensor(name + "_scale"), b.tensor(name + "_scale"), rtol=3e-7)
        got = reference.forward(a, IDS)
        assert np.abs(got - reference.forward(b, IDS)).max() <= 1e-4
    assert np.abs(got - hf_logits(packed_src, IDS)).max() <= 1e-4  # transformers on the packed source


def test_hf_packed_bf16_scales_exact_trits_looser_logits(float_ckpt, tmp_path):
    """As published: bf16 weight_scale. Trits stay exact; logits move (bf16 scale), so a loose bound."""
    packed_src = make_hf_packed(float_ckpt, tmp_path / "src", "autobitlinear", scale_dtype="bfloat16")
    pack_checkpoint(packed_src, tmp_path / "a.bin")
    pack_checkpoint(float_ckpt, tmp_path / "b.bin")
    with PackedModel.open(tmp_path / "a.bin") as a, PackedModel.open(tmp_path / "b.bin") as b:
        for p in PROJ:
            name = f"model.layers.1.{p}.weight"
            np.testing.assert_array_equal(a.tensor(name), b.tensor(name))
            np.testing.assert_allclose(a.tensor(name + "_scale"), b.tensor(name + "_scale"), rtol=2**-8)
        got = reference.forward(a, IDS)
        assert np.abs(got - reference.forward(b, IDS)).max() <= 0.15
    assert np.abs(got - hf_logits(packed_src, IDS)).max() <= 1e-4  # transformers reads the same bf16 scales


def test_hf_packed_non_ternary_code_is_rejected(float_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_hf_packed(float_ckpt, tmp_path / "src", "autobitlinear")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.gate_proj.weight"][2, 3] = 0xFF
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(BitnetError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.gate_proj\.weight'.*not a ternary"):
        pack_checkpoint(src, tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists()


def test_from_forces_and_checks_the_kind(float_ckpt, tmp_path):
    from typer.testing import CliRunner

    from bitnet_cli.cli import app

    with pytest.raises(BitnetError, match="kind hf-packed given but the weights are not packed"):
        pack_checkpoint(float_ckpt, tmp_path / "x.bin", kind="hf-packed")
    r = CliRunner().invoke(app, ["pack", str(float_ckpt), str(tmp_path / "x.bin"), "--from", "hf-packed"])
    assert r.exit_code == 1 and "--from hf-packed given but the weights are not packed" in " ".join(r.output.split())
    packed_src = make_hf_packed(float_ckpt, tmp_path / "src", "bitlinear")
    with pytest.raises(BitnetError, match="kind hf given"):
        pack_checkpoint(packed_src, tmp_path / "x.bin", kind="hf")
    assert pack_checkpoint(float_ckpt, tmp_path / "own.bin", kind="own").source_kind == "own"


def test_sharded_checkpoint_packs_identically(float_ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    sharded = tmp_path / "sharded"
    shutil.copytree(float_ckpt, sharded)
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    write_shards(tensors, sharded, 3, save_file)
    pack_checkpoint(sharded, tmp_path / "a.bin")
    pack_checkpoint(float_ckpt, tmp_path / "b.bin")
    with PackedModel.open(tmp_path / "a.bin") as a, PackedModel.open(tmp_path / "b.bin") as b:
        assert a.checksums == b.checksums


def fill_hub_cache(cache, repo_id, files_dir, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay out `files_dir` the way huggingface-hub's cache stores a snapshot of `repo_id`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(files_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_from_a_prefilled_offline_cache(float_ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    fill_hub_cache(cache, "acme/tiny-bitnet", float_ckpt)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    summary = pack_checkpoint("acme/tiny-bitnet", tmp_path / "hub.bin")
    assert summary.source.startswith("hub:acme/tiny-bitnet")
    pack_checkpoint(float_ckpt, tmp_path / "local.bin")
    with PackedModel.open(tmp_path / "hub.bin") as a, PackedModel.open(tmp_path / "local.bin") as b:
        assert a.checksums == b.checksums
    with pytest.raises(BitnetError, match="'acme/missing'.*HF_HUB_OFFLINE.*not in the local cache"):
        pack_checkpoint("acme/missing", tmp_path / "missing.bin")
    # a mistyped run directory reads as a hub id too: the error also says the directory is missing
    with pytest.raises(BitnetError, match="'runs/small-float'.*not in the local cache.*nor is there a local "
                                          "directory runs/small-float"):
        pack_checkpoint("runs/small-float", tmp_path / "missing.bin")
    with pytest.raises(BitnetError, match="not in the local cache") as e:
        pack_checkpoint("acme/missing", tmp_path / "missing.bin", kind="hub")  # named a hub id: no directory meant
    assert "nor is there" not in str(e.value)


def test_own_training_run_packs_and_matches_our_torch_model(tmp_path):
    import torch

    from bitnet_cli.model import BitNetForCausalLM
    from bitnet_cli.train import load_recipe, train
    from test_train import micro_recipe

    recipe = load_recipe(None, ["train.steps=4"], data=micro_recipe())
    run = tmp_path / "run"
    train(recipe, out_dir=run, progress=False)
    summary = pack_checkpoint(run, tmp_path / "own.bin")  # the run directory: its final/ checkpoint
    assert summary.source_kind == "own" and summary.source.endswith("final")

    model = BitNetForCausalLM.from_pretrained(run / "final").float().eval()
    with torch.no_grad():  # the packed file holds f16 embeddings: give the torch model the same numbers
        emb = model.model.embed_tokens.weight
        emb.copy_(emb.half().float())
        ids = np.random.default_rng(1).integers(0, 320, size=20)
        want = model(torch.tensor(ids)[None])[0].float().numpy()
    with PackedModel.open(tmp_path / "own.bin") as pm:
        assert pm.tokenizer_json == (run / "final" / "tokenizer.json").read_text()
        err = np.abs(reference.forward(pm, ids) - want).max(axis=-1)  # per position
    # A one-ulp difference between numpy's and torch's fp32 sums can flip one int8 activation
    # rounding (x * 127 / max|x| landing on .5); such a flip moves later logits by ~1e-3. Most
    # positions must agree tightly, and no flip may do more than that.
    assert np.median(err) <= 1e-5 and np.quantile(err, 0.75) <= 1e-4 and err.max() <= 1e-2, err

    plain = load_recipe(None, ["train.steps=2", "model.quant=none"], data=micro_recipe())
    train(plain, out_dir=tmp_path / "plain", progress=False)
    with pytest.raises(BitnetError, match="trained without ternary quantisation"):
        pack_checkpoint(tmp_path / "plain", tmp_path / "plain.bin")
