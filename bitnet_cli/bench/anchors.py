"""Other runtimes' speeds on the 2B4T shape: the figures `bitnet bench` prints beside ours.

Measured by the project on 2026-11-22 with `llama-bench -p 128 -n 64 -r 3` on a 2-core AMD EPYC
Zen 3 (AVX2) machine, idle, random ternary weights in the 2B4T shape; these rows are the record of
that measurement. They are only comparable with runs on the same kind of machine.
"""

from __future__ import annotations

SOURCE = "llama-bench -p 128 -n 64 -r 3, 2-core AMD EPYC Zen 3 (AVX2), idle; 2B4T shape, random ternary weights"
DATE = "2026-11-22"
SHAPE = "2b4t"

# tokens/s; "tg64" is generation of 64 tokens (ours is tg128: same per-token cost at short context).
ANCHORS = [
    {"runtime": "llama.cpp", "weights": "TQ2_0 2.06 bpw", "head": "Q6_K", "file_mb": 812,
     "pp128": {1: 26.2, 2: 47.9}, "tg64": {1: 14.0, 2: 22.7}},
    {"runtime": "llama.cpp", "weights": "TQ2_0 2.06 bpw", "head": "f16", "file_mb": 1199,
     "pp128": {1: 26.2, 2: 50.4}, "tg64": {1: 12.0, 2: 19.5}},
    {"runtime": "llama.cpp", "weights": "TQ1_0 1.69 bpw", "head": "Q6_K", "file_mb": 714,
     "pp128": {1: 11.1, 2: 21.9}, "tg64": {1: 8.7, 2: 15.6}},
    {"runtime": "bitnet.cpp", "weights": "I2_S 2 bpw", "head": "f16", "file_mb": 1186,
     "pp128": {1: 45.2, 2: 89.4}, "tg64": {1: 12.4, 2: 21.3}},
    {"runtime": "bitnet.cpp", "weights": "I2_S 2 bpw", "head": "Q6_K", "file_mb": 799,
     "pp128": {1: 46.0, 2: 84.3}, "tg64": {1: 16.1, 2: 27.6}},
    {"runtime": "llama.cpp", "weights": "Q4_0 (dense 4-bit, for scale)", "head": None, "file_mb": 1447,
     "pp128": {1: 19.4, 2: 38.6}, "tg64": {1: 8.4, 2: 14.8}},
    {"runtime": "transformers", "weights": "bf16 BitNetForCausalLM", "head": None, "file_mb": None,
     "pp128": {}, "tg64": {2: 3.0}},
]

# Streaming-read bandwidth measured on that machine, GB/s (range over runs).
BANDWIDTH_GBPS = {1: (22.0, 27.0), 2: (33.0, 37.0)}


def anchors_for(shape: str | None) -> list[dict]:
    """The anchor rows that apply to a benchmark of `shape` (only the 2B4T shape has any)."""
    return ANCHORS if shape == SHAPE else []
