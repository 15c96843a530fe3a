"""Bad checkpoints and the `bitnet pack` / `bitnet info` commands: one clear line, non-zero exit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from bitnet_cli.checkpoint import open_checkpoint
from bitnet_cli.cli import app
from bitnet_cli.errors import BitnetError
from bitnet_cli.pack import pack_checkpoint

runner = CliRunner()


@pytest.fixture
def ckpt(hf_tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint that a test may break."""
    return shutil.copytree(hf_tiny_checkpoint, tmp_path / "ckpt")


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def edit_tensors(ckpt, fn):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    fn(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_open_checkpoint_reads_config_tokenizer_and_kind(hf_tiny_checkpoint):
    c = open_checkpoint(hf_tiny_checkpoint)
    assert c.kind == "hf" and c.config["hidden_size"] == 96
    assert c.tokenizer_config == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    w = c.read("model.layers.0.mlp.up_proj.weight")
    assert w.dtype == np.float32 and w.shape == (200, 96)
    np.testing.assert_array_equal(c.read("model.embed_tokens.weight", slice(10, 20)), c.read("model.embed_tokens.weight")[10:20])


def test_bf16_tensors_widen_exactly(test_tokenizer_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from conftest import make_hf_checkpoint

    d = make_hf_checkpoint(tmp_path / "bf16", test_tokenizer_dir, torch_dtype="bfloat16")
    want = load_file(d / "model.safetensors")["model.layers.1.self_attn.v_proj.weight"].to(torch.float32).numpy()
    np.testing.assert_array_equal(open_checkpoint(d).read("model.layers.1.self_attn.v_proj.weight"), want)


BAD_INPUTS = {
    "missing dir": (lambda c: shutil.rmtree(c), r"no such file or directory"),
    "no config": (lambda c: (c / "config.json").unlink(), r"config\.json: missing"),
    "no weights": (lambda c: (c / "model.safetensors").unlink(), r"no model\.safetensors"),
    "no tokenizer": (lambda c: (c / "tokenizer.json").unlink(), r"tokenizer\.json: missing"),
    "llama": (lambda c: edit_config(c, model_type="llama"), r"is a BitNet sub-norm, but model_type 'llama' has no"),
    "gpt2": (lambda c: edit_config(c, model_type="gpt2"), r"unsupported architecture model_type='gpt2'"),
    "gelu": (lambda c: edit_config(c, hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    "shape mismatch": (lambda c: edit_config(c, intermediate_size=208),
                       r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.ffn_sub_norm\.weight' has shape \[200\] but config\.json implies \[208\]"),
    "missing tensor": (lambda c: edit_tensors(c, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight")),
                       r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' is missing"),
    "inf embedding": (lambda c: edit_tensors(c, lambda t: t["model.embed_tokens.weight"].__setitem__((5, 5), np.inf)),
                      r"model\.safetensors: tensor 'model\.embed_tokens\.weight' has a non-finite value \(inf\)"),
    "truncated": (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-5000]),
                  r"model\.safetensors: tensor '.*': data ends at byte \d+ but the file has \d+ bytes \(truncated\?\)"),
    "bad shard index": (lambda c: (c / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}'),
                        r"points outside the checkpoint"),
    "pytorch bin": (lambda c: ((c / "model.safetensors").unlink(), (c / "pytorch_model.bin").write_bytes(b"x")),
                    r"only safetensors checkpoints are supported"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_line(case, ckpt, tmp_path):
    breaker, pattern = BAD_INPUTS[case]
    breaker(ckpt)
    out = tmp_path / "out.bin"
    with pytest.raises(BitnetError, match=pattern):
        pack_checkpoint(ckpt, out)
    result = runner.invoke(app, ["pack", str(ckpt), str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name != "ckpt"] == []


def test_cli_pack_info_verify_json(hf_tiny_checkpoint, tmp_path):
    out = tmp_path / "m.bin"
    result = runner.invoke(app, ["pack", str(hf_tiny_checkpoint), str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["file_bytes"] == out.stat().st_size and summary["embeddings"] == "f16"
    assert summary["ternary_bits_per_weight"] == pytest.approx(8 * sum(
        n * (-(-k // 128) * 128) / 4 for n, k in [(96, 96), (48, 96), (48, 96), (96, 96), (200, 96), (200, 96), (96, 200)]
    ) / sum(n * k for n, k in [(96, 96), (48, 96), (48, 96), (96, 96), (200, 96), (200, 96), (96, 200)]), rel=1e-5)

    result = runner.invoke(app, ["pack", str(hf_tiny_checkpoint), str(out)])
    assert result.exit_code == 1 and "already exists" in result.output
    result = runner.invoke(app, ["pack", str(hf_tiny_checkpoint), str(out), "--force", "--embeddings", "int8"])
    assert result.exit_code == 0 and "compression" in result.output

    result = runner.invoke(app, ["info", str(out), "--verify", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["verified"] is True and info["embeddings"] == "int8" and info["config"]["hidden_size"] == 96
    assert {t["name"] for t in info["tensors"]} >= {"model.embed_tokens.weight_scale", "model.norm.weight"}
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0 and "i2_k128" in result.output

    raw = bytearray(out.read_bytes())
    raw[-10] ^= 0xFF  # inside model.norm.weight, the last tensor
    out.write_bytes(bytes(raw))
    result = runner.invoke(app, ["info", str(out), "--verify"])
    assert result.exit_code == 1 and "checksum mismatch" in result.output and "model.norm.weight" in result.output

    result = runner.invoke(app, ["info", str(tmp_path / "nope.bin")])
    assert result.exit_code == 1 and "no such file" in result.output
    result = runner.invoke(app, ["pack", str(hf_tiny_checkpoint), str(tmp_path / "x.bin"), "--embeddings", "f8"])
    assert result.exit_code == 2  # typer rejects a value outside the choices
