"""GGUF export: `bitnet pack SRC out.gguf --to gguf --gguf-type i2_s|tq2_0|tq1_0`.

- `i2_s`: bitnet.cpp's architecture `bitnet-b1.58` (the official 2B4T GGUF's graph: squared
  ReLU, both sub-norms, rotate-half RoPE, tied head). Each BitLinear weight is one I2_S tensor:
  our `i2_k128` bytes with each byte's four 2-bit fields reversed (bitnet.cpp's x86 layout,
  bitnet_cli.gguf.quants), then gamma as the trailing float32, unrounded.
- `tq2_0` / `tq1_0`: llama.cpp's architecture `bitnet`, each BitLinear weight a TQ2_0 / TQ1_0
  tensor holding the trits with block scale d = 1, plus a `<name>.scale` F32 [1] tensor holding
  gamma, which llama.cpp's `bitnet` graph multiplies into the matmul output: the fp32 scale
  survives unrounded. TQ2_0's code bytes are our `i2_k128` bytes verbatim (a 256-value block is
  two of our 128-value blocks). llama.cpp's `bitnet` graph gates the FFN with SiLU (the 1bitLLM
  models), not BitNet b1.58's squared ReLU, and has no switch for it: llama.cpp loads and runs
  these files at full speed but computes silu(gate) * up (checked with llama.cpp 0c1e570: its
  logits follow our numpy reference with that one line swapped, up to int8 rounding). We mark
  the file with `bitnet-cli.hidden_act = relu2` so that our importer reads it back as what it is.

The head (= the tied embedding): by default F16 from f16 embeddings, Q8_0 carrying our int8
values with the row scale (f16-rounded) as each block's d, Q6_K from q6 (the same codes and
scales); `--gguf-head f16|q6_k` re-encodes the embedding as F16 or Q6_K (6.56 bits per weight,
llama-quantize's usual head type).
Tokenizer (byte-level BPE, `gpt2` with pre `llama-bpe` or `gpt-2`) and chat template go into the
metadata. No q/k permutation: both graphs use rotate-half RoPE, as HF does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bitnet_cli.arch import EMBED, FINAL_NORM, ModelDims, gguf_name, layer_tensor
from bitnet_cli.errors import BitnetError
from bitnet_cli.gguf import quants
from bitnet_cli.gguf import writer as gw
from bitnet_cli.gguf.quants import TYPE_IDS
from bitnet_cli.pack.gguf_source import HIDDEN_ACT_KEY
from bitnet_cli.pack.embeddings import q6_fields
from bitnet_cli.pack.format import PackedModel, check_output_path
from bitnet_cli.tokenizer import special_id

GGUF_TYPES = ("i2_s", "tq2_0", "tq1_0")
HEAD_TYPES = ("f16", "q6_k")
QK_K = 256
# printed by `bitnet pack --to gguf` for the llama.cpp types (see the module docstring)
LLAMA_CPP_CAVEAT = ("llama.cpp's `bitnet` architecture gates the FFN with SiLU where BitNet b1.58 uses squared ReLU: "
                    "llama.cpp runs this file at full speed, but its outputs are not this model's (bitnet run's are)")
# (architecture, llama_ftype) per export type; bitnet.cpp numbers MOSTLY_I2_S 40
_ARCH = {"i2_s": ("bitnet-b1.58", 40), "tq2_0": ("bitnet", 37), "tq1_0": ("bitnet", 36)}
# llama.cpp token types
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5

def _tokenizer_metadata(pm: PackedModel) -> dict:
    """tokens, token types, merges, pre-tokenizer and special ids for llama.cpp's `gpt2` (byte-level BPE) vocab."""
    from bitnet_cli.gguf.tokenizer import LLAMA3_SPLIT

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
    types = [_UNUSED] * size
    for token, i in vocab.items():
        tokens[i] = token
        if token in added:
            types[i] = _CONTROL if added[token].get("special") else _USER_DEFINED
        else:
            types[i] = _NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    # Llama-3-style tokenizers split with a regex before the byte-level step; plain byte-level is GPT-2's
    pre_tok = json.dumps(spec.get("pre_tokenizer"))
    if '"Split"' not in pre_tok:
        pre = "gpt-2"
    elif json.dumps(LLAMA3_SPLIT) in pre_tok:
        pre = "llama-bpe"
    else:
        raise BitnetError(f"{pm.path}: the tokenizer splits with a regex llama.cpp does not know by name "
                          "(GGUF export knows GPT-2's and Llama 3's)")
    from bitnet_cli.tokenizer import load

    tokenizer = load(pm.tokenizer_json, f"{pm.path}: the stored tokenizer")
    special = {key: special_id(key, tokenizer, pm.tokenizer_config, pm.config, size) for key in ("bos", "eos")}
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, **special}


