"""JSON Schema patterns (bitnet_cli.pattern): matches against Python's re (ECMA-262 and Python agree on this subset
for ASCII classes), the automaton's prefixes always going on to a match, and clear errors for what is refused."""

from __future__ import annotations

import random
import re

import pytest

from bitnet_cli.errors import BitnetError
from bitnet_cli.pattern import FORMATS, WRITABLE, compile_pattern, contains

ALPHABET = "ab1 -_.Zé9"


def random_regex(r: random.Random, depth: int = 0) -> str:
    """Patterns of the supported subset (with the characters of ALPHABET)."""
    k = r.random()
    if depth > 2 or k < 0.35:  # unbounded repeats only here: re backtracks exponentially on nested ones
        return r.choice(["a", "b", "1", "é", ".", r"\d", r"\w", r"\s", r"\D", "[ab]", "[^a1]", "[a-z]", "[-_]",
                         r"\.", "[é9]", " ", "Z"]) + r.choice(["", "", "*", "+", "?", "{2}", "{1,3}", "{0,}", "*?"])
    if k < 0.55:
        atom = "(" + "|".join(random_regex(r, depth + 1) for _ in range(r.randint(1, 3))) + ")"
    elif k < 0.65:
        atom = "(?:" + random_regex(r, depth + 1) + ")"
    else:  # a sequence, taking no quantifier of its own (its last part may have one)
        return "".join(random_regex(r, depth + 1) for _ in range(r.randint(1, 3)))
    return atom + r.choice(["", "", "?", "{2}", "{1,3}", "??"])


def random_text(r: random.Random) -> str:
    return "".join(r.choice(ALPHABET) for _ in range(r.randint(0, 7)))


def test_matches_are_python_re_searches():
    """A pattern matches where re.search (ASCII classes, as ECMA-262's) finds it: anchored or not, 400 random
    patterns, 60 strings each, some made to match by re itself."""
    r = random.Random(11)
    checked = matched = 0
    for _ in range(400):
        body = random_regex(r)
        source = r.choice(["", "^"]) + body + r.choice(["", "$"])
        if r.random() < 0.2:
            source = source + "|" + r.choice(["^", ""]) + random_regex(r) + r.choice(["", "$"])
        p = compile_pattern(source)
        expected = re.compile(source, re.ASCII)
        for _ in range(60):
            text = random_text(r)
            want = expected.search(text) is not None
            assert p.matches(text) == want, (source, text)
            checked += 1
            matched += want
    assert matched > checked // 10


def goes_on_to_a_match(p, states) -> bool:
    """Whether a breadth-first search from states over the characters p's moves name reaches the accepting state."""
    frontier, seen, found = [states], {states}, p.accepts(states)
    while frontier and not found:
        s = frontier.pop()
        for c in {low for q in s for rng, _ in p.moves[q] for low, _ in rng}:
            t = p.step(s, c)
            found = found or p.accepts(t)
            if t and t not in seen:
                seen.add(t)
                frontier.append(t)
    return found


def test_every_prefix_of_the_automaton_goes_on_to_a_match():
    """The states after any prefix that the automaton keeps (not empty) reach the accepting state, for every prefix
    of random texts."""
    r = random.Random(12)
    for _ in range(150):
        p = compile_pattern("^" + random_regex(r) + r.choice(["", "$"]))
        for _ in range(20):
            states = p.start
            for ch in random_text(r):
                states = p.step(states, ord(ch))
                if not states:
                    break
                assert goes_on_to_a_match(p, states), (p.source, ch)


def test_a_length_beside_the_pattern_counts_characters():
    """minLength/maxLength beside a pattern (compile_pattern(source, least, most)): a match is re.search's with a
    length within them, and every prefix the automaton keeps still goes on to such a match; where none exists, the
    error says so."""
    r = random.Random(13)
    compiled = 0
    for _ in range(300):
        source = r.choice(["", "^"]) + random_regex(r) + r.choice(["", "$"])
        least = r.randint(0, 4)
        most = r.choice([None, least + r.randint(0, 3)])
        try:
            p = compile_pattern(source, least, most)
        except BitnetError as e:
            assert "no string of" in str(e) or "automaton states" in str(e), (source, least, most, e)
            continue
        compiled += 1
        expected = re.compile(source, re.ASCII)
        for _ in range(40):
            text = random_text(r)
            want = expected.search(text) is not None and least <= len(text) and (most is None or len(text) <= most)
            assert p.matches(text) == want, (source, least, most, text)
            states = p.start
            for ch in text:
                states = p.step(states, ord(ch))
                if not states:
                    break
                assert goes_on_to_a_match(p, states), (source, least, most, text)
    assert compiled > 200
    with pytest.raises(BitnetError, match="no string of 3 to 4 characters"):
        compile_pattern("^ab?$", 3, 4)


