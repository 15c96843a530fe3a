"""JSON output (bitnet_cli.constrain): the recognizer against Python's json module, the allowed-token
masks against a naive check of every token, and generation through the engine, `bitnet run` and
the server's response_format."""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from bitnet_cli import constrain as C
from bitnet_cli.errors import BitnetError
from bitnet_cli.sampling import SamplingParams, sample


def random_value(r: random.Random, depth: int = 0):
    k = r.random()
    if depth < 4 and k < 0.25:
        return {r.choice(["a", "b c", "é\"\\", "\u4e2d", "", "k" * r.randint(1, 9)]) + str(r.randint(0, 99)):
                random_value(r, depth + 1) for _ in range(r.randint(0, 4))}
    if depth < 4 and k < 0.45:
        return [random_value(r, depth + 1) for _ in range(r.randint(0, 4))]
    if k < 0.55:
        return r.choice([r.uniform(-1e6, 1e6), r.uniform(-1, 1) * 10.0 ** r.randint(-30, 30), 0.0, -0.0])
    if k < 0.65:
        return r.randint(-10**9, 10**12)
    if k < 0.75:
        return r.choice([True, False, None])
    return "".join(r.choice('ab "\\/\n\t\u00e9\u4e2d\U0001F600\x7f\x01') for _ in range(r.randint(0, 12)))


def random_document(r: random.Random) -> str:
    doc = {str(i): random_value(r) for i in range(r.randint(0, 3))}
    return json.dumps(doc, ensure_ascii=r.random() < 0.5, indent=r.choice([None, 1, 2]),
                      separators=r.choice([None, (",", ":"), (" ,", " : ")]))


def test_every_json_object_is_accepted_to_its_end_and_nothing_else_after_it():
    r = random.Random(0)
    for _ in range(400):
        doc = random_document(r)
        state = C.run(C.INITIAL, doc.encode())
        assert state is not None and state[0] == C.DONE, doc
        assert C.step(state, ord(" ")) is None and C.step(state, ord("{")) is None
    for doc in ['{"a": -0.5e+10, "b": [true, false, null, {}], "c": "\\u00e9\\n"}', "\n  {}", "{\"\":\"\"}"]:
        assert C.run(C.INITIAL, doc.encode())[0] == C.DONE


def test_what_the_recognizer_completes_always_parses_as_an_object():
    """Soundness: random byte edits of valid documents either stop being accepted or still parse
    with json.loads (strict) as an object; and the usual mistakes are refused where they happen."""
    r = random.Random(1)
    accepted = 0
    for _ in range(3000):
        data = bytearray(random_document(r).encode())
        for _ in range(r.randint(1, 3)):
            i = r.randrange(len(data) + 1)
            op = r.random()
            if op < 0.4 and i < len(data):
                del data[i]
            elif op < 0.7:
                data.insert(i, r.choice(b'{}[]",:\\ 0-.eE+tfnu\x01a'))
            elif i < len(data):
                data[i] = r.choice(b'{}[]",:\\ 0-.eE+tfnu\x01a')
        state = C.run(C.INITIAL, bytes(data))
        if state is not None and state[0] == C.DONE:
            accepted += 1
            # decoded as the engine shows text: a broken UTF-8 sequence becomes U+FFFD, ASCII stays itself
            assert isinstance(json.loads(bytes(data).decode("utf-8", "replace")), dict), bytes(data)
    assert accepted > 100  # the edits do keep some documents valid
    for bad in ['[1]', '"a"', '{"a" 1}', "{'a': 1}", '{"a": 01}', '{"a": 1.}', '{"a": .5}', '{"a": +1}',
                '{"a": NaN}', '{"a": tru}x', '{"a": "\x01"}', '{"a": "\\x"}', '{"a": "\\u12g4"}', '{"a": 1,}',
                '{"a": [1,]}', '{,}', '{"a": 1}}', '{"a": 1]', '{"a": -}']:
        assert C.run(C.INITIAL, bad.encode()) is None, bad


def test_strings_are_whole_utf8():
    """RFC 3629 UTF-8 only: a broken sequence could make a decoder eat the quote after it."""
    for good in ["é", "中", "\U0001F600", "\uffff", "a\u0080b"]:
        assert C.run(C.INITIAL, b'{"' + good.encode() + b'": "' + good.encode() + b'"}')[0] == C.DONE
    for bad in [b"\xff", b"\xc3", b"\xc0\xaf", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
                b"\xf0\x9f\x98"]:
        assert C.run(C.INITIAL, b'{"a": "' + bad + b'"}') is None, bad
        schema = {"type": "object", "properties": {"k": {}}}  # other keys, read as known-key text
        assert C.run(C.initial_state(C.compile_schema(schema)), b'{"' + bad + b'": 1}') is None, bad


