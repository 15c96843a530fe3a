"""What a model's decode step has to stream: its distinct ternary weight shapes and bytes per token.

Everything here is derived from an HF-style BitNet config dict (the one stored in a packed file's
metadata), so the kernel micro-benchmarks and the roofline need no model file.
"""

from __future__ import annotations

from bitnet_cli.pack.embeddings import EMBEDDING_TYPES
from bitnet_cli.pack.embeddings import row_bytes as embedding_row_bytes

BLOCK_K = 128  # i2_k128: K is padded to a multiple of 128, 4 weights per byte (docs/FORMAT.md)

# (projection name, rows N, inputs K) as functions of the config, per decoder layer.
_PROJECTIONS = (
    ("q_proj", lambda c: c["hidden_size"], lambda c: c["hidden_size"]),
    ("k_proj", lambda c: _kv_dim(c), lambda c: c["hidden_size"]),
    ("v_proj", lambda c: _kv_dim(c), lambda c: c["hidden_size"]),
    ("o_proj", lambda c: c["hidden_size"], lambda c: c["hidden_size"]),
    ("gate_proj", lambda c: c["intermediate_size"], lambda c: c["hidden_size"]),
    ("up_proj", lambda c: c["intermediate_size"], lambda c: c["hidden_size"]),
    ("down_proj", lambda c: c["hidden_size"], lambda c: c["intermediate_size"]),
)


def _kv_dim(config: dict) -> int:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return config.get("num_key_value_heads", heads) * head_dim


def padded_k(k: int) -> int:
    return -(-k // BLOCK_K) * BLOCK_K


def ternary_bytes(n: int, k: int) -> int:
    """Bytes of one packed i2_k128 weight [n, k] (2 bits per weight, K padded)."""
    return n * padded_k(k) // 4


def weight_shapes(config: dict) -> list[dict]:
    """The distinct (N, K) ternary weight shapes of one decoder layer, with the projections using each.

    `per_token` is how many times a decoded token multiplies by that shape (over all layers).
    """
    shapes: dict[tuple[int, int], dict] = {}
    for name, rows, cols in _PROJECTIONS:
        key = (rows(config), cols(config))
        entry = shapes.setdefault(key, {"n": key[0], "k": key[1], "projections": [], "per_token": 0})
        entry["projections"].append(name)
        entry["per_token"] += config["num_hidden_layers"]
    return list(shapes.values())


def bytes_per_token(config: dict, embeddings: str = "f16") -> dict:
    """Bytes that must be read from memory to decode one token, by kind, and their total.

    Ternary weights (packed, with their fp32 scales), the output head (the tied embedding or
    lm_head, read in full), the embedding row of the input token, and the fp32 norm weights.
    The KV cache is left out: at the short contexts of tg128 it is small next to the weights.
    """
    if embeddings not in EMBEDDING_TYPES:
        raise ValueError(f"embeddings must be one of {EMBEDDING_TYPES}, not {embeddings!r}")
    hidden, vocab, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    ternary = sum(ternary_bytes(s["n"], s["k"]) * s["per_token"] for s in weight_shapes(config))
    ternary += 4 * len(_PROJECTIONS) * layers
    row_bytes = embedding_row_bytes(hidden, embeddings)
    head = vocab * row_bytes
    norms = 4 * (layers * (3 * hidden + config["intermediate_size"]) + hidden)
    total = ternary + head + row_bytes + norms
    return {"ternary": ternary, "head": head, "embedding_row": row_bytes, "norms": norms, "total": total}
