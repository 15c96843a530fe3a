"""A streaming GGUF (version 3, little-endian) writer: metadata, tensor infos, then each tensor's bytes.

Tensors are declared with their byte size and a function producing the bytes; the data is
written one tensor at a time, so the resident set stays near one tensor whatever the model.
The file goes to a temporary name beside `out` and is renamed when complete.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from bitnet_cli.files import TempFile

ALIGNMENT = 32
# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}


def _string(s: str) -> bytes:
    raw = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


class GGUFWriter:
    def __init__(self, arch: str):
        self._kv: list[bytes] = []
        self._tensors: list[tuple[str, tuple[int, ...], int, int, Callable[[], np.ndarray]]] = []
        self.arch = arch
        self.add("general.architecture", arch, STRING)

    def add(self, key: str, value, vtype: int, etype: int | None = None) -> None:
        """One key-value pair; arrays take `etype`, the type of their elements."""
        out = _string(key) + struct.pack("<I", vtype)
        if vtype == STRING:
            out += _string(value)
        elif vtype == ARRAY:
            out += struct.pack("<IQ", etype, len(value))
            if etype == STRING:
                out += b"".join(_string(v) for v in value)
            else:
                out += np.asarray(value, dtype="<" + _FMT[etype]).tobytes()
        else:
            out += struct.pack("<" + _FMT[vtype], value)
        self._kv.append(out)

    def add_tensor(self, name: str, shape: tuple[int, ...], type_id: int, nbytes: int,
                   make: Callable[[], np.ndarray]) -> None:
        """A tensor of numpy `shape` (outermost first) and ggml `type_id`; `make()` returns its `nbytes` bytes."""
        self._tensors.append((name, tuple(int(d) for d in shape), type_id, nbytes, make))

    def write(self, out: Path, progress: Callable[[int, int, str], None] | None = None) -> Path:
        out = Path(out)
        infos, offset = [], 0
        for name, shape, type_id, nbytes, _ in self._tensors:
            dims = tuple(reversed(shape))  # GGUF lists the innermost dimension first
            infos.append(_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                         + struct.pack("<IQ", type_id, offset))
            offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
        head = b"GGUF" + struct.pack("<IQQ", 3, len(self._tensors), len(self._kv)) + b"".join(self._kv) + b"".join(infos)
        head += b"\0" * (-len(head) % ALIGNMENT)
        temp = TempFile(out)  # locked while written; a killed writer's leftover is removed next time
        try:
            with os.fdopen(os.dup(temp.fd), "wb") as f:
                f.write(head)
                for i, (name, _, _, nbytes, make) in enumerate(self._tensors):
                    data = np.ascontiguousarray(make()).view(np.uint8).reshape(-1)
                    if data.nbytes != nbytes:
                        raise AssertionError(f"tensor {name}: {data.nbytes} bytes produced, {nbytes} declared")
                    f.write(memoryview(data))
                    f.write(b"\0" * (-nbytes % ALIGNMENT))
                    if progress:
                        progress(i + 1, len(self._tensors), name)
            return temp.publish()
        except BaseException:
            temp.discard()
            raise
