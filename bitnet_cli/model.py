"""BitNet b1.58 in PyTorch, numerically the same as transformers' ``BitNetForCausalLM``, and the
Llama-architecture 1.58-bit family (transformers' ``LlamaForCausalLM`` with the bitnet
quantization_config: Llama3-8B-1.58, Falcon3-*-1.58bit, Falcon-E).

The family (``config.family``, from model_type; see bitnet_cli.arch.FAMILIES) switches two
things: whether the layers have BitNet's sub-norms, and the default FFN activation (``relu2`` for
``bitnet``, ``silu`` for ``llama``); RoPE may carry Llama 3 scaling (bitnet_cli.rope).

The ``qwen2`` family adds float q/k/v biases, and a ``quantization_config`` with ``use_rms_norm``
an RMSNorm on every BitLinear's input (transformers' BitLinear / AutoBitLinear).

A Llama-style decoder (GQA attention with RoPE, RMSNorm pre-norms, no biases) with BitNet's
two extra norms (``attn_sub_norm`` before ``o_proj``, ``ffn_sub_norm`` before ``down_proj``), a
squared-ReLU gated FFN, and BitLinear layers in place of every attention/FFN projection:

* weights: absmean ternarisation per tensor in fp32,
  ``s = 1 / max(mean|W|, 1e-5)``, ``W~ = clamp(round(W * s), -1, 1) / s``;
* activations: per-token absmax int8,
  ``s = 127 / max(max|x|, 1e-5)``, ``x~ = clamp(round(x * s), -128, 127) / s``;
* a straight-through estimator in the backward (the gradient passes as if unquantised).

Embeddings and ``lm_head`` stay in full precision. Config fields and tensor names are
transformers' own, so ``config.json`` + ``model.safetensors`` load in transformers and back.
transformers only ternarises when ``config.json`` carries the online ``quantization_config``
block (:data:`ONLINE_QUANT`); we write it for ``quant="bitnet"`` and read it the same way.
Offline-quantised checkpoints (uint8-packed trits or ternary floats, plus ``weight_scale``) load
too, for evaluation and fine-tuning: their BitLinears hold the trits and apply the scale as
transformers does (``linear_class: autobitlinear`` multiplies by it, ``bitlinear`` divides;
:func:`bitnet_cli.checkpoint.bitnet_convention`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitnet_cli.arch import FAMILIES, LLAMA3_ROPE_KEYS, ModelDims
from bitnet_cli.checkpoint import bitnet_convention, read_json, tensor_files
from bitnet_cli.errors import BitnetError
from bitnet_cli.files import ordinary_mode

# The block that makes transformers ternarise weights on the fly (as microsoft/bitnet-b1.58-2B-4T-bf16).
ONLINE_QUANT = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}


# ----------------------------------------------------------------------------- config


@dataclass
class BitNetConfig:
    """The HF ``config.json`` of model_type ``bitnet`` (same field names), plus ``quant``.

    ``quant`` is ours: ``"bitnet"`` ternarises the projections (b1.58), ``"none"`` keeps them in
    full precision (the float baseline of the papers). It is stored in ``config.json`` only
    through the presence (bitnet) or absence (none) of the ``quantization_config`` block.
    """

    vocab_size: int = 128256
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 30
    num_attention_heads: int = 20
    num_key_value_heads: int = 5
    head_dim: int | None = None
    hidden_act: str | None = None  # None: the family's (relu2 for bitnet, silu for llama)
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    quant: str = "bitnet"
    family: str = "bitnet"  # a bitnet_cli.arch.FAMILIES key; config.json's model_type
    # None (default RoPE) or {"rope_type": "llama3", factor, low/high_freq_factor, original_max_position_embeddings}
    rope_scaling: dict | None = None
    # quantization_config use_rms_norm: every BitLinear norms its input (own weight, this eps) before
    # quantising it; None: not (bitnet_cli.arch.bitlinear_norm_eps)
    bitlinear_norm_eps: float | None = None
    # Fields of the source config.json we do not interpret, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.quant not in ("bitnet", "none"):
            raise BitnetError(f"model quant must be 'bitnet' or 'none', got {self.quant!r}")
        if self.family not in FAMILIES:
            raise BitnetError(f"model family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.hidden_act is None:
            self.hidden_act = FAMILIES[self.family].default_act
        # The shape and family, checked by the one parser every stage uses; the modules build from it.
        self.arch = ModelDims.from_config(self.to_hf_dict(), "model config")
        self.rope_scaling = self.arch.rope_scaling

    @classmethod
    def from_hf_dict(cls, d: dict, where: str = "config.json") -> "BitNetConfig":
        """Read an HF ``config.json`` dict (transformers 4.x ``rope_theta`` or 5.x ``rope_parameters``).

        model_type ``bitnet`` or ``llama`` picks the family. Any bitnet quantization_config (online
        or offline, :func:`bitnet_convention`) reads as ``quant="bitnet"``; none as ``"none"``.
        """
        dims = ModelDims.from_config(d, where)  # the fields dropped below (RoPE scaling, ...) are checked first
        d = dict(d)
        quant = "none" if bitnet_convention(d.pop("quantization_config", None), where) is None else "bitnet"
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        d.pop("rope_scaling", None)
        theta = rope.get("rope_theta", d.pop("rope_theta", 500000.0))
        d.pop("rope_theta", None)
        # onebitllms' marker, and Llama's tensor-parallel hint and bias flag (checked false above)
        for k in ("is_bitnet_config", "pretraining_tp", "mlp_bias"):
            d.pop(k, None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "quant", "rope_theta", "family", "rope_scaling",
                                                             "bitlinear_norm_eps"}
        known = {k: d.pop(k) for k in list(d) if k in names}
        if known.get("num_key_value_heads") is None:
            known["num_key_value_heads"] = known.get("num_attention_heads", cls.num_attention_heads)
        if known.get("attention_dropout") is None:
            known["attention_dropout"] = 0.0
        for k in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache"):
            d.pop(k, None)
        known["hidden_act"] = dims.hidden_act
        return cls(**known, rope_theta=float(theta), quant=quant, family=dims.family, rope_scaling=dims.rope_scaling,
                   bitlinear_norm_eps=dims.bitlinear_norm_eps, extra=d)

    def to_hf_dict(self, dtype: str = "float32") -> dict:
        """The ``config.json`` transformers reads; ``quantization_config`` only for ``quant='bitnet'``."""
        fam = FAMILIES[self.family]
        d: dict[str, Any] = {"architectures": [fam.architecture], "model_type": fam.model_type}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "quant", "rope_theta", "family", "rope_scaling", "bitlinear_norm_eps") or (
                    f.name == "head_dim" and self.head_dim is None):
                continue
            d[f.name] = getattr(self, f.name)
        # Both spellings: transformers >= 5 reads rope_parameters, older readers (and llama.cpp) rope_theta.
        d["rope_theta"] = self.rope_theta
        d["rope_parameters"] = dict(self.rope_scaling or {"rope_type": "default"}, rope_theta=self.rope_theta)
        d["dtype"] = dtype
        d["use_cache"] = True
        d.update(self.extra)
        if self.quant == "bitnet":
            d["quantization_config"] = dict(ONLINE_QUANT)
            if self.bitlinear_norm_eps is not None:
                d["quantization_config"].update(use_rms_norm=True, rms_norm_eps=self.bitlinear_norm_eps)
        return d


# ----------------------------------------------------------------------------- quantisation


def ternary_scale(mean_abs: torch.Tensor) -> torch.Tensor:
    """Absmean's ``s = 1 / max(mean|W|, 1e-5)`` from fp32 ``mean|W|`` (a scalar, or one per weight),
    transformers' exact fp32 operations: every path that ternarises takes its scale here."""
    return 1.0 / mean_abs.clamp(min=1e-5)


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarisation with transformers' exact fp32 arithmetic.

    transformers: ``s = 1 / max(mean|W|, 1e-5)``, ``T = clamp(round(W * s), -1, 1)``, ``W~ = T / s``.
    Returns ``(trits, gamma)``: int8 trits in {-1, 0, 1} and the fp32 scalar ``gamma = 1 / s``,
    so that ``trits * gamma`` is bit for bit transformers' ``T / s`` (the numpy twin in
    ``bitnet_cli.pack.ternary`` computes the same).
    """
    w = weight.detach().float()
    s = ternary_scale(w.abs().mean())
    trits = (w * s).round().clamp(-1, 1).to(torch.int8)
    return trits, 1.0 / s


def _quant_weight(w: torch.Tensor) -> torch.Tensor:
    dtype = w.dtype
    w = w.float()
    scale = ternary_scale(w.abs().mean())
    return ((w * scale).round().clamp(-1, 1) / scale).to(dtype)


def _quant_activation(x: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return ((x * scale).round().clamp(-128, 127) / scale).to(dtype)


class BitLinear(nn.Linear):
    """``nn.Linear`` (no bias) whose forward sees ternary weights and int8 activations.

    The parameter stays the full-precision latent weight that the optimiser updates; the
    quantisation happens in every forward. With gradients on, the straight-through estimator
    is written as ``v + (q(v) - v).detach()`` (value of the quantised tensor, gradient of the
    identity): torch.compile fuses it, whereas a custom autograd.Function lost its gradient
    under torch.compile in torch 2.11. Without gradients the quantised tensors are used as they
    are, bit for bit transformers' arithmetic.

    Quantisation warm-up (converting a float model): while ``warming`` is set, weights and
    activations are ``v + lam * (q(v) - v).detach()``, the Hugging Face 1.58-bit fine-tuning
    recipe, with ``lam`` a 0-d buffer set in place every step (:func:`set_quant_lambda`), so a
    compiled model sees a changing tensor rather than a new constant to recompile for. ``lam = 0``
    is exactly the float layer, and once warm-up ends ``warming`` is cleared and the layer is
    exactly the plain BitLinear above.

    ``int8`` is set by ``bitnet_cli.train.int8_linear.enable`` (``train.int8_matmul``): with
    gradients on (and no warm-up), the same integers are then multiplied on int8 tensor cores.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, norm_eps: float | None = None):
        super().__init__(in_features, out_features, bias=bias)  # a bias (Qwen2's q/k/v) stays float
        self.int8 = None  # an int8_linear.Int8Product once enabled (a submodule: it holds the cached trits)
        # use_rms_norm: transformers' BitLinear norms its input with its own RMSNorm before quantising it
        self.rms_norm = RMSNorm(in_features, norm_eps) if norm_eps is not None else None
        self.scale_op: str | None = None  # set by load_offline: "multiply" or "divide" by weight_scale
        self.register_buffer("lam", torch.ones(()), persistent=False)
        self.warming = False

    def load_offline(self, trits: torch.Tensor, weight_scale: torch.Tensor, op: str) -> None:
        """Hold an offline-quantised weight as stored: trits (as floats, frozen) and transformers'
        weight_scale, which AutoBitLinear multiplies the output by (op "multiply") and BitLinear
        divides it by ("divide"), each in transformers' own arithmetic."""
        self.weight = nn.Parameter(trits.to(self.weight.dtype), requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.reshape(1).float())
        self.scale_op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        w = self.weight
        if self.scale_op == "multiply":  # AutoBitLinear offline: ActQuant, then * weight_scale (bias included)
            return F.linear(_quant_activation(x), w, self.bias) * self.weight_scale
        if self.scale_op == "divide":  # BitLinear: integer activations, / (weight_scale * input scale), + bias
            xf = x.float()
            xs = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
            xq = (xf * xs).round().clamp(-128, 127).to(x.dtype)
            y = (F.linear(xq, w) / (self.weight_scale * xs)).to(x.dtype)
            return y if self.bias is None else y + self.bias
        if self.warming:
            lam = self.lam.to(x.dtype)
            x = x + lam * (_quant_activation(x) - x).detach()
            w = w + self.lam.to(w.dtype) * (_quant_weight(w) - w).detach()
        elif self.int8 is not None and torch.is_grad_enabled():
            return self.int8(x, self)[0]
        elif torch.is_grad_enabled():
            x = x + (_quant_activation(x) - x).detach()
            w = w + (_quant_weight(w) - w).detach()
        else:
            x, w = _quant_activation(x), _quant_weight(w)
        return F.linear(x, w, self.bias)


