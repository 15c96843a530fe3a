"""Constrained decoding: generated text that must be one JSON object (OpenAI's `response_format`
`{"type": "json_object"}`, ollama's `--format json`), or one that a JSON schema describes
(`{"type": "json_schema", ...}`, llama.cpp's `--json-schema`).

A byte-level JSON recognizer (a pushdown automaton whose states are hashable tuples) decides which
tokens may come next: a token is allowed when its bytes keep the text so far a prefix of some
JSON object the schema accepts, and once the object is closed only an end-of-sequence token is.
Sampling then runs exactly as without the constraint on logits with every other token at -inf
(`sampling.sample(allowed=)`), so greedy decoding picks the likeliest allowed token and a seed
still fixes the text.

Finding the allowed tokens costs one walk of the vocabulary's byte trie (its tokens sorted by
bytes, so a subtree is a range found by bisection), pruned at the first byte the recognizer
refuses. Inside a free string almost every token is allowed, so there the walk is replaced by a
table made once: tokens of plain string bytes are allowed as they stand, and the rest are decided
from their first quote, backslash or control byte on. Masks are cached per recognizer state,
which repeats all through a generation (and across requests with the same schema).

Limits, as llama.cpp's JSON grammar has them, so that a model cannot loop forever on filler:
between tokens of the JSON, one space or a newline and up to MAX_INDENT spaces or tabs; numbers of at
most MAX_NUMBER bytes; nesting at most MAX_DEPTH deep. Strings are unlimited, and a generation cut
by max_tokens ends mid-object. A number with bounds (minimum, maximum, ..., multipleOf) is written without an
exponent, and each of its bytes must leave a number within the bounds reachable (decided exactly, on
grids of decimals: _number_reachable).
"""

from __future__ import annotations

import bisect
import copy
import functools
import itertools
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np

from bitnet_cli.errors import BitnetError
from bitnet_cli.pattern import FORMATS, compile_pattern

RESPONSE_FORMATS = ("text", "json_object", "json_schema")  # `output_format` / `response_format.type`

MAX_INDENT = 20  # spaces or tabs after a newline between tokens of the JSON
MAX_NUMBER = 32
MAX_DEPTH = 32
MASK_CACHE = 256  # masks kept per vocabulary (one bool per token each)
MAX_SCHEMA_NODES = 1000  # subschemas and enum values together
MAX_SCHEMA_TEXT = 65536  # bytes of enum values and property names together (each is matched byte by byte)
MAX_SCHEMA_STATES = 16384  # automaton states of its patterns together (each costs compiling and a vocabulary pass)
MAX_FORK = 128  # states of anyOf alternatives open at once (undecided alternatives nested in each other multiply);
# one anyOf may have as many alternatives (OpenAI's limit on tools is 128 too)
MAX_UNIQUE_INTEGERS = 256  # integers an array of uniqueItems may choose from (each an enum text: _unique_items)

# ---------------------------------------------------------------------- schemas

TYPES = frozenset(("object", "array", "string", "number", "integer", "boolean", "null"))
# keywords that describe without constraining: accepted and left out
ANNOTATIONS = frozenset(("title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly"))
# a number's, in JSON Schema 2020-12's sense (multipleOf: the number divided by it is a whole number)
BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "multipleOf")
# the keywords enforced (allOf of one schema, $ref to this schema's #/$defs), in the order an error lists them
ENFORCED = ("type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
            "uniqueItems", "minLength", "maxLength", "pattern", "format", *BOUNDS, "enum", "const", "anyOf", "oneOf",
            "allOf", "$ref")
KEYWORDS = frozenset((*ENFORCED, "$defs", "definitions", "discriminator")) | ANNOTATIONS  # discriminator: with oneOf


_SERIALS = itertools.count()


class Schema:
    """One node of a compiled JSON schema: what a value may be. Nodes are compared by identity:
    recognizer states hold them, and masks are cached per state.

    types: the JSON types allowed ("integer" alone: a number without fraction or exponent);
    properties: None for free keys (any string), else the known keys as their JSON string
    content (bytes, escaped as json.dumps escapes them) and each value's schema; required: keys
    that must appear before "}"; additional: the schema of values under other keys (None: no
    other keys); items: an array element's schema (after those of prefix_items, one per position; None: no more
    than those); min_items, max_items: an array's length (None: no most); min_length, max_length: a string's, in
    characters; pattern: a string's (a compiled pattern.Pattern, from `pattern` or `format`, the length counted in
    it; None: any string); bounds: a number's (Bounds; None: any number); enum: the only texts allowed (compact
    JSON); depths: the least nesting of an object and of an array it accepts (set by _set_depths); unique: for an
    array of uniqueItems, the nodes of that array once some of its values are used, by the set of them (its own
    ``used``; _unique_after), shared by those nodes; None where items may repeat; alternatives: for an anyOf whose
    alternatives the first byte of a value cannot tell apart, their nodes (the value may be any of them: the
    recognizer follows each, a Fork of states, until the bytes rule all but one out); None elsewhere; ordered: the
    keys come in the order of properties (a tool call's name before its arguments: tool_call_schema); serial: the
    order of its making, which orders states where a Fork keeps only some (_fork)."""

    __slots__ = ("types", "properties", "required", "additional", "items", "prefix_items", "min_items", "max_items",
                 "min_length", "max_length", "pattern", "bounds", "enum", "depths", "unique", "used", "alternatives",
                 "ordered", "serial")

    def __init__(self, types=TYPES, properties=None, required=frozenset(), additional=None, items=None, enum=None):
        self.types, self.properties, self.required = types, properties, required
        self.additional, self.items, self.enum = additional, items, enum
        self.min_items, self.max_items = 0, None
        self.prefix_items = ()
        self.min_length, self.max_length = 0, None
        self.pattern = self.bounds = None
        self.depths = (1, 1)  # an object or array is one level deep at least (_set_depths: how deep at least)
        self.unique, self.used = None, frozenset()
        self.alternatives = None
        self.ordered = False
        self.serial = next(_SERIALS)


class Bounds(tuple):
    """A number's bounds ``(low, low excluded, high, high excluded, step)``, exact (Fraction; None: no bound), the
    number a whole multiple of ``step`` (Fraction > 0; None: any number)."""

    def admits(self, value: Fraction) -> bool:
        low, low_out, high, high_out, step = self
        return ((low is None or value > low or (value == low and not low_out)) and
                (high is None or value < high or (value == high and not high_out)) and
                (step is None or (value / step).denominator == 1))

    def mirrored(self) -> Bounds:
        """The bounds of -v for v within these (a negative number's magnitude)."""
        low, low_out, high, high_out, step = self
        return Bounds((None if high is None else -high, high_out, None if low is None else -low, low_out, step))


def _exact(value: int | float) -> Fraction:
    """A JSON number as the decimal it was written as (a float by its shortest repr, not its binary value)."""
    return Fraction(repr(value)) if isinstance(value, float) else Fraction(value)


def _bounds(spec: dict, where: str) -> Bounds | None:
    """minimum / exclusiveMinimum / maximum / exclusiveMaximum (the tighter of each pair) and multipleOf as one Bounds,
    None without them. Each is a number (draft 4's boolean exclusiveMinimum is refused); the decimal a client wrote is
    the bound."""
    given = {k: spec[k] for k in BOUNDS if k in spec}
    if not given:
        return None
    for k, v in given.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _schema_error(where, f"{k} must be a number")
    exact = {k: _exact(v) for k, v in given.items()}
    low = high = None
    low_out = high_out = False
    for k, out in (("minimum", False), ("exclusiveMinimum", True)):
        if k in exact and (low is None or exact[k] > low or (exact[k] == low and out)):
            low, low_out = exact[k], out
    for k, out in (("maximum", False), ("exclusiveMaximum", True)):
        if k in exact and (high is None or exact[k] < high or (exact[k] == high and out)):
            high, high_out = exact[k], out
    step = exact.get("multipleOf")
    if step is not None and step <= 0:
        raise _schema_error(where, "multipleOf must be more than 0")
    return Bounds((low, low_out, high, high_out, step))


def _unique_items(node: Schema, where: str) -> None:
    """Make node an array of unique items: supported where they are finitely many texts, an enum or const (pydantic's
    set of a Literal or an Enum), booleans or integers between bounds (at most MAX_UNIQUE_INTEGERS), so that the
    array's state can carry the values used (_unique_after) and its length stop at the number of values (values equal
    as JSON but written apart, 1 and 1.0, count as two)."""
    items = node.items
    if node.prefix_items:
        raise _schema_error(where, "uniqueItems with prefixItems is not supported")
    if items is not None and items.enum is None and items.types <= {"boolean", "null"}:
        items = Schema(enum=tuple(_compact(v) for v in (True, False, None) if _type_of(v) in items.types))
    elif items is not None and items.enum is None and items.types == {"integer"} and items.bounds is not None:
        low, high = items.bounds[0], items.bounds[2]
        if low is not None and high is not None and math.floor(high) - math.ceil(low) < 16 * MAX_UNIQUE_INTEGERS:
            values = [n for n in range(math.ceil(low), math.floor(high) + 1) if items.bounds.admits(Fraction(n))]
            if len(values) <= MAX_UNIQUE_INTEGERS:
                items = Schema(enum=tuple(str(n).encode() for n in values))
    if items is None or items.enum is None:
        raise _schema_error(where, "uniqueItems is supported where the items are an enum, a const, booleans or "
                                   f"integers between a minimum and a maximum (at most {MAX_UNIQUE_INTEGERS})")
    if node.min_items > len(items.enum):
        raise _schema_error(where, f"minItems is more than the {len(items.enum)} distinct items uniqueItems allows")
    node.items, node.unique = items, {}
    node.max_items = len(items.enum) if node.max_items is None else min(node.max_items, len(items.enum))


