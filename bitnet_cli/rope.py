"""RoPE inverse frequencies, as transformers computes them in fp32 (no torch: the engine uses this).

Two kinds exist in the checkpoints we read (bitnet_cli.arch.rope_scaling_from_config parses
them): the default ``1 / theta^(2i/d)`` and Llama 3.1's scaling (``rope_type: llama3``), which
divides the low frequencies by ``factor`` and blends the middle band (transformers'
``_compute_llama3_parameters``).
"""

from __future__ import annotations

import math

import numpy as np


def inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """float32 [head_dim/2]: transformers' inv_freq for this RoPE (default, or llama3 scaling).

    The default is ``1 / theta^(arange(0, d, 2) / d)`` in fp32 (the power taken in float64 and
    rounded once, which torch's fp32 pow approximates to the last bit); llama3 then follows
    ``_compute_llama3_parameters`` step by step in fp32 (bit for bit on the shapes tested).
    """
    f32 = np.float32
    exponent = np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)
    freq = f32(1.0) / np.power(np.float64(f32(theta)), exponent.astype(np.float64)).astype(f32)
    if scaling is None:
        return freq
    factor, low, high = f32(scaling["factor"]), scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    # torch evaluates `scalar / tensor` as reciprocal(tensor) * scalar; so do we, for its bits
    wavelen = (f32(1) / freq) * f32(2 * math.pi)
    scaled = np.where(wavelen > low_wavelen, freq / factor, freq).astype(f32)
    smooth = (((f32(1) / wavelen) * f32(old_ctx) - f32(low)) / f32(high - low)).astype(f32)
    smoothed = ((f32(1) - smooth) * scaled / factor + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)