def check_gguf_shapes(d: ModelDims, gguf_type: str, where: str, embeddings: str, head: str | None = None) -> None:
    """The shapes and types the target graph and its ternary block types accept (checked before any packing)."""
    if gguf_type not in GGUF_TYPES:
        raise BitnetError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}", param="gguf_type")
    if head is not None and head not in HEAD_TYPES:
        raise BitnetError(f"gguf_head must be one of {', '.join(HEAD_TYPES)}, got {head!r}", param="gguf_head")
    if head is None and embeddings not in ("f16", "int8", "q6"):
        raise BitnetError(f"{where}: GGUF export takes f16, int8 or q6 embeddings, not {embeddings}, unless "
                          "gguf_head f16|q6_k re-encodes them", param="gguf_head")
    if d.family != "bitnet":
        raise BitnetError(f"{where}: GGUF export writes the bitnet architectures (sub-norms, relu2/SiLU as they fix "
                          f"it); a {d.family}-family model has no sub-norms (run it with `bitnet run`)")
    if d.bitlinear_norm_eps is not None:
        raise BitnetError(f"{where}: this model norms every projection's input (use_rms_norm), which no GGUF "
                          "architecture computes (run it with `bitnet run`)")
    if not d.tie_word_embeddings:
        raise BitnetError(f"{where}: the GGUF export writes tied embeddings; this model has an untied lm_head")
    block = 128 if gguf_type == "i2_s" else QK_K
    for proj in d.projections():
        k = proj.shape(d)[1]
        if k % block:
            raise BitnetError(f"{where}: {proj.name} has {k} inputs; GGUF {gguf_type.upper()} needs a multiple of {block}")
    need = QK_K if head == "q6_k" or (head is None and embeddings == "q6") else 32
    if d.hidden_size % need:
        raise BitnetError(f"{where}: hidden_size {d.hidden_size} must be a multiple of {need} for this GGUF head")


def _head(pm: PackedModel, head: str | None):
    """(ggml type id, bytes-producing function) of the token embedding / tied head."""
    embed = EMBED
    d = pm.dims
    if head is None and pm.embeddings == "f16":
        return TYPE_IDS["F16"], lambda: pm.tensor(embed)
    if head is None and pm.embeddings == "q6":  # the same codes and scales in Q6_K's byte order
        return TYPE_IDS["Q6_K"], lambda: quants.q6_k_pack(*q6_fields(pm.tensor(embed)))
    if head is None:
        return TYPE_IDS["Q8_0"], lambda: quants.q8_0_pack(pm.tensor(embed), pm.tensor(embed + "_scale"))
    if head == "f16":
        return TYPE_IDS["F16"], lambda: np.concatenate(
            [pm.embedding(rows=slice(i, i + 4096)).astype(np.float16) for i in range(0, d.vocab_size, 4096)])
    return TYPE_IDS["Q6_K"], lambda: np.concatenate(
        [quants.quantize_q6_k(pm.embedding(rows=slice(i, i + 4096))) for i in range(0, d.vocab_size, 4096)])