def test_strings_hold_only_what_is_written_without_escapes():
    """Quotes, backslashes and control characters are never produced (a string with a pattern is written without
    escapes); a pattern that needs one is refused."""
    p = compile_pattern('^.["\\\\\\n]?x$')
    assert p.matches("ax") and not p.matches('a"x') and not p.matches("a\\x")
    assert not contains(WRITABLE, ord('"')) and not contains(WRITABLE, 0x1F) and contains(WRITABLE, ord("é"))
    with pytest.raises(BitnetError, match="no string written without escapes"):
        compile_pattern('^"$')


@pytest.mark.parametrize("name, good, bad", [
    ("date", ["2024-02-29", "1999-12-31"], ["2024-13-01", "2024-1-01", "24-01-01", "2024-01-32"]),
    ("time", ["23:59:60Z", "08:30:00.123+05:30"], ["24:00:00Z", "08:30:00", "8:30:00Z"]),
    ("date-time", ["2024-02-29T08:30:00Z", "2024-02-29T08:30:00.5-01:00"], ["2024-02-29 08:30:00Z"]),
    ("uuid", ["123e4567-e89b-12d3-a456-426614174000"], ["123e4567e89b12d3a456426614174000", "g23e4567-e89b-12d3-a456-426614174000"]),
    ("ipv4", ["192.168.0.1", "0.0.0.0", "255.255.255.255"], ["256.1.1.1", "1.2.3", "01.2.3.4"]),
    ("email", ["a.b+c@example.co.uk", "x@y.io"], ["a@b", "@b.io", "a..b@c.io", "a@-b.io"]),
    ("hostname", ["example.com", "a", "xn--bcher-kva.example", "a-b.c-d.e", "localhost", "123.example", "a" * 63],
     ["-a.com", "a-.com", "a..b", ".a", "a.", "a_b.com", "a" * 64, "é.com", ""]),
    ("duration", ["P1Y2M3D", "PT1H30M", "P1W", "PT0S", "P1DT12H", "P3M", "PT36H", "P1Y2M3DT4H5M6S", "PT5M7S"],
     ["P", "PT", "P1H", "PT1D", "P1W2D", "1D", "P-1D", "P1.5D", "P1Y3D", "PT1H2S", "P1DT"]),
    ("ipv6", ["::", "::1", "1::", "2001:db8::8a2e:370:7334", "0:0:0:0:0:0:0:0", "::ffff:192.0.2.128", "1:2:3:4:5:6:7:8",
              "FE80::0202:B3FF:FE1E:8329", "1:2:3:4:5:6:1.2.3.4"],
     ["1:2:3:4:5:6:7:8:9", "1::2::3", "12345::", ":1", "1:", "::ffff:1.2.3.04", "::1%eth0", "g::", "1:2:3:4:5:6:7"]),
])
def test_formats(name, good, bad):
    p = compile_pattern(FORMATS[name])
    assert all(p.matches(t) for t in good) and not any(p.matches(t) for t in bad)


def test_ipv6_is_what_pythons_ipaddress_reads():
    """The ipv6 format against ipaddress.IPv6Address: each text of random addresses (full, "::" over every run of zero
    groups, the last 32 bits as IPv4, upper case) and random strings over its characters (no zone index: neither
    reads one here)."""
    import ipaddress

    p, r, checked = compile_pattern(FORMATS["ipv6"]), random.Random(14), 0

    def reads(text: str) -> bool:
        try:
            ipaddress.IPv6Address(text)
            return True
        except ValueError:
            return False

    for _ in range(400):
        groups = [r.choice([0, 0, 0, r.getrandbits(16), r.getrandbits(4)]) for _ in range(8)]
        hexes = [format(g, "x") for g in groups]
        texts = [":".join(hexes)] + [":".join(hexes[:i]) + "::" + ":".join(hexes[j:]) for i in range(8)
                                     for j in range(i + 1, 9) if not any(groups[i:j])]
        v4 = str(ipaddress.IPv4Address(groups[6] << 16 | groups[7]))
        texts += [t.rsplit(":", 2)[0] + ":" + v4 for t in texts if not t.endswith(":") and t.count(":") >= 2
                  and t.rsplit(":", 2)[1]]
        for text in texts + [t.upper() for t in texts]:
            assert p.matches(text) == reads(text), text
            checked += 1
    for _ in range(4000):
        text = "".join(r.choice("0123456789abcdef:.") for _ in range(r.randint(1, 24)))
        assert p.matches(text) == reads(text), text
    assert checked > 10000


@pytest.mark.parametrize("source, why", [
    (r"(a)\1", "backreferences"), ("(?=a)", "lookaround"), ("(?<!a)b", "lookaround"), (r"a\bb", r"\b"),
    ("a^b", "^ is supported only"), ("a$b", "$ is supported only"), (r"\p{L}", "Unicode property"), ("(a", "not closed"),
    ("a)", "unmatched )"), ("*a", "nothing to repeat"), ("a**", "after a quantifier"), ("(a{100}){100}", "more than 4096"),
    ("[z-a]", "out of order"), ("a{3,2}", "less than the least"), ("[a", "ends too early"), (r"\x4", "hex digits"),
])
def test_what_is_refused(source, why):
    with pytest.raises(BitnetError, match=re.escape(why)):
        compile_pattern(source)
