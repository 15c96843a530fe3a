"""Python access to the compiled C kernels (``bitnet_cli._kernels``, built from kernels/ by cffi).

The building blocks, on numpy arrays, for tests and ``bitnet bench``::

    from bitnet_cli import kernels
    kernels.available_isas()             # e.g. ['scalar', 'avx2']; kernels.best_isa() -> 'avx2'
    with kernels.ThreadPool(2) as pool:  # persistent threads, reused by every call
        xq, scale, xsum = kernels.quantize(x)              # x float32 [m, k] -> int8 [m, kp], ...
        acc = kernels.gemm(w, xq, xsum, isa="avx2", pool=pool)  # w uint8 [n, kp/4] -> int32 [m, n]
        kernels.stream_read(buf, pool)   # reads all of buf (bandwidth probe), returns a checksum

``gemm`` with m = 1 is the decode GEMV; the float output of a BitLinear is acc / scale * gamma.

Which ISA runs (``resolve_isa``, ``isa_choice``): the one named per call (``isa=``, the CLI's
``--isa``), else ``BITNET_ISA=scalar|avx2|avxvnni|avx512|avx512vnni|amx|neon|neondot``, else the autotune: on
first use in a process each candidate ISA's GEMV (1 token) and GEMM (TUNE_TOKENS tokens) is timed
on a model-sized matrix, per ternary layout, for a fraction of a second, and the fastest for each
is kept (kernels/dispatch.c's BN_ISA_TUNED runs the two choices side by side) and cached in the
cache dir under a key of the CPU model, its ISAs and the package version, so later processes read
it. A race that met other load (its samples spread past TUNE_QUIET) is neither kept nor cached: that
process runs the rule, and the next one measures again. ``BITNET_AUTOTUNE=0`` turns the autotune off
(reproducible runs): then the rule of ``best_isa()`` decides, as it also does when the CPU has only
one candidate. The autotune only moves the ternary products, which every ISA computes bit for bit
alike; the head, glue and attention stay the rule's, so the logits do not depend on its choice.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
from pathlib import Path

import numpy as np

from bitnet_cli.errors import BitnetError, warn

# kernels/bitnet.h's BN_ISA_* by name (tests/test_kernels.py checks the two agree)
ISAS = {"scalar": 0, "avx2": 1, "avxvnni": 7, "avx512": 2, "avx512vnni": 3, "neon": 4, "neondot": 5, "amx": 6}
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
    """The ISA id for `name`, else $BITNET_ISA, else the autotune's choice (module docstring):
    an ISAS value, or BN_ISA_TUNED when the autotune chose other than the rule. Errors name the
    choices."""
    if name:
        return ISAS[_checked(name)]
    if os.environ.get("BITNET_ISA"):
        return ISAS[_checked(os.environ["BITNET_ISA"], env=True)]
    choice = _default_choice()
    picked = {op_isa for ops in choice["choice"].values() for op_isa in ops.values()}
    if picked == {best_isa()}:
        return ISAS[best_isa()]
    # the tuned path even when one ISA won everything: it keeps the rule's head, whose float
    # summation order may differ from the winner's, so the logits are the rule's bit for bit
    _, L = lib()
    return L.BN_ISA_TUNED


def _checked(name: str, env: bool = False) -> str:
    """`name` if it is an ISA this CPU has; errors name where it came from: the isa parameter or $BITNET_ISA."""
    if name not in ISAS:
        raise BitnetError(f"unknown instruction set {name!r} ({'$BITNET_ISA' if env else 'isa'}): choose from "
                          f"{', '.join(ISAS)}", param=None if env else "isa")
    if name not in available_isas():
        raise BitnetError(f"instruction set {name!r} ({'$BITNET_ISA' if env else 'isa'}) is not available on this "
                          f"CPU: {', '.join(available_isas())}", param=None if env else "isa")
    return name


def isa_choice(name: str | None = None) -> dict:
    """Which ISA runs what, and why: {"source": "option" (named per call), "env" ($BITNET_ISA),
    "rule" (best_isa(): autotune off, or one candidate only), "cache" (an earlier autotune's
    result), "autotune" (measured now) or "busy" (measured now, but the machine was busy: the
    rule), "choice": {layout: {"gemv": isa, "gemm": isa}}}, plus the autotune's "seconds" per call
    (each candidate's fastest) and "spread" when it measured."""
    if name:
        return {"source": "option", "choice": _uniform(_checked(name))}
    if os.environ.get("BITNET_ISA"):
        return {"source": "env", "choice": _uniform(_checked(os.environ["BITNET_ISA"], env=True))}
    return _default_choice()


def isa_name(isa: int, layout: str = "i2", tokens: int | None = None) -> str:
    """The name of the ISA whose kernel multiplies `tokens` tokens by `layout` weights under the
    resolve_isa() id `isa`. For BN_ISA_TUNED that is the autotune's choice for the operation, and
    with tokens None "GEMV/GEMM" (e.g. "avx2/avx512vnni") where the two differ."""
    _, L = lib()
    if isa == L.BN_ISA_TUNED:
        ops = _default_choice()["choice"][layout]
        if tokens is None:
            return ops["gemv"] if ops["gemv"] == ops["gemm"] else f"{ops['gemv']}/{ops['gemm']}"
        return ops["gemv" if tokens == 1 else "gemm"]
    return next(name for name, i in ISAS.items() if i == isa)


# ---- the autotune -------------------------------------------------------------------------------

AUTOTUNE_ENV = "BITNET_AUTOTUNE"
# 2: each candidate's fastest sample, and only races run on a quiet machine (1 kept medians, and
# once cached a GEMM 1.6x slower than the rule's, measured while other jobs ran)
TUNE_SCHEMA = "bitnet-cli/isa-autotune/2"
# The matrix timed: BitNet b1.58 2B4T's FFN up/gate projection, the most common decode shape; and
# the tokens of the GEMM: a prefill chunk's (kernels/model.c's CHUNK), since the AMX GEMM only runs
# from 16 tokens (kernels/internal.h's BN_AMX_MIN_TOKENS) and fewer would time VNNI's tile twice.
TUNE_SHAPE = (6912, 2560)
TUNE_TOKENS = 64
# The weights rotate over copies filling twice the last-level cache (within these bounds), so a
# GEMV streams them from DRAM as decode does.
TUNE_COLD_BYTES = (32 << 20, 256 << 20)
TUNE_ROUNDS = 5  # candidates interleaved, round after round; each keeps its fastest sample (load only adds time)
TUNE_SAMPLE_S = 0.002  # one sample: calls for at least this long
# The most a candidate's median sample may exceed its fastest for the race to count: idle, a
# 2-core Zen 4 spread up to 1.27x; with three busy processes beside it 5-13x.
TUNE_QUIET = 1.5
# Another ISA replaces the rule's only when faster by more than this: a closer race is noise,
# and the rule's ISA then keeps runs alike from machine to machine.
TUNE_MARGIN = 0.03

_choices: dict[tuple, dict] = {}  # the process's default choice per ($BITNET_AUTOTUNE, cache dir)
_applied: dict[str, tuple[str, str]] = {}  # what bn_isa_tune() was last told, per layout


def _layouts() -> dict[str, int]:
    from bitnet_cli.pack.ternary import LAYOUTS

    _, L = lib()
    return {option: getattr(L, t.c_enum) for option, t in LAYOUTS.items()}


def _uniform(isa: str) -> dict:
    return {layout: {"gemv": isa, "gemm": isa} for layout in _layouts()}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's `model name`, else the platform's word for it)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tune_candidates() -> list[str]:
    """The ISAs the autotune races: every SIMD path this CPU has (the scalar reference only when
    there is none; it is never the faster)."""
    simd = [isa for isa in available_isas() if isa != "scalar"]
    return simd or ["scalar"]


