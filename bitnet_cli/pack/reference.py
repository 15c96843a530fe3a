"""The numpy reference forward pass over a packed file: the oracle the C engine is tested against.

It follows transformers' `BitNetForCausalLM` (or `LlamaForCausalLM`, for the llama family: SiLU
gate, no sub-norms, llama3 RoPE) op for op in float32, except that each BitLinear
is computed the way the engine computes it: per-token absmax int8 activations, an exact
integer dot product with the trits, then one rescale `acc / s * gamma` per output.
Simple and slow on purpose (weights are unpacked on every call).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bitnet_cli.arch import layer_tensor
from bitnet_cli.errors import BitnetError
from bitnet_cli.pack.format import PackedModel
from bitnet_cli.rope import inv_freq

F32 = np.float32
HEAD_CHUNK_ROWS = 16384


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (row) absmax int8: (xq as float32 integers in [-128, 127], s [T, 1]); x ~= xq / s."""
    s = F32(127) / np.maximum(np.abs(x).max(axis=-1, keepdims=True), F32(1e-5))
    xq = np.clip(np.round(x * s), -128, 127)
    return xq.astype(F32), s.astype(F32)


def bitlinear(x: np.ndarray, trits: np.ndarray, gamma: np.float32) -> np.ndarray:
    """y = (xq . T) / s * gamma. The float32 matmul is exact: |acc| <= 128 * K < 2^24 for K < 131072."""
    xq, s = quantize_activations(x)
    acc = xq @ trits.T.astype(F32)
    return (acc / s * gamma).astype(F32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=F32)
    return (weight * (x * (F32(1) / np.sqrt(var + F32(eps))))).astype(F32)


def rope_tables(positions: np.ndarray, head_dim: int, theta: float,
                scaling: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    freqs = positions.astype(F32)[:, None] * inv_freq(head_dim, theta, scaling)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(F32), np.sin(emb).astype(F32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, head_dim]; rotate-half convention (HF Llama/BitNet)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, per layer: [n_past, kv_heads, head_dim]."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    @property
    def n_past(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0


def forward(pm: PackedModel, token_ids, cache: KVCache | None = None) -> np.ndarray:
    """Logits float32 [T, V] for `token_ids` (positions start at cache.n_past when a cache is given).

    With a cache, the new keys/values are appended to it, so calling again with the next
    tokens continues the sequence (incremental decoding).
    """
    d = pm.dims
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise BitnetError("forward: no tokens given")
    if ids.min() < 0 or ids.max() >= d.vocab_size:
        raise BitnetError(f"forward: token id out of range [0, {d.vocab_size})")
    n_past = cache.n_past if cache is not None else 0
    t = ids.size
    positions = np.arange(n_past, n_past + t)
    cos, sin = rope_tables(positions, d.head_dim, d.rope_theta, d.rope_scaling)
    group = d.num_heads // d.num_kv_heads
    causal = np.triu(np.full((t, n_past + t), -np.inf, dtype=F32), k=n_past + 1)
    eps = d.rms_norm_eps

    def linear(h, layer, proj):
        if d.bitlinear_norm(proj):  # use_rms_norm: the projection's own norm on its input
            h = rms_norm(h, pm.tensor(layer_tensor(layer, d.bitlinear_norm(proj))), d.bitlinear_norm_eps)
        y = bitlinear(h, *pm.ternary(layer_tensor(layer, proj)))
        return y + pm.tensor(layer_tensor(layer, proj, "bias")) if d.has_bias(proj) else y

    def norm(h, name):
        return rms_norm(h, pm.tensor(name), eps)

    x = pm.embedding(rows=ids)
    for i in range(d.num_layers):
        p = f"model.layers.{i}."
        h = norm(x, p + "input_layernorm.weight")
        q = linear(h, i, "self_attn.q_proj").reshape(t, d.num_heads, d.head_dim)
        k = linear(h, i, "self_attn.k_proj").reshape(t, d.num_kv_heads, d.head_dim)
        v = linear(h, i, "self_attn.v_proj").reshape(t, d.num_kv_heads, d.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if len(cache.keys) <= i:
                cache.keys.append(k)
                cache.values.append(v)
            else:
                cache.keys[i] = np.concatenate([cache.keys[i], k])
                cache.values[i] = np.concatenate([cache.values[i], v])
            k, v = cache.keys[i], cache.values[i]
        # [heads, T, S] scores; each query head reads kv head (head // group)
        kh = np.repeat(k.transpose(1, 0, 2), group, axis=0)
        vh = np.repeat(v.transpose(1, 0, 2), group, axis=0)
        scores = (q.transpose(1, 0, 2) @ kh.transpose(0, 2, 1)) * F32(d.head_dim ** -0.5) + causal
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        attn = (probs @ vh).transpose(1, 0, 2).reshape(t, d.num_heads * d.head_dim)
        if d.sub_norms:
            attn = norm(attn, p + "self_attn.attn_sub_norm.weight")
        x = x + linear(attn, i, "self_attn.o_proj")

        h = norm(x, p + "post_attention_layernorm.weight")
        gate = linear(h, i, "mlp.gate_proj")
        if d.hidden_act == "silu":
            with np.errstate(over="ignore"):  # exp(-gate) = inf: silu -> -0, as in torch
                gate = (gate / (F32(1) + np.exp(-gate))).astype(F32)
        else:
            gate = np.maximum(gate, 0) * np.maximum(gate, 0)
        m = gate * linear(h, i, "mlp.up_proj")
        if d.sub_norms:
            m = norm(m, p + "mlp.ffn_sub_norm.weight")
        x = x + linear(m, i, "mlp.down_proj")

    x = norm(x, "model.norm.weight")
    logits = np.empty((t, d.vocab_size), dtype=F32)
    for start in range(0, d.vocab_size, HEAD_CHUNK_ROWS):  # bounded memory for large vocabularies
        rows = slice(start, start + HEAD_CHUNK_ROWS)
        logits[:, rows] = x @ pm.embedding("lm_head.weight", rows).T
    return logits
