"""Constrained decoding: generated text that must be one JSON object (OpenAI's `response_format`
`{"type": "json_object"}`, ollama's `--format json`).

A byte-level JSON recognizer (a pushdown automaton whose states are hashable tuples) decides which
tokens may come next: a token is allowed when its bytes keep the text so far a prefix of some JSON
object, and once the object is closed only an end-of-sequence token is. Sampling then runs exactly
as without the constraint on logits with every other token at -inf (`sampling.sample(allowed=)`),
so greedy decoding picks the likeliest allowed token and a seed still fixes the text.

Finding the allowed tokens costs one walk of the vocabulary's byte trie (its tokens sorted by
bytes, so a subtree is a range found by bisection), pruned at the first byte the recognizer
refuses. Inside a string almost every token is allowed, so there the walk is replaced by a table
made once: tokens of plain string bytes are allowed as they stand, and the rest are decided from
their first quote, backslash or control byte on. Masks are cached per recognizer state, which
repeats all through a generation.

Limits, as llama.cpp's JSON grammar has them, so that a model cannot loop forever on filler:
MAX_WHITESPACE bytes of whitespace in a row, numbers of at most MAX_NUMBER bytes, nesting at most
MAX_DEPTH deep. Strings are unlimited, and a generation cut by max_tokens ends mid-object.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import OrderedDict
from typing import Sequence

import numpy as np

from bitnet_cli.errors import BitnetError

RESPONSE_FORMATS = ("text", "json_object")  # what `output_format` / `response_format.type` accept

MAX_WHITESPACE = 20
MAX_NUMBER = 32
MAX_DEPTH = 32
MASK_CACHE = 256  # masks kept per vocabulary (one bool per token each)

# ---------------------------------------------------------------------- the recognizer
#
# A state is (mode, stack, extra): stack is a str of the open containers ("{" or "["), extra
# depends on the mode: the whitespace run for the structural modes, is-a-key for the string modes,
# (is-a-key, hex digits left) after \u, (phase, length) in a number, the bytes left of a literal.

START, VALUE, VALUE_OR_CLOSE, KEY, KEY_OR_CLOSE, COLON, AFTER = range(7)  # whitespace may come
STRING, ESCAPE, HEX, NUMBER, LITERAL, DONE = range(7, 13)

INITIAL = (START, "", 0)
WHITESPACE = frozenset(b" \t\n\r")
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
DIGITS = frozenset(b"0123456789")
# number phases; the complete ones may end the number
MINUS, ZERO, INT, DOT, FRAC, EXP, EXP_SIGN, EXP_DIGITS = range(8)
NUMBER_COMPLETE = frozenset((ZERO, INT, FRAC, EXP_DIGITS))
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
QUOTE, BACKSLASH = ord('"'), ord("\\")


def _number_step(phase: int, b: int) -> int | None:
    digit = b in DIGITS
    if phase == MINUS:
        return ZERO if b == ord("0") else INT if digit else None
    if phase in (INT, FRAC, EXP_DIGITS) and digit:
        return phase
    if phase in (ZERO, INT) and b == ord("."):
        return DOT
    if phase in (ZERO, INT, FRAC) and b in b"eE":
        return EXP
    if phase == DOT:
        return FRAC if digit else None
    if phase == EXP and b in b"+-":
        return EXP_SIGN
    if phase in (EXP, EXP_SIGN):
        return EXP_DIGITS if digit else None
    return None


def _value_done(stack: str) -> tuple:
    return (AFTER, stack, 0) if stack else (DONE, "", 0)


def _value_start(stack: str, b: int) -> tuple | None:
    if b in b"{[":
        if len(stack) >= MAX_DEPTH:
            return None
        return (KEY_OR_CLOSE, stack + "{", 0) if b == ord("{") else (VALUE_OR_CLOSE, stack + "[", 0)
    if b == QUOTE:
        return (STRING, stack, False)
    if b == ord("-") or b in DIGITS:
        return (NUMBER, stack, (MINUS if b == ord("-") else ZERO if b == ord("0") else INT, 1))
    if b in LITERALS:
        return (LITERAL, stack, LITERALS[b])
    return None


def step(state: tuple, b: int) -> tuple | None:
    """The state after byte b, or None when no JSON object's text continues this way."""
    mode, stack, extra = state
    if mode == STRING:
        if b == QUOTE:
            return (COLON, stack, 0) if extra else _value_done(stack)
        if b == BACKSLASH:
            return (ESCAPE, stack, extra)
        return None if b < 0x20 else state
    if mode == ESCAPE:
        if b == ord("u"):
            return (HEX, stack, (extra, 4))
        return (STRING, stack, extra) if b in ESCAPES else None
    if mode == HEX:
        is_key, left = extra
        if b not in HEX_DIGITS:
            return None
        return (STRING, stack, is_key) if left == 1 else (HEX, stack, (is_key, left - 1))
    if mode == NUMBER:
        phase, length = extra
        after = _number_step(phase, b)
        if after is not None:  # the last byte allowed must leave a number that may end
            fits = length + 1 < MAX_NUMBER or (length + 1 == MAX_NUMBER and after in NUMBER_COMPLETE)
            return (NUMBER, stack, (after, length + 1)) if fits else None
        return step(_value_done(stack), b) if phase in NUMBER_COMPLETE else None  # b ends the number
    if mode == LITERAL:
        if b != extra[0]:
            return None
        return _value_done(stack) if len(extra) == 1 else (LITERAL, stack, extra[1:])
    if mode == DONE:
        return None
    if b in WHITESPACE:  # the structural modes
        return (mode, stack, extra + 1) if extra < MAX_WHITESPACE else None
    if mode == START:
        return (KEY_OR_CLOSE, "{", 0) if b == ord("{") else None
    if mode in (VALUE, VALUE_OR_CLOSE):
        if mode == VALUE_OR_CLOSE and b == ord("]"):
            return _value_done(stack[:-1])
        return _value_start(stack, b)
    if mode in (KEY, KEY_OR_CLOSE):
        if b == QUOTE:
            return (STRING, stack, True)
        return _value_done(stack[:-1]) if mode == KEY_OR_CLOSE and b == ord("}") else None
    if mode == COLON:
        return (VALUE, stack, 0) if b == ord(":") else None
    # AFTER a value inside a container
    top = stack[-1]
    if b == ord(","):
        return (KEY, stack, 0) if top == "{" else (VALUE, stack, 0)
    return _value_done(stack[:-1]) if b == ord("}" if top == "{" else "]") else None