def set_quant_lambda(model: nn.Module, lam: float) -> None:
    """Set the quantisation strength of every BitLinear: 0 (float) to 1 (fully ternary).

    Below 1 the layers blend (``warming``); at 1 they return to the exact BitNet forward.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"quantisation lambda must be in [0, 1], got {lam}")
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.warming = lam < 1.0
            with torch.no_grad():
                m.lam.fill_(lam)


def _linear(config: BitNetConfig, proj: str) -> nn.Linear:
    """The projection `proj` (e.g. "self_attn.q_proj"), shaped by bitnet_cli.arch's table."""
    n_out, n_in = config.arch.projection_shape(proj)
    bias = config.arch.has_bias(proj)
    if config.quant != "bitnet":
        return nn.Linear(n_in, n_out, bias=bias)
    return BitLinear(n_in, n_out, bias, config.arch.bitlinear_norm_eps)


def _project_shared(owner: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """``[proj(x) for proj in owner.shared_input]``: the projections that read one input, as one
    stacked int8 product where ``bitnet_cli.train.int8_linear.enable`` gave ``owner`` one (training
    with ``train.int8_matmul``; not during quantisation warm-up), else one by one."""
    projs = [getattr(owner, name) for name in owner.shared_input]
    if owner.int8_fused is not None and torch.is_grad_enabled() and not projs[0].warming:
        return owner.int8_fused(x, *projs)
    return [p(x) for p in projs]


def _sub_norm_project(norm: nn.Module, proj: nn.Module, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``proj(norm(x))``, or with ``gate`` ``proj(norm(relu2(gate, x)))``: BitNet's sub-norm before o_proj and
    down_proj. Where the int8 path runs ``proj`` with its ``norm_quant`` (bitnet_cli.train.int8_linear), the
    norm (and relu2) and the rounding of ``proj``'s input are one kernel, the same numbers."""
    product = getattr(proj, "int8", None)
    if (product is not None and product.norm_quant and torch.is_grad_enabled() and not proj.warming
            and proj.rms_norm is None and proj.scale_op is None):
        return product(x, proj, norm=norm, gate=gate)[0]
    return proj(norm(x if gate is None else relu2(gate, x)))


def _residual_norm_project(owner: nn.Module, norm: nn.Module, x: torch.Tensor,
                           delta: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(h, [proj(norm(h)) for proj in owner.shared_input])`` with ``h = x + delta`` (x where delta is None): a
    decoder layer's residual add, the residual norm after it and the projections that read the norm. Where the int8
    path gives ``owner``'s stacked product the norm (bitnet_cli.train.int8_linear: ``residual_norm_quant``), the add,
    the norm and the rounding of the projections' input are one kernel, the same numbers."""
    product, projs = owner.int8_fused, [getattr(owner, name) for name in owner.shared_input]
    if product is not None and product.norm_quant and torch.is_grad_enabled() and not projs[0].warming:
        if delta is None:
            return x, product(x, *projs, norm=norm)
        *outs, h = product(x, *projs, norm=norm, residual=delta)
        return h, outs
    h = x if delta is None else x + _residual_output(delta)
    return h, _project_shared(owner, norm(h))


def _residual_output(delta):
    """A block's output for the residual stream: ``delta`` itself, or where the int8 path deferred the product that
    forms it (bitnet_cli.train.int8_linear.RoundedInput, a tuple: the residual norm after it takes the product in its
    own kernel, ``$BITNET_INT8_RESIDUAL_ROWS``) that product, taken here because this consumer does not."""
    return delta.output() if isinstance(delta, tuple) else delta


def _residual_attention_heads(attn: nn.Module, norm: nn.Module, x: torch.Tensor, delta: torch.Tensor | None,
                              cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(h, attn.heads(q, k, v, cos, sin))`` with ``h = x + delta`` and q, k, v the projections of ``norm(h)``
    (:func:`_residual_norm_project`): a decoder layer's first residual add, its norm, q/k/v and RoPE. Where the int8
    path marked the attention's stacked product ``rope_rows`` (bitnet_cli.train.int8_linear: ``Int8Product.rotary``),
    the product and RoPE are one autograd function, whose backward rounds q/k/v's output gradient in RoPE's backward
    kernel; the same numbers."""
    product, projs = attn.int8_fused, [getattr(attn, name) for name in attn.shared_input]
    if product is not None and product.rope_rows and torch.is_grad_enabled() and not projs[0].warming:
        return product.rotary(x, delta, norm, projs, cos, sin, attn.n_heads, attn.n_kv)
    x, (q, k, v) = _residual_norm_project(attn, norm, x, delta)
    return x, attn.heads(q, k, v, cos, sin)


def _residual_mlp(mlp: nn.Module, norm: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, mlp(norm(h)))`` with ``h = x + delta``: a decoder layer's second residual add, the norm after it and the
    MLP. Where the int8 path marked the MLP's stacked product ``gated_mlp`` (bitnet_cli.train.int8_linear:
    ``Int8Product.residual_mlp``), its gate/up product and sub-norm are one autograd function, whose backward rounds
    gate/up's output gradient in the sub-norm's backward kernel; the same numbers."""
    product = mlp.int8_fused
    if (product is not None and product.gated_mlp and torch.is_grad_enabled() and not mlp.gate_proj.warming
            and not mlp.down_proj.warming):
        return product.residual_mlp(x, delta, norm, mlp.gate_proj, mlp.up_proj, mlp.ffn_sub_norm, mlp.down_proj)
    x, (g, u) = _residual_norm_project(mlp, norm, x, delta)
    return x, mlp(g, u)


# ----------------------------------------------------------------------------- the decoder


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, rounded to ``x``'s dtype, then times ``weight`` (transformers' LlamaRMSNorm)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def relu2(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """BitNet's FFN activation: ``relu(gate)^2 * up``."""
    return F.relu(gate).square() * up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@torch.library.custom_op("bitnet::rope_tables", mutates_args=())
def _rope_tables(seq_len: int, dim: int, theta: float, llama3: list[float],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)`` [seq_len, dim] of RoPE; ``llama3``: the scaling's numbers in the order of
    bitnet_cli.arch.LLAMA3_ROPE_KEYS, or empty for the default RoPE (an op's arguments hold no dict).

    An opaque op so that torch.compile keeps the two small tables as tensors. Written inline, the
    compiled graph recomputed them inside every kernel that reads them, per element of q and k
    (a float64 pow, a sin and a cos for each), forward and backward: on an H200 the kernel forming
    the q/k/v gradient of the small recipe took ten times its memory traffic that way.

    On CUDA the tables are computed once per (dim, theta, scaling, device), at the longest length asked
    so far (each element depends on its position alone and CUDA's elementwise kernels compute every
    element alike, so a prefix of a longer table has the same bits), and each call returns copies of their
    first ``seq_len`` rows: a device-to-device copy, which a CUDA graph can capture (the computation starts
    with a host-to-device copy of inv_freq, which it cannot: torch.compile's ``reduce-overhead`` mode failed
    there). They are computed through :func:`on_own_thread` (outside any CUDA graph tree's pool). Elsewhere (where a
    vectorised loop's tail may round differently) each call computes them.
    """
    if device.type != "cuda":
        return _rope_compute(seq_len, dim, theta, llama3, device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (dim, theta, tuple(llama3), device)
    hit = _ROPE_TABLES.get(key)
    if hit is None or hit[0].shape[0] < seq_len:
        n = max(seq_len, 0 if hit is None else hit[0].shape[0])
        hit = _ROPE_TABLES[key] = on_own_thread(lambda: _rope_compute(n, dim, theta, llama3, device))
    cos, sin = hit
    return cos[:seq_len].clone(), sin[:seq_len].clone()


def on_own_thread(make):
    """``make()`` run on a thread of its own, its result returned (its exception raised here). CUDA memory
    kept across steps is made this way so that it never comes from a memory pool the calling thread's
    allocations are routed to: torch.compile's CUDA graph trees route a warm-up run's allocations to their
    pool, and a tensor kept from it fails their check that all live allocations are tracked."""
    import threading

    out: list = []

    def run():
        try:
            out.append((True, make()))
        except BaseException as e:  # handed to the caller
            out.append((False, e))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


# (dim, theta, llama3, device) -> fp32 (cos, sin) of the longest length computed so far (_rope_tables).
_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _rope_compute(seq_len: int, dim: int, theta: float, llama3: list[float],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from bitnet_cli.rope import inv_freq as rope_inv_freq  # transformers' fp32 inv_freq, bit for bit

    scaling = dict(zip(LLAMA3_ROPE_KEYS, llama3), rope_type="llama3") if llama3 else None
    inv_freq = torch.from_numpy(rope_inv_freq(dim, theta, scaling)).to(device)
    freqs = torch.arange(seq_len, device=device).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    out = emb.cos(), emb.sin()
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the caller's stream (another thread's) reads them next
    return out


@_rope_tables.register_fake
def _(seq_len, dim, theta, llama3, device):
    return (torch.empty((seq_len, dim), dtype=torch.float32, device=device),
            torch.empty((seq_len, dim), dtype=torch.float32, device=device))


def rope_cos_sin(seq_len: int, dim: int, theta: float, device, dtype,
                 scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    llama3 = [] if scaling is None else [float(scaling[k]) for k in LLAMA3_ROPE_KEYS]
    cos, sin = _rope_tables(seq_len, dim, float(theta), llama3, torch.device(device))
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of heads ``x`` [B, H, T, D] with ``rope_cos_sin``'s tables [T, D] (transformers' ``apply_rotary_pos_emb``);
    the result in the promoted dtype of x and the tables, as torch's products give it."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    shared_input = ("q_proj", "k_proj", "v_proj")  # projections of one input (_project_shared)
    residual_output = "o_proj"  # the projection whose output the residual stream adds (_residual_output)

    def __init__(self, config: BitNetConfig):
        super().__init__()
        self.int8_fused = None
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.arch.head_dim
        self.q_proj = _linear(config, "self_attn.q_proj")
        self.k_proj = _linear(config, "self_attn.k_proj")
        self.v_proj = _linear(config, "self_attn.v_proj")
        self.o_proj = _linear(config, "self_attn.o_proj")
        if config.arch.sub_norms:
            self.attn_sub_norm = RMSNorm(config.arch.norm_size("self_attn.attn_sub_norm"), config.rms_norm_eps)

    def heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The projections' outputs [B, T, width] as heads [B, heads, T, head_dim], q and k rotated (RoPE)."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention from its heads (the layer forms them: _residual_attention_heads), through o_proj."""
        B, _, T, _ = q.shape
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k = k[:, :, None].expand(B, self.n_kv, rep, T, self.head_dim).reshape(B, self.n_heads, T, self.head_dim)
            v = v[:, :, None].expand(B, self.n_kv, rep, T, self.head_dim).reshape(B, self.n_heads, T, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        if not hasattr(self, "attn_sub_norm"):
            return self.o_proj(y)
        return _sub_norm_project(self.attn_sub_norm, self.o_proj, y)


class MLP(nn.Module):
    shared_input = ("gate_proj", "up_proj")  # projections of one input (_project_shared)
    residual_output = "down_proj"  # the projection whose output the residual stream adds (_residual_output)

    def __init__(self, config: BitNetConfig):
        super().__init__()
        self.int8_fused = None
        self.gate_proj = _linear(config, "mlp.gate_proj")
        self.up_proj = _linear(config, "mlp.up_proj")
        self.down_proj = _linear(config, "mlp.down_proj")
        self.silu = config.arch.hidden_act == "silu"  # else relu2
        if config.arch.sub_norms:
            self.ffn_sub_norm = RMSNorm(config.arch.norm_size("mlp.ffn_sub_norm"), config.rms_norm_eps)

    def forward(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The MLP from its gate and up projections' outputs (the layer forms them: _residual_norm_project)."""
        if not hasattr(self, "ffn_sub_norm"):
            return self.down_proj(F.silu(g) * u if self.silu else relu2(g, u))
        if self.silu:
            return self.down_proj(self.ffn_sub_norm(F.silu(g) * u))
        return _sub_norm_project(self.ffn_sub_norm, self.down_proj, u, gate=g)


class DecoderLayer(nn.Module):
    def __init__(self, config: BitNetConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, delta=None):
        """The layer on the residual stream ``x + delta`` (``delta``: the previous layer's output, None before the first
        layer). Returns ``(h, out)``: the stream before this layer's MLP and the MLP's output, whose sum is the layer's
        output. Each residual add is left to the norm after it, with which the int8 path rounds in one kernel
        (_residual_norm_project); the model adds the last layer's itself."""
        x, heads = _residual_attention_heads(self.self_attn, self.input_layernorm, x, delta, cos, sin)
        attn = self.self_attn(*heads)
        return _residual_mlp(self.mlp, self.post_attention_layernorm, x, attn)


class BitNetModel(nn.Module):
    def __init__(self, config: BitNetConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class BitNetForCausalLM(nn.Module):
    """The causal LM: ``model(input_ids[B, T]) -> logits[B, T, V]`` (float, the weights' dtype)."""

    def __init__(self, config: BitNetConfig):
        super().__init__()
        self.config = config
        self.model = BitNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self):
        """transformers' init: N(0, initializer_range) for linears and embeddings, ones for norms."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(T, self.config.arch.head_dim, self.config.rope_theta, x.device, x.dtype,
                                self.config.arch.rope_scaling)
        delta = None
        for layer in self.model.layers:
            x, delta = layer(x, cos, sin, delta)
        return self.lm_head(self.model.norm(x if delta is None else x + _residual_output(delta)))

    # ------------------------------------------------------------------ HF checkpoints

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under transformers' names; a tied ``lm_head.weight`` is left out, as HF does."""
        sd = {k: v for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def save_pretrained(self, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (weights cast to ``dtype``, default their own)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sd = self.hf_state_dict()
        tensors = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in sd.items()}
        dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        cfg = self.config.to_hf_dict(dtype=dtype_name)
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(out / "model.safetensors", ordinary_mode())  # save_file makes it 0600, unlike config.json
        return out

    @classmethod
    def from_pretrained(
        cls, ckpt_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        quant: str | None = None,
    ) -> "BitNetForCausalLM":
        """Load a checkpoint directory (HF layout: config.json + model.safetensors, or sharded).

        Ternarised iff ``config.json`` has a bitnet ``quantization_config`` block, unless
        ``quant`` overrides it. Parameters are cast to ``dtype`` (default fp32). An offline-quantised
        checkpoint keeps its trits and weight_scale as stored (frozen; see BitLinear.load_offline).
        """
        ckpt = Path(ckpt_dir)
        cfg_path = ckpt / "config.json"
        if not cfg_path.is_file():
            raise BitnetError(f"{ckpt}: no config.json (expected a checkpoint directory in HF layout)")
        cfg_dict = read_json(cfg_path, "model config")
        if not isinstance(cfg_dict, dict):
            raise BitnetError(f"{cfg_path}: not a JSON object")
        config = BitNetConfig.from_hf_dict(cfg_dict, str(cfg_path))
        convention = bitnet_convention(cfg_dict.get("quantization_config"), str(cfg_path))
        offline = convention is not None and convention[0] == "offline"
        if quant is not None:
            if offline and quant != "bitnet":
                raise BitnetError(f"{ckpt}: this checkpoint stores ternary weights; it cannot be run with quant={quant!r}")
            config = dataclasses.replace(config, quant=quant)
        with torch.device("meta"):
            model = cls(config)
        state = _read_safetensors(ckpt)
        stored = _offline_weights(ckpt, model, state) if offline else {}
        expected = {k: v for k, v in model.hf_state_dict().items() if k.removesuffix(".weight") not in stored}
        missing = sorted(set(expected) - set(state))
        if missing == ["lm_head.weight"] and "model.embed_tokens.weight" in state:
            raise BitnetError(f"{ckpt}: lm_head.weight is missing and tie_word_embeddings is false")
        if missing:
            raise BitnetError(f"{ckpt}: missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        unexpected = sorted(set(state) - set(expected) - {"lm_head.weight"})
        if unexpected:
            raise BitnetError(f"{ckpt}: unexpected tensors (not a BitNet checkpoint?): {', '.join(unexpected[:5])}")
        for name, ref in expected.items():
            if tuple(state[name].shape) != tuple(ref.shape):
                raise BitnetError(
                    f"{ckpt}: tensor {name} has shape {tuple(state[name].shape)}, config says {tuple(ref.shape)}"
                )
        model = model.to_empty(device=device)
        set_quant_lambda(model, 1.0)  # to_empty left the non-persistent lambda buffers uninitialised
        state = {k: v.to(dtype) for k, v in state.items() if k in expected}
        model.load_state_dict(state, strict=False, assign=False)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model = model.to(dtype).eval()
        for name, (trits, scale) in stored.items():
            model.get_submodule(name).load_offline(trits.to(device), scale.to(device), convention[1])
        return model


def _offline_weights(ckpt: Path, model: BitNetForCausalLM, state: dict[str, torch.Tensor]) -> dict:
    """Take an offline-quantised checkpoint's BitLinear tensors out of `state`: module name ->
    (trits as float [N, K], weight_scale). A weight is transformers' uint8 packing (4 output rows
    a byte, bitnet_cli.pack.ternary.unpack_hf_packed) or ternary floats; its weight_scale must be there."""
    from bitnet_cli.pack.ternary import unpack_hf_packed

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, BitLinear):
            continue
        wname, sname = name + ".weight", name + ".weight_scale"
        if wname not in state:
            continue  # reported with the other missing tensors
        if sname not in state:
            raise BitnetError(f"{ckpt}: tensor {sname} is missing (an offline-quantised checkpoint has one per BitLinear)")
        w, scale = state.pop(wname), state.pop(sname).float()
        n, k = module.out_features, module.in_features
        if w.dtype == torch.uint8 and tuple(w.shape) == (-(-n // 4), k):
            try:
                trits = torch.from_numpy(unpack_hf_packed(w.numpy(), n)).float()
            except ValueError as e:
                raise BitnetError(f"{ckpt}: tensor {wname}: {e}") from None
        elif w.is_floating_point() and tuple(w.shape) == (n, k) and bool(torch.isin(w, torch.tensor([-1.0, 0.0, 1.0])).all()):
            trits = w.float()
        else:
            raise BitnetError(f"{ckpt}: tensor {wname} ({w.dtype}, {tuple(w.shape)}) is neither uint8-packed "
                              f"[{-(-n // 4)}, {k}] nor ternary floats [{n}, {k}]")
        if scale.numel() != 1 or not bool(torch.isfinite(scale).all()) or float(scale) <= 0:
            raise BitnetError(f"{ckpt}: tensor {sname} must be one positive number")
        out[name] = (trits, scale)
    return out


def _read_safetensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (the files bitnet_cli.checkpoint finds and checks)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in tensor_files(ckpt):
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise BitnetError(f"{path}: cannot read safetensors ({e})") from None
    return state
