"""ggml tensor types: sizes, exact dequantisation, and the ternary layouts (I2_S, TQ1_0, TQ2_0).

Layouts are learned from ggml's and bitnet.cpp's documentation and sources; the code is ours.
Every dequantiser reproduces ggml's own float32 arithmetic (the same products in the same
order), so "dequantised exactly" means bit-identical to what llama.cpp computes. Each works on
whole blocks, vectorised over all blocks at once; callers hand in row ranges to bound memory.

Ternary types, as the 2-bit code q = trit + 1:
- I2_S (bitnet.cpp, type 36): the tensor flattened, cut in blocks of B values of B/4 bytes; byte
  j of a block holds value (B/4)*g + j in bits (7-2g):(6-2g), g = 0..3. B is 128 in x86 builds
  (`QK_I2_S` in bitnet.cpp's src/ggml-bitnet-mad.cpp; the B = 128 layout is the mirror image of
  our `i2_k128`, where g sits in bits 2g+1:2g) and 64 in ARM builds. Both give the same bytes
  for the same tensor size and nothing in the file says which build wrote it (see
  pack/gguf_source.py for how the import chooses). After the codes (count/4 bytes) comes one
  float32, the per-tensor scale, then padding up to 32 bytes in all.
- TQ2_0 (llama.cpp): blocks of 256 values: 64 code bytes, two halves of 32 bytes each laid out
  like one i2_k128 block, then an f16 scale d.
- TQ1_0 (llama.cpp): blocks of 256: 48 bytes of five base-3 digits each, 4 bytes of four
  digits each, then f16 d (see `_tq1_0`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.float32
I2S_BLOCK = 128  # values per I2_S block in bitnet.cpp's x86 layout (what we write)
I2S_ARM_BLOCK = 64  # values per I2_S block in bitnet.cpp's ARM (NEON) layout
I2S_BLOCKS = (I2S_BLOCK, I2S_ARM_BLOCK)
I2S_TAIL = 32  # bytes after the codes: the float32 scale and padding


@dataclass(frozen=True)
class GGMLType:
    name: str
    block: int  # values per block
    size: int  # bytes per block


GGML_TYPES = {t[0]: GGMLType(*t[1:]) for t in [
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20), (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 40), (10, "Q2_K", 256, 84), (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144), (13, "Q5_K", 256, 176), (14, "Q6_K", 256, 210), (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66), (17, "IQ2_XS", 256, 74), (18, "IQ3_XXS", 256, 98), (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18), (21, "IQ3_S", 256, 110), (22, "IQ2_S", 256, 82), (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1), (25, "I16", 1, 2), (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56), (30, "BF16", 1, 2), (34, "TQ1_0", 256, 54), (35, "TQ2_0", 256, 66),
    (36, "I2_S", 1, 1),  # bitnet.cpp's fork; sized specially (count / 4 + 32), see tensor_nbytes
]}
TYPE_IDS = {t.name: i for i, t in GGML_TYPES.items()}
FLOAT_TYPES = ("F32", "F16", "BF16")
# types whose values we can reproduce exactly (the embedding and any float weight)
DEQUANTISABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q6_K", "TQ1_0", "TQ2_0")


def tensor_nbytes(type_id: int, dims: tuple[int, ...]) -> int:
    """Bytes a tensor of ggml dims (innermost first) occupies; ValueError when the shape cannot hold the type."""
    t = GGML_TYPES[type_id]
    count = 1
    for d in dims:
        count *= d
    if t.name == "I2_S":
        if count % I2S_BLOCK:  # also what the engine's 128-value blocks need, whichever layout wrote it
            raise ValueError(f"I2_S needs a multiple of {I2S_BLOCK} values, got {count}")
        return count // 4 + I2S_TAIL
    if dims[0] % t.block:
        raise ValueError(f"{t.name} needs rows of a multiple of {t.block} values, got {dims[0]}")
    return count // t.block * t.size


def row_bytes(type_id: int, k: int) -> int:
    t = GGML_TYPES[type_id]
    return k // 4 if t.name == "I2_S" else k // t.block * t.size


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(F32)


def dequantize(type_name: str, raw: np.ndarray, k: int) -> np.ndarray:
    """Stored bytes of whole rows (uint8 [R, row_bytes] or flat) -> float32 [R, k], as ggml computes them."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if type_name == "F32":
        return raw.view("<f4").reshape(-1, k).copy()
    if type_name == "F16":
        return raw.view("<f2").astype(F32).reshape(-1, k)
    if type_name == "BF16":
        bits = raw.view("<u2").astype(np.uint32) << 16
        return bits.view(F32).reshape(-1, k)
    t = GGML_TYPES[TYPE_IDS[type_name]]
    blocks = raw.reshape(-1, t.size)
    if type_name == "Q8_0":
        d = _f16(blocks[:, :2]).reshape(-1, 1)
        out = d * blocks[:, 2:].view(np.int8).astype(F32)
    elif type_name == "Q4_0":
        d = _f16(blocks[:, :2]).reshape(-1, 1)
        nib = blocks[:, 2:]
        q = np.concatenate([nib & 15, nib >> 4], axis=1).astype(np.int8) - 8  # low nibbles are values 0..15
        out = d * q.astype(F32)
    elif type_name == "Q6_K":
        out = _q6_k(blocks)
    elif type_name == "TQ2_0":
        d = _f16(blocks[:, 64:66]).reshape(-1, 1)
        out = d * (tq2_0_codes(blocks).astype(F32) - F32(1))
    elif type_name == "TQ1_0":
        d = _f16(blocks[:, 52:54]).reshape(-1, 1)
        out = d * (tq1_0_codes(blocks).astype(F32) - F32(1))
    else:
        raise ValueError(f"cannot dequantise {type_name}")
    return out.astype(F32, copy=False).reshape(-1, k)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    """block_q6_K (256 values): ql[128] low nibbles, qh[64] high 2-bit pairs, int8 scales[16], f16 d.

    Each half of 128 values uses 64 ql bytes, 32 qh bytes and 8 scales: value 32*g + l of the
    half (g = 0..3, l = 0..31) takes its low 4 bits from ql[l] (g even) or ql[32 + l] (g odd),
    low nibble for g < 2, high nibble otherwise, and bits 2g+1:2g of qh[l] as bits 5:4; its
    scale is scales[l // 16 + 2g]. Value = (d * scale) * (q - 32), in float32 like ggml.
    """
    b = blocks.shape[0]
    d = _f16(blocks[:, 208:210]).reshape(b, 1, 1, 1)
    out = np.empty((b, 2, 4, 32), dtype=F32)
    for h in range(2):
        ql = blocks[:, 64 * h:64 * h + 64].astype(np.int16)
        qh = blocks[:, 128 + 32 * h:128 + 32 * h + 32].astype(np.int16)
        sc = blocks[:, 192 + 8 * h:192 + 8 * h + 8].view(np.int8).astype(F32)
        low = [ql[:, :32] & 15, ql[:, 32:] & 15, ql[:, :32] >> 4, ql[:, 32:] >> 4]
        for g in range(4):
            q = (low[g] | (((qh >> (2 * g)) & 3) << 4)) - 32
            scale = np.repeat(sc[:, [2 * g, 2 * g + 1]], 16, axis=1)  # l // 16 picks scale 2g or 2g+1
            out[:, h, g] = (d[:, 0, 0, 0:1] * scale) * q.astype(F32)
    return out.reshape(b, 256)


