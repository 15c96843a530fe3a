"""The C kernels: every SIMD path against the scalar reference and numpy, bit for bit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bitnet_cli import kernels
from bitnet_cli.pack.ternary import pack_i2_k128, pack_tq1_k640

REPO = Path(__file__).resolve().parents[1]
ISAS = kernels.available_isas()
SHAPES = [(1, 1, 1), (1, 7, 100), (3, 5, 128), (4, 33, 129), (5, 64, 255), (8, 13, 384), (9, 40, 1000),
          (2, 31, 2560), (64, 6, 200)]  # (tokens m, rows n, inputs k): ragged rows, tokens and k tails


def numpy_quantize(x):
    s = np.float32(127) / np.maximum(np.abs(x).max(axis=1, keepdims=True), np.float32(1e-5))
    return np.clip(np.round(x * s), -128, 127).astype(np.int8), s[:, 0]


def test_scalar_is_always_available():
    assert "scalar" in ISAS
    assert kernels.best_isa() in ISAS


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_quantize_matches_torch_arithmetic(m, n, k):
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 10)).astype(np.float32)
    x[0, : min(k, 4)] = [0.5, -0.5, 1.5, 2.5][: min(k, 4)]  # halfway cases after scaling are rare; still try
    xq, scale, xsum = kernels.quantize(x)
    want, want_scale = numpy_quantize(x)
    assert xq.shape == (m, -(-k // 128) * 128)
    np.testing.assert_array_equal(xq[:, :k], want)
    assert not xq[:, k:].any()
    np.testing.assert_array_equal(scale, want_scale)
    np.testing.assert_array_equal(xsum, want.sum(axis=1, dtype=np.int32))


def test_quantize_all_zero_row_uses_the_clamp():
    xq, scale, xsum = kernels.quantize(np.zeros((1, 5), np.float32))
    assert scale[0] == np.float32(127) / np.float32(1e-5) and not xq.any() and xsum[0] == 0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_exact_on_every_isa(isa, m, n, k):
    rng = np.random.default_rng(1000 * m + n + k)
    trits = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
    w = pack_i2_k128(trits)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[-1, 0] = 100.0  # one outlier: most of that token's activations quantise to small values
    xq, _, xsum = kernels.quantize(x)
    want = xq[:, :k].astype(np.int64) @ trits.T.astype(np.int64)
    got = kernels.gemm(w, xq, xsum, isa=isa)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, kernels.gemm(w, xq, xsum, isa="scalar"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k", [(1, 640), (1, 2560), (1, 6912), (3, 1100), (6, 6912), (5, 200)])
def test_tq1_gemm_equals_i2_on_every_isa(isa, m, k):
    """tq1_k640 (five trits a byte, then i2_k128 blocks for the rest of the row): the same integer
    sums as the 2-bit layout on every ISA, the decode GEMV (m = 1) and the token tiles alike."""
    rng = np.random.default_rng(k + m)
    trits = rng.integers(-1, 2, size=(13, k), dtype=np.int8)
    xq, _, xsum = kernels.quantize(rng.standard_normal((m, k)).astype(np.float32))
    want = kernels.gemm(pack_i2_k128(trits), xq, xsum, isa="scalar")
    np.testing.assert_array_equal(kernels.gemm(pack_tq1_k640(trits), xq, xsum, isa=isa, layout="tq1"), want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("embeddings", ["int8", "q4", "q6"])
def test_integer_heads_equal_scalar_on_every_isa(isa, embeddings):
    """The integer output heads (bn_head_logits) on a ragged row count and 1..6 tokens (the decode
    row path and the multi-token tiles): every ISA's logits are the scalar path's bit for bit."""
    from bitnet_cli.pack.embeddings import EMBEDDING_TYPES, encode

    ffi, lib = kernels.lib()
    rng = np.random.default_rng(7)
    vocab, hidden = 37, 700
    stored = encode(rng.standard_normal((vocab, hidden)).astype(np.float32) * 0.05, embeddings)
    scale = ffi.from_buffer("float[]", stored[1]) if len(stored) > 1 else ffi.NULL
    for m in range(1, 7):
        h = rng.standard_normal((m, hidden)).astype(np.float32)
        y = {}
        for name in ("scalar", isa):
            y[name] = np.empty((m, vocab), np.float32)
            assert lib.bn_head_logits(ffi.NULL, kernels.ISAS[name], getattr(lib, EMBEDDING_TYPES[embeddings].c_enum),
                                      ffi.from_buffer(stored[0]), scale, vocab, hidden, ffi.from_buffer("float[]", h),
                                      m, ffi.from_buffer("float[]", y[name])) == 0
        np.testing.assert_array_equal(y[isa], y["scalar"])


@pytest.mark.parametrize("isa", ISAS)
def test_gemm_extremes_do_not_overflow(isa):
    """All-(-128) activations against all-(+1) and all-(-1) rows: the largest sums the kernels see."""
    k = 6912
    trits = np.stack([np.ones(k, np.int8), -np.ones(k, np.int8), np.zeros(k, np.int8)])
    xq = np.full((2, k), -128, np.int8)
    xq[1] = 127
    for layout, pack in (("i2", pack_i2_k128), ("tq1", pack_tq1_k640)):
        acc = kernels.gemm(pack(trits), xq, xq.sum(axis=1, dtype=np.int32), isa=isa, layout=layout)
        np.testing.assert_array_equal(acc, [[-128 * k, 128 * k, 0], [127 * k, -127 * k, 0]])


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_gemm_thread_pool_splits_rows_exactly(threads):
    rng = np.random.default_rng(threads)
    trits = rng.integers(-1, 2, size=(37, 300), dtype=np.int8)
    xq, _, xsum = kernels.quantize(rng.standard_normal((5, 300)).astype(np.float32))
    with kernels.ThreadPool(threads) as pool:
        for _ in range(3):  # the pool is reused across calls
            got = kernels.gemm(pack_i2_k128(trits), xq, xsum, pool=pool)
            np.testing.assert_array_equal(got, xq[:, :300].astype(np.int64) @ trits.T)


def test_stream_read_reads_everything():
    buf = np.arange(1 << 16, dtype=np.uint64)
    with kernels.ThreadPool(2) as pool:
        assert kernels.stream_read(buf, pool) == int(buf.sum())
    assert kernels.stream_read(buf) == int(buf.sum())


def test_isa_env_var_is_validated(monkeypatch):
    monkeypatch.setenv("BITNET_ISA", "mmx")
    with pytest.raises(kernels.BitnetError, match=r"unknown instruction set 'mmx' \(\$BITNET_ISA\)"):
        kernels.resolve_isa()
    monkeypatch.setenv("BITNET_ISA", "scalar")
    assert kernels.resolve_isa() == 0


def test_isa_names_are_the_c_enum():
    """kernels.ISAS names every BN_ISA_* of kernels/bitnet.h once (a new ISA in C needs its name here)."""
    _, L = kernels.lib()
    assert sorted(kernels.ISAS.values()) == list(range(L.BN_ISA_COUNT))


@pytest.mark.skipif(not shutil.which("make") or not shutil.which("gcc") or "avx2" not in ISAS,
                    reason="needs make, gcc and an AVX2 CPU")
def test_avxvnni_kernels_against_scalar_with_the_instruction_emulated(tmp_path):
    """The AVX-VNNI GEMM (kernels/ternary.c) on a CPU without AVX-VNNI (and qemu 7.2 has none): kernels/test_kernels.c
    built with vpdpbusd emulated on AVX2 (-DBN_EMULATE_AVXVNNI), so ISA 7 runs every ISA test against the scalar
    reference; the emulation is itself checked against vpdpbusd's definition there (test_dpbusd_avxvnni)."""
    r = subprocess.run(["make", "-C", str(REPO / "kernels"), "test-avxvnni", f"BUILD={tmp_path}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " 7" in r.stdout.split("isas:")[1].splitlines()[0] and "all kernel tests passed" in r.stdout


@pytest.mark.skipif(not shutil.which("make") or not shutil.which("gcc"), reason="needs make and gcc")
def test_sanitizer_build_of_the_c_tests(tmp_path):
    """kernels/test_kernels.c (all ISAs vs scalar, thread pool, a tiny decoder) under ASan + UBSan."""
    probe = subprocess.run(["gcc", "-fsanitize=address,undefined", "-x", "c", "-", "-o", str(tmp_path / "p")],
                           input="int main(void){return 0;}", capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"the compiler cannot build sanitized binaries: {probe.stderr[-200:]}")
    r = subprocess.run(["make", "-C", str(REPO / "kernels"), "sanitize", f"BUILD={tmp_path}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "all kernel tests passed" in r.stdout
