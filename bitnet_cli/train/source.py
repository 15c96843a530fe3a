"""Full-precision source models for conversion (``model.init_from``) and distillation teachers.

A source is an HF-layout checkpoint directory (one file or sharded), one of our runs, or a hub
id. Only its ``config.json`` and safetensors headers are read when it is opened, so an
unsupported architecture is refused before any data or weight work. :data:`ACCEPTED` is the
list of what converts; anything else is named and refused.

Weights are copied by name into the student: every tensor the student needs must be in the
source with the same shape, and every source tensor must land somewhere (a tensor the student
has no place for is an error, never silently dropped).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bitnet_cli.checkpoint import TensorEntry, _checkpoint_dir, read_json, read_safetensors_header, tensor_files
from bitnet_cli.arch import FAMILIES, FAMILY_BY_MODEL_TYPE
from bitnet_cli.errors import BitnetError
from bitnet_cli.model import BitNetConfig, BitNetForCausalLM

# model_type -> what it is, as the refusal message and the docs list it.
ACCEPTED = {
    "bitnet": "BitNet b1.58 (BitNetForCausalLM) with float weights, e.g. one of our `quant: none` runs",
    "llama": "Llama (LlamaForCausalLM: Llama 2/3 with default or llama3 RoPE, and Llama-architecture models)",
    "qwen2": "Qwen2 / Qwen2.5 (Qwen2ForCausalLM; q/k/v biases kept in float)",
}
# Architectures we know and refuse, with what stands in the way (named in the refusal).
REFUSED = {
    "qwen3": "Qwen3's per-head q_norm/k_norm (RMSNorm on queries and keys before RoPE) are not in the packed "
             "format or the C engine",
}
# Tensors some checkpoints carry that are derived, not learned (recomputed from the config).
_DERIVED = ("rotary_emb.inv_freq",)


@dataclass
class Source:
    """An opened source checkpoint: config and tensor index; no weights read yet."""

    path: Path
    where: str  # how the user named it (path or hub:<id>), for messages
    config: dict
    tensors: dict[str, tuple[Path, TensorEntry]]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type")

    def read(self, name: str) -> torch.Tensor:
        """One tensor as float32 (bf16/f16 widened exactly)."""
        from bitnet_cli.checkpoint import Checkpoint

        ckpt = Checkpoint(self.path, self.config, "hf", self.tensors, "")
        arr = ckpt.read(name)
        if arr.dtype != np.float32:
            raise BitnetError(f"{ckpt.file_of(name)}: tensor {name!r} holds {ckpt.entry(name).dtype}, expected floats")
        return torch.from_numpy(arr)


def resolve(spec: str, base_dir: Path) -> str:
    """A relative path is looked up next to the recipe, then in the working directory; a hub id as is."""
    p = Path(spec).expanduser()
    if not p.is_absolute() and (base_dir / p).exists():
        return str(base_dir / p)
    return spec


def open_source(spec: str, base_dir: Path = Path("."), what: str = "model.init_from") -> Source:
    """Locate and index a source checkpoint, refusing an architecture we cannot convert."""
    path, where = _checkpoint_dir(resolve(spec, base_dir), "auto")
    if not (path / "config.json").is_file():
        raise BitnetError(f"{what}: {path} has no config.json (expected a checkpoint directory in HF layout)")
    config = read_json(path / "config.json", "model config")
    if not isinstance(config, dict):
        raise BitnetError(f"{what}: {path / 'config.json'} is not a JSON object")
    mt = config.get("model_type")
    if mt in REFUSED:
        raise BitnetError(f"{what}: {path / 'config.json'} is a {mt} model, which cannot be converted yet: "
                          f"{REFUSED[mt]}")
    if mt not in ACCEPTED:
        accepted = "; ".join(f"{k}: {v}" for k, v in ACCEPTED.items())
        raise BitnetError(f"{what}: {path / 'config.json'} has model_type {mt!r} "
                          f"(architectures {config.get('architectures')}), which cannot be converted. "
                          f"Accepted: {accepted}")
    qc = config.get("quantization_config") or {}
    if qc and (qc.get("quant_method") != "bitnet" or qc.get("quantization_mode", "offline") != "online"):
        raise BitnetError(f"{what}: {path} stores quantised weights ({qc.get('quant_method')} "
                          f"{qc.get('quantization_mode', 'offline')}); conversion needs full-precision weights")
    tensors: dict[str, tuple[Path, TensorEntry]] = {}
    for file in tensor_files(path):
        _, entries, _ = read_safetensors_header(file)
        for name, entry in entries.items():
            tensors[name] = (file, entry)
    return Source(path, where, config, tensors)


def student_config(src: Source, quant: str, insert_subln: bool) -> BitNetConfig:
    """The config of the converted model: the source's shape, RoPE and vocabulary, our quantisation.

    ``insert_subln`` turns the source into the BitNet b1.58 family (sub-norms before o_proj and
    down_proj) keeping its activation, RoPE and head: transformers' BitNet reads ``hidden_act``.
    """
    d = dict(src.config)
    d.pop("quantization_config", None)
    if insert_subln:
        if src.model_type == "bitnet":
            raise BitnetError(f"model.insert_subln: {src.where} is a BitNet model and has its sub-norms already")
        if FAMILIES[FAMILY_BY_MODEL_TYPE[src.model_type]].qkv_bias:
            raise BitnetError(f"model.insert_subln: {src.where} is a {src.model_type} model with q/k/v biases, "
                              "which BitNet b1.58 does not have; convert it without insert_subln")
        # the source family's own defaults, made explicit before the model_type changes
        d.setdefault("hidden_act", "silu")
        d.setdefault("tie_word_embeddings", False)
        d["model_type"], d["architectures"] = "bitnet", ["BitNetForCausalLM"]
    return dataclasses.replace(BitNetConfig.from_hf_dict(d, str(src.path / "config.json")), quant=quant)


def _inserted(name: str) -> bool:
    """A tensor ``insert_subln`` adds (initialised to ones), which the source does not have."""
    return name.endswith(("self_attn.attn_sub_norm.weight", "mlp.ffn_sub_norm.weight"))


def load_weights(src: Source, model: BitNetForCausalLM, insert_subln: bool = False) -> None:
    """Copy the source's tensors into ``model`` by name, checking that nothing is missing or left over.

    With ``insert_subln`` the sub-norms the source lacks are set to ones (the identity scale).
    """
    expected = model.hf_state_dict()
    names = [n for n in src.tensors if not n.endswith(_DERIVED)]
    leftover = sorted(set(names) - set(expected))
    if "lm_head.weight" in leftover and model.config.tie_word_embeddings:
        # Some tied checkpoints store the head anyway; it is redundant only if it is the embedding.
        if not torch.equal(src.read("lm_head.weight"), src.read("model.embed_tokens.weight")):
            raise BitnetError(f"{src.where}: lm_head.weight differs from the embedding but config.json ties them "
                              "(tie_word_embeddings: true); refusing to drop it")
        leftover.remove("lm_head.weight")
    if leftover:
        raise BitnetError(f"{src.where}: tensors the converted model has no place for (they would be dropped): "
                          f"{', '.join(leftover[:5])}{' ...' if len(leftover) > 5 else ''}")
    missing = sorted(set(expected) - set(names))
    inserted = [n for n in missing if insert_subln and _inserted(n)]
    missing = [n for n in missing if n not in inserted]
    if missing:
        raise BitnetError(f"{src.where}: missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    state = {name: torch.ones(expected[name].shape) for name in inserted}
    for name, ref in expected.items():
        if name in state:
            continue
        shape = tuple(src.tensors[name][1].shape)
        if shape != tuple(ref.shape):
            raise BitnetError(f"{src.where}: tensor {name} has shape {shape}, its config implies {tuple(ref.shape)}")
        t = src.read(name)
        if not torch.isfinite(t).all():
            raise BitnetError(f"{src.where}: tensor {name} has non-finite values")
        state[name] = t
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, t in state.items():
            params[name].copy_(t)


def float_model(src: Source, device: torch.device, dtype: torch.dtype) -> BitNetForCausalLM:
    """The source as a frozen full-precision model (the distillation teacher)."""
    config = student_config(src, "none", insert_subln=False)
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    model = model.to_empty(device="cpu")
    load_weights(src, model)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