def test_limits_stop_endless_filler():
    assert C.run(C.INITIAL, b"\n" + b" \t" * (C.MAX_INDENT // 2) + b'{ "a":\n  1 }') is not None
    for filler in [b"\n" + b" " * (C.MAX_INDENT + 1), b"  ", b"\n\n", b" \n", b"\t", b"\r\n"]:
        assert C.run(C.INITIAL, filler) is None, filler
    assert C.run(C.INITIAL, b'{"a": ' + b"1" * C.MAX_NUMBER) is not None
    assert C.run(C.INITIAL, b'{"a": ' + b"1" * (C.MAX_NUMBER + 1)) is None
    assert C.run(C.INITIAL, b'{"a":' + b"[" * (C.MAX_DEPTH - 1)) is not None
    assert C.run(C.INITIAL, b'{"a":' + b"[" * C.MAX_DEPTH) is None


@pytest.fixture(scope="module")
def json_tokenizer():
    """A byte-level BPE trained on JSON documents: tokens such as '": "', '},', ']}' and '\\"' that cross
    from one recognizer state into others, which is where the mask's shortcuts could go wrong."""
    from tokenizers import Tokenizer

    from bitnet_cli.tokenizer import train_bpe

    r = random.Random(2)
    docs = [random_document(r) for _ in range(1500)]
    tok = train_bpe(docs, 1200)
    spec = tok.to_str()
    return spec, Tokenizer.from_str(spec)


def naive_mask(vocab: C.JsonVocabulary, state) -> np.ndarray:
    """The tokens whose bytes the recognizer takes from state, one by one (the end token where the object is done)."""
    mask = np.array([bool(t) and C.run(state, t) is not None for t in vocab.tokens])
    return mask | vocab.end if C._done(state) else mask


def test_allowed_tokens_are_exactly_those_that_continue_the_json(json_tokenizer):
    spec, tok = json_tokenizer
    V = tok.get_vocab_size()
    tokens = C.token_bytes(spec, tok, V)
    assert tokens[0] is None and tokens[1] is None  # the special tokens
    assert sum(b"\":" in t for t in tokens if t) > 3  # multi-state tokens are there to test
    vocab = C.JsonVocabulary(tokens, [1])
    rng = np.random.default_rng(3)
    checked = finished = 0
    for _ in range(30):
        con, text = C.JsonConstraint(vocab), b""
        for step in range(300):
            mask = con.allowed()
            if step % 3 == 0:
                assert (mask == naive_mask(vocab, con.state)).all(), (text, con.state)
                checked += 1
            if con.done:
                assert np.flatnonzero(mask).tolist() == [1]
                assert isinstance(json.loads(text.decode("utf-8", "replace")), dict)
                finished += 1
                break
            ids = np.flatnonzero(mask)
            moving = ids[~vocab.plain[ids]] if con.state[0] == C.STRING else ids  # leave strings often
            token = int(rng.choice(moving if moving.size and rng.random() < 0.6 else ids))
            text += tokens[token]
            con.push(token)
    assert checked > 200 and finished >= 25
    with pytest.raises(BitnetError, match="does not continue"):
        C.JsonConstraint(vocab).push(tok.token_to_id("}"))


def test_masked_sampling_is_sampling_among_the_allowed_tokens():
    logits = np.random.default_rng(4).normal(size=50).astype(np.float32)
    allowed = np.zeros(50, dtype=bool)
    ids = [3, 7, 11, 40]
    allowed[ids] = True
    order = [ids[i] for i in np.argsort(-logits[ids])]
    assert sample(logits, SamplingParams(temperature=0), np.random.default_rng(0), allowed=allowed) == order[0]
    top2 = SamplingParams(temperature=1.0, top_k=2, top_p=1.0)
    assert {sample(logits, top2, np.random.default_rng(s), allowed=allowed) for s in range(200)} == set(order[:2])
    # the same draws as sampling logits made hopeless (probability 0 after exp) everywhere else
    hopeless = np.where(allowed, logits, logits.min() - 1e4).astype(np.float32)
    for s in range(20):
        p = SamplingParams(temperature=0.7, top_k=0, top_p=0.9)
        masked = sample(logits, p, np.random.default_rng(s), allowed=allowed)
        assert masked in ids and masked == sample(hopeless, p, np.random.default_rng(s))


# ---------------------------------------------------------------------- through the engine


def test_greedy_json_generation_is_the_masked_argmax_step_by_step(tiny_packed):
    from bitnet_cli.engine import Engine

    with Engine.load(tiny_packed[1], threads=1) as engine:
        prompt = "ROMEO: give me the data as JSON."
        gen = engine.generate(prompt, max_tokens=40, temperature=0, output_format="json_object")
        text = "".join(gen)
        assert C.is_prefix(text) and gen.token_ids
        vocab = engine.json_constraint().vocabulary
        ids, state = engine.encode(prompt), C.INITIAL
        for token in gen.token_ids:  # each chosen token is the likeliest among those the naive check allows
            logits = engine.forward(ids, 0, all_logits=False)[0]
            mask = naive_mask(vocab, state)
            assert token == int(np.flatnonzero(mask)[np.argmax(logits[mask])])
            ids.append(token)
            state = C.run(state, vocab.tokens[token])
        plain = "".join(engine.generate(prompt, max_tokens=40, temperature=0))
        assert not C.is_prefix(plain)  # the random model does not write JSON by itself


def test_sampled_json_generations_end_as_objects(tiny_packed):
    from bitnet_cli.engine import Engine

    with Engine.load(tiny_packed[1], threads=1) as engine:
        finished = 0
        for seed in range(12):
            gen = engine.generate("Data:", max_tokens=400, temperature=1.0, top_k=0, top_p=1.0, seed=seed,
                                  output_format="json_object")
            text = "".join(gen)
            assert C.is_prefix(text), text
            if gen.stats.stop_reason == "eos":
                assert isinstance(json.loads(text), dict)
                finished += 1
            again = engine.generate("Data:", max_tokens=400, temperature=1.0, top_k=0, top_p=1.0, seed=seed,
                                    output_format="json_object")
            assert "".join(again) == text  # a seed fixes the text
        assert finished >= 3
        with pytest.raises(BitnetError, match="output format"):
            engine.generate("Data:", output_format="yaml")


def test_run_format_json(tiny_packed):
    cmd = [sys.executable, "-m", "bitnet_cli.cli", "run", str(tiny_packed[1]), "-p", "Data:", "-n", "400",
           "--temp", "1", "--top-k", "0", "--top-p", "1", "--format", "json", "--json"]
    outs = [json.loads(subprocess.run(cmd + ["--seed", str(s)], capture_output=True, text=True, check=True).stdout)
            for s in range(4)]
    assert all(C.is_prefix(o["text"]) for o in outs)
    assert all(isinstance(json.loads(o["text"]), dict) for o in outs if o["stop_reason"] == "eos")
    bad = subprocess.run(cmd[:-2] + ["yaml"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.startswith("error:") and "choose text or json" in bad.stderr
    assert "Traceback" not in bad.stderr


# ---------------------------------------------------------------------- JSON schemas

PETS = {
    "$defs": {"Pet": {"type": "object", "additionalProperties": False, "required": ["name", "kind"],
                      "properties": {"name": {"type": "string", "title": "Name"}, "kind": {"enum": ["cat", "dog", 12]},
                                     "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None}}}},
    "type": "object", "additionalProperties": False, "required": ["owner", "pets"],
    "properties": {"owner": {"type": "string"}, "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}},
                   "score": {"type": "number"}, "ok": {"type": "boolean"},
                   "tags": {"type": "object", "additionalProperties": {"type": "integer"}},
                   "é\"q": {"const": "x\ny"}, "o": {"type": "object", "properties": {"o": {"type": "null"}}}},
}
TREE = {"$defs": {"Node": {"type": "object", "additionalProperties": False, "required": ["v"],
                           "properties": {"v": {"type": "integer"},
                                          "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}},
        "$ref": "#/$defs/Node"}
OPEN = {"type": "object", "properties": {"a": {"type": "integer"}, "ab": {"type": ["string", "null"]}}}
BOUNDED = {"type": "object", "additionalProperties": False, "required": ["age", "p"],
           "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99, "multipleOf": 3},
                          # a step that binary floats hold exactly, as jsonschema's check divides floats
                          "p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "multipleOf": 0.125},
                          "t": {"type": ["number", "null"], "minimum": -273.15},
                          "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{2,3}$"},
                          "when": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]}}}


def pets_instance(r: random.Random) -> dict:
    doc = {"owner": r.choice(["", "Ann", "Zoë \"Z\""]),
           "pets": [{"name": r.choice(["Rex", "ねこ"]), "kind": r.choice(["cat", "dog", 12]),
                     **({"age": r.choice([None, 0, -3, 12345])} if r.random() < 0.5 else {})}
                    for _ in range(r.randint(0, 3))]}
    for key, value in [("score", r.uniform(-1e3, 1e3)), ("ok", r.random() < 0.5), ("é\"q", "x\ny"),
                       ("tags", {f"t{i}": r.randint(-9, 9) for i in range(r.randint(0, 3))}), ("o", {"o": None})]:
        if r.random() < 0.5:
            doc[key] = value
    items = list(doc.items())
    r.shuffle(items)  # properties may come in any order
    return dict(items)


def tree_instance(r: random.Random, depth: int = 0) -> dict:
    node = {"v": r.randint(-99, 99)}
    if depth < 3 and r.random() < 0.6:
        node["kids"] = [tree_instance(r, depth + 1) for _ in range(r.randint(0, 3))]
    return node


def accepted(schema: dict, text: str) -> bool:
    state = C.run(C.initial_state(C.compile_schema(schema)), text.encode())
    return state is not None and C._done(state)


def test_schema_instances_are_accepted_and_violations_refused():
    r = random.Random(5)
    for _ in range(200):
        for schema, doc in [(PETS, pets_instance(r)), (TREE, tree_instance(r)),
                            (OPEN, {"a": 1, "ab": None, "zz": [{}], "a b": "x"})]:
            text = json.dumps(doc, ensure_ascii=False, indent=r.choice([None, 2]))
            assert accepted(schema, text), text
    ok = {"owner": "A", "pets": [{"name": "R", "kind": "cat"}]}
    assert accepted(PETS, json.dumps(ok))
    for bad in [{"pets": []},                                                  # a required key missing
                {**ok, "extra": 1},                                            # additionalProperties false
                {**ok, "score": "high"}, {**ok, "ok": 1}, {**ok, "o": {"o": 0}},  # wrong types
                {**ok, "pets": [{"name": "R", "kind": "cow"}]},                # not in the enum
                {**ok, "pets": [{"name": "R", "kind": "cat", "age": 1.5}]},    # an integer with a fraction
                {**ok, "pets": [{"name": "R"}]},                               # required in the $ref'd schema
                {**ok, "é\"q": "x\nz"}]:                                       # const
        assert not accepted(PETS, json.dumps(bad, ensure_ascii=False)), bad
    assert not accepted(PETS, '{"owner": "A", "owner": "B", "pets": []}')  # a key twice
    assert not accepted(TREE, '{"v": 1, "kids": [{"v": 2, "kids": [{}]}]}')
    assert accepted(OPEN, '{"a": 1, "a b": true}') and not accepted(OPEN, '{"a": "1"}')
    assert accepted(PETS, '{"owner":"A","pets":[],"o":{"o":null}}')
    typed = {"type": "object", "properties": {"n": {"type": ["number", "null"], "enum": [1, 2.5, None]},
                                              "r": {"$ref": "#/$defs/R", "description": "annotations may sit beside"}},
             "$defs": {"R": {"type": "boolean"}}}
    assert accepted(typed, '{"n": 2.5, "r": true}') and not accepted(typed, '{"n": 3}')
    sized = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                                                    "maxItems": 2}, "none": {"type": "array", "maxItems": 0}}}
    assert accepted(sized, '{"a": [1], "none": []}') and accepted(sized, '{"a": [1, 2]}')
    for bad in ['{"a": []}', '{"a": [1, 2, 3]}', '{"none": [1]}', '{"a": [1.5]}']:
        assert not accepted(sized, bad), bad
    lengths = {"type": "object", "properties": {"s": {"type": ["string", "null"], "minLength": 2, "maxLength": 3}}}
    for good in ['"ab"', '"abc"', '"é中"', '"\\n\\t"', '"a\U0001F600"', "null"]:
        assert accepted(lengths, '{"s": %s}' % good), good
    for bad in ['""', '"a"', '"abcd"', '"\\u0041b"', '"ab\\n\\t"']:  # \u escapes are not written in them
        assert not accepted(lengths, '{"s": %s}' % bad), bad
    patterned = {"type": "object", "properties": {"p": {"type": "string", "pattern": "é[0-9]+"},
                                                  "d": {"type": ["string", "null"], "format": "date-time"}}}
    for good in ['{"p": "é1"}', '{"p": "xxé42yy"}', '{"d": "2024-02-29T08:30:00Z"}', '{"d": null}']:
        assert accepted(patterned, good), good
    for bad in ['{"p": "é"}', '{"p": "e1"}', '{"p": "\\u00e91"}', '{"d": "2024-02-29"}', '{"d": "2024-02-29T08:30:00Z "}']:
        assert not accepted(patterned, bad), bad
    counted = {"type": "object", "properties": {"c": {"type": "string", "pattern": "^[a-c]+$", "minLength": 2,
                                                        "maxLength": 3}, "n": {"type": "string", "pattern": "1",
                                                                               "minLength": 3}}}
    for good in ['{"c": "ab"}', '{"c": "cba"}', '{"n": "x1y"}', '{"n": "1111"}']:
        assert accepted(counted, good), good
    for bad in ['{"c": "a"}', '{"c": "abca"}', '{"c": "ad"}', '{"n": "1"}', '{"n": "abc"}']:
        assert not accepted(counted, bad), bad
    unique = {"type": "object", "properties": {"u": {"type": "array", "items": {"enum": ["a", 1, 12, [2]]},
                                                     "uniqueItems": True},
                                               "b": {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True,
                                                     "minItems": 1},
                                               "o": {"anyOf": [{"type": "null"}, {"type": "array", "uniqueItems": True,
                                                                                   "items": {"const": 7}}]},
                                               "d": {"type": "array", "uniqueItems": True, "items": {
                                                   "type": "integer", "minimum": -1, "maximum": 30, "multipleOf": 10}}}}
    for good in ['{"u": []}', '{"u": [12, 1, [2], "a"]}', '{"u": [1, 12]}', '{"b": [false, true]}', '{"o": [7]}',
                 '{"o": null}', '{"u": ["a"], "o": [7], "b": [true]}', '{"d": [30, 0, 10, 20]}']:
        assert accepted(unique, good), good
    for bad in ['{"u": [1, 1]}', '{"u": [[2], "a", [2]]}', '{"u": [12, 1, [2], "a", 1]}', '{"b": []}',
                '{"b": [true, false, true]}', '{"o": [7, 7]}', '{"d": [10, 10]}', '{"d": [5]}', '{"d": [-1]}',
                '{"d": [0, 10, 20, 30, 0]}']:
        assert not accepted(unique, bad), bad
    tuples = {"type": "object", "$defs": {"R": {"type": "boolean"}}, "properties": {
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2, "maxItems": 2},
        "head": {"type": "array", "prefixItems": [{"type": "integer"}], "items": False},
        "tail": {"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "integer"}},
        "one": {"oneOf": [{"type": "integer"}, {"type": "null"}]},
        "all": {"allOf": [{"$ref": "#/$defs/R"}], "description": "pydantic v1's $ref with a description"}}}
    for good in ['{"pair": [1, "a"]}', '{"head": []}', '{"head": [1]}', '{"tail": ["a", 1, 2]}', '{"tail": []}',
                 '{"one": null, "all": true}', '{"one": 3}']:
        assert accepted(tuples, good), good
    for bad in ['{"pair": [1]}', '{"pair": ["a", 1]}', '{"pair": [1, "a", 2]}', '{"head": [1, 2]}', '{"head": ["a"]}',
                '{"tail": ["a", "b"]}', '{"tail": [1]}', '{"one": "x"}', '{"all": 1}']:
        assert not accepted(tuples, bad), bad
    composite = {"type": "object", "properties": {"c": {"const": [1, "x"]}}}  # enum texts are written compactly
    assert accepted(composite, '{"c": [1,"x"]}') and not accepted(composite, '{"c": [1, "x"]}')


NUMBER_TEXT = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")  # JSON's number, without an exponent


@pytest.mark.parametrize("bounds, integer", [
    ({"minimum": 18, "maximum": 99}, True), ({"minimum": -5, "maximum": -3}, True), ({"exclusiveMinimum": 0}, True),
    ({"exclusiveMinimum": 0, "maximum": 1}, False), ({"minimum": -0.25, "exclusiveMaximum": 0.5}, False),
    ({"minimum": 0.5, "maximum": 0.5}, False), ({"maximum": -10.05}, False), ({"minimum": 990}, False),
    ({"minimum": 2.5, "maximum": 7.5}, True), ({"exclusiveMinimum": -1, "exclusiveMaximum": 1}, False),
    ({"multipleOf": 5, "minimum": 3, "maximum": 40}, True), ({"multipleOf": 7, "exclusiveMinimum": -20}, True),
    ({"multipleOf": 0.25}, False), ({"multipleOf": 0.3, "minimum": -1}, False), ({"multipleOf": 1.5}, True),
    ({"multipleOf": 0.05, "minimum": -0.2, "exclusiveMaximum": 0.5}, False),
])
def test_bounded_numbers_are_exactly_the_texts_within_bounds_and_every_prefix_goes_on(bounds, integer, monkeypatch):
    """Every text of up to MAX_NUMBER + 1 bytes (MAX_NUMBER lowered to 3) over a number's bytes: the recognizer accepts
    it as a prefix exactly when some number within the bounds and MAX_NUMBER begins with it, and as a whole value
    exactly when it is one (by brute force: JSON's grammar without an exponent, and exact decimal comparison)."""
    monkeypatch.setattr(C, "MAX_NUMBER", 3)
    C._number_reachable.cache_clear()
    try:
        spec = {"type": "integer" if integer else "number", **bounds}
        state = C.run(C.initial_state(C.compile_schema({"type": "object", "properties": {"a": spec}})), b'{"a":')
        lo = Fraction(repr(bounds.get("minimum", bounds.get("exclusiveMinimum", -10 ** 9))))
        hi = Fraction(repr(bounds.get("maximum", bounds.get("exclusiveMaximum", 10 ** 9))))
        texts = ["".join(t) for n in range(1, 5) for t in itertools.product("-0123456789.", repeat=n)]

        def within(text):
            if len(text) > 3 or not NUMBER_TEXT.fullmatch(text) or (integer and "." in text):
                return False
            v = Fraction(text)
            step = Fraction(repr(bounds.get("multipleOf", 1 if integer else 10 ** -3)))
            return ((lo < v or (lo == v and "minimum" in bounds)) and (v < hi or (v == hi and "maximum" in bounds))
                    and (v / step).denominator == 1)

        valid = [t for t in texts if within(t)]
        assert valid, bounds
        prefixes = {t[:i] for t in valid for i in range(1, len(t) + 1)}
        for text in texts:
            after = C.run(state, text.encode())
            assert (after is not None) == (text in prefixes), text
            done = C.run(after, b"}") if after is not None else None
            assert (done is not None and done[0] == C.DONE) == (text in valid), text
        assert C.run(state, b"1e1") is None or not integer and C.run(state, b"1e") is None  # never an exponent
    finally:
        C._number_reachable.cache_clear()


@pytest.mark.parametrize("schema, why", [
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(x)\\1"}}}, "backreferences: not supported"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": 5}}}, "pattern must be a string"),
    ({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}, {"maxLength": 3}]}}}, "allOf is supported only"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "string"}]}}}, "exclude each other"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "object", "properties": {"k": {"const": 1}}},
                                                       {"type": "object", "properties": {"k": {"const": 2}}}]}}},
     "exclude each other"),  # k is not required: {} is valid against both
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}], "oneOf": [{"type": "string"}]}}},
     "anyOf and oneOf together"),
    ({"type": "object", "properties": {"a": {"type": "string", "discriminator": {"propertyName": "k"}}}},
     "discriminator goes with oneOf"),
    ({"$defs": {"U": {"anyOf": [{"$ref": "#/$defs/U"}, {"type": "string"}]}}, "type": "object",
      "properties": {"a": {"$ref": "#/$defs/U"}}}, "one of its own alternatives"),
    ({"anyOf": [{"type": "object"}, {"type": "string"}]}, "root must be"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"const": i} for i in range(129)]}}}, "more than 128"),
    ({"type": "object", "properties": {"a": {"type": "array", "prefixItems": {"type": "string"}}}}, "prefixItems must be"),
    ({"type": "object", "properties": {"a": {"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}}},
     "minItems is more than prefixItems allows"),
    ({"type": "object", "properties": {"d": {"type": "string", "format": "iri"}}}, "format 'iri' is not supported"),
    ({"type": "object", "properties": {"d": {"type": "string", "format": ["date"]}}}, "format \"['date']\" is not"),  # fuzz
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^x+$", "minLength": 2, "maxLength": 1}}},
     "minLength <= maxLength"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "date", "maxLength": 9}}},
     "no string of 0 to 9 characters"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "x", "format": "date"}}}, "together"),
    ({"type": "object", "properties": {"a": {"enum": ["ab", "cd"], "pattern": "^a"}}}, "does not match the pattern"),
    ({"type": "array"}, "root must be"),
    ({"enum": [{}]}, "root must be"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}, "$ref"),
    ({"type": "object", "properties": {"a": {"$ref": "https://x/y"}}}, "$ref"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "integer"}], "type": "integer"}}}, "nothing but"),
    ({"type": "object", "properties": {"a": {"type": "text"}}}, "type must be"),
    ({"type": "object", "required": ["b"], "additionalProperties": False}, "required"),
    ({"type": "object", "properties": {"a": {"enum": []}}}, "non-empty"),
    ({"type": "object", "properties": {"a": 5}}, "must be an object"),
    ({"type": "object", "properties": {"a": {"type": 5}}}, "type must be"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 3, "maxItems": 2}}}, "minItems <= maxItems"),
    ({"type": "object", "properties": {"a": {"type": "array", "maxItems": -1}}}, "whole numbers"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 1.5}}}, "whole numbers"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": 4, "maxLength": 2}}}, "minLength <= maxLength"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0.2, "maximum": 0.8}}}, "no integer"),
    ({"type": "object", "properties": {"a": {"type": "number", "minimum": 3, "exclusiveMaximum": 3}}}, "no number"),
    ({"type": "object", "properties": {"a": {"type": "number", "exclusiveMinimum": True}}}, "must be a number"),
    ({"type": "object", "properties": {"a": {"type": "number", "maximum": "9"}}}, "must be a number"),
    ({"type": "object", "properties": {"a": {"enum": [1, 5], "maximum": 4}}}, "outside minimum/maximum"),
    ({"type": "object", "properties": {"a": {"enum": [1, 5], "multipleOf": 2}}}, "outside minimum/maximum/multipleOf"),
    ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 4}}},
     "no integer"),
    ({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 0}}}, "multipleOf must be more than 0"),
    ({"type": "object", "properties": {"a": {"type": "number", "multipleOf": "2"}}}, "multipleOf must be a number"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "uniqueItems is supported where"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}},
     "uniqueItems is supported where the items are an enum, a const, booleans or integers between"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 256},
                                             "uniqueItems": True}}}, "(at most 256)"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True,
                                             "minItems": 3}}}, "minItems is more than the 2 distinct items"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"const": 1}, "uniqueItems": "yes"}}},
     "uniqueItems must be true or false"),
    ({"type": "object", "properties": {"a": {"type": "array", "prefixItems": [{"const": 1}], "items": {"const": 2},
                                             "uniqueItems": True}}}, "uniqueItems with prefixItems"),
    ({"type": "object", "required": ["\udc80"]}, "lone surrogate (U+DC80)"),  # fuzz seed 27001
    ({"type": "object", "properties": {"a": {"enum": ["x\ud800"]}}}, "lone surrogate (U+D800)"),
    ({"$defs": {"N": {"type": "object", "required": ["kids"], "properties": {"kids": {
        "type": "array", "minItems": 1, "items": {"$ref": "#/$defs/N"}}}}}, "$ref": "#/$defs/N"}, "no finite JSON value"),
    ({"type": "object", "properties": {"a": {"type": "string", "enum": ["x", 1]}}}, "not of the schema's type"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/X", "type": "string"}}, "$defs": {"X": {}}},
     "$ref with type beside it"),
    ({"type": "object", "properties": {"a": {"enum": list(range(2000))}}}, "more than 1000"),
    ({"type": "object", "properties": {f"p{i}": {} for i in range(2000)}}, "more than 1000"),
    ({"type": "object", "properties": {"a": {"enum": ["x" * 40000, "y" * 40000]}}}, "more than 65536 bytes"),
    ({"type": "object", "properties": {"k" * 70000: {}}}, "more than 65536 bytes"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"^a{{{1000 + i}}}$"} for i in range(20)}},
     "more than 16384 automaton states"),
])
def test_schema_keywords_that_would_not_be_enforced_are_refused(schema, why):
    with pytest.raises(BitnetError, match=re.escape(why)):
        C.compile_schema(schema)