def _pattern(spec: dict, where: str, least: int = 0, most: int | None = None):
    """`pattern` or `format` (one of pattern.FORMATS) as a compiled pattern.Pattern that also holds a string to
    ``least`` to ``most`` characters (minLength, maxLength); None without them (see _Compiler.pattern for the limit
    on them all)."""
    if "pattern" in spec and "format" in spec:
        raise _schema_error(where, "pattern and format together are not supported")
    if "format" in spec:
        if not isinstance(spec["format"], str) or spec["format"] not in FORMATS:  # a list is not hashable
            raise _schema_error(where, f"format {str(spec['format'])[:40]!r} is not supported (supported: "
                                f"{', '.join(FORMATS)})")
        source = FORMATS[spec["format"]]
    elif "pattern" in spec:
        source = spec["pattern"]
        if not isinstance(source, str):
            raise _schema_error(where, "pattern must be a string")
    else:
        return None
    try:
        return compile_pattern(source, least, most)
    except BitnetError as e:
        raise _schema_error(where, str(e)) from None


ANY = Schema()
ANY.additional = ANY.items = ANY
JSON_OBJECT = Schema(types=frozenset(("object",)), additional=ANY)  # response_format json_object


def _schema_error(where: str, why: str) -> BitnetError:
    return BitnetError(f"json_schema{where}: {why}", param="response_format")


