"""The packed model file (docs/FORMAT.md): its tensor list, the streaming writer, the mmap reader.

The file is a safetensors container whose tensors all start on 64-byte file offsets, so the
engine can memory-map it and hand pointers to SIMD kernels with no copy and no unpacking.
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitnet_cli import __version__, safejson
from bitnet_cli.arch import EMBED, LM_HEAD, ModelDims, split_layer_tensor
from bitnet_cli.checkpoint import SAFETENSORS_DTYPES, TensorEntry, read_safetensors_header
from bitnet_cli.errors import BitnetError
from bitnet_cli.files import TempFile, special_kind
from bitnet_cli.pack.embeddings import EMBEDDING_TYPES, embedding_type
from bitnet_cli.pack.ternary import LAYOUTS, layout, layout_named

FORMAT = "bitnet-cli"
# 2: the config may describe the Llama family (model_type llama, hidden_act silu, no sub-norm
# tensors, llama3 rope_parameters, head_dim free). Version 1 files (BitNet b1.58 only) still load.
# 3: projections may carry float biases (the qwen2 family) and their own input norms (use_rms_norm);
# a file is written as version 3 only when it holds either (`file_version`), so that readers of version 2 refuse it instead of running
# it without them, and still read every file that needs nothing newer.
FORMAT_VERSION = "3"
READABLE_VERSIONS = ("1", "2", "3")
ALIGN = 64
PAD_PREFIX = "__pad__."
CONVERTER = f"bitnet-cli {__version__}"

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
            for suffix, dtype, shape in embedding_type(embeddings).stored(dims.vocab_size, dims.hidden_size)]


def file_version(dims: ModelDims) -> str:
    """The oldest format version that can hold this model (see FORMAT_VERSION)."""
    return "3" if dims.qkv_bias or dims.bitlinear_norm_eps is not None else "2"


def tensor_specs(dims: ModelDims, embeddings: str, ternary_layout: str = "i2") -> list[TensorSpec]:
    """Every tensor of a packed file, in file order (embeddings, layers in order, head), its
    projections in `ternary_layout` (an --layout choice, pack/ternary.py's LAYOUTS)."""
    row_bytes = layout(ternary_layout).row_bytes
    specs = []
    for name, shape, kind in dims.hf_tensors():
        if kind == "embedding":
            specs += embedding_specs(name, dims, embeddings)
        elif kind == "projection":  # packed trits, then gamma
            n, k = shape
            specs.append(TensorSpec(name, "U8", (n, row_bytes(k))))
            specs.append(TensorSpec(name + "_scale", "F32", (1,)))
        else:  # norms and biases
            specs.append(TensorSpec(name, "F32", shape))
    return specs


# ------------------------------------------------------------------------------ writer


def check_output_path(out: Path, force: bool = False) -> None:
    """Fail before any work if `out` cannot become a new file (or, with `force`, replace one)."""
    if not out.name or out.name in (".", ".."):
        raise BitnetError(f"{str(out)!r}: give an output file name")
    if out.is_dir():
        raise BitnetError(f"{out}: is a directory (give a file name)")
    if special := special_kind(out):  # even with force: the rename would replace the device or pipe itself
        raise BitnetError(f"{out}: is {special}, not a regular file (give a file name)")
    if out.exists() and not force:
        raise BitnetError(f"{out}: already exists (use force to overwrite)", param="force")
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


def write_embedding_rows(writer: "PackedWriter", name: str, chunks, vocab: int, embeddings: str, check=None) -> None:
    """Encode float row chunks (covering all `vocab` rows in order) and write the stored tensors:
    the values chunk by chunk, then the per-row scales, which follow them in the file.
    `check(rows, stored, embeddings)`, if given, sees every chunk (to measure what the encoding lost)."""
    kind = embedding_type(embeddings)

    def stored():
        for rows in chunks:
            arrays = kind.encode(np.asarray(rows, dtype=np.float32))
            if check is not None:
                check(rows, arrays, embeddings)
            yield arrays

    write_stored_rows(writer, name, stored(), vocab, embeddings)


def write_stored_rows(writer: "PackedWriter", name: str, chunks, vocab: int, embeddings: str) -> None:
    """Write an embedding from chunks of its stored arrays (each chunk a list in the type's stored
    order, covering all `vocab` rows in order): the values chunk by chunk, then the scales."""
    suffixes = embedding_type(embeddings).suffixes
    tails: list[list[np.ndarray]] = [[] for _ in suffixes[1:]]
    done = 0
    for values, *rest in chunks:
        done += len(values)
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
        self.ternary_layout = layout_named(self.layout)  # open() has refused layouts it does not know
        self.embeddings = metadata["embeddings"]
        self.checksums = _json_value(metadata, "checksums", where, dict)
        self.names = [n for n in entries if not n.startswith(PAD_PREFIX)]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "PackedModel":
        path = Path(path)
        if path.is_dir():
            raise BitnetError(f"{path}: is a directory, not a packed model file (make one with `bitnet pack`)")
        if special := special_kind(path):  # reading a FIFO would wait for a writer forever
            raise BitnetError(f"{path}: is {special}, not a packed model file")
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except FileNotFoundError:
            raise BitnetError(f"{path}: no such file") from None
        except OSError as e:  # a symlink loop, no permission, /proc/self/mem's EIO
            raise BitnetError(f"{path}: cannot read ({e.strerror or e})") from None
        if magic == b"GGUF":
            raise BitnetError(f"{path}: is a GGUF file; this command reads bitnet-cli packed files (`bitnet pack`)")
        _, entries, metadata = read_safetensors_header(path)
        if metadata.get("format") != FORMAT:
            raise BitnetError(f"{path}: not a bitnet-cli packed model (make one with `bitnet pack`)")
        if metadata.get("format_version") not in READABLE_VERSIONS:
            raise BitnetError(
                f"{path}: packed format version {metadata.get('format_version')!r}; this bitnet-cli reads "
                f"versions {', '.join(READABLE_VERSIONS)} (re-pack the model)"
            )
        for key in ("config", "tokenizer", "layout", "embeddings", "checksums"):
            if key not in metadata:
                raise BitnetError(f"{path}: metadata key {key!r} is missing")
        if layout_named(metadata["layout"]) is None:
            raise BitnetError(f"{path}: unknown ternary layout {metadata['layout']!r} (this bitnet-cli reads "
                              f"{', '.join(t.name for t in LAYOUTS.values())})")
        if metadata["embeddings"] not in EMBEDDING_TYPES:
            raise BitnetError(f"{path}: unknown embeddings type {metadata['embeddings']!r}")
        pm = cls(path, metadata, entries, None)
        d = pm.dims
        if metadata["format_version"] == "1" and (d.family, d.hidden_act, d.rope_scaling) != ("bitnet", "relu2", None):
            raise BitnetError(f"{path}: a version 1 file can only hold BitNet b1.58 (its config says "
                              f"{d.family}, hidden_act {d.hidden_act}); the file is damaged")
        if int(metadata["format_version"]) < int(file_version(d)):
            raise BitnetError(f"{path}: its config ({d.family}{', use_rms_norm' if d.bitlinear_norm_eps else ''}) needs "
                              f"format version {file_version(d)} but the "
                              f"file says {metadata['format_version']}; the file is damaged")
        for spec in tensor_specs(pm.dims, pm.embeddings, pm.ternary_layout.option):
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
        _, k = self.dims.projection_shape(split_layer_tensor(name)[1])
        gamma = self.tensor(name + "_scale")[0]
        return self.ternary_layout.unpack(self.tensor(name), k), np.float32(gamma)

    def embedding(self, name: str = EMBED, rows=slice(None)) -> np.ndarray:
        """Rows of an embedding (or untied head) as float32, whatever its stored type."""
        if name == LM_HEAD:
            name = self.dims.head_name
        kind = embedding_type(self.embeddings)
        return kind.decode([self.tensor(name + suffix)[rows] for suffix in kind.suffixes], self.dims.hidden_size)

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def describe(self) -> dict:
        """What the file holds, JSON-ready (``bitnet info --json``): file, format, metadata, config,
        tokenizer config and every tensor with its offset, size and stored crc32."""
        return {
            "file": str(self.path), "file_bytes": self.file_size,
            "format_version": self.metadata["format_version"], "layout": self.layout,
            "embeddings": self.embeddings, "source": self.metadata.get("source", ""),
            "converter": self.metadata.get("converter", ""), "config": self.config,
            "tokenizer_config": self.tokenizer_config, "tokenizer_bytes": len(self.tokenizer_json),
            "tensors": [
                {"name": n, "dtype": self.entries[n].dtype, "shape": list(self.entries[n].shape),
                 "offset": self.entries[n].begin, "bytes": self.entries[n].nbytes, "crc32": self.checksums.get(n)}
                for n in self.names
            ],
        }

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