def _tune_key(candidates: list[str]) -> dict:
    from bitnet_cli import __version__

    return {"cpu": cpu_model(), "isas": available_isas(), "candidates": candidates, "version": __version__}


def tune_cache_path(key: dict) -> Path:
    """The autotune's cache file for `key`: one per CPU model, ISA set and version, so machines
    sharing a home directory keep their own."""
    from bitnet_cli.files import cache_root

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "autotune" / f"isa-{digest}.json"


def on_off_env(name: str) -> bool:
    """A switch of the engine's environment: 1 (on, also where unset) or 0 (off); anything else is an error."""
    env = os.environ.get(name, "1")
    if env not in ("0", "1"):
        raise BitnetError(f"${name} must be 0 (off) or 1 (on), got {env!r}")
    return env == "1"


def _default_choice() -> dict:
    tune = on_off_env(AUTOTUNE_ENV)
    from bitnet_cli.files import cache_root

    memo = (tune, str(cache_root()))
    if memo not in _choices:
        candidates = tune_candidates()
        if not tune or len(candidates) == 1:
            _choices[memo] = {"source": "rule", "choice": _uniform(best_isa())}
        else:
            _choices[memo] = _cached_or_measured(candidates)
    choice = _choices[memo]
    _apply(choice["choice"])
    return choice


