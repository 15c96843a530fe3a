"""The `tokenizers` library behind a guard: a tokenizer.json from a file is untrusted input.

A malformed tokenizer can make the Rust library panic (a Precompiled normalizer with a bad
charsmap, a Replace normalizer whose regex matches the empty string), and pyo3 raises a panic as
``pyo3_runtime.PanicException``, which derives from BaseException: ``except Exception`` lets it
through. `load` builds the tokenizer and runs it once on a probe text, with the panic's report on
stderr captured, so that a bad tokenizer is refused with one message when the file is opened; every
later call turns a failure into BitnetError as well. Text that cannot be encoded as UTF-8 (a
non-UTF-8 command-line argument arrives as lone surrogates) is refused before the library sees it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Sequence

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
