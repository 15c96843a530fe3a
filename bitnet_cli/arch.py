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
class ModelDims:
    """The numbers a BitNet b1.58 forward pass needs, read (and checked) from an HF config."""

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
        if type(kv_heads) is not int or kv_heads <= 0 or heads % kv_heads:
            raise BitnetError(f"{where}: num_key_value_heads={short(kv_heads)} must divide num_attention_heads={heads}")
        if type(head_dim) is not int or head_dim <= 0 or head_dim % 2 or head_dim * heads != hidden:
            raise BitnetError(
                f"{where}: head_dim={short(head_dim)} x num_attention_heads={heads} must equal hidden_size={hidden} "
                "(attn_sub_norm normalises the concatenated heads) and be even (RoPE)"
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
            **cls._family(config, rope, where),
        )

    @staticmethod
    def _family(config: dict, rope: dict, where: str) -> dict:
        """The family-specific fields (FFN activation, sub-norms, RoPE scaling, ...), checked.

        The one place that knows which config keys select a family; it returns the keyword
        arguments of the family's fields. Only BitNet b1.58 is implemented (relu2 FFN, both
        sub-norms, plain RoPE, no biases), so it has no fields yet and only refuses the rest.
        """
        act = config.get("hidden_act", "relu2")
        if act != "relu2":
            raise BitnetError(f"{where}: hidden_act={short(act)} is not supported (BitNet b1.58 uses relu2)")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise BitnetError(f"{where}: attention/MLP biases are not supported")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise BitnetError(f"{where}: RoPE scaling {short(rope)} is not supported (only default RoPE)")
        quant = config.get("quantization_config") or {}
        if not isinstance(quant, dict):
            raise BitnetError(f"{where}: quantization_config must be a JSON object, got {short(quant)}")
        if quant.get("use_rms_norm"):
            raise BitnetError(f"{where}: quantization_config.use_rms_norm=true is not supported")
        return {}

    def hf_config(self, source: dict) -> dict:
        """The HF config a packed file stores: `source` with every field engines need made explicit.

        The source's `quantization_config` is dropped: it describes the source's storage, and the
        packed file's storage is described by its own `layout` metadata key.
        """
        out = {k: v for k, v in source.items() if k != "quantization_config"}
        out.update(
            model_type="bitnet", head_dim=self.head_dim, num_key_value_heads=self.num_kv_heads,
            rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="relu2",
        )
        return out

    # ------------------------------------------------------------------ the tables, for this model

    def projections(self) -> tuple["Projection", ...]:
        """The BitLinear projections of one decoder layer (every family has all seven)."""
        return PROJECTIONS

    def layer_norms(self) -> tuple["LayerNorm", ...]:
        """The RMSNorm weights of one decoder layer (a family without sub-norms filters them out)."""
        return LAYER_NORMS

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
        being "embedding" (the input embedding, and the head when untied), "norm" or "projection"."""
        out = [(EMBED, (self.vocab_size, self.hidden_size), "embedding")]
        for i in range(self.num_layers):
            out += [(layer_tensor(i, n.name), (n.size(self),), "norm") for n in self.layer_norms()]
            out += [(layer_tensor(i, p.name), p.shape(self), "projection") for p in self.projections()]
        out.append((FINAL_NORM, (self.hidden_size,), "norm"))
        if not self.tie_word_embeddings:
            out.append((LM_HEAD, (self.vocab_size, self.hidden_size), "embedding"))
        return out

    # ------------------------------------------------------------------ counting

    def ternary_parameters(self) -> int:
        """Weights of all BitLinear projections (unpadded)."""
        return self.num_layers * sum(n * k for n, k in (p.shape(self) for p in self.projections()))

    def norm_parameters(self) -> int:
        return self.num_layers * sum(n.size(self) for n in self.layer_norms()) + self.hidden_size

    def embedding_parameters(self) -> int:
        """The input embedding, plus the head when it is untied."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def parameters(self, exclude_embeddings: bool = False) -> int:
        """All parameters (a tied head counted once); without the input embedding if asked."""
        n = self.ternary_parameters() + self.norm_parameters() + self.embedding_parameters()
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
    c_field: str  # bn_layer_desc's w<c_field> (packed trits) and g<c_field> (gamma), kernels/bitnet.h
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
    LayerNorm("self_attn.attn_sub_norm", "attn_sub_norm", "attn_sub_norm", lambda d: d.q_dim),
    LayerNorm("mlp.ffn_sub_norm", "ffn_sub_norm", "ffn_sub_norm", lambda d: d.intermediate_size),
)
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
    a projection's weight_scale -> blk.3.ffn_up.scale)."""
    if hf_name in GLOBAL_GGUF_NAMES:
        return GLOBAL_GGUF_NAMES[hf_name]
    layer, module, kind = split_layer_tensor(hf_name)
    entry = PROJECTION_BY_NAME.get(module) or NORM_BY_NAME[module]
    return f"blk.{layer}.{entry.gguf}.{'scale' if kind == 'weight_scale' else 'weight'}"


# ------------------------------------------------------------------------------ presets


@dataclass(frozen=True)
class Preset:
    """A named model shape: HF config fields, and where the numbers come from."""

    source: str
    fields: dict


# The columns of the preset rows below; None leaves a field to the user of the preset.
_PRESET_COLUMNS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "tie_word_embeddings", "max_position_embeddings", "rope_theta")


def _preset(source: str, *values) -> Preset:
    return Preset(source, {k: v for k, v in zip(_PRESET_COLUMNS, values, strict=True) if v is not None})


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
    "8b": _preset("HF1BitLLM/Llama3-8B-1.58-100B-tokens", 128256, 4096, 14336, 32, 32, 8, False, 8192, 500000.0),
}
# What a synthetic (random-weight) model of a preset takes for the fields a toy preset leaves open.
SYNTHETIC_DEFAULTS = dict(vocab_size=512, max_position_embeddings=2048)


def preset_fields(name: str) -> dict:
    """The config fields of a named preset (a copy); errors list the names."""
    if name not in PRESETS:
        raise BitnetError(f"unknown shape {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name].fields)


def bitnet_config(fields: dict) -> dict:
    """A complete HF config.json dict of model_type bitnet from shape fields (a preset's, or any)."""
    return {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "relu2",
        "rms_norm_eps": 1e-5, "attention_bias": False,
        **fields,
    }
