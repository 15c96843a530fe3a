"""The packed file: ternary layouts, writer/reader, and the numpy reference against transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitnet_cli.errors import BitnetError
from bitnet_cli.pack import PackedModel, pack_checkpoint, reference
from bitnet_cli.pack.ternary import (LAYOUTS, pack_i2_k128, pack_tq1_k640, ternarize, unpack_hf_packed,
                                     unpack_i2_k128, unpack_tq1_k640)
from conftest import load_hf_reference, make_hf_checkpoint

ODD_SHAPES = [(1, 1), (3, 127), (5, 128), (7, 129), (4, 300), (9, 517)]


def f16_exact_embeddings(ckpt_dir, seed=0):
    """Round the checkpoint's embeddings (and untied head) to f16-representable values, in place.

    The packed file stores them in f16; with f16-exact sources the packed model and transformers
    see the same numbers, so their logits can be compared tightly. The norm weights (all 1 at
    init) get random values too: with bf16 embeddings and unit norms, x * 127 / max|x| lands
    exactly on .5 often, and an ulp of summation-order difference then flips the rounding.
    """
    import torch
    from safetensors.torch import load_file, save_file

    path = ckpt_dir / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = t.to(torch.float16).to(t.dtype)
        elif "norm" in name:
            tensors[name] = (1 + 0.1 * torch.randn(t.shape, generator=gen)).to(t.dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    return ckpt_dir


def hf_logits(ckpt_dir, ids):
    import torch

    model = load_hf_reference(ckpt_dir)
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))[None]).logits[0].float().numpy()


# ------------------------------------------------------------------ ternary arithmetic and layouts


def torch_weight_quant(w: np.ndarray):
    """transformers' WeightQuant, step by step in torch fp32: (trits, dequantised weight)."""
    import torch

    t = torch.from_numpy(w)
    scale = 1.0 / t.abs().mean().clamp_(min=1e-5)
    trits = (t * scale).round().clamp(-1, 1)
    return trits.to(torch.int8).numpy(), (trits / scale).numpy()


@pytest.mark.parametrize("shape", ODD_SHAPES + [(64, 96), (200, 96)])
def test_ternarize_matches_transformers_weight_quant(shape):
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    trits, gamma = ternarize(w)
    want_trits, want_deq = torch_weight_quant(w)
    assert trits.dtype == np.int8 and gamma.dtype == np.float32
    np.testing.assert_array_equal(trits, want_trits)
    # gamma: our mean is the correctly rounded one, torch's fp32 reduction may be 1 ulp off
    np.testing.assert_allclose(trits.astype(np.float32) * gamma, want_deq, rtol=2.5e-7, atol=0)


