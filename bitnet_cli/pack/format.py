"""The packed model file (docs/FORMAT.md): model dimensions, the streaming writer, the mmap reader.

The file is a safetensors container whose tensors all start on 64-byte file offsets, so the
engine can memory-map it and hand pointers to SIMD kernels with no copy and no unpacking.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitnet_cli import __version__, safejson
from bitnet_cli.checkpoint import SAFETENSORS_DTYPES, TensorEntry, read_safetensors_header
from bitnet_cli.errors import BitnetError
from bitnet_cli.files import TempFile
from bitnet_cli.pack.embeddings import EMBEDDING_TYPES, decode, encode, stored_shapes, stored_suffixes
from bitnet_cli.pack.ternary import padded_k, unpack_i2_k128

FORMAT = "bitnet-cli"
FORMAT_VERSION = "1"
LAYOUT = "i2_k128"
ALIGN = 64
PAD_PREFIX = "__pad__."
CONVERTER = f"bitnet-cli {__version__}"

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm", "mlp.ffn_sub_norm")


# The largest dimensions the packer and the C engine accept (int32 arithmetic in the kernels,
# and far beyond any published model). The training recipe's schema uses the same bounds.
DIM_LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 4096,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "max_position_embeddings": 1 << 24,
}


@dataclass(frozen=True)
class ModelDims:
    """The numbers a BitNet b1.58 forward pass needs, read (and checked) from an HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: dict, where: str = "config") -> "ModelDims":
        def positive_int(key, default=None):
            value, limit = config.get(key, default), DIM_LIMITS[key]
            if type(value) is not int or not 0 < value <= limit:
                raise BitnetError(f"{where}: {key} must be a positive integer <= {limit}, got {safejson.short(value)}")
            return value

        heads = positive_int("num_attention_heads")
        kv_heads = config.get("num_key_value_heads") or heads
        hidden = positive_int("hidden_size")
        head_dim = config.get("head_dim") or (hidden // heads)
        if type(kv_heads) is not int or kv_heads <= 0 or heads % kv_heads:
            raise BitnetError(f"{where}: num_key_value_heads={safejson.short(kv_heads)} must divide num_attention_heads={heads}")
        if type(head_dim) is not int or head_dim <= 0 or head_dim % 2 or head_dim * heads != hidden:
            raise BitnetError(
                f"{where}: head_dim={safejson.short(head_dim)} x num_attention_heads={heads} must equal hidden_size={hidden} "
                "(attn_sub_norm normalises the concatenated heads) and be even (RoPE)"
            )
        act = config.get("hidden_act", "relu2")
        if act != "relu2":
            raise BitnetError(f"{where}: hidden_act={safejson.short(act)} is not supported (BitNet b1.58 uses relu2)")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise BitnetError(f"{where}: attention/MLP biases are not supported")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
            raise BitnetError(f"{where}: RoPE scaling {safejson.short(rope)} is not supported (only default RoPE)")
        theta = rope.get("rope_theta", config.get("rope_theta", 500000.0))
        eps = config.get("rms_norm_eps", 1e-5)
        for key, value in (("rope_theta", theta), ("rms_norm_eps", eps)):
            # bool is an int, NaN and inf are floats: none of them is a usable constant here
            if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
                raise BitnetError(f"{where}: {key} must be a positive finite number, got {safejson.short(value)}")
        quant = config.get("quantization_config") or {}
        if not isinstance(quant, dict):
            raise BitnetError(f"{where}: quantization_config must be a JSON object, got {safejson.short(quant)}")
        if quant.get("use_rms_norm"):
            raise BitnetError(f"{where}: quantization_config.use_rms_norm=true is not supported")
        tie = config.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise BitnetError(f"{where}: tie_word_embeddings must be true or false, got {safejson.short(tie)}")
        return cls(
            vocab_size=positive_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=positive_int("intermediate_size"),
            num_layers=positive_int("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(eps),
            rope_theta=float(theta),
            max_position_embeddings=positive_int("max_position_embeddings", 2048),
            tie_word_embeddings=tie,
        )

    def projection_shape(self, proj: str) -> tuple[int, int]:
        """(N outputs, K inputs) of a BitLinear layer, by its short name (e.g. 'self_attn.k_proj')."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
        }[proj]

    def norm_size(self, norm: str) -> int:
        return self.intermediate_size if norm == "mlp.ffn_sub_norm" else self.hidden_size





def normalized_config(config: dict, dims: ModelDims) -> dict:
    """The HF config stored in the file: the source's, with the fields engines need made explicit.

    The source's `quantization_config` is dropped: it describes the source's storage, and the
    packed file's storage is described by the `layout` metadata key.
    """
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    out.update(
        model_type="bitnet", head_dim=dims.head_dim, num_key_value_heads=dims.num_kv_heads,
        rope_theta=dims.rope_theta, rms_norm_eps=dims.rms_norm_eps,
        max_position_embeddings=dims.max_position_embeddings, tie_word_embeddings=dims.tie_word_embeddings,
        hidden_act="relu2",
    )
    return out


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * SAFETENSORS_DTYPES[self.dtype].itemsize


def embedding_specs(name: str, dims: ModelDims, embeddings: str) -> list[TensorSpec]:
    return [TensorSpec(name + suffix, dtype, shape)
            for suffix, dtype, shape in stored_shapes(dims.vocab_size, dims.hidden_size, embeddings)]


def tensor_specs(dims: ModelDims, embeddings: str) -> list[TensorSpec]:
    """Every tensor of a packed file, in file order (embeddings, layers in order, head)."""
    if embeddings not in EMBEDDING_TYPES:
        raise BitnetError(f"embeddings must be one of {', '.join(EMBEDDING_TYPES)}, got {embeddings!r}")
    specs = embedding_specs("model.embed_tokens.weight", dims, embeddings)
    for i in range(dims.num_layers):
        prefix = f"model.layers.{i}."
        for norm in LAYER_NORMS:
            specs.append(TensorSpec(f"{prefix}{norm}.weight", "F32", (dims.norm_size(norm),)))
        for proj in PROJECTIONS:
            n, k = dims.projection_shape(proj)
            specs.append(TensorSpec(f"{prefix}{proj}.weight", "U8", (n, padded_k(k) // 4)))
            specs.append(TensorSpec(f"{prefix}{proj}.weight_scale", "F32", (1,)))
    specs.append(TensorSpec("model.norm.weight", "F32", (dims.hidden_size,)))
    if not dims.tie_word_embeddings:
        specs += embedding_specs("lm_head.weight", dims, embeddings)
    return specs


# ------------------------------------------------------------------------------ writer


def check_output_path(out: Path, force: bool = False) -> None:
    """Fail before any work if `out` cannot become a new file (or, with `force`, replace one)."""
    if not out.name or out.name in (".", ".."):
        raise BitnetError(f"{str(out)!r}: give an output file name")
    if out.is_dir():
        raise BitnetError(f"{out}: is a directory (give a file name)")
    if out.exists() and not force:
        raise BitnetError(f"{out}: already exists (use --force to overwrite)")
    parent = out.parent
    if not parent.exists():
        raise BitnetError(f"{parent}: output directory does not exist")
    if not parent.is_dir():
        raise BitnetError(f"{parent}: is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BitnetError(f"{parent}: output directory is not writable")


def metadata_checksum(metadata: dict[str, str]) -> str:
    """crc32 of every metadata value but the checksums themselves (config, tokenizer, ...), so that
    `verify` also catches damage to the embedded text, which the header parser cannot see."""
    covered = {k: v for k, v in metadata.items() if k not in ("checksums", "metadata_checksum")}
    return f"{zlib.crc32(json.dumps(covered, sort_keys=True).encode()):08x}"


class PackedWriter:
    """Writes a packed file tensor by tensor, in the order of `specs`, to a temp file; `finish` renames.

    The header (offsets and all) is computed up front from the specs; the checksums are
    filled in at the end by rewriting the header in place (fixed-width hex, same length).
    """

    def __init__(self, out: Path, specs: list[TensorSpec], metadata: dict[str, str], force: bool = False):
        self.out = Path(out)
        check_output_path(self.out, force)
        self.specs = specs
        self.metadata = dict(metadata, metadata_checksum=metadata_checksum(metadata))
        self.checksums = {s.name: "00000000" for s in specs}
        self.layout: list[tuple[TensorSpec, int]] = []  # (spec, offset relative to data start)
        cursor, pads = 0, 0
        for spec in specs:
            if cursor % ALIGN:
                pad = ALIGN - cursor % ALIGN
                self.layout.append((TensorSpec(f"{PAD_PREFIX}{pads}", "U8", (pad,)), cursor))
                cursor, pads = cursor + pad, pads + 1
            self.layout.append((spec, cursor))
            cursor += spec.nbytes
        self.data_bytes = cursor
        self._order = [(s, o) for s, o in self.layout if not s.name.startswith(PAD_PREFIX)]
        self.header = self._header()
        self.data_start = len(self.header)
        self._next = 0
        self._crc = 0
        self._written = 0
        self._temp = TempFile(self.out)
        self.tmp = self._temp.path
        self.f = os.fdopen(os.dup(self._temp.fd), "wb")  # the dup shares the temp file's lock
        self.f.write(self.header)

    def _header(self) -> bytes:
        meta = dict(self.metadata, checksums=json.dumps(self.checksums, separators=(",", ":")))
        header = {"__metadata__": meta}
        for spec, offset in self.layout:
            header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-(8 + len(raw))) % ALIGN)  # the data then starts 64-byte aligned
        return len(raw).to_bytes(8, "little") + raw

    @property
    def total_bytes(self) -> int:
        return self.data_start + self.data_bytes

    def write(self, name: str, array: np.ndarray, final: bool = True) -> None:
        """Append `array` (all of tensor `name`, or a leading-dimension chunk of it with final=False)."""
        spec, offset = self._expect(name)
        want = np.dtype(SAFETENSORS_DTYPES[spec.dtype])
        if array.dtype != want:
            raise BitnetError(f"{self.out}: tensor {name!r}: writer got {array.dtype}, expected {want}")
        if self._written == 0:
            self.f.seek(self.data_start + offset)
        data = np.ascontiguousarray(array)
        self.f.write(memoryview(data).cast("B"))
        self._crc = zlib.crc32(memoryview(data).cast("B"), self._crc)
        self._written += data.nbytes
        if self._written > spec.nbytes:
            raise BitnetError(f"{self.out}: tensor {name!r}: more bytes than its shape {spec.shape}")
        if final:
            if self._written != spec.nbytes:
                raise BitnetError(
                    f"{self.out}: tensor {name!r}: {self._written} bytes written, shape {spec.shape} needs {spec.nbytes}"
                )
            self.checksums[name] = f"{self._crc:08x}"
            self._crc, self._written = 0, 0
            self._next += 1

    def _expect(self, name: str) -> tuple[TensorSpec, int]:
        order = self._order
        if self._next >= len(order) or order[self._next][0].name != name:
            expected = order[self._next][0].name if self._next < len(order) else "nothing more"
            raise BitnetError(f"{self.out}: tensors written out of order: got {name!r}, expected {expected!r}")
        return order[self._next]

    def finish(self) -> Path:
        if self._next != len(self._order):
            raise BitnetError(f"{self.out}: only {self._next} of {len(self._order)} tensors were written")
        self.f.seek(0)
        header = self._header()
        assert len(header) == self.data_start, "checksums changed the header length"
        self.f.write(header)
        self.f.truncate(self.total_bytes)  # pads are holes: zero bytes on every filesystem
        self.f.close()
        return self._temp.publish()

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        self._temp.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


def write_embedding_rows(writer: "PackedWriter", name: str, chunks, vocab: int, embeddings: str) -> None:
    """Encode float row chunks (covering all `vocab` rows in order) and write the stored tensors:
    the values chunk by chunk, then the per-row scales, which follow them in the file."""
    suffixes = stored_suffixes(embeddings)
    tails: list[list[np.ndarray]] = [[] for _ in suffixes[1:]]
    done = 0
    for rows in chunks:
        values, *rest = encode(rows, embeddings)
        done += len(rows)
        writer.write(name, values, final=done >= vocab)
        for parts, part in zip(tails, rest):
            parts.append(part)
    for suffix, parts in zip(suffixes[1:], tails):
        writer.write(name + suffix, np.concatenate(parts))


# ------------------------------------------------------------------------------ reader


class PackedModel:
    """A packed model file, memory-mapped read-only and validated on open.

    `tensor(name)` returns zero-copy read-only numpy views into the map; keep the object
    alive (or use it as a context manager) while views are in use.
    """

    def __init__(self, path: Path, metadata: dict, entries: dict[str, TensorEntry], mm: mmap.mmap | None):
        self.path = path
        self.metadata = metadata
        self.entries = entries
        self._mm = mm
        where = f"{path}"
        self.config = _json_value(metadata, "config", where, dict)
        self.dims = ModelDims.from_config(self.config, f"{where}: config")
        self.tokenizer_json: str = metadata["tokenizer"]
        self.tokenizer_config = _json_value(metadata, "tokenizer_config", where, dict)
        for key in ("bos_token", "eos_token", "chat_template"):
            value = self.tokenizer_config.get(key)
            if value is not None and not (isinstance(value, str) and safejson.is_utf8(value)):
                raise BitnetError(f"{where}: tokenizer_config {key} must be a string of valid Unicode, "
                                  f"got {safejson.short(value)}")
        self.layout = metadata["layout"]
        self.embeddings = metadata["embeddings"]
        self.checksums = _json_value(metadata, "checksums", where, dict)
        self.names = [n for n in entries if not n.startswith(PAD_PREFIX)]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "PackedModel":
        path = Path(path)
        if not path.is_file():
            raise BitnetError(f"{path}: no such file" if not path.exists() else
                              f"{path}: is a directory, not a packed model file (make one with `bitnet pack`)")
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                raise BitnetError(f"{path}: is a GGUF file; this command reads bitnet-cli packed files (`bitnet pack`)")
        _, entries, metadata = read_safetensors_header(path)
        if metadata.get("format") != FORMAT:
            raise BitnetError(f"{path}: not a bitnet-cli packed model (make one with `bitnet pack`)")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise BitnetError(
                f"{path}: packed format version {metadata.get('format_version')!r}; this bitnet-cli reads "
                f"version {FORMAT_VERSION} (re-pack the model)"
            )
        for key in ("config", "tokenizer", "layout", "embeddings", "checksums"):
            if key not in metadata:
                raise BitnetError(f"{path}: metadata key {key!r} is missing")
        if metadata["layout"] != LAYOUT:
            raise BitnetError(f"{path}: unknown ternary layout {metadata['layout']!r} (expected {LAYOUT})")
        if metadata["embeddings"] not in EMBEDDING_TYPES:
            raise BitnetError(f"{path}: unknown embeddings type {metadata['embeddings']!r}")
        pm = cls(path, metadata, entries, None)
        for spec in tensor_specs(pm.dims, pm.embeddings):
            e = entries.get(spec.name)
            if e is None:
                raise BitnetError(f"{path}: tensor {spec.name!r} is missing")
            if e.dtype != spec.dtype or e.shape != spec.shape:
                raise BitnetError(
                    f"{path}: tensor {spec.name!r} is {e.dtype} {list(e.shape)} but the config needs "
                    f"{spec.dtype} {list(spec.shape)}"
                )
            if e.begin % ALIGN:
                raise BitnetError(f"{path}: tensor {spec.name!r} starts at byte {e.begin}, not 64-byte aligned")
        try:
            with open(path, "rb") as f:
                pm._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise BitnetError(f"{path}: cannot memory-map: {e}") from None
        return pm

    def tensor(self, name: str) -> np.ndarray:
        """A read-only view of tensor `name` into the memory map (no copy)."""
        if self._mm is None:
            raise BitnetError(f"{self.path}: file is closed")
        e = self.entries.get(name)
        if e is None or name.startswith(PAD_PREFIX):
            raise BitnetError(f"{self.path}: no tensor {name!r}")
        return self.tensor_view(name, self._mm, e.begin)

    def tensor_view(self, name: str, buffer, offset: int) -> np.ndarray:
        """Tensor `name` (its dtype and shape) viewed in `buffer` at byte `offset`: the memory map,
        or a copy of the tensor's bytes made elsewhere."""
        e = self.entries[name]
        dtype = SAFETENSORS_DTYPES[e.dtype]
        return np.frombuffer(buffer, dtype=dtype, count=e.nbytes // dtype.itemsize, offset=offset).reshape(e.shape)

    def ternary(self, name: str) -> tuple[np.ndarray, np.float32]:
        """(trits int8 [N, K], gamma) of a BitLinear weight, e.g. 'model.layers.0.mlp.up_proj.weight'."""
        proj = name.split(".", 3)[3].rsplit(".", 1)[0]
        _, k = self.dims.projection_shape(proj)
        gamma = self.tensor(name + "_scale")[0]
        return unpack_i2_k128(self.tensor(name), k), np.float32(gamma)

    def embedding(self, name: str = "model.embed_tokens.weight", rows=slice(None)) -> np.ndarray:
        """Rows of an embedding (or untied head) as float32, whatever its stored type."""
        if name == "lm_head.weight" and self.dims.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        stored = [self.tensor(name + suffix)[rows] for suffix in stored_suffixes(self.embeddings)]
        return decode(stored, self.dims.hidden_size, self.embeddings)

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def verify(self, progress=None) -> list[str]:
        """Recompute every tensor's crc32 and the metadata's; return what does not match
        (tensor names, and ``__metadata__`` for the config/tokenizer text)."""
        bad = [] if self.metadata.get("metadata_checksum") == metadata_checksum(self.metadata) else ["__metadata__"]
        names = self.names
        for i, name in enumerate(names):
            want = self.checksums.get(name)
            got = f"{zlib.crc32(self.tensor(name)):08x}"
            if want != got:
                bad.append(name)
            if progress:
                progress(i + 1, len(names), name)
        return bad

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # views are still alive; the map is released when they are
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _json_value(metadata: dict, key: str, where: str, kind: type):
    return safejson.loads(metadata.get(key, "{}"), where, f"metadata {key!r}", kind)
