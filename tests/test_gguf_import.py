"""GGUF in and out: our exports read back exactly; the reader refuses hostile files with one clear error."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from bitnet_cli.errors import BitnetError
from bitnet_cli.gguf import quants
from bitnet_cli.gguf.reader import GGUFFile
from bitnet_cli.pack import PackedModel, pack_checkpoint
from conftest import make_hf_checkpoint

GGUF_DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
TEXTS = ["Hello world, 12345 thee!\n\nKING: what?  ok", "  leading spaces\tand tabs", "ünïcödé 😀 <|end_of_text|>"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, test_tokenizer_dir):
    root = tmp_path_factory.mktemp("gguf_io")
    return make_hf_checkpoint(root / "ckpt", test_tokenizer_dir, **GGUF_DIMS)


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """Our native packs of the checkpoint, by embedding type."""
    root = tmp_path_factory.mktemp("gguf_ref")
    return {e: pack_checkpoint(ckpt, root / f"{e}.bin", embeddings=e).output for e in ("f16", "int8")}


def assert_same_model(a_path, b_path, skip=()):
    from tokenizers import Tokenizer

    with PackedModel.open(a_path) as a, PackedModel.open(b_path) as b:
        assert a.names == b.names and a.dims == b.dims
        for name in a.names:
            if name not in skip:
                np.testing.assert_array_equal(a.tensor(name), b.tensor(name), err_msg=name)
        ta, tb = Tokenizer.from_str(a.tokenizer_json), Tokenizer.from_str(b.tokenizer_json)
        for text in TEXTS:
            assert ta.encode(text, add_special_tokens=False).ids == tb.encode(text, add_special_tokens=False).ids
        assert a.tokenizer_config == b.tokenizer_config


@pytest.mark.parametrize("gguf_type", ["tq2_0", "tq1_0", "i2_s"])
def test_round_trip_of_our_export_is_exact(ckpt, reference, tmp_path, gguf_type):
    gguf_file = tmp_path / "m.gguf"
    pack_checkpoint(ckpt, gguf_file, to="gguf", gguf_type=gguf_type)
    summary = pack_checkpoint(gguf_file, tmp_path / "back.bin")
    assert summary.source_kind == "gguf" and summary.embeddings == "f16"
    assert any("stored as f16 embeddings: lossless" in n for n in summary.notes), summary.notes
    assert_same_model(reference["f16"], tmp_path / "back.bin")


def test_int8_round_trip_keeps_values_and_f16_rounds_the_row_scale(ckpt, reference, tmp_path):
    pack_checkpoint(ckpt, tmp_path / "m.gguf", embeddings="int8", to="gguf")
    summary = pack_checkpoint(tmp_path / "m.gguf", tmp_path / "back.bin")
    assert summary.embeddings == "int8"  # Q8_0 with one d per row: int8 is the lossless choice
    name = "model.embed_tokens.weight_scale"
    assert_same_model(reference["int8"], tmp_path / "back.bin", skip={name})
    with PackedModel.open(reference["int8"]) as a, PackedModel.open(tmp_path / "back.bin") as b:
        np.testing.assert_array_equal(b.tensor(name), a.tensor(name).astype(np.float16).astype(np.float32))


def test_i2s_export_bytes_are_bitnet_cpp_layout_and_read_back_identical(ckpt, reference, tmp_path):
    out = tmp_path / "m.gguf"
    pack_checkpoint(ckpt, out, to="gguf", gguf_type="i2_s")
    with GGUFFile.open(out) as gf, PackedModel.open(reference["f16"]) as pm:
        assert gf.metadata["general.architecture"] == "bitnet-b1.58"
        assert gf.metadata["bitnet-b1.58.block_count"] == 2
        for i in range(2):
            for proj, gname in (("self_attn.q_proj", "attn_q"), ("mlp.down_proj", "ffn_down")):
                name = f"model.layers.{i}.{proj}.weight"
                t = gf.tensor(f"blk.{i}.{gname}.weight")
                trits, gamma = pm.ternary(name)
                assert t.type_name == "I2_S" and t.shape == trits.shape
                raw = gf.raw(t.name)
                # the layout, from first principles: value 32*g + j of each 128-block in byte j, bits 7-2g:6-2g
                codes = (trits + 1).astype(np.uint8).reshape(-1, 4, 32)
                want = codes[:, 0] << 6 | codes[:, 1] << 4 | codes[:, 2] << 2 | codes[:, 3]
                np.testing.assert_array_equal(raw[: trits.size // 4], want.reshape(-1))
                assert raw[trits.size // 4: trits.size // 4 + 4].view("<f4")[0] == gamma  # unrounded fp32
                assert not raw[trits.size // 4 + 4:].any() and len(raw) == trits.size // 4 + 32


def test_pip_gguf_parses_our_i2s_export(ckpt, tmp_path):
    """pip `gguf` (0.19) has no ggml type 36 (I2_S is bitnet.cpp's own), so its reader cannot build tensor
    objects for it; everything else it parses: header, metadata and the tensor infos, which must match ours."""
    gguf = pytest.importorskip("gguf")

    class InfoReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            self.infos = {bytes(f.parts[1]).decode(): (f.parts[3].tolist(), int(f.parts[4][0]), int(f.parts[5][0]))
                          for f in fields}
            self.data_start = start_offs
            self.tensors = []

    out = tmp_path / "m.gguf"
    pack_checkpoint(ckpt, out, to="gguf", gguf_type="i2_s", gguf_head="q6_k")
    reader = InfoReader(out)
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "bitnet-b1.58"
    assert len(fields["tokenizer.ggml.tokens"].data) == 389
    with GGUFFile.open(out) as gf:
        assert set(reader.infos) == set(gf.tensors)
        for name, (dims, type_id, offset) in reader.infos.items():
            t = gf.tensors[name]
            assert (tuple(dims), type_id, reader.data_start + offset) == (t.dims, t.type_id, t.offset)
        head = gf.tensor("token_embd.weight")
        assert head.type_name == "Q6_K"
        np.testing.assert_array_equal(  # pip gguf dequantises our Q6_K head the way we read it
            gguf.quants.dequantize(np.array(gf.raw(head.name)).reshape(head.shape[0], -1), gguf.GGMLQuantizationType.Q6_K),
            quants.dequantize("Q6_K", gf.raw(head.name), head.dims[0]))


def test_q6k_head_imports_to_q6_without_loss(ckpt, tmp_path):
    pack_checkpoint(ckpt, tmp_path / "m.gguf", to="gguf", gguf_type="i2_s", gguf_head="q6_k")
    summary = pack_checkpoint(tmp_path / "m.gguf", tmp_path / "back.bin")
    assert summary.embeddings == "q6"
    assert any(n.endswith("'token_embd.weight' (Q6_K, its codes and scales converted as they are) stored as "
                          "q6 embeddings: lossless") for n in summary.notes)
    with GGUFFile.open(tmp_path / "m.gguf") as gf, PackedModel.open(tmp_path / "back.bin") as pm:
        np.testing.assert_array_equal(pm.embedding(), quants.dequantize("Q6_K", gf.raw("token_embd.weight"), 256))


def test_q6_embeddings_export_to_q6k_and_back_bit_for_bit(ckpt, tmp_path):
    pack_checkpoint(ckpt, tmp_path / "q6.bin", embeddings="q6")
    pack_checkpoint(ckpt, tmp_path / "m.gguf", embeddings="q6", to="gguf", gguf_type="i2_s")
    with GGUFFile.open(tmp_path / "m.gguf") as gf:
        assert gf.tensor("token_embd.weight").type_name == "Q6_K"
    pack_checkpoint(tmp_path / "m.gguf", tmp_path / "back.bin")
    with PackedModel.open(tmp_path / "q6.bin") as a, PackedModel.open(tmp_path / "back.bin") as b:
        assert b.embeddings == "q6"
        np.testing.assert_array_equal(a.tensor("model.embed_tokens.weight"), b.tensor("model.embed_tokens.weight"))


def test_q6k_head_import_says_what_f16_storage_rounds(ckpt, tmp_path):
    pack_checkpoint(ckpt, tmp_path / "m.gguf", to="gguf", gguf_type="i2_s", gguf_head="q6_k")
    summary = pack_checkpoint(tmp_path / "m.gguf", tmp_path / "back.bin", embeddings="f16")
    note = " ".join(summary.notes)
    assert "'token_embd.weight' (Q6_K, dequantised exactly) stored as f16 embeddings:" in note
    assert "values rounded (largest change" in note
    with GGUFFile.open(tmp_path / "m.gguf") as gf, PackedModel.open(tmp_path / "back.bin") as pm:
        exact = quants.dequantize("Q6_K", gf.raw("token_embd.weight"), 256)
        np.testing.assert_array_equal(pm.embedding(), exact.astype(np.float16).astype(np.float32))


# ------------------------------------------------------------------------------ dequantisers vs pip gguf


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q6_K", "TQ1_0", "TQ2_0", "BF16"])
def test_dequantisers_match_ggml_arithmetic(type_name):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    kind = gguf.GGMLQuantizationType[type_name]
    if type_name == "Q6_K":
        raw = quants.quantize_q6_k(x)  # pip gguf has no Q6_K quantiser; ours is checked by its error below
        assert np.sqrt(np.mean((quants.dequantize("Q6_K", raw, 512) - x) ** 2)) < 0.03
    else:
        raw = gguf.quants.quantize(np.clip(np.round(x), -1, 1) if type_name.startswith("TQ") else x, kind)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    ours = quants.dequantize(type_name, raw, 512)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw.reshape(4, -1), kind).reshape(4, 512))


def test_type_sizes_match_pip_gguf():
    gguf = pytest.importorskip("gguf")
    for type_id, t in quants.GGML_TYPES.items():
        if t.name != "I2_S":
            assert gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)] == (t.block, t.size), t.name


def test_tq1_0_packer_matches_pip_gguf():
    gguf = pytest.importorskip("gguf")
    trits = np.random.default_rng(1).integers(-1, 2, (6, 512)).astype(np.float32)
    ref = gguf.quants.quantize(trits, gguf.GGMLQuantizationType.TQ1_0)
    np.testing.assert_array_equal(quants.tq1_0_pack((trits + 1).astype(np.uint8), np.ones((6, 2))), ref)


# ------------------------------------------------------------------------------ hostile files


def _kv_string(key, value):
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v


def _file(tmp_path, body: bytes, n_tensors=0, n_kv=1, version=3):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body)
    return path


def _tensor_info(name, dims, type_id, offset):
    n = name.encode()
    return (struct.pack("<Q", len(n)) + n + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", type_id, offset))


ARCH = _kv_string("general.architecture", "bitnet-b1.58")


@pytest.mark.parametrize("make, message", [
    (lambda p: _file(p, ARCH, version=7), "GGUF version 7 is not supported"),
    (lambda p: _file(p, ARCH, version=3 << 24), "big-endian"),
    (lambda p: _file(p, ARCH[:20]), "truncated or corrupt GGUF"),
    (lambda p: _file(p, ARCH, n_kv=1 << 60), "claims 1152921504606846976 metadata entries"),
    (lambda p: _file(p, ARCH, n_tensors=1 << 40), "claims 1099511627776 tensors"),
    (lambda p: _file(p, struct.pack("<Q", 1 << 62) + b"key" * 10), "metadata entry 0 claims a length"),
    (lambda p: _file(p, ARCH[:-20] + struct.pack("<Q", 1 << 40)), "'general.architecture' claims a length of 1099511627776"),
    (lambda p: _file(p, ARCH[:-20] + struct.pack("<Q", 1000) + b"x" * 64), "'general.architecture' needs 1000 bytes"),
    (lambda p: _file(p, struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99) + b"\0" * 32), "'k' has unknown value type 99"),
    (lambda p: _file(p, struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 6, 1 << 61) + b"\0" * 64),
     "'a' claims 2305843009213693952 elements"),
    (lambda p: _file(p, ARCH + _tensor_info("t", [4, 1 << 62], 0, 0) + b"\0" * 64, n_tensors=1),
     "tensor 't': impossible dimension"),
    (lambda p: _file(p, ARCH + _tensor_info("t", [1 << 20, 1 << 20, 1 << 20], 0, 0) + b"\0" * 64, n_tensors=1),
     "tensor 't': impossible dimension|more than the file can store"),
    (lambda p: _file(p, ARCH + _tensor_info("t", [4], 77, 0) + b"\0" * 64, n_tensors=1), "tensor 't': unknown ggml type id 77"),
    (lambda p: _file(p, ARCH + _tensor_info("t", [16], 0, 1 << 20) + b"\0" * 64, n_tensors=1),
     "tensor 't': data ends at byte"),
    (lambda p: _file(p, ARCH + _tensor_info("t", [16], 0, 3) + b"\0" * 128, n_tensors=1), "not a multiple of the alignment"),
    (lambda p: _file(p, ARCH + _tensor_info("t", [5], 8, 0) + b"\0" * 128, n_tensors=1),
     "tensor 't': Q8_0 needs rows of a multiple of 32"),
    (lambda p: _file(p, ARCH + _tensor_info("t", [8], 0, 0) + _tensor_info("t", [8], 0, 32) + b"\0" * 128, n_tensors=2),
     "tensor 't': appears twice"),
    (lambda p: _file(p, ARCH + _tensor_info("a", [16], 0, 0) + _tensor_info("b", [16], 0, 32) + b"\0" * 160, n_tensors=2),
     "tensors 'a' and 'b' overlap"),
])
def test_hostile_headers_get_one_clear_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(BitnetError, match=message) as e:
        GGUFFile.open(path).close()
    assert str(path) in str(e.value)


@pytest.mark.parametrize("make", [
    lambda p: _file(p, struct.pack("<Q", 60000) + b"k" * 60000 + struct.pack("<I", 99) + b"\0" * 32),
    lambda p: _file(p, ARCH + _tensor_info("t" * 60000, [4], 77, 0) + b"\0" * 64, n_tensors=1),
])
def test_a_huge_key_or_tensor_name_is_cut_short_in_the_error(tmp_path, make):
    # the error line quoted the whole name: up to 64 KB of it (139 KB of escapes from a fuzzed file)
    path = make(tmp_path)
    with pytest.raises(BitnetError) as e:
        GGUFFile.open(path).close()
    assert len(str(e.value)) < 300 + len(str(path)) and "..." in str(e.value)


def test_truncated_export_and_unsupported_architectures(ckpt, tmp_path):
    good = tmp_path / "m.gguf"
    pack_checkpoint(ckpt, good, to="gguf", gguf_type="i2_s")
    data = good.read_bytes()
    for cut in (3, 30, len(data) // 3, len(data) - 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(BitnetError, match=str(bad)):
            pack_checkpoint(bad, tmp_path / f"cut{cut}.bin")
        assert not (tmp_path / f"cut{cut}.bin").exists()
    llama = tmp_path / "llama.gguf"
    llama.write_bytes(data.replace(b"bitnet-b1.58", b"qwen2\0\0\0\0\0\0\0", 1))  # same length, other architecture
    with pytest.raises(BitnetError, match=r"'general.architecture' = 'qwen2\\x00.*supported: bitnet-b1.58, bitnet-25, bitnet"):
        pack_checkpoint(llama, tmp_path / "x.bin")


def test_foreign_bitnet_architecture_is_refused_without_our_relu2_mark(ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    pack_checkpoint(ckpt, out, to="gguf", gguf_type="tq2_0")
    data = out.read_bytes().replace(b"bitnet-cli.hidden_act", b"someone-else.hidden_a")
    (tmp_path / "foreign.gguf").write_bytes(data)
    with pytest.raises(BitnetError, match="squared-ReLU FFN.*'bitnet-cli.hidden_act' = None"):
        pack_checkpoint(tmp_path / "foreign.gguf", tmp_path / "x.bin")


def test_corrupt_i2s_code_names_the_tensor(ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    pack_checkpoint(ckpt, out, to="gguf", gguf_type="i2_s")
    with GGUFFile.open(out) as gf:
        offset = gf.tensor("blk.1.ffn_up.weight").offset
    data = bytearray(out.read_bytes())
    data[offset + 5] = 0xFF  # four codes 3: not ternary
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(BitnetError, match=r"bad.gguf: tensor 'blk.1.ffn_up.weight': 2-bit code 3"):
        pack_checkpoint(tmp_path / "bad.gguf", tmp_path / "x.bin")


def test_run_reads_a_gguf_through_the_import_cache(ckpt, reference, tmp_path, monkeypatch):
    from bitnet_cli.engine import Engine

    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m.gguf"
    pack_checkpoint(ckpt, out, to="gguf", gguf_type="i2_s")
    def greedy(path):
        with Engine.load(path, threads=1) as e:
            gen = e.generate("Hello there", max_tokens=32, temperature=0)
            "".join(gen)
            return gen.token_ids

    want = greedy(reference["f16"])
    assert len(want) == 32
    for _ in range(2):  # the second load finds the cached import
        assert greedy(out) == want
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1


def test_info_and_bench_read_a_gguf_as_run_does(ckpt, tmp_path, monkeypatch):
    """`bitnet info` and `bitnet bench --model` take a GGUF through the same import cache as run, eval and serve."""
    from typer.testing import CliRunner

    from bitnet_cli.bench.target import from_file
    from bitnet_cli.cli import app

    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m.gguf"
    pack_checkpoint(ckpt, out, to="gguf", gguf_type="i2_s")
    result = CliRunner().invoke(app, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    [cached] = (tmp_path / "cache" / "gguf").iterdir()
    with PackedModel.open(cached) as pm:
        assert report["tensors"] == pm.describe()["tensors"] and len(report["tensors"]) > 10
    target = from_file(out)
    assert target.name == "m.gguf" and target.path == cached  # the same import, not a second one
    assert target.config["num_hidden_layers"] == report["config"]["num_hidden_layers"]
    assert list((tmp_path / "cache" / "gguf").iterdir()) == [cached]


@pytest.mark.parametrize("gguf_type", ["i2_s", "tq2_0"])
def test_every_exported_metadata_key_is_one_llama_cpp_reads(ckpt, tmp_path, gguf_type):
    gguf = pytest.importorskip("gguf")
    from bitnet_cli.pack.gguf import HIDDEN_ACT_KEY

    known = []

    def walk(cls):
        for value in vars(cls).values():
            if isinstance(value, str) and "." in value:
                known.append(value)
            elif isinstance(value, type):
                walk(value)

    walk(gguf.Keys)
    out = tmp_path / "m.gguf"
    pack_checkpoint(ckpt, out, to="gguf", gguf_type=gguf_type)
    with GGUFFile.open(out) as gf:
        arch = gf.metadata["general.architecture"]
        known = {k.replace("{arch}", arch) for k in known} | {HIDDEN_ACT_KEY}
        assert set(gf.metadata) <= known, set(gf.metadata) - known


def test_cli_import_prints_the_notes_and_one_error_line_for_a_bad_file(ckpt, tmp_path):
    from typer.testing import CliRunner

    from bitnet_cli.cli import app

    runner = CliRunner()
    gguf_file = tmp_path / "m.gguf"
    assert runner.invoke(app, ["pack", str(ckpt), str(gguf_file), "--to", "gguf", "--gguf-type", "i2_s",
                               "--gguf-head", "q6_k"]).exit_code == 0
    result = runner.invoke(app, ["pack", str(gguf_file), str(tmp_path / "m.bin")])
    assert result.exit_code == 0, result.output
    assert "(Q6_K, its codes and scales converted as they are) stored as q6 embeddings: lossless" in " ".join(
        result.output.split())
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(gguf_file.read_bytes()[:5000])
    result = runner.invoke(app, ["pack", str(bad), str(tmp_path / "x.bin")])
    text = " ".join(result.output.split())  # rich wraps at 80 columns
    assert result.exit_code == 1 and "Traceback" not in text
    assert text.startswith("error:") and "bad.gguf" in text and text.count("error:") == 1
    assert not (tmp_path / "x.bin").exists()


def _relayout_i2s(src, dst, block):
    """A copy of GGUF `src` with every I2_S tensor's codes rewritten in `block`-value blocks (64: bitnet.cpp's ARM
    build), as our writer lays them out; everything else, the scales and the file size unchanged."""
    data = bytearray(src.read_bytes())
    with GGUFFile.open(src) as gf:
        for t in gf.tensors.values():
            if t.type_name == "I2_S":
                codes = quants.i2s_codes(gf.raw(t.name, 0, t.count // 4))
                data[t.offset: t.offset + t.count // 4] = quants.i2s_pack(codes, block).tobytes()
    dst.write_bytes(bytes(data))


def test_arm_i2s_layout_is_read_with_i2s_block_64_and_the_default_says_which_it_read(ckpt, reference, tmp_path):
    x86 = tmp_path / "x86.gguf"
    pack_checkpoint(ckpt, x86, to="gguf", gguf_type="i2_s")
    arm = tmp_path / "arm.gguf"
    _relayout_i2s(x86, arm, 64)
    assert arm.stat().st_size == x86.stat().st_size and arm.read_bytes() != x86.read_bytes()
    summary = pack_checkpoint(arm, tmp_path / "arm.bin", i2s_block=64)
    assert not any("I2_S read in" in n for n in summary.notes)  # asked for: nothing to warn about
    assert_same_model(reference["f16"], tmp_path / "arm.bin")
    # the default reads x86 and says so, naming the option that reads the other layout
    summary = pack_checkpoint(x86, tmp_path / "x86.bin")
    note = next(n for n in summary.notes if "I2_S read in" in n)
    assert "x86 layout (128-value blocks" in note and "--i2s-block 64" in note
    assert_same_model(reference["f16"], tmp_path / "x86.bin")
    # an ARM file read as x86 is the mis-read the note warns about: same codes, permuted columns
    pack_checkpoint(arm, tmp_path / "misread.bin")
    name = "model.layers.0.self_attn.q_proj.weight"
    with PackedModel.open(reference["f16"]) as a, PackedModel.open(tmp_path / "misread.bin") as b:
        (good, _), (bad, _) = a.ternary(name), b.ternary(name)
        assert not np.array_equal(good, bad)
        np.testing.assert_array_equal(np.sort(good.reshape(-1, 128), axis=1), np.sort(bad.reshape(-1, 128), axis=1))


def test_i2s_block_is_checked_and_only_for_gguf_sources(ckpt, tmp_path):
    from typer.testing import CliRunner

    from bitnet_cli.cli import app

    x86 = tmp_path / "x86.gguf"
    pack_checkpoint(ckpt, x86, to="gguf", gguf_type="i2_s")
    with pytest.raises(BitnetError, match="i2s_block must be one of 128, 64") as err:
        pack_checkpoint(x86, tmp_path / "x.bin", i2s_block=32)
    assert err.value.param == "i2s_block"
    with pytest.raises(BitnetError, match="i2s_block applies to a GGUF source only"):
        pack_checkpoint(ckpt, tmp_path / "x.bin", i2s_block=64)
    result = CliRunner().invoke(app, ["pack", str(x86), str(tmp_path / "x.bin"), "--i2s-block", "96"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and text.startswith("error: --i2s-block must be one of 128, 64")
    assert not (tmp_path / "x.bin").exists()


def test_a_huge_tensor_name_in_a_safetensors_header_is_cut_short_in_the_error(tmp_path):
    from bitnet_cli.checkpoint import read_safetensors_header

    header = json.dumps({"t" * 50000: {"dtype": "X9", "shape": [4], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(BitnetError, match="unsupported dtype 'X9'") as e:
        read_safetensors_header(path)
    assert len(str(e.value)) < 300 + len(str(path))  # was the whole 50,000-character name
