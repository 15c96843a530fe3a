"""A GGUF file as a source for `bitnet pack` (and so for `bitnet run model.gguf`).

`open_gguf(path)` reads the metadata into an HF-style config and a rebuilt tokenizer, checks
every tensor the config implies against the file, and then serves the tensors under their HF
names, one at a time, from the memory map:

- `ternary(name, shape)`: (trits, gamma) of a BitLinear weight. I2_S and TQ1_0/TQ2_0 codes are
  read as they are, with their stored scale (I2_S's trailing float32; TQ's block d times the
  optional `<name>.scale` tensor). Float weights (the F16/BF16/F32 files bitnet.cpp's converter
  writes before quantising) are usually already ternary times one scale: that scale is kept as
  stored. Anything else is ternarised by the absmean rule, and the import says so.
- `read(name, rows)`: norms and embedding rows as float32, dequantised exactly as ggml does.

I2_S comes in two layouts of the same size (gguf/quants.py): bitnet.cpp's x86 build writes
128-value blocks, its ARM build 64-value ones, and neither writes anything that says which
(no metadata key, the same type id, the same tail; only a tensor of an odd multiple of 64
values would tell, and the engine's 128-value blocks refuse those anyway). The import reads the
x86 layout, the one of every published bitnet.cpp GGUF and of bitnet.cpp's own
`dequantize_row_i2_s`, and says so in a note; `--i2s-block 64` (`i2s_block` here) reads an
ARM-written file. Reading one layout as the other permutes every weight's input columns within
each 128-value window, which no check on the codes or the scale can notice: hence the note.

An architecture is one entry of `ARCHITECTURES`; the tensor names come from the model
description (`gguf_name`), not from a table of our own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bitnet_cli.arch import EMBED, LM_HEAD, ModelDims, gguf_name
from bitnet_cli.checkpoint import TensorEntry
from bitnet_cli.errors import BitnetError
from bitnet_cli.gguf import quants
from bitnet_cli.gguf.reader import GGUFFile, TensorInfo
from bitnet_cli.gguf.tokenizer import rebuild
from bitnet_cli.pack.embeddings import EMBEDDING_TYPES
from bitnet_cli.pack.ternary import ternarize


@dataclass(frozen=True)
class Architecture:
    """How one GGUF architecture maps onto the HF BitNet config (an architecture is one entry)."""

    writer: str  # who writes it, for messages
    model_type: str = "bitnet"
    hidden_act: str | None = "relu2"  # None: read HIDDEN_ACT_KEY, refuse without it
    ternary_types: tuple[str, ...] = ("I2_S", "TQ1_0", "TQ2_0")
    notes: dict = field(default_factory=dict)


# Written into our `bitnet` export (pack/gguf.py): llama.cpp's `bitnet` graph is the 1bitLLM model
# (SiLU-gated FFN), so a `bitnet` file is read as BitNet b1.58 (squared ReLU) only when this key says so.
HIDDEN_ACT_KEY = "bitnet-cli.hidden_act"
ARCHITECTURES = {
    "bitnet-b1.58": Architecture("bitnet.cpp (BitNet b1.58 2B4T)"),
    "bitnet-25": Architecture("bitnet.cpp's convert-ms-to-gguf-bitnet.py (BitNet b1.58 2B4T)"),
    "bitnet": Architecture("llama.cpp (`bitnet`: the 1bitLLM models, SiLU-gated FFN)", hidden_act=None),
}
ZERO_SCALE = np.float32(1e-5)  # gamma of an all-zero weight, as the absmean rule's clamp gives it


def _norm_meta(gf: GGUFFile, arch: str) -> dict:
    """The HF config fields from `<arch>.*` metadata keys."""
    def num(key, kind=int, default=None, required=True):
        value = gf.get(f"{arch}.{key}", (int, float) if kind is float else int, default, required and default is None)
        return kind(value) if value is not None else None

    heads = num("attention.head_count")
    hidden = num("embedding_length")
    head_dim = num("rope.dimension_count", default=0) or num("attention.key_length", default=0) or (
        hidden // heads if heads else 0)
    config = {
        "hidden_size": hidden,
        "intermediate_size": num("feed_forward_length"),
        "num_hidden_layers": num("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": num("attention.head_count_kv", default=heads),
        "head_dim": head_dim,
        "rms_norm_eps": num("attention.layer_norm_rms_epsilon", float, 1e-5),
        "rope_theta": num("rope.freq_base", float, 10000.0),
        "max_position_embeddings": num("context_length", default=2048),
    }
    scaling = gf.get(f"{arch}.rope.scaling.type", str)
    factor = gf.get(f"{arch}.rope.scaling.factor", (int, float), 1.0)
    if scaling not in (None, "none") and not (scaling == "linear" and factor == 1.0):
        raise BitnetError(f"{gf.path}: metadata key '{arch}.rope.scaling.type' = {scaling!r} (factor {factor}): "
                          "only plain RoPE is supported")
    return config


class GGUFCheckpoint:
    """The `Checkpoint` interface that `pack` uses, over a GGUF file (kind "gguf")."""

    kind = "gguf"

    def __init__(self, gf: GGUFFile, arch: str, config: dict, dims: ModelDims, tokenizer_json: str,
                 tokenizer_config: dict, notes: list[str], i2s_block: int = quants.I2S_BLOCK):
        self.gf, self.arch, self.config, self.dims = gf, arch, config, dims
        self.i2s_block = i2s_block
        self.path = gf.path
        self.source = str(gf.path)
        self.tokenizer_json, self.tokenizer_config = tokenizer_json, tokenizer_config
        self.notes = notes
        self.tensors = {}  # HF name -> (path, entry), the shapes `pack` checks against
        for name, _, _ in dims.hf_tensors():
            g = self.gguf_tensor(name)
            self.tensors[name] = (gf.path, TensorEntry(name, "F32", g.shape, g.offset, g.offset + g.nbytes))

    # ------------------------------------------------------------------ the Checkpoint interface

    def gguf_tensor(self, hf_name: str) -> TensorInfo:
        if hf_name == LM_HEAD and self.dims.tie_word_embeddings:
            hf_name = EMBED
        return self.gf.tensor(gguf_name(hf_name))

    def where(self, hf_name: str) -> str:
        return f"{self.path}: tensor {self.gguf_tensor(hf_name).name!r}"

    def entry(self, name: str) -> TensorEntry:
        return self.tensors[name][1]

    def file_of(self, name: str) -> Path:
        return self.path

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """A norm or embedding (rows of it) as float32, dequantised exactly."""
        t = self.gguf_tensor(name)
        k = t.dims[0]
        n = t.count // k
        start, stop, _ = (rows or slice(None)).indices(n)
        rb = quants.row_bytes(t.type_id, k)
        if t.type_name not in quants.DEQUANTISABLE:
            raise BitnetError(f"{self.where(name)} has type {t.type_name}; supported here: "
                              f"{', '.join(quants.DEQUANTISABLE)}")
        raw = self.gf.raw(t.name, start * rb, (stop - start) * rb)
        out = quants.dequantize(t.type_name, raw, k)  # a copy: the mapped pages can go
        self.gf.release(t.name, start * rb, (stop - start) * rb)
        return out.reshape((stop - start, k) if len(t.dims) > 1 else (k,))

    def read_raw(self, name: str, rows: slice) -> np.ndarray:
        """Rows of a 2-D tensor as its stored bytes (uint8 [rows, row bytes], a copy), for a storage
        type that holds the GGUF type as it is (pack/embeddings.py's `transcode`)."""
        t = self.gguf_tensor(name)
        k = t.dims[0]
        start, stop, _ = rows.indices(t.count // k)
        rb = quants.row_bytes(t.type_id, k)
        out = self.gf.raw(t.name, start * rb, (stop - start) * rb).reshape(stop - start, rb).copy()
        self.gf.release(t.name, start * rb, (stop - start) * rb)
        return out

    def ternary(self, name: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.float32]:
        """(trits int8 [N, K], gamma) of a BitLinear weight, keeping the scale the file stores."""
        try:
            return self._ternary(name, shape)
        finally:
            self.gf.release(self.gguf_tensor(name).name)

    def _ternary(self, name: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.float32]:
        t = self.gguf_tensor(name)
        where = self.where(name)
        n, k = shape
        if t.type_name == "I2_S":
            codes_len = n * k // 4
            scale = self.gf.raw(t.name, codes_len, 4).view("<f4")[0]
            codes = quants.i2s_codes(self.gf.raw(t.name, 0, codes_len), self.i2s_block).reshape(n, k)
            trits = self._trits(codes, where)
            if not np.isfinite(scale) or scale < 0:
                raise BitnetError(f"{where}: the I2_S scale {scale} is not a finite non-negative number")
            return trits, np.float32(scale) if scale > 0 else ZERO_SCALE
        if t.type_name in ("TQ1_0", "TQ2_0"):
            raw = self.gf.raw(t.name)
            codes = quants.ternary_codes(t.type_name, raw, k)
            d = quants.ternary_block_scales(t.type_name, raw).reshape(n, -1)
            extra = np.float32(1)
            scale_name = t.name.rsplit(".", 1)[0] + ".scale"
            if scale_name in self.gf.tensors:
                s = self.gf.tensor(scale_name)
                if s.type_name != "F32" or s.count != 1:
                    raise BitnetError(f"{self.path}: tensor {scale_name!r} must be one F32, got {s.type_name} {list(s.dims)}")
                extra = self.gf.raw(scale_name).view("<f4")[0]
            block_d = np.repeat(d, quants.GGML_TYPES[t.type_id].block, axis=1)[:, :k]
            if (codes <= 2).all():
                nonzero = np.unique(d[d != 0])
                if len(nonzero) <= 1 and np.isfinite(extra) and extra > 0:
                    trits = np.where(block_d != 0, codes.astype(np.int8) - 1, 0).astype(np.int8)
                    gamma = np.float32(np.float32(nonzero[0]) * extra) if len(nonzero) else ZERO_SCALE
                    return trits, gamma
            values = (block_d * (codes.astype(np.float32) - 1)) * extra
            return self._from_floats(values, where, f"{t.type_name} with varying block scales")
        if t.type_name in quants.DEQUANTISABLE:
            return self._from_floats(self.read(name), where, t.type_name)
        raise BitnetError(f"{where} has type {t.type_name}; a BitLinear weight must be one of "
                          f"{', '.join(('I2_S', 'TQ1_0', 'TQ2_0') + quants.DEQUANTISABLE)}")

    def _trits(self, codes: np.ndarray, where: str) -> np.ndarray:
        if (codes == 3).any():
            row, col = np.argwhere(codes == 3)[0]
            raise BitnetError(f"{where}: 2-bit code 3 (not a ternary value) at row {row}, column {col}: corrupt, not "
                              "in bitnet.cpp's x86 I2_S layout, or made by `llama-quantize ... I2_S N` with N > 1 "
                              "threads, which writes each chunk of rows at four times its offset (quantise with 1)")
        return codes.astype(np.int8) - 1

    def _from_floats(self, w: np.ndarray, where: str, kind: str) -> tuple[np.ndarray, np.float32]:
        """Float weights: ternary times one scale keeps that scale; anything else gets the absmean rule."""
        if not np.isfinite(w).all():
            bad = np.argwhere(~np.isfinite(w))[0]
            raise BitnetError(f"{where}: non-finite value {w[tuple(bad)]} at index {bad.tolist()}")
        mag = np.abs(w)
        peak = mag.max(initial=0)
        if peak == 0:
            return np.zeros(w.shape, np.int8), ZERO_SCALE
        if ((mag == peak) | (mag == 0)).all():
            return np.sign(w).astype(np.int8), np.float32(peak)
        note = f"{where}: {kind} weights are not ternary times one scale; ternarised with the absmean rule"
        if not any(n.endswith("with the absmean rule") for n in self.notes):
            self.notes.append(note + " (this and any other such weight)")
        return ternarize(w.astype(np.float32))

    def embedding_type(self, name: str) -> str:
        """The `--embeddings` default for an embedding: the storage type that loses nothing, or f16 (the closest)."""
        t = self.gguf_tensor(name)
        holds_as_is = [kind.name for kind in EMBEDDING_TYPES.values() if t.type_name in kind.transcode]
        if holds_as_is:  # Q6_K -> q6
            return holds_as_is[0]
        if t.type_name == "Q8_0":
            k = t.dims[0]
            rows = t.count // k
            blocks = self.gf.raw(t.name).reshape(rows, k // 32, 34)
            exact = True
            for start in range(0, rows, 8192):  # in row chunks: the check must not cost a copy of the matrix
                chunk = blocks[start:start + 8192]
                d = chunk[:, :, :2].copy().view(np.uint16)[..., 0]
                peak = np.abs(chunk[:, :, 2:].view(np.int8).astype(np.int16)).max(axis=(1, 2))
                # our int8 rows are q * (max|row| / 127): exact when every block of a row shares d and reaches 127
                if not ((d == d[:, :1]).all(axis=1) & ((peak == 127) | (peak == 0))).all():
                    exact = False
                    break
            self.gf.release(t.name)
            if exact:
                return "int8"
        return "f16"

    def close(self) -> None:
        self.gf.close()


def open_gguf(path: str | os.PathLike, i2s_block: int | None = None) -> GGUFCheckpoint:
    """Open a GGUF file as a pack source; every error names the file and the key or tensor.
    i2s_block: the I2_S layout, 128 (bitnet.cpp's x86 build) or 64 (its ARM build); None: 64 when a
    tensor's size says so, else 128 with a note (see the module docstring)."""
    if i2s_block is not None and i2s_block not in quants.I2S_BLOCKS:
        raise BitnetError(f"i2s_block must be one of {', '.join(map(str, quants.I2S_BLOCKS))} (values per I2_S "
                          f"block: 128 for files from bitnet.cpp's x86 build, 64 from its ARM build), got {i2s_block}",
                          param="i2s_block")
    gf = GGUFFile.open(path)
    try:
        return _open(gf, i2s_block)
    except BaseException:
        gf.close()
        raise


def _i2s_layout(gf: GGUFFile, requested: int | None, notes: list[str]) -> int:
    """Values per I2_S block for this file: `requested`, else the x86 layout with a note saying that nothing
    in the file could confirm it."""
    if requested is not None:
        return requested
    if any(t.type_name == "I2_S" for t in gf.tensors.values()):
        notes.append(f"{gf.path}: I2_S read in bitnet.cpp's x86 layout ({quants.I2S_BLOCK}-value blocks, as in the "
                     f"published GGUF files); its ARM build writes {quants.I2S_ARM_BLOCK}-value blocks of the same size "
                     "and nothing in the file tells the two apart: a file quantised on ARM (aarch64, Apple silicon) "
                     f"read this way generates garbage; import one with `bitnet pack --i2s-block {quants.I2S_ARM_BLOCK} "
                     f"{gf.path.name} OUT.bin`")
    return quants.I2S_BLOCK


def _open(gf: GGUFFile, i2s_block: int | None) -> GGUFCheckpoint:
    arch = gf.get("general.architecture", str, required=True)
    if arch not in ARCHITECTURES:
        raise BitnetError(f"{gf.path}: metadata key 'general.architecture' = {arch!r}: this GGUF is not a model "
                          f"bitnet-cli runs (supported: {', '.join(ARCHITECTURES)})")
    spec = ARCHITECTURES[arch]
    notes: list[str] = []
    hidden_act = spec.hidden_act or gf.get(HIDDEN_ACT_KEY, str)
    if hidden_act != "relu2":
        raise BitnetError(f"{gf.path}: architecture {arch!r} from {spec.writer}; bitnet-cli runs BitNet b1.58's "
                          f"squared-ReLU FFN, and this file does not say it has one (metadata key {HIDDEN_ACT_KEY!r}"
                          f" = {hidden_act!r}; bitnet-cli's own `--to gguf` export writes 'relu2')")
    config = _norm_meta(gf, arch)
    embed = gf.tensor("token_embd.weight")
    if len(embed.dims) != 2 or embed.dims[0] != config["hidden_size"]:
        raise BitnetError(f"{gf.path}: tensor 'token_embd.weight' has dims {list(embed.dims)}, expected "
                          f"[{config['hidden_size']}, vocab]")
    config["vocab_size"] = embed.dims[1]
    declared = gf.get(f"{arch}.vocab_size", int)
    if declared is not None and declared != embed.dims[1]:
        raise BitnetError(f"{gf.path}: metadata key '{arch}.vocab_size' = {declared} but 'token_embd.weight' has "
                          f"{embed.dims[1]} rows")
    config["tie_word_embeddings"] = "output.weight" not in gf.tensors
    if "rope_freqs.weight" in gf.tensors:
        f = gf.tensor("rope_freqs.weight")
        if f.type_name != "F32" or not (gf.raw(f.name).view("<f4") == 1).all():
            raise BitnetError(f"{gf.path}: tensor 'rope_freqs.weight' rescales RoPE frequencies (Llama 3.1 style); "
                              "only plain RoPE is supported")
    tokenizer_json, tokenizer_config, tok_note = rebuild(gf.metadata, str(gf.path), config["vocab_size"])
    if tok_note:
        notes.append(f"{gf.path}: {tok_note}")
    for kind in ("bos", "eos"):
        value = gf.metadata.get(f"tokenizer.ggml.{kind}_token_id")
        if value is not None:
            config[f"{kind}_token_id"] = value
    config.update(model_type=spec.model_type, architectures=["BitNetForCausalLM"], hidden_act=hidden_act,
                  _name_or_path=gf.get("general.name", str, "") or gf.path.stem)
    dims = ModelDims.from_config(config, f"{gf.path}: metadata")
    i2s_block = _i2s_layout(gf, i2s_block, notes)
    ckpt = GGUFCheckpoint(gf, arch, config, dims, tokenizer_json, tokenizer_config, notes, i2s_block)
    for name, want, _ in dims.hf_tensors():  # every tensor present, with the shape the metadata implies
        t = ckpt.gguf_tensor(name)
        if tuple(t.shape) != tuple(want):
            raise BitnetError(f"{gf.path}: tensor {t.name!r} has shape {list(t.shape)} but the metadata implies {list(want)}")
    return ckpt
