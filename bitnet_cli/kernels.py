"""Python access to the compiled C kernels (``bitnet_cli._kernels``, built from kernels/ by cffi).

The building blocks, on numpy arrays, for tests and ``bitnet bench``::

    from bitnet_cli import kernels
    kernels.available_isas()             # e.g. ['scalar', 'avx2']; kernels.best_isa() -> 'avx2'
    with kernels.ThreadPool(2) as pool:  # persistent threads, reused by every call
        xq, scale, xsum = kernels.quantize(x)              # x float32 [m, k] -> int8 [m, kp], ...
        acc = kernels.gemm(w, xq, xsum, isa="avx2", pool=pool)  # w uint8 [n, kp/4] -> int32 [m, n]
        kernels.stream_read(buf, pool)   # reads all of buf (bandwidth probe), returns a checksum

``gemm`` with m = 1 is the decode GEMV; the float output of a BitLinear is acc / scale * gamma.
The ISA is chosen per call, or for the engine by ``BITNET_ISA=scalar|avx2|avx512|avx512vnni|
neon|neondot`` (default: the best this CPU has).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from bitnet_cli.errors import BitnetError

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512vnni": 3, "neon": 4, "neondot": 5}
BUILD_HINT = (
    "the compiled kernels (bitnet_cli._kernels) are missing: build them from the bitnet-cli source tree "
    "with `pip install .` (or `pip install -e . --no-build-isolation --no-deps`); this needs a C compiler"
)


def lib():
    """(ffi, lib) of the compiled module, or a BitnetError that says how to build it.

    $BITNET_KERNELS names another build of the module to load instead (the ASan/UBSan build that
    `python -m bitnet_cli.fuzz --sanitize` makes)."""
    global _ALT
    alt = os.environ.get("BITNET_KERNELS")
    if alt:
        if _ALT is None:
            import importlib.util

            try:
                spec = importlib.util.spec_from_file_location("_kernels", alt)
                _ALT = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(_ALT)
            except (ImportError, OSError, AttributeError) as e:
                raise BitnetError(f"$BITNET_KERNELS={alt}: cannot load ({e})") from None
        return _ALT.ffi, _ALT.lib
    try:
        from bitnet_cli import _kernels
    except ImportError as e:
        raise BitnetError(f"{BUILD_HINT} ({e})") from None
    return _kernels.ffi, _kernels.lib


_ALT = None  # the module $BITNET_KERNELS names, once loaded
# The layout constants as kernels/bitnet.h defines them (the one definition), read through cffi on
# first use (`kernels.BLOCK_K`), so importing this module needs no compiled module yet:
# inputs and bytes of an i2_k128 block, of a q4 head block (bn_q4_block), of a q6 one (bn_q6_block) and of
# a tq1_k640 block.
_LAYOUT = {"BLOCK_K": lambda ffi, L: L.BN_BLOCK_K, "BLOCK_BYTES": lambda ffi, L: L.BN_BLOCK_BYTES,
           "Q4_BLOCK_K": lambda ffi, L: L.BN_Q4_BLOCK_K, "Q4_BLOCK_BYTES": lambda ffi, L: ffi.sizeof("bn_q4_block"),
           "Q6_BLOCK_K": lambda ffi, L: L.BN_Q6_BLOCK_K, "Q6_BLOCK_BYTES": lambda ffi, L: ffi.sizeof("bn_q6_block"),
           "TQ1_BLOCK_K": lambda ffi, L: L.BN_TQ1_BLOCK_K, "TQ1_BLOCK_BYTES": lambda ffi, L: L.BN_TQ1_BLOCK_BYTES}


def __getattr__(name: str) -> int:
    if name not in _LAYOUT:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = _LAYOUT[name](*lib())
    return value


def available_isas() -> list[str]:
    _, L = lib()
    return [name for name, i in ISAS.items() if L.bn_isa_available(i)]


def best_isa() -> str:
    _, L = lib()
    return next(name for name, i in ISAS.items() if i == L.bn_isa_best())


def resolve_isa(name: str | None = None) -> int:
    """The ISA id for `name`, else $BITNET_ISA, else the best available; errors name the choices."""
    name = name or os.environ.get("BITNET_ISA") or best_isa()
    if name not in ISAS:
        raise BitnetError(f"unknown instruction set {name!r} (BITNET_ISA): choose from {', '.join(ISAS)}")
    if name not in available_isas():
        raise BitnetError(f"instruction set {name!r} is not available on this CPU: {', '.join(available_isas())}")
    return ISAS[name]


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's SIMD units)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


class CResource:
    """An object owning C memory: close() frees it (idempotent); a context manager, and closed when
    garbage-collected."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