def test_ternarize_all_zero_uses_the_clamp():
    trits, gamma = ternarize(np.zeros((4, 8), np.float32))
    assert not trits.any() and gamma == np.float32(1) / (np.float32(1) / np.float32(1e-5))


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_i2_k128_roundtrip_pads_never_truncates(shape):
    rng = np.random.default_rng(shape[1])
    trits = rng.integers(-1, 2, size=shape, dtype=np.int8)
    packed = pack_i2_k128(trits)
    kp = -(-shape[1] // 128) * 128
    assert packed.dtype == np.uint8 and packed.shape == (shape[0], kp // 4)
    np.testing.assert_array_equal(unpack_i2_k128(packed, shape[1]), trits)
    padding = unpack_i2_k128(packed, kp)[:, shape[1]:]
    assert (padding == 0).all()  # padding codes are 1 (T = 0)


def test_i2_k128_bit_positions_follow_the_spec():
    """Byte j of block b holds k = 128b + 32i + j in bits 2i..2i+1, as code T + 1."""
    trits = np.zeros((1, 256), np.int8)
    trits[0, 128 + 64 + 5] = 1  # block 1, i = 2, j = 5 -> code 2 in bits 5:4 of byte 32 + 5
    trits[0, 31] = -1  # block 0, i = 0, j = 31 -> code 0 in bits 1:0 of byte 31
    packed = pack_i2_k128(trits)[0]
    assert packed[37] == (1 | 1 << 2 | 2 << 4 | 1 << 6)
    assert packed[31] == (0 | 1 << 2 | 1 << 4 | 1 << 6)
    assert packed[0] == 0b01010101


@pytest.mark.parametrize("n", [8, 12, 10, 5])
def test_hf_packed_unpack_matches_transformers_pack_weights(n):
    import torch
    from transformers.integrations.bitnet import pack_weights

    trits = np.random.default_rng(n).integers(-1, 2, size=(n, 7), dtype=np.int8)
    packed = pack_weights(torch.from_numpy(trits.astype(np.float32)).clone()).numpy()
    np.testing.assert_array_equal(unpack_hf_packed(packed, n), trits)


def test_hf_packed_rejects_code_3():
    with pytest.raises(ValueError, match="not a ternary value"):
        unpack_hf_packed(np.full((2, 3), 0xFF, np.uint8), 8)


# ------------------------------------------------------------------ writer and reader


@pytest.fixture(scope="module")
def tiny_packed(hf_tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "tiny.bin"
    summary = pack_checkpoint(hf_tiny_checkpoint, out)
    return out, summary


def test_pack_reader_zero_copy_aligned_views(tiny_packed, hf_tiny_checkpoint):
    out, summary = tiny_packed
    with PackedModel.open(out) as pm:
        assert pm.config["hidden_size"] == 96 and pm.config["model_type"] == "bitnet"
        assert pm.layout == "i2_k128" and pm.embeddings == "f16"
        assert pm.tokenizer_json == (hf_tiny_checkpoint / "tokenizer.json").read_text()
        assert pm.tokenizer_config["eos_token"] == "<|end_of_text|>"
        assert pm.metadata["converter"].startswith("bitnet-cli ")
        assert not any(n.startswith("__pad__") for n in pm.names)
        for name in pm.names:
            view = pm.tensor(name)
            assert view.ctypes.data % 64 == 0, name
            assert not view.flags.writeable and not view.flags.owndata
        q = pm.tensor("model.layers.1.self_attn.q_proj.weight")
        assert q.dtype == np.uint8 and q.shape == (96, 128 // 4)  # K = 96 padded to 128
        assert pm.tensor("model.embed_tokens.weight").dtype == np.float16
        assert pm.tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == np.float32
        assert pm.verify() == []
    from safetensors.numpy import load_file  # the container is plain safetensors: any reader can load it

    loaded = load_file(out)
    with PackedModel.open(out) as pm:
        for name in pm.names:
            np.testing.assert_array_equal(loaded[name], pm.tensor(name))
    assert summary.ternary_parameters == 2 * 96 * (96 + 48 + 48 + 96 + 3 * 200)
    assert summary.file_bytes == out.stat().st_size
    assert summary.compression_ratio > 1


def test_packed_trits_equal_ternarised_source_bit_for_bit(tiny_packed, hf_tiny_checkpoint):
    from safetensors.numpy import load_file

    source = load_file(hf_tiny_checkpoint / "model.safetensors")
    with PackedModel.open(tiny_packed[0]) as pm:
        for i in range(2):
            for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj"):
                name = f"model.layers.{i}.{proj}.weight"
                trits, gamma = pm.ternary(name)
                want_trits, want_deq = torch_weight_quant(source[name])
                np.testing.assert_array_equal(trits, want_trits)
                np.testing.assert_allclose(trits * gamma, want_deq, rtol=2.5e-7, atol=0)


def test_pack_refuses_to_overwrite_without_force(tiny_packed, hf_tiny_checkpoint):
    out, _ = tiny_packed
    before = out.read_bytes()
    with pytest.raises(BitnetError, match="already exists"):
        pack_checkpoint(hf_tiny_checkpoint, out)
    assert out.read_bytes() == before
    pack_checkpoint(hf_tiny_checkpoint, out, force=True)
    assert out.read_bytes() == before  # deterministic output
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp files left behind


def test_pack_never_replaces_its_own_input_even_with_force(hf_tiny_checkpoint, tmp_path):
    # `pack run/final run/final/model.safetensors --force` used to leave the packed file where the weights were
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in hf_tiny_checkpoint.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        before = (ckpt / name).read_bytes()
        with pytest.raises(BitnetError, match="is an input of this pack"):
            pack_checkpoint(ckpt, ckpt / name, force=True)
        assert (ckpt / name).read_bytes() == before
    with pytest.raises(BitnetError, match="is an input of this pack"):
        pack_checkpoint(ckpt / "model.safetensors", ckpt / "model.safetensors", force=True)  # a file as the source
    pack_checkpoint(ckpt, ckpt / "model.bin")  # beside the checkpoint's files is fine
    pack_checkpoint(ckpt, ckpt / "model.bin", force=True)
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([f.name for f in hf_tiny_checkpoint.iterdir()] + ["model.bin"])


def test_failed_pack_leaves_no_file(hf_tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf_tiny_checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    from safetensors.numpy import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
    save_file(tensors, broken / "model.safetensors")
    out = tmp_path / "out" / "m.bin"
    out.parent.mkdir()
    with pytest.raises(BitnetError, match=r"model\.safetensors.*'model\.layers\.1\.mlp\.up_proj\.weight'.*non-finite"):
        pack_checkpoint(broken, out)
    assert list(out.parent.iterdir()) == []


def _rewrite_header(src, dst, edit):
    """Copy a packed file with its JSON header changed by `edit(header_dict)` (data untouched)."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n, "the edit must not grow the header"
    new += b" " * (n - len(new))
    dst.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    return dst


def test_reader_rejects_hostile_files(tiny_packed, tmp_path):
    good = tiny_packed[0]
    raw = good.read_bytes()
    cases = {
        "truncated": (raw[: len(raw) - 1000], r"truncated"),
        "tiny": (raw[:5], r"not a safetensors file"),
        "huge header length": ((10**15).to_bytes(8, "little") + raw[8:], r"header length"),
        "garbage header": (raw[:8] + b"\xff" * 64 + raw[72:], r"corrupt safetensors header"),
    }
    for label, (data, pattern) in cases.items():
        path = tmp_path / f"{label}.bin"
        path.write_bytes(data)
        with pytest.raises(BitnetError, match=pattern) as e:
            PackedModel.open(path)
        assert str(path) in str(e.value), label

    q = "model.layers.0.self_attn.q_proj.weight"

    def overlap(h):
        h[q]["data_offsets"] = h["model.embed_tokens.weight"]["data_offsets"][:]
        h[q]["shape"] = [h["model.embed_tokens.weight"]["data_offsets"][1] // 32, 32]

    def wrong_shape(h):
        h[q]["shape"] = [h[q]["shape"][0] // 2, h[q]["shape"][1] * 2]

    def wrong_dtype(h):
        h["model.norm.weight"]["dtype"] = "I32"

    def misaligned(h):
        b, e = h[q]["data_offsets"]
        h[q]["data_offsets"] = [b + 1, e + 1]

    def newer(h):
        h["__metadata__"]["format_version"] = "99"

    def other_file(h):
        del h["__metadata__"]["format"]

    for edit, pattern in [(overlap, "overlap"), (wrong_shape, f"{q}.*config needs"),
                          (wrong_dtype, "model.norm.weight.*config needs"), (misaligned, "overlap|aligned"),
                          (newer, "format version"), (other_file, "not a bitnet-cli packed model")]:
        path = _rewrite_header(good, tmp_path / f"{edit.__name__}.bin", edit)
        with pytest.raises(BitnetError, match=pattern):
            PackedModel.open(path)


def test_verify_detects_a_flipped_byte(tiny_packed, tmp_path):
    raw = bytearray(tiny_packed[0].read_bytes())
    with PackedModel.open(tiny_packed[0]) as pm:
        offset = pm.entries["model.layers.1.mlp.gate_proj.weight"].begin
    raw[offset + 3] ^= 0x10
    bad = tmp_path / "flipped.bin"
    bad.write_bytes(bytes(raw))
    with PackedModel.open(bad) as pm:
        assert pm.verify() == ["model.layers.1.mlp.gate_proj.weight"]


def test_verify_detects_damage_to_the_embedded_tokenizer(tiny_packed, tmp_path):
    raw = bytearray(tiny_packed[0].read_bytes())
    at = raw.index(b"<|end_of_text|>")  # inside the tokenizer text: the header still parses
    raw[at + 2] = ord("X")
    bad = tmp_path / "tokenizer_flipped.bin"
    bad.write_bytes(bytes(raw))
    with PackedModel.open(bad) as pm:
        assert pm.verify() == ["__metadata__"]
    with PackedModel.open(tiny_packed[0]) as pm:
        assert pm.verify() == []


# ------------------------------------------------------------------ the reference forward


@pytest.mark.parametrize(
    "dims",
    [
        dict(),  # the default tiny shape, tied embeddings
        dict(hidden_size=80, intermediate_size=136, num_attention_heads=5, num_key_value_heads=1,
             tie_word_embeddings=False, vocab_size=389, seed=3),  # ragged K, one KV head, untied head
    ],
    ids=["tied", "odd-untied"],
)
def test_reference_forward_matches_transformers(dims, test_tokenizer_dir, tmp_path):
    ckpt = f16_exact_embeddings(make_hf_checkpoint(tmp_path / "ckpt", test_tokenizer_dir, **dims))
    out = tmp_path / "m.bin"
    pack_checkpoint(ckpt, out)
    ids = np.random.default_rng(0).integers(0, 389, size=32)
    want = hf_logits(ckpt, ids)
    with PackedModel.open(out) as pm:
        got = reference.forward(pm, ids)
    assert got.dtype == np.float32 and got.shape == (32, 389)
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


def test_reference_bf16_checkpoint_within_1e3(test_tokenizer_dir, tmp_path):
    ckpt = f16_exact_embeddings(make_hf_checkpoint(tmp_path / "bf16", test_tokenizer_dir, torch_dtype="bfloat16"))
    pack_checkpoint(ckpt, tmp_path / "m.bin")
    ids = np.arange(24) * 13 % 389
    with PackedModel.open(tmp_path / "m.bin") as pm:
        got = reference.forward(pm, ids)
    assert np.abs(got - hf_logits(ckpt, ids)).max() <= 1e-3


def test_reference_incremental_cache_equals_full_sequence(tiny_packed):
    ids = np.arange(30) * 11 % 389
    with PackedModel.open(tiny_packed[0]) as pm:
        full = reference.forward(pm, ids)
        cache = reference.KVCache()
        parts = [reference.forward(pm, ids[:17], cache)] + [reference.forward(pm, ids[i : i + 1], cache) for i in range(17, 30)]
    assert cache.n_past == 30
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-5)


def test_int8_embeddings_per_row_scale(hf_tiny_checkpoint, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "int8.bin"
    pack_checkpoint(hf_tiny_checkpoint, out, embeddings="int8")
    emb = load_file(hf_tiny_checkpoint / "model.safetensors")["model.embed_tokens.weight"]
    with PackedModel.open(out) as pm, PackedModel.open(pack_checkpoint(hf_tiny_checkpoint, tmp_path / "f16.bin").output) as ref:
        assert pm.tensor("model.embed_tokens.weight").dtype == np.int8
        scale = pm.tensor("model.embed_tokens.weight_scale")
        assert scale.shape == (389,)
        deq = pm.embedding()
        assert (np.abs(deq - emb) <= scale[:, None] / 2 + 1e-7).all()
        ids = np.arange(16) * 5
        a, b = reference.forward(pm, ids), reference.forward(ref, ids)
        assert np.abs(a - b).max() < 0.1 * np.abs(b).max()  # same model, coarser embedding
        assert pm.file_size < ref.file_size


@pytest.mark.parametrize("hidden", [64, 100, 2560])
def test_q4_rows_round_trip_within_half_a_step(hidden):
    from bitnet_cli.kernels import Q4_BLOCK_BYTES
    from bitnet_cli.pack.embeddings import decode, encode, q4_padded

    rng = np.random.default_rng(hidden)
    rows = rng.standard_normal((40, hidden)).astype(np.float32) * 0.02
    rows[3, 5] = 1.5  # an outlier: its half-block gets sub 255, the others much finer steps
    rows[4, :] = 0.0  # an all-zero row: scale 0, decodes to zeros
    rows[5, 7] = -0.9  # a negative extreme lands on code 0 (q = -8)
    blocks, scale = encode(rows, "q4")
    assert blocks.dtype == np.uint8 and blocks.shape == (40, q4_padded(hidden) // 64 * Q4_BLOCK_BYTES)
    assert scale.dtype == np.float32 and scale[4] == 0
    back = decode([blocks, scale], hidden, "q4")
    assert back.shape == rows.shape and (back[4] == 0).all()
    # every value is within half a step of its half-block (step = scale * sub), plus float slack,
    # unless the packer chose a step that clips it to -8 or 7
    sub = blocks.reshape(40, -1, Q4_BLOCK_BYTES)[:, :, :2].reshape(40, -1).astype(np.float32)
    step = np.repeat(sub * scale[:, None], 32, axis=1)[:, :hidden]
    clipped = (rows < -8.5 * step) | (rows > 7.5 * step)
    assert ((np.abs(back - rows) <= step / 2 + 1e-6 * np.abs(rows).max()) | clipped).all()
    assert clipped.mean() < 0.01 and back[5, 7] == np.float32(-8 * sub[5, 0] * scale[5])
    # 4.25 bits per weight: about 9% relative error on Gaussian rows, far from int8 but far from useless
    err = np.linalg.norm(back - rows, axis=1) / np.maximum(np.linalg.norm(rows, axis=1), 1e-9)
    assert np.median(err) < 0.12


@pytest.mark.parametrize("k", [1, 100, 640, 700, 1280, 2560, 6912])
def test_tq1_layout_round_trips_and_matches_its_definition(k):
    """tq1_k640 (docs/FORMAT.md): byte j of a 640-input block holds inputs j, 128+j, ..., 512+j as
    ceil(v * 256 / 243) of v = 81 q0 + ... + q4; the rest of the padded row is i2_k128 blocks. 1.6
    bits per weight for the whole blocks; the padding is zero trits."""
    rng = np.random.default_rng(k)
    trits = rng.integers(-1, 2, size=(5, k), dtype=np.int8)
    packed = pack_tq1_k640(trits)
    kp = -(-k // 128) * 128
    assert packed.dtype == np.uint8 and packed.shape == (5, kp // 640 * 128 + kp % 640 // 4) == (5, LAYOUTS["tq1"].row_bytes(k))
    np.testing.assert_array_equal(unpack_tq1_k640(packed, k), trits)
    np.testing.assert_array_equal(unpack_tq1_k640(packed, kp)[:, k:], 0)
    codes = np.ones((5, kp), np.int64)
    codes[:, :k] = trits + 1
    for b in range(kp // 640):
        v = sum(codes[:, 640 * b + 128 * i: 640 * b + 128 * i + 128] * 3 ** (4 - i) for i in range(5))
        np.testing.assert_array_equal(packed[:, 128 * b: 128 * b + 128], (v * 256 + 242) // 243)
    np.testing.assert_array_equal(packed[:, kp // 640 * 128:], pack_i2_k128(trits)[:, kp // 640 * 160:])


def test_tq1_pack_holds_the_same_trits_in_fewer_bytes(tmp_path, test_tokenizer_dir):
    """--layout tq1 on a checkpoint whose widths take whole 640-input blocks and an i2 end: every
    projection unpacks to the i2 file's trits, the file records its layout, and the ternary payload
    shrinks to about 1.6 bits per weight."""
    from conftest import make_hf_checkpoint

    ckpt = make_hf_checkpoint(tmp_path / "hf", test_tokenizer_dir, hidden_size=704, intermediate_size=1280,
                              num_attention_heads=11, num_key_value_heads=1)
    i2 = pack_checkpoint(ckpt, tmp_path / "i2.bin")
    tq1 = pack_checkpoint(ckpt, tmp_path / "tq1.bin", ternary_layout="tq1")
    assert (i2.layout, tq1.layout) == ("i2_k128", "tq1_k640")
    assert tq1.ternary_bits_per_weight < 0.86 * i2.ternary_bits_per_weight and tq1.file_bytes < i2.file_bytes
    with PackedModel.open(tmp_path / "i2.bin") as a, PackedModel.open(tmp_path / "tq1.bin") as b:
        assert b.layout == "tq1_k640" and b.verify() == []
        for name in a.names:
            if name.endswith("_proj.weight"):
                ta, ga = a.ternary(name)
                tb, gb = b.ternary(name)
                np.testing.assert_array_equal(ta, tb)
                assert ga == gb
    assert not tq1.notes  # it saves bytes: nothing to say
    with pytest.raises(BitnetError, match="ternary_layout must be one of i2, tq1"):
        pack_checkpoint(ckpt, tmp_path / "x.bin", ternary_layout="i3")
    with pytest.raises(BitnetError, match="GGUF export writes"):
        pack_checkpoint(ckpt, tmp_path / "x.gguf", to="gguf", ternary_layout="tq1")


def test_tq1_on_a_model_too_narrow_for_it_says_it_saves_nothing(hf_tiny_checkpoint, tmp_path):
    """The quickstart's model (rows of 256 and 512 inputs) has no whole 640-input block: `--layout tq1`
    wrote an i2-sized file at 2.0000 bits per weight without a word, under the README's "1.6-bit" example."""
    tq1 = pack_checkpoint(hf_tiny_checkpoint, tmp_path / "tq1.bin", ternary_layout="tq1")
    i2 = pack_checkpoint(hf_tiny_checkpoint, tmp_path / "i2.bin")
    assert tq1.file_bytes == i2.file_bytes
    assert any(note.startswith("layout tq1 saves nothing on this model") and "wider than 200 inputs" in note
               for note in tq1.notes), tq1.notes
    assert not i2.notes


@pytest.mark.parametrize("hidden", [64, 300, 2560])
def test_q6_rows_are_q6_k_in_our_byte_order(hidden):
    """q6 encodes with the Q6_K quantiser and holds exactly its codes, scales and d: Q6_K rows
    transcode to q6 and decode to what ggml's Q6_K dequantisation gives, bit for bit, and q6 rows
    go back to the same Q6_K bytes."""
    from bitnet_cli.gguf import quants
    from bitnet_cli.pack.embeddings import EMBEDDING_TYPES, q6_fields, decode, encode, q6_padded

    rng = np.random.default_rng(hidden)
    rows = rng.standard_normal((40, hidden)).astype(np.float32) * 0.02
    rows[3, 5] = 1.5  # an outlier: its 16-input group gets the block's largest scale
    rows[4, :] = 0.0  # an all-zero row decodes to zeros
    (blocks,) = encode(rows, "q6")
    padded = np.zeros((40, q6_padded(hidden)), np.float32)
    padded[:, :hidden] = rows
    q6k = quants.quantize_q6_k(padded)
    assert blocks.dtype == np.uint8 and blocks.shape == q6k.shape == (40, q6_padded(hidden) // 256 * 210)
    (converted,) = EMBEDDING_TYPES["q6"].transcode["Q6_K"](q6k, q6_padded(hidden))
    np.testing.assert_array_equal(converted, blocks)
    back = decode([blocks], hidden, "q6")
    np.testing.assert_array_equal(back, quants.dequantize("Q6_K", q6k, q6_padded(hidden))[:, :hidden])
    assert (back[4] == 0).all()
    np.testing.assert_array_equal(quants.q6_k_pack(*q6_fields(blocks)).reshape(q6k.shape), q6k)
    # 6.56 bits per weight: about 2% relative error on Gaussian rows (q4: 9%)
    err = np.linalg.norm(back - rows, axis=1) / np.maximum(np.linalg.norm(rows, axis=1), 1e-9)
    assert np.median(err) < 0.03


def _quantize_q6_k_unsliced(x):
    """quantize_q6_k as it was written first, every row at once: the reference the sliced,
    allocation-free version must equal byte for byte."""
    from bitnet_cli.gguf.quants import q6_k_pack

    F32 = np.float32
    r, k = x.shape
    sub = x.reshape(-1, 16)
    vmax = sub[np.arange(len(sub)), np.abs(sub).argmax(axis=1)]
    w = sub * sub
    best_scale = np.zeros(len(sub), dtype=F32)
    best_metric = np.full(len(sub), -np.inf, dtype=np.float64)
    nz = np.abs(vmax) > 1e-30
    safe = np.where(nz, vmax, 1).astype(F32)
    for step in range(-9, 10):
        iscale = -(F32(32) + F32(0.1) * step) / safe
        q = np.clip(np.rint(iscale[:, None] * sub), -32, 31)
        sumlx = (w * sub * q).sum(axis=1, dtype=np.float64)
        suml2 = (w * q * q).sum(axis=1, dtype=np.float64)
        metric = np.divide(sumlx * sumlx, suml2, out=np.full_like(sumlx, -np.inf), where=suml2 > 0)
        better = metric > best_metric
        best_metric = np.where(better, metric, best_metric)
        best_scale = np.where(better, np.divide(sumlx, suml2, out=np.zeros_like(sumlx), where=suml2 > 0), best_scale)
    best_scale = np.where(nz, best_scale, 0).astype(F32).reshape(-1, 16)
    max_scale = best_scale[np.arange(len(best_scale)), np.abs(best_scale).argmax(axis=1)]
    iscale = np.divide(F32(-128), max_scale, out=np.zeros_like(max_scale), where=max_scale != 0)
    scales = np.clip(np.rint(iscale[:, None] * best_scale), -128, 127).astype(np.int8)
    d = np.divide(F32(1), iscale, out=np.zeros_like(iscale), where=iscale != 0).astype(np.float16)
    step = d.astype(F32)[:, None] * scales.astype(F32)
    vals = x.reshape(-1, 16, 16)
    q = np.clip(np.rint(np.divide(vals, step[:, :, None], out=np.zeros_like(vals), where=step[:, :, None] != 0)),
                -32, 31).astype(np.int16) + 32
    return q6_k_pack(q.reshape(-1, 256).astype(np.uint8), scales, d.view(np.uint16)).reshape(r, -1)


@pytest.mark.parametrize("slice_blocks", [1, 3, None])
def test_q6_k_quantiser_slices_change_no_byte(monkeypatch, slice_blocks):
    """quantize_q6_k goes through its rows in slices (whole blocks), transposed, with reused
    buffers and its own float64 sums: the bytes are those of the all-at-once version, for any
    slice size, ragged last slice included."""
    from bitnet_cli.gguf import quants

    if slice_blocks:
        monkeypatch.setattr(quants, "_Q6_SLICE", slice_blocks)
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((7, 1024)) * rng.uniform(1e-4, 3, size=(7, 1))).astype(np.float32)
    x[0, :256] = 0  # an all-zero block
    x[1, 16:32] = 1e-35  # a sub-block below the 1e-30 cut
    x[2, 40] = -50.0  # a negative outlier sets its block's largest step
    x[3, 300:316] = np.float32(0.5)  # equal values: every candidate grid ties
    x[4] = np.round(x[4] * 64) / 64  # values on a coarse grid: exact halves under some candidate steps
    x[5] *= np.exp(rng.uniform(-20, 8, 1024)).astype(np.float32)  # wide range: the fit's float64 sums round,
    # so they are the reference's bits only when added in its order
    got = quants.quantize_q6_k(x)
    assert got.shape == (7, 4 * 210) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _quantize_q6_k_unsliced(x))


def test_q6_k_fit_sums_add_in_numpys_order():
    """The quantiser's float64 sums of 16 float32 products are numpy's own (sum(axis=1)) bit for
    bit, on values whose sums round (in another order, about 40% of them differ in the last bit)."""
    from bitnet_cli.gguf import quants

    rng = np.random.default_rng(16)
    t = (rng.standard_normal((16, 4096)) * np.exp(rng.uniform(-30, 30, (16, 4096)))).astype(np.float32)
    rows = np.ascontiguousarray(t.T)  # [S, 16] in memory, as the reference quantiser's products are
    np.testing.assert_array_equal(quants._sum16(t), rows.sum(axis=1, dtype=np.float64))


@pytest.mark.parametrize("d_bits", [0x7C00, 0xFC00, 0x7E00])  # +inf, -inf, NaN
def test_engine_refuses_a_q6_block_with_a_non_finite_d(tmp_path, d_bits):
    """A hostile q6 head (a block scale d of inf or NaN; a plain load recomputes no checksum) is refused
    on load with one clear error naming the tensor, row and block, not run into NaN logits."""
    from bitnet_cli.engine import Engine
    from bitnet_cli.pack.synthetic import write_random_model

    path = write_random_model(tmp_path / "q6.bin", "tiny", embeddings="q6")
    with PackedModel.open(path) as pm:
        entry = pm.entries["model.embed_tokens.weight"]
        per_row = pm.tensor("model.embed_tokens.weight").shape[1] // 210
    raw = bytearray(path.read_bytes())
    at = entry.begin + (7 * per_row + per_row - 1) * 210 + 208  # row 7's last block
    raw[at:at + 2] = d_bits.to_bytes(2, "little")
    bad = tmp_path / "hostile.bin"
    bad.write_bytes(bytes(raw))
    with pytest.raises(BitnetError, match=rf"hostile.bin: tensor 'model.embed_tokens.weight': q6 block {per_row - 1} "
                                          r"of row 7 has a non-finite scale d \((inf|-inf|nan); 1 such blocks\)"):
        Engine.load(bad)
    Engine.load(path).close()  # the untouched file loads


# q6's 256-input blocks pad this model's 96 inputs: here its file is larger than f16's
@pytest.mark.parametrize("embeddings, relative_error, smaller", [("q6", 0.03, False), ("q4", 0.15, True)])
def test_q6_and_q4_embeddings_pack_and_verify(hf_tiny_checkpoint, tmp_path, embeddings, relative_error, smaller):
    summary = pack_checkpoint(hf_tiny_checkpoint, tmp_path / f"{embeddings}.bin", embeddings=embeddings)
    with PackedModel.open(summary.output) as pm, PackedModel.open(pack_checkpoint(hf_tiny_checkpoint, tmp_path / "f16.bin").output) as ref:
        assert pm.embeddings == embeddings and pm.verify() == []
        a, b = pm.embedding(), ref.embedding()
        assert np.linalg.norm(a - b) < relative_error * np.linalg.norm(b)
        ids = np.arange(16) * 5
        logits, want = reference.forward(pm, ids), reference.forward(ref, ids)
        assert np.abs(logits - want).max() < 0.2 * np.abs(want).max()
        assert (pm.file_size < ref.file_size) == smaller


def test_synthetic_tiny_model_is_valid(tmp_path):
    from tokenizers import Tokenizer

    from bitnet_cli.pack.synthetic import write_random_model

    path = write_random_model(tmp_path / "tiny.bin", "tiny", seed=1)
    with PackedModel.open(path) as pm:
        assert pm.verify() == []
        assert Tokenizer.from_str(pm.tokenizer_json).get_vocab_size() == pm.dims.vocab_size == 512
        logits = reference.forward(pm, [0, 5, 300, 511])
        assert np.isfinite(logits).all() and logits.std() > 0
    again = write_random_model(tmp_path / "again.bin", "tiny", seed=1)
    assert again.read_bytes() == path.read_bytes()
    with PackedModel.open(write_random_model(tmp_path / "i8.bin", "tiny", embeddings="int8")) as pm:
        assert np.isfinite(reference.forward(pm, [1, 2, 3])).all()


@pytest.mark.parametrize("name", ["f16", "int8", "q6", "q4"])
def test_embedding_traits_agree_with_what_they_store(name):
    """Each entry of the traits table: encode gives exactly the tensors `stored` declares, decode
    inverts it, row_bytes counts them, and the C enum it names exists in the compiled kernels."""
    from bitnet_cli import kernels
    from bitnet_cli.checkpoint import SAFETENSORS_DTYPES
    from bitnet_cli.pack.embeddings import EMBEDDING_TYPES

    kind = EMBEDDING_TYPES[name]
    rows = np.random.default_rng(0).standard_normal((5, 100)).astype(np.float32) * 0.02
    arrays = kind.encode(rows)
    declared = kind.stored(5, 100)
    assert [(a.dtype, a.shape) for a in arrays] == [(SAFETENSORS_DTYPES[d], s) for _, d, s in declared]
    assert kind.row_bytes(100) == sum(a.nbytes for a in arrays) // 5
    assert np.abs(kind.decode(arrays, 100) - rows).max() < 0.01
    _, lib = kernels.lib()
    assert isinstance(getattr(lib, kind.c_enum), int)
