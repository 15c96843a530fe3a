"""The `tokenizers` library behind a guard: a tokenizer.json from a file is untrusted input.

A malformed tokenizer can make the Rust library panic (a Precompiled normalizer with a bad
charsmap, a Replace normalizer whose regex matches the empty string), and pyo3 raises a panic as
``pyo3_runtime.PanicException``, which derives from BaseException: ``except Exception`` lets it
through. `load` builds the tokenizer and runs it once on a probe text, with the panic's report on
stderr captured, so that a bad tokenizer is refused with one message when the file is opened; every
later call turns a failure into BitnetError as well. Text that cannot be encoded as UTF-8 (a
non-UTF-8 command-line argument arrives as lone surrogates) is refused before the library sees it.

The tokenizer facts every stage shares live here too: our special tokens, `special_id` (the one
answer to "which id is BOS / EOS" for the engine, eval, training and GGUF export) and `train_bpe`
(the one byte-level BPE trainer for training, synthetic models and the benchmarks).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterable, Sequence

from bitnet_cli.errors import BitnetError
from bitnet_cli.safejson import is_utf8

# Letters, digits, punctuation, accents, CJK, an emoji, whitespace: every normalizer, pre-tokenizer
# and model step a tokenizer.json can declare runs on this.
PROBE = "Hello, World! 0123 \u00e9t\u00e9 na\u00efve \u4e2d\u6587 \U0001F600  \t\nend."


def _is_failure(e: BaseException) -> bool:
    """An error of the tokenizer library (its own Exception, or a Rust panic), not an interrupt."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


@contextlib.contextmanager
def _stderr_captured():
    """Redirect file descriptor 2 (where Rust's panic hook writes) into a temporary file."""
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):
        pass
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all: nothing to capture
        yield None
        return
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield f
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _reason(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if type(e).__name__ == "PanicException":
        text = f"the tokenizers library panicked: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


def bad_text(text: str) -> str | None:
    """Why `text` cannot be tokenized (not UTF-8), or None."""
    if is_utf8(text):
        return None
    i, c = next((i, c) for i, c in enumerate(text) if "\ud800" <= c <= "\udfff")
    byte = f"byte 0x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else f"lone surrogate U+{ord(c):04X}"
    return f"not valid UTF-8 text ({byte} at character {i})"


def shown_text(text: str, errors: str = "replace") -> str:
    """`text` from argv or a file name, printable: the bytes that are not UTF-8 (which arrive as lone
    surrogates) as U+FFFD (`errors="replace"`) or as \\xff escapes (`"backslashreplace"`)."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", errors)
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return text.encode("utf-8", errors).decode()


class SafeTokenizer:
    """The subset of tokenizers.Tokenizer that bitnet-cli uses; any failure is a BitnetError."""

    def __init__(self, tokenizer, where: str):
        self._tok = tokenizer
        self.where = where

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            if not _is_failure(e):
                raise
            raise BitnetError(f"{self.where}: the tokenizer failed to {what} ({_reason(e)})") from None

    def encode(self, text: str, add_special_tokens: bool = False):
        why = bad_text(text) if isinstance(text, str) else "not a string"
        if why:
            raise BitnetError(f"input text is {why}")
        return self._call("encode text", self._tok.encode, text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._call("decode tokens", self._tok.decode, list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        if not isinstance(token, str) or not is_utf8(token):
            return None  # no vocabulary entry can be a lone surrogate
        return self._call("look up a token", self._tok.token_to_id, token)

    def id_to_token(self, i: int) -> str | None:
        return self._call("look up a token", self._tok.id_to_token, i)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self._call("count its vocabulary", self._tok.get_vocab_size, with_added_tokens)


def load(json_text: str, where: str) -> SafeTokenizer:
    """Build a tokenizer from tokenizer.json text and check that it encodes and decodes a probe."""
    from tokenizers import Tokenizer

    if not isinstance(json_text, str) or not is_utf8(json_text):
        raise BitnetError(f"{where}: the tokenizer JSON is not valid Unicode text")
    with _stderr_captured():
        try:
            tok = Tokenizer.from_str(json_text)
            tok.decode(tok.encode(PROBE, add_special_tokens=False).ids, skip_special_tokens=True)
        except BaseException as e:
            if not _is_failure(e):
                raise
            raise BitnetError(f"{where}: not a valid tokenizer.json ({_reason(e)})") from None
    return SafeTokenizer(tok, where)


# ------------------------------------------------------------------ special tokens, BPE training

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