def tq2_0_codes(blocks: np.ndarray) -> np.ndarray:
    """TQ2_0 blocks [B, 66] -> 2-bit codes [B, 256] (value = d * (code - 1))."""
    qs = blocks[:, :64].reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs >> shifts) & 3).reshape(-1, 256)


_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _tq1_digits(qs: np.ndarray, n: int) -> np.ndarray:
    """Bytes [B, m] each holding n base-3 digits as a fixed-point fraction -> digits [B, n * m], digit-major.

    Digit i of byte b is ((b * 3^i mod 256) * 3) >> 8: the byte scaled by 3^i, wrapped, times 3, top bits.
    """
    scaled = (qs[:, None, :] * _POW3[:n].reshape(1, n, 1)).astype(np.uint8)  # wraps mod 256 like uint8 math
    return ((scaled.astype(np.uint16) * 3) >> 8).reshape(qs.shape[0], -1).astype(np.uint8)


def tq1_0_codes(blocks: np.ndarray) -> np.ndarray:
    """TQ1_0 blocks [B, 54] -> codes [B, 256]: 32 bytes x 5 digits, 16 bytes x 5 digits, 4 bytes x 4 digits."""
    return np.concatenate([_tq1_digits(blocks[:, :32], 5), _tq1_digits(blocks[:, 32:48], 5),
                           _tq1_digits(blocks[:, 48:52], 4)], axis=1)


