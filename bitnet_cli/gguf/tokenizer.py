"""Rebuild a Hugging Face `tokenizers` JSON from a GGUF's `tokenizer.ggml.*` metadata.

- `gpt2` (byte-level BPE: GPT-2, Llama 3, BitNet 2B4T): tokens are already in the byte-level
  alphabet; merges are stored; the pre-tokenizer regex is named by `tokenizer.ggml.pre`.
  Writers that leave `pre` out (bitnet.cpp's converter does) get it inferred from the vocabulary:
  a Llama-3 split never puts a space before a digit and lets one punctuation mark lead a word, a
  GPT-2 split does the opposite, so tokens like `Ġ1` or `.the` tell them apart (`infer_pre`).
- `llama` (SentencePiece BPE: Llama 2, 1bitLLM): pieces with scores; merges are derived from the
  scores (a pair merges when its concatenation is a piece; the better the piece's score, the
  earlier), with byte fallback through the `<0xXX>` pieces, the way transformers converts a
  SentencePiece model.

Control and user-defined tokens, and the bos/eos/unk/padding tokens whatever their recorded type,
become added tokens (special but user-defined ones), so they encode as single ids and never split. No post-processor: the engine adds BOS itself (`Engine.encode`).
The result is checked to load in `tokenizers`.
"""

from __future__ import annotations

import json
import re

from bitnet_cli.errors import BitnetError

# token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split regexes of the byte-level BPE families we rebuild, as their tokenizer.json files spell them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3",
    "gpt-2": "gpt2", "gpt2": "gpt2", "default": "gpt2",
}


def infer_pre(tokens: list[str]) -> tuple[str, str]:
    """(family, why) of the byte-level split that produced a vocabulary whose `pre` is not recorded."""
    space_digit = sum(1 for t in tokens if len(t) > 1 and t[0] == "Ġ" and t[1].isdigit())
    lead_punct = sum(1 for t in tokens if re.fullmatch(r"[^\sĠĊ\w][^\W\d_]+", t) is not None)
    long_digits = sum(1 for t in tokens if re.fullmatch(r"\d{4,}", t) is not None)
    if lead_punct and not space_digit and not long_digits:
        return "llama3", f"{lead_punct} tokens like a punctuation mark leading a word and none like 'Ġ1'"
    if (space_digit or long_digits) and not lead_punct:
        return "gpt2", f"{space_digit + long_digits} tokens like 'Ġ1' or 4+ digits and none with punctuation leading a word"
    return "", f"{lead_punct} Llama-3-like and {space_digit + long_digits} GPT-2-like tokens"


def _pre_tokenizer(family: str) -> dict:
    if family == "llama3":
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]}
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _added(tokens: list[str], types) -> list[dict]:
    out = []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, USER_DEFINED):
            out.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": kind == CONTROL})
    return out


def _spm_merges(tokens: list[str], scores, types) -> list[list[str]]:
    """Merges of a SentencePiece BPE vocabulary: every split of a piece into two pieces, best piece score first."""
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in (NORMAL, USER_DEFINED, UNUSED)}
    found = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                found.append((-float(scores[pid]) if scores is not None else pid, vocab[a], vocab[b], a, b))
    found.sort()
    return [[a, b] for _, _, _, a, b in found]


def rebuild(meta: dict, where: str, vocab_size: int) -> tuple[str, dict, str]:
    """(tokenizer.json text, tokenizer_config, a note on what was inferred) from GGUF metadata `meta`."""
    from bitnet_cli.tokenizer import load as load_tokenizer

    def key(name):
        return f"{where}: metadata key 'tokenizer.ggml.{name}'"

    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise BitnetError(f"{where}: no tokenizer in the GGUF metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise BitnetError(f"{key('tokens')} must be an array of strings")
    if len(tokens) != vocab_size:
        raise BitnetError(f"{key('tokens')} has {len(tokens)} tokens but the embedding has {vocab_size} rows")
    if len(set(tokens)) != len(tokens):
        dup = next(t for i, t in enumerate(tokens) if t in tokens[:i])
        raise BitnetError(f"{key('tokens')}: token {dup!r} appears twice")
    types = meta.get("tokenizer.ggml.token_type")
    types = [NORMAL] * len(tokens) if types is None else [int(t) for t in types]
    if len(types) != len(tokens):
        raise BitnetError(f"{key('token_type')} has {len(types)} entries for {len(tokens)} tokens")
    special = {}
    for name in ("bos", "eos", "unknown", "padding"):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            if type(value) is not int or not 0 <= value < len(tokens):
                raise BitnetError(f"{key(name + '_token_id')} = {value!r} is not a token id")
            special[name] = value
    for i in special.values():  # bitnet.cpp's converter types its specials NORMAL when they are in the BPE vocab
        if types[i] == NORMAL:
            types[i] = CONTROL
    note = ""
    vocab = {t: i for i, t in enumerate(tokens)}
    if model == "gpt2":
        merges = meta.get("tokenizer.ggml.merges") or []
        if not isinstance(merges, list) or not all(isinstance(m, str) and m.count(" ") == 1 for m in merges):
            raise BitnetError(f"{key('merges')} must be an array of 'left right' strings")
        pre = meta.get("tokenizer.ggml.pre")
        if pre is None:
            family, why = infer_pre(tokens)
            if not family:
                raise BitnetError(f"{key('pre')} is missing and the vocabulary does not tell a Llama-3 split from a "
                                  f"GPT-2 one ({why})")
            note = f"pre-tokenizer not recorded; inferred {family} from the vocabulary ({why})"
        elif pre in PRE_TOKENIZERS:
            family = PRE_TOKENIZERS[pre]
        else:
            raise BitnetError(f"{key('pre')} = {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        spec = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(tokens, types),
            "normalizer": None, "pre_tokenizer": _pre_tokenizer(family),
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      # llama.cpp (and Llama 3's tokenizer.json) take a pre-token that is itself a token whole
                      "ignore_merges": family == "llama3",
                      "vocab": vocab, "merges": [m.split(" ") for m in merges]},
        }
    elif model == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is not None and len(scores) != len(tokens):
            raise BitnetError(f"{key('scores')} has {len(scores)} entries for {len(tokens)} tokens")
        unk = tokens[special["unknown"]] if "unknown" in special else None
        spec = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(tokens, types),
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
            if meta.get("tokenizer.ggml.add_space_prefix", True) else
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            "pre_tokenizer": None,
            "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": _spm_merges(tokens, scores, types)},
        }
    else:
        raise BitnetError(f"{key('model')} = {model!r} is not supported (supported: gpt2, llama)")
    text = json.dumps(spec, ensure_ascii=False)
    try:
        load_tokenizer(text, where)  # loads and runs it once; Rust panics included
    except BitnetError as e:
        raise BitnetError(f"the tokenizer rebuilt from the GGUF metadata does not load: {e}") from None
    config = {}
    for name, field in (("bos", "bos_token"), ("eos", "eos_token")):
        if name in special:
            config[field] = tokens[special[name]]
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    return text, config, note