def random_walks(vocab: C.JsonVocabulary, root, rng, walks: int, steps: int, check_every: int) -> list[bytes]:
    """The texts of random walks through the allowed tokens of a schema that ended (those past steps are left out),
    every check_every-th mask checked against the naive one; inside free strings the walks favour the tokens that
    leave them, so that they end."""
    ended = []
    for _ in range(walks):
        con, text = C.JsonConstraint(vocab, root), b""
        for step in range(steps):
            mask = con.allowed()
            if step % check_every == 0:
                assert (mask == naive_mask(vocab, con.state)).all(), (text, con.state)
            if con.done:
                ended.append(text)
                break
            ids = np.flatnonzero(mask)
            in_string = not isinstance(con.state, C.Fork) and con.state[0] == C.STRING
            moving = ids[~vocab.plain[ids]] if in_string else ids
            token = int(rng.choice(moving if moving.size and rng.random() < 0.6 else ids))
            text += vocab.tokens[token]
            con.push(token)
    return ended


def test_schema_constrained_walks_allow_exactly_what_continues_and_end_valid(json_tokenizer):
    jsonschema = pytest.importorskip("jsonschema")
    spec, tok = json_tokenizer
    vocab = C.JsonVocabulary(C.token_bytes(spec, tok, tok.get_vocab_size()), [1])
    rng = np.random.default_rng(6)
    for schema in (PETS, TREE, OPEN, BOUNDED, SMALL):
        ended = random_walks(vocab, C.compile_schema(schema), rng, walks=15, steps=400, check_every=4)
        for text in ended:
            jsonschema.validate(json.loads(text.decode("utf-8", "replace")), schema)
        assert len(ended) >= 8, schema


