"""JSON Schema's `pattern` and a few `format`s as automata over characters, for constrained decoding
(bitnet_cli.constrain): a regular expression in ECMA-262's syntax (the subset that describes a
regular language) compiled to an NFA over code points, then walked as sets of NFA states.

Supported: literals, `.`, classes (`[a-z]`, `[^...]`, `\\d \\w \\s` and their negations, escapes
inside), groups (`(...)`, `(?:...)`, `(?<name>...)`), alternation, the quantifiers `* + ? {n}
{n,} {n,m}` (lazy ones too: they match the same language), and `^` / `$` at the start / end of
a top-level alternative. As JSON Schema has it, a pattern matches anywhere in the string unless
anchored. Refused: backreferences, lookaround, `\\b`, Unicode property escapes, flags, anchors
elsewhere, and patterns of more than MAX_STATES NFA states (large counted repeats).

A length in characters (JSON Schema's minLength/maxLength beside the pattern) is one more automaton: the NFA
times a count of the characters read (:meth:`Pattern._count_characters`), accepting where the pattern does and
the count is within the length.

The string is written without escapes, so only characters a JSON string holds as they are
(WRITABLE: no control characters, quote or backslash) are ever produced; every NFA state that
cannot reach the accepting one through those is removed, so a state set that is not empty always
goes on to a match.
"""

from __future__ import annotations

import bisect
import functools

from bitnet_cli.errors import BitnetError

MAX_CODE = 0x10FFFF
MAX_STATES = 4096  # NFA states of one pattern (each counted repeat copies its body)

Ranges = tuple  # a set of code points: sorted, disjoint, non-adjacent inclusive (low, high) pairs


def ranges(pairs) -> Ranges:
    """The normal form of a union of (low, high) pairs."""
    out: list[list[int]] = []
    for low, high in sorted(pairs):
        if out and low <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], high)
        else:
            out.append([low, high])
    return tuple((low, high) for low, high in out)


def negate(r: Ranges) -> Ranges:
    out, next_low = [], 0
    for low, high in r:
        if low > next_low:
            out.append((next_low, low - 1))
        next_low = high + 1
    if next_low <= MAX_CODE:
        out.append((next_low, MAX_CODE))
    return tuple(out)


def intersect(a: Ranges, b: Ranges) -> Ranges:
    return negate(ranges(negate(a) + negate(b)))


def contains(r: Ranges, c: int) -> bool:
    i = bisect.bisect_right(r, (c, MAX_CODE)) - 1
    return i >= 0 and r[i][0] <= c <= r[i][1]