def ternary_block_scales(type_name: str, raw: np.ndarray) -> np.ndarray:
    """The f16 scale d of every TQ1_0 / TQ2_0 block, as float32."""
    size = GGML_TYPES[TYPE_IDS[type_name]].size
    blocks = np.ascontiguousarray(raw).reshape(-1, size)
    return _f16(blocks[:, size - 2:])


def ternary_codes(type_name: str, raw: np.ndarray, k: int) -> np.ndarray:
    """Codes (trit + 1, uint8 [R, k]) of TQ1_0 / TQ2_0 / I2_S rows (I2_S: the codes only, no tail)."""
    if type_name == "I2_S":
        return i2s_codes(raw).reshape(-1, k)
    size = GGML_TYPES[TYPE_IDS[type_name]].size
    blocks = np.ascontiguousarray(raw).reshape(-1, size)
    codes = tq2_0_codes(blocks) if type_name == "TQ2_0" else tq1_0_codes(blocks)
    return codes.reshape(-1, k)


# ----------------------------------------------------------------------------- I2_S

# our i2_k128 byte <-> bitnet.cpp's I2_S byte: the four 2-bit fields in reverse order
_REVERSE_PAIRS = np.array([((b & 3) << 6) | ((b >> 2 & 3) << 4) | ((b >> 4 & 3) << 2) | (b >> 6) for b in range(256)],
                          dtype=np.uint8)


def i2s_from_i2_k128(packed: np.ndarray) -> np.ndarray:
    """Our i2_k128 bytes (any shape, K a multiple of 128) -> I2_S code bytes, same shape: a byte-wise map
    (an involution: the same map reads x86 I2_S bytes back as i2_k128)."""
    return _REVERSE_PAIRS[packed]


def i2s_codes(code_bytes: np.ndarray, block: int = I2S_BLOCK) -> np.ndarray:
    """I2_S code bytes in the layout of `block`-value blocks (128: x86, 64: ARM) -> codes in value order, flat uint8."""
    c = np.ascontiguousarray(code_bytes).reshape(-1, 1, block // 4)
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)
    return ((c >> shifts) & 3).reshape(-1)


def i2s_pack(codes: np.ndarray, block: int = I2S_BLOCK) -> np.ndarray:
    """Codes (trit + 1, flat, a multiple of `block`) -> I2_S code bytes in `block`-value blocks (128: x86, 64: ARM)."""
    c = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1, 4, block // 4)
    return (c[:, 0] << 6 | c[:, 1] << 4 | c[:, 2] << 2 | c[:, 3]).reshape(-1)


def i2s_tail(scale: np.float32) -> np.ndarray:
    """The 32 bytes after an I2_S tensor's codes: the float32 scale, then zeros."""
    tail = np.zeros(I2S_TAIL, dtype=np.uint8)
    tail[:4] = np.array([scale], dtype="<f4").view(np.uint8)
    return tail


# ----------------------------------------------------------------------------- Q6_K (export of the head)


