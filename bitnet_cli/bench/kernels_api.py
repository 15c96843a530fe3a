"""The compiled kernels as the benchmark uses them: numpy buffers in, cffi calls out.

The C entry points (kernels/bitnet.h) are called directly, one thread pool per thread count
kept for the whole run, exactly as the engine would call them: the activations are quantised
per token and multiplied by the packed ternary weights in one timed call.
"""

from __future__ import annotations

import os

import numpy as np

from bitnet_cli.bench.shapes import padded_k
from bitnet_cli.errors import BitnetError

ISA_NAMES = ("scalar", "avx2", "avx512", "avx512vnni", "neon", "neondot")

_pools: dict[int, object] = {}


def _compiled():
    try:
        from bitnet_cli._kernels import ffi, lib
    except ImportError as e:
        raise BitnetError(
            f"the compiled kernels (bitnet_cli._kernels) are not built ({e}); "
            "build them with `pip install -e . --no-build-isolation --no-deps`"
        ) from None
    return ffi, lib


def pool(threads: int):
    """The persistent thread pool of `threads` threads (created once, reused)."""
    if threads < 1:
        raise BitnetError(f"thread count must be at least 1, got {threads}")
    ffi, lib = _compiled()
    if threads not in _pools:
        handle = lib.bn_pool_new(threads)
        if handle == ffi.NULL:
            raise BitnetError(f"could not start a thread pool of {threads} threads")
        _pools[threads] = ffi.gc(handle, lib.bn_pool_free)
    return _pools[threads]


def isa(name: str | None = None) -> int:
    """The ISA id to run: `name`, else $BITNET_ISA, else the best this CPU has."""
    _, lib = _compiled()
    name = name or os.environ.get("BITNET_ISA")
    if not name:
        return lib.bn_isa_best()
    if name not in ISA_NAMES:
        raise BitnetError(f"unknown ISA {name!r}; choose from {', '.join(ISA_NAMES)}")
    if not lib.bn_isa_available(ISA_NAMES.index(name)):
        raise BitnetError(f"ISA {name!r} is not available on this CPU/build")
    return ISA_NAMES.index(name)


def available_isas() -> list[str]:
    _, lib = _compiled()
    return [n for i, n in enumerate(ISA_NAMES) if lib.bn_isa_available(i)]


def _ptr(ffi, array: np.ndarray, ctype: str):
    return ffi.cast(ctype, ffi.from_buffer(array))


class TernaryMatmul:
    """Quantise `tokens` activation rows and multiply them by one i2_k128 weight [n, k].

    Buffers are allocated once, so a call does exactly what a BitLinear does in the engine.
    """

    def __init__(self, n: int, k: int, tokens: int, threads: int, isa_name: str | None = None):
        self.ffi, self.lib = _compiled()
        self.n, self.k, self.kp, self.m = n, k, padded_k(k), tokens
        self.pool = pool(threads)
        self.isa_id = isa(isa_name)
        self.isa = ISA_NAMES[self.isa_id]
        self.xq = np.zeros((tokens, self.kp), dtype=np.int8)
        self.scale = np.zeros(tokens, dtype=np.float32)
        self.xsum = np.zeros(tokens, dtype=np.int32)
        self.acc = np.zeros((tokens, n), dtype=np.int32)
        ffi = self.ffi
        self._xq = _ptr(ffi, self.xq, "int8_t *")
        self._scale = _ptr(ffi, self.scale, "float *")
        self._xsum = _ptr(ffi, self.xsum, "int32_t *")
        self._acc = _ptr(ffi, self.acc, "int32_t *")

    def __call__(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        """acc[t][r] = sum_k T[r][k] * quantised x[t][k]; w is uint8 [n, kp/4], x float32 [tokens, k]."""
        if w.shape != (self.n, self.kp // 4) or w.dtype != np.uint8 or not w.flags.c_contiguous:
            raise ValueError(f"weight must be contiguous uint8 {(self.n, self.kp // 4)}, got {w.dtype} {w.shape}")
        if x.shape != (self.m, self.k) or x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError(f"activations must be contiguous float32 {(self.m, self.k)}, got {x.dtype} {x.shape}")
        ffi, lib = self.ffi, self.lib
        lib.bn_quantize_rows(_ptr(ffi, x, "float *"), self.m, self.k, self.kp, self._xq, self._scale, self._xsum)
        rc = lib.bn_gemm_i2(self.pool, self.isa_id, _ptr(ffi, w, "uint8_t *"), self.n, self.kp,
                            self._xq, self._xsum, self.m, self._acc)
        if rc != 0:
            raise BitnetError(f"ternary kernel failed for ISA {self.isa}")
        return self.acc


class StreamRead:
    """One call reads all of `buf` once with the pool's threads (the bandwidth probe)."""

    def __init__(self, buf: np.ndarray, threads: int):
        self.ffi, self.lib = _compiled()
        if buf.nbytes % 64:
            raise ValueError("the buffer size must be a multiple of 64 bytes")
        self.buf, self.pool = buf, pool(threads)
        self._buf = self.ffi.from_buffer(buf)

    def __call__(self) -> int:
        return self.lib.bn_stream_read(self.pool, self._buf, self.buf.nbytes)