def pydantic_order_model():
    """A pydantic model whose JSON schema uses what pydantic writes for common field types: constr with a pattern and
    a length, conint/confloat with bounds and multiple_of, sets of a Literal, an Enum and bounded ints (uniqueItems), a tuple
    (prefixItems), Optional (anyOf with null), a UUID (format), a length-bounded list of nested models ($ref)."""
    import enum
    from typing import Literal, Optional
    from uuid import UUID

    from pydantic import BaseModel, ConfigDict, Field, confloat, conint, constr

    class Color(str, enum.Enum):
        red = "red"
        green = "green"

    class Item(BaseModel):
        model_config = ConfigDict(extra="forbid")  # additionalProperties: false, else any other key may come
        sku: constr(pattern=r"^[A-Z]{2}-\d+$", max_length=6)
        qty: conint(ge=1, le=99, multiple_of=3)
        price: confloat(ge=0, lt=10, multiple_of=0.25)
        tags: set[Literal["new", "sale", "eco"]] = set()
        colors: set[Color] = Field(default_factory=set, max_length=2)
        days: set[conint(ge=1, le=7)] = set()
        flags: tuple[bool, int]
        note: Optional[str] = None
        id: UUID

    class Order(BaseModel):
        model_config = ConfigDict(extra="forbid")
        items: list[Item] = Field(min_length=1, max_length=2)
        customer: str = Field(min_length=1, max_length=12)

    return Order