def _apply(choice: dict) -> None:
    """Point BN_ISA_TUNED at `choice` (where it is not already)."""
    _, L = lib()
    for layout, layout_id in _layouts().items():
        pair = (choice[layout]["gemv"], choice[layout]["gemm"])
        if _applied.get(layout) != pair:
            if L.bn_isa_tune(layout_id, ISAS[pair[0]], ISAS[pair[1]]) != 0:
                raise BitnetError(f"the kernels refused the tuned ISAs {pair} for layout {layout}")
            _applied[layout] = pair


def _cached_or_measured(candidates: list[str]) -> dict:
    """The cached choice for this CPU, else a measured one (then cached). A cache file that cannot
    be read, is not JSON, belongs to another key or names ISAs this CPU lacks is measured over."""
    key = _tune_key(candidates)
    path = tune_cache_path(key)
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        record = None
    if _valid_record(record, key, candidates):
        return {"source": "cache", "choice": record["choice"], "seconds": record["seconds"]}
    seconds, spread = _fastest_samples(measure_isas(candidates))
    if spread > TUNE_QUIET:  # other load: the race says little about the kernels
        return {"source": "busy", "choice": _uniform(best_isa()), "seconds": seconds, "spread": spread}
    choice = _fastest(seconds)
    record = {"schema": TUNE_SCHEMA, "key": key, "choice": choice, "seconds": seconds, "spread": spread}
    from bitnet_cli.files import TempFile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = TempFile(path)
        try:
            with open(tmp.fd, "w", closefd=False) as f:
                json.dump(record, f, indent=1)
            tmp.publish()
        except BaseException:
            tmp.discard()
            raise
    except OSError as e:
        warn(f"note: the ISA autotune's result could not be cached in {path.parent} ({e}); "
             f"the next process measures again (${AUTOTUNE_ENV}=0 turns it off)")
    return {"source": "autotune", "choice": choice, "seconds": seconds, "spread": spread}


def _valid_record(record, key: dict, candidates: list[str]) -> bool:
    if not (isinstance(record, dict) and record.get("schema") == TUNE_SCHEMA and record.get("key") == key
            and isinstance(record.get("choice"), dict) and isinstance(record.get("seconds"), dict)):
        return False
    return all(isinstance(record["choice"].get(layout), dict)
               and all(record["choice"][layout].get(op) in candidates for op in ("gemv", "gemm"))
               for layout in _layouts())


def _fastest_samples(samples: dict) -> tuple[dict, float]:
    """measure_isas()'s samples as each candidate's fastest, {layout: {op: {isa: s}}}, and the
    race's spread: the largest of a candidate's median sample over its fastest."""
    import statistics

    seconds = {layout: {op: {isa: min(v) for isa, v in times.items()} for op, times in ops.items()}
               for layout, ops in samples.items()}
    spread = max(statistics.median(v) / min(v) for ops in samples.values() for times in ops.values()
                 for v in times.values())
    return seconds, spread


def _fastest(seconds: dict) -> dict:
    """Per layout and operation, the candidate with the least time per call; the rule's
    ISA unless another beats it by more than TUNE_MARGIN."""
    rule = best_isa()
    choice = {}
    for layout, ops in seconds.items():
        choice[layout] = {}
        for op, times in ops.items():
            fastest = min(times, key=times.get)
            if rule in times and times[fastest] * (1 + TUNE_MARGIN) >= times[rule]:
                fastest = rule
            choice[layout][op] = fastest
    return choice


def _cold_bytes() -> int:
    """Twice the last-level cache (sysfs), within TUNE_COLD_BYTES."""
    lo, hi = TUNE_COLD_BYTES
    llc = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()  # e.g. "32768K"
            shift = {"K": 10, "M": 20, "G": 30}.get(size[-1:], 0)
            llc = max(llc, int(size[:-1] if shift else size) << shift)
        except (OSError, ValueError):
            continue
    return min(hi, max(lo, 2 * llc))


