"""What a model's decode step has to stream: its distinct ternary weight shapes and bytes per token.

Everything here is derived from an HF-style BitNet config dict (the one stored in a packed file's
metadata) through bitnet_cli.arch, so the kernel micro-benchmarks and the roofline need no model file.
"""

from __future__ import annotations

from bitnet_cli.arch import ModelDims
from bitnet_cli.pack.embeddings import embedding_type
from bitnet_cli.pack.ternary import layout, padded_k


def ternary_bytes(n: int, k: int, ternary_layout: str = "i2") -> int:
    """Bytes of one packed weight [n, k] in `ternary_layout` (i2: 2 bits per weight, tq1: 1.6; K padded)."""
    return n * layout(ternary_layout).row_bytes(k)


def weight_shapes(config: dict) -> list[dict]:
    """The distinct (N, K) ternary weight shapes of one decoder layer, with the projections using each.

    `per_token` is how many times a decoded token multiplies by that shape (over all layers).
    """
    d = ModelDims.from_config(config)
    shapes: dict[tuple[int, int], dict] = {}
    for proj in d.projections():
        key = proj.shape(d)
        entry = shapes.setdefault(key, {"n": key[0], "k": key[1], "projections": [], "per_token": 0})
        entry["projections"].append(proj.name.rsplit(".", 1)[-1])
        entry["per_token"] += d.num_layers
    return list(shapes.values())


def bytes_per_token(config: dict, embeddings: str = "f16", ternary_layout: str = "i2") -> dict:
    """Bytes that must be read from memory to decode one token, by kind, and their total.

    Ternary weights (packed, with their fp32 scales), the output head (the tied embedding or
    lm_head, read in full), the embedding row of the input token, and the fp32 norm weights.
    The KV cache is left out: at the short contexts of tg128 it is small next to the weights.
    """
    kind = embedding_type(embeddings)
    d = ModelDims.from_config(config)
    ternary = sum(ternary_bytes(s["n"], s["k"], ternary_layout) * s["per_token"] for s in weight_shapes(config))
    ternary += 4 * len(d.projections()) * d.num_layers
    row_bytes = kind.row_bytes(d.hidden_size)
    head = d.vocab_size * row_bytes
    norms = 4 * d.norm_parameters()
    total = ternary + head + row_bytes + norms
    return {"ternary": ternary, "head": head, "embedding_row": row_bytes, "norms": norms, "total": total}