def run(state: tuple | None, data: bytes) -> tuple | None:
    """The state after all of data (None once refused)."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def is_prefix(text: str) -> bool:
    """Whether text (UTF-8) begins some JSON object the recognizer accepts."""
    return run(INITIAL, text.encode("utf-8")) is not None


# ---------------------------------------------------------------------- token bytes

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _uses(component, kind: str) -> bool:
    """Whether a tokenizer.json decoder (or pre-tokenizer) is, or holds, one of `kind`."""
    if not isinstance(component, dict):
        return False
    if component.get("type") == kind:
        return True
    parts = component.get("decoders") or component.get("pretokenizers") or []
    return any(_uses(p, kind) for p in parts)


def token_bytes(tokenizer_json: str, tokenizer, vocab_size: int) -> list[bytes | None]:
    """Each token's bytes as the text decodes them (None: a special or unknown token, never
    allowed in JSON). Byte-level vocabularies (GPT-2, Llama 3) map characters back to bytes;
    SentencePiece-style ones read `<0xHH>` byte tokens and U+2581 as a space. The result is
    checked against the tokenizer's own decoding of every token together."""
    spec = json.loads(tokenizer_json)
    special = {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
    byte_level = _uses(spec.get("decoder"), "ByteLevel")
    alphabet = _byte_level_alphabet() if byte_level else {}
    out: list[bytes | None] = []
    for i in range(vocab_size):
        piece = tokenizer.id_to_token(i)
        if piece is None or i in special:
            out.append(None)
        elif byte_level:
            out.append(bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else None)
        elif _BYTE_TOKEN.fullmatch(piece):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    ids = [i for i, b in enumerate(out) if b]
    ours = b"".join(out[i] for i in ids).decode("utf-8", errors="replace")
    theirs = tokenizer.decode(ids, skip_special_tokens=True)
    if ours.lstrip(" ") != theirs.lstrip(" "):  # a SentencePiece decoder strips the first space
        raise BitnetError("JSON output needs each token's bytes, and this model's tokenizer decodes its tokens "
                          "in a way bitnet-cli does not follow (not byte-level BPE nor SentencePiece-style)",
                          param="response_format")
    return out


# ---------------------------------------------------------------------- allowed tokens


class JsonVocabulary:
    """A vocabulary's tokens as bytes, arranged to find the tokens each recognizer state allows;
    built once per model (Engine.json_vocabulary) and shared by all of its sequences."""

    def __init__(self, tokens: Sequence[bytes | None], end_ids: Sequence[int]):
        self.tokens = list(tokens)
        self.size = len(self.tokens)
        order = sorted((t, i) for i, t in enumerate(self.tokens) if t)
        self.sorted_bytes = [t for t, _ in order]
        self.sorted_ids = [i for _, i in order]
        # string mode: tokens of plain string bytes leave the state as it is; the others are
        # decided by what follows their first quote, backslash or control byte
        self.plain = np.zeros(self.size, dtype=bool)
        tails: dict[bytes, list[int]] = {}
        for i, t in enumerate(self.tokens):
            if not t:
                continue
            cut = next((k for k, b in enumerate(t) if b in (QUOTE, BACKSLASH) or b < 0x20), None)
            if cut is None:
                self.plain[i] = True
            else:
                tails.setdefault(t[cut:], []).append(i)
        self.tails = {tail: np.array(ids) for tail, ids in tails.items()}
        self.end = np.zeros(self.size, dtype=bool)
        self.end[[i for i in end_ids if 0 <= i < self.size]] = True
        self._masks: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def allowed(self, state: tuple) -> np.ndarray:
        """bool [V]: the tokens that may come in `state` (read-only; cached)."""
        mask = self._masks.get(state)
        if mask is not None:
            self._masks.move_to_end(state)
            return mask
        if state[0] == DONE:
            mask = self.end
        elif state[0] == STRING:
            mask = self.plain.copy()
            for tail, ids in self.tails.items():
                if run(state, tail) is not None:
                    mask[ids] = True
        else:
            mask = np.zeros(self.size, dtype=bool)
            found: list[int] = []
            self._walk(state, 0, len(self.sorted_bytes), 0, found)
            mask[found] = True
        if not mask.any():
            raise BitnetError("JSON output: no token of this model's vocabulary continues the JSON here",
                              param="response_format")
        mask.flags.writeable = False
        self._masks[state] = mask
        if len(self._masks) > MASK_CACHE:
            self._masks.popitem(last=False)
        return mask

    def _walk(self, state: tuple, lo: int, hi: int, depth: int, found: list[int]) -> None:
        """Collect the ids in sorted_bytes[lo:hi] (which share their first `depth` bytes, read
        into `state`) that the recognizer accepts from here on."""
        toks, i = self.sorted_bytes, lo
        while i < hi and len(toks[i]) == depth:  # tokens that end here
            found.append(self.sorted_ids[i])
            i += 1
        while i < hi:
            b = toks[i][depth]
            j = bisect.bisect_left(toks, toks[i][:depth] + bytes([b + 1]), i, hi) if b < 255 else hi
            after = step(state, b)
            if after is not None:
                self._walk(after, i, j, depth + 1, found)
            i = j


class JsonConstraint:
    """One sequence's progress through a JSON object: `allowed()` before each token is chosen,
    `push(token)` after."""

    def __init__(self, vocabulary: JsonVocabulary):
        self.vocabulary = vocabulary
        self.state = INITIAL

    def allowed(self) -> np.ndarray:
        return self.vocabulary.allowed(self.state)

    def push(self, token: int) -> None:
        if self.state[0] == DONE:
            return  # the end-of-sequence token that closes it
        after = run(self.state, self.vocabulary.tokens[token] or b"")
        if after is None or not self.vocabulary.tokens[token]:
            raise BitnetError(f"token {token} does not continue the JSON object")  # allowed() forbids it
        self.state = after

    @property
    def done(self) -> bool:
        return self.state[0] == DONE


def check_format(output_format: str) -> str:
    if output_format not in RESPONSE_FORMATS:
        raise BitnetError(f"unknown output format {output_format!r}; choose one of: {', '.join(RESPONSE_FORMATS)}",
                          param="response_format")
    return output_format


__all__ = ["JsonConstraint", "JsonVocabulary", "RESPONSE_FORMATS", "check_format", "is_prefix", "step",
           "token_bytes"]
