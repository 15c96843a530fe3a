"""Ternary weights: absmean ternarisation and the 2-bit layouts (ours and transformers').

The arithmetic copies transformers' `WeightQuant` in fp32 so that a checkpoint packed here
and the same checkpoint run by `BitNetForCausalLM` see identical ternary weights.
"""

from __future__ import annotations

import numpy as np

from bitnet_cli import kernels  # kernels.BLOCK_K: inputs per i2_k128 block (32 bytes, four 2-bit codes a byte)


def ternarize(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """W (float32 [N, K]) -> (trits int8 in {-1, 0, 1}, gamma float32) with W ~= trits * gamma.

    transformers: s = 1 / clamp(mean|W|, 1e-5); T = clamp(round(W * s), -1, 1); W~ = T / s.
    We return gamma = fp32(1 / s), so that T * gamma is bit-identical to transformers' T / s.
    The mean is accumulated in float64 (the correctly rounded fp32 mean, which torch's
    fp32 reduction approximates to the last bit on all but pathological inputs).
    """
    w = np.asarray(w, dtype=np.float32)
    mean = np.float32(max(np.abs(w).mean(dtype=np.float64), 1e-5))
    s = np.float32(1.0) / mean
    trits = np.multiply(w, s, dtype=np.float32)
    np.round(trits, out=trits)  # round half to even, like torch.round
    np.clip(trits, -1, 1, out=trits)
    return trits.astype(np.int8), np.float32(np.float32(1.0) / s)


def padded_k(k: int) -> int:
    return -(-k // kernels.BLOCK_K) * kernels.BLOCK_K


def pack_i2_k128(trits: np.ndarray) -> np.ndarray:
    """int8 trits [N, K] -> uint8 [N, Kp/4] in layout `i2_k128` (docs/FORMAT.md).

    K is padded with zero trits (code 1) up to a multiple of 128; never truncated.
    """
    n, k = trits.shape
    kp = padded_k(k)
    codes = np.ones((n, kp), dtype=np.uint8)
    codes[:, :k] = trits + 1
    c = codes.reshape(n, kp // kernels.BLOCK_K, 4, 32)
    packed = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return packed.reshape(n, kp // 4)


def unpack_i2_k128(packed: np.ndarray, k: int) -> np.ndarray:
    """uint8 [N, Kp/4] in layout `i2_k128` -> int8 trits [N, K] (the padding dropped)."""
    n, kq = packed.shape
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = (packed.reshape(n, kq // 32, 1, 32) >> shifts) & 3
    return codes.reshape(n, kq * 4)[:, :k].astype(np.int8) - 1


def unpack_hf_packed(packed: np.ndarray, n: int) -> np.ndarray:
    """transformers' packed BitNet weight (uint8 [ceil(N/4), K]) -> int8 trits [N, K].

    transformers packs along the output dimension in four contiguous chunks of R = ceil(N/4)
    rows: bits 2i..2i+1 of stored row r hold output row i*R + r, as code T + 1.
    Raises ValueError when a code is 3 (not a ternary value).
    """
    r, k = packed.shape
    codes = np.empty((4 * r, k), dtype=np.uint8)
    for i in range(4):
        codes[i * r : (i + 1) * r] = (packed >> (2 * i)) & 3
    codes = codes[:n]
    if (codes == 3).any():
        row, col = np.argwhere(codes == 3)[0]
        raise ValueError(f"2-bit code 3 (not a ternary value) at row {row}, column {col}")
    return codes.astype(np.int8) - 1
