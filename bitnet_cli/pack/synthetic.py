"""Random packed models of published BitNet shapes, written straight to disk (no checkpoint).

For speed runs that need no download: random uniform trits, absmean-like scales, norms near
1 and small random embeddings, so activations stay finite through every layer, plus a real
byte-level BPE tokenizer whose vocabulary is padded to the shape's vocab size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bitnet_cli.arch import EMBED, LM_HEAD, SYNTHETIC_DEFAULTS, ModelDims, bitnet_config, preset_fields, split_layer_tensor
from bitnet_cli.errors import BitnetError
from bitnet_cli.files import bundled_corpus
from bitnet_cli.pack.convert import pack_metadata
from bitnet_cli.tokenizer import BOS, EOS, pieces, train_bpe
from bitnet_cli.pack.embeddings import embedding_type
from bitnet_cli.pack.format import PackedWriter, tensor_specs, write_embedding_rows
from bitnet_cli import kernels
from bitnet_cli.pack.ternary import layout


# All 81 bytes whose four 2-bit codes are valid trit codes (0, 1, 2): uniform random trits, fast.
_VALID_BYTES = np.array(
    [a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3) for d in range(3)],
    dtype=np.uint8,
)


def shape_config(shape: str | dict) -> dict:
    """The HF config.json of a synthetic model: a named preset (bitnet_cli.arch.PRESETS, with
    SYNTHETIC_DEFAULTS for what a toy preset leaves open), or an explicit dict of config fields."""
    fields = {**SYNTHETIC_DEFAULTS, **preset_fields(shape)} if isinstance(shape, str) else dict(shape)
    return bitnet_config({"bos_token_id": 0, "eos_token_id": 1, **fields})  # BOS, EOS of synthetic_tokenizer


def _bundled_corpus() -> str:
    try:
        return bundled_corpus().read_text(encoding="utf-8")
    except OSError:
        return ""


def synthetic_tokenizer(vocab_size: int, merges_vocab: int = 1024) -> str:
    """tokenizer.json: byte-level BPE (trained on the bundled corpus when present), padded to `vocab_size`.

    The padding entries `<|reserved_i|>` are valid ids that plain text never produces.
    """
    from tokenizers import Tokenizer

    if vocab_size < 258:
        raise BitnetError(f"synthetic tokenizer needs vocab_size >= 258 (256 bytes + 2 specials), got {vocab_size}")
    tok = train_bpe(pieces(_bundled_corpus()[:300_000]), min(vocab_size, merges_vocab))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<|reserved_{i}|>"] = i
    out = json.dumps(spec, ensure_ascii=False)
    if Tokenizer.from_str(out).get_vocab_size() != vocab_size:
        raise BitnetError("synthetic tokenizer: vocabulary padding failed")  # an invariant, not user input
    return out


# every byte a tq1_k640 packer writes: five trits as ceil(v * 256 / 243), v = 0..242 (kernels/bitnet.h)
_VALID_TQ1_BYTES = ((np.arange(243) * 256 + 242) // 243).astype(np.uint8)


class _TritSource:
    """Random packed trits: each matrix is a window at a random offset into one random pool (of
    i2_k128 bytes, and of tq1_k640 bytes for that layout's 640-input blocks).

    Drawing fresh random bytes for 2 billion weights costs ~10 s; a window into a pool larger
    than any matrix gives every matrix distinct-looking uniform trits at memory-copy speed.
    """

    def __init__(self, rng: np.random.Generator, largest: int, ternary_layout: str = "i2"):
        self.rng = rng
        self.layout = layout(ternary_layout)
        self.pool = _VALID_BYTES[rng.integers(0, len(_VALID_BYTES), size=2 * largest, dtype=np.uint8)]
        self.tq1_pool = _VALID_TQ1_BYTES[rng.integers(0, 243, size=2 * largest)] if ternary_layout == "tq1" else None

    def _window(self, pool: np.ndarray, n: int, row: int) -> np.ndarray:
        start = int(self.rng.integers(0, len(pool) - n * row + 1))
        return pool[start : start + n * row].reshape(n, row)

    def packed(self, n: int, k: int) -> np.ndarray:
        if k % kernels.BLOCK_K:  # K padding must hold code 1 (T = 0): pack real trits
            return self.layout.pack(self.rng.integers(-1, 2, size=(n, k), dtype=np.int8))
        if self.layout.option == "i2":
            return self._window(self.pool, n, k // 4)
        big = k // kernels.TQ1_BLOCK_K  # 640-input blocks, then i2_k128 blocks for the rest of the row
        return np.concatenate([self._window(self.tq1_pool, n, big * kernels.TQ1_BLOCK_BYTES),
                               self._window(self.pool, n, k % kernels.TQ1_BLOCK_K // 4)], axis=1)


def write_random_model(path, shape: str | dict = "2b4t", embeddings: str = "f16", seed: int = 0,
                       force: bool = True, progress=None, ternary_layout: str = "i2") -> Path:
    """Write a packed file of `shape` with random weights (projections in `ternary_layout`, an
    --layout choice); return its path."""
    embedding_type(embeddings)
    config = shape_config(shape)
    dims = ModelDims.from_config(config, f"shape {shape!r}")
    rng = np.random.default_rng(seed)
    specs = tensor_specs(dims, embeddings, ternary_layout)
    largest = max(n * -(-k // kernels.BLOCK_K) * kernels.BLOCK_K // 4 for n, k in
                  (dims.projection_shape(p.name) for p in dims.projections()))  # in i2_k128 bytes
    trits = _TritSource(rng, largest, ternary_layout)
    meta = pack_metadata(config, dims, synthetic_tokenizer(dims.vocab_size), {"bos_token": BOS, "eos_token": EOS},
                         embeddings, f"synthetic:{shape if isinstance(shape, str) else 'custom'}:seed={seed}",
                         ternary_layout)
    with PackedWriter(Path(path), specs, meta, force=force) as writer:
        for done, spec in enumerate(specs, 1):
            name = spec.name
            if name in (EMBED, LM_HEAD):
                chunk = 8192
                rows = (rng.standard_normal((min(chunk, dims.vocab_size - start), dims.hidden_size), dtype=np.float32)
                        * np.float32(0.02) for start in range(0, dims.vocab_size, chunk))
                write_embedding_rows(writer, name, rows, dims.vocab_size, embeddings)
            elif name in (EMBED + "_scale", LM_HEAD + "_scale"):
                pass  # written with its embedding
            elif spec.dtype == "U8":
                n, k = dims.projection_shape(split_layer_tensor(name)[1])
                writer.write(name, trits.packed(n, k))
            elif name.endswith("weight_scale"):
                k = dims.projection_shape(split_layer_tensor(name)[1])[1]
                writer.write(name, np.array([rng.uniform(0.8, 1.2) / np.sqrt(k)], dtype=np.float32))
            else:  # RMSNorm weights
                writer.write(name, (1 + 0.05 * rng.standard_normal(spec.shape)).astype(np.float32))
            if progress:
                progress(done, len(specs), name)
        return writer.finish()
