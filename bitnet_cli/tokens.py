"""Tokenizer facts every stage shares: our special tokens, how BOS/EOS ids are found, BPE training.

`special_id` is the one answer to "which id is BOS (or EOS)" for the engine, the eval backends,
training and the GGUF exporter; `train_bpe` the one byte-level BPE trainer for training, synthetic
models and the benchmarks. `tokenizers` is imported only when a tokenizer is trained.
"""

from __future__ import annotations

from typing import Iterable

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"  # the special tokens of every BPE we train (LLaMA 3's names)
# Names a tokenizer without a tokenizer_config.json may use for them, ours first.
KNOWN_NAMES = {"bos": (BOS, "<s>", "<|startoftext|>"), "eos": (EOS, "</s>", "<|endoftext|>", "<|eot_id|>")}


def token_text(entry) -> str | None:
    """A tokenizer_config.json token entry as text: a string, or an AddedToken's serialisation."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def special_id(kind: str, tokenizer, tokenizer_config: dict, config: dict, vocab_size: int | None = None,
               guess: bool = False) -> int | None:
    """The id of special token `kind` ("bos" or "eos") as transformers sees it: tokenizer_config's
    `<kind>_token` when the tokenizer knows it, else config.json's `<kind>_token_id` (the first of
    a list) when it is a valid id, else (with `guess`) the first of KNOWN_NAMES the tokenizer has."""
    name = token_text(tokenizer_config.get(f"{kind}_token"))
    if name is not None and tokenizer.token_to_id(name) is not None:
        return tokenizer.token_to_id(name)
    value = config.get(f"{kind}_token_id")
    if isinstance(value, list):
        value = value[0] if value else None
    if type(value) is int and value >= 0 and (vocab_size is None or value < vocab_size):  # not a bool
        return value
    if guess:
        return next((tokenizer.token_to_id(n) for n in KNOWN_NAMES[kind] if tokenizer.token_to_id(n) is not None),
                    None)
    return None


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = (BOS, EOS)):
    """A byte-level BPE (GPT-2 style pre-tokenisation, no prefix space) trained on `texts`, with
    `special_tokens` first in the vocabulary. Feed it pieces of ~10k characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def pieces(text: str, size: int = 10_000) -> Iterable[str]:
    """`text` in pieces of `size` characters, the unit train_bpe reads."""
    return (text[i : i + size] for i in range(0, len(text), size))