_Q6_SLICE = 256  # blocks (256 KB of float32 input) per slice of quantize_q6_k


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 rows [R, K] (K a multiple of 256) -> Q6_K blocks, uint8 [R, K / 256 * 210].

    Per 16 values a signed 6-bit grid: the step s is the least-squares fit (weighted by x^2,
    as llama.cpp's reference quantiser weighs it) over 19 candidate grids that map the
    largest-magnitude value to -32 +- 0.9; the 16 steps of a block are then stored as int8
    multiples of one f16 d = max|s| / 128 (the largest step is -128 or 127 of it).

    The rows go through in slices of _Q6_SLICE blocks: each candidate grid makes several
    temporaries the size of its input, and a slice's stay in cache (a whole 2B4T head's were
    gigabytes each). Every value is computed per block, so slicing changes no byte.
    """
    x = np.asarray(x, dtype=F32)
    flat = x.reshape(-1, 256)
    out = np.empty((len(flat), 210), dtype=np.uint8)
    for b0 in range(0, len(flat), _Q6_SLICE):
        out[b0:b0 + _Q6_SLICE] = _quantize_q6_k_blocks(flat[b0:b0 + _Q6_SLICE])
    return out.reshape(len(x), -1)


def _quantize_q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """float32 [B, 256] -> Q6_K blocks uint8 [B, 210] (quantize_q6_k on whole blocks)."""
    sub = blocks.reshape(-1, 16)  # [S, 16] sub-blocks
    amax_idx = np.abs(sub).argmax(axis=1)
    vmax = sub[np.arange(len(sub)), amax_idx]  # the signed value of largest magnitude
    best_scale = np.zeros(len(sub), dtype=F32)
    best_metric = np.full(len(sub), -np.inf, dtype=np.float64)
    nz = np.abs(vmax) > 1e-30
    safe = np.where(nz, vmax, 1).astype(F32)
    # the fit runs on the transpose, [16, S]: every operation below is then on rows of S values,
    # where numpy's per-sub-block sums over 16 values were short strided loops (measured 3x slower)
    sub_t = np.ascontiguousarray(sub.T)
    w_t = sub_t * sub_t
    wx_t = w_t * sub_t  # the w * sub of the fit's sum(w * sub * q), which numpy evaluates as (w * sub) * q
    q = np.empty_like(sub_t)
    t = np.empty_like(sub_t)
    for step in range(-9, 10):
        iscale = -(F32(32) + F32(0.1) * step) / safe
        np.clip(np.rint(np.multiply(sub_t, iscale, out=q), out=q), -32, 31, out=q)
        sumlx = _sum16(np.multiply(wx_t, q, out=t))
        np.multiply(w_t, q, out=t)
        suml2 = _sum16(np.multiply(t, q, out=t))
        metric = np.divide(sumlx * sumlx, suml2, out=np.full_like(sumlx, -np.inf), where=suml2 > 0)
        better = metric > best_metric
        best_metric = np.where(better, metric, best_metric)
        best_scale = np.where(better, np.divide(sumlx, suml2, out=np.zeros_like(sumlx), where=suml2 > 0), best_scale)
    best_scale = np.where(nz, best_scale, 0).astype(F32).reshape(-1, 16)  # [B, 16] per block
    max_scale = best_scale[np.arange(len(best_scale)), np.abs(best_scale).argmax(axis=1)]
    iscale = np.divide(F32(-128), max_scale, out=np.zeros_like(max_scale), where=max_scale != 0)
    scales = np.clip(np.rint(iscale[:, None] * best_scale), -128, 127).astype(np.int8)
    d = np.divide(F32(1), iscale, out=np.zeros_like(iscale), where=iscale != 0).astype(np.float16)
    step = (d.astype(F32)[:, None] * scales.astype(F32))  # [B, 16], exactly what the reader multiplies
    vals = blocks.reshape(-1, 16, 16)
    q = np.clip(np.rint(np.divide(vals, step[:, :, None], out=np.zeros_like(vals), where=step[:, :, None] != 0)),
                -32, 31).astype(np.int16) + 32
    return q6_k_pack(q.reshape(-1, 256).astype(np.uint8), scales, d.view(np.uint16))


def _sum16(t: np.ndarray) -> np.ndarray:
    """float32 [16, S] -> the float64 sums of its columns, added in the order numpy's
    `x.sum(axis=1, dtype=np.float64)` adds a row of 16 (pairwise: r_i = a_i + a_(i+8), then
    ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))), so the sums are the same bits."""
    a = t.astype(np.float64)
    r = a[:8] + a[8:]
    r = r[0::2] + r[1::2]
    r = r[0::2] + r[1::2]
    return r[0] + r[1]


def q6_k_pack(codes: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Codes u = q + 32 (uint8 [B, 256]), int8 scales [B, 16] and f16 d bits (uint16 [B]) -> Q6_K blocks [B, 210]
    (the layout `_q6_k` reads)."""
    q = codes.reshape(-1, 2, 4, 32)  # [B, half, g, l]: value 128*half + 32*g + l
    low = q & 15
    ql = np.concatenate([low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], axis=2)  # [B, 2, 64]
    hi = q >> 4
    qh = hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6  # [B, 2, 32]
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), scales.view(np.uint8).reshape(-1, 16),
                           np.ascontiguousarray(d, dtype=np.uint16).view(np.uint8).reshape(-1, 2)], axis=1)