def _ternary(pm: PackedModel, name: str, gguf_type: str, n: int, k: int):
    """(type id, nbytes, make) of one BitLinear weight."""
    if gguf_type == "i2_s":
        def make():
            codes = quants.i2s_from_i2_k128(pm.tensor(name)).reshape(-1)
            return np.concatenate([codes, quants.i2s_tail(pm.tensor(name + "_scale")[0])])
        return TYPE_IDS["I2_S"], n * k // 4 + quants.I2S_TAIL, make
    ones = np.ones((n, k // QK_K), np.float32)
    if gguf_type == "tq2_0":
        return TYPE_IDS["TQ2_0"], n * k // QK_K * 66, lambda: quants.tq2_0_pack(pm.tensor(name), ones)
    return TYPE_IDS["TQ1_0"], n * k // QK_K * 54, lambda: quants.tq1_0_pack(
        (pm.ternary(name)[0] + 1).astype(np.uint8), ones)


def export_gguf(packed_path, out, gguf_type: str = "tq2_0", force: bool = False, head: str | None = None,
                progress=None) -> Path:
    """Write a GGUF file from a packed file (temp file + rename); return its path."""
    out = Path(out)
    check_output_path(out, force=force)  # a directory, an existing file, a missing parent: before any work
    arch, ftype = _ARCH.get(gguf_type, (None, None))
    with PackedModel.open(packed_path) as pm:
        check_gguf_shapes(pm.dims, gguf_type, str(packed_path), pm.embeddings, head)
        if pm.ternary_layout.option != "i2":  # I2_S and TQ2_0 are byte maps of i2_k128
            raise BitnetError(f"{packed_path}: the GGUF export reads i2_k128 packed files, not {pm.layout}")
        w = gw.GGUFWriter(arch)
        _add_metadata(w, pm, arch, ftype, out.stem)
        _add_tensors(w, pm, gguf_type, head)
        w.write(out, progress)
    return out


def _add_metadata(w: "gw.GGUFWriter", pm: PackedModel, arch: str, ftype: int, name: str) -> None:
    """The model's hyper-parameters and tokenizer under llama.cpp's key names."""
    d, tok = pm.dims, _tokenizer_metadata(pm)
    w.add("general.name", str(pm.config.get("_name_or_path") or name), gw.STRING)
    w.add("general.file_type", ftype, gw.U32)
    w.add("general.quantization_version", 2, gw.U32)
    for key, value in (("vocab_size", d.vocab_size), ("context_length", d.max_position_embeddings),
                       ("embedding_length", d.hidden_size), ("feed_forward_length", d.intermediate_size),
                       ("block_count", d.num_layers), ("attention.head_count", d.num_heads),
                       ("attention.head_count_kv", d.num_kv_heads), ("rope.dimension_count", d.head_dim)):
        w.add(f"{arch}.{key}", value, gw.U32)
    w.add(f"{arch}.rope.freq_base", d.rope_theta, gw.F32)
    w.add(f"{arch}.attention.layer_norm_rms_epsilon", d.rms_norm_eps, gw.F32)
    if arch == "bitnet":
        w.add(HIDDEN_ACT_KEY, "relu2", gw.STRING)
    w.add("tokenizer.ggml.model", "gpt2", gw.STRING)
    w.add("tokenizer.ggml.pre", tok["pre"], gw.STRING)
    w.add("tokenizer.ggml.tokens", tok["tokens"], gw.ARRAY, gw.STRING)
    w.add("tokenizer.ggml.token_type", tok["types"], gw.ARRAY, gw.I32)
    w.add("tokenizer.ggml.merges", tok["merges"], gw.ARRAY, gw.STRING)
    if tok["bos"] is not None:
        w.add("tokenizer.ggml.bos_token_id", int(tok["bos"]), gw.U32)
        w.add("tokenizer.ggml.add_bos_token", True, gw.BOOL)
    if tok["eos"] is not None:
        w.add("tokenizer.ggml.eos_token_id", int(tok["eos"]), gw.U32)
    if pm.tokenizer_config.get("chat_template"):
        w.add("tokenizer.chat_template", pm.tokenizer_config["chat_template"], gw.STRING)


def _add_tensors(w: "gw.GGUFWriter", pm: PackedModel, gguf_type: str, head: str | None) -> None:
    """Every tensor, in bitnet_cli.arch's table order and names, each produced when it is written."""
    d = pm.dims
    type_id, make = _head(pm, head)
    nbytes = quants.tensor_nbytes(type_id, (d.hidden_size, d.vocab_size))
    w.add_tensor(gguf_name(EMBED), (d.vocab_size, d.hidden_size), type_id, nbytes, make)
    f32 = TYPE_IDS["F32"]
    for i in range(d.num_layers):
        for norm in d.layer_norms():
            name = layer_tensor(i, norm.name)
            size = norm.size(d)
            w.add_tensor(gguf_name(name), (size,), f32, 4 * size, lambda name=name: pm.tensor(name))
        for proj in d.projections():
            name = layer_tensor(i, proj.name)
            n, k = proj.shape(d)
            type_id, nbytes, make = _ternary(pm, name, gguf_type, n, k)
            w.add_tensor(gguf_name(name), (n, k), type_id, nbytes, make)
            if gguf_type != "i2_s":  # I2_S carries gamma itself
                w.add_tensor(gguf_name(name + "_scale"), (1,), f32, 4, lambda name=name: pm.tensor(name + "_scale"))
    w.add_tensor(gguf_name(FINAL_NORM), (d.hidden_size,), f32, 4 * d.hidden_size, lambda: pm.tensor(FINAL_NORM))
