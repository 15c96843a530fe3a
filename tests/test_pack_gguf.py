"""GGUF export: read back with the `gguf` package and compare its dequantised tensors to ours."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_cli.errors import BitnetError
from bitnet_cli.pack import PackedModel, pack_checkpoint
from bitnet_cli.pack.gguf import export_gguf, gguf_name
from conftest import make_hf_checkpoint

GGUF_DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def gguf_ready(tmp_path_factory, test_tokenizer_dir):
    """A tiny checkpoint whose every input dimension is a multiple of 256 (TQ block size)."""
    root = tmp_path_factory.mktemp("gguf")
    return make_hf_checkpoint(root / "ckpt", test_tokenizer_dir, **GGUF_DIMS)


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    fields = {f.name: f for f in reader.fields.values()}
    return reader, tensors, fields


@pytest.mark.parametrize("embeddings", ["f16", "int8"])
@pytest.mark.parametrize("gguf_type", ["tq2_0", "tq1_0"])
def test_gguf_export_reads_back_equal_to_ours(gguf_ready, tmp_path, gguf_type, embeddings):
    import gguf

    out = tmp_path / "m.gguf"
    summary = pack_checkpoint(gguf_ready, out, embeddings=embeddings, to="gguf", gguf_type=gguf_type)
    assert summary.format == f"gguf-{gguf_type}" and summary.file_bytes == out.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # the temporary native file is gone
    reader, tensors, fields = read_gguf(out)
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "bitnet"
    assert int(fields["bitnet.block_count"].parts[-1][0]) == 2
    assert int(fields["bitnet.attention.head_count_kv"].parts[-1][0]) == 2
    assert len(fields["tokenizer.ggml.tokens"].data) == 389

    with pytest.raises(BitnetError, match="is a GGUF file"):
        PackedModel.open(out)
    pack_checkpoint(gguf_ready, tmp_path / "ref.bin", embeddings=embeddings)
    assert out.stat().st_mode == (tmp_path / "ref.bin").stat().st_mode  # an ordinary file, not mkstemp's 0600
    qtype = gguf.GGMLQuantizationType.TQ2_0 if gguf_type == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    with PackedModel.open(tmp_path / "ref.bin") as pm:
        assert len(tensors) == len(pm.names) - (1 if embeddings == "int8" else 0)
        for name in pm.names:
            if name.endswith("embed_tokens.weight_scale"):
                continue
            kind, got = tensors[gguf_name(name)]
            if name == "model.embed_tokens.weight":
                # f16: the same numbers; int8: the same int8 values, row scale rounded to f16
                rtol = 0 if embeddings == "f16" else 2**-11
                np.testing.assert_allclose(got, pm.embedding(), rtol=rtol, atol=0)
            elif pm.entries[name].dtype == "U8":
                trits, _ = pm.ternary(name)
                assert kind == qtype
                np.testing.assert_array_equal(got, trits.astype(np.float32))  # d = 1: the trits themselves
            else:  # norms and fp32 scales: exact
                np.testing.assert_array_equal(got.reshape(-1), pm.tensor(name).reshape(-1))


def test_gguf_refuses_shapes_llama_cpp_cannot_hold(hf_tiny_checkpoint, tmp_path):
    with pytest.raises(BitnetError, match=r"has 96 inputs; GGUF TQ2_0 needs a multiple of 256"):
        pack_checkpoint(hf_tiny_checkpoint, tmp_path / "x.gguf", to="gguf")
    assert list(tmp_path.iterdir()) == []


def test_gguf_refuses_untied_head(test_tokenizer_dir, tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "untied", test_tokenizer_dir, tie_word_embeddings=False, **GGUF_DIMS)
    pack_checkpoint(ckpt, tmp_path / "m.bin")
    with pytest.raises(BitnetError, match="untied lm_head"):
        export_gguf(tmp_path / "m.bin", tmp_path / "m.gguf")


def test_cli_gguf_export_says_llama_cpp_computes_silu(gguf_ready, tmp_path):
    from typer.testing import CliRunner

    from bitnet_cli.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["pack", str(gguf_ready), str(tmp_path / "m.gguf"), "--to", "gguf"])
    assert result.exit_code == 0, result.output
    assert "gates the FFN with SiLU" in " ".join(result.output.split())  # rich may wrap the line
    native = runner.invoke(app, ["pack", str(gguf_ready), str(tmp_path / "m.bin")])
    assert native.exit_code == 0 and "SiLU" not in native.output


def test_gguf_export_destination_is_checked_before_reading(tmp_path):
    """A directory, an existing file (without force) or a missing directory in the GGUF's place is refused
    before the packed file is even opened (the input here does not exist)."""
    missing_input = tmp_path / "nowhere.bin"
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"keep")
    for out, expected in ((tmp_path, "is a directory"), (existing, "already exists"),
                          (tmp_path / "no" / "m.gguf", "output directory does not exist")):
        with pytest.raises(BitnetError, match=expected):
            export_gguf(missing_input, out)
    assert existing.read_bytes() == b"keep"
