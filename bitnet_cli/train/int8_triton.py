"""The Triton kernels behind ``bitnet::int8_mm``, ``bitnet::quantize_grad_rows``, ``bitnet::norm_quant``,
``bitnet::residual_norm_quant``, ``bitnet::residual_norm_grad``, ``bitnet::gated_norm_grad``,
``bitnet::rope_grad_rows``, ``bitnet::quantize_grad_cols`` and ``bitnet::int8_grad_weight`` (see int8_linear.py for
the arithmetic).

``C[M, N] = (A[M, K] @ B[N, K]^T)`` accumulated in int32 on the int8 tensor cores (wgmma on
Hopper, mma on Ampere), then ``* row_mul[m] (* col_mul[n])`` in fp32 and one rounding to the
output dtype in the epilogue: the dequantisation costs no pass over memory. Both operands are
K-contiguous, the layout 8-bit tensor-core operands need. Two kernels compute it: one loading its
tiles through pointers (any shape, Ampere too) and a persistent one loading them by TMA (Hopper;
rows on 16-byte boundaries); each autotunes its tile per (M, N, K). ``bitnet::int8_mm`` runs the
faster of the two per product shape unless $BITNET_INT8_MM says "pointer" or "tma" (:func:`default_kernel`).
int8_mm_reference in int8_linear.py is the same function in plain torch, tested against both. ``quantize_grad_rows`` is the same for ``quantize_grad_rows_reference``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import numpy as np
import torch
import triton
import triton.language as tl

from bitnet_cli.errors import BitnetError
from bitnet_cli.train.int8_linear import env_switch
from bitnet_cli.model import on_own_thread, ternary_scale
from bitnet_cli.train.int8_linear import GRAD_ABSMAX_FLOOR, int8_rows, pad_rows

try:  # Triton 3.x; older releases kept libdevice under the CUDA backend's module
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    from triton.language.extra.cuda import libdevice

# Triton's interpreter (TRITON_INTERPRET=1: the kernels run on the CPU, how the tests check their
# logic without a GPU) has no libdevice; there :func:`_rint` rounds with floor instead. The GPU keeps
# libdevice's rint: the floor form's ``v - floor(v)`` may be contracted with the product forming v
# into one fma, which would move rounding ties.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _scaled(acc, row_mul_ptr, col_mul_ptr, off_m, rn, M, N, BM: tl.constexpr, HAS_COL_MUL: tl.constexpr):
    """Both product kernels' epilogue arithmetic: the exact int32 tile (rows off_m.. of C) times the per-token (row)
    and, if given, per-column scales, in fp32. One function, so the kernels (and both stores) give the same bits.
    The rows' scales are addressed from ``row_mul_ptr + off_m``, not as ``row_mul_ptr + (off_m + arange)``: Triton
    3.6's warp specialisation splits the tile's rows between two consumer warp groups and, in the second, offsets
    both ``off_m`` and the range in an index ``off_m + arange(BM)`` by BM / 2 (their products took other rows'
    scales; benchmarks/RESULTS.md, sessions 12 and 19), while a pointer offset by ``off_m`` it leaves alone."""
    rows = tl.arange(0, BM)
    row_mul = tl.load(row_mul_ptr + off_m + rows, mask=rows < M - off_m, other=0.0)
    c = acc.to(tl.float32) * row_mul[:, None]
    if HAS_COL_MUL:
        col_mul = tl.load(col_mul_ptr + rn, mask=rn < N, other=0.0)
        c = c * col_mul[None, :]
    return c


@triton.jit
def _store_scaled(acc, c_ptr, row_mul_ptr, col_mul_ptr, off_m, rn, M, N, stride_cm, BM: tl.constexpr,
                  HAS_COL_MUL: tl.constexpr):
    """:func:`_scaled`, stored in C's dtype for the rows and columns inside M x N."""
    c = _scaled(acc, row_mul_ptr, col_mul_ptr, off_m, rn, M, N, BM, HAS_COL_MUL)
    rows = tl.arange(0, BM)  # from C's row off_m, as _scaled's scales (warp specialisation)
    c_ptrs = c_ptr + off_m * stride_cm + rows[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M - off_m) & (rn[None, :] < N))


