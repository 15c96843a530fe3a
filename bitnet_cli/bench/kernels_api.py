"""The compiled kernels as the benchmark times them: preallocated buffers, one cffi call each.

`bitnet_cli.kernels` is the general Python wrapper (it allocates its outputs per call); here the
same C entry points are called on buffers allocated once, so a timed call costs what a BitLinear
costs inside the engine: quantise the activations, then one ternary matrix product. One thread
pool per thread count is kept for the whole run.
"""

from __future__ import annotations

import numpy as np

from bitnet_cli import kernels
from bitnet_cli.bench.shapes import padded_k
from bitnet_cli.pack.ternary import layout

_pools: dict[int, kernels.ThreadPool] = {}


def pool(threads: int) -> kernels.ThreadPool:
    """The persistent thread pool of `threads` threads (created once, reused)."""
    if threads not in _pools:
        _pools[threads] = kernels.ThreadPool(threads)
    return _pools[threads]


def available_isas() -> list[str]:
    return kernels.available_isas()


def aligned_zeros(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """Zeros starting on a cache line, as the engine's buffers do (kernels/model.c: zalloc)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    offset = -raw.ctypes.data % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


class TernaryMatmul:
    """Quantise `tokens` activation rows and multiply them by one ternary weight [n, k] in
    `ternary_layout` (i2: i2_k128, tq1: tq1_k640)."""

    def __init__(self, n: int, k: int, tokens: int, threads: int, isa: str | None = None, ternary_layout: str = "i2"):
        self.ffi, self.lib = kernels.lib()
        self.n, self.k, self.kp, self.m = n, k, padded_k(k), tokens
        self.layout_id = getattr(self.lib, layout(ternary_layout).c_enum)
        self.row_bytes = layout(ternary_layout).row_bytes(k)
        self.pool = pool(threads)
        self.isa_id = kernels.resolve_isa(isa)
        self.isa = kernels.isa_name(self.isa_id, ternary_layout, tokens)  # the ISA this product runs on
        self.xq = aligned_zeros((tokens, self.kp), np.int8)
        self.scale = np.zeros(tokens, dtype=np.float32)
        self.xsum = np.zeros(tokens, dtype=np.int32)
        self.acc = np.zeros((tokens, n), dtype=np.int32)
        buf = self.ffi.from_buffer
        self._xq, self._scale = buf("int8_t[]", self.xq), buf("float[]", self.scale)
        self._xsum, self._acc = buf("int32_t[]", self.xsum), buf("int32_t[]", self.acc)

    def __call__(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        """acc[t][r] = sum_k T[r][k] * quantised x[t][k]; w is uint8 [n, row bytes], x float32 [tokens, k]."""
        if w.shape != (self.n, self.row_bytes) or w.dtype != np.uint8 or not w.flags.c_contiguous:
            raise ValueError(f"weight must be contiguous uint8 {(self.n, self.row_bytes)}, got {w.dtype} {w.shape}")
        if x.shape != (self.m, self.k) or x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError(f"activations must be contiguous float32 {(self.m, self.k)}, got {x.dtype} {x.shape}")
        buf = self.ffi.from_buffer
        self.lib.bn_quantize_rows(self.isa_id, buf("float[]", x), self.m, self.k, self.kp, self._xq, self._scale, self._xsum)
        self.lib.bn_gemm_ternary(self.pool.ptr, self.isa_id, self.layout_id, buf("uint8_t[]", w), self.n, self.kp,
                                 self._xq, self._xsum, self.m, self._acc)
        return self.acc


class DenseInt8Matmul:
    """The dense int8 reference: int8 weights [n, k] with one fp32 scale per row against the same
    per-token int8 activations, an exact integer dot like ours (the engine's int8 output head)."""

    def __init__(self, n: int, k: int, tokens: int, threads: int, isa: str | None = None):
        self.ffi, self.lib = kernels.lib()
        self.n, self.k, self.m = n, k, tokens
        self.pool = pool(threads)
        self.isa_id = kernels.resolve_isa(isa)
        self.wscale = np.ones(n, dtype=np.float32)
        self.y = np.zeros((tokens, n), dtype=np.float32)
        self._wscale, self._y = self.ffi.from_buffer("float[]", self.wscale), self.ffi.from_buffer("float[]", self.y)

    def __call__(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        """y[t][r] = sum_k w[r][k] * quantised x[t][k] / x_scale[t]; w is int8 [n, k], x float32 [tokens, k]."""
        if w.shape != (self.n, self.k) or w.dtype != np.int8 or not w.flags.c_contiguous:
            raise ValueError(f"weight must be contiguous int8 {(self.n, self.k)}, got {w.dtype} {w.shape}")
        if x.shape != (self.m, self.k) or x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError(f"activations must be contiguous float32 {(self.m, self.k)}, got {x.dtype} {x.shape}")
        buf = self.ffi.from_buffer
        self.lib.bn_head_logits(self.pool.ptr, self.isa_id, self.lib.BN_EMB_I8, buf("int8_t[]", w), self._wscale,
                                self.n, self.k, buf("float[]", x), self.m, self._y)
        return self.y


class StreamRead:
    """One call reads all of `buf` once with the pool's threads (the bandwidth probe)."""

    def __init__(self, buf: np.ndarray, threads: int):
        self.buf, self.pool = buf, pool(threads)

    def __call__(self) -> int:
        return kernels.stream_read(self.buf, self.pool)