def _type_of(value) -> str:
    """A JSON value's type name in JSON Schema's words (a whole number is an integer)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def _count(value) -> bool:
    return type(value) is int and value >= 0


def _compact(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


class _Compiler:
    """A JSON schema (dict) to Schema nodes; refuses any keyword it would not enforce."""

    def __init__(self, root: dict):
        self.root = root
        self.refs: dict[str, Schema] = {}
        self.nodes = 0
        self.text = 0  # bytes of enum values and property names so far
        self.states = 0  # automaton states of the patterns so far

    def literal(self, text: bytes) -> bytes:
        self.text += len(text)
        if self.text > MAX_SCHEMA_TEXT:
            raise _schema_error("", f"more than {MAX_SCHEMA_TEXT} bytes of enum values and property names")
        return text

    def pattern(self, spec: dict, where: str, least: int = 0, most: int | None = None):
        """_pattern, counted against MAX_SCHEMA_STATES."""
        pattern = _pattern(spec, where, least, most)
        if pattern is not None:
            self.states += len(pattern.moves)
            if self.states > MAX_SCHEMA_STATES:
                raise _schema_error("", f"patterns of more than {MAX_SCHEMA_STATES} automaton states together")
        return pattern

    def node(self, spec, where: str) -> Schema:
        self.nodes += 1
        if self.nodes > MAX_SCHEMA_NODES:
            raise _schema_error("", f"more than {MAX_SCHEMA_NODES} subschemas")
        if where.count(".") > 2 * MAX_DEPTH:  # deeper than any text the recognizer reads (and than the stack)
            raise _schema_error(where[:60] + "...", f"nested more than {MAX_DEPTH} deep")
        if spec is True or spec == {}:
            return ANY
        if not isinstance(spec, dict):
            raise _schema_error(where, f"a schema must be an object, got {json.dumps(spec)[:40]}")
        unknown = sorted(set(spec) - KEYWORDS)
        if unknown:
            raise _schema_error(where, f"{', '.join(unknown)} is not supported (supported: {', '.join(ENFORCED)})")
        if "$ref" in spec:
            beside = set(spec) - ANNOTATIONS - {"$ref", "$defs", "definitions"}
            if beside:  # they would apply too (draft 2020-12): refused rather than dropped
                raise _schema_error(where, f"$ref with {', '.join(sorted(beside))} beside it is not supported")
            return self.ref(spec["$ref"], where)
        if "allOf" in spec:  # pydantic v1's way to give a $ref a description: one schema, annotations beside it
            parts = spec["allOf"]
            beside = set(spec) - ANNOTATIONS - {"allOf", "$defs", "definitions"}
            if not isinstance(parts, list) or len(parts) != 1 or beside:
                raise _schema_error(where, "allOf is supported only with one schema and nothing but annotations "
                                    "beside it")
            return self.node(parts[0], f"{where}.allOf")
        if "anyOf" in spec and "oneOf" in spec:
            raise _schema_error(where, "anyOf and oneOf together are not supported")
        if "anyOf" in spec or "oneOf" in spec:
            return self.any_of(spec, where)
        if "discriminator" in spec:
            raise _schema_error(where, "discriminator goes with oneOf or anyOf")
        if "const" in spec or "enum" in spec:
            values = [spec["const"]] if "const" in spec else spec["enum"]
            if not isinstance(values, list) or not values:
                raise _schema_error(where, "enum must be a non-empty list")
            self.nodes += len(values)  # each value is checked at every byte: they count against the limit
            if self.nodes > MAX_SCHEMA_NODES:
                raise _schema_error("", f"more than {MAX_SCHEMA_NODES} subschemas and enum values")
            types = self.types(spec, where)
            types |= {"integer"} if "number" in types else set()  # an integer is a number too
            if "type" in spec and not all(_type_of(v) in types for v in values):
                raise _schema_error(where, "an enum value is not of the schema's type")
            bounds = _bounds(spec, where)
            if bounds is not None and not all(bounds.admits(_exact(v)) for v in values
                                              if _type_of(v) in ("integer", "number")):
                raise _schema_error(where, "an enum value is outside minimum/maximum/multipleOf")
            pattern = self.pattern(spec, where)
            if pattern is not None and not all(pattern.matches(v) for v in values if isinstance(v, str)):
                raise _schema_error(where, "an enum value does not match the pattern or format")
            try:
                return Schema(enum=tuple(dict.fromkeys(self.literal(_compact(v)) for v in values)))
            except ValueError as e:
                raise _schema_error(where, f"enum: {e}") from None
        types = self.types(spec, where)
        node = Schema(types=types)
        props = spec.get("properties")
        if props is not None:
            if not isinstance(props, dict):
                raise _schema_error(where, "properties must be an object")
            node.properties = {self.literal(json.dumps(k, ensure_ascii=False)[1:-1].encode("utf-8")):
                               self.node(v, f"{where}.properties.{k}") for k, v in props.items()}
        extra = spec.get("additionalProperties", True)
        node.additional = None if extra is False else self.node(extra, f"{where}.additionalProperties")
        required = spec.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _schema_error(where, "required must be a list of names")
        node.required = frozenset(json.dumps(r, ensure_ascii=False)[1:-1].encode("utf-8") for r in required)
        if node.additional is None and not node.required <= set(node.properties or ()):
            raise _schema_error(where, "a required name is neither in properties nor allowed by additionalProperties")
        prefix = spec.get("prefixItems", [])
        if not isinstance(prefix, list):
            raise _schema_error(where, "prefixItems must be a list of schemas")
        node.prefix_items = tuple(self.node(p, f"{where}.prefixItems") for p in prefix)
        items = spec.get("items", True)
        node.items = None if items is False else self.node(items, f"{where}.items")
        node.min_items, node.max_items = spec.get("minItems", 0), spec.get("maxItems")
        if not (_count(node.min_items) and (node.max_items is None or _count(node.max_items))) or \
                node.min_items > (node.max_items if node.max_items is not None else node.min_items):
            raise _schema_error(where, "minItems and maxItems must be whole numbers >= 0, minItems <= maxItems")
        if node.items is None:  # items: false: the prefix items and no more
            node.max_items = min(len(node.prefix_items), len(node.prefix_items) if node.max_items is None
                                 else node.max_items)
            if node.min_items > node.max_items:
                raise _schema_error(where, "minItems is more than prefixItems allows with items: false")
        unique = spec.get("uniqueItems", False)
        if not isinstance(unique, bool):
            raise _schema_error(where, "uniqueItems must be true or false")
        if unique and "array" in node.types:
            _unique_items(node, where)
        node.min_length, node.max_length = spec.get("minLength", 0), spec.get("maxLength")
        if not (_count(node.min_length) and (node.max_length is None or _count(node.max_length))) or \
                node.min_length > (node.max_length if node.max_length is not None else node.min_length):
            raise _schema_error(where, "minLength and maxLength must be whole numbers >= 0, minLength <= maxLength")
        node.pattern = self.pattern(spec, where, node.min_length, node.max_length)  # the length goes into it
        node.bounds = _bounds(spec, where)
        numeric = node.types & {"number", "integer"}
        if numeric and node.bounds is not None and not _number_possible(node.bounds, "number" not in numeric):
            node.types -= numeric  # as JSON Schema has it: no number is valid here, other types still are
            if not node.types:
                raise _schema_error(where, f"no {'number' if 'number' in numeric else 'integer'} of at most "
                                    f"{MAX_NUMBER} bytes lies within minimum/maximum")
        return node

    @staticmethod
    def types(spec: dict, where: str) -> frozenset:
        """`type` (one name or a list of them) as a set; an object when only `properties` say so."""
        types = spec.get("type", "object" if "properties" in spec else None)
        if types is None:
            return TYPES
        names = [types] if isinstance(types, str) else types
        if not isinstance(names, list) or not names or not all(isinstance(t, str) and t in TYPES for t in names):
            raise _schema_error(where, f"type must be one or more of {', '.join(sorted(TYPES))}")
        names = frozenset(names)
        return names - {"integer"} if "number" in names else names  # every integer is a number

    def ref(self, ref, where: str) -> Schema:
        m = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        if not m or not isinstance(self.root.get(m[1]), dict) or m[2] not in self.root[m[1]]:
            raise _schema_error(where, f"$ref {ref!r}: only #/$defs/NAME (or #/definitions/NAME) of this schema")
        if ref not in self.refs:  # a placeholder first: a schema may refer to itself
            self.refs[ref] = placeholder = Schema()
            target = self.node(self.root[m[1]][m[2]], f"{where}.$ref")
            for slot in set(Schema.__slots__) - {"serial"}:
                setattr(placeholder, slot, getattr(target, slot))
        return self.refs[ref]

    def any_of(self, spec, where: str) -> Schema:
        """anyOf, or oneOf where its alternatives exclude each other (_exclusive: by type, or by a discriminator as in
        pydantic's discriminated unions). Alternatives of different types without enums (pydantic's Optional[X])
        merge into one node, since the first byte of a value tells which alternative it is; the others stay apart
        (Schema.alternatives: pydantic's Union[Cat, Dog]), each followed until the bytes rule it out."""
        word = "anyOf" if "anyOf" in spec else "oneOf"
        given = spec[word]
        parts = [self.node(p, f"{where}.{word}") for p in given] if isinstance(given, list) else []
        beside = set(spec) - ANNOTATIONS - {word, "discriminator", "$defs", "definitions"}
        if not parts or beside:
            raise _schema_error(where, f"{word} is supported only as a non-empty list of schemas with nothing but "
                                "annotations beside it")
        if len(parts) > MAX_FORK:
            raise _schema_error(where, f"{word} of more than {MAX_FORK} alternatives")
        kinds = [_kinds(p) for p in parts]
        if all(p.enum is None and p.alternatives is None for p in parts) and \
                sum(map(len, kinds)) == len(frozenset().union(*kinds)):
            return self.merged(parts)
        if word == "oneOf" and not all(_exclusive(a, b) for i, a in enumerate(parts) for b in parts[i + 1:]):
            raise _schema_error(where, "oneOf is supported where its alternatives exclude each other: by type, or "
                                "by a property each requires with values of its own (a discriminator); use anyOf")
        union = Schema(types=frozenset().union(*(p.types for p in parts)))
        union.alternatives = tuple(parts)
        return union

    @staticmethod
    def merged(parts: list[Schema]) -> Schema:
        """Alternatives of different types as one node."""
        merged = Schema(types=frozenset())
        for p in parts:
            merged.types |= p.types
            if "object" in p.types:
                merged.properties, merged.required, merged.additional = p.properties, p.required, p.additional
            if "array" in p.types:
                merged.items, merged.min_items, merged.max_items = p.items, p.min_items, p.max_items
                merged.prefix_items, merged.unique = p.prefix_items, None if p.unique is None else {}
            if "string" in p.types:
                merged.min_length, merged.max_length, merged.pattern = p.min_length, p.max_length, p.pattern
            if p.types & {"number", "integer"}:
                merged.bounds = p.bounds
        return merged


def _kinds(node: Schema) -> frozenset:
    """The JSON types of node's values, an integer counted as a number (an enum's: of its values)."""
    if node.alternatives is not None:
        return frozenset().union(*map(_kinds, node.alternatives))
    types = node.types if node.enum is None else {_type_of(json.loads(v)) for v in node.enum}
    return frozenset("number" if t == "integer" else t for t in types)


def _exclusive(a: Schema, b: Schema) -> bool:
    """Whether no value is valid against both a and b, as far as types, enums and discriminators show: their types
    differ, their enums share no value, or both are objects that require a property whose values are enums without a
    value in common (pydantic's discriminated unions)."""
    if a.alternatives is not None or b.alternatives is not None:
        return all(_exclusive(x, y) for x in a.alternatives or (a,) for y in b.alternatives or (b,))
    if a.enum is not None and b.enum is not None:
        return not set(a.enum) & set(b.enum)
    if not _kinds(a) & _kinds(b):
        return True
    if a.enum is None and b.enum is None and a.properties and b.properties:
        for key in a.required & b.required:
            x, y = a.properties.get(key), b.properties.get(key)
            if x is not None and y is not None and x.enum is not None and y.enum is not None and \
                    not set(x.enum) & set(y.enum):
                return True
    return False


@functools.lru_cache(maxsize=64)
def _compiled(text: str) -> Schema:
    spec = json.loads(text)
    root = _Compiler(spec).node(spec, "")
    if not _objects_only(root):
        raise _schema_error("", 'the root must be {"type": "object", ...} (as OpenAI requires), or alternatives of '
                                'objects')
    _refuse_union_cycles(root)
    _set_depths(root)
    depth = _least_depth(root)
    if depth == UNBOUNDED:
        raise _schema_error("", "no finite JSON value satisfies it (a required property that requires itself)")
    if depth > MAX_DEPTH:
        raise _schema_error("", f"every value it accepts is nested more than {MAX_DEPTH} deep")
    return root


def _objects_only(node: Schema) -> bool:
    """Whether every value node accepts is an object (its alternatives' too)."""
    if node.alternatives is not None:
        return all(map(_objects_only, node.alternatives))
    return node.enum is None and node.types == frozenset(("object",))


def _refuse_union_cycles(root: Schema) -> None:
    """An anyOf that is its own alternative (through $refs) would send the recognizer round in a circle at a value's
    first byte: refused."""
    for node in _reachable(root):
        seen, todo = set(), list(node.alternatives or ())
        while todo:
            alt = todo.pop()
            if alt is node:
                raise _schema_error("", "an anyOf or oneOf is one of its own alternatives")
            if id(alt) not in seen:
                seen.add(id(alt))
                todo.extend(alt.alternatives or ())


def _reachable(root: Schema) -> list[Schema]:
    seen, todo = {id(root): root}, [root]
    while todo:
        node = todo.pop()
        for child in [*(node.properties or {}).values(), node.additional, node.items, *node.prefix_items,
                      *(node.alternatives or ())]:
            if child is not None and id(child) not in seen:
                seen[id(child)] = child
                todo.append(child)
    return list(seen.values())


UNBOUNDED = float("inf")  # the depth of a node no finite value satisfies


def _least_depth(node: Schema) -> float:
    """The least nesting of a value node accepts: 0 for a scalar or an enum (its text is matched
    whole, not nested), else that of its shallowest container."""
    if node.alternatives is not None:
        return min(map(_least_depth, node.alternatives))
    if node.enum is not None or node.types - {"object", "array"}:
        return 0
    return min(node.depths)


def _set_depths(root: Schema) -> None:
    """Each reachable node's depths: the least nesting of an object it accepts (1 + the deepest of
    its required properties) and of an array (1, or 1 + its items' when minItems > 0); UNBOUNDED
    where no finite one exists (a least fixpoint from UNBOUNDED down). The recognizer opens a
    container, and takes a key, only where what must follow fits within MAX_DEPTH, so that no
    generation nests into a corner no token leads out of (an array's later items fit where its
    first did)."""
    nodes = _reachable(root)
    for node in nodes:
        node.depths = (UNBOUNDED, UNBOUNDED)
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if node.alternatives is not None:  # no container of its own (_least_depth: its alternatives')
                continue
            obj = arr = UNBOUNDED
            if "object" in node.types:
                obj = 1 + max((_least_depth((node.properties or {}).get(k, node.additional)) for k in node.required),
                              default=0)
            if "array" in node.types:
                needed = range(min(node.min_items, len(node.prefix_items) + 1))  # items past the prefix: one schema
                arr = 1 + max((_least_depth(_item(node, i)) for i in needed), default=0)
            if (obj, arr) != node.depths:
                node.depths = (obj, arr)
                changed = True


def _item(array: Schema, index: int) -> Schema | None:
    """The schema of an array's item at index (None: no item there)."""
    return array.prefix_items[index] if index < len(array.prefix_items) else array.items


def _fits(stack: tuple, node: Schema | None) -> bool:
    """Whether a value of node can still be written inside the containers stack."""
    return node is not None and len(stack) + _least_depth(node) <= MAX_DEPTH


def compile_schema(spec) -> Schema:
    """A JSON schema (a dict) as the root Schema node; the same schema twice gives the same nodes,
    so its cached masks are shared between requests."""
    try:
        text = json.dumps(spec, sort_keys=True, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")  # its names and values become UTF-8 bytes to match
    except UnicodeEncodeError as e:  # a lone surrogate, which JSON's \u escapes can write and UTF-8 cannot
        raise _schema_error("", f"a string holds a lone surrogate (U+{ord(e.object[e.start]):04X}), which UTF-8 "
                                "cannot encode") from None
    except (TypeError, ValueError) as e:
        raise _schema_error("", f"not JSON: {e}") from None
    except RecursionError:
        raise _schema_error("", f"nested more than {MAX_DEPTH} deep") from None
    return _compiled(text)


# ---------------------------------------------------------------------- the recognizer
#
# A state is (mode, stack, node, extra). stack is a tuple of open containers, ("{", node, keys
# used) or ("[", node, items so far); node is the schema in force (the value expected, the object whose key is
# read, or None where it no longer matters); extra depends on the mode: the whitespace so far for
# the structural modes, is-a-key in a free string, (is-a-key, hex digits left) after \u, (phase,
# length, integer only) in a number, the bytes left of a literal, the bytes read of a known key
# or an enum text.

START, VALUE, VALUE_OR_CLOSE, KEY, KEY_OR_CLOSE, COLON, AFTER = range(7)  # whitespace may come
STRING, ESCAPE, HEX, NUMBER, LITERAL, KEYNAME, ENUM, DONE, UTF8 = range(7, 16)
# a string with minLength/maxLength counts its characters (extra): at a character's start, inside
# one ((count, continuation bytes left, range of the next)), after a backslash (no \u escapes
# there: a surrogate pair is two escapes for one character)
SIZED, SIZED_UTF8, SIZED_ESCAPE = range(16, 19)
# a number with bounds (node.bounds) keeps its text (extra: (phase, text)); it is written without an exponent
BOUNDED = 19
# a string with a pattern (node.pattern): extra is (the pattern's automaton state, the bytes of a character begun);
# written without escapes
PATTERN = 20

WHITESPACE = frozenset(b" \t\n\r")
SPACES = bytes(sorted(WHITESPACE))  # the same, for bytes.lstrip
SPACE, TAB, NEWLINE = ord(" "), ord("\t"), ord("\n")
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
DIGITS = frozenset(b"0123456789")
# number phases; the complete ones may end the number
MINUS, ZERO, INT, DOT, FRAC, EXP, EXP_SIGN, EXP_DIGITS = range(8)
NUMBER_COMPLETE = frozenset((ZERO, INT, FRAC, EXP_DIGITS))
LITERALS = {ord("t"): (b"rue", "boolean"), ord("f"): (b"alse", "boolean"), ord("n"): (b"ull", "null")}
QUOTE, BACKSLASH = ord('"'), ord("\\")
# JSON text is UTF-8 (RFC 8259), checked as RFC 3629 does: a lead byte -> (continuation bytes, range
# of the first one). A decoder may turn a broken sequence and the ASCII bytes around it into
# U+FFFD (SentencePiece's byte fallback does), which would eat a closing quote.
UTF8_LEADS = {**{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)}, 0xE0: (2, 0xA0, 0xBF),
              **{b: (2, 0x80, 0xBF) for b in (*range(0xE1, 0xED), 0xEE, 0xEF)}, 0xED: (2, 0x80, 0x9F),
              0xF0: (3, 0x90, 0xBF), **{b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)}, 0xF4: (3, 0x80, 0x8F)}