def test_a_pydantic_models_schema_is_enforced_as_pydantic_validates(json_tokenizer):
    """Random walks through the allowed tokens of a pydantic model's own JSON schema end in JSON that the model itself
    validates (pydantic, not jsonschema: its multiple_of, set and pattern checks), every mask checked naively."""
    order = pydantic_order_model()
    schema = order.model_json_schema()
    spec, tok = json_tokenizer
    vocab = C.JsonVocabulary(C.token_bytes(spec, tok, tok.get_vocab_size()), [1])
    ended = random_walks(vocab, C.compile_schema(schema), np.random.default_rng(27), walks=12, steps=1500,
                         check_every=16)
    for text in ended:
        order.model_validate_json(text)
    assert len(ended) >= 6
    assert not accepted(schema, '{"customer": "x", "items": [{"sku": "AB-1", "qty": 4, "price": 1, "flags": [true, 1], '
                                '"id": "123e4567-e89b-12d3-a456-426614174000"}]}')  # qty not a multiple of 3
    assert not accepted(schema, '{"customer": "x", "items": [{"sku": "AB-1", "qty": 3, "price": 1, "flags": [true, 1], '
                                '"id": "123e4567-e89b-12d3-a456-426614174000", "colors": ["red", "red"]}]}')


SMALL = {"type": "object", "additionalProperties": False, "required": ["kind", "n"],
         "properties": {"kind": {"enum": ["cat", "dog"]}, "n": {"type": "integer"}, "ok": {"type": "boolean"},
                        "tags": {"type": "array", "items": {"enum": [1, 2, 12]}, "uniqueItems": True}}}


# a union of objects (pydantic's discriminated oneOf) whose alternatives the first byte cannot tell apart, and an anyOf
# of overlapping numbers; no free strings, so that the random model's text stays short
SHAPES = {"$defs": {"Circle": {"type": "object", "additionalProperties": False, "required": ["kind", "r"],
                               "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1}}},
                    "Square": {"type": "object", "additionalProperties": False, "required": ["kind", "side"],
                               "properties": {"kind": {"const": "square"}, "side": {"type": "boolean"}}}},
          "type": "object", "additionalProperties": False, "required": ["shape"],
          "properties": {"shape": {"oneOf": [{"$ref": "#/$defs/Circle"}, {"$ref": "#/$defs/Square"}],
                                   "discriminator": {"propertyName": "kind"}},
                         "n": {"anyOf": [{"type": "integer", "maximum": 3}, {"type": "number", "minimum": 10}]}}}


def pydantic_union_model():
    """A pydantic model with unions of models: a discriminated one (oneOf with a discriminator), a list of a plain
    Union (anyOf of $refs), an Optional Union (anyOf with null) and a union of a model and a Literal."""
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, ConfigDict, Field

    class Cat(BaseModel):
        model_config = ConfigDict(extra="forbid")  # else a Dog's keys would do in a Cat too
        pet_type: Literal["cat"]
        lives: int = Field(ge=1, le=9)

    class Dog(BaseModel):
        model_config = ConfigDict(extra="forbid")
        pet_type: Literal["dog"]
        good: bool
        friend: Optional[Cat] = None

    class Owner(BaseModel):
        model_config = ConfigDict(extra="forbid")
        pet: Union[Cat, Dog] = Field(discriminator="pet_type")
        others: list[Union[Cat, Dog]] = Field(max_length=3)
        maybe: Union[Cat, Dog, None] = None
        either: Union[Dog, Literal["none", "some"]] = "none"

    return Owner


def test_unions_of_objects_follow_each_alternative_until_the_bytes_decide(json_tokenizer):
    """anyOf/oneOf whose alternatives share a type (pydantic's Union of models): the recognizer follows every
    alternative (a Fork of states) until the bytes rule all but one out, so that keys may come in any order. Random
    walks through a pydantic model's own schema, every mask checked naively, end in JSON that pydantic validates, and
    take both alternatives; texts that would mix them are refused."""
    owner = pydantic_union_model()
    schema = owner.model_json_schema()
    assert "oneOf" in schema["properties"]["pet"] and "anyOf" in schema["properties"]["others"]["items"]
    spec, tok = json_tokenizer
    vocab = C.JsonVocabulary(C.token_bytes(spec, tok, tok.get_vocab_size()), [1])
    ended = random_walks(vocab, C.compile_schema(schema), np.random.default_rng(28), walks=16, steps=1200,
                         check_every=8)
    kinds = set()
    for text in ended:
        kinds.add(owner.model_validate_json(text).pet.pet_type)
    assert len(ended) >= 8 and kinds == {"cat", "dog"}, (len(ended), kinds)
    state = C.run(C.initial_state(C.compile_schema(schema)), b'{"others": [{')
    assert isinstance(state, C.Fork) and len(state) == 2  # a Cat or a Dog: not yet told apart
    for text, ok in [('{"pet": {"lives": 3, "pet_type": "cat"}, "others": []}', True),  # the discriminator last
                     ('{"others": [{"good": true, "pet_type": "dog", "friend": {"pet_type": "cat", "lives": 9}}], '
                      '"pet": {"pet_type": "dog", "good": false}, "maybe": null, "either": "some"}', True),
                     ('{"pet": {"pet_type": "cat", "good": true}, "others": []}', False),  # a Dog's key in a Cat
                     ('{"pet": {"lives": 3, "pet_type": "dog"}, "others": []}', False),
                     ('{"pet": {"pet_type": "dog", "good": true}, "others": [], "either": {"pet_type": "cat", '
                      '"lives": 1}}', False)]:
        assert accepted(schema, text) == ok, text
        if ok:
            owner.model_validate_json(text)


def test_alternatives_open_at_once_are_bounded(json_tokenizer):
    """A recursive anyOf whose alternatives the text tells apart only late doubles the states at each level: past
    MAX_FORK of them the same MAX_FORK are kept every time (it never hangs), and what is kept still ends valid."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"$defs": {"N": {"anyOf": [{"type": "object", "properties": {"k": {"$ref": "#/$defs/N"}}},
                                        {"type": "object", "properties": {"k": {"$ref": "#/$defs/N"},
                                                                          "x": {"type": "null"}}}]}},
              "$ref": "#/$defs/N"}
    levels = C.MAX_FORK.bit_length() - 1  # 2 ** levels states
    state = C.run(C.initial_state(C.compile_schema(schema)), b'{"k": ' * levels)
    assert isinstance(state, C.Fork) and len(state) == C.MAX_FORK
    deeper = C.run(state, b'{"k": ')
    assert isinstance(deeper, C.Fork) and len(deeper) == C.MAX_FORK and deeper == C.run(state, b'{"k": ')
    assert accepted(schema, '{"k": ' * (levels + 3) + "{}" + "}" * (levels + 3))  # one alternative's path at least
    assert accepted(schema, '{"k": ' * levels + "{}" + "}" * levels)
    spec, tok = json_tokenizer
    vocab = C.JsonVocabulary(C.token_bytes(spec, tok, tok.get_vocab_size()), [1])
    for at in (state, deeper, C.run(deeper, b'{"')):  # where tokens fork past MAX_FORK: masks as the bytes go
        assert (vocab.allowed(at) == naive_mask(vocab, at)).all()
    for text in random_walks(vocab, C.compile_schema(schema), np.random.default_rng(30), walks=6, steps=300,
                             check_every=10):
        jsonschema.validate(json.loads(text), schema)


def test_overlapping_alternatives_accept_exactly_what_one_of_them_does():
    """anyOf of alternatives of one type (numbers of two ranges, an enum beside a pattern): every short text is
    accepted exactly where jsonschema finds it valid, and every prefix the recognizer keeps goes on to one it
    accepts."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "additionalProperties": False, "required": ["n", "s"],
              "properties": {"n": SHAPES["properties"]["n"],
                             "s": {"anyOf": [{"enum": ["ab", 2]}, {"type": "string", "pattern": "^a+$"}]}}}
    validator = jsonschema.Draft202012Validator(schema)
    numbers = ["".join(t) for k in range(1, 4) for t in itertools.product("-01239.", repeat=k)]
    strings = ['"a"', '"aa"', '"ab"', '"b"', '""', "2", "3", '"aab"']
    for n in numbers:
        if "." in n and n.rstrip("0").endswith("."):
            continue  # an integer for jsonschema (0.0), where the recognizer writes integers without a fraction
        for value in strings:
            text = f'{{"n": {n}, "s": {value}}}'
            try:
                valid = validator.is_valid(json.loads(text))
            except json.JSONDecodeError:
                valid = False
            assert accepted(schema, text) == valid, text
    for n in numbers:  # a kept prefix of n goes on: completed by digits, then valid or not at all
        state = C.run(C.initial_state(C.compile_schema(schema)), f'{{"n": {n}'.encode())
        if state is not None:
            done = [f'{{"n": {n}{tail}, "s": "a"}}' for tail in ("", "0", "5", "00", "1", "1.5")]
            assert any(accepted(schema, t) for t in done), n


