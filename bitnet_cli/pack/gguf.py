"""GGUF export for llama.cpp / bitnet.cpp users: architecture `bitnet`, TQ2_0 or TQ1_0 ternary tensors.

Mapping from our packed file:
- each BitLinear weight becomes a TQ2_0 / TQ1_0 tensor holding the trits with block scale
  d = 1, plus a `<name>.scale` F32 [1] tensor holding gamma, which llama.cpp's `bitnet`
  graph multiplies into the matmul output: the fp32 scale survives unrounded.
  TQ2_0's 2-bit codes are our `i2_k128` bytes verbatim (256-element blocks = two of our
  128-element blocks), so that path is a byte copy.
- embeddings: F16 as stored; int8 (per-row scale) becomes Q8_0 with the row scale as every
  block's d, i.e. the same int8 values and an f16-rounded scale.
- llama.cpp's `bitnet` architecture ties the output head to the embedding and uses
  rotate-half (NEOX) RoPE, as HF does, so q/k need no permutation; untied heads are refused.
- llama.cpp's `bitnet` graph gates the FFN with SiLU (the 1bitLLM models), not BitNet b1.58's
  squared ReLU, and has no switch for it: llama.cpp loads and runs our files at full speed, but
  computes silu(gate) * up (checked with llama.cpp 0c1e570: its logits follow our numpy reference
  with that one line swapped, up to int8 rounding, and leave the relu2 model's at once).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from bitnet_cli.errors import BitnetError
from bitnet_cli.files import publish
from bitnet_cli.arch import EMBED, FINAL_NORM, ModelDims, gguf_name, layer_tensor
from bitnet_cli.pack.format import PackedModel

GGUF_TYPES = ("tq2_0", "tq1_0")
QK_K = 256
# printed by `bitnet pack --to gguf` (see the module docstring)
LLAMA_CPP_CAVEAT = ("llama.cpp's `bitnet` architecture gates the FFN with SiLU where BitNet b1.58 uses squared ReLU: "
                    "llama.cpp runs this file at full speed, but its outputs are not this model's (bitnet run's are)")

def _tq2_0_bytes(packed: np.ndarray) -> np.ndarray:
    """Our i2_k128 rows [N, K/4] -> TQ2_0 rows: per 256 inputs, 64 code bytes then f16 d = 1."""
    n, kq = packed.shape
    blocks = packed.reshape(n, kq // 64, 64)
    d = np.broadcast_to(np.float16(1.0).reshape(1).view(np.uint8), (n, kq // 64, 2))
    return np.concatenate([blocks, d], axis=2).reshape(n, -1)


def _tq1_0_bytes(trits: np.ndarray) -> np.ndarray:
    import gguf

    out = gguf.quants.quantize(trits.astype(np.float32), gguf.GGMLQuantizationType.TQ1_0)
    return out  # d = max|trit| per block: 1, or 0 for an all-zero block (which dequantises to 0 anyway)


def _q8_0_bytes(q: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
    """int8 rows [V, H] with one scale per row -> Q8_0 rows (blocks of 32: f16 d, 32 int8)."""
    v, h = q.shape
    d = np.broadcast_to(row_scale.astype(np.float16).view(np.uint8).reshape(v, 1, 2), (v, h // 32, 2))
    return np.concatenate([d, q.view(np.uint8).reshape(v, h // 32, 32)], axis=2).reshape(v, -1)


def _tokenizer_metadata(pm: PackedModel) -> dict:
    """tokens, token types, merges, pre-tokenizer and special ids for llama.cpp's `gpt2` (byte-level BPE) vocab."""
    import gguf

    spec = json.loads(pm.tokenizer_json)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise BitnetError(f"{pm.path}: GGUF export supports byte-level BPE tokenizers only (found {model.get('type')!r})")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in spec.get("added_tokens") or []}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = pm.dims.vocab_size
    if max(vocab.values(), default=-1) >= size:
        raise BitnetError(f"{pm.path}: the tokenizer has ids beyond the model's vocab_size {size}")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, i in vocab.items():
        tokens[i] = token
        if token in added:
            types[i] = gguf.TokenType.CONTROL if added[token].get("special") else gguf.TokenType.USER_DEFINED
        else:
            types[i] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    # llama3-style tokenizers split with a regex before the byte-level step; plain byte-level is gpt-2's
    pre = "llama-bpe" if '"Split"' in json.dumps(spec.get("pre_tokenizer")) else "gpt-2"
    special = {}
    for key in ("bos", "eos"):
        token = pm.tokenizer_config.get(f"{key}_token")
        special[key] = vocab.get(token) if token in vocab else pm.config.get(f"{key}_token_id")
        if isinstance(special[key], list):
            special[key] = special[key][0]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, **special}


