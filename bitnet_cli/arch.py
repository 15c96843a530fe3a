"""The model description: one place for every fact about a model's shape and tensor names.

Every stage asks this module (pure Python, no numpy or torch) rather than writing the facts again:

- :class:`ModelDims`: the numbers a forward pass needs, parsed and checked ONCE from an HF
  ``config.json`` dict (:meth:`ModelDims.from_config`); errors name the config key.
- :data:`PROJECTIONS` / :data:`LAYER_NORMS`: per decoder layer, each tensor's HF name, its field
  in the C engine's ``bn_layer_desc`` (kernels/bitnet.h), its llama.cpp GGUF name and its shape
  as a function of the description. The packer, the engine, the GGUF exporter, the torch model
  and the benchmarks iterate these tables.
- :data:`PRESETS`: the named shapes, used alike by ``bitnet train`` (``model.preset``) and by
  ``bitnet bench --shape`` (synthetic models).
- counting: parameters and training FLOPs.

Adding a model family: give :class:`ModelDims` its fields, read and check them in
:meth:`ModelDims._family` (the one method that knows family-specific config keys), write them
back in :meth:`ModelDims.hf_config`, and let :meth:`ModelDims.projections` /
:meth:`ModelDims.layer_norms` say which table rows the family has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from bitnet_cli.errors import BitnetError
from bitnet_cli.safejson import short

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
LAYER_PREFIX = "model.layers."


# The largest dimensions the packer and the C engine accept (int32 arithmetic in the kernels,
# and far beyond any published model). The training recipe's schema uses the same bounds.
DIM_LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 4096,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "max_position_embeddings": 1 << 24,
}


@dataclass(frozen=True)
class Family:
    """A model family: the HF model_type that selects it and what its layers look like."""

    model_type: str
    architecture: str  # config.json's architectures entry (transformers' class)
    default_act: str  # hidden_act when the config leaves it out (transformers' config default)
    sub_norms: bool  # attn_sub_norm before o_proj and ffn_sub_norm before down_proj
    qkv_bias: bool = False  # float biases on q_proj, k_proj and v_proj (Qwen2), added after the ternary product


FAMILIES: dict[str, Family] = {
    # BitNet b1.58 (microsoft/bitnet-b1.58-2B-4T, 1bitLLM): relu2 gate, both sub-norms
    "bitnet": Family("bitnet", "BitNetForCausalLM", "relu2", True),
    # Llama-architecture 1.58-bit models (HF1BitLLM/Llama3-8B-1.58, Falcon3-*-1.58bit, Falcon-E):
    # LlamaForCausalLM with BitLinear projections: SiLU gate, no sub-norms, optional llama3 RoPE
    "llama": Family("llama", "LlamaForCausalLM", "silu", False),
    # Qwen2 / Qwen2.5 with BitLinear projections (made ternary by `bitnet train`'s model.init_from,
    # or transformers' Qwen2ForCausalLM with the bitnet quantization_config): Llama with float q/k/v biases.
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "silu", False, qkv_bias=True),
}
FAMILY_BY_MODEL_TYPE = {f.model_type: name for name, f in FAMILIES.items()}
ACTIVATIONS = ("relu2", "silu")  # the FFN gate act(gate) * up; both run on every backend
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def bitlinear_norm_eps(quant: dict, where: str) -> float | None:
    """The eps of the RMSNorm transformers puts on every BitLinear's input when a quantization_config says
    ``use_rms_norm: true`` (its ``rms_norm_eps``, BitNetQuantConfig's default 1e-6), or None when it does not."""
    flag = quant.get("use_rms_norm", False)
    if not isinstance(flag, bool):
        raise BitnetError(f"{where}: quantization_config.use_rms_norm must be true or false, got {short(flag)}")
    if not flag:
        return None
    eps = quant.get("rms_norm_eps", 1e-6)
    if type(eps) not in (int, float) or not math.isfinite(eps) or eps <= 0:
        raise BitnetError(f"{where}: quantization_config.rms_norm_eps must be a positive finite number when "
                          f"use_rms_norm is true, got {short(eps)}")
    return float(eps)


def rope_scaling_from_config(config: dict, where: str = "config") -> dict | None:
    """The RoPE scaling of an HF config: None (default RoPE) or ``{"rope_type": "llama3", <LLAMA3_ROPE_KEYS>}``.

    Reads transformers 5's ``rope_parameters`` or 4.x's ``rope_scaling`` (``type`` or ``rope_type``).
    Any other scaling, or a llama3 block missing one of its keys, is refused by name.
    """
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise BitnetError(f"{where}: rope_parameters must be a JSON object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise BitnetError(f"{where}: RoPE scaling rope_type={kind!r} is not supported (default or llama3)")
    out: dict = {"rope_type": "llama3"}
    for key in LLAMA3_ROPE_KEYS:
        value = rope.get(key)
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise BitnetError(f"{where}: llama3 RoPE scaling needs a positive number for {key!r}, got {value!r}")
        out[key] = int(value) if key == "original_max_position_embeddings" else float(value)
    if out["low_freq_factor"] == out["high_freq_factor"]:
        raise BitnetError(f"{where}: llama3 RoPE scaling has low_freq_factor == high_freq_factor")
    return out


@dataclass(frozen=True)
class ModelDims:
    """The numbers a forward pass needs, read (and checked) from an HF config: the shape, and the
    family fields (FFN activation, sub-norms, RoPE scaling) that tell BitNet b1.58 and the
    Llama-architecture 1.58-bit models apart."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    family: str = "bitnet"  # a FAMILIES key
    hidden_act: str = "relu2"  # the FFN gate's activation, one of ACTIVATIONS
    rope_scaling: dict | None = None  # None, or rope_scaling_from_config's llama3 block
    # quantization_config use_rms_norm (transformers' BitLinear / AutoBitLinear): an RMSNorm with its own
    # weight on every projection's input before the int8 quantisation, with this eps; None: none
    bitlinear_norm_eps: float | None = None

    @property
    def sub_norms(self) -> bool:
        """Whether the layers have attn_sub_norm and ffn_sub_norm (BitNet b1.58's extra norms)."""
        return FAMILIES[self.family].sub_norms

    @property
    def qkv_bias(self) -> bool:
        """Whether q_proj, k_proj and v_proj carry (float) biases (Qwen2)."""
        return FAMILIES[self.family].qkv_bias

    @classmethod
    def from_config(cls, config: dict, where: str = "config") -> "ModelDims":
        """Parse and check an HF config dict; `where` prefixes every error (e.g. the file's path)."""
        if not isinstance(config, dict):
            raise BitnetError(f"{where}: the config must be a JSON object")

        def positive_int(key, default=None):
            value, limit = config.get(key, default), DIM_LIMITS[key]
            if type(value) is not int or not 0 < value <= limit:
                raise BitnetError(f"{where}: {key} must be a positive integer <= {limit}, got {short(value)}")
            return value

        heads = positive_int("num_attention_heads")
        kv_heads = config.get("num_key_value_heads") or heads
        hidden = positive_int("hidden_size")
        head_dim = config.get("head_dim") or (hidden // heads)
        family = ModelDims._family_name(config, where)
        if type(kv_heads) is not int or kv_heads <= 0 or heads % kv_heads:
            raise BitnetError(f"{where}: num_key_value_heads={short(kv_heads)} must divide num_attention_heads={heads}")
        if type(head_dim) is not int or head_dim <= 0 or head_dim % 2 or head_dim > 4096:
            raise BitnetError(f"{where}: head_dim={short(head_dim)} must be a positive even integer <= 4096 (RoPE)")
        if FAMILIES[family].sub_norms and head_dim * heads != hidden:
            raise BitnetError(
                f"{where}: head_dim={short(head_dim)} x num_attention_heads={heads} must equal hidden_size={hidden} "
                "(transformers sizes attn_sub_norm, over the concatenated heads, by hidden_size)"
            )
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise BitnetError(f"{where}: RoPE scaling {short(rope)} is not supported (rope_parameters must be a "
                              "JSON object)")
        theta = rope.get("rope_theta", config.get("rope_theta", 500000.0))
        eps = config.get("rms_norm_eps", 1e-5)
        for key, value in (("rope_theta", theta), ("rms_norm_eps", eps)):
            # bool is an int, NaN and inf are floats: none of them is a usable constant here
            if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
                raise BitnetError(f"{where}: {key} must be a positive finite number, got {short(value)}")
        tie = config.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise BitnetError(f"{where}: tie_word_embeddings must be true or false, got {short(tie)}")
        return cls(
            vocab_size=positive_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=positive_int("intermediate_size"),
            num_layers=positive_int("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(eps),
            rope_theta=float(theta),
            max_position_embeddings=positive_int("max_position_embeddings", 2048),
            tie_word_embeddings=tie,
            **cls._family(config, family, where),
        )

    @staticmethod
    def _family_name(config: dict, where: str) -> str:
        model_type = config.get("model_type", "bitnet")
        if model_type not in FAMILY_BY_MODEL_TYPE:
            raise BitnetError(f"{where}: model_type={model_type!r} is not supported "
                              f"(one of {', '.join(FAMILY_BY_MODEL_TYPE)})")
        return FAMILY_BY_MODEL_TYPE[model_type]

    @staticmethod
    def _family(config: dict, family: str, where: str) -> dict:
        """The family fields (FFN activation, RoPE scaling; sub-norms follow from the family), checked.

        The one place that knows which config keys select a family; it returns the keyword
        arguments of the family's fields. transformers' BitNet and Llama classes both read
        hidden_act, so either family may gate with relu2 or silu; the default is the family's.
        """
        act = config.get("hidden_act", FAMILIES[family].default_act)
        if act not in ACTIVATIONS:
            raise BitnetError(f"{where}: hidden_act={short(act)} is not supported (one of {', '.join(ACTIVATIONS)})")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise BitnetError(f"{where}: attention/MLP biases are not supported")
        if config.get("use_sliding_window") or any(t != "full_attention" for t in config.get("layer_types") or []):
            raise BitnetError(f"{where}: sliding-window attention layers are not supported")
        quant = config.get("quantization_config") or {}
        if not isinstance(quant, dict):
            raise BitnetError(f"{where}: quantization_config must be a JSON object, got {short(quant)}")
        return {"family": family, "hidden_act": act, "rope_scaling": rope_scaling_from_config(config, where),
                "bitlinear_norm_eps": bitlinear_norm_eps(quant, where)}

    def hf_config(self, source: dict) -> dict:
        """The HF config a packed file stores: `source` with every field engines need made explicit.

        The source's `quantization_config` is dropped: it describes the source's storage, and the
        packed file's storage is described by its own `layout` metadata key. Only `use_rms_norm`
        and its `rms_norm_eps` stay (in a `quantization_config` of those two keys), when set. The RoPE block is
        written in both spellings (transformers 5's rope_parameters, 4.x's rope_theta/rope_scaling).
        """
        out = {k: v for k, v in source.items() if k not in ("quantization_config", "rope_parameters", "rope_scaling")}
        fam = FAMILIES[self.family]
        out.update(
            model_type=fam.model_type, architectures=[fam.architecture], head_dim=self.head_dim,
            num_key_value_heads=self.num_kv_heads, rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act,
            rope_parameters=dict(self.rope_scaling or {"rope_type": "default"}, rope_theta=self.rope_theta),
        )
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(self.rope_scaling)
        if self.bitlinear_norm_eps is not None:  # the one quantization_config field that shapes the model
            out["quantization_config"] = {"use_rms_norm": True, "rms_norm_eps": self.bitlinear_norm_eps}
        return out

    # ------------------------------------------------------------------ the tables, for this model

    def projections(self) -> tuple["Projection", ...]:
        """The BitLinear projections of one decoder layer (every family has all seven)."""
        return PROJECTIONS

    def layer_norms(self) -> tuple["LayerNorm", ...]:
        """The RMSNorm weights of one decoder layer: without the sub-norms in a family that has none."""
        return LAYER_NORMS if self.sub_norms else tuple(n for n in LAYER_NORMS if n.name not in SUB_NORMS)

    def bitlinear_norm(self, proj: str) -> str | None:
        """The module of projection `proj`'s own input RMSNorm (use_rms_norm), e.g. 'self_attn.q_proj.rms_norm',
        or None when the model has none."""
        return f"{proj}.{BITLINEAR_NORM}" if self.bitlinear_norm_eps is not None else None

    def has_bias(self, proj: str) -> bool:
        """Whether projection `proj` (a short name, e.g. 'self_attn.q_proj') carries a float bias [N]."""
        return self.qkv_bias and proj in QKV_PROJECTIONS

    def projection_shape(self, proj: str) -> tuple[int, int]:
        """(N outputs, K inputs) of a BitLinear layer, by its short name (e.g. 'self_attn.k_proj')."""
        return PROJECTION_BY_NAME[proj].shape(self)

    def norm_size(self, norm: str) -> int:
        return NORM_BY_NAME[norm].size(self)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def head_name(self) -> str:
        """The tensor the output head reads: the embedding when tied."""
        return EMBED if self.tie_word_embeddings else LM_HEAD

    def hf_tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        """Every tensor of the model in HF layout, in file order: (name, float shape, kind), kind
        being "embedding" (the input embedding, and the head when untied), "norm", "projection" or
        "bias" (a projection's float bias, after its weight); a projection's own input norm (use_rms_norm)
        is a "norm" just before it."""
        out = [(EMBED, (self.vocab_size, self.hidden_size), "embedding")]
        for i in range(self.num_layers):
            out += [(layer_tensor(i, n.name), (n.size(self),), "norm") for n in self.layer_norms()]
            for p in self.projections():
                if self.bitlinear_norm(p.name):
                    out.append((layer_tensor(i, self.bitlinear_norm(p.name)), (p.shape(self)[1],), "norm"))
                out.append((layer_tensor(i, p.name), p.shape(self), "projection"))
                if self.has_bias(p.name):
                    out.append((layer_tensor(i, p.name, "bias"), (p.shape(self)[0],), "bias"))
        out.append((FINAL_NORM, (self.hidden_size,), "norm"))
        if not self.tie_word_embeddings:
            out.append((LM_HEAD, (self.vocab_size, self.hidden_size), "embedding"))
        return out

    # ------------------------------------------------------------------ counting

    def ternary_parameters(self) -> int:
        """Weights of all BitLinear projections (unpadded)."""
        return self.num_layers * sum(n * k for n, k in (p.shape(self) for p in self.projections()))

    def norm_parameters(self) -> int:
        per_layer = sum(n.size(self) for n in self.layer_norms())
        if self.bitlinear_norm_eps is not None:
            per_layer += sum(p.shape(self)[1] for p in self.projections())
        return self.num_layers * per_layer + self.hidden_size

    def embedding_parameters(self) -> int:
        """The input embedding, plus the head when it is untied."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def bias_parameters(self) -> int:
        return self.num_layers * sum(p.shape(self)[0] for p in self.projections() if self.has_bias(p.name))

    def parameters(self, exclude_embeddings: bool = False) -> int:
        """All parameters (a tied head counted once); without the input embedding if asked."""
        n = self.ternary_parameters() + self.norm_parameters() + self.embedding_parameters() + self.bias_parameters()
        return n - self.vocab_size * self.hidden_size if exclude_embeddings else n

    def training_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM-style accounting.

        6 x (matmul parameters: projections and the head, not the embedding lookup) plus
        12 x layers x heads x head_dim x seq_len for the attention scores and values.
        """
        n_matmul = self.ternary_parameters() + self.hidden_size * self.vocab_size
        return 6 * n_matmul + 12 * self.num_layers * self.q_dim * seq_len


@dataclass(frozen=True)
class Projection:
    """One BitLinear projection of a decoder layer."""

    name: str  # HF module path inside a layer, e.g. "self_attn.q_proj" (tensor: <layer>.<name>.weight)
    c_field: str  # bn_layer_desc's w<c_field> (packed trits), g<c_field> (gamma), b<c_field> (bias) and
    # n<c_field> (its own input norm), kernels/bitnet.h
    gguf: str  # llama.cpp's name: blk.<i>.<gguf>.weight
    shape: Callable[[ModelDims], tuple[int, int]]  # (N outputs, K inputs)


@dataclass(frozen=True)
class LayerNorm:
    """One RMSNorm weight of a decoder layer."""

    name: str
    c_field: str  # bn_layer_desc's field
    gguf: str
    size: Callable[[ModelDims], int]


PROJECTIONS: tuple[Projection, ...] = (
    Projection("self_attn.q_proj", "q", "attn_q", lambda d: (d.q_dim, d.hidden_size)),
    Projection("self_attn.k_proj", "k", "attn_k", lambda d: (d.kv_dim, d.hidden_size)),
    Projection("self_attn.v_proj", "v", "attn_v", lambda d: (d.kv_dim, d.hidden_size)),
    Projection("self_attn.o_proj", "o", "attn_output", lambda d: (d.hidden_size, d.q_dim)),
    Projection("mlp.gate_proj", "g", "ffn_gate", lambda d: (d.intermediate_size, d.hidden_size)),
    Projection("mlp.up_proj", "u", "ffn_up", lambda d: (d.intermediate_size, d.hidden_size)),
    Projection("mlp.down_proj", "d", "ffn_down", lambda d: (d.hidden_size, d.intermediate_size)),
)
LAYER_NORMS: tuple[LayerNorm, ...] = (
    LayerNorm("input_layernorm", "attn_norm", "attn_norm", lambda d: d.hidden_size),
    LayerNorm("post_attention_layernorm", "post_norm", "ffn_norm", lambda d: d.hidden_size),
    # transformers sizes attn_sub_norm by hidden_size; from_config requires heads x head_dim == hidden
    # in the families that have it
    LayerNorm("self_attn.attn_sub_norm", "attn_sub_norm", "attn_sub_norm", lambda d: d.q_dim),
    LayerNorm("mlp.ffn_sub_norm", "ffn_sub_norm", "ffn_sub_norm", lambda d: d.intermediate_size),
)
SUB_NORMS = ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")
BITLINEAR_NORM = "rms_norm"  # transformers' BitLinear submodule of use_rms_norm: <proj>.rms_norm.weight
QKV_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # the ones a qkv_bias family biases
PROJECTION_BY_NAME = {p.name: p for p in PROJECTIONS}
NORM_BY_NAME = {n.name: n for n in LAYER_NORMS}
# Tensors outside the decoder layers, by HF name -> GGUF name.
GLOBAL_GGUF_NAMES = {EMBED: "token_embd.weight", FINAL_NORM: "output_norm.weight", LM_HEAD: "output.weight"}


def layer_tensor(i: int, module: str, kind: str = "weight") -> str:
    """HF tensor name of `module` (a Projection or LayerNorm name) in layer i, e.g. model.layers.3.mlp.up_proj.weight."""
    return f"{LAYER_PREFIX}{i}.{module}.{kind}"


def split_layer_tensor(name: str) -> tuple[int, str, str]:
    """(layer, module, kind) of a layer tensor name: the inverse of layer_tensor."""
    if not name.startswith(LAYER_PREFIX):
        raise ValueError(f"{name!r} is not a decoder-layer tensor")
    layer, rest = name[len(LAYER_PREFIX):].split(".", 1)
    module, kind = rest.rsplit(".", 1)
    return int(layer), module, kind


def gguf_name(hf_name: str) -> str:
    """HF tensor name -> llama.cpp GGUF tensor name (model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight;
    a projection's weight_scale -> blk.3.ffn_up.scale, its bias -> blk.3.attn_q.bias)."""
    if hf_name in GLOBAL_GGUF_NAMES:
        return GLOBAL_GGUF_NAMES[hf_name]
    layer, module, kind = split_layer_tensor(hf_name)
    entry = PROJECTION_BY_NAME.get(module) or NORM_BY_NAME[module]
    return f"blk.{layer}.{entry.gguf}.{ {'weight_scale': 'scale', 'bias': 'bias'}.get(kind, 'weight')}"


# ------------------------------------------------------------------------------ presets


@dataclass(frozen=True)
class Preset:
    """A named model shape: HF config fields, and where the numbers come from."""

    source: str
    fields: dict


# The columns of the preset rows below; None leaves a field to the user of the preset.
_PRESET_COLUMNS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "tie_word_embeddings", "max_position_embeddings", "rope_theta")


def _preset(source: str, *values, **family_fields) -> Preset:
    """A preset from a row of _PRESET_COLUMNS (None: left open), plus any family fields (model_type, ...)."""
    return Preset(source, {k: v for k, v in zip(_PRESET_COLUMNS, values, strict=True) if v is not None}
                  | family_fields)


_LLAMA3_8B = (128256, 4096, 14336, 32, 32, 8, False, 8192, 500000.0)
_LLAMA = dict(model_type="llama", hidden_act="silu")


PRESETS: dict[str, Preset] = {
    # Toy shapes for tests and CPU runs. No vocab_size: training takes the tokenizer's, a
    # synthetic model SYNTHETIC_DEFAULTS'.
    "tiny": _preset("toy", None, 128, 352, 4, 4, 2, True, None, 10000.0),
    "small": _preset("toy (GPT-2 small's width and depth)", None, 768, 2048, 12, 12, 12, True, None, 10000.0),
    # The BitNet b1.58 paper's sizes (Ma et al., 2024) as released by its reproduction
    # 1bitLLM/bitnet_b1_58-{large,xl,3B} (config.json: LLaMA tokenizer + 2 added tokens).
    "700m": _preset("1bitLLM/bitnet_b1_58-large", 32002, 1536, 4096, 24, 16, 16, True, 2048, 10000.0),
    "1.3b": _preset("1bitLLM/bitnet_b1_58-xl", 32002, 2048, 5460, 24, 32, 32, True, 2048, 10000.0),
    "3b": _preset("1bitLLM/bitnet_b1_58-3B", 32002, 3200, 8640, 26, 32, 32, True, 2048, 10000.0),
    "2b4t": _preset("microsoft/bitnet-b1.58-2B-4T", 128256, 2560, 6912, 30, 20, 5, True, 4096, 500000.0),
    "8b": _preset("HF1BitLLM/Llama3-8B-1.58-100B-tokens's shape, as BitNet b1.58", *_LLAMA3_8B),
    # The Llama-architecture 1.58-bit models themselves (their config.json): SiLU gate, no
    # sub-norms, untied head; Falcon3's heads are 256 wide.
    "llama3-8b-1.58": _preset("HF1BitLLM/Llama3-8B-1.58-100B-tokens", *_LLAMA3_8B, **_LLAMA, rms_norm_eps=1e-5),
    "falcon3-1b-1.58": _preset("tiiuae/Falcon3-1B-Instruct-1.58bit", 131072, 2048, 8192, 18, 8, 4, False, 8192,
                               1000042.0, **_LLAMA, head_dim=256, rms_norm_eps=1e-6),
}
# What a synthetic (random-weight) model of a preset takes for the fields a toy preset leaves open.
SYNTHETIC_DEFAULTS = dict(vocab_size=512, max_position_embeddings=2048)


def preset_fields(name: str) -> dict:
    """The config fields of a named preset (a copy); errors list the names."""
    if name not in PRESETS:
        raise BitnetError(f"unknown shape {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name].fields)


def bitnet_config(fields: dict) -> dict:
    """A complete HF config.json dict from shape fields (a preset's, or any): model_type bitnet
    unless the fields name another family's, with that family's architecture and activation."""
    family = FAMILIES[ModelDims._family_name(fields, "shape")]
    return {
        "architectures": [family.architecture], "model_type": family.model_type, "hidden_act": family.default_act,
        "rms_norm_eps": 1e-5, "attention_bias": False,
        **fields,
    }
