"""A GGUF reader (numpy + mmap) that trusts nothing in the file.

GGUF (llama.cpp's container, versions 2 and 3, little-endian): the magic `GGUF`, a uint32
version, uint64 tensor and key-value counts, the key-value pairs (typed: integers, floats,
bools, strings as uint64 length + UTF-8 bytes, arrays as element type + uint64 count + items),
the tensor infos (name, uint32 n_dims, uint64 dims with the innermost first, uint32 ggml type,
uint64 offset into the data section), then the data section, which starts at the next multiple
of `general.alignment` (default 32).

Every count, length, dimension and offset is checked against what is left of the file before
anything is allocated from it, so a hostile file gets a `BitnetError` naming the file and the
key or tensor at fault, never a huge allocation or a crash. Tensor data is never copied here:
`GGUFFile.raw(name)` is a read-only view of the memory map.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitnet_cli.errors import BitnetError
from bitnet_cli.gguf.quants import GGML_TYPES, tensor_nbytes
from bitnet_cli.safejson import short

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 64 << 20  # one metadata string (a chat template, a token): far above any real one
MAX_NAME = 64 << 10  # a tensor name or a key

# value type id -> (name, numpy dtype of the fixed-size scalars)
_SCALARS = {
    0: ("uint8", np.dtype("u1")), 1: ("int8", np.dtype("i1")), 2: ("uint16", np.dtype("<u2")),
    3: ("int16", np.dtype("<i2")), 4: ("uint32", np.dtype("<u4")), 5: ("int32", np.dtype("<i4")),
    6: ("float32", np.dtype("<f4")), 7: ("bool", np.dtype("u1")), 10: ("uint64", np.dtype("<u8")),
    11: ("int64", np.dtype("<i8")), 12: ("float64", np.dtype("<f8")),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: `dims` as GGUF stores them (innermost first); `shape` is numpy order (outermost first)."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    offset: int  # absolute file offset of the data
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id].name

    @property
    def count(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


class _Cursor:
    """Bounds-checked little-endian reads from the memory map; errors say what was being read."""

    def __init__(self, path: Path, buf, pos: int = 0):
        self.path, self.buf, self.pos, self.size = path, buf, pos, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise BitnetError(f"{self.path}: truncated or corrupt GGUF: {what} needs {n} bytes at offset {self.pos}, "
                              f"the file has {self.size}")

    def take(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.take("Q", f"the length of {what}")
        if n > limit:
            raise BitnetError(f"{self.path}: {what} claims a length of {n} bytes (limit {limit}): corrupt GGUF")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # token strings of some vocabularies are raw bytes, not UTF-8; keep them losslessly
            return raw.decode("utf-8", errors="surrogateescape")

    def array(self, n: int, dtype: np.dtype, what: str) -> np.ndarray:
        self.need(n * dtype.itemsize, what)
        out = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
        self.pos += n * dtype.itemsize
        return out


class GGUFFile:
    """A GGUF file, parsed and validated on open, its tensors memory-mapped read-only."""

    def __init__(self, path: Path, version: int, metadata: dict, tensors: dict[str, TensorInfo], mm, alignment: int):
        self.path, self.version, self.metadata, self.tensors = path, version, metadata, tensors
        self._mm, self.alignment = mm, alignment

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GGUFFile":
        path = Path(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise BitnetError(f"{path}: not a GGUF file (only {size} bytes)")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except IsADirectoryError:
            raise BitnetError(f"{path}: is a directory, not a GGUF file") from None
        except FileNotFoundError:
            raise BitnetError(f"{path}: no such file") from None
        except (OSError, ValueError) as e:
            raise BitnetError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
        try:
            return cls._parse(path, mm)
        except BaseException:
            mm.close()
            raise

    @classmethod
    def _parse(cls, path: Path, mm) -> "GGUFFile":
        cur = _Cursor(path, mm)
        if bytes(mm[:4]) != MAGIC:
            raise BitnetError(f"{path}: not a GGUF file (no GGUF magic)")
        cur.pos = 4
        version = cur.take("I", "the version")
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in VERSIONS:
                raise BitnetError(f"{path}: a big-endian GGUF; only little-endian files are supported")
            raise BitnetError(f"{path}: GGUF version {version} is not supported (versions {', '.join(map(str, VERSIONS))})")
        n_tensors = cur.take("Q", "the tensor count")
        n_kv = cur.take("Q", "the metadata count")
        left = cur.size - cur.pos
        # a key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info 8 + 4 + 4 + 8
        if n_kv > left // 13:
            raise BitnetError(f"{path}: the header claims {n_kv} metadata entries, more than the file can hold: corrupt GGUF")
        if n_tensors > left // 24:
            raise BitnetError(f"{path}: the header claims {n_tensors} tensors, more than the file can hold: corrupt GGUF")

        metadata: dict = {}
        for i in range(n_kv):
            key = cur.string(f"the name of metadata entry {i}", MAX_NAME)
            if key in metadata:
                raise BitnetError(f"{path}: metadata key {short(key, 100)} appears twice")
            vtype = cur.take("I", f"the type of metadata key {short(key, 100)}")
            metadata[key] = cls._value(cur, vtype, f"metadata key {short(key, 100)}")

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
            raise BitnetError(f"{path}: metadata key 'general.alignment' must be a power of two, got {alignment!r}")

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"the name of tensor {i}", MAX_NAME)
            where = f"{path}: tensor {short(name, 100)}"
            n_dims = cur.take("I", f"the dimension count of tensor {short(name, 100)}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise BitnetError(f"{where}: {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
            dims = tuple(int(d) for d in cur.array(n_dims, np.dtype("<u8"), f"the dimensions of tensor {short(name, 100)}"))
            type_id = cur.take("I", f"the type of tensor {short(name, 100)}")
            offset = cur.take("Q", f"the data offset of tensor {short(name, 100)}")
            infos.append((name, dims, type_id, offset))

        data_start = -(-cur.pos // alignment) * alignment
        size = cur.size
        tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in infos:
            where = f"{path}: tensor {short(name, 100)}"
            if name in tensors:
                raise BitnetError(f"{where}: appears twice")
            if type_id not in GGML_TYPES:
                raise BitnetError(f"{where}: unknown ggml type id {type_id}")
            count = 1
            for d in dims:
                if d == 0 or d > size * 8:  # no tensor has more elements than the file has bits (1.58-bit types)
                    raise BitnetError(f"{where}: impossible dimension {d} in {list(dims)}")
                count *= d
            if count > size * 8:
                raise BitnetError(f"{where}: dimensions {list(dims)} hold {count} values, more than the file can store")
            try:
                nbytes = tensor_nbytes(type_id, dims)
            except ValueError as e:
                raise BitnetError(f"{where}: {e}") from None
            if offset % alignment:
                raise BitnetError(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}")
            begin = data_start + offset
            if begin + nbytes > size:
                raise BitnetError(f"{where}: data ends at byte {begin + nbytes} but the file has {size} bytes (truncated?)")
            tensors[name] = TensorInfo(name, dims, type_id, begin, nbytes)
        spans = sorted(tensors.values(), key=lambda t: t.offset)
        for a, b in zip(spans, spans[1:]):
            if b.offset < a.offset + a.nbytes:
                raise BitnetError(f"{path}: tensors {a.name!r} and {b.name!r} overlap")
        return cls(path, version, metadata, tensors, mm, alignment)

    @classmethod
    def _value(cls, cur: _Cursor, vtype: int, what: str):
        if vtype in _SCALARS:
            name, dtype = _SCALARS[vtype]
            value = cur.array(1, dtype, what)[0]
            if vtype == 7:
                return bool(value)
            if vtype == 6:  # the shortest decimal that is this float32: 1e-05, not 9.999999747378752e-06
                return float(str(value))
            return float(value) if dtype.kind == "f" else int(value)
        if vtype == _STRING:
            return cur.string(what)
        if vtype == _ARRAY:
            etype = cur.take("I", f"the element type of {what}")
            n = cur.take("Q", f"the length of {what}")
            left = cur.size - cur.pos
            if etype in _SCALARS:
                dtype = _SCALARS[etype][1]
                if n > left // dtype.itemsize:
                    raise BitnetError(f"{cur.path}: {what} claims {n} elements, more than the file holds: corrupt GGUF")
                values = cur.array(n, dtype, what)
                return values.astype(bool) if etype == 7 else values
            if etype == _STRING:
                if n > left // 8:
                    raise BitnetError(f"{cur.path}: {what} claims {n} strings, more than the file holds: corrupt GGUF")
                return [cur.string(f"element {i} of {what}") for i in range(n)]
            if etype == _ARRAY:
                raise BitnetError(f"{cur.path}: {what} is an array of arrays, which no model metadata uses")
            raise BitnetError(f"{cur.path}: {what} has unknown array element type {etype}")
        raise BitnetError(f"{cur.path}: {what} has unknown value type {vtype}")

    # ------------------------------------------------------------------ access

    def get(self, key: str, kind: type | tuple = object, default=None, required: bool = False):
        """Metadata value `key`, checked to be of `kind` (int also accepts numpy integers' ints)."""
        if key not in self.metadata:
            if required:
                raise BitnetError(f"{self.path}: metadata key {short(key, 100)} is missing")
            return default
        value = self.metadata[key]
        if kind is not object and not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise BitnetError(f"{self.path}: metadata key {short(key, 100)} must be {want}, got {type(value).__name__}")
        return value

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise BitnetError(f"{self.path}: tensor {short(name, 100)} is missing")
        return self.tensors[name]

    def raw(self, name: str, start: int = 0, length: int | None = None) -> np.ndarray:
        """The stored bytes of tensor `name` (or a byte range of them): a read-only view of the map."""
        t = self.tensor(name)
        if self._mm is None:
            raise BitnetError(f"{self.path}: file is closed")
        length = t.nbytes - start if length is None else length
        if start < 0 or length < 0 or start + length > t.nbytes:
            raise BitnetError(f"{self.path}: tensor {short(name, 100)}: byte range {start}+{length} outside its {t.nbytes} bytes")
        return np.frombuffer(self._mm, dtype=np.uint8, count=length, offset=t.offset + start)

    def release(self, name: str, start: int = 0, length: int | None = None) -> None:
        """Drop tensor `name`'s pages (or a byte range of them) from this process's resident set; they stay in
        the page cache. Streaming through a 1.2 GB file this way keeps the RSS near one tensor or chunk."""
        t = self.tensor(name)
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        length = t.nbytes - start if length is None else length
        page = mmap.PAGESIZE
        begin = (t.offset + start) // page * page  # whole pages only: a shared edge page is dropped too, and
        end = -(-(t.offset + start + length) // page) * page  # simply read again from the page cache if needed
        self._mm.madvise(mmap.MADV_DONTNEED, begin, min(end, len(self._mm)) - begin)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # views are still alive; the map is released with them
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_gguf(path: str | os.PathLike) -> bool:
    """True when `path` is a regular file that starts with the GGUF magic (a named pipe is not opened:
    reading it would wait for a writer)."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