# What a string written without escapes can hold: no control characters, quote or backslash (nor
# surrogates, which UTF-8 cannot encode).
WRITABLE = negate(ranges([(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0xD800, 0xDFFF)]))
DIGIT = ((0x30, 0x39),)
WORD = ranges([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)])
SPACE = ranges([(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
                (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)])  # ECMA-262's \s
DOT = negate(ranges([(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]))  # any but line terminators
CLASS_ESCAPES = {"d": DIGIT, "D": negate(DIGIT), "w": WORD, "W": negate(WORD), "s": SPACE, "S": negate(SPACE)}
CHAR_ESCAPES = {"t": 0x09, "n": 0x0A, "v": 0x0B, "f": 0x0C, "r": 0x0D, "0": 0x00}
SYNTAX = set("^$\\.*+?()[]{}|/-")  # escaped as themselves

# `format`s written as patterns: the digits' ranges, not the calendar (2023-02-31 is a "date")
_TIME = r"([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d{1,9})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)"
_DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"({_OCTET}\.){{3}}{_OCTET}"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # a host name's label (RFC 1123): 1-63, no hyphen at the ends
_H16 = "[0-9a-fA-F]{1,4}"
_LS32 = f"({_H16}:{_H16}|{_IPV4})"
# RFC 3986's IPv6address, its nine rules in order: six groups and no "::", then "::" with at most k - 1 groups before
# it and 8 - k after it (k = 1..8), the last 32 bits as two groups or an IPv4 address (no zone index: RFC 4291's form)
_IPV6 = "|".join([f"({_H16}:){{6}}{_LS32}", f"::({_H16}:){{5}}{_LS32}", f"({_H16})?::({_H16}:){{4}}{_LS32}",
                  *(f"(({_H16}:){{0,{n - 1}}}{_H16})?::({_H16}:){{{5 - n}}}{_LS32}" for n in (2, 3)),
                  f"(({_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}", f"(({_H16}:){{0,4}}{_H16})?::{_LS32}",
                  f"(({_H16}:){{0,5}}{_H16})?::{_H16}", f"(({_H16}:){{0,6}}{_H16})?::"])
# RFC 3339's duration (appendix A): P, then a date part (days, months then days, or years then months then days) with
# a time part or not, a time part alone (T, then hours then minutes then seconds, from any of them), or weeks
_DUR_TIME = r"T(\d+H(\d+M(\d+S)?)?|\d+M(\d+S)?|\d+S)"
_DUR_DATE = r"(\d+D|\d+M(\d+D)?|\d+Y(\d+M(\d+D)?)?)"
FORMATS = {
    "date": f"^{_DATE}$",
    "time": f"^{_TIME}$",
    "date-time": f"^{_DATE}T{_TIME}$",
    "duration": f"^P({_DUR_DATE}({_DUR_TIME})?|{_DUR_TIME}|\\d+W)$",
    "uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    "ipv4": f"^{_IPV4}$",
    "ipv6": f"^({_IPV6})$",
    "hostname": f"^{_LABEL}(\\.{_LABEL})*$",  # labels only, not the name's 253 characters
    "email": r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*" f"@{_LABEL}(\\.{_LABEL})+$",
}


class PatternError(ValueError):
    pass


class _Parser:
    """Recursive descent over a pattern to a tree: ("chars", Ranges), ("cat", [nodes]), ("alt", [nodes]),
    ("repeat", node, least, most or None)."""

    def __init__(self, text: str):
        self.text, self.i = text, 0

    def peek(self) -> str | None:
        return self.text[self.i] if self.i < len(self.text) else None

    def take(self) -> str:
        if self.i >= len(self.text):
            raise PatternError("ends too early")
        self.i += 1
        return self.text[self.i - 1]

    def top(self) -> tuple:
        """The whole pattern: alternatives, each anchored or not at either end (unanchored ends match anything)."""
        any_text = ("repeat", ("chars", ((0, MAX_CODE),)), 0, None)
        alternatives = []
        while True:
            start = self.peek() == "^"
            if start:
                self.i += 1
            body = self.sequence(top=True)
            end = self.peek() == "$"
            if end:
                self.i += 1
            alternatives.append(("cat", [*(() if start else (any_text,)), body, *(() if end else (any_text,))]))
            if self.peek() is None:
                return ("alt", alternatives)
            if self.take() != "|":
                raise PatternError(f"an unmatched ) at {self.i - 1}")

    def alternation(self) -> tuple:
        parts = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            parts.append(self.sequence())
        return ("alt", parts)

    def sequence(self, top: bool = False) -> tuple:
        items = []
        while (c := self.peek()) is not None and c not in "|)":
            if c == "$" and top and self.text[self.i + 1:self.i + 2] in ("", "|"):
                break  # the alternative's end anchor (top() reads it)
            if c in "^$":
                raise PatternError(f"{c} is supported only at the start (^) or end ($) of the pattern")
            items.append(self.quantified(self.atom()))
        return ("cat", items)

    def atom(self) -> tuple:
        c = self.take()
        if c == ".":
            return ("chars", DOT)
        if c == "[":
            return ("chars", self.char_class())
        if c == "(":
            if self.peek() == "?":
                self.i += 1
                kind = self.take()
                if kind == "<" and self.peek() not in ("=", "!"):
                    while self.take() != ">":
                        pass
                elif kind != ":":
                    raise PatternError("lookaround: not supported")
            inner = self.alternation()
            if self.peek() != ")":
                raise PatternError("a group is not closed")
            self.i += 1
            return inner
        if c == "\\":
            return ("chars", self.escape(in_class=False))
        if c in "*+?" or (c == "{" and self._counted(self.i - 1)):
            raise PatternError(f"nothing to repeat at {self.i - 1}")
        if c == ")":
            raise PatternError("an unmatched )")
        return ("chars", ((ord(c), ord(c)),))  # a "{" that starts no quantifier is itself (as in browsers)

    def _counted(self, at: int) -> bool:
        """Whether a quantifier {n}, {n,} or {n,m} starts at text[at] (a "{")."""
        j = self.text.find("}", at)
        least, _, most = (self.text[at + 1:j] if j >= 0 else "").partition(",")
        return least.isdigit() and (most == "" or most.isdigit())

    def quantified(self, node: tuple) -> tuple:
        c = self.peek()
        if c is None or c not in "*+?{":
            return node
        if c == "{":
            if not self._counted(self.i):
                return node
            j = self.text.index("}", self.i)
            least, comma, most = self.text[self.i + 1:j].partition(",")
            self.i = j + 1
            lo, hi = int(least), (int(most) if most else None) if comma else int(least)
            if hi is not None and hi < lo:
                raise PatternError(f"{{{lo},{hi}}}: the most is less than the least")
        else:
            self.i += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if self.peek() == "?":  # lazy: the same language
            self.i += 1
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self._counted(self.i)):
            raise PatternError("a quantifier after a quantifier")
        return ("repeat", node, lo, hi)

    def escape(self, in_class: bool) -> Ranges:
        c = self.take()
        if c in CLASS_ESCAPES:
            return CLASS_ESCAPES[c]
        if c in CHAR_ESCAPES:
            return ((CHAR_ESCAPES[c],) * 2,)
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.text[self.i:self.i + n]
            if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise PatternError(f"\\{c} needs {n} hex digits")
            self.i += n
            return ((int(digits, 16),) * 2,)
        if c in SYNTAX or (in_class and c == "b") or not c.isalnum():
            code = 0x08 if c == "b" else ord(c)
            return ((code, code),)
        what = "backreferences" if c.isdigit() else {"p": "Unicode property escapes",
                                                       "P": "Unicode property escapes"}.get(c, "\\" + c)
        raise PatternError(f"{what}: not supported")

    def char_class(self) -> Ranges:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        pairs, first = [], True
        while True:
            c = self.take()
            if c == "]" and not first:
                break
            first = False
            low = self.escape(in_class=True) if c == "\\" else ((ord(c), ord(c)),)
            if self.peek() == "-" and self.text[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                c2 = self.take()
                high = self.escape(in_class=True) if c2 == "\\" else ((ord(c2), ord(c2)),)
                if len(low) != 1 or len(high) != 1 or low[0][0] != low[0][1] or high[0][0] != high[0][1]:
                    raise PatternError("a class range between classes")
                if high[0][0] < low[0][0]:
                    raise PatternError("a class range out of order")
                pairs.append((low[0][0], high[0][0]))
            else:
                pairs.extend(low)
        r = ranges(pairs)
        return negate(r) if negated else r


class Pattern:
    """A compiled pattern: an NFA over code points (each state's moves restricted to WRITABLE, the
    states that cannot reach ``accept`` removed). Its automaton states are frozensets of NFA states,
    closed under the empty moves: ``start``, :meth:`step`, :meth:`accepts`."""

    def __init__(self, source: str, least: int = 0, most: int | None = None):
        self.source = source
        tree = _Parser(source).top()
        self.empty: list[list[int]] = []
        self.moves: list[list[tuple[Ranges, int]]] = []
        begin, self.accept = self._build(tree)
        if least or most is not None:
            begin = self._count_characters(begin, least, most)
        self._prune()
        self.start = self._closure({begin})
        if not self.start:
            length = "" if not least and most is None else \
                f" of {least} or more characters" if most is None else f" of {least} to {most} characters"
            raise PatternError(f"no string{length} written without escapes matches it")
        self._steps: dict[tuple[frozenset, int], frozenset] = {}

    def _state(self) -> int:
        if len(self.moves) >= MAX_STATES:
            raise PatternError(f"more than {MAX_STATES} automaton states (counted repeats copy their body)")
        self.empty.append([])
        self.moves.append([])
        return len(self.moves) - 1

    def _build(self, node: tuple) -> tuple[int, int]:
        """Thompson's construction: (entry, exit) states of node's automaton."""
        kind = node[0]
        if kind == "chars":
            a, b = self._state(), self._state()
            self.moves[a].append((intersect(node[1], WRITABLE), b))
            return a, b
        if kind == "cat":
            a = b = self._state()
            for item in node[1]:
                x, y = self._build(item)
                self.empty[b].append(x)
                b = y
            return a, b
        if kind == "alt":
            a, b = self._state(), self._state()
            for item in node[1]:
                x, y = self._build(item)
                self.empty[a].append(x)
                self.empty[y].append(b)
            return a, b
        _, body, least, most = node  # repeat: least copies, then (most - least) optional ones or a loop
        a = b = self._state()
        for _ in range(least):
            x, y = self._build(body)
            self.empty[b].append(x)
            b = y
        if most is None:
            x, y = self._build(body)
            self.empty[b].append(x)
            self.empty[y].append(x)
            end = self._state()
            self.empty[b].append(end)
            self.empty[y].append(end)
            return a, end
        end = self._state()
        self.empty[b].append(end)
        for _ in range(most - least):
            x, y = self._build(body)
            self.empty[b].append(x)
            self.empty[y].append(end)
            b = y
        return a, end

    def _count_characters(self, begin: int, least: int, most: int | None) -> int:
        """Replace the NFA by its product with a count of characters: state (s, c) is s after c characters, c
        counted up to ``most``, or up to ``least`` where there is no most (any more count as ``least``); it accepts
        from (accept, c) for c >= least, through a new accepting state. Returns the new begin state."""
        top = least if most is None else most
        n = len(self.moves)
        if n * (top + 1) + 1 > MAX_STATES:
            raise PatternError(f"more than {MAX_STATES} automaton states with the length ({n} states x "
                               f"{top + 1} counts)")

        def at(s: int, c: int) -> int:
            return s * (top + 1) + c

        empty = [[at(t, c) for t in self.empty[s]] for s in range(n) for c in range(top + 1)]
        moves = [[(r, at(t, min(c + 1, top))) for r, t in self.moves[s]] if c < top or most is None else []
                 for s in range(n) for c in range(top + 1)]
        self.empty, self.moves = empty, moves
        accept = self._state()
        for c in range(least, top + 1):
            self.empty[at(self.accept, c)].append(accept)
        self.accept = accept
        return at(begin, 0)

    def _prune(self) -> None:
        """Drop the moves on no character and every state that cannot reach accept."""
        self.moves = [[(r, t) for r, t in m if r] for m in self.moves]
        back: list[list[int]] = [[] for _ in self.moves]
        for s in range(len(self.moves)):
            for t in self.empty[s]:
                back[t].append(s)
            for _, t in self.moves[s]:
                back[t].append(s)
        live, todo = {self.accept}, [self.accept]
        while todo:
            for s in back[todo.pop()]:
                if s not in live:
                    live.add(s)
                    todo.append(s)
        self.live = live
        self.empty = [[t for t in e if t in live] for e in self.empty]
        self.moves = [[(r, t) for r, t in m if t in live] for m in self.moves]

    def _closure(self, states) -> frozenset:
        seen, todo = set(s for s in states if s in self.live), [s for s in states if s in self.live]
        while todo:
            for t in self.empty[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def step(self, states: frozenset, c: int) -> frozenset:
        """The states after character c (empty: no match goes on this way)."""
        key = (states, c)
        after = self._steps.get(key)
        if after is None:
            after = self._closure([t for s in states for r, t in self.moves[s] if contains(r, c)])
            if len(self._steps) < 1 << 16:
                self._steps[key] = after
        return after

    def takes_any(self, states: frozenset, low: int, high: int) -> bool:
        """Whether some character in [low, high] goes on from states (a multi-byte character begun)."""
        return any(r_low <= high and low <= r_high for s in states for r, _ in self.moves[s] for r_low, r_high in r)

    def accepts(self, states: frozenset) -> bool:
        return self.accept in states

    def matches(self, text: str) -> bool:
        """Whether text (characters written as they are) is a string the pattern accepts."""
        states = self.start
        for ch in text:
            states = self.step(states, ord(ch))
            if not states:
                return False
        return self.accepts(states)


@functools.lru_cache(maxsize=64)
def compile_pattern(source: str, least: int = 0, most: int | None = None) -> Pattern:
    """A pattern (ECMA-262 syntax) compiled, matching only strings of ``least`` to ``most`` characters (None: no
    most); BitnetError naming what is not supported."""
    try:
        return Pattern(source, least, most)
    except PatternError as e:
        raise BitnetError(f"pattern {source[:60]!r}: {e}", param="response_format") from None
    except RecursionError:
        raise BitnetError(f"pattern {source[:60]!r}: nested too deep", param="response_format") from None


__all__ = ["FORMATS", "Pattern", "WRITABLE", "compile_pattern"]