class Fork(frozenset):
    """States at once: where a value may be any of an anyOf's alternatives (Schema.alternatives) and the bytes so far
    have not ruled all but one out, a state for each (each as step takes it). step returns one at a value's first
    byte; run and the masks follow every state in it."""


def _fork(results) -> tuple | Fork | None:
    """The states of results (states, Forks or None) together: None for none, one state alone, else a Fork of at
    most MAX_FORK: a recursive anyOf whose alternatives the text tells apart late would otherwise double them at each
    level. Past that the first MAX_FORK in _order are kept: each state alone goes on to a valid end, so fewer of
    them allow fewer texts but never lead into a corner, and the same ones are kept every time."""
    states = set()
    for r in results:
        if isinstance(r, Fork):
            states |= r
        elif r is not None:
            states.add(r)
    if len(states) > MAX_FORK:
        return Fork(sorted(states, key=_order)[:MAX_FORK])
    if len(states) > 1:
        return Fork(states)
    return states.pop() if states else None


def _order(value) -> tuple:
    """A sort key for states and their parts (Schema nodes by serial, sets sorted), the same from run to run."""
    if isinstance(value, Schema):
        return (1, value.serial)
    if isinstance(value, tuple):
        return (2, tuple(map(_order, value)))
    if isinstance(value, frozenset):
        return (3, tuple(sorted(map(_order, value))))
    return (0,) if value is None else (4, value) if isinstance(value, int) else (5, value)


def _done(state: tuple | Fork) -> bool:
    """Whether the object is complete (in one of the states of a Fork: the bytes read are one whole value)."""
    return any(s[0] == DONE for s in state) if isinstance(state, Fork) else state[0] == DONE


def initial_state(root: Schema = JSON_OBJECT) -> tuple:
    return (START, (), root, 0)


INITIAL = initial_state()


def _number_step(phase: int, b: int, integer: bool) -> int | None:
    digit = b in DIGITS
    if phase == MINUS:
        return ZERO if b == ord("0") else INT if digit else None
    if phase in (INT, FRAC, EXP_DIGITS) and digit:
        return phase
    if integer:
        return None
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