def test_a_call_of_one_of_several_functions_names_it_first_and_follows_its_parameters(json_tokenizer):
    """constrain.tool_call_schema: {"name": NAME, "arguments": {...}} with the name first and the arguments held to
    that function's parameters; random walks (masks checked naively) end in such calls of both functions, and texts
    with the keys swapped, an unknown name or another function's arguments are refused."""
    jsonschema = pytest.importorskip("jsonschema")
    params = {"add": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                      "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
              "say": {"type": "object", "additionalProperties": False, "required": ["text"],
                      "properties": {"text": {"type": "string", "maxLength": 4}}}}
    root = C.tool_call_schema(list(params.items()))
    assert C.tool_call_schema(list(params.items())) is root  # cached: the masks are shared between requests
    spec, tok = json_tokenizer
    vocab = C.JsonVocabulary(C.token_bytes(spec, tok, tok.get_vocab_size()), [1])
    ended = random_walks(vocab, root, np.random.default_rng(29), walks=16, steps=600, check_every=6)
    names = set()
    for text in ended:
        call = json.loads(text)
        assert list(call) == ["name", "arguments"], text
        jsonschema.validate(call["arguments"], params[call["name"]])
        names.add(call["name"])
    assert names == {"add", "say"}, (len(ended), names)

    def whole(text: str) -> bool:
        state = C.run(C.initial_state(root), text.encode())
        return state is not None and C._done(state)

    assert whole('{"name": "add", "arguments": {"a": 1, "b": 2}}') and whole('{"name":"say","arguments":{"text":"x"}}')
    for bad in ['{"arguments": {"a": 1, "b": 2}, "name": "add"}', '{"name": "sub", "arguments": {}}',
                '{"name": "add", "arguments": {"text": "x"}}', '{"name": "add"}', '{"name": "say", "arguments": {}}']:
        assert not whole(bad), bad
    with pytest.raises(BitnetError, match="not is not supported"):
        C.tool_call_schema([("f", {"type": "object", "properties": {"a": {"not": {}}}})])
    many = C.tool_call_schema([(f"f{i}", {"type": "object"}) for i in range(C.MAX_FORK)])  # every one callable
    assert all(C.run(C.initial_state(many), f'{{"name": "f{i}", "arguments": {{}}}}'.encode()) is not None
               for i in range(C.MAX_FORK))
    with pytest.raises(BitnetError, match="more than 128 functions"):
        C.tool_call_schema([(f"f{i}", {"type": "object"}) for i in range(C.MAX_FORK + 1)])


def test_a_tag_is_found_across_tokens_however_they_cut_it():
    """constrain.tag_matched against a search of the whole text, over every way of cutting texts into two pieces."""
    tag = b"<tool_call>"
    for text in (b"a<tool_call>{", b"<tool<tool_call>x", b"<tool_call", b"<<tool_call>", b"x<t<to<tool_callz", b""):
        for cut in range(len(text) + 1):
            matched, rest = C.tag_matched(tag, 0, text[:cut])
            if rest is None:
                matched, rest = C.tag_matched(tag, matched, text[cut:])
            else:  # found in the first piece: the second follows the call's beginning
                rest += text[cut:]
            at = text.find(tag)
            assert rest == (text[at + len(tag):] if at >= 0 else None), (text, cut)
            if at < 0:
                assert matched == max(k for k in range(len(tag)) if text.endswith(tag[:k])), (text, cut)


def split_calls(text: str, tag: str, close: str, listed: bool = False) -> tuple[str, list]:
    """The naive reading of a reply of text and tagged calls: the text before the first tag, and each call parsed
    by json's raw_decode (``listed``: each list of calls), then space, the closing tag and space before the next
    tag."""
    content, found, rest = text.partition(tag)
    calls = []
    while found:
        call, end = json.JSONDecoder().raw_decode(rest.lstrip())
        calls += call if listed else [call]
        rest = rest.lstrip()[end:].lstrip()
        rest = rest[len(close):].lstrip() if rest.startswith(close) else rest
        found = rest.startswith(tag)
        rest = rest[len(tag):]
    return content, calls


def calls_after(calls_written, state, data: bytes):
    """tool_call_step over data (None once refused), the naive masks' reading."""
    for b in data:
        state = state and C.tool_call_step(state, b, calls_written)
    return state


def walk_tool_calls(vocab, extra_ids, calls_written, required: bool, rng, naive_text, first: float = 0.4):
    """40 random walks of ToolCallConstraint over vocab (its ``extra_ids`` chosen 40% of the time, ``first`` for the
    first token), every mask checked against the naive one: ``naive_text(text)`` before the calls, the JSON's inside a
    call, calls_after's elsewhere. The replies, each ended where it may end (or at random in text)."""
    tokens, texts = vocab.tokens, []
    for _ in range(40):
        con, text = C.ToolCallConstraint(vocab, calls_written, required), b""
        for step in range(300):
            mask = con.allowed()
            if not con.calling:
                naive = naive_text(text)
            elif con.state[0] == C.CALL and not C._done(con.state[1]):
                naive = naive_mask(vocab, con.state[1])
            else:
                naive = np.array([bool(t) and calls_after(calls_written, con.state, t) is not None for t in tokens])
                naive |= vocab.end if C.tool_call_ends(con.state) else False
            assert ((np.ones(len(tokens), bool) if mask is None else mask) == naive).all(), (text, con.state)
            ids = np.arange(len(tokens)) if mask is None else np.flatnonzero(mask)
            ids = ids[[tokens[i] is not None for i in ids]]
            if (con.done and (rng.random() < 0.3 or not ids.size)) or (not con.calling and rng.random() < 0.02):
                texts.append(text)
                break
            favoured = np.intersect1d(ids, extra_ids)
            token = int(rng.choice(favoured if favoured.size and rng.random() < (first if step == 0 else 0.4) else ids))
            text += tokens[token]
            con.push(token)
    return texts


@pytest.mark.parametrize("required, several, listed", [(False, True, False), (True, True, False), (False, False, False),
                                                      (False, True, True), (True, False, True)])
def test_tagged_calls_allow_exactly_what_keeps_text_or_calls(json_tokenizer, required, several, listed):
    """ToolCallConstraint: where the model chooses (tool_choice "auto"), before the tag any token but one that
    completes the tag and goes on with bytes no call begins with; where a call is required, space and the tag first;
    inside a call the JSON's masks; after one, space and the closing tag, then space and the next tag (unless only
    one call may come) or the end. ``listed`` (Falcon3's form): the calls as one JSON list between the tags
    (tool_call_list_schema: one at least, one at most unless ``several``). Random walks over a vocabulary with tokens
    that cut the tags apart (and cross from them into calls) check every mask against the naive one and end in text,
    or text then valid calls; ToolCallText takes each apart, fed in random pieces, as json's raw_decode does."""
    jsonschema = pytest.importorskip("jsonschema")
    params = {"add": {"type": "object", "additionalProperties": False, "required": ["a"],
                      "properties": {"a": {"type": "integer"}}},
              "say": {"type": "object", "additionalProperties": False, "required": ["s"],
                      "properties": {"s": {"enum": ["<tool_call>", "</tool_call>"]}}}}
    call = C.tool_call_schema(list(params.items()))
    root = C.tool_call_list_schema(call, several) if listed else call
    spec, tok = json_tokenizer
    extra = [b"<tool_call>", b"<tool", b"_call>", b"call>\n{", b"<tool_call>\n", b"<tool_call>x", b"l>{\"", b"<",
             b">", b"_call", b"<tool_call>{\"name\": \"add\"", b"<tool_call>{\"name\": \"sub\"", b"> hi",
             b"</tool_call>", b"\n</tool_call>", b"</tool_call>\n<tool_call>", b"\n", b" ", b"</", b"}\n", b"}}"]
    extra += [b"<tool_call>\n[", b"[", b"[{", b"}, {", b"}]", b"]\n</tool_call>", b"}}]"] if listed else []
    tokens = C.token_bytes(spec, tok, tok.get_vocab_size()) + extra
    vocab = C.JsonVocabulary(tokens, [1])
    tag, close = b"<tool_call>", b"</tool_call>"
    extra_ids = np.arange(len(tokens) - len(extra), len(tokens))
    rng = np.random.default_rng(7)

    calls_written = C.ToolCalls(tag, close, root, several and not listed)

    def naive_text(text: bytes) -> np.ndarray:
        rests = [None if t is None or (text + t).find(tag) < 0 else (text + t)[(text + t).find(tag) + len(tag):]
                 for t in tokens]
        return np.array([r is None or calls_after(calls_written, (C.CALL, C.initial_state(root)), r) is not None
                         for r in rests])

    texts = walk_tool_calls(vocab, extra_ids, calls_written, required, rng, naive_text)
    counts = []
    for text in texts:
        text = text.decode("utf-8", "replace")  # the text before a tag is free: random bytes, whole characters not
        content, calls = split_calls(text, tag.decode(), close.decode(), listed)
        for call in calls:
            assert list(call) == ["name", "arguments"], text
            jsonschema.validate(call["arguments"], params[call["name"]])
        split, cuts = C.ToolCallText(tag.decode(), close.decode(), listed), sorted(rng.integers(0, len(text) + 1, 3))
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            split.feed(text[a:b])
        assert split.content == content and [json.loads(c) for c in split.calls] == calls, text
        assert split.complete == len(calls)
        assert not required or (content.strip() == "" and calls), text
        counts.append(len(calls))
    assert counts.count(0) >= (0 if required else 5) and counts.count(1) >= 5, counts
    assert max(counts) >= 2 if several else max(counts) == 1, counts
    if not required:  # a list begins with "[": no call right after the tag
        called = [b'<tool_call>{"name": "add"'] if listed else []
        refused = np.flatnonzero(~vocab.tag_mask(calls_written, 0))
        assert [tokens[i] for i in refused] == [b"<tool_call>x", *called, b'<tool_call>{"name": "sub"']
        refused = np.flatnonzero(~vocab.tag_mask(calls_written, len(tag) - 1))  # after "<tool_call": ">", not "> hi"
        assert [tokens[i] for i in refused] == [b"<tool_call>x", *called, b'<tool_call>{"name": "sub"', b"> hi"]