class ThreadPool(CResource):
    """A persistent pool of `n` threads (the caller is thread 0); close() or use as a context manager."""

    MAX_THREADS = 256

    def __init__(self, n: int):
        self.ptr = None  # close() runs from __del__ even when __init__ raises
        if not 1 <= n <= self.MAX_THREADS:
            raise BitnetError(f"threads must be between 1 and {self.MAX_THREADS}, got {n}")
        ffi, L = lib()
        self.n = n
        self._lib = L
        self.ptr = L.bn_pool_new(n)
        if self.ptr == ffi.NULL:
            self.ptr = None
            raise BitnetError(f"cannot start {n} threads")

    def close(self):
        if self.ptr is not None:
            self._lib.bn_pool_free(self.ptr)
            self.ptr = None


def _pool_ptr(pool: ThreadPool | None):
    ffi, _ = lib()
    return pool.ptr if pool is not None else ffi.NULL


def quantize(x: np.ndarray, isa: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 [m, k] -> (int8 [m, kp] zero-padded to a multiple of BN_BLOCK_K (128), scale float32 [m], sum int32 [m])."""
    ffi, L = lib()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    m, k = x.shape
    kp = -(-k // L.BN_BLOCK_K) * L.BN_BLOCK_K
    xq = np.empty((m, kp), dtype=np.int8)
    scale = np.empty(m, dtype=np.float32)
    xsum = np.empty(m, dtype=np.int32)
    L.bn_quantize_rows(resolve_isa(isa), ffi.from_buffer("float[]", x), m, k, kp, ffi.from_buffer("int8_t[]", xq),
                       ffi.from_buffer("float[]", scale), ffi.from_buffer("int32_t[]", xsum))
    return xq, scale, xsum


def gemm(w: np.ndarray, xq: np.ndarray, xsum: np.ndarray, isa: str | None = None,
         pool: ThreadPool | None = None, layout: str = "i2") -> np.ndarray:
    """Exact int32 [m, n] = trits(w) . xq for a weight w uint8 [n, row bytes] in `layout` (i2: i2_k128,
    [n, kp/4]; tq1: tq1_k640; bitnet.h's BN_LAYOUT_*) and int8 xq [m, kp]."""
    ffi, L = lib()
    n, row = w.shape
    m, kp = xq.shape
    layout_id = getattr(L, f"BN_LAYOUT_{layout.upper()}", -1)
    if (row != L.bn_ternary_row_bytes(layout_id, kp) or row == 0 or w.dtype != np.uint8 or xq.dtype != np.int8
            or xsum.shape != (m,)):
        raise BitnetError(f"gemm: shapes/dtypes do not match layout {layout!r}: w {w.dtype}{w.shape}, "
                          f"xq {xq.dtype}{xq.shape}")
    w, xq = np.ascontiguousarray(w), np.ascontiguousarray(xq)
    xsum = np.ascontiguousarray(xsum, dtype=np.int32)
    acc = np.empty((m, n), dtype=np.int32)
    rc = L.bn_gemm_ternary(_pool_ptr(pool), resolve_isa(isa), layout_id, ffi.from_buffer("uint8_t[]", w), n, kp,
                           ffi.from_buffer("int8_t[]", xq), ffi.from_buffer("int32_t[]", xsum), m,
                           ffi.from_buffer("int32_t[]", acc))
    if rc != 0:
        raise BitnetError("gemm: the kernel refused its arguments")
    return acc


def stream_read(buf: np.ndarray, pool: ThreadPool | None = None) -> int:
    """Read every byte of `buf` (contiguous, size a multiple of 64) on the pool's threads; a checksum."""
    ffi, L = lib()
    if not buf.flags.c_contiguous or buf.nbytes % 64:
        raise BitnetError("stream_read: buffer must be contiguous with a size that is a multiple of 64 bytes")
    return int(L.bn_stream_read(_pool_ptr(pool), ffi.from_buffer(buf), buf.nbytes))


def huge_pages_available() -> bool:
    """Whether Linux backs madvise(MADV_HUGEPAGE) memory with transparent huge pages here
    ($BITNET_HUGEPAGES=0 says no)."""
    if os.environ.get("BITNET_HUGEPAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def huge_page_region(nbytes: int) -> mmap.mmap:
    """Zeroed anonymous memory for data the kernels stream, in 2 MB transparent huge pages when
    huge_pages_available(): a 4 KB page costs a TLB miss every 4 KB of a sequential read."""
    region = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages_available():
        region.madvise(mmap.MADV_HUGEPAGE)
    return region