def q6_k_fields(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K blocks [B, 210] -> (codes u = q + 32 uint8 [B, 256], int8 scales [B, 16], f16 d bits uint16 [B]):
    the inverse of `q6_k_pack`."""
    b = np.ascontiguousarray(blocks).reshape(-1, 210)
    ql = b[:, :128].reshape(-1, 2, 2, 32)  # [B, half, ql[l] / ql[32 + l], l]
    low = np.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)  # [B, 2, g, 32]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    codes = (low | high << 4).reshape(-1, 256)
    return codes, b[:, 192:208].copy().view(np.int8), b[:, 208:210].copy().view(np.uint16).reshape(-1)


# ----------------------------------------------------------------------------- TQ1_0 / TQ2_0 / Q8_0 (export)


def _tq1_bytes(codes: np.ndarray, n: int) -> np.ndarray:
    """Codes [B, n, m] (digit-major) -> bytes [B, m]: the base-3 number (first digit most significant),
    padded to five digits, as the fraction ceil(q * 256 / 243) that `_tq1_digits` reads back."""
    q = np.zeros(codes.shape[::2], dtype=np.uint16)
    for i in range(n):
        q = q * 3 + codes[:, i, :]
    q = q * 3 ** (5 - n)
    return ((q.astype(np.uint32) * 256 + 242) // 243).astype(np.uint8)


def tq1_0_pack(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Codes (trit + 1) [R, K], K a multiple of 256, and one float d per block [R, K/256] -> TQ1_0 rows."""
    r, k = codes.shape
    c = codes.reshape(-1, 256).astype(np.uint16)
    parts = [_tq1_bytes(c[:, :160].reshape(-1, 5, 32), 5), _tq1_bytes(c[:, 160:240].reshape(-1, 5, 16), 5),
             _tq1_bytes(c[:, 240:].reshape(-1, 4, 4), 4), np.asarray(d, np.float16).reshape(-1, 1).view(np.uint8)]
    return np.concatenate(parts, axis=1).reshape(r, -1)


def tq2_0_pack(i2_k128: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Our i2_k128 rows [R, K/4] (K a multiple of 256) and d per block [R, K/256] -> TQ2_0 rows: a byte copy
    (a TQ2_0 block's 64 code bytes are two i2_k128 blocks) plus each block's f16 d."""
    r, kq = i2_k128.shape
    blocks = i2_k128.reshape(r, kq // 64, 64)
    dd = np.asarray(d, np.float16).reshape(r, kq // 64, 1).view(np.uint8)
    return np.concatenate([blocks, dd], axis=2).reshape(r, -1)


def q8_0_pack(q: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
    """int8 rows [V, H] with one scale per row -> Q8_0 rows (blocks of 32: f16 d = the row scale, 32 int8)."""
    v, h = q.shape
    d = np.broadcast_to(row_scale.astype(np.float16).view(np.uint8).reshape(v, 1, 2), (v, h // 32, 2))
    return np.concatenate([d, q.view(np.uint8).reshape(v, h // 32, 32)], axis=2).reshape(v, -1)