@pytest.mark.parametrize("required", [False, True])
def test_tagless_calls_are_chosen_by_the_first_byte_past_the_space(json_tokenizer, required):
    """ToolCallConstraint with no tag (Llama 3.1's bare JSON, under "parameters"): where the model chooses, a reply
    whose first byte past its space is "{" is one call and any other is free text (a "{" later in it included);
    before that byte, any token but one that opens with "{" and goes on as no call does; after the call, space and
    the end. Random walks check every mask against the naive one, and ToolCallText takes each reply apart as json's
    raw_decode does."""
    jsonschema = pytest.importorskip("jsonschema")
    params = {"add": {"type": "object", "additionalProperties": False, "required": ["a"],
                      "properties": {"a": {"type": "integer"}}}}
    root = C.tool_call_schema(list(params.items()), "parameters")
    spec, tok = json_tokenizer
    extra = [b"{", b" {", b"\n{\"", b'{"name": "add"', b'{"name": "sub"', b"{}", b'{"name": "add", "arguments"',
             b"  ", b"\n", b"x{", b"} ", b"}}"]
    tokens = C.token_bytes(spec, tok, tok.get_vocab_size()) + extra
    vocab = C.JsonVocabulary(tokens, [1])
    extra_ids = np.arange(len(tokens) - len(extra), len(tokens))
    rng = np.random.default_rng(11)
    calls_written = C.ToolCalls(b"", b"", root, several=False)

    def opens_a_call(reply: bytes) -> bool:
        return reply.lstrip(C.SPACES)[:1] == b"{"

    def naive_text(text: bytes) -> np.ndarray:
        if text.strip(C.SPACES):  # text begun: free
            return np.ones(len(tokens), bool)
        spaced = [None if t is None else text + t for t in tokens]
        return np.array([r is None or not opens_a_call(r) or (
            len(r) - len(r.lstrip(C.SPACES)) <= C.MAX_INDENT and
            calls_after(calls_written, (C.CALL, C.initial_state(root)), r.lstrip(C.SPACES)) is not None)
            for r in spaced])

    texts = walk_tool_calls(vocab, extra_ids, calls_written, required, rng, naive_text, first=0.7)
    calls_seen = texts_seen = braced_text = 0
    for text in texts:
        text = text.decode("utf-8", "replace")
        split, cuts = C.ToolCallText("", ""), sorted(rng.integers(0, len(text) + 1, 3))
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            split.feed(text[a:b])
        if text.lstrip()[:1] == "{":
            call, end = json.JSONDecoder().raw_decode(text.lstrip())
            assert text.lstrip()[end:].strip() == "" and list(call) == ["name", "parameters"], text
            jsonschema.validate(call["parameters"], params[call["name"]])
            assert split.content.strip() == "" and [json.loads(c) for c in split.calls] == [call], text
            assert split.complete == 1
            calls_seen += 1
        else:
            assert not required and split.content == text and split.calls == [] and split.content_end is None, text
            texts_seen += 1
            braced_text += "{" in text
    assert calls_seen >= 5 and (required or texts_seen >= 5 and braced_text >= 1), (calls_seen, texts_seen)
    if not required:
        refused = np.flatnonzero(~vocab.lead_mask(calls_written, (C.OPENING, 0, 0)))
        assert {tokens[i] for i in refused} >= {b'{"name": "sub"', b"{}", b'{"name": "add", "arguments"'}
        assert all(tokens[i].lstrip(C.SPACES)[:1] == b"{" for i in refused)
        # a special token (no text: Llama 3.1's <|python_tag|>, which it may write before a call) leaves the choice open
        special = next(i for i, t in enumerate(tokens) if t is None and not vocab.end[i])
        con, split = C.ToolCallConstraint(vocab, calls_written), C.ToolCallText("", "")
        for token in (tokens.index(b"  "), special, tokens.index(b'{"name": "add"')):
            con.push(token)
            split.feed((tokens[token] or b"").decode())
        assert con.calling and split.calls == ['{"name": "add"'] and split.content == "  "