def check_gguf_shapes(d: ModelDims, gguf_type: str, where: str, embeddings: str) -> None:
    """The shapes and types llama.cpp's bitnet graph and its ternary block types accept (checked before any packing)."""
    if embeddings not in ("f16", "int8"):
        raise BitnetError(f"{where}: GGUF export takes f16 or int8 embeddings, not {embeddings}; pack with "
                          "--embeddings f16 (llama-quantize --token-embedding-type can then shrink the head)")
    if d.family != "bitnet":
        raise BitnetError(f"{where}: GGUF export writes llama.cpp's bitnet architecture (sub-norms, per-tensor "
                          f"scales); a {d.family}-family model has neither (run it with `bitnet run`)")
    if not d.tie_word_embeddings:
        raise BitnetError(f"{where}: llama.cpp's bitnet architecture needs tied embeddings; this model has an untied lm_head")
    for proj in d.projections():
        k = proj.shape(d)[1]
        if k % QK_K:
            raise BitnetError(f"{where}: {proj.name} has {k} inputs; GGUF {gguf_type.upper()} needs a multiple of {QK_K}")
    if d.hidden_size % 32:
        raise BitnetError(f"{where}: hidden_size {d.hidden_size} must be a multiple of 32 for GGUF embeddings")


def export_gguf(packed_path, out, gguf_type: str = "tq2_0", force: bool = False) -> Path:
    """Write a GGUF file from a packed file (temp file + rename); return its path."""
    import gguf

    out = Path(out)
    if gguf_type not in GGUF_TYPES:
        raise BitnetError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    if out.exists() and not force:
        raise BitnetError(f"{out}: already exists (use --force to overwrite)")
    qtype = gguf.GGMLQuantizationType.TQ2_0 if gguf_type == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    with PackedModel.open(packed_path) as pm:
        d = pm.dims
        check_gguf_shapes(d, gguf_type, str(packed_path), pm.embeddings)
        tok = _tokenizer_metadata(pm)

        # (gguf name, logical shape, function producing the bytes, raw ggml type or None for plain f16/f32)
        plan = []
        if pm.embeddings == "f16":
            plan.append((gguf_name(EMBED), None, lambda: pm.tensor(EMBED), None))
        else:
            plan.append((gguf_name(EMBED), (d.vocab_size, d.hidden_size),
                         lambda: _q8_0_bytes(pm.tensor(EMBED), pm.tensor(EMBED + "_scale")),
                         gguf.GGMLQuantizationType.Q8_0))
        for i in range(d.num_layers):
            for norm in d.layer_norms():
                name = layer_tensor(i, norm.name)
                plan.append((gguf_name(name), None, lambda name=name: pm.tensor(name), None))
            for proj in d.projections():
                name = layer_tensor(i, proj.name)
                if gguf_type == "tq2_0":
                    make = lambda name=name: _tq2_0_bytes(pm.tensor(name))  # noqa: E731
                else:
                    make = lambda name=name: _tq1_0_bytes(pm.ternary(name)[0])  # noqa: E731
                plan.append((gguf_name(name), proj.shape(d), make, qtype))
                plan.append((gguf_name(name + "_scale"), None, lambda name=name: pm.tensor(name + "_scale"), None))
        plan.append((gguf_name(FINAL_NORM), None, lambda: pm.tensor(FINAL_NORM), None))

        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if out.parent.is_dir() else None)
        os.close(fd)
        try:
            w = gguf.GGUFWriter(tmp, arch="bitnet")
            w.add_name(str(pm.config.get("_name_or_path") or Path(out).stem))
            w.add_vocab_size(d.vocab_size)
            w.add_context_length(d.max_position_embeddings)
            w.add_embedding_length(d.hidden_size)
            w.add_feed_forward_length(d.intermediate_size)
            w.add_block_count(d.num_layers)
            w.add_head_count(d.num_heads)
            w.add_head_count_kv(d.num_kv_heads)
            w.add_rope_dimension_count(d.head_dim)
            w.add_rope_freq_base(d.rope_theta)
            w.add_layer_norm_rms_eps(d.rms_norm_eps)
            w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if gguf_type == "tq2_0" else gguf.LlamaFileType.MOSTLY_TQ1_0)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(tok["pre"])
            w.add_token_list(tok["tokens"])
            w.add_token_types(tok["types"])
            w.add_token_merges(tok["merges"])
            if tok["bos"] is not None:
                w.add_bos_token_id(int(tok["bos"]))
                w.add_add_bos_token(True)
            if tok["eos"] is not None:
                w.add_eos_token_id(int(tok["eos"]))
            if pm.tokenizer_config.get("chat_template"):
                w.add_chat_template(pm.tokenizer_config["chat_template"])
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for name, shape, make, raw in plan:  # tensor infos first: names, shapes, sizes
                if raw is None:
                    view = make()  # a zero-copy view of the packed file
                    w.add_tensor_info(name, view.shape, view.dtype, view.nbytes)
                else:
                    nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, raw)))
                    w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=raw)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for _, _, make, _ in plan:  # then the data, one tensor at a time
                w.write_tensor_data(np.ascontiguousarray(make()))
            w.close()
            publish(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out
