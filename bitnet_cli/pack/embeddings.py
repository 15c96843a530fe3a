"""Storage types of the embedding and output-head rows (docs/FORMAT.md, kernels/bitnet.h).

The tied embedding is also the output head, which every decoded token streams in full: on the
2B4T shape it is 657 MB in f16, more than the 521 MB of ternary weights. So its storage type
is the biggest lever on decode speed, and each type trades bytes for accuracy:

- f16:  the values rounded to float16 (16 bits per weight).
- int8: q = round(w * 127 / max|row|), one fp32 scale max|row| / 127 per row (8 bits + a scale).
- q4:   4.25 bits per weight. A row is padded to whole 64-input blocks (bitnet.h's
        bn_q4_block: two 8-bit sub-scales, then 32 bytes of nibbles); every 32 inputs get a step
        d * sub with one fp32 d per row, and q = round(w / (d * sub)) in [-8, 7] is stored as
        q + 8. Because sub is an integer, the head's dot stays exact in int32 (bitnet.h).

Each type is one entry of :data:`EMBEDDING_TYPES` (its traits: the C enum it maps to, the
tensors it is stored as, encode/decode); the C side has the matching entry in kernels/head.c's
traits table. `encode` turns float rows into the stored arrays; `decode` is its inverse up to
rounding and is what the numpy reference forward and the C engine's embedding lookup both compute.
Adding a type: one `EmbeddingType` here, one `bn_head_traits` entry (and its row kernels) in C.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bitnet_cli.errors import BitnetError
from bitnet_cli import kernels  # kernels.Q4_BLOCK_K, Q4_BLOCK_BYTES, Q6_BLOCK_K, Q6_BLOCK_BYTES: bitnet.h's blocks
from bitnet_cli.gguf import quants
F32 = np.float32
DTYPE_BYTES = {"F16": 2, "I8": 1, "U8": 1, "F32": 4}  # safetensors dtypes used by the stored tensors


@dataclass(frozen=True)
class EmbeddingType:
    """The traits of one storage type of embedding / output-head rows."""

    name: str  # as in the packed file's `embeddings` metadata and --embeddings
    c_enum: str  # its BN_EMB_* constant in kernels/bitnet.h
    c_values: str  # cffi element type of the values tensor, for the C model's pointer
    # (name suffix, safetensors dtype, shape) of each stored tensor for (vocab, hidden): values first
    stored: Callable[[int, int], list[tuple[str, str, tuple[int, ...]]]]
    encode: Callable[[np.ndarray], list[np.ndarray]]  # float32 rows [R, hidden] -> the stored arrays
    decode: Callable[[list[np.ndarray], int], np.ndarray]  # stored arrays of R rows, hidden -> float32 [R, hidden]
    # GGUF tensor types whose rows become the stored arrays without loss: type name -> (raw rows
    # uint8 [R, row bytes], hidden) -> the stored arrays (a GGUF import uses these, not decode+encode)
    transcode: dict[str, Callable[[np.ndarray, int], list[np.ndarray]]] = field(default_factory=dict)
    # values tensor (as stored) -> what makes it unusable (a sentence), or None: a check on load for what
    # the kernels cannot survive, for types whose values hold their own float scales
    check: Callable[[np.ndarray], str | None] | None = None

    @property
    def suffixes(self) -> list[str]:
        """Name suffixes of the stored tensors ("" for the values, then scales)."""
        return [suffix for suffix, _, _ in self.stored(0, 0)]

    def row_bytes(self, hidden: int) -> int:
        """Bytes one row streams (values and scales): what the head reads per row per decoded token."""
        return sum(_prod(shape[1:]) * DTYPE_BYTES[dtype] for _, dtype, shape in self.stored(1, hidden))

    def bits_per_weight(self, hidden: int) -> float:
        return 8 * self.row_bytes(hidden) / hidden


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def q4_padded(hidden: int) -> int:
    return -(-hidden // kernels.Q4_BLOCK_K) * kernels.Q4_BLOCK_K


def _encode_int8(rows: np.ndarray) -> list[np.ndarray]:
    absmax = np.abs(rows).max(axis=1)
    inv = np.divide(F32(127), absmax, out=np.zeros_like(absmax), where=absmax > 0)
    return [np.clip(np.round(rows * inv[:, None]), -127, 127).astype(np.int8), (absmax / F32(127)).astype(F32)]


def _decode_q4(stored: list[np.ndarray], hidden: int) -> np.ndarray:
    blocks, scale = stored
    r = blocks.shape[0]
    b = blocks.reshape(r, -1, kernels.Q4_BLOCK_BYTES)
    sub, nib = b[:, :, :2].astype(np.int32), b[:, :, 2:]
    q = np.concatenate([nib & 15, nib >> 4], axis=2).astype(np.int32) - 8  # [R, blocks, 64]
    stepped = q * np.repeat(sub, 32, axis=2)  # sub * q: integers, as the C lookup computes them
    return stepped.reshape(r, -1)[:, :hidden].astype(F32) * scale[:, None]


def _encode_q4(rows: np.ndarray, slice_rows: int = 2048) -> list[np.ndarray]:
    parts = [_encode_q4_rows(rows[i : i + slice_rows]) for i in range(0, max(len(rows), 1), slice_rows)]
    return [np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])]


def _q4_codes(halves: np.ndarray, step: np.ndarray) -> np.ndarray:
    """q = clamp(round(w / step), -8, 7) per half-block (0 where the step is 0)."""
    q = np.divide(halves, step[:, :, None], out=np.zeros_like(halves), where=step[:, :, None] > 0)
    return np.clip(np.round(q), -8, 7)


def _encode_q4_rows(rows: np.ndarray) -> list[np.ndarray]:
    r, hidden = rows.shape
    w = np.zeros((r, q4_padded(hidden)), dtype=F32)
    w[:, :hidden] = rows
    halves = w.reshape(r, -1, 32)  # [R, half-blocks, 32]
    # the smallest step that fits a half-block into [-8, 7] (its most negative value may use -8)
    fit = np.maximum(halves.max(axis=2) / F32(7), -halves.min(axis=2) / F32(8)).clip(min=0).astype(F32)
    d = (fit.max(axis=1) / F32(255)).astype(F32)  # the row scale: the largest step is sub = 255
    ratio = np.divide(fit, d[:, None], out=np.zeros_like(fit), where=d[:, None] > 0)
    # sub = ceil(fit / d) clips nothing; a step 5-20% smaller, clipping the extreme value or two,
    # often has a smaller squared error: keep the best of a few candidates per half-block
    best_sub, best_err = None, None
    for shrink in (1.0, 0.95, 0.9, 0.85, 0.8):
        sub = np.clip(np.ceil(ratio * F32(shrink)), 1, 255) * (ratio > 0)
        step = (sub * d[:, None]).astype(F32)
        err = np.square(halves - _q4_codes(halves, step) * step[:, :, None]).sum(axis=2)
        if best_sub is None:
            best_sub, best_err = sub, err
        else:
            better = err < best_err
            best_sub, best_err = np.where(better, sub, best_sub), np.where(better, err, best_err)
    q = _q4_codes(halves, (best_sub * d[:, None]).astype(F32)).astype(np.int32)
    codes = (q + 8).astype(np.uint8).reshape(r, -1, 2, 32)  # [R, blocks, half, 32]
    nib = codes[:, :, 0, :] | (codes[:, :, 1, :] << 4)
    blocks = np.concatenate([best_sub.astype(np.uint8).reshape(r, -1, 2), nib], axis=2)
    return [np.ascontiguousarray(blocks.reshape(r, -1)), d]


def q6_padded(hidden: int) -> int:
    return -(-hidden // kernels.Q6_BLOCK_K) * kernels.Q6_BLOCK_K


_Q6_NIBBLE_SHIFTS = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
_Q6_HIGH_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def _q6_blocks(codes: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Codes u = q + 32 (uint8 [B, 256]), int8 scales [B, 16], f16 d bits (uint16 [B]) -> bn_q6_block bytes [B, 210]."""
    b = codes.shape[0]
    nib = (codes & 15).reshape(b, 4, 2, 32)  # [B, 64-input group, half, 32]
    lo = nib[:, :, 0] | nib[:, :, 1] << 4
    high = (codes >> 4).reshape(b, 2, 4, 32)  # [B, 128-input group, field, 32]
    hi = high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6
    return np.concatenate([lo.reshape(b, 128), hi.reshape(b, 64), scales.view(np.uint8).reshape(b, 16),
                           np.ascontiguousarray(d, dtype=np.uint16).view(np.uint8).reshape(b, 2)], axis=1)