def _grid_meets(start: Fraction, spacing: Fraction, count: int, bounds: Bounds) -> bool:
    """Whether some ``start + j * spacing`` (0 <= j < count) lies within bounds."""
    low, low_out, step = bounds[0], bounds[1], bounds[4]
    j = 0
    if low is not None and start <= low:
        j = -(-(low - start) // spacing)  # the first at or above low
        if low_out and start + j * spacing == low:
            j += 1
    if step is not None:  # then the first of those that is a multiple of step: a congruence in j
        j_step = _multiple_index(start / step, spacing / step)
        if j_step is None:
            return False
        first, period = j_step
        j += (first - j) % period
    return j < count and bounds.admits(start + j * spacing)


def _multiple_index(a: Fraction, s: Fraction) -> tuple[int, int] | None:
    """The j for which ``a + j * s`` is a whole number, as ``(first, period)`` (those j are first + n * period, first
    in [0, period)); None where no j is (s > 0). With A / d and S / d the two over a common denominator: S j = -A
    (mod d), which has solutions where g = gcd(S, d) divides A."""
    d = a.denominator * s.denominator // math.gcd(a.denominator, s.denominator)
    big_a, big_s = a.numerator * (d // a.denominator), s.numerator * (d // s.denominator)
    g = math.gcd(big_s, d)
    if big_a % g:
        return None
    period = d // g
    return (-big_a // g) * pow(big_s // g, -1, period) % period, period


def _magnitude_reachable(bounds: Bounds, integer: bool, digits: bytes, fraction: bytes | None, room: int) -> bool:
    """Whether a number with no sign whose text begins with ``digits`` (its integer part so far: a first digit, or
    empty), then, unless None, "." and ``fraction``, can be completed with at most ``room`` more bytes to a value within
    bounds. The values a completion reaches are grids of decimals: each finer grid holds the coarser ones, so each
    count of integer digits needs one check."""
    if fraction is not None:  # "I.F" + m more fraction digits (m >= 1 after a bare "."): multiples of 10^-(|F| + room)
        if not fraction and not room:
            return False
        base = int(digits) + Fraction(int(fraction or b"0"), 10 ** len(fraction))
        return _grid_meets(base, Fraction(1, 10 ** (len(fraction) + room)), 10 ** room, bounds)
    if not digits:  # the first digit still to come
        return room > 0 and any(_magnitude_reachable(bounds, integer, bytes([d]), None, room - 1) for d in DIGITS)
    if digits == b"0":  # 0, or 0. and up to room - 1 fraction digits
        return bounds.admits(Fraction(0)) or (not integer and room >= 2 and
                                              _magnitude_reachable(bounds, integer, b"0", b"", room - 1))
    for k in range(room + 1):  # k more integer digits: the integers [P 10^k, (P + 1) 10^k), and fractions between
        fraction_digits = 0 if integer else max(room - k - 1, 0)
        if _grid_meets(Fraction(int(digits) * 10 ** k), Fraction(1, 10 ** fraction_digits),
                       10 ** (k + fraction_digits), bounds):
            return True
    return False


@functools.lru_cache(maxsize=4096)
def _number_reachable(bounds: Bounds, integer: bool, text: bytes) -> bool:
    """Whether ``text`` (a number's beginning: a sign, digits, "." and digits, no exponent) goes on to a number within
    bounds of at most MAX_NUMBER bytes."""
    if len(text) > MAX_NUMBER:
        return False
    negative = text.startswith(b"-")
    body = text[1:] if negative else text
    digits, dot, fraction = body.partition(b".")
    return _magnitude_reachable(bounds.mirrored() if negative else bounds, integer, digits, fraction if dot else None,
                                MAX_NUMBER - len(text))


def _number_possible(bounds: Bounds, integer: bool) -> bool:
    """Whether any number (``integer``: without a fraction) lies within bounds."""
    return any(_number_reachable(bounds, integer, bytes([b])) for b in b"-0123456789")


def _value_done(stack: tuple) -> tuple:
    """After a complete value inside the containers `stack` (an array counts it)."""
    if not stack:
        return (DONE, (), None, 0)
    if stack[-1][0] == "[":
        _, node, count = stack[-1]
        stack = stack[:-1] + (("[", node, count + 1),)
    return (AFTER, stack, None, 0)


def _known_keys(node: Schema, used: frozenset):
    """The known keys (and their schemas) of an object of node with keys `used` that may come next where they are not
    in `used`: all of them, or in an ordered object the first one not used (the callers skip used keys)."""
    if not node.ordered:
        return (node.properties or {}).items()
    return [(k, v) for k, v in node.properties.items() if k not in used][:1]


def _keys_left(stack: tuple, node: Schema, used: frozenset) -> bool:
    """Whether another key may still come in an object of schema node with keys `used` (open in stack), its value
    fitting."""
    return _fits(stack, node.additional) or any(k not in used and _fits(stack, v) for k, v in _known_keys(node, used))


def _value_start(stack: tuple, node: Schema, b: int) -> tuple | Fork | None:
    if node.alternatives is not None:
        return _fork(_value_start(stack, alt, b) for alt in node.alternatives)
    if node.enum is not None:
        return _enum_step(stack, node, b"", b)
    types = node.types
    if b == ord("{") and "object" in types:
        fits = len(stack) + node.depths[0] <= MAX_DEPTH
        return (KEY_OR_CLOSE, stack + (("{", node, frozenset()),), node, 0) if fits else None
    if b == ord("[") and "array" in types:
        fits = len(stack) + node.depths[1] <= MAX_DEPTH
        return (VALUE_OR_CLOSE, stack + (("[", node, 0),), _item(node, 0), 0) if fits else None
    if b == QUOTE and "string" in types:
        if node.pattern is not None:
            return (PATTERN, stack, node, (node.pattern.start, b""))
        sized = node.min_length or node.max_length is not None
        return (SIZED, stack, node, 0) if sized else (STRING, stack, None, False)
    if (b == ord("-") or b in DIGITS) and ("number" in types or "integer" in types):
        phase = MINUS if b == ord("-") else ZERO if b == ord("0") else INT
        if node.bounds is not None:
            text = bytes([b])
            return (BOUNDED, stack, node, (phase, text)) if _number_reachable(node.bounds, "number" not in types,
                                                                              text) else None
        return (NUMBER, stack, None, (phase, 1, "number" not in types))
    if b in LITERALS and LITERALS[b][1] in types:
        return (LITERAL, stack, None, LITERALS[b][0])
    return None


def _enum_step(stack: tuple, node: Schema, typed: bytes, b: int) -> tuple | None:
    more = typed + bytes([b])
    longer = [c for c in node.enum if c.startswith(more)]
    if longer:  # complete, and no other text goes on from it: the value ends here
        return _enum_done(stack, more) if longer == [more] else (ENUM, stack, node, more)
    return step(_enum_done(stack, typed), b) if typed in node.enum else None  # b ends a value such as 1 of [1, 12]


def _enum_done(stack: tuple, text: bytes) -> tuple:
    """After the enum value text; an item of an array of unique items leaves the array's node without it."""
    if stack and stack[-1][0] == "[" and stack[-1][1].unique is not None:
        _, array, count = stack[-1]
        stack = stack[:-1] + (("[", _unique_after(array, text), count),)
    return _value_done(stack)


def _unique_after(array: Schema, text: bytes) -> Schema:
    """The node of an array of unique items (array.unique) once text is used too: its items the rest of the values.
    One node per set of values used, shared by all the nodes of that array (so that the masks cached per state are)."""
    used = array.used | {text}
    after = array.unique.get(used)
    if after is None:
        after, items = copy.copy(array), copy.copy(array.items)
        after.serial, items.serial = next(_SERIALS), next(_SERIALS)
        items.enum = tuple(v for v in array.items.enum if v != text)
        after.items, after.used = items, used
        array.unique[used] = after
    return after


def _key_done(stack: tuple, key: bytes) -> tuple | None:
    """After the closing quote of a known-keys object's key."""
    _, obj, used = stack[-1]
    if key in obj.properties:
        if key in used or (obj.ordered and not any(k == key for k, _ in _known_keys(obj, used))) or \
                not _fits(stack, obj.properties[key]):
            return None
        return (COLON, stack[:-1] + (("{", obj, used | {key}),), obj.properties[key], 0)
    return (COLON, stack, obj.additional, 0) if _fits(stack, obj.additional) and _is_utf8(key) else None


def _utf8_prefix(data: bytes) -> bool:
    """Whether data begins some valid UTF-8 text (it may end inside a character), by UTF8_LEADS
    (Python's incremental decoder lets b"\\xed\\xbb" wait for more, though no byte completes it)."""
    i = 0
    while i < len(data):
        if data[i] < 0x80:
            i += 1
            continue
        if data[i] not in UTF8_LEADS:
            return False
        left, low, high = UTF8_LEADS[data[i]]
        i += 1
        while left and i < len(data):
            if not low <= data[i] <= high:
                return False
            left, low, high, i = left - 1, 0x80, 0xBF, i + 1
    return True


def _utf8_span(begun: bytes) -> tuple[int, int]:
    """The code points whose UTF-8 encoding begins with begun (a lead byte and fewer continuation bytes than it
    needs, valid so far): a range, from the lowest and highest bytes that may complete it."""
    left, low, high = UTF8_LEADS[begun[0]]
    rest = left - (len(begun) - 1)
    first = (low, high) if len(begun) == 1 else (0x80, 0xBF)
    lowest = begun + bytes([first[0]]) + b"\x80" * (rest - 1)
    highest = begun + bytes([first[1]]) + b"\xbf" * (rest - 1)
    return ord(lowest.decode("utf-8")), ord(highest.decode("utf-8"))


def step(state: tuple, b: int) -> tuple | Fork | None:
    """The state after byte b, or None when no accepted JSON object's text continues this way (a Fork where a value
    of alternatives begins)."""
    mode, stack, node, extra = state
    if mode == STRING:
        if b == QUOTE:
            return (COLON, stack, stack[-1][1].additional, 0) if extra else _value_done(stack)
        if b == BACKSLASH:
            return (ESCAPE, stack, None, extra)
        if b < 0x80:
            return None if b < 0x20 else state
        lead = UTF8_LEADS.get(b)
        return None if lead is None else (UTF8, stack, None, (extra, *lead))
    if mode == UTF8:
        is_key, left, low, high = extra
        if not low <= b <= high:
            return None
        return (STRING, stack, None, is_key) if left == 1 else (UTF8, stack, None, (is_key, left - 1, 0x80, 0xBF))
    if mode == ESCAPE:
        if b == ord("u"):
            return (HEX, stack, None, (extra, 4))
        return (STRING, stack, None, extra) if b in ESCAPES else None
    if mode == SIZED:
        if b == QUOTE:
            return _value_done(stack) if extra >= node.min_length else None
        if node.max_length is not None and extra >= node.max_length:
            return None  # every byte but the closing quote adds a character
        if b == BACKSLASH:
            return (SIZED_ESCAPE, stack, node, extra)
        if b < 0x80:
            return None if b < 0x20 else (SIZED, stack, node, extra + 1)
        lead = UTF8_LEADS.get(b)
        return None if lead is None else (SIZED_UTF8, stack, node, (extra + 1, *lead))
    if mode == SIZED_UTF8:
        count, left, low, high = extra
        if not low <= b <= high:
            return None
        return (SIZED, stack, node, count) if left == 1 else (SIZED_UTF8, stack, node, (count, left - 1, 0x80, 0xBF))
    if mode == SIZED_ESCAPE:
        return (SIZED, stack, node, extra + 1) if b in ESCAPES else None
    if mode == HEX:
        is_key, left = extra
        if b not in HEX_DIGITS:
            return None
        return (STRING, stack, None, is_key) if left == 1 else (HEX, stack, None, (is_key, left - 1))
    if mode == KEYNAME:
        if b == QUOTE and (len(extra) - len(extra.rstrip(b"\\"))) % 2 == 0:  # not an escaped quote
            return _key_done(stack, extra)
        more = extra + bytes([b])
        used = stack[-1][2]
        if any(k.startswith(more) and k not in used and _fits(stack, v) for k, v in _known_keys(node, used)):
            return (KEYNAME, stack, node, more)
        # another key (plain bytes only) where additionalProperties allows it
        plain = b >= 0x20 and b != BACKSLASH and _utf8_prefix(more)
        return (KEYNAME, stack, node, more) if plain and _fits(stack, node.additional) else None
    if mode == NUMBER:
        phase, length, integer = extra
        after = _number_step(phase, b, integer)
        if after is not None:  # the last byte allowed must leave a number that may end
            fits = length + 1 < MAX_NUMBER or (length + 1 == MAX_NUMBER and after in NUMBER_COMPLETE)
            return (NUMBER, stack, None, (after, length + 1, integer)) if fits else None
        return step(_value_done(stack), b) if phase in NUMBER_COMPLETE else None  # b ends the number
    if mode == BOUNDED:
        phase, text = extra
        integer = "number" not in node.types
        after = None if b in b"eE" else _number_step(phase, b, integer)
        if after is not None:
            more = text + bytes([b])
            return (BOUNDED, stack, node, (after, more)) if _number_reachable(node.bounds, integer, more) else None
        if phase in NUMBER_COMPLETE and node.bounds.admits(Fraction(text.decode())):
            return step(_value_done(stack), b)  # b ends the number
        return None
    if mode == PATTERN:
        states, begun = extra
        if b == QUOTE and not begun:
            return _value_done(stack) if node.pattern.accepts(states) else None
        if b < 0x20 or b == BACKSLASH or (begun and b < 0x80):
            return None
        char = begun + bytes([b])
        if b >= 0x80:
            lead = UTF8_LEADS.get(char[0])
            if lead is None or not _utf8_prefix(char):
                return None
            if len(char) <= lead[0]:  # a character begun: only where one it may be goes on
                return (PATTERN, stack, node, (states, char)) if node.pattern.takes_any(states, *_utf8_span(char)) \
                    else None
        after = node.pattern.step(states, ord(char.decode("utf-8")))
        return (PATTERN, stack, node, (after, b"")) if after else None
    if mode == LITERAL:
        if b != extra[0]:
            return None
        return _value_done(stack) if len(extra) == 1 else (LITERAL, stack, None, extra[1:])
    if mode == ENUM:
        return _enum_step(stack, node, extra, b)
    if mode == DONE:
        return None
    if b in WHITESPACE:  # the structural modes; extra: 0, 1 after a space, 2 + indentation after a newline
        if extra == 0 and b in (SPACE, NEWLINE):
            return (mode, stack, node, 1 if b == SPACE else 2)
        if extra >= 2 and b in (SPACE, TAB) and extra - 2 < MAX_INDENT:
            return (mode, stack, node, extra + 1)
        return None
    if mode in (START, VALUE):
        return _value_start(stack, node, b)
    if mode == VALUE_OR_CLOSE:  # just after "[": ']' where no item is needed, an item where one may come
        array = stack[-1][1]
        if b == ord("]"):
            return _value_done(stack[:-1]) if array.min_items == 0 else None
        return _value_start(stack, node, b) if array.max_items != 0 else None
    if mode in (KEY, KEY_OR_CLOSE):
        if b == QUOTE:
            if not _keys_left(stack, node, stack[-1][2]):
                return None
            return (STRING, stack, None, True) if node.properties is None else (KEYNAME, stack, node, b"")
        return _value_done(stack[:-1]) if mode == KEY_OR_CLOSE and b == ord("}") and not node.required else None
    if mode == COLON:
        return (VALUE, stack, node, 0) if b == ord(":") else None
    # AFTER a value inside a container
    frame = stack[-1]
    if frame[0] == "[":
        _, array, count = frame
        if b == ord(","):
            more = array.max_items is None or count < array.max_items
            return (VALUE, stack, _item(array, count), 0) if more else None
        return _value_done(stack[:-1]) if b == ord("]") and count >= array.min_items else None
    _, obj, used = frame
    if b == ord(","):
        return (KEY, stack, obj, 0) if _keys_left(stack, obj, used) else None
    return _value_done(stack[:-1]) if b == ord("}") and obj.required <= used else None


def _advance(state: tuple | Fork, b: int) -> tuple | Fork | None:
    """step, from a state or a Fork of them."""
    return step(state, b) if type(state) is tuple else _fork(step(s, b) for s in state)


def run(state: tuple | Fork | None, data: bytes) -> tuple | Fork | None:
    """The state after all of data (None once refused)."""
    for b in data:  # _advance written out: a call less per byte, in the masks' hot loop
        if state is None:
            return None
        state = step(state, b) if type(state) is tuple else _fork(step(s, b) for s in state)
    return state


def is_prefix(text: str, schema: dict | None = None) -> bool:
    """Whether text (UTF-8) begins some JSON object the recognizer accepts (of `schema`, if given)."""
    root = JSON_OBJECT if schema is None else compile_schema(schema)
    return run(initial_state(root), text.encode("utf-8")) is not None


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


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


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
    # tokens that are whole UTF-8 text (a lone byte of a longer character decodes to U+FFFD, one
    # per byte or one per broken sequence depending on the decoder): their text must be ours
    ids = [i for i, b in enumerate(out) if b and _is_utf8(b)]
    ours = b"".join(out[i] for i in ids).decode("utf-8")
    theirs = tokenizer.decode(ids, skip_special_tokens=True)
    if ours.lstrip(" ") != theirs.lstrip(" "):  # a SentencePiece decoder strips the first space
        raise BitnetError("JSON output needs each token's bytes, and this model's tokenizer decodes its tokens "
                          "in a way bitnet-cli does not follow (not byte-level BPE nor SentencePiece-style)",
                          param="response_format")
    return out


# ---------------------------------------------------------------------- allowed tokens


def _special(b: int) -> bool:
    """A byte that ends or escapes a string, or may not appear in one."""
    return b in (QUOTE, BACKSLASH) or b < 0x20


def _plain(data: bytes) -> bool:
    """Text that leaves a free string (at a character's start) as it is: whole UTF-8 characters,
    none of them special. Such text also continues a key where other keys are allowed."""
    return not any(_special(b) for b in data) and _is_utf8(data)


def _recall(cache: OrderedDict, key) -> np.ndarray | None:
    """A cached mask (now the most recently used), or None."""
    mask = cache.get(key)
    if mask is not None:
        cache.move_to_end(key)
    return mask


def _remember(cache: OrderedDict, key, mask: np.ndarray) -> np.ndarray:
    """mask, made read-only and cached under key; the least recently used goes past MASK_CACHE masks."""
    mask.flags.writeable = False
    cache[key] = mask
    if len(cache) > MASK_CACHE:
        cache.popitem(last=False)
    return mask


@functools.lru_cache(maxsize=16)
def _pattern_groups(vocab: JsonVocabulary, pattern) -> tuple[list[bytes], list[np.ndarray], list[int]]:
    """The plain tokens of vocab as the pattern sees them: each character replaced by its class (characters that no
    range of the pattern's moves tells apart), tokens with the same classes in one group. Returns the groups' class
    sequences (2 bytes a class, big-endian: sorted as the sequences are), sorted, each group's token ids, and a
    character of each class to step the automaton with."""
    cuts = sorted({edge for moves in pattern.moves for r, _ in moves for low, high in r for edge in (low, high + 1)})
    if len(cuts) >= 0xFFFF:
        raise BitnetError("pattern: too many character classes", param="response_format")
    ids = np.flatnonzero(vocab.plain)
    texts = [vocab.tokens[i].decode("utf-8") for i in ids]
    points = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    classes = np.searchsorted(np.array(cuts, dtype=np.int64), points, side="right").astype(">u2").tobytes()
    ends = np.cumsum([2 * len(t) for t in texts]).tolist()
    by_sequence: dict[bytes, list[int]] = {}
    for i, start, end in zip(ids.tolist(), [0] + ends[:-1], ends):
        by_sequence.setdefault(classes[start:end], []).append(i)
    sequences = sorted(by_sequence)
    # class k holds [cuts[k - 1], cuts[k]) (class 0 from 0): its first character stands for it
    return sequences, [np.array(by_sequence[q], dtype=np.int64) for q in sequences], [0] + cuts


class JsonVocabulary:
    """A vocabulary's tokens as bytes, arranged to find the tokens each recognizer state allows;
    built once per model (Engine.json_constraint) and shared by all of its sequences."""

    def __init__(self, tokens: Sequence[bytes | None], end_ids: Sequence[int]):
        self.tokens = list(tokens)
        self.size = len(self.tokens)
        order = sorted((t, i) for i, t in enumerate(self.tokens) if t)
        self.sorted_bytes = [t for t, _ in order]
        self.sorted_ids = np.array([i for _, i in order], dtype=np.int64)
        # per sorted token, the first position from which the rest is plain (its length: none)
        self.plain_from = np.array([next(d for d in range(len(t) + 1) if _plain(t[d:])) for t in self.sorted_bytes],
                                   dtype=np.int64)
        # a free string at the start of a token: plain tokens leave the state as it is; the others
        # are decided by what follows their plain beginning (tails shared by many tokens)
        self.plain = np.zeros(self.size, dtype=bool)
        self.chars = np.zeros(self.size, dtype=np.int64)  # a plain token's characters (for minLength/maxLength)
        tails: dict[bytes, list[int]] = {}
        sized_tails: dict[tuple[int, bytes], list[int]] = {}  # the same, with the characters before the tail
        for i, t in enumerate(self.tokens):
            if not t:
                continue
            if _plain(t):
                self.plain[i] = True
                self.chars[i] = len(t.decode("utf-8"))
                continue
            cut = next(k for k, b in enumerate(t + b"\0") if _special(b))
            if not _plain(t[:cut]):
                cut = 0
            tails.setdefault(t[cut:], []).append(i)
            sized_tails.setdefault((len(t[:cut].decode("utf-8")), t[cut:]), []).append(i)
        self.tails = {tail: np.array(ids) for tail, ids in tails.items()}
        self.sized_tails = {key: np.array(ids) for key, ids in sized_tails.items()}
        self.end = np.zeros(self.size, dtype=bool)
        self.end[[i for i in end_ids if 0 <= i < self.size]] = True
        self.unplain = np.array([i for i, t in enumerate(self.tokens) if t and not self.plain[i]], dtype=np.int64)
        self._masks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._pattern_masks: OrderedDict[tuple, np.ndarray] = OrderedDict()  # (pattern, states): plain tokens
        # per tag, the tokens holding its last byte (tag_mask); under b"", those opening with "{" past space (lead_mask)
        self._tag_tokens: dict[bytes, list[int]] = {}
        self._tag_masks: OrderedDict[tuple, np.ndarray | None] = OrderedDict()  # tag_mask's and tool_call_mask's

    def allowed(self, state: tuple | Fork) -> np.ndarray:
        """bool [V]: the tokens that may come in `state` (read-only; cached)."""
        mask = self._mask(state)
        if not mask.any():
            raise BitnetError("JSON output: no token of this model's vocabulary continues the JSON here",
                              param="response_format")
        return mask

    def tag_mask(self, calls: ToolCalls, matched: int) -> np.ndarray | None:
        """The tokens that may come after text ending in ``matched`` bytes of the calls' tag (ToolCallConstraint):
        all but those that would complete the tag and go on with bytes that begin no call; None where that is every
        token. Only a token holding the tag's last byte can complete it: those are listed once per tag, and the mask
        is cached per (calls, matched)."""
        def compute() -> np.ndarray | None:
            tag = calls.tag
            if tag not in self._tag_tokens:
                self._tag_tokens[tag] = [i for i, t in enumerate(self.tokens) if t and tag[-1] in t]
            rests = ((i, tag_matched(tag, matched, self.tokens[i])[1]) for i in self._tag_tokens[tag])
            return self._all_but([i for i, rest in rests if rest is not None and
                                  tool_call_run((CALL, initial_state(calls.root)), rest, calls) is None])

        return self._tag_cached(("text", calls, matched), compute)

    def lead_mask(self, calls: ToolCalls, lead: tuple) -> np.ndarray | None:
        """The tokens that may come where a tag-less call may still open the reply, after ``lead``'s space
        (ToolCallConstraint): all but those whose first byte past their space is "{" and that go on as no call does;
        None where that is every token. Those tokens are listed once per vocabulary, the mask cached per (calls,
        lead)."""
        def compute() -> np.ndarray | None:
            if b"" not in self._tag_tokens:
                self._tag_tokens[b""] = [i for i, t in enumerate(self.tokens) if t and t.lstrip(SPACES)[:1] == b"{"]
            return self._all_but([i for i in self._tag_tokens[b""] if tool_call_run(lead, self.tokens[i], calls) is None])

        return self._tag_cached(("lead", calls, lead), compute)

    def tool_call_mask(self, state: tuple, calls: ToolCalls) -> np.ndarray:
        """The tokens that may come in a phase of ToolCallConstraint past the text and outside a call's JSON (before
        the first call where one must come, after a call, in the closing tag, between calls): the vocabulary's trie
        walked through ``tool_call_step`` (_walk with ``calls``), the end tokens where the reply may end; cached per
        state."""
        def compute() -> np.ndarray:
            mask = self.end.copy() if tool_call_ends(state) else np.zeros(self.size, dtype=bool)
            self._walk(state, 0, len(self.sorted_bytes), 0, mask, calls)
            if not mask.any():
                raise BitnetError("tool call: no token of this model's vocabulary continues the call here",
                                  param="tools")
            return mask

        return self._tag_cached(("calls", calls, state), compute)

    def _all_but(self, refused: list[int]) -> np.ndarray | None:
        """A mask of every token but the refused ones; None where none is."""
        if not refused:
            return None
        mask = np.ones(self.size, dtype=bool)
        mask[refused] = False
        return mask

    def _tag_cached(self, key: tuple, compute) -> np.ndarray | None:
        """The tool-call mask under key (read-only; None: every token), computed at the first ask; the least
        recently used goes past MASK_CACHE of them (None is a value here, so not _recall/_remember)."""
        if key in self._tag_masks:
            self._tag_masks.move_to_end(key)
            return self._tag_masks[key]
        mask = compute()
        if mask is not None:
            mask.flags.writeable = False
        self._tag_masks[key] = mask
        if len(self._tag_masks) > MASK_CACHE:
            self._tag_masks.popitem(last=False)
        return mask

    def _mask(self, state: tuple | Fork) -> np.ndarray:
        """allowed's mask, which may be empty. A Fork's is walked as a whole (not its states' masks together), since
        past MAX_FORK the states it keeps depend on all of them."""
        mask = _recall(self._masks, state)
        if mask is not None:
            return mask
        if isinstance(state, Fork):
            mask = self.end.copy() if _done(state) else np.zeros(self.size, dtype=bool)
            self._walk(state, 0, len(self.sorted_bytes), 0, mask)
        elif state[0] == DONE:
            mask = self.end
        elif state[0] == STRING:
            mask = self.plain.copy()
            for tail, ids in self.tails.items():
                if run(state, tail) is not None:
                    mask[ids] = True
        elif state[0] == PATTERN and not state[3][1]:  # at a character's start: plain tokens by the pattern alone
            mask = self._pattern_plain(state[2].pattern, state[3][0]).copy()
            for i in self.unplain:  # the rest (a quote, an escape, a character cut) read whole from the real state
                if run(state, self.tokens[i]) is not None:
                    mask[i] = True
        elif state[0] == SIZED:  # as a free string, with the characters counted against maxLength
            mode, stack, node, count = state
            room = node.max_length - count if node.max_length is not None else self.size
            mask = self.plain & (self.chars <= room)
            for (chars, tail), ids in self.sized_tails.items():
                if chars <= room and run((mode, stack, node, count + chars), tail) is not None:
                    mask[ids] = True
        else:
            mask = np.zeros(self.size, dtype=bool)
            self._walk(state, 0, len(self.sorted_bytes), 0, mask)
        return _remember(self._masks, state, mask)

    def _pattern_plain(self, pattern, states: frozenset) -> np.ndarray:
        """bool [V]: the plain tokens (whole characters, none special) that keep a string of pattern alive from its
        automaton's states, whatever surrounds the string (cached per states). Decided per group of tokens that the
        pattern cannot tell apart (_pattern_groups), each group once, walking their class sequences as a trie."""
        key = (pattern, states)
        mask = _recall(self._pattern_masks, key)
        if mask is not None:
            return mask
        sequences, groups, representatives = _pattern_groups(self, pattern)
        keep: list[int] = []

        def walk(states: frozenset, lo: int, hi: int, depth: int) -> None:  # sequences[lo:hi] share depth classes
            i = lo
            while i < hi and len(sequences[i]) == 2 * depth:  # groups whose tokens end here, alive
                keep.append(i)
                i += 1
            while i < hi:
                k = int.from_bytes(sequences[i][2 * depth:2 * depth + 2], "big")
                j = bisect.bisect_left(sequences, sequences[i][:2 * depth] + (k + 1).to_bytes(2, "big"), i, hi)
                after = pattern.step(states, representatives[k])
                if after:
                    walk(after, i, j, depth + 1)
                i = j

        walk(states, 0, len(sequences), 0)
        mask = np.zeros(self.size, dtype=bool)
        if keep:
            mask[np.concatenate([groups[g] for g in keep])] = True
        return _remember(self._pattern_masks, key, mask)

    def _walk(self, state: tuple | Fork, lo: int, hi: int, depth: int, mask: np.ndarray,
              calls: ToolCalls | None = None) -> None:
        """Set mask for the tokens in sorted_bytes[lo:hi] (which share their first `depth` bytes,
        read into `state`) that the recognizer accepts from here on. With ``calls``, state is a phase of
        tool_call_step's (ToolCallConstraint), read through it until a call's JSON begins."""
        if calls is not None and state[0] == CALL and not _done(state[1]):
            state, calls = state[1], None
        toks, i = self.sorted_bytes, lo
        mode = None if calls is not None or isinstance(state, Fork) else state[0]
        if mode == STRING or (mode == KEYNAME and state[2].additional is not None and _is_utf8(state[3])):
            # at a character's start, plain text is accepted here: a token whose rest is plain is
            # (its rest is plain from `depth` when plain from before and not inside a character),
            # and the others are read to their end (a subtree of thousands, walked byte by byte, was slow)
            if depth == 0:  # the whole vocabulary: vectorised
                whole = self.plain_from[lo:hi] == 0
            else:
                whole = np.array([self.plain_from[k] <= depth and (depth == len(toks[k]) or
                                                                    toks[k][depth] & 0xC0 != 0x80)
                                  for k in range(lo, hi)], dtype=bool)
            mask[self.sorted_ids[lo:hi][whole]] = True
            for k in np.flatnonzero(~whole):
                if run(state, toks[lo + k][depth:]) is not None:
                    mask[self.sorted_ids[lo + k]] = True
            return
        while i < hi and len(toks[i]) == depth:  # tokens that end here
            mask[self.sorted_ids[i]] = True
            i += 1
        while i < hi:
            b = toks[i][depth]
            j = bisect.bisect_left(toks, toks[i][:depth] + bytes([b + 1]), i, hi) if b < 255 else hi
            after = _advance(state, b) if calls is None else tool_call_step(state, b, calls)
            if after is not None:
                self._walk(after, i, j, depth + 1, mask, calls)
            i = j


class JsonConstraint:
    """One sequence's progress through a JSON object (of `root`'s schema): `allowed()` before each
    token is chosen, `push(token)` after."""

    def __init__(self, vocabulary: JsonVocabulary, root: Schema = JSON_OBJECT):
        self.vocabulary = vocabulary
        self.state = initial_state(root)

    def allowed(self) -> np.ndarray:
        return self.vocabulary.allowed(self.state)

    def push(self, token: int) -> None:
        if self.done:
            return  # the end-of-sequence token that closes it
        after = run(self.state, self.vocabulary.tokens[token] or b"")
        if after is None or not self.vocabulary.tokens[token]:
            raise BitnetError(f"token {token} does not continue the JSON object")  # allowed() forbids it
        self.state = after

    @property
    def done(self) -> bool:
        return _done(self.state)


def tag_matched(tag: bytes | str, matched: int, data: bytes | str) -> tuple[int, bytes | str | None]:
    """Where text stands against ``tag`` after ``data`` is written, given that the text before ended with the first
    ``matched`` bytes of the tag (and with no longer beginning of it): ``(matched now, None)`` while the tag is not
    complete, ``(len(tag), the bytes after it)`` once it is. Any tag the new bytes complete starts within those
    ``matched`` bytes or in ``data`` (a longer start would be a longer match), so they are all that is read. The
    same for characters where tag and data are text."""
    text = tag[:matched] + data
    at = text.find(tag)
    if at >= 0:
        return len(tag), text[at + len(tag):]
    return next((m for m in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:m])), 0), None


@dataclass(frozen=True)
class ToolCalls:
    """How a reply's tool calls are written, as a chat template teaches them: each call ``root``'s
    (:func:`tool_call_schema`) between ``tag`` and ``close`` (Hermes' and Qwen's ``<tool_call>`` and ``</tool_call>``),
    with only space between calls; ``several``: more than one call (OpenAI's parallel_tool_calls). With no tag (Llama
    3.1's bare JSON) a call opens the reply, and is all of it."""

    tag: bytes
    close: bytes
    root: Schema
    several: bool = True


# the phases of a reply under ToolCallConstraint past its text: space and the first call's tag where a call must come
# (bytes of the tag matched, spaces so far), a call's JSON (its recognizer state), the space and closing tag after it,
# then space and the next call's tag or the end
OPENING, CALL, CLOSING, BETWEEN = "opening", "call", "closing", "between"


def tool_call_step(state: tuple, b: int, calls: ToolCalls) -> tuple | None:
    """The reply's state after byte b, from a phase past its text: ``(CALL, json_state)``, or ``(OPENING | CLOSING |
    BETWEEN, matched, spaces)``; None where b cannot come. Between tokens of the JSON the usual limits hold; around
    the tags at most MAX_INDENT spaces."""
    phase = state[0]
    if phase == CALL:
        after = _advance(state[1], b)
        if after is not None:
            return (CALL, after)
        return tool_call_step((CLOSING if calls.close else BETWEEN, 0, 0), b, calls) if _done(state[1]) else None
    _, matched, spaces = state
    if matched == 0 and b in WHITESPACE:
        return (phase, 0, spaces + 1) if spaces < MAX_INDENT else None
    want = calls.close if phase == CLOSING else calls.tag
    if not want:  # tag-less: the call opens with its first byte, and nothing but space comes after it
        return tool_call_step((CALL, initial_state(calls.root)), b, calls) if phase == OPENING else None
    if b != want[matched] or (phase == BETWEEN and not calls.several):
        return None
    if matched + 1 < len(want):
        return (phase, matched + 1, spaces)
    return (BETWEEN, 0, 0) if phase == CLOSING else (CALL, initial_state(calls.root))


def tool_call_run(state: tuple | None, data: bytes, calls: ToolCalls) -> tuple | None:
    """tool_call_step over all of data (None once refused)."""
    for b in data:
        if state is None:
            return None
        state = tool_call_step(state, b, calls)
    return state


def tool_call_ends(state: tuple) -> bool:
    """Whether the reply may end in this phase: after a call's JSON (its closing tag may be left out) or between
    calls, not inside a tag nor before the first call where one must come."""
    return _done(state[1]) if state[0] == CALL else state[0] == BETWEEN and state[1] == 0


class ToolCallConstraint:
    """A reply of tool calls written as a chat template teaches them (``calls``). Where the model chooses whether to
    call (tool_choice "auto") it begins as free text, which may go on to the tag and the calls; where a call is
    ``required`` it begins at the tag. Before the tag every token is allowed but those that would complete it and go
    on with bytes no call begins with (found once per vocabulary and partial match, :meth:`JsonVocabulary.tag_mask`);
    inside a call the JSON's masks; elsewhere a walk of the vocabulary's trie through the tags
    (:meth:`JsonVocabulary.tool_call_mask`). Tag-less calls (Llama's) are chosen by the reply's first byte past its
    space: "{" begins the call, anything else text with no call after it (:meth:`JsonVocabulary.lead_mask`)."""

    def __init__(self, vocabulary: JsonVocabulary, calls: ToolCalls, required: bool = False):
        self.vocabulary, self.calls = vocabulary, calls
        self.matched = 0  # bytes of the tag at the end of the text so far
        self.state: tuple | None = (OPENING, 0, 0) if required else None  # past the text: tool_call_step's
        # tag-less and chosen: the space the reply has begun with while it may still open a call (None once it is text)
        self.lead: tuple | None = (OPENING, 0, 0) if not (calls.tag or required) else None

    @property
    def calling(self) -> bool:
        return self.state is not None

    def allowed(self) -> np.ndarray | None:
        """The tokens that may come next; None: any."""
        if self.state is None:
            if not self.calls.tag:
                return None if self.lead is None else self.vocabulary.lead_mask(self.calls, self.lead)
            return self.vocabulary.tag_mask(self.calls, self.matched)
        if self.state[0] == CALL and not _done(self.state[1]):
            return self.vocabulary.allowed(self.state[1])
        return self.vocabulary.tool_call_mask(self.state, self.calls)

    def push(self, token: int) -> None:
        data = self.vocabulary.tokens[token]
        if self.state is None:
            if data is None:  # a special token: no text, and the tag's bytes around it do not join up
                self.matched = 0
                return
            if not self.calls.tag:
                self._lead(token, data)
                return
            self.matched, rest = tag_matched(self.calls.tag, self.matched, data)
            state = None if rest is None else tool_call_run((CALL, initial_state(self.calls.root)), rest, self.calls)
            if rest is not None and state is None:
                raise BitnetError(f"token {token} does not begin a tool call")  # allowed() forbids it
            self.state = state
            return
        if tool_call_ends(self.state) and self.vocabulary.end[token]:
            return  # the end-of-sequence token that closes the reply
        state = tool_call_run(self.state, data, self.calls) if data else None
        if state is None:
            raise BitnetError(f"token {token} does not continue the tool calls")  # allowed() forbids it
        self.state = state

    def _lead(self, token: int, data: bytes) -> None:
        """A tag-less reply's token while it may still open a call: more space, the call's first bytes or text."""
        if self.lead is None:
            return
        after = tool_call_run(self.lead, data, self.calls)
        if after is None and data.lstrip(SPACES)[:1] == b"{":
            raise BitnetError(f"token {token} does not begin a tool call")  # allowed() forbids it
        if after is not None and after[0] == CALL:
            self.state = after
        else:
            self.lead = after

    @property
    def done(self) -> bool:
        return self.state is not None and tool_call_ends(self.state)


JSON_ARRAY = Schema(types=frozenset(("array",)), items=ANY)


class ToolCallText:
    """A reply written under ToolCallConstraint, taken apart as it grows (``feed`` each new piece): ``content``, the
    text before the first tag, and ``calls``, each call's JSON text so far, with ``complete`` calls those whose JSON
    closed. The calls' ends are found by the JSON recognizer, so a tag inside a call's string is part of the call.
    ``listed``: the calls come as the items of one JSON list between the tags (:func:`tool_call_list_schema`); each
    item is a call. With no tag (Llama's), a reply whose first byte past its space is "{" is one call, and any other
    is text."""

    def __init__(self, tag: str, close: str, listed: bool = False):
        root = JSON_ARRAY if listed else JSON_OBJECT
        self.calls_written = ToolCalls(tag.encode("utf-8"), close.encode("utf-8"), root)
        self.listed = listed
        self.data = bytearray()
        self.content_end: int | None = None  # where the tag (or a tag-less call) begins, once it is complete
        self.matched = 0
        self.lead: tuple | None = None if tag else (OPENING, 0, 0)  # as ToolCallConstraint.lead
        self.state: tuple | None = None
        self.spans: list[list[int]] = []  # [start, end] of each call's JSON in data (end: so far)
        self.complete = 0  # calls whose JSON closed

    def feed(self, piece: str) -> None:
        tag = self.calls_written.tag
        for b in piece.encode("utf-8"):
            self.data.append(b)
            if self.state is None:
                if not tag:
                    self._lead(b)
                    continue
                self.matched, rest = tag_matched(tag, self.matched, bytes([b]))
                if rest is not None:
                    self.content_end = len(self.data) - len(tag)
                    self.state = (CALL, initial_state(self.calls_written.root))
                    if not self.listed:
                        self.spans.append([len(self.data), len(self.data)])
                continue
            was = self.state
            self.state = tool_call_step(self.state, b, self.calls_written)
            if self.state is None:  # not the constraint's text (cut by a stop string and resumed, say): ignore
                self.state = was
                continue
            if self.listed:
                if was[0] == CALL and self.state[0] == CALL:  # the list's items: the recognizer's depth 1 -> 2 -> 1
                    before, after = len(was[1][1]), len(self.state[1][1])
                    if before == 1 and after == 2:  # a call's "{" opens an item
                        self.spans.append([len(self.data) - 1, len(self.data)])
                    elif before > 1:
                        self.spans[-1][1] = len(self.data)
                        self.complete += after == 1
            elif was[0] == CALL and self.state[0] == CALL:
                self.spans[-1][1] = len(self.data)
                self.complete += _done(self.state[1]) and not _done(was[1])
            elif self.state[0] == CALL:  # the next call's tag is complete
                self.spans.append([len(self.data), len(self.data)])

    def _lead(self, b: int) -> None:
        if self.lead is None:
            return
        after = tool_call_step(self.lead, b, self.calls_written)
        if after is not None and after[0] == CALL:  # the "{" that opens the call
            self.content_end, self.state = len(self.data) - 1, after
            self.spans.append([len(self.data) - 1, len(self.data)])
        else:
            self.lead = after

    @property
    def content(self) -> str:
        """The text before the first tag (all of it while there is none; a partial tag at its end included)."""
        end = len(self.data) if self.content_end is None else self.content_end
        return self.data[:end].decode("utf-8", "replace")

    @property
    def calls(self) -> list[str]:
        return [self.data[a:b].decode("utf-8", "replace") for a, b in self.spans]


def output_schema(output_format: str, json_schema: dict | None = None) -> Schema | None:
    """The root schema that output_format ("text", "json_object" or "json_schema" with json_schema)
    constrains the output to; None for free text."""
    if output_format not in RESPONSE_FORMATS:
        raise BitnetError(f"unknown output format {output_format!r}; choose one of: {', '.join(RESPONSE_FORMATS)}",
                          param="response_format")
    if (json_schema is not None) != (output_format == "json_schema"):
        raise BitnetError("a JSON schema goes with output format json_schema, and json_schema needs one",
                          param="response_format")
    if output_format == "text":
        return None
    return JSON_OBJECT if json_schema is None else compile_schema(json_schema)


@functools.lru_cache(maxsize=64)
def _tool_calls(text: str, key: str) -> Schema:
    alternatives, functions = [], json.loads(text)
    if len(functions) > MAX_FORK:
        raise BitnetError(f"more than {MAX_FORK} functions", param="tools")
    for name, parameters in functions:
        arguments = compile_schema(parameters)
        call = Schema(types=frozenset(("object",)), properties={b"name": Schema(enum=(_compact(name),)),
                                                                key.encode(): arguments},
                      required=frozenset((b"name", key.encode())))
        call.ordered = True
        call.depths = (1 + _least_depth(arguments), UNBOUNDED)  # its arguments' shared nodes keep their own depths
        if call.depths[0] > MAX_DEPTH:
            raise _schema_error("", f"{name}: every value it accepts is nested more than {MAX_DEPTH - 1} deep")
        alternatives.append(call)
    root = Schema(types=frozenset(("object",)))
    root.alternatives = tuple(alternatives)
    return root


@functools.lru_cache(maxsize=64)
def tool_call_list_schema(call: Schema, several: bool = True) -> Schema:
    """The calls as one JSON list of ``call``'s (tool_call_schema), as Falcon3's template writes them between its
    tags: at least one, and one at most unless ``several``. The same call schema gives the same node."""
    root = Schema(types=frozenset(("array",)), items=call)
    root.min_items, root.max_items = 1, None if several else 1
    root.depths = (UNBOUNDED, 1 + _least_depth(call))
    if root.depths[1] > MAX_DEPTH:
        raise _schema_error("", f"every call it accepts is nested more than {MAX_DEPTH - 1} deep")
    return root


def tool_call_schema(functions: Sequence[tuple[str, dict]], key: str = "arguments") -> Schema:
    """The root schema of a call of one of several functions, as tool-calling models write one (Hermes' and Qwen's
    templates): ``{"name": NAME, "arguments": {...}}`` (Llama's ``key``: ``"parameters"``), the name first (so that a
    stream can name the call before its arguments) and the arguments held to that function's parameters (a JSON
    schema each, as compile_schema takes it). The same functions give the same nodes, so their cached masks are shared
    between requests."""
    return _tool_calls(json.dumps([[name, parameters] for name, parameters in functions], sort_keys=True,
                                  ensure_ascii=False), key)


__all__ = ["JSON_OBJECT", "JsonConstraint", "JsonVocabulary", "RESPONSE_FORMATS", "Schema", "ToolCallConstraint",
           "ToolCallText", "ToolCalls", "compile_schema", "is_prefix", "output_schema", "step", "tag_matched",
           "token_bytes", "tool_call_list_schema", "tool_call_schema"]
