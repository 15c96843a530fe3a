"""Kernel micro-benchmarks: every distinct weight shape of a model, decode (1 token) and prefill.

Each shape runs through our ternary kernel (activation quantisation included, as in a BitLinear)
and, for comparison, a dense int8 kernel on the same int8 activations (our int8 output head's
code) and a dense f32 matmul through numpy's BLAS. Weights are rotated over enough
copies to exceed the last-level cache many times over, so a GEMV streams its weights from DRAM
the way decode does (timing one L3-resident copy in a loop would report cache bandwidth).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator

import numpy as np

from bitnet_cli.bench import kernels_api
from bitnet_cli.bench.shapes import padded_k, ternary_bytes, weight_shapes
from bitnet_cli.pack.ternary import layout, unpack_i2_k128
from bitnet_cli.bench.stats import scale, time_call

COLD_BYTES = 256 << 20  # weights rotated per benchmark: 8x a 32 MiB L3
MAX_COPIES = 4096
TOKENS = (1, 8, 32, 128)
IMPLS = ("ternary", "int8", "f32")


def random_ternary(n: int, k: int, rng: np.random.Generator, ternary_layout: str = "i2") -> np.ndarray:
    """A random weight [n, k] in `ternary_layout`: random bytes of four codes in {0, 1, 2} (i2_k128),
    repacked for another layout."""
    codes = np.array([a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3)
                      for c in range(3) for d in range(3)], dtype=np.uint8)
    i2 = codes[rng.integers(0, codes.size, size=(n, padded_k(k) // 4), dtype=np.uint8)]
    return i2 if ternary_layout == "i2" else layout(ternary_layout).pack(unpack_i2_k128(i2, padded_k(k)))


def _rotating(one: np.ndarray) -> list[np.ndarray]:
    """Distinct copies of `one` whose total size exceeds COLD_BYTES (2 to MAX_COPIES of them).

    Shapes so small that MAX_COPIES copies stay under COLD_BYTES are measured partly in cache.
    """
    copies = min(MAX_COPIES, max(2, -(-COLD_BYTES // one.nbytes)))
    block = np.ascontiguousarray(np.broadcast_to(one, (copies, *one.shape)))
    return list(block)


def _ternary(n: int, k: int, tokens: int, threads: int, rng, isa: str | None,
             ternary_layout: str = "i2") -> tuple[Callable, int, str]:
    x = rng.standard_normal((tokens, k), dtype=np.float32)
    weights = _rotating(random_ternary(n, k, rng, ternary_layout))
    op = kernels_api.TernaryMatmul(n, k, tokens, threads, isa, ternary_layout)
    rotation = itertools.cycle(weights)
    return lambda: op(next(rotation), x), ternary_bytes(n, k, ternary_layout), op.isa


def _int8(n: int, k: int, tokens: int, threads: int, rng, isa: str | None, _layout: str = "i2") -> tuple[Callable, int, str]:
    x = rng.standard_normal((tokens, k), dtype=np.float32)
    weights = _rotating(rng.integers(-127, 128, size=(n, k), dtype=np.int8))
    op = kernels_api.DenseInt8Matmul(n, k, tokens, threads, isa)
    rotation = itertools.cycle(weights)
    return lambda: op(next(rotation), x), n * k + 4 * n, "int8"


@contextlib.contextmanager
def _blas_threads(threads: int) -> Iterator[str]:
    """Limit numpy's BLAS to `threads` threads when threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield "BLAS (default threads)"
        return
    with threadpool_limits(limits=threads, user_api="blas"):
        yield "BLAS"


def _f32(n: int, k: int, tokens: int, threads: int, rng, isa: str | None, _layout: str = "i2") -> tuple[Callable, int, str]:
    x = rng.standard_normal((k, tokens), dtype=np.float32)
    weights = _rotating(rng.standard_normal((n, k), dtype=np.float32))
    out = np.empty((n, tokens), dtype=np.float32)
    rotation = itertools.cycle(weights)
    return lambda: np.matmul(next(rotation), x, out=out), n * k * 4, "numpy"


_FACTORIES = {"ternary": _ternary, "int8": _int8, "f32": _f32}


def bench_shape(impl: str, n: int, k: int, tokens: int, threads: int, repeat: int, seed: int = 0,
                isa: str | None = None, ternary_layout: str = "i2") -> dict:
    """Time one kernel on one weight shape: seconds per call, weight GB/s, GOPS and G MAC/s (summaries).

    ``isa``: our kernels' instruction set (default: $BITNET_ISA, else the autotune's choice); BLAS picks its own.
    ``ternary_layout``: the ternary kernel's weight layout (an --layout choice)."""
    rng = np.random.default_rng(seed)
    # numpy's BLAS has its own thread pool: cap it at the same thread count as ours
    with _blas_threads(threads) if impl == "f32" else contextlib.nullcontext(None) as blas:
        call, weight_bytes, backend = _FACTORIES[impl](n, k, tokens, threads, rng, isa, ternary_layout)
        seconds = time_call(call, repeat)
    return {
        "impl": impl, "backend": blas or backend, "n": n, "k": k, "tokens": tokens, "threads": threads,
        "weight_bytes": weight_bytes, "seconds": seconds,
        "gbps": scale(seconds, weight_bytes / 1e9), "gops": scale(seconds, 2.0 * n * k * tokens / 1e9),
        "gmacs": scale(seconds, n * k * tokens / 1e9),
    }


def run(config: dict, threads: list[int], repeat: int, tokens=TOKENS, impls=IMPLS, progress=None,
        isa: str | None = None, ternary_layout: str = "i2") -> list[dict]:
    """Benchmark every distinct weight shape of `config` x tokens x threads x implementation.

    `progress(description)` is called before each measurement (for a progress bar).
    """
    results = []
    for shape in weight_shapes(config):
        for t in tokens:
            for th in threads:
                for impl in impls:
                    if progress:
                        progress(f"{impl} {shape['n']}x{shape['k']} T={t} {th}t")
                    row = bench_shape(impl, shape["n"], shape["k"], t, th, repeat, isa=isa, ternary_layout=ternary_layout)
                    row["projections"] = shape["projections"]
                    row["per_token"] = shape["per_token"]
                    results.append(row)
    return results
