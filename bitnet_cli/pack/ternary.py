"""Ternary weights: absmean ternarisation, our packed layouts and transformers' 2-bit one.

The arithmetic copies transformers' `WeightQuant` in fp32 so that a checkpoint packed here
and the same checkpoint run by `BitNetForCausalLM` see identical ternary weights.

Our layouts (docs/FORMAT.md, kernels/bitnet.h), one entry each in :data:`LAYOUTS`:
- `i2_k128` (`--layout i2`): four 2-bit codes a byte, 2 bits per weight.
- `tq1_k640` (`--layout tq1`): five trits a byte as a base-3 fixed-point fraction, 1.6 bits per
  weight for every whole 640 inputs, the rest of the row (a multiple of 128) as i2_k128 blocks.
Both hold the same trits exactly, so a model computes the same logits in either: the choice is
bytes (tq1) against decoding work (i2), which `bitnet bench --layout` measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from bitnet_cli import kernels  # kernels.BLOCK_K (i2_k128 block inputs), TQ1_BLOCK_K / TQ1_BLOCK_BYTES (bitnet.h)
from bitnet_cli.errors import BitnetError


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


# ------------------------------------------------------------------------------ tq1_k640

_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.int32)  # code i of a byte is the digit of weight 3^(4-i)


def pack_tq1_k640(trits: np.ndarray) -> np.ndarray:
    """int8 trits [N, K] -> uint8 [N, row bytes] in layout `tq1_k640` (docs/FORMAT.md).

    K is padded with zero trits to Kp = ceil(K / 128) * 128 (as for i2_k128). Each whole 640 inputs
    are 128 bytes: byte j holds the codes q = T + 1 of inputs j, 128+j, ..., 512+j as
    v = 81 q0 + 27 q1 + 9 q2 + 3 q3 + q4, stored as ceil(v * 256 / 243); the rest of the row is
    i2_k128 blocks.
    """
    n, k = trits.shape
    kp = padded_k(k)
    big, tail = kp // kernels.TQ1_BLOCK_K * kernels.TQ1_BLOCK_K, kp % kernels.TQ1_BLOCK_K
    codes = np.ones((n, kp), dtype=np.int32)
    codes[:, :k] = trits + 1
    v = (codes[:, :big].reshape(n, -1, 5, kernels.TQ1_BLOCK_BYTES) * _POW3.reshape(1, 1, 5, 1)).sum(axis=2)
    packed = ((v * 256 + 242) // 243).astype(np.uint8).reshape(n, -1)
    return np.concatenate([packed, pack_i2_k128((codes[:, big:] - 1).astype(np.int8))], axis=1) if tail else packed


def unpack_tq1_k640(packed: np.ndarray, k: int) -> np.ndarray:
    """uint8 [N, row bytes] in layout `tq1_k640` -> int8 trits [N, K] (the padding dropped)."""
    n = packed.shape[0]
    kp = padded_k(k)
    big = kp // kernels.TQ1_BLOCK_K
    nbytes = big * kernels.TQ1_BLOCK_BYTES
    b = packed[:, :nbytes].reshape(n, big, 1, kernels.TQ1_BLOCK_BYTES).astype(np.uint32)
    m = (b * np.array([1, 3, 9, 27, 81], dtype=np.uint32).reshape(1, 1, 5, 1)) & 255  # the byte times 3^i, mod 256
    codes = ((m * 3) >> 8).reshape(n, -1).astype(np.int8)  # code i: the top of 3 m
    tail = unpack_i2_k128(packed[:, nbytes:], kp - big * kernels.TQ1_BLOCK_K) if kp > big * kernels.TQ1_BLOCK_K \
        else np.zeros((n, 0), np.int8)
    return np.concatenate([codes - 1, tail], axis=1)[:, :k]


@dataclass(frozen=True)
class TernaryLayout:
    """One ternary weight layout: its ids, the C enum, and the numpy packer/unpacker."""

    name: str  # the packed file's `layout` metadata
    option: str  # its --layout choice
    c_enum: str  # its BN_LAYOUT_* constant in kernels/bitnet.h
    pack: Callable[[np.ndarray], np.ndarray]  # int8 trits [N, K] -> uint8 [N, row_bytes(K)]
    unpack: Callable[[np.ndarray, int], np.ndarray]  # (packed rows, K) -> int8 trits [N, K]

    def row_bytes(self, k: int) -> int:
        """Bytes of one packed row of k inputs (kernels/ternary.c's bn_ternary_row_bytes)."""
        ffi, lib = kernels.lib()
        return int(lib.bn_ternary_row_bytes(getattr(lib, self.c_enum), padded_k(k)))


LAYOUTS: dict[str, TernaryLayout] = {t.option: t for t in (
    TernaryLayout("i2_k128", "i2", "BN_LAYOUT_I2", pack_i2_k128, unpack_i2_k128),
    TernaryLayout("tq1_k640", "tq1", "BN_LAYOUT_TQ1", pack_tq1_k640, unpack_tq1_k640),
)}


def layout(option: str, param: str | None = None) -> TernaryLayout:
    """The layout of --layout `option` ("i2" or "tq1"); a BitnetError naming the choices if unknown."""
    if option not in LAYOUTS:
        raise BitnetError(f"{param or 'layout'} must be one of {', '.join(LAYOUTS)}, got {option!r}", param=param)
    return LAYOUTS[option]


def layout_named(name: str) -> TernaryLayout | None:
    """The layout whose packed-file id is `name` ("i2_k128", "tq1_k640"), or None."""
    return next((t for t in LAYOUTS.values() if t.name == name), None)