def measure_isas(candidates: list[str]) -> dict:
    """Seconds per call of each round's sample, {layout: {"gemv": {isa: [s, ...]}, "gemm": ...}}, of
    each candidate's kernel on TUNE_SHAPE in every layout, one thread, the candidates interleaved
    round by round so that a burst of other load hits them all alike."""
    ffi, L = lib()
    n, k = TUNE_SHAPE
    kp = -(-k // L.BN_BLOCK_K) * L.BN_BLOCK_K
    rng = np.random.default_rng(0)
    cold = _cold_bytes()
    # freed on return, with the arrays over it
    region = huge_page_region(cold)
    weights = np.frombuffer(region, dtype=np.uint8)
    # any bytes will do for timing (no kernel branches on the codes), but they must be written:
    # untouched pages all map the same zero page, which stays in cache
    pattern = rng.integers(0, 256, size=1 << 20, dtype=np.uint8)
    for offset in range(0, cold, pattern.size):
        chunk = weights[offset : offset + pattern.size]
        chunk[:] = pattern[: chunk.size]
    xq = rng.integers(-128, 128, size=(TUNE_TOKENS, kp), dtype=np.int8)
    xsum = xq.sum(axis=1, dtype=np.int32)
    acc = np.empty((TUNE_TOKENS, n), dtype=np.int32)
    w_ptr = ffi.from_buffer("uint8_t[]", weights)
    x_ptr, s_ptr, a_ptr = (ffi.from_buffer(t, a) for t, a in
                           (("int8_t[]", xq), ("int32_t[]", xsum), ("int32_t[]", acc)))
    samples: dict = {}
    for layout, layout_id in _layouts().items():
        matrix = n * L.bn_ternary_row_bytes(layout_id, kp)
        copies = max(1, cold // matrix)
        at = 0
        for r in range(TUNE_ROUNDS):
            for isa in candidates[r % len(candidates):] + candidates[: r % len(candidates)]:
                for op, m in (("gemv", 1), ("gemm", TUNE_TOKENS)):
                    calls, t0 = 0, time.perf_counter()
                    while True:
                        rc = L.bn_gemm_ternary(ffi.NULL, ISAS[isa], layout_id, w_ptr + at * matrix, n, kp,
                                               x_ptr, s_ptr, m, a_ptr)
                        if rc != 0:
                            raise BitnetError(f"autotune: the {isa} kernel refused the {layout} layout")
                        calls, at = calls + 1, (at + 1) % copies
                        elapsed = time.perf_counter() - t0
                        if elapsed >= TUNE_SAMPLE_S:
                            break
                    samples.setdefault(layout, {}).setdefault(op, {}).setdefault(isa, []).append(elapsed / calls)
    return samples


PEAK_SAMPLE_S = 0.005  # one run of kernels/peak.c's loop
PEAK_RUNS = 5
_peaks: dict[str, float] = {}


def mac_peak(isa: str) -> float:
    """Integer multiply-accumulates per second one thread sustains with `isa`'s 8-bit multiply-add
    (kernels/peak.c): the best of PEAK_RUNS runs of about PEAK_SAMPLE_S each, after shorter ones
    that set the length (a peak is what the core can do: slower runs met other load). Measured
    once per process and ISA."""
    if isa not in _peaks:
        _, L = lib()
        isa_id = ISAS[_checked(isa)]
        iters = 1 << 10
        while True:
            t0 = time.perf_counter()
            L.bn_mac_peak(isa_id, iters)
            elapsed = time.perf_counter() - t0
            if elapsed >= PEAK_SAMPLE_S / 4:
                break
            iters *= 4
        iters = max(1, int(iters * PEAK_SAMPLE_S / elapsed))
        runs = [L.bn_mac_peak(isa_id, iters) for _ in range(PEAK_RUNS)]
        if not all(np.isfinite(runs)) or min(runs) <= 0:
            raise BitnetError(f"the {isa} MAC peak could not be measured (got {runs})")
        _peaks[isa] = max(runs)
    return _peaks[isa]


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
    if not on_off_env("BITNET_HUGEPAGES") or not hasattr(mmap, "MADV_HUGEPAGE"):
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