def q6_fields(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bn_q6_block bytes [B, 210] -> (codes uint8 [B, 256], int8 scales [B, 16], f16 d bits uint16 [B])."""
    b = blocks.reshape(-1, kernels.Q6_BLOCK_BYTES)
    nib = (b[:, :128].reshape(-1, 4, 1, 32) >> _Q6_NIBBLE_SHIFTS) & 15
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> _Q6_HIGH_SHIFTS) & 3
    codes = nib.reshape(-1, 256) | high.reshape(-1, 256) << 4
    return codes, b[:, 192:208].copy().view(np.int8), _q6_d(b)


def _q6_d(blocks: np.ndarray) -> np.ndarray:
    """bn_q6_block bytes [..., 210] -> their f16 d bits, uint16 [B]."""
    return blocks.reshape(-1, kernels.Q6_BLOCK_BYTES)[:, 208:210].copy().view(np.uint16).reshape(-1)


def _check_q6(blocks: np.ndarray) -> str | None:
    """A q6 block whose f16 d is NaN or infinite turns every logit into NaN: name the first."""
    d = _q6_d(blocks)
    bad = np.flatnonzero((d & 0x7C00) == 0x7C00)  # f16 exponent all ones: infinity or NaN
    if not len(bad):
        return None
    per_row = blocks.shape[1] // kernels.Q6_BLOCK_BYTES if blocks.ndim == 2 else 1
    row, block = divmod(int(bad[0]), per_row)
    return (f"q6 block {block} of row {row} has a non-finite scale d "
            f"({d[bad[0]].view(np.float16)}; {len(bad)} such blocks)")


def _decode_q6(stored: list[np.ndarray], hidden: int) -> np.ndarray:
    r = stored[0].shape[0]
    codes, scales, d = q6_fields(stored[0])
    step = d.view(np.float16).astype(F32)[:, None] * np.repeat(scales.astype(F32), 16, axis=1)  # d * scale first,
    values = step * (codes.astype(F32) - F32(32))  # then * q: ggml's Q6_K order, so a transcoded row decodes alike
    return values.reshape(r, -1)[:, :hidden]


def _encode_q6(rows: np.ndarray) -> list[np.ndarray]:
    r, hidden = rows.shape
    w = np.zeros((r, q6_padded(hidden)), dtype=F32)
    w[:, :hidden] = rows
    return _transcode_q6_k(quants.quantize_q6_k(w), hidden)


def _transcode_q6_k(raw: np.ndarray, hidden: int) -> list[np.ndarray]:
    """Q6_K rows (uint8 [R, hidden / 256 * 210]) -> q6 rows: the same codes, scales and d, in our byte order."""
    r = raw.shape[0]
    return [_q6_blocks(*quants.q6_k_fields(raw)).reshape(r, -1)]


EMBEDDING_TYPES: dict[str, EmbeddingType] = {t.name: t for t in (
    EmbeddingType("f16", "BN_EMB_F16", "uint16_t",
                  lambda vocab, hidden: [("", "F16", (vocab, hidden))],
                  lambda rows: [rows.astype(np.float16)],
                  lambda stored, hidden: stored[0].astype(F32)),
    EmbeddingType("int8", "BN_EMB_I8", "int8_t",
                  lambda vocab, hidden: [("", "I8", (vocab, hidden)), ("_scale", "F32", (vocab,))],
                  _encode_int8,
                  lambda stored, hidden: stored[0].astype(F32) * stored[1][:, None]),
    EmbeddingType("q4", "BN_EMB_Q4", "uint8_t",
                  lambda vocab, hidden: [
                      ("", "U8", (vocab, q4_padded(hidden) // kernels.Q4_BLOCK_K * kernels.Q4_BLOCK_BYTES)),
                      ("_scale", "F32", (vocab,))],
                  lambda rows: _encode_q4(rows),
                  _decode_q4),
    EmbeddingType("q6", "BN_EMB_Q6", "uint8_t",
                  lambda vocab, hidden: [
                      ("", "U8", (vocab, q6_padded(hidden) // kernels.Q6_BLOCK_K * kernels.Q6_BLOCK_BYTES))],
                  _encode_q6,
                  _decode_q6,
                  {"Q6_K": _transcode_q6_k},
                  _check_q6),
)}


def embedding_type(name: str, param: str | None = None) -> EmbeddingType:
    """The traits of storage type `name`; a BitnetError naming the choices if unknown (`param`: the
    caller's parameter that gave `name`, when a user chose it)."""
    if name not in EMBEDDING_TYPES:
        raise BitnetError(f"{param or 'embeddings'} must be one of {', '.join(EMBEDDING_TYPES)}, got {name!r}",
                          param=param)
    return EMBEDDING_TYPES[name]


def encode(rows: np.ndarray, embeddings: str) -> list[np.ndarray]:
    """float rows [R, hidden] -> the stored arrays of type `embeddings`, in its stored order."""
    return embedding_type(embeddings).encode(np.asarray(rows, dtype=F32))


def decode(stored: list[np.ndarray], hidden: int, embeddings: str) -> np.ndarray:
    """The stored arrays of some rows -> float32 rows [R, hidden]."""
    return embedding_type(embeddings).decode(stored, hidden)