# Tiles for int8 on H100/H200 (and A100). The training shapes have short K (768-5460: 6-43 steps of
# 128), where the pipeline's fill and the epilogue weigh most, so wide tiles (fewer tiles, each reading
# A once per 256 columns) are offered beside the square one, and a 64-deep K step keeps more loads in
# flight at the same shared memory (at most 192 KiB). Four, so that a new shape's autotuning (each
# tile compiled and timed) stays short: session 10's nine pointer tiles and seven TMA ones made the
# 1.3b run autotune for minutes before its first step. 256x128x128 won at 32768 x 768 -> 768 (session 4).
_CONFIGS = [
    triton.Config({"BM": 128, "BN": 256, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 256, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
]


@triton.jit
def _grouped_tile(tile, grid_m, grid_n, GROUP_M: tl.constexpr):
    """Tile number -> (row tile, column tile) in grouped order: GROUP_M row tiles walk the columns
    together, so that the B tiles they share are read from L2, not from memory, by each of them."""
    width = GROUP_M * grid_n
    first_m = (tile // width) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    return first_m + (tile % width) % size_m, (tile % width) // size_m


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BK"] == 0})
@triton.jit
def _int8_mm_kernel(a_ptr, b_ptr, c_ptr, row_mul_ptr, col_mul_ptr, M, N, K,
                    stride_am, stride_bn, stride_cm, HAS_COL_MUL: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    EVEN_K: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # Out-of-range rows/columns read row 0 (wrap) instead of masking: their results are never stored.
    ra = tl.max_contiguous(tl.multiple_of(rm % M, BM), BM)
    rb = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    a_ptrs = a_ptr + ra[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rb[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    # The whole K steps load without a mask (plain 16-byte copies); a K that the tile does not divide
    # (1.3b's 5460 and 10920) masks its last, partial step alone. Masking every step, as sessions 4-11
    # did, ran those products at 163-168 TOP/s on an H200, against 830-1,180 at the aligned ones
    # (benchmarks/RESULTS.md, session 12).
    k_whole = (K // BK) * BK
    for k0 in range(0, k_whole, BK):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BK
        b_ptrs += BK
    if not EVEN_K:
        left = K - k_whole
        a = tl.load(a_ptrs, mask=rk[None, :] < left, other=0)
        b = tl.load(b_ptrs, mask=rk[:, None] < left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    _store_scaled(acc, c_ptr, row_mul_ptr, col_mul_ptr, pid_m * BM, rn, M, N, stride_cm, BM, HAS_COL_MUL)


# Tiles for the TMA kernel: its loads are issued by the copy engine, not by the warps' address
# arithmetic, so wide tiles with deep pipelines fit (shared memory: stages x (BM + BN) x BK bytes,
# at most 227 KiB on Hopper). With the TMA-store epilogue (TMA_STORE, 2-byte outputs) the tile's output also takes
# shared memory (BM x BN x 2 bytes, half with EPI_SPLIT 2): 256x128x128 with 4 stages needs 256 KiB by that count,
# more than the SM has: the autotuner drops it for those products. Few tiles, so that a new shape's autotuning (each
# tile compiled and timed) stays short:
# * WARP_SPEC: Triton 3.6's Hopper warp specialisation of the tile loop (num_warps 4 becomes 12: a producer warp
#   group issuing the TMA loads, two consumer warp groups each with half of the tile's rows). On an H200 it ran the
#   700m and 1.3b products at 1,120-1,600 TOP/s, up to 1.30x the best tile without it (level with it at 1.3b's
#   10920-wide grad_input; benchmarks/RESULTS.md, session 19). Its products were wrong in session 12 (the rows'
#   indices, see :func:`_scaled`).
# * 128x256x128 with 4 stages and the store in halves (EPI_SPLIT 2): from 7% slower to 15% faster than with 3 stages
#   and one store, by product (the fastest at 1.3b's 10920-wide grad_input).
# * the wide and the tall tile at 3 and 4 stages; the square one with a deep pipeline for the narrow products (N = K
#   = 768 at small.yaml: a 128x256 tile leaves the 132 SMs too few tiles) and 1.3b's 5460-wide grad_input.
_TMA_CONFIGS = [
    triton.Config({"BM": 128, "BN": 256, "BK": 128, "GROUP_M": 8, "WARP_SPEC": True}, num_warps=4, num_stages=3),
    triton.Config({"BM": 256, "BN": 128, "BK": 128, "GROUP_M": 8, "WARP_SPEC": True}, num_warps=4, num_stages=3),
    triton.Config({"BM": 128, "BN": 256, "BK": 128, "GROUP_M": 8, "EPI_SPLIT": 2}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 256, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 256, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=5),
]


def warp_spec_enabled() -> bool:
    """Whether the TMA kernel's autotuning offers its warp-specialised tiles: unless ``$BITNET_INT8_WARP_SPEC=0``
    (measurements; read when a product shape is first tuned, so once per process)."""
    return env_switch("BITNET_INT8_WARP_SPEC")


def _tma_tiles(configs: list, named_args: dict, **constexprs) -> list:
    """The TMA kernel's tiles for one product: warp specialisation unless turned off (:func:`warp_spec_enabled`), the
    store in halves only where there is a TMA store (else it is the same kernel as its one-store twin)."""
    store = constexprs["TMA_STORE"]
    return [c for c in configs if (warp_spec_enabled() or not c.kwargs.get("WARP_SPEC"))
            and (store or c.kwargs.get("EPI_SPLIT", 1) == 1)]


@triton.autotune(configs=_TMA_CONFIGS, key=["M", "N", "K"], prune_configs_by={"early_config_prune": _tma_tiles})
@triton.jit
def _int8_mm_tma_kernel(a_ptr, b_ptr, c_ptr, row_mul_ptr, col_mul_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                        HAS_COL_MUL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, TMA_STORE: tl.constexpr,
                        EPI_SPLIT: tl.constexpr = 1, WARP_SPEC: tl.constexpr = False):
    # The TMA descriptors are made here, on the device (each program writes its two into the global
    # scratch that :func:`_descriptor_scratch` allocates), so that a launch passes plain pointers:
    # descriptors built on the host (session 10) cost the launch enough Python and driver work that the
    # GPU sat idle (benchmarks/RESULTS.md, sessions 10 and 11). TMA fills out-of-range rows, columns
    # and K with zeros; the store is masked.
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BN, BK])
    # TMA_STORE (C's rows on 16-byte boundaries, a 2-byte dtype): the epilogue writes the scaled tile into
    # shared memory and a TMA store copies it out (clipped at M x N) while the next tile's products run,
    # instead of every thread storing its part of the tile to global memory itself. The same values.
    # EPI_SPLIT 2: the tile is stored as two halves of BN / 2 columns, so that its staging buffer in shared memory
    # takes half as much, room for one more pipeline stage (a tile option; the same values).
    if TMA_STORE:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                           block_shape=[BM, BN // EPI_SPLIT])
    # Persistent: one program per SM walks the tiles (grouped order, as _int8_mm_kernel), so that the
    # next tile's first loads overlap this tile's epilogue (the loop nest is flattened into one
    # software pipeline).
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    first = tl.program_id(0)
    if INTERPRETED:  # the interpreter's range() cannot take a program id; there it runs one program (NUM_SMS 1)
        first = 0
    # WARP_SPEC: warp specialisation of the tile loop (see _TMA_CONFIGS), which must then stay unflattened.
    for tile in tl.range(first, grid_m * grid_n, NUM_SMS, flatten=not WARP_SPEC, warp_specialize=WARP_SPEC):
        tile_m, tile_n = _grouped_tile(tile, grid_m, grid_n, GROUP_M)
        off_m = tile_m * BM
        off_n = tile_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BK])
            b = b_desc.load([off_n, ki * BK])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        rn = off_n + tl.arange(0, BN)
        if TMA_STORE:
            c = _scaled(acc, row_mul_ptr, col_mul_ptr, off_m, rn, M, N, BM, HAS_COL_MUL).to(c_ptr.dtype.element_ty)
            if EPI_SPLIT == 2:
                c0, c1 = tl.split(tl.permute(tl.reshape(c, (BM, 2, BN // 2)), (0, 2, 1)))
                c_desc.store([off_m, off_n], c0)
                c_desc.store([off_m, off_n + BN // 2], c1)
            else:
                c_desc.store([off_m, off_n], c)
        else:
            _store_scaled(acc, c_ptr, row_mul_ptr, col_mul_ptr, off_m, rn, M, N, stride_cm, BM, HAS_COL_MUL)


def tma_store(n: int, out_dtype: torch.dtype) -> bool:
    """Whether the TMA kernel stores its tiles by TMA (``TMA_STORE``): a 2-byte output whose rows of ``n``
    start on 16-byte boundaries, unless ``$BITNET_INT8_TMA_STORE=0`` (measurements)."""
    return out_dtype.itemsize == 2 and n % 8 == 0 and env_switch("BITNET_INT8_TMA_STORE")


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's allocator for the global scratch that device-side TMA descriptors are written to
    (``size`` bytes: 128 per descriptor per program): torch's caching allocator on the current device
    and stream, the ones the launch uses (torch allocations are 512-byte aligned)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _use_descriptor_scratch() -> None:
    """Give Triton :func:`_descriptor_scratch` unless an allocator is already set. Triton keeps it in a
    context variable, which a new thread does not inherit, and autograd runs the backward's products
    on its own thread: so this is checked at every TMA launch (a lookup), not once at import."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    if current is None or current.get() is getattr(_allocation, "_NULL_ALLOCATOR", None):
        triton.set_allocator(_descriptor_scratch)


@functools.lru_cache(maxsize=None)
def _gpu(device: torch.device) -> tuple[int, int]:
    """(compute capability major, multiprocessor count) of a CUDA device; (0, 1) elsewhere."""
    if device.type != "cuda":
        return 0, 1
    props = torch.cuda.get_device_properties(device)
    return props.major, props.multi_processor_count


def tma_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the TMA kernel can read ``a`` and ``b``: a Hopper-or-later GPU (or Triton's interpreter)
    and rows starting on 16-byte boundaries (a row stride a multiple of 16: int8_rows pads K = 5460
    and 10920 of the 1.3b shape to one)."""
    if not INTERPRETED.value and _gpu(a.device)[0] < 9:
        return False
    return all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a, b))


# The kernel ``bitnet::int8_mm`` runs (int8_mm's ``kernel``): "auto" unless $BITNET_INT8_MM says "pointer"
# or "tma". With host-side tensor descriptors the TMA kernel's launches left the GPU idle (session 10);
# with device-side ones (session 11) it runs as fast as the pointer kernel at small.yaml's shapes, and
# at the 700m shape's products 1.07-1.4x faster (1,025-1,244 TOP/s against 743-1,163; benchmarks/RESULTS.md,
# session 12): "auto" times both at a shape's first product and keeps the faster, the same bits either way.
KERNELS = ("pointer", "tma", "auto")


def default_kernel() -> str:
    kernel = os.environ.get("BITNET_INT8_MM", "auto")
    if kernel not in KERNELS:
        raise BitnetError(f"BITNET_INT8_MM={kernel!r}: expected one of {', '.join(KERNELS)}")
    return kernel


# The kernel "auto" picked per product shape (M, N, K, output dtype, column scale or not, device).
_FASTER: dict[tuple, str] = {}


def int8_mm(a: torch.Tensor, b: torch.Tensor, row_mul: torch.Tensor, col_mul: torch.Tensor | None,
            out_dtype: torch.dtype, kernel: str = "pointer", config: triton.Config | None = None,
            direct: tuple | None = None) -> torch.Tensor:
    """``kernel``: "pointer" (the pointer-load kernel, any shape), "tma" (the persistent TMA kernel,
    where :func:`tma_fits`; else "pointer") or "auto": where both can run, the first product of each
    shape times the two (each at its autotuned tile) and keeps the faster. The results are the same
    bit for bit either way. ``config``: one of the kernel's tiles instead of the autotuner's choice
    (Triton's interpreter, which the CPU tests run the kernels in, cannot time them). ``direct``: the key
    under which :func:`int8_mm_op` launches this product's compiled kernel directly from now on."""
    M, K = a.shape
    N = b.shape[0]
    assert b.shape[1] == K and a.dtype == b.dtype == torch.int8
    # Rows may be padded (int8_rows): both kernels take a row stride; only the elements must be contiguous.
    a, b = (t if t.stride(1) == 1 else t.contiguous() for t in (a, b))
    if kernel == "auto":
        kernel = "pointer"
        if tma_fits(a, b):
            key = (M, N, K, out_dtype, col_mul is None, a.device)
            if key not in _FASTER:
                from triton.testing import do_bench

                ms = {}
                for k in ("pointer", "tma"):
                    try:
                        ms[k] = do_bench(lambda k=k: int8_mm(a, b, row_mul, col_mul, out_dtype, k), return_mode="median")
                    except Exception as e:  # noqa: BLE001 (a Triton build that cannot compile it: the other serves)
                        if k == "pointer":
                            raise
                        warnings.warn(f"int8 TMA product kernel unavailable ({type(e).__name__}: {e}); "
                                      "using the pointer-load kernel", stacklevel=2)
                _FASTER[key] = min(ms, key=ms.get)
            kernel = _FASTER[key]
    row_mul = row_mul.float().contiguous()
    col_mul = None if col_mul is None else col_mul.float().contiguous()
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    col = row_mul if col_mul is None else col_mul
    tma = kernel == "tma" and (config is not None or tma_fits(a, b))
    args = (a, b, c, row_mul, col, M, N, K, a.stride(0), b.stride(0), c.stride(0))
    if tma:
        _use_descriptor_scratch()
    # What Triton specialises a compiled kernel on: the exact sizes and strides (the autotuner's key, and
    # ints equal to 1 or multiples of 16), the dtypes, the column scale, pointers on 16-byte boundaries.
    spec = (tma, tma and tma_store(N, out_dtype), *args[5:], out_dtype, col_mul is None, a.device, *(t.data_ptr() % 16 == 0 for t in args[:5]))
    launch = _LAUNCHES.get(spec) if config is None else None
    if launch is not None:
        compiled, grid, constexprs = launch
        compiled[grid](*args, *constexprs)
        if direct is not None:
            _remember(direct, tma, launch)
        return c
    sms = _gpu(a.device)[1]
    jit_fn = _int8_mm_tma_kernel if tma else _int8_mm_kernel
    if tma:
        extra = {"HAS_COL_MUL": col_mul is not None, "NUM_SMS": sms, "TMA_STORE": tma_store(N, out_dtype)}

        def grid(meta):
            return (min(sms, triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"])),)
    else:
        extra = {"HAS_COL_MUL": col_mul is not None}

        def grid(meta):
            return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)
    if config is not None:
        jit_fn.fn[grid(config.kwargs)](*args, **extra, **config.all_kwargs())
        return c
    compiled = jit_fn[grid](*args, **extra)
    if compiled is not None:  # None in Triton's interpreter, which compiles nothing
        tile = jit_fn.best_config.kwargs
        tail = {**_defaults(jit_fn), **extra, **tile} if tma else {**extra, **tile, "EVEN_K": K % tile["BK"] == 0}
        # The constexprs follow the runtime arguments in the kernel's signature; the launcher takes them all.
        names = jit_fn.arg_names[len(args):]
        assert set(names) == set(tail), names
        _LAUNCHES[spec] = (compiled, (*grid(tile), 1, 1), tuple(tail[n] for n in names))  # the runner reads x, y, z
    return c


def _defaults(kernel) -> dict:
    """The constexpr arguments a kernel's signature gives defaults (tile options that a tile may leave out)."""
    import inspect

    while hasattr(kernel, "fn"):  # autotuner -> heuristics -> jit -> the Python function
        kernel = kernel.fn
    return {n: p.default for n, p in inspect.signature(kernel).parameters.items() if p.default is not p.empty}


# ``bitnet::int8_mm``'s products launched straight into Triton's compiled launcher (:func:`int8_mm_op`),
# per (shapes, strides, dtypes, column scale or not, device): the launcher, grid, CUfunction, packed
# metadata, cooperative/PDL flags, the descriptors' scratch bytes per launch, the constexprs, whether the
# TMA kernel. Session 13 measured the op's host cost at 81.9 us a launch against 41.0 for the TMA kernel
# called directly and 15.0 for a bf16 F.linear (benchmarks/RESULTS.md); a 700m step launches it about 384
# times. This path leaves out what Triton's ``compiled[grid](...)`` does per launch besides the launch
# (the current device and stream looked up through its driver, a launch-metadata dict built for its hook
# chain whether or not a hook is set, the scratch allocated through the allocator's context variable)
# and ``int8_mm``'s own checks, which the key has already answered.
_DIRECT: dict[tuple, tuple] = {}
# The TMA kernel's descriptor scratch per (device, stream), reused by every launch on that stream (a
# kernel's programs write their descriptors at its start; the next kernel on the stream starts after it
# ends). Never while a CUDA graph is being captured: there the scratch comes from the graph's allocator.
# Allocated through model.on_own_thread (outside any CUDA graph tree's pool), at least
# 1 MiB (132 SMs x 2 descriptors x 128 bytes = 33 KiB) and never freed (a freed block could be handed to
# another stream while a kernel still writes descriptors into it).
_SCRATCH: dict[tuple, torch.Tensor] = {}
_SCRATCH_KEPT: list[torch.Tensor] = []


# The launcher's argument list that int8_mm_op passes is Triton 3.6's (CudaLauncher.__call__ and its C
# ``launch``: grid, stream, function, cooperative and PDL flags, two scratches, packed metadata, launch
# metadata, two hooks, the kernel's arguments); other releases keep int8_mm's own launch path.
_DIRECT_TRITON = triton.__version__.split(".")[:2] == ["3", "6"]


def _remember(key: tuple, tma: bool, launch: tuple) -> None:
    if not _DIRECT_TRITON:
        return
    compiled, grid, constexprs = launch
    runner = getattr(compiled, "run", None)  # Triton's CudaLauncher (loads the module on first use)
    needed = ("launch", "global_scratch_size", "profile_scratch_size", "launch_cooperative_grid", "launch_pdl", "num_ctas")
    if not all(hasattr(runner, n) for n in needed) or runner.profile_scratch_size:
        return  # another Triton's launcher: int8_mm's own path serves
    scratch = runner.global_scratch_size * grid[0] * grid[1] * grid[2] * runner.num_ctas
    _DIRECT[key] = (runner.launch, grid, compiled.function, compiled.packed_metadata, runner.launch_cooperative_grid,
                    runner.launch_pdl, scratch, constexprs, tma)


def _scratch(device: torch.device, stream: int, size: int) -> torch.Tensor:
    if torch.cuda.is_current_stream_capturing():
        return torch.empty(size, dtype=torch.int8, device=device)
    buf = _SCRATCH.get((device, stream))
    if buf is None or buf.numel() < size:
        buf = _SCRATCH[(device, stream)] = on_own_thread(
            lambda: torch.empty(max(size, 1 << 20), dtype=torch.int8, device=device))
        _SCRATCH_KEPT.append(buf)
    return buf


def _hooks_set() -> bool:
    """Whether a Triton launch hook is installed (a profiler such as proton): then launches take Triton's path."""
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover (Triton before 3.4; _remember keeps no direct launches there)
        return True
    rt = knobs.runtime
    return any(h is not None and getattr(h, "calls", True) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def int8_mm_op(a: torch.Tensor, b: torch.Tensor, row_mul: torch.Tensor, col_mul: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``bitnet::int8_mm`` on CUDA: :func:`int8_mm` with :func:`default_kernel` (the TMA kernel's ``a`` given
    16-byte-aligned rows first), the same bits; after a product's first calls, a direct launch of its
    compiled kernel (``_DIRECT``)."""
    key = (a.shape, a.stride(), b.shape, b.stride(), row_mul.shape, row_mul.stride(), row_mul.dtype, out_dtype,
           None if col_mul is None else (col_mul.stride(), col_mul.dtype), a.device, os.environ.get("BITNET_INT8_MM"),
           os.environ.get("BITNET_INT8_TMA_STORE"), os.environ.get("BITNET_INT8_WARP_SPEC"))
    d = _DIRECT.get(key)
    if d is not None and not ((a.data_ptr() | b.data_ptr() | row_mul.data_ptr()
                               | (0 if col_mul is None else col_mul.data_ptr())) & 15) and not _hooks_set():
        launch, grid, function, meta, coop, pdl, scratch, constexprs, tma = d
        device = a.device
        stream = torch._C._cuda_getCurrentRawStream(device.index)
        M, K = a.shape
        N = b.shape[0]
        c = torch.empty((M, N), dtype=out_dtype, device=device)
        launch(grid[0], grid[1], grid[2], stream, function, coop, pdl,
               _scratch(device, stream, scratch) if scratch else None, None, meta, None, None, None,
               a, b, c, row_mul, row_mul if col_mul is None else col_mul, M, N, K, a.stride(0), b.stride(0), N,
               *constexprs)
        return c
    kernel = default_kernel()
    # TMA reads rows on 16-byte boundaries; the pointer kernel any row stride
    padded = pad_rows(a) if kernel != "pointer" else a
    # a padding copy, or operands int8_mm converts, each call: not a direct launch
    direct = key if padded is a and a.stride(1) == 1 and b.stride(1) == 1 and row_mul.dtype == torch.float32 and (
        row_mul.stride(0) == 1) and (col_mul is None or (col_mul.dtype == torch.float32 and col_mul.stride(0) == 1)) else None
    return int8_mm(padded, b, row_mul, col_mul, out_dtype, kernel, direct=direct)


# The compiled kernel, grid and constexprs of each product specialisation (int8_mm's ``spec``), once
# the autotuner has chosen its tile: later products launch it directly. Triton's own launch path (the
# autotuner's key, binding and specialising the arguments, the cache lookup) cost about 50 us of host
# time per product on the H200's host (benchmarks/RESULTS.md, session 11), and a training step runs
# about 384 of them.
_LAUNCHES: dict[tuple, tuple] = {}


@triton.jit
def _scaled_part(ptr, stride, col_ptr, rows, M, N: tl.constexpr, B: tl.constexpr, DIV: tl.constexpr,
                 HINT: tl.constexpr):
    """One part of the output gradient's rows [R, B] as fp32, times its columns' scales (0 past N or M).
    ``DIV``: a power of two that divides ``stride``. With ``HINT`` it is written into the row offset as
    ``(stride // DIV) * DIV``, so that Triton sees it and vectorises the loads. Triton itself knows only whether
    a stride is a multiple of 16: 1.3b's 5460-element rows compile to 2-byte loads (145 ``ld.global.b16`` in
    the sm_90 PTX, against 32 8-byte ``ld.global.v2.b32`` with HINT; ``tl.multiple_of`` on the scalar stride,
    the form without HINT, changes nothing). HINT is on where a part's row stride is not a multiple of 16
    (:func:`stride_hint`); the same bits either way."""
    c = tl.arange(0, B)
    if HINT:
        offs = rows[:, None] * (stride // DIV) * DIV
    else:
        offs = rows[:, None] * tl.multiple_of(stride, DIV)
    g = tl.load(ptr + offs + c[None, :], mask=(rows[:, None] < M) & (c[None, :] < N), other=0.0)
    return g.to(tl.float32) * tl.load(col_ptr + c, mask=c < N, other=0.0)[None, :]


@triton.jit
def _rint(v):
    """Round to nearest, ties to even (torch.round)."""
    if INTERPRETED:
        r = tl.floor(v)
        frac = v - r
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        return tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
    else:
        return libdevice.rint(v)


@triton.jit
def _within(mask, inside):
    """``mask & inside`` for a scalar ``inside`` (a row past the end). Triton 3.9's interpreter types a tensor ``&`` a
    scalar as int64 and refuses it as a mask; a select is the same on the GPU."""
    return tl.where(inside, mask, False)


@triton.jit
def _grad_row_scale(amax, FLOOR: tl.constexpr):
    """The output gradient's per-token scale, :func:`int8_linear.quantize_grad_rows_reference`'s fp32
    ``127 / max(absmax, floor)`` as torch computes it (``__rtruediv__``: the reciprocal, correctly rounded, then times
    127); div_rn because Triton's own fp32 ``/`` may be approximate. Every kernel that rounds those rows takes it."""
    return tl.div_rn(tl.zeros_like(amax) + 1.0, tl.maximum(amax, FLOOR)) * 127.0


@triton.jit
def _int8_values(v):
    """``v`` rounded half to even and clamped to int8's range (still fp32)."""
    return tl.minimum(tl.maximum(_rint(v), -128.0), 127.0)


@triton.jit
def _at_8_bytes(stride):
    """An int8 row stride as Triton may know it: a multiple of 8, in kernels that keep it from specialising the stride
    to 16 (``do_not_specialize``). Triton lays a block out for its widest access; int8 rows known 16-byte aligned get
    16 values a thread, and every 4- and 8-value fp32 and bf16 load and store of the block then went through shared
    memory (layout conversions with barriers; benchmarks/RESULTS.md, session 31). Every int8 row stride is a multiple
    of 16 (:func:`int8_linear.int8_rows`), so the value is the stride itself."""
    return (stride // 8) * 8


@triton.jit
def _store_rounded(q_ptr, stride_q, rows, M, g, s, N: tl.constexpr, B: tl.constexpr):
    c = tl.arange(0, B)
    q = _int8_values(g * s[:, None])
    tl.store(q_ptr + rows[:, None] * stride_q + c[None, :], q.to(tl.int8), mask=(rows[:, None] < M) & (c[None, :] < N))


@triton.jit
def _quantize_grad_rows_kernel(p0, p1, p2, stride0, stride1, stride2, col_ptr, q_ptr, s_ptr, stride_q, M,
                               N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                               B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, FLOOR: tl.constexpr,
                               R: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                               HINT: tl.constexpr):
    # R rows per program, their (up to three) parts held in registers: one read of each, one write.
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    g0 = _scaled_part(p0, stride0, col_ptr, rows, M, N0, B0, D0, HINT)
    g1 = _scaled_part(p1, stride1, col_ptr + N0, rows, M, N1, B1, D1, HINT)
    g2 = _scaled_part(p2, stride2, col_ptr + N0 + N1, rows, M, N2, B2, D2, HINT)
    amax = tl.maximum(tl.maximum(tl.max(tl.abs(g0), 1), tl.max(tl.abs(g1), 1)), tl.max(tl.abs(g2), 1))
    s = _grad_row_scale(amax, FLOOR)
    tl.store(s_ptr + rows, s, mask=rows < M)
    _store_rounded(q_ptr, stride_q, rows, M, g0, s, N0, B0)
    _store_rounded(q_ptr + N0, stride_q, rows, M, g1, s, N1, B1)
    _store_rounded(q_ptr + N0 + N1, stride_q, rows, M, g2, s, N2, B2)


def _launch_override(variable: str, rows_power_of_two: bool, chunk: bool = False) -> tuple[int, ...] | None:
    """(rows per program, warps) from ``$variable`` as "R,W" (for measurements), or None when it is unset; with
    ``chunk``, (rows per block, warps, blocks per program) as "R,W,C"."""
    env = os.environ.get(variable)
    if not env:
        return None
    try:
        values = tuple(int(v) for v in env.split(","))
    except ValueError:
        values = ()
    r, w, *c = values if len(values) == 2 + chunk else (0, 0)
    if min(r, w, *c) < 1 or w & (w - 1) or (rows_power_of_two and r & (r - 1)):
        rows = "powers of two" if rows_power_of_two else "positive integers, warps a power of two"
        raise BitnetError(f"{variable}={env!r}: expected ROWS,WARPS{',CHUNK' if chunk else ''} ({rows})")
    return values


def grad_rows_launch(widths: list[int]) -> tuple[int, int]:
    """(rows per program, warps) of :func:`quantize_grad_rows` for parts of these widths: $BITNET_QGR as
    "R,W" overrides (measurements), else one row per program, 2 warps up to 2,048 lanes (the parts' widths,
    each rounded up to a power of two), 4 up to 16,384, then 8. Sessions 9-14 gave 4 warps up to 4,096 lanes,
    8 to 16,384 and 16 above (1.3b's gate/up: 5460 + 5460 -> 16,400 lanes with the absent third part's 16);
    on an H200 (benchmarks/RESULTS.md, session 15) the new launch took 0.83 ms against 1.22 at 1.3b's
    gate/up, 0.054 against 0.061 at 700m's 1536-wide o/down, 0.049 against 0.076 at small's 768, the same
    bits (every launch of the sweep was checked against the default's)."""
    override = _launch_override("BITNET_QGR", rows_power_of_two=False)
    if override:
        return override
    total = sum(triton.next_power_of_2(max(w, 16)) for w in widths)
    return 1, 2 if total <= 2048 else 4 if total <= 16384 else 8


def stride_hint(strides: list[int]) -> bool:
    """Whether :func:`quantize_grad_rows` writes the parts' row strides' power-of-two factors into its offsets
    (``HINT``, see :func:`_scaled_part`): where a stride is not a multiple of 16, whose rows Triton would otherwise
    read with 2-byte loads (1.3b's 5460-wide gate/up parts: 0.826 -> 0.516 ms a call on an H200, benchmarks/RESULTS.md,
    session 17), unless ``$BITNET_QGR_STRIDE_HINT`` says 0 or 1. The same bits either way."""
    return env_switch("BITNET_QGR_STRIDE_HINT", default="1" if any(s % 16 for s in strides) else "0")


def quantize_grad_rows(parts: list[torch.Tensor], col_scale: torch.Tensor, rows: int | None = None,
                       warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows``/``warps``: the launch (rows per program, warps per program) instead of :func:`grad_rows_launch`'s."""
    assert 1 <= len(parts) <= 3 and all(p.dim() == 2 and p.shape[0] == parts[0].shape[0] for p in parts)
    parts = [p if p.stride(-1) == 1 else p.contiguous() for p in parts]
    m = parts[0].shape[0]
    widths = [p.shape[1] for p in parts]
    n = sum(widths)
    assert col_scale.shape == (n,)
    r, w = grad_rows_launch(widths)
    r, w = rows or r, warps or w
    q = int8_rows(m, n, parts[0].device)
    s = torch.empty((m,), dtype=torch.float32, device=parts[0].device)
    # Absent parts: width 0 (all lanes masked), pointing at part 0, which they never read.
    ptrs = parts + [parts[0]] * (3 - len(parts))
    widths += [0] * (3 - len(widths))
    blocks = [triton.next_power_of_2(max(w_, 16)) for w_ in widths]
    divs = [math.gcd(p.stride(0), 16) for p in ptrs]  # the parts' row strides' power-of-two factors (to 16)
    hint = stride_hint([p.stride(0) for p in ptrs])
    _quantize_grad_rows_kernel[(triton.cdiv(m, r),)](
        *ptrs, *(p.stride(0) for p in ptrs), col_scale.float().contiguous(), q, s, q.stride(0), m,
        N0=widths[0], N1=widths[1], N2=widths[2], B0=blocks[0], B1=blocks[1], B2=blocks[2], FLOOR=GRAD_ABSMAX_FLOOR,
        R=r, D0=divs[0], D1=divs[1], D2=divs[2], HINT=hint, num_warps=w)
    return q, s


# ----------------------------------------------------------------------------- the int8 weight gradient


@triton.jit
def _quantize_grad_cols_kernel(g_ptr, sx_ptr, q_ptr, d_ptr, M, N, stride_g, stride_qn, stride_qt, stride_d,
                               FLOOR: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    """One block of BT tokens x BN columns of one part: ``G' = G / s_x`` (per token), its columns' absmax over the
    block, the int8 values stored at ``q[n, t]`` (``stride_qn``, ``stride_qt``: the transposed operand or not), each
    column's ``1 / scale`` at ``d[block, n]``; rows past M count as 0."""
    pid_t = tl.program_id(0)
    rt = pid_t * BT + tl.arange(0, BT)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    inside = (rt[:, None] < M) & (rn[None, :] < N)
    g = tl.load(g_ptr + rt[:, None].to(tl.int64) * stride_g + rn[None, :], mask=inside, other=0.0).to(tl.float32)
    sx = tl.load(sx_ptr + rt, mask=rt < M, other=1.0)
    g = tl.div_rn(g, sx[:, None])  # torch's correctly rounded fp32 division
    # ``127 / max(absmax, floor)`` as torch computes it (the reciprocal, correctly rounded, then times 127)
    s = tl.div_rn(tl.full([BN], 1.0, tl.float32), tl.maximum(tl.max(tl.abs(g), 0), FLOOR)) * 127.0
    q = tl.minimum(tl.maximum(_rint(g * s[None, :]), -128.0), 127.0).to(tl.int8)
    tl.store(q_ptr + rn[None, :].to(tl.int64) * stride_qn + rt[:, None] * stride_qt, q, mask=inside)
    tl.store(d_ptr + pid_t * stride_d + rn, tl.div_rn(tl.full([BN], 1.0, tl.float32), s), mask=rn < N)


def quantize_grad_cols(parts: list[torch.Tensor], s_x: torch.Tensor, transposed: bool = True,
                       columns: int = 64, warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``bitnet::quantize_grad_cols`` on CUDA (int8_linear.quantize_grad_cols_reference's values): one launch per
    part, each program a block of tokens x ``columns``. ``transposed=False`` (measurements): the int8 G' stored
    [M, N] (columns contiguous) instead, as ``q[n, t]``'s transpose of it."""
    from bitnet_cli.train.int8_linear import GRAD_WEIGHT_BLOCK

    parts = [p if p.stride(-1) == 1 else p.contiguous() for p in parts]
    m = parts[0].shape[0]
    n = sum(p.shape[1] for p in parts)
    q = int8_rows(n, m, parts[0].device) if transposed else int8_rows(m, n, parts[0].device).t()
    d = torch.empty((triton.cdiv(m, GRAD_WEIGHT_BLOCK), n), dtype=torch.float32, device=parts[0].device)
    s_x = s_x.float().contiguous()
    col = 0
    for p in parts:
        w = p.shape[1]
        _quantize_grad_cols_kernel[(d.shape[0], triton.cdiv(w, columns))](
            p, s_x, q[col:], d[:, col:], m, w, p.stride(0), q.stride(0), q.stride(1), d.stride(0),
            FLOOR=GRAD_ABSMAX_FLOOR, BT=GRAD_WEIGHT_BLOCK, BN=columns, num_warps=warps)
        col += w
    return q, d


# Tiles of the int8 weight gradient. Each 128-token step's int32 tile is converted and scaled into an fp32
# accumulator, so a thread holds both. On an H200 (benchmarks/RESULTS.md, session 18) 64 x 128 on 4 warps ran the
# 700m and 1.3b shapes 12-16% faster than 128 x 128 on 8; the wide tiles (128 x 256, 256 x 128: spills) and 128 x 128
# on 4 warps took 2.5-4.5 times as long.
_GRAD_WEIGHT_CONFIGS = [
    triton.Config({"BM": 64, "BN": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 128, "GROUP_M": 8}, num_warps=4, num_stages=6),
    triton.Config({"BM": 128, "BN": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]


@triton.autotune(configs=_GRAD_WEIGHT_CONFIGS, key=["N", "K", "M"])
@triton.heuristics({"EVEN_M": lambda args: args["M"] % args["BT"] == 0})
@triton.jit
def _int8_grad_weight_kernel(a_ptr, b_ptr, d_ptr, c_ptr, N, K, M, stride_an, stride_at, stride_bk, stride_bt,
                             stride_d, stride_c, BT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             GROUP_M: tl.constexpr, EVEN_M: tl.constexpr):
    """``C[N, K] = sum_b (A_b @ B_b^T) * d[b][:, None]`` over blocks b of BT tokens: A int8 [N, M] (the rounded G'),
    B int8 [K, M] (the forward's rows), each block's product exact in int32, then scaled per row and summed in fp32
    (launched without fma contraction: a product and a sum, as the reference rounds them)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(K, BN), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rt = tl.arange(0, BT)
    # Out-of-range rows/columns read row 0 (wrap) instead of masking: their results are never stored.
    ra = tl.max_contiguous(tl.multiple_of(rm % N, BM), BM)
    rb = tl.max_contiguous(tl.multiple_of(rn % K, BN), BN)
    a_ptrs = a_ptr + ra[:, None].to(tl.int64) * stride_an + rt[None, :] * stride_at
    b_ptrs = b_ptr + rb[None, :].to(tl.int64) * stride_bk + rt[:, None] * stride_bt
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    d_ptrs = d_ptr + ra
    # Whole blocks load without a mask (as _int8_mm_kernel's K steps); a partial last block masks its tokens.
    for _ in range(0, M // BT):
        p = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), out_dtype=tl.int32)
        acc = acc + p.to(tl.float32) * tl.load(d_ptrs)[:, None]
        a_ptrs += BT * stride_at
        b_ptrs += BT * stride_bt
        d_ptrs += stride_d
    if not EVEN_M:
        left = M % BT
        a = tl.load(a_ptrs, mask=rt[None, :] < left, other=0)
        b = tl.load(b_ptrs, mask=rt[:, None] < left, other=0)
        p = tl.dot(a, b, out_dtype=tl.int32)
        acc = acc + p.to(tl.float32) * tl.load(d_ptrs)[:, None]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_c + rn[None, :]
    tl.store(c_ptrs, acc, mask=(rm[:, None] < N) & (rn[None, :] < K))


def int8_grad_weight(gq_t: torch.Tensor, q_t: torch.Tensor, d: torch.Tensor,
                     config: triton.Config | None = None) -> torch.Tensor:
    """``bitnet::int8_grad_weight`` on CUDA (int8_linear.int8_grad_weight_reference's values). ``gq_t`` [N, M] and
    ``q_t`` [K, M] may be transposed views (the token axis not contiguous; for measurements) only where N and K are
    multiples of the tile: the kernel's wrapped rows are hinted contiguous, which then holds along the contiguous
    axis too (a 200-wide view misaligned its loads on an H200). ``config``: one of the kernel's tiles instead of the
    autotuner's choice (Triton's interpreter cannot time them)."""
    from bitnet_cli.train.int8_linear import GRAD_WEIGHT_BLOCK

    n, m = gq_t.shape
    k = q_t.shape[0]
    assert q_t.shape[1] == m and d.shape == (triton.cdiv(m, GRAD_WEIGHT_BLOCK), n) and d.stride(1) == 1
    c = torch.empty((n, k), dtype=torch.float32, device=gq_t.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BM"]) * triton.cdiv(k, meta["BN"]),)

    args = (gq_t, q_t, d, c, n, k, m, gq_t.stride(0), gq_t.stride(1), q_t.stride(0), q_t.stride(1), d.stride(0),
            c.stride(0))
    if config is not None:
        _int8_grad_weight_kernel.fn.fn[grid(config.kwargs)](*args, BT=GRAD_WEIGHT_BLOCK, EVEN_M=m % GRAD_WEIGHT_BLOCK == 0,
                                                            **config.all_kwargs(), enable_fp_fusion=False)
    else:
        _int8_grad_weight_kernel[grid](*args, BT=GRAD_WEIGHT_BLOCK, enable_fp_fusion=False)
    return c


# ----------------------------------------------------------------------------- the per-step ternary refresh


@triton.jit
def _ternarise_kernel(w_ptr, s_ptr, inv_ptr, idx, t_ptr, tt_ptr, col_ptr, R, K, stride_w, stride_t, stride_tt, row0,
                      BR: tl.constexpr, BK: tl.constexpr):
    """One latent weight [R, K] -> its ternary rows ``clamp(rint(W * s), -1, 1)`` written at rows
    row0.. of T and columns row0.. of T^T, and (by the first column of programs) ``col_scale``'s rows
    = 1/s. ``s`` and ``1/s`` are read from vectors (element ``idx``), computed by torch as
    :func:`int8_linear.ternary_weight` computes them: only the exact per-element operations are here
    (an IEEE product, round to nearest even, clamp), so the integers are ternary_weight's bit for bit."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    r = pid_r * BR + tl.arange(0, BR)
    k = pid_k * BK + tl.arange(0, BK)
    mask = (r[:, None] < R) & (k[None, :] < K)
    s = tl.load(s_ptr + idx)
    w = tl.load(w_ptr + r[:, None].to(tl.int64) * stride_w + k[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.minimum(tl.maximum(_rint(w * s), -1.0), 1.0).to(tl.int8)
    rows = row0 + r
    tl.store(t_ptr + rows[:, None].to(tl.int64) * stride_t + k[None, :], t, mask=mask)
    tl.store(tt_ptr + k[None, :].to(tl.int64) * stride_tt + rows[:, None], t, mask=mask)
    if pid_k == 0:
        inv = tl.load(inv_ptr + idx)
        tl.store(col_ptr + rows, tl.zeros([BR], tl.float32) + inv, mask=r < R)


def refresh_products(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]]) -> None:
    """The per-step ternary refresh of many stacked products at once: ``items`` holds each product's
    buffers ``(trits [N, K], trits_t [K, N], col_scale [N])`` and its latent weights (their rows
    stacked in that order), and each is left holding ``stacked_ternary(weights)`` bit for bit.

    The eager form (:meth:`int8_linear.Int8Product.refresh`) ran about twelve kernels per weight and
    six per product (about 2,000 a step at 700m). Here each weight's absmean is torch's own
    ``w.abs().mean()`` (two kernels: the same reduction, so the same bits), the scales of all weights
    are formed in one vector (the same elementwise fp32 operations as the scalar form), and one
    Triton kernel per weight writes its ternary rows into T and T^T and its column scales."""
    ws = [w for *_, weights in items for w in weights]
    if not ws:
        return
    s = ternary_scale(torch.stack([w.detach().float().abs().mean() for w in ws]))
    inv = 1.0 / s
    i = 0
    for trits, trits_t, col_scale, weights in items:
        row0 = 0
        for w in weights:
            w = w.detach()
            if w.stride(-1) != 1:
                w = w.contiguous()
            r, k = w.shape
            grid = (triton.cdiv(r, 32), triton.cdiv(k, 128))
            _ternarise_kernel[grid](w, s, inv, i, trits, trits_t, col_scale, r, k, w.stride(0), trits.stride(0),
                                    trits_t.stride(0), row0, BR=32, BK=128, num_warps=4)
            row0 += r
            i += 1
        for buf in (trits, trits_t, col_scale):
            torch.autograd.graph.increment_version(buf)


# ----------------------------------------------------------------------------- the norms' rounding


@triton.jit
def _rsqrt(v):
    """torch.rsqrt: CUDA's rsqrtf (libdevice's) on the GPU; ``1 / sqrt`` in the interpreter, as torch's CPU kernel."""
    if INTERPRETED:
        return 1.0 / tl.sqrt(v)
    else:
        return libdevice.rsqrt(v)


@triton.jit
def _round_to(v, DTYPE: tl.constexpr, BF16: tl.constexpr):
    """fp32 ``v`` rounded to DTYPE (to nearest, ties to even, as torch's casts), back as fp32. ``BF16``: DTYPE is
    bfloat16, which Triton's interpreter truncates instead of rounding: there the rounding is done on the bits."""
    if INTERPRETED and BF16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    else:
        return v.to(DTYPE).to(tl.float32)


@triton.jit
def _div_rn(a, b, inv_b):
    """``a / b`` correctly rounded (IEEE division, as torch's ``/``) given ``inv_b = 1 / b`` correctly rounded: the
    quotient ``a * inv_b`` corrected once by its exact residual (two fma; Markstein's theorem: the result is the
    correctly rounded quotient), instead of a full division per element (``div.rn.f32``, a slow path of its own).
    The interpreter, whose fma is not fused, divides."""
    if INTERPRETED:
        return tl.div_rn(a, b + tl.zeros_like(a))
    else:
        q0 = a * inv_b
        return tl.fma(tl.fma(-q0, b, a), inv_b, q0)


@triton.jit
def _mean_of_sum(total, K: tl.constexpr, inv_k):
    """torch's mean of K elements from their sum: on CUDA the sum times the fp32 factor rows / elements (``inv_k``,
    computed so on the host); on the CPU (the interpreter's reference) the sum divided by K."""
    if INTERPRETED:
        return total / K
    else:
        return total * inv_k


@triton.jit(do_not_specialize=["stride_q"])
def _norm_quant_kernel(x_ptr, b_ptr, w_ptr, q_ptr, s_ptr, xd_ptr, rstd_ptr, h_ptr, M, stride_x, stride_b, stride_q,
                       stride_xd, stride_h, eps, inv_k, K: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr,
                       GATE: tl.constexpr, RESIDUAL: tl.constexpr, Y_DTYPE: tl.constexpr, Y_BF16: tl.constexpr,
                       N_DTYPE: tl.constexpr, N_BF16: tl.constexpr, OUT_BF16: tl.constexpr, DX: tl.constexpr,
                       DB: tl.constexpr, HINT: tl.constexpr, STORE_XD: tl.constexpr):
    """R rows of :func:`int8_linear.norm_quant_reference`, each read once: relu2 (with GATE: ``b`` is the gate) or the
    residual add (with RESIDUAL: ``b`` is the delta, ``y = x + b`` stored at ``h``,
    :func:`int8_linear.residual_norm_quant_reference`), the RMSNorm, the absmax, the int8 rows and (STORE_XD) X~.
    Every step is the reference's elementwise operation in its dtype: products of two 16-bit floats are exact in fp32, so rounding
    each to y's dtype (Y_DTYPE: x's, or fp32 where the model's relu2 runs in fp32, int8_linear.norm_quant_reference;
    with RESIDUAL the sum's, whose fp32 sum of the two inputs rounded to it is torch's add) gives torch's bits. The
    launch turns off Triton's fusion of a multiply and an add into one fma
    (``enable_fp_fusion``), which would round ``mean + eps`` differently from torch; the sum of squares is the
    one step whose order differs from torch's reduction (its last bits, and so rarely a rounding, can differ)."""
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    c = tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (c[None, :] < K)
    if HINT:  # the row strides' power-of-two factors written into the offsets, as _scaled_part's HINT
        off_x = rows[:, None] * (stride_x // DX) * DX
        off_b = rows[:, None] * (stride_b // DB) * DB
    else:
        off_x = rows[:, None] * stride_x
        off_b = rows[:, None] * stride_b
    y = tl.load(x_ptr + off_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if GATE:  # relu2(gate, x) = relu(gate)^2 * x, rounded to y's dtype after each operation as torch does
        g = tl.maximum(tl.load(b_ptr + off_b + c[None, :], mask=mask, other=0.0).to(tl.float32), 0.0)
        y = _round_to(_round_to(g * g, Y_DTYPE, Y_BF16) * y, Y_DTYPE, Y_BF16)
    if RESIDUAL:  # the new residual stream x + delta, one rounding of the exact inputs' fp32 sum, as torch's add
        y = _round_to(y + tl.load(b_ptr + off_b + c[None, :], mask=mask, other=0.0).to(tl.float32), Y_DTYPE, Y_BF16)
        tl.store(h_ptr + rows[:, None] * stride_h + c[None, :], y.to(h_ptr.dtype.element_ty), mask=mask)
    mean = _mean_of_sum(tl.sum(y * y, 1), K, inv_k)
    rstd = _rsqrt(mean + eps)
    h = _round_to(y * rstd[:, None], Y_DTYPE, Y_BF16)
    w = tl.load(w_ptr + c, mask=c < K, other=0.0).to(tl.float32)
    n = _round_to(w[None, :] * h, N_DTYPE, N_BF16)
    amax = tl.max(tl.abs(n), 1)
    s = tl.div_rn(tl.full([R], 1.0, tl.float32), tl.maximum(amax, 1e-5)) * 127.0  # quantize_rows' 127 / max(.., 1e-5)
    q = tl.minimum(tl.maximum(_rint(n * s[:, None]), -128.0), 127.0)
    tl.store(q_ptr + rows[:, None] * _at_8_bytes(stride_q) + c[None, :], q.to(tl.int8), mask=mask)
    if STORE_XD:
        xd = _round_to(_div_rn(q, s[:, None], tl.div_rn(tl.full([R], 1.0, tl.float32), s)[:, None]),
                       xd_ptr.dtype.element_ty, OUT_BF16)
        tl.store(xd_ptr + rows[:, None] * stride_xd + c[None, :], xd.to(xd_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows, s, mask=rows < M)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


def norm_quant_launch(k: int) -> tuple[int, int]:
    """(rows per program, warps) of :func:`norm_quant` for rows of ``k``: ``$BITNET_NQ`` as "R,W" overrides
    (measurements), else 4 warps and four rows a program up to 1,024 columns, two up to 2,048, then one: the
    fastest launches on an H200 at the recipes' shapes (benchmarks/RESULTS.md, session 17: 700m's 1536-wide rows
    0.084 ms a call against 0.118 with one row and 8 warps, its relu2 4096-wide ones 0.238 against 0.261)."""
    override = _launch_override("BITNET_NQ", rows_power_of_two=True)
    if override:
        return override
    return (4, 4) if k <= 1024 else (2, 4) if k <= 2048 else (1, 4)


_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def norm_quant(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
               rows: int | None = None, warps: int | None = None, y_dtype: torch.dtype | None = None,
               with_x_deq: bool = True) -> tuple[torch.Tensor, ...]:
    """``bitnet::norm_quant`` on CUDA (int8_linear.norm_quant_reference's values); ``rows``/``warps``: the launch
    instead of :func:`norm_quant_launch`'s."""
    assert gate is None or gate.shape == x.shape and gate.dtype == x.dtype
    return _launch_norm_quant(x, gate, None, weight, eps, out_dtype, y_dtype or x.dtype, rows, warps, with_x_deq)[1:]


def residual_norm_quant(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                        out_dtype: torch.dtype, rows: int | None = None, warps: int | None = None,
                        with_x_deq: bool = True) -> tuple[torch.Tensor, ...]:
    """``bitnet::residual_norm_quant`` on CUDA (int8_linear.residual_norm_quant_reference's values): :func:`norm_quant`'s
    kernel reading ``delta`` beside ``x`` and writing their sum ``h`` too; ``rows``/``warps`` as there."""
    assert delta.shape == x.shape
    return _launch_norm_quant(x, None, delta, weight, eps, out_dtype, torch.promote_types(x.dtype, delta.dtype),
                              rows, warps, with_x_deq)


def _launch_norm_quant(x, gate, delta, weight, eps, out_dtype, y_dtype, rows, warps, with_x_deq):
    """One launch of ``_norm_quant_kernel`` over x [M, K] with its second input (the gate, the delta or neither):
    ``(h or None, q, s, x_deq, rstd)``, h (``x + delta`` in y_dtype) only with a delta; without ``with_x_deq`` x_deq
    is left unwritten (nothing reads it: int8_linear's fp8 weight gradient)."""
    m, k = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    second = gate if gate is not None else delta
    second = None if second is None else second if second.stride(-1) == 1 else second.contiguous()
    weight = weight.contiguous()
    r, w = norm_quant_launch(k)
    r, w = rows or r, warps or w
    q = int8_rows(m, k, x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    xd = torch.empty((m, k), dtype=out_dtype, device=x.device)
    h = None if delta is None else torch.empty((m, k), dtype=y_dtype, device=x.device)
    n_dtype = torch.promote_types(weight.dtype, y_dtype)
    # torch's mean factor: float(outputs) / float(elements), as fp32 (at.native's mean_kernel_impl); numpy's
    # float32 division rounds as torch's, without two host tensors a call
    inv_k = float(np.float32(max(m, 1)) / np.float32(max(m, 1) * k))
    sb = x.stride(0) if second is None else second.stride(0)
    _norm_quant_kernel[(triton.cdiv(m, r),)](
        x, x if second is None else second, weight, q, s, xd, rstd, xd if h is None else h, m, x.stride(0), sb,
        q.stride(0), xd.stride(0), k if h is None else h.stride(0), eps, inv_k, K=k, BLOCK=triton.next_power_of_2(k),
        R=r, GATE=gate is not None, RESIDUAL=delta is not None, Y_DTYPE=_DTYPES[y_dtype],
        Y_BF16=y_dtype == torch.bfloat16, N_DTYPE=_DTYPES[n_dtype], N_BF16=n_dtype == torch.bfloat16,
        OUT_BF16=out_dtype == torch.bfloat16, DX=math.gcd(x.stride(0), 16), DB=math.gcd(sb, 16),
        HINT=stride_hint([x.stride(0), sb]), STORE_XD=with_x_deq, num_warps=w, enable_fp_fusion=False)
    return h, q, s, xd, rstd


@triton.jit(do_not_specialize=["stride_q"])
def _residual_norm_grad_kernel(gh_ptr, gn_ptr, h_ptr, w_ptr, rstd_ptr, gx_ptr, gd_ptr, wp_ptr, col_ptr, q_ptr, s_ptr,
                               M, stride_gh, stride_gn, stride_h, stride_gx, stride_gd, stride_q, inv_k,
                               K: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr, CHUNK: tl.constexpr,
                               HAS_GH: tl.constexpr, Y_DTYPE: tl.constexpr, Y_BF16: tl.constexpr,
                               GX_BF16: tl.constexpr, GD_BF16: tl.constexpr, ROWS: tl.constexpr, FLOOR: tl.constexpr):
    """CHUNK blocks of R rows of :func:`int8_linear.residual_norm_grad_reference`, each row read once: the norm's
    backward (int8_linear._rms_norm_backward's steps in its order, each rounded to h's dtype Y_DTYPE where torch rounds
    it), plus the stream's own gradient, stored in x's and delta's dtypes, and the norm weight's gradient summed over
    the program's rows into its own row of ``wp``. The mean of ``dh * y`` and the weight's sum are the steps whose order
    differs from torch's reductions (launched without fma contraction, as norm_quant). With ``ROWS``
    (:func:`int8_linear.residual_norm_grad_rows_reference`) delta's gradient is also rounded per token to int8 from the
    same registers, with the column scales of the product that wrote delta (:func:`_quantize_grad_rows_kernel`'s
    arithmetic): its rows into ``q``, their scales into ``s``."""
    c = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + c, mask=c < K, other=0.0).to(tl.float32)
    if ROWS:
        col = tl.load(col_ptr + c, mask=c < K, other=0.0)
    w_acc = tl.zeros([BLOCK], tl.float32)
    for i in range(CHUNK):
        rows = (tl.program_id(0).to(tl.int64) * CHUNK + i) * R + tl.arange(0, R)
        mask = (rows[:, None] < M) & (c[None, :] < K)
        y = tl.load(h_ptr + rows[:, None] * stride_h + c[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gn_ptr + rows[:, None] * stride_gn + c[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)[:, None]
        w_acc += tl.sum(g * _round_to(y * r, Y_DTYPE, Y_BF16), 0)  # _rms_norm_weight_grad's terms
        dh = _round_to(g * w[None, :], Y_DTYPE, Y_BF16)
        mean = _mean_of_sum(tl.sum(dh * y, 1), K, inv_k)[:, None]
        grad = _round_to(dh * r - y * (r * r * r * mean), Y_DTYPE, Y_BF16)
        if HAS_GH:
            grad = _round_to(tl.load(gh_ptr + rows[:, None] * stride_gh + c[None, :], mask=mask,
                                     other=0.0).to(tl.float32) + grad, Y_DTYPE, Y_BF16)
        gx = _round_to(grad, gx_ptr.dtype.element_ty, GX_BF16)
        gd = _round_to(grad, gd_ptr.dtype.element_ty, GD_BF16)
        tl.store(gx_ptr + rows[:, None] * stride_gx + c[None, :], gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gd_ptr + rows[:, None] * stride_gd + c[None, :], gd.to(gd_ptr.dtype.element_ty), mask=mask)
        if ROWS:
            sg = gd * col[None, :]
            s = _grad_row_scale(tl.max(tl.abs(sg), 1), FLOOR)
            tl.store(s_ptr + rows, s, mask=rows < M)
            _store_rounded(q_ptr, _at_8_bytes(stride_q), rows, M, sg, s, K, BLOCK)
    tl.store(wp_ptr + tl.program_id(0) * K + c, w_acc, mask=c < K)


def residual_norm_grad_launch(k: int, with_rows: bool = False) -> tuple[int, int, int]:
    """(rows per block, warps, blocks per program) of :func:`residual_norm_grad` for rows of ``k``, ``with_rows``
    (residual_norm_grad_rows) or not: ``$BITNET_RNG`` as "R,W,C" overrides (measurements), else the fastest launches
    of an H100 sweep (benchmarks/RESULTS.md, session 31; ``int8_kernels.py --residual-grad``). With the rows, one row
    a block up to 1,024 columns (small's 768: 0.169 ms a call against 0.277 at four rows), four up to 1,536 (700m:
    0.353 against 0.362 at two), then norm_quant's rows; 32 blocks a program. Swept again after the kernel held its
    int8 stores to 8 bytes a thread (session 32): the same launches, within 1.5% of the fastest (768 with the rows:
    0.167 ms, four rows 0.18-0.22). Without them, four rows and four blocks a program up to 1,536
    (0.158 and 0.300 ms against 0.176 and 0.308 at 32 blocks), then norm_quant's rows and 32 blocks. Four warps
    throughout: eight were slower at every width, up to 2x with the rows. Wider rows were not measured."""
    override = _launch_override("BITNET_RNG", rows_power_of_two=True, chunk=True)
    if override:
        return override
    if k > 1536:
        return norm_quant_launch(k)[0], 4, 32
    if with_rows:
        return (1 if k <= 1024 else 4), 4, 32
    return 4, 4, 4


def residual_norm_grad(grad_h: torch.Tensor | None, grad_n: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                       rstd: torch.Tensor, x_dtype: torch.dtype, delta_dtype: torch.dtype, rows: int | None = None,
                       warps: int | None = None, chunk: int | None = None,
                       col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``bitnet::residual_norm_grad`` on CUDA (int8_linear.residual_norm_grad_reference's values, the norm weight's
    gradient summed in another order): one pass per row, ``rows`` rows at a time, ``chunk`` such blocks a program,
    on ``warps`` warps (:func:`residual_norm_grad_launch` where not given). With ``col_scale``
    ``bitnet::residual_norm_grad_rows``: also delta's gradient's int8 rows (16-byte aligned) and their scales
    (int8_linear.residual_norm_grad_rows_reference)."""
    m, k = h.shape
    grad_h, grad_n, h = (None if t is None else t if t.stride(-1) == 1 else t.contiguous() for t in (grad_h, grad_n, h))
    r, w, c = residual_norm_grad_launch(k, col_scale is not None)
    r, w, chunk = rows or r, warps or w, chunk or c
    gx = torch.empty((m, k), dtype=x_dtype, device=h.device)
    gd = torch.empty((m, k), dtype=delta_dtype, device=h.device)
    programs = triton.cdiv(m, r * chunk)
    partial = torch.empty((programs, k), dtype=torch.float32, device=h.device)
    inv_k = float(np.float32(max(m, 1)) / np.float32(max(m, 1) * k))  # torch's mean factor, as in _launch_norm_quant
    with_rows = col_scale is not None
    q = int8_rows(m, k, h.device) if with_rows else gd  # gd stands in for the pointers a launch without ROWS ignores
    s = torch.empty((m,), dtype=torch.float32, device=h.device) if with_rows else gd
    _residual_norm_grad_kernel[(programs,)](
        h if grad_h is None else grad_h, grad_n, h, weight.contiguous(), rstd.contiguous(), gx, gd, partial,
        col_scale.float().contiguous() if with_rows else gd, q, s, m,
        0 if grad_h is None else grad_h.stride(0), grad_n.stride(0), h.stride(0), gx.stride(0), gd.stride(0),
        q.stride(0), inv_k, K=k, BLOCK=triton.next_power_of_2(k), R=r, CHUNK=chunk, HAS_GH=grad_h is not None,
        Y_DTYPE=_DTYPES[h.dtype], Y_BF16=h.dtype == torch.bfloat16, GX_BF16=x_dtype == torch.bfloat16,
        GD_BF16=delta_dtype == torch.bfloat16, ROWS=with_rows, FLOOR=GRAD_ABSMAX_FLOOR, num_warps=w,
        enable_fp_fusion=False)
    grads = gx, gd, partial.sum(0).to(weight.dtype)
    return (*grads, q, s) if with_rows else grads


@triton.jit
def _gated_rows(y_ptr, gn_ptr, rstd_ptr, row, M, stride_y, stride_gn, c, cols, F: tl.constexpr):
    """Row ``row``'s gate and up halves of y, its norm-output gradient and its rstd as stored (zeros past M)."""
    mask = _within(cols, row < M)
    return (tl.load(y_ptr + row * stride_y + c, mask=mask, other=0.0),
            tl.load(y_ptr + row * stride_y + F + c, mask=mask, other=0.0),
            tl.load(gn_ptr + row * stride_gn + c, mask=mask, other=0.0),
            tl.load(rstd_ptr + row, mask=row < M, other=0.0))


@triton.jit(do_not_specialize=["stride_q"])
def _gated_norm_grad_kernel(y_ptr, gn_ptr, rstd_ptr, w_ptr, col_ptr, d_ptr, q_ptr, s_ptr, wp_ptr, M, stride_y,
                            stride_gn, stride_d, stride_q, inv_k, F: tl.constexpr, F_PAD: tl.constexpr,
                            BLOCK: tl.constexpr, CHUNK: tl.constexpr, Y_DTYPE: tl.constexpr, Y_BF16: tl.constexpr,
                            D_BF16: tl.constexpr, FLOOR: tl.constexpr):
    """CHUNK rows of :func:`int8_linear.gated_norm_grad_reference`, each read once: relu2 recomputed from the product's
    gate and up halves, the sub-norm's backward (int8_linear._rms_norm_backward's steps, each rounded to y's dtype
    Y_DTYPE where torch rounds it, as _residual_norm_grad_kernel), relu2's backward in the gradients' dtype (d's), the
    gradient rows stored (up's half from column F_PAD) and, from the same registers, rounded per token to int8 with
    the gate/up product's column scales (:func:`_quantize_grad_rows_kernel`'s arithmetic); the norm weight's gradient
    summed over the program's rows into its own row of ``wp``. Launched without fma contraction."""
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    cols = c < F
    w = tl.load(w_ptr + c, mask=cols, other=0.0).to(tl.float32)
    col_g = tl.load(col_ptr + c, mask=cols, other=0.0)
    col_u = tl.load(col_ptr + F + c, mask=cols, other=0.0)
    w_acc = tl.zeros([BLOCK], tl.float32)
    stride_q8 = _at_8_bytes(stride_q)
    first = pid.to(tl.int64) * CHUNK
    # Each row's loads are issued one iteration ahead (held in registers), so that a program keeps two rows' reads in
    # flight: at 4,096 columns a program takes a whole multiprocessor's registers.
    nxt = _gated_rows(y_ptr, gn_ptr, rstd_ptr, first, M, stride_y, stride_gn, c, cols, F)
    for i in range(CHUNK):
        row = first + i
        inside = row < M
        mask = _within(cols, inside)
        g, u, gn, r = nxt
        nxt = _gated_rows(y_ptr, gn_ptr, rstd_ptr, row + 1, tl.minimum(M, first + CHUNK), stride_y, stride_gn, c,
                          cols, F)
        g, u, gn = g.to(tl.float32), u.to(tl.float32), gn.to(tl.float32)
        relu = tl.maximum(g, 0.0)
        rr = _round_to(relu * relu, Y_DTYPE, Y_BF16)
        y = _round_to(rr * u, Y_DTYPE, Y_BF16)
        w_acc += gn * _round_to(y * r, Y_DTYPE, Y_BF16)
        dh = _round_to(gn * w, Y_DTYPE, Y_BF16)
        mean = _mean_of_sum(tl.sum(dh * y, 0), F, inv_k)
        dy = _round_to(dh * r - y * (r * r * r * mean), Y_DTYPE, Y_BF16)
        du = _round_to(dy * rr, d_ptr.dtype.element_ty, D_BF16)
        dg = _round_to(dy * u * 2.0 * relu, d_ptr.dtype.element_ty, D_BF16)
        tl.store(d_ptr + row * stride_d + c, dg.to(d_ptr.dtype.element_ty), mask=mask)
        tl.store(d_ptr + row * stride_d + F_PAD + c, du.to(d_ptr.dtype.element_ty), mask=mask)
        sg = dg * col_g
        su = du * col_u
        amax = tl.maximum(tl.max(tl.abs(sg), 0), tl.max(tl.abs(su), 0))
        s = _grad_row_scale(amax, FLOOR)
        tl.store(s_ptr + row, s, mask=inside)
        qg = _int8_values(sg * s)
        qu = _int8_values(su * s)
        tl.store(q_ptr + row * stride_q8 + c, qg.to(tl.int8), mask=mask)
        tl.store(q_ptr + row * stride_q8 + F + c, qu.to(tl.int8), mask=mask)
    tl.store(wp_ptr + pid * F + c, w_acc, mask=cols)


@triton.jit
def _gated_wide_chunk(y_ptr, gn_ptr, w_ptr, row, M, stride_y, stride_gn, cols, F: tl.constexpr, Y_DTYPE: tl.constexpr,
                      Y_BF16: tl.constexpr):
    """One column chunk of a row for :func:`_gated_norm_grad_wide_kernel`: relu2's fp32 ``relu``, ``rr = relu^2`` and
    ``y = rr * up`` (each rounded as _gated_norm_grad_kernel rounds them), up, the norm-output gradient and
    ``dh = gn * weight`` (zeros past F or M)."""
    mask = _within(cols < F, row < M)
    g = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(y_ptr + row * stride_y + F + cols, mask=mask, other=0.0).to(tl.float32)
    gn = tl.load(gn_ptr + row * stride_gn + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < F, other=0.0).to(tl.float32)
    relu = tl.maximum(g, 0.0)
    rr = _round_to(relu * relu, Y_DTYPE, Y_BF16)
    y = _round_to(rr * u, Y_DTYPE, Y_BF16)
    return relu, rr, y, u, gn, _round_to(gn * w, Y_DTYPE, Y_BF16)


@triton.jit
def _gated_norm_grad_wide_kernel(y_ptr, gn_ptr, rstd_ptr, w_ptr, col_ptr, d_ptr, q_ptr, s_ptr, wp_ptr, M, stride_y,
                                 stride_gn, stride_d, stride_q, inv_k, F: tl.constexpr, F_PAD: tl.constexpr,
                                 BC: tl.constexpr, CHUNK: tl.constexpr, Y_DTYPE: tl.constexpr, Y_BF16: tl.constexpr,
                                 D_BF16: tl.constexpr, FLOOR: tl.constexpr):
    """:func:`_gated_norm_grad_kernel`'s arithmetic for rows too wide to hold in registers (1.3b's 5,460-wide halves:
    10,920 lanes spilled there), each row walked in chunks of BC columns three times: the sum of ``dh * y`` (the
    norm's mean), then the gradients (stored, and the norm weight's partial sum kept in the program's row of ``wp``,
    zeroed first) with the row's absmax of their scaled values, then the int8 rows from the gradients just stored
    (read back, from L2, as stored: the values the rounding of the one-pass kernel reads from registers). A barrier
    between the second and third walks makes the stores of the program's other threads visible."""
    pid = tl.program_id(0)
    c = tl.arange(0, BC)
    for c0 in range(0, F, BC):
        tl.store(wp_ptr + pid * F + c0 + c, tl.zeros([BC], tl.float32), mask=c0 + c < F)
    first = pid.to(tl.int64) * CHUNK
    for i in range(CHUNK):
        row = first + i
        inside = row < M
        r = tl.load(rstd_ptr + row, mask=inside, other=0.0)
        acc = tl.zeros([BC], tl.float32)
        for c0 in range(0, F, BC):
            relu, rr, y, u, gn, dh = _gated_wide_chunk(y_ptr, gn_ptr, w_ptr, row, M, stride_y, stride_gn, c0 + c, F,
                                                       Y_DTYPE, Y_BF16)
            acc += dh * y
        mean = _mean_of_sum(tl.sum(acc, 0), F, inv_k)
        amax = tl.zeros([BC], tl.float32)
        for c0 in range(0, F, BC):
            cols = c0 + c
            mask = _within(cols < F, inside)
            relu, rr, y, u, gn, dh = _gated_wide_chunk(y_ptr, gn_ptr, w_ptr, row, M, stride_y, stride_gn, cols, F,
                                                       Y_DTYPE, Y_BF16)
            wp = wp_ptr + pid * F + cols
            tl.store(wp, tl.load(wp, mask=cols < F, other=0.0) + gn * _round_to(y * r, Y_DTYPE, Y_BF16), mask=cols < F)
            dy = _round_to(dh * r - y * (r * r * r * mean), Y_DTYPE, Y_BF16)
            du = _round_to(dy * rr, d_ptr.dtype.element_ty, D_BF16)
            dg = _round_to(dy * u * 2.0 * relu, d_ptr.dtype.element_ty, D_BF16)
            tl.store(d_ptr + row * stride_d + cols, dg.to(d_ptr.dtype.element_ty), mask=mask)
            tl.store(d_ptr + row * stride_d + F_PAD + cols, du.to(d_ptr.dtype.element_ty), mask=mask)
            col_g = tl.load(col_ptr + cols, mask=cols < F, other=0.0)
            col_u = tl.load(col_ptr + F + cols, mask=cols < F, other=0.0)
            amax = tl.maximum(amax, tl.maximum(tl.abs(dg * col_g), tl.abs(du * col_u)))
        s = _grad_row_scale(tl.max(amax, 0), FLOOR)
        tl.store(s_ptr + row, s, mask=inside)
        tl.debug_barrier()
        for c0 in range(0, F, BC):
            cols = c0 + c
            mask = _within(cols < F, inside)
            dg = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
            du = tl.load(d_ptr + row * stride_d + F_PAD + cols, mask=mask, other=0.0).to(tl.float32)
            qg = _int8_values(dg * tl.load(col_ptr + cols, mask=cols < F, other=0.0) * s)
            qu = _int8_values(du * tl.load(col_ptr + F + cols, mask=cols < F, other=0.0) * s)
            tl.store(q_ptr + row * stride_q + cols, qg.to(tl.int8), mask=mask)
            tl.store(q_ptr + row * stride_q + F + cols, qu.to(tl.int8), mask=mask)


# The column chunk of gated_norm_grad's wide kernel (_gated_norm_grad_wide_kernel): 1.3b's 5,460-wide halves in six;
# not measured on a GPU yet.
GATED_WIDE_COLUMNS = 1024


def gated_norm_grad_launch(f: int) -> tuple[int, int]:
    """(rows per program, warps) of :func:`gated_norm_grad` for halves of width ``f``: ``$BITNET_GNG`` as "R,W"
    overrides (measurements), else 32 rows a program (each program's norm-weight partial sum is one row of
    f fp32s: 1,024 of them at 32,768 tokens) on 4 warps up to 2,048 lanes, then 16. On an H200 at 700m's 4,096
    (benchmarks/RESULTS.md, session 20) 32 rows on 16 warps took 0.521 ms a call, on 8 warps 0.539, on 4 0.900 (their
    registers spill), 16 or 64 rows on 8 warps 0.558 and 0.538."""
    override = _launch_override("BITNET_GNG", rows_power_of_two=False)
    if override:
        return override
    return 32, 4 if triton.next_power_of_2(f) <= 2048 else 16


def gated_norm_grad(y: torch.Tensor, grad_n: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                    col_scale: torch.Tensor, y_dtype: torch.dtype, rows: int | None = None,
                    warps: int | None = None, wide: bool | None = None,
                    columns: int = GATED_WIDE_COLUMNS) -> tuple[torch.Tensor, ...]:
    """``bitnet::gated_norm_grad`` on CUDA (int8_linear.gated_norm_grad_reference's values, the norm weight's
    gradient summed in another order): one pass over each row; ``rows``/``warps``: the launch instead of
    :func:`gated_norm_grad_launch`'s. ``wide`` (default: halves wider than int8_linear.GATED_MAX_WIDTH): the kernel
    that walks each row in chunks of ``columns`` (:func:`_gated_norm_grad_wide_kernel`; 32 rows a program on 4 warps
    unless ``rows``/``warps``/``$BITNET_GNG`` say) instead of holding it in registers."""
    from bitnet_cli.train.int8_linear import GATED_MAX_WIDTH, gated_grad_columns

    m, n = y.shape
    f, f_pad = n // 2, gated_grad_columns(n // 2, y.dtype)
    y, grad_n = (t if t.stride(-1) == 1 else t.contiguous() for t in (y, grad_n))
    wide = f > GATED_MAX_WIDTH if wide is None else wide
    r, w = (_launch_override("BITNET_GNG", rows_power_of_two=False) or (32, 4)) if wide else gated_norm_grad_launch(f)
    r, w = rows or r, warps or w
    d = torch.empty((m, 2 * f_pad), dtype=y.dtype, device=y.device)
    q = int8_rows(m, n, y.device)
    s = torch.empty((m,), dtype=torch.float32, device=y.device)
    programs = triton.cdiv(m, r)
    partial = torch.empty((programs, f), dtype=torch.float32, device=y.device)
    inv_k = float(np.float32(max(m, 1)) / np.float32(max(m, 1) * f))  # torch's mean factor, as in _launch_norm_quant
    kernel, width = ((_gated_norm_grad_wide_kernel, {"BC": columns}) if wide
                     else (_gated_norm_grad_kernel, {"BLOCK": triton.next_power_of_2(f)}))
    kernel[(programs,)](
        y, grad_n, rstd.contiguous(), weight.contiguous(), col_scale.float().contiguous(), d, q, s, partial, m,
        y.stride(0), grad_n.stride(0), d.stride(0), q.stride(0), inv_k, F=f, F_PAD=f_pad, **width, CHUNK=r,
        Y_DTYPE=_DTYPES[y_dtype], Y_BF16=y_dtype == torch.bfloat16, D_BF16=y.dtype == torch.bfloat16,
        FLOOR=GRAD_ABSMAX_FLOOR, num_warps=w, enable_fp_fusion=False)
    return d, q, s, partial.sum(0).to(weight.dtype)


@triton.jit
def _rope_grad_heads(g_ptr, stride_b, stride_h, stride_t, stride_d, b, t, inside, heads, c, cos_lo, cos_hi, sin_lo,
                     sin_hi, N_HEADS: tl.constexpr, HALF: tl.constexpr, ROTATE: tl.constexpr, DTYPE: tl.constexpr,
                     BF16: tl.constexpr):
    """Token (b, t)'s gradient of N_HEADS heads as two halves [heads, c] of fp32 (zeros past the heads, HALF or the
    rows), each head's columns :HALF and HALF:; with ``ROTATE`` through RoPE's backward first
    (int8_linear.rope_backward_reference: each product rounded to DTYPE, then their sum), else rounded to DTYPE."""
    mask = _within((heads < N_HEADS) & (c < HALF), inside)
    ptr = g_ptr + b * stride_b + heads * stride_h + t * stride_t + c * stride_d
    lo = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(ptr + HALF * stride_d, mask=mask, other=0.0).to(tl.float32)
    if ROTATE:
        grad_lo = _round_to(_round_to(lo * cos_lo, DTYPE, BF16) + _round_to(hi * sin_hi, DTYPE, BF16), DTYPE, BF16)
        grad_hi = _round_to(_round_to(hi * cos_hi, DTYPE, BF16) - _round_to(lo * sin_lo, DTYPE, BF16), DTYPE, BF16)
        return grad_lo, grad_hi
    else:
        return _round_to(lo, DTYPE, BF16), _round_to(hi, DTYPE, BF16)


@triton.jit
def _rope_grad_rows_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, col_ptr, d_ptr, q_ptr, s_ptr, M, T,
                           sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, stride_cos,
                           stride_sin, stride_d, stride_q, H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr,
                           BH: tl.constexpr, BKV: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr,
                           DTYPE: tl.constexpr, BF16: tl.constexpr, FLOOR: tl.constexpr):
    """CHUNK tokens of :func:`int8_linear.rope_grad_rows_reference`, each token's q, k and v gradients (SDPA's, heads
    [B, H or KV, T, D] at any strides) read once: q's and k's through RoPE's backward, their rows stored in the
    product's column order (q's heads, then k's), and from the same registers all three rounded per token to int8
    with the q/k/v product's column scales (:func:`_quantize_grad_rows_kernel`'s arithmetic). Launched without fma
    contraction (a product and the sum after it stay two roundings)."""
    D: tl.constexpr = 2 * HALF
    c = tl.arange(0, BD)[None, :]
    hq = tl.arange(0, BH)[:, None]
    hk = tl.arange(0, BKV)[:, None]
    # the columns of the product's output (and of its scales and int8 rows): q's heads, k's, v's
    cq, ck, cv = hq * D + c, H * D + hk * D + c, (H + KV) * D + hk * D + c
    mq, mk = (hq < H) & (c < HALF), (hk < KV) & (c < HALF)
    col_q = (tl.load(col_ptr + cq, mask=mq, other=0.0), tl.load(col_ptr + cq + HALF, mask=mq, other=0.0))
    col_k = (tl.load(col_ptr + ck, mask=mk, other=0.0), tl.load(col_ptr + ck + HALF, mask=mk, other=0.0))
    col_v = (tl.load(col_ptr + cv, mask=mk, other=0.0), tl.load(col_ptr + cv + HALF, mask=mk, other=0.0))
    first = tl.program_id(0).to(tl.int64) * CHUNK
    for i in range(CHUNK):
        row = first + i
        inside = row < M
        b, t = row // T, row % T
        half = _within(c < HALF, inside)
        in_q, in_k = _within(mq, inside), _within(mk, inside)
        cos_lo = tl.load(cos_ptr + t * stride_cos + c, mask=half, other=0.0).to(tl.float32)
        cos_hi = tl.load(cos_ptr + t * stride_cos + HALF + c, mask=half, other=0.0).to(tl.float32)
        sin_lo = tl.load(sin_ptr + t * stride_sin + c, mask=half, other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_ptr + t * stride_sin + HALF + c, mask=half, other=0.0).to(tl.float32)
        q_lo, q_hi = _rope_grad_heads(dq_ptr, sq_b, sq_h, sq_t, sq_d, b, t, inside, hq, c, cos_lo, cos_hi, sin_lo,
                                      sin_hi, H, HALF, True, DTYPE, BF16)
        k_lo, k_hi = _rope_grad_heads(dk_ptr, sk_b, sk_h, sk_t, sk_d, b, t, inside, hk, c, cos_lo, cos_hi, sin_lo,
                                      sin_hi, KV, HALF, True, DTYPE, BF16)
        v_lo, v_hi = _rope_grad_heads(dv_ptr, sv_b, sv_h, sv_t, sv_d, b, t, inside, hk, c, cos_lo, cos_hi, sin_lo,
                                      sin_hi, KV, HALF, False, DTYPE, BF16)
        out = d_ptr + row * stride_d
        tl.store(out + cq, q_lo.to(d_ptr.dtype.element_ty), mask=in_q)
        tl.store(out + cq + HALF, q_hi.to(d_ptr.dtype.element_ty), mask=in_q)
        tl.store(out + ck, k_lo.to(d_ptr.dtype.element_ty), mask=in_k)
        tl.store(out + ck + HALF, k_hi.to(d_ptr.dtype.element_ty), mask=in_k)
        sq = (q_lo * col_q[0], q_hi * col_q[1])
        sk = (k_lo * col_k[0], k_hi * col_k[1])
        sv = (v_lo * col_v[0], v_hi * col_v[1])
        amax = tl.maximum(tl.maximum(tl.max(tl.max(tl.abs(sq[0]), 1), 0), tl.max(tl.max(tl.abs(sq[1]), 1), 0)),
                          tl.maximum(tl.max(tl.max(tl.abs(sk[0]), 1), 0), tl.max(tl.max(tl.abs(sk[1]), 1), 0)))
        amax = tl.maximum(amax, tl.maximum(tl.max(tl.max(tl.abs(sv[0]), 1), 0), tl.max(tl.max(tl.abs(sv[1]), 1), 0)))
        s = _grad_row_scale(amax, FLOOR)
        tl.store(s_ptr + row, s, mask=inside)
        rows = q_ptr + row * stride_q
        tl.store(rows + cq, _int8_values(sq[0] * s).to(tl.int8), mask=in_q)
        tl.store(rows + cq + HALF, _int8_values(sq[1] * s).to(tl.int8), mask=in_q)
        tl.store(rows + ck, _int8_values(sk[0] * s).to(tl.int8), mask=in_k)
        tl.store(rows + ck + HALF, _int8_values(sk[1] * s).to(tl.int8), mask=in_k)
        tl.store(rows + cv, _int8_values(sv[0] * s).to(tl.int8), mask=in_k)
        tl.store(rows + cv + HALF, _int8_values(sv[1] * s).to(tl.int8), mask=in_k)


def rope_grad_rows_launch() -> tuple[int, int]:
    """(tokens per program, warps) of :func:`rope_grad_rows`: ``$BITNET_RGR`` as "R,W" overrides (measurements), else
    one token a program on 4 warps, the fastest launch at every model measured: on an H100 (benchmarks/RESULTS.md,
    session 32) 0.133 ms a call at small's 12 heads x 64 (0.177 on 8 warps, 0.163-0.198 with 2-8 tokens a program),
    0.278 at 700m's 16 x 96 (0.287) and 0.327 at 1.3b's 32 x 64 (0.357), at 32,768 tokens."""
    return _launch_override("BITNET_RGR", rows_power_of_two=False) or (1, 4)


def rope_grad_rows(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   col_scale: torch.Tensor, dtype: torch.dtype, rows: int | None = None,
                   warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bitnet::rope_grad_rows`` on CUDA (int8_linear.rope_grad_rows_reference's values): one pass over each token's
    q, k and v gradients, whatever their strides; ``rows``/``warps``: the launch instead of
    :func:`rope_grad_rows_launch`'s."""
    b, h, t, d = dq.shape
    kv, half = dk.shape[1], d // 2
    assert cos.shape == sin.shape == (t, d), "RoPE's tables: one row per position (model.rope_cos_sin)"
    r, w = rope_grad_rows_launch()
    r, w = rows or r, warps or w
    m = b * t
    cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (cos, sin))  # the kernel reads their rows whole
    out = torch.empty((m, (h + kv) * d), dtype=dtype, device=dq.device)
    q = int8_rows(m, (h + 2 * kv) * d, dq.device)
    s = torch.empty((m,), dtype=torch.float32, device=dq.device)
    _rope_grad_rows_kernel[(triton.cdiv(m, r),)](
        dq, dk, dv, cos, sin, col_scale.float().contiguous(), out, q, s, m, t, *dq.stride(), *dk.stride(),
        *dv.stride(), cos.stride(0), sin.stride(0), out.stride(0), q.stride(0), H=h, KV=kv, HALF=half,
        BH=triton.next_power_of_2(h), BKV=triton.next_power_of_2(kv), BD=triton.next_power_of_2(half), CHUNK=r,
        DTYPE=_DTYPES[dtype], BF16=dtype == torch.bfloat16, FLOOR=GRAD_ABSMAX_FLOOR, num_warps=w,
        enable_fp_fusion=False)
    return out, q, s