@pytest.mark.parametrize("schema", [SMALL, TREE, BOUNDED, SHAPES])  # no free strings: the random model's text stays short
def test_schema_constrained_generation_through_the_engine_and_run(tiny_packed, schema, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from bitnet_cli.engine import Engine

    kw = dict(max_tokens=300, temperature=1.0, top_k=0, top_p=1.0, output_format="json_schema", json_schema=schema)
    with Engine.load(tiny_packed[1], threads=1) as engine:
        texts, finished = [], 0
        for seed in range(8):
            gen = engine.generate("Data:", seed=seed, **kw)
            texts.append("".join(gen))
            assert C.is_prefix(texts[-1], schema), texts[-1]
            if gen.stats.stop_reason == "eos":
                jsonschema.validate(json.loads(texts[-1]), schema)
                finished += 1
        assert finished >= 2
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    cmd = [sys.executable, "-m", "bitnet_cli.cli", "run", str(tiny_packed[1]), "-p", "Data:", "-n", "300", "--temp", "1",
           "--top-k", "0", "--top-p", "1", "--seed", "0", "--json"]
    for given in (str(path), json.dumps(schema)):  # a file, or inline
        out = json.loads(subprocess.run(cmd + ["--json-schema", given], capture_output=True, text=True,
                                        check=True).stdout)
        assert out["text"] == texts[0]


def test_run_json_schema_errors_are_one_line(tiny_packed, tmp_path):
    base = [sys.executable, "-m", "bitnet_cli.cli", "run", str(tiny_packed[1]), "-p", "x", "--json-schema"]
    deep = '{"type": "object", "properties": {"a": ' * 400 + "{}" + "}}" * 400
    for given, why in [('{"type": "object", "properties": {"a": {"not": {}}}}', "not is not supported"),
                       ("{nope", "not valid JSON"), (str(tmp_path / "missing.json"), "missing.json"),
                       (deep, "nested")]:
        r = subprocess.run(base + [given], capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.startswith("error:") and why in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def random_schema(r: random.Random, depth: int = 0, defs: tuple = ()) -> dict:
    """Schemas as clients write them, now and then with a mistake or an unsupported keyword."""
    k = r.random()
    if depth > 2 or k < 0.3:
        return r.choice([{"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"},
                         {"type": "null"}, {"enum": ["a", 1, None, [2]]}, {"const": "c"}, {},
                         {"type": ["string", "null"]}, {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                         {"type": "string", "minLength": 2}, {"type": "string", "maxLength": 3},
                         {"type": "string", "minLength": 1, "maxLength": 1}, {"type": "strin"}, {"$ref": "#/$defs/D"},
                         {"type": "integer", "minimum": -3, "maximum": 40}, {"type": "number", "exclusiveMinimum": 0.5},
                         {"type": ["number", "null"], "maximum": -2.25}, {"type": "integer", "minimum": 0.5, "maximum": 0.7},
                         {"type": "string", "pattern": "^[a-c]{1,3}$"}, {"type": "string", "pattern": "b"},
                         {"type": "string", "format": "uuid"}, {"type": "string", "pattern": "(?=x)"},
                         {"type": "string", "pattern": "^[a-c]+$", "minLength": 2, "maxLength": 4},
                         {"type": "array", "items": {"enum": ["x", 3, None]}, "uniqueItems": True},
                         {"type": "array", "prefixItems": [{"type": "integer"}, {"$ref": "#/$defs/D"}], "items": False},
                         {"type": "array", "prefixItems": [{"type": "null"}], "minItems": 2, "items": {"type": "boolean"}},
                         {"oneOf": [{"type": "string"}, {"type": "integer"}]}, {"allOf": [{"$ref": "#/$defs/D"}]},
                         {"anyOf": [{"type": "integer", "maximum": 3}, {"type": "number", "minimum": 10}]},
                         {"anyOf": [{"enum": ["ab", 2]}, {"type": "string", "pattern": "^a+$"}, {"type": "null"}]},
                         {"anyOf": [{"$ref": "#/$defs/D"}, {"type": "object", "properties": {"k": {"const": 1}},
                                                            "required": ["k"], "additionalProperties": False}]},
                         {"oneOf": [{"type": "object", "properties": {"t": {"const": "x"}, "v": {"type": "integer"}},
                                     "required": ["t"]},
                                    {"type": "object", "properties": {"t": {"enum": ["y", "z"]}, "v": {"type": "string"}},
                                     "required": ["t", "v"]}]},
                         *([{"$ref": f"#/$defs/{d}"} for d in defs])])
    if k < 0.45:
        sizes = r.choice([{}, {"minItems": 1}, {"maxItems": 2}, {"minItems": 1, "maxItems": 1}, {"maxItems": 0}])
        return {"type": "array", "items": random_schema(r, depth + 1, defs), **sizes}
    props = {r.choice(["a", "b", "é", "q\"", "long name"]) + str(i): random_schema(r, depth + 1, defs)
             for i in range(r.randint(0, 4))}
    schema = {"type": "object", "properties": props,
              "required": r.sample(sorted(props), r.randint(0, len(props)))}
    if r.random() < 0.5:
        schema["additionalProperties"] = r.choice([False, True, {"type": "integer"}])
    return schema


def test_random_schemas_compile_or_fail_cleanly_and_their_walks_end_valid(json_tokenizer):
    """Hostile or mistaken schemas never get past the compiler with anything but a BitnetError, and
    every object generated under one that compiles is valid under it."""
    jsonschema = pytest.importorskip("jsonschema")
    spec, tok = json_tokenizer
    tokens = C.token_bytes(spec, tok, tok.get_vocab_size())
    vocab = C.JsonVocabulary(tokens, [1])
    r, rng = random.Random(7), np.random.default_rng(7)
    compiled = finished = 0
    for _ in range(150):
        defs = {"D": random_schema(r, 1), "E": random_schema(r, 1, ("E",))}
        schema = {"$defs": defs, **random_schema(r, 0, ("D", "E"))}
        schema.setdefault("type", "object")
        try:
            root = C.compile_schema(schema)
        except BitnetError:
            continue
        compiled += 1
        con, text = C.JsonConstraint(vocab, root), b""
        for _ in range(250):
            ids = np.flatnonzero(con.allowed())
            if con.done:
                # an unused $defs entry may be wrong: only what the root reaches is compiled and checked
                jsonschema.Draft202012Validator(schema).validate(json.loads(text.decode("utf-8", "replace")))
                finished += 1
                break
            moving = ids[~vocab.plain[ids]] if con.state[0] == C.STRING else ids
            token = int(rng.choice(moving if moving.size and rng.random() < 0.7 else ids))
            text += tokens[token]
            con.push(token)
    assert compiled > 40 and finished > 20, (compiled, finished)
    infinite = {"$defs": {"N": {"type": "object", "required": ["n"], "properties": {"n": {"$ref": "#/$defs/N"}}}},
                "$ref": "#/$defs/N"}
    with pytest.raises(BitnetError, match="no finite JSON value"):
        C.compile_schema(infinite)


def test_nesting_never_leads_into_a_corner():
    """Near MAX_DEPTH a container opens and a key starts only where the values that must follow still fit: a recursive schema's optional object key is refused at the depth where its value no longer
    fits, while a scalar key still is taken and every state reached has a way out. A schema whose values all nest
    deeper than MAX_DEPTH is refused up front."""
    node = {"type": "object", "additionalProperties": False, "properties": {"n": {"$ref": "#/$defs/N"}, "x": {"type": "integer"},
                                             "l": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/N"}}}}
    root = C.initial_state(C.compile_schema({"$defs": {"N": node}, "$ref": "#/$defs/N"}))
    deepest = C.run(root, b'{"n":' * (C.MAX_DEPTH - 1))
    assert C.run(deepest, b'{"x":1}' + b"}" * (C.MAX_DEPTH - 1))[0] == C.DONE
    assert C.run(deepest, b'{"n') is None and C.run(deepest, b'{"l') is None  # an object, an array of objects
    assert C.run(C.run(root, b'{"n":' * (C.MAX_DEPTH - 3)), b'{"l":[{},{}]') is not None  # [{ at 31 and 32 deep
    assert C.run(C.run(root, b'{"n":' * (C.MAX_DEPTH - 2)), b'{"l') is None  # its [{ would be 32 and 33 deep
    chain = {f"D{i}": {"type": "object", "required": ["d"], "properties": {"d": {"$ref": f"#/$defs/D{i + 1}"}}}
             for i in range(C.MAX_DEPTH + 1)}
    chain[f"D{C.MAX_DEPTH + 1}"] = {"type": "object"}
    with pytest.raises(BitnetError, match="nested more than"):
        C.compile_schema({"$defs": chain, "$ref": "#/$defs/D0"})


def test_a_sentencepiece_vocabulary_s_bytes_and_json_walks():
    """Llama-2-style vocabularies (U+2581 for a space, <0xNN> byte tokens; as GGUF imports rebuild
    them) give the same bytes as the tokenizer's decoding, and JSON walks over them end valid."""
    from bitnet_cli.gguf.tokenizer import BYTE, CONTROL, NORMAL, rebuild
    from bitnet_cli.tokenizer import load

    words = ["▁", "▁the", "▁\"", "\":", "\",", "},", "▁{", "{\"", "\"}", "▁[", "],", "▁true", "▁null", "12", "▁é",
             "▁name", "name", "▁\"\\n"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *words]
    types = [CONTROL] * 3 + [BYTE] * 256 + [NORMAL] * len(words)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": [0.0] * len(tokens), "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    spec, _, _ = rebuild(meta, "spm", len(tokens))
    tok = load(spec, "spm")
    got = C.token_bytes(spec, tok, len(tokens))
    assert got[:3] == [None] * 3 and got[3 + 0x7B] == b"{" and got[tokens.index("▁\"")] == b' "'
    vocab = C.JsonVocabulary(got, [2])
    rng, finished = np.random.default_rng(8), 0
    for _ in range(20):
        con, ids = C.JsonConstraint(vocab), []
        for step in range(300):
            mask = con.allowed()
            if step % 5 == 0:
                assert (mask == naive_mask(vocab, con.state)).all()
            if con.done:
                assert isinstance(json.loads(tok.decode(ids, skip_special_tokens=True)), dict)
                finished += 1
                break
            ids_allowed = np.flatnonzero(mask)
            moving = ids_allowed[~vocab.plain[ids_allowed]] if con.state[0] == C.STRING else ids_allowed
            token = int(rng.choice(moving if moving.size and rng.random() < 0.6 else ids_allowed))
            ids.append(token)
            con.push(token)
    assert finished >= 15
    # a pattern of multi-byte characters, written through byte tokens (<0xC3> then <0xA9> for é): masks while a
    # character is begun, and the pattern's own groups of plain tokens
    schema = {"type": "object", "additionalProperties": False, "required": ["s"],
              "properties": {"s": {"type": "string", "pattern": "^(é|[a-z]| ){1,6}$"}}}
    root, matched = C.compile_schema(schema), 0
    for _ in range(20):
        con, ids = C.JsonConstraint(vocab, root), []
        for step in range(200):
            mask = con.allowed()
            assert (mask == naive_mask(vocab, con.state)).all(), con.state
            if con.done:
                value = json.loads(tok.decode(ids, skip_special_tokens=True))["s"]
                assert re.fullmatch("(é|[a-z]| ){1,6}", value), value
                matched += "é" in value
                break
            token = int(rng.choice(np.flatnonzero(mask)))
            ids.append(token)
            con.push(token)
    assert matched >= 3
