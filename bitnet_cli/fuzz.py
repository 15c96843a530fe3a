"""Mutation fuzzing of every file format bitnet-cli reads, through the real command line.

    python -m bitnet_cli.fuzz --minutes 30                  # all formats, until the time is up
    python -m bitnet_cli.fuzz --cases 200 --formats packed  # a fixed number of cases
    python -m bitnet_cli.fuzz --minutes 30 --sanitize       # the engine under ASan/UBSan kernels

Small valid files are built first (a packed model, a safetensors checkpoint, a sharded one with
its index, config and tokenizer JSON, a recipe, a GGUF export, a JSON schema; no download, no torch). Each case
mutates one of them (bytes, or a value inside its JSON/YAML) and runs the command that reads it (`bitnet run`,
`info --verify`, `pack`, `train --dry-run`, `run --json-schema`) in a forked child with resource limits. The oracle:
exit 0, or exit 1 with exactly one stderr line starting ``error:``; never a traceback, a signal,
more than 10 s of CPU time (or 60 s of wall time), more than 1 GB of memory beyond the parent's,
or a sanitizer report. The ``request`` format mutates HTTP request bodies instead (completions, chat with tools,
structured outputs, earlier tool calls) and sends them to one `bitnet serve` of a model whose chat template writes
``<tool_call>``: every answer must be a 200 (JSON, or a stream of JSON events) or a 4xx/503 with OpenAI's error
object, within 60 s, with no traceback in the server's log, and the server must live on. Findings are
written to --out (the input, the command, the output) and deduplicated by what went wrong.

With --sanitize the kernels are rebuilt with -fsanitize=address,undefined (into
kernels/build/asan-module) and the run re-executes itself with libasan preloaded and
$BITNET_KERNELS pointing at that build; memory limits are then left to ASan.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import hashlib
import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

FORMATS = ("packed", "safetensors", "index", "config", "tokenizer", "recipe", "gguf", "schema", "request")
TIMEOUT_S = 10.0  # CPU seconds a case may use (CPU, not wall time: the machine may be busy)
WALL_TIMEOUT_S = 60.0  # and wall seconds, for a case that hangs without using the CPU
MEMORY_BYTES = 1 << 30

# Values that have broken parsers before: huge and negative sizes, wrong JSON types, non-finite
# floats, lone surrogates, very long strings, deep nesting (as raw JSON text, see _json_text).
HOSTILE = [0, -1, 1, 2**31, 2**32 + 1, 2**63, 2**64, -(2**63), 10**30, 1e308, -1e-320, 1e-320, 0.5,
           float("nan"), float("inf"), True, False, None, "", "x" * 100_000, "\udc80", "..", "../../x",
           "a\x00b", [], {}, [1, 2], {"a": 1}, [[[[[]]]]], "F32", "U8", "bitnet", "default", "relu2"]
DEEP = "[" * 5000 + "]" * 5000
BIG_INT = "9" * 5000


@dataclasses.dataclass
class Seed:
    format: str
    path: Path  # the file a case mutates (inside `root`, which is copied per case)
    root: Path  # directory copied for each case
    argv: list[list[str]]  # commands; {file} and {dir} are substituted, one is picked per case


@dataclasses.dataclass
class Outcome:
    ok: bool
    kind: str  # "ok", "error", or what went wrong
    detail: str
    seconds: float
    rss_bytes: int


# ------------------------------------------------------------------------------ seeds


def build_seeds(work: Path, calls: str = "each") -> dict[str, Seed]:
    """Small valid inputs of every format, in `work`; ``calls``: how the request model's template writes tool calls
    (TOOL_TEMPLATES: one call after each tag, one list between the tags, or one call as the whole reply)."""
    import numpy as np
    from safetensors.numpy import save_file

    from bitnet_cli.arch import EMBED, FINAL_NORM, ModelDims, bitnet_config, layer_tensor
    from bitnet_cli.pack import pack_checkpoint
    from bitnet_cli.pack.synthetic import BOS, EOS, synthetic_tokenizer

    vocab = 300
    tok_json = synthetic_tokenizer(vocab, merges_vocab=290)
    tok_config = {"bos_token": BOS, "eos_token": EOS, "chat_template":
                  "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"}

    def model(hidden: int, ffn: int, layers: int, context: int = 128) -> tuple[dict, dict]:
        config = bitnet_config(dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=context, tie_word_embeddings=True, rope_theta=10000.0,
                                    bos_token_id=0, eos_token_id=1))
        config["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                         "quantization_mode": "online"}
        dims = ModelDims.from_config(config)
        rng = np.random.default_rng(0)
        tensors = {EMBED: rng.normal(0, 0.05, (vocab, hidden)).astype(np.float32),
                   FINAL_NORM: np.ones(hidden, np.float32)}
        for i in range(dims.num_layers):
            for p in dims.projections():
                tensors[layer_tensor(i, p.name)] = rng.normal(0, 0.05, p.shape(dims)).astype(np.float32)
            for n in dims.layer_norms():
                tensors[layer_tensor(i, n.name)] = np.ones(n.size(dims), np.float32)
        return config, tensors

    def checkpoint(d: Path, shards: int, shape=(64, 96, 2), template: str | None = None, context: int = 128) -> Path:
        config, tensors = model(*shape, context)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config, indent=1))
        (d / "tokenizer.json").write_text(tok_json)
        (d / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": template or
                                                              tok_config["chat_template"]}))
        if shards == 1:
            save_file(tensors, str(d / "model.safetensors"))
            return d
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(d / fname))
            weight_map.update(dict.fromkeys(part, fname))
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return d

    single = checkpoint(work / "ckpt", 1)
    sharded = checkpoint(work / "sharded", 2)
    packed_dir = work / "packed"
    packed_dir.mkdir()
    pack_checkpoint(single, packed_dir / "model.bin")
    gguf_dir = work / "gguf"
    gguf_dir.mkdir()
    # llama.cpp's ternary blocks need inputs in multiples of 256: a wider, one-layer model
    pack_checkpoint(checkpoint(work / "ckpt256", 1, (256, 512, 1)), gguf_dir / "model.gguf", to="gguf",
                    gguf_type="i2_s")
    recipe_dir = work / "recipe"
    recipe_dir.mkdir()
    (recipe_dir / "recipe.yaml").write_text(
        "name: fuzz\nseed: 7\nmodel:\n  hidden_size: 64\n  intermediate_size: 96\n  num_hidden_layers: 2\n"
        "  num_attention_heads: 4\n  num_key_value_heads: 2\n  vocab_size: 300\n  round_vocab_to: 64\n"
        "  rope_theta: 10000.0\ndata:\n  files: [bundled:tinyshakespeare]\n  val_fraction: 0.05\n"
        "  tokenizer: {vocab_size: 320}\noptim:\n  lr: 1.0e-3\n  betas: [0.9, 0.95]\n  schedule: two_stage\n"
        "train:\n  batch_size: 4\n  seq_len: 32\n  steps: 10\n  device: cpu\n  threads: 1\n")
    schema_dir = work / "schema"
    schema_dir.mkdir()
    shutil.copy(packed_dir / "model.bin", schema_dir / "model.bin")
    (schema_dir / "schema.json").write_text(json.dumps(SCHEMA_SEED, indent=1))
    request_dir = work / "request"
    request_dir.mkdir()
    # a context that holds the tools the template shows (the synthetic tokenizer's 300 tokens are short)
    pack_checkpoint(checkpoint(work / "ckpt_tools", 1, template=TOOL_TEMPLATES[calls],
                               context=1024), request_dir / "model.bin")
    (request_dir / "requests.json").write_text(json.dumps(REQUEST_SEEDS, indent=1))
    run = ["run", "{file}", "-p", "ROMEO: a", "-n", "3", "--seed", "1", "--threads", "1", "--ctx-size", "64"]
    constrained = ["run", "{dir}/model.bin", "-p", "Data:", "-n", "24", "--seed", "1", "--threads", "1",
                   "--ctx-size", "64", "--json-schema", "{file}"]
    pack = ["pack", "{dir}", "{dir}/out.bin", "--force", "--json"]
    return {
        "packed": Seed("packed", packed_dir / "model.bin", packed_dir,
                       [run, run + ["--temperature", "0"], ["info", "{file}", "--verify", "--json"]]),
        "safetensors": Seed("safetensors", single / "model.safetensors", single, [pack]),
        "index": Seed("index", sharded / "model.safetensors.index.json", sharded, [pack]),
        "config": Seed("config", single / "config.json", single, [pack]),
        "tokenizer": Seed("tokenizer", single / "tokenizer.json", single, [pack]),
        "gguf": Seed("gguf", gguf_dir / "model.gguf", gguf_dir, [["pack", "{file}", "{dir}/out.bin", "--force", "--json"]]),
        "recipe": Seed("recipe", recipe_dir / "recipe.yaml", recipe_dir, [["train", "{file}", "--dry-run", "--json"]]),
        "schema": Seed("schema", schema_dir / "schema.json", schema_dir,
                       [constrained, constrained + ["--temperature", "0"]]),
        "request": Seed("request", request_dir / "requests.json", request_dir, []),  # sent to one server: _Server
    }


# A schema using every keyword the JSON output enforces (bitnet_cli.constrain), for the schema cases to mutate.
SCHEMA_SEED = {
    "type": "object", "additionalProperties": False, "required": ["id", "kind"],
    "$defs": {"Node": {"type": "object", "properties": {"v": {"type": "integer", "minimum": -3, "maximum": 40},
                                                       "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"},
                                                                "maxItems": 2}}}},
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}-\\d{2,4}$"}, "kind": {"enum": ["cat", "dog", 3, None]},
        "when": {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "multipleOf": 0.05},
        "name": {"type": "string", "minLength": 1, "maxLength": 8}, "ok": {"const": True},
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "format": "uuid"}],
                 "items": False, "minItems": 2},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "a+b"}, "minItems": 1, "maxItems": 3},
        "tree": {"allOf": [{"$ref": "#/$defs/Node"}], "description": "a described $ref"},
        "one": {"oneOf": [{"type": "boolean"}, {"type": "integer", "exclusiveMaximum": 0}]},
        "pet": {"oneOf": [{"type": "object", "properties": {"t": {"const": "a"}, "n": {"type": "integer"}},
                           "required": ["t"]},
                          {"type": "object", "properties": {"t": {"const": "b"}}, "required": ["t"]}],
                "discriminator": {"propertyName": "t"}},
        "any": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "integer", "minimum": 5}, {"type": "number"}]},
        "set": {"type": "array", "items": {"enum": ["a", 1, 12]}, "uniqueItems": True, "minItems": 1}}}


# A chat template that shows tools and writes calls between <tool_call> tags (Hermes' form), for the request cases.
TOOL_TEMPLATE = ("{% if tools %}system: call with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>\n"
                 "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}{% for m in messages %}{{ m.role }}: "
                 "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", "
                 "\"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}{% else %}"
                 "{{ m.content }}{% endif %}\n{% endfor %}assistant:")
# The same with the calls as one list between the tags (Falcon3's form).
LIST_TOOL_TEMPLATE = ("{% if tools %}system: call with <tool_call>[{\"name\": ..., \"arguments\": ...}]</tool_call>\n"
                      "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}{% for m in messages %}"
                      "{{ m.role }}: {% if m.tool_calls %}<tool_call>{{ m.tool_calls | tojson }}</tool_call>{% else %}"
                      "{{ m.content }}{% endif %}\n{% endfor %}assistant:")
# One call as the whole reply, with no tag (Llama 3.1's form).
BARE_TOOL_TEMPLATE = ("{% if tools %}system: call by answering {\"name\": ..., \"parameters\": ...}\n"
                      "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}{% for m in messages %}"
                      "{{ m.role }}: {% if m.tool_calls %}{\"name\": \"{{ m.tool_calls[0].function.name }}\", "
                      "\"parameters\": {{ m.tool_calls[0].function.arguments | tojson }}}{% else %}"
                      "{{ m.content }}{% endif %}\n{% endfor %}assistant:")
# the request model's template, by how it writes calls: seed % 3 picks one
TOOL_TEMPLATES = {"each": TOOL_TEMPLATE, "listed": LIST_TOOL_TEMPLATE, "bare": BARE_TOOL_TEMPLATE}
_TOOLS = [{"type": "function", "function": {"name": "move", "description": "Move.", "parameters": {
    "type": "object", "required": ["to"], "additionalProperties": False,
    "properties": {"to": {"type": "integer", "minimum": 0, "maximum": 9}, "fast": {"type": "boolean"}}}}},
          {"type": "function", "function": {"name": "say", "parameters": {
              "type": "object", "properties": {"text": {"type": "string", "maxLength": 8}}}}}]
_TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Move to 3."},
          {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
              "name": "move", "arguments": "{\"to\": 3}"}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": "done"}, {"role": "user", "content": "Now say hi."}]
# Request bodies using what the server reads (each sent to its path), for the request cases to mutate.
REQUEST_SEEDS = [
    ["/v1/completions", {"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
                         "seed": 3, "n": 2, "stop": ["\n\n", "KING"], "logprobs": 2, "echo": True,
                         "frequency_penalty": 0.5, "presence_penalty": -0.5, "logit_bias": {"5": 3, "9": -100}}],
    ["/v1/completions", {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 6, "stream": True,
                         "stream_options": {"include_usage": True}, "response_format": {"type": "json_object"}}],
    ["/v1/chat/completions", {"messages": _TURNS, "tools": _TOOLS, "max_tokens": 24, "seed": 1,
                              "parallel_tool_calls": True, "logit_bias": {"60": 5}}],
    ["/v1/chat/completions", {"messages": _TURNS[:2], "tools": _TOOLS, "tool_choice": "required", "max_tokens": 24,
                              "stream": True, "logprobs": True, "top_logprobs": 2}],
    ["/v1/chat/completions", {"messages": _TURNS[:2], "tools": _TOOLS[:1], "max_tokens": 24, "temperature": 0,
                              "tool_choice": {"type": "function", "function": {"name": "move"}}}],
    ["/v1/chat/completions", {"messages": _TURNS[1:2], "max_completion_tokens": 24, "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "strict": True, "schema": SCHEMA_SEED}}}],
    ["/tokenize", {"prompt": "ROMEO: a", "add_special_tokens": False}],
    ["/detokenize", {"tokens": [5, 6, 7]}],
]


# ------------------------------------------------------------------------------ mutation


def _json_text(value, rng: random.Random) -> str:
    """JSON text of `value`, where some nodes become raw hostile text (deep nesting, huge digits)."""
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.1:
        marker = '"__HOSTILE__"'
        if marker in text:
            text = text.replace(marker, rng.choice([DEEP, BIG_INT, "-" + BIG_INT, "1e999", "NaN"]), 1)
    return text


def _mutate_value(value, rng: random.Random, depth: int = 0):
    """A copy of a JSON-like value with one node replaced, deleted or duplicated."""
    if isinstance(value, (dict, list)) and value and depth < 8 and rng.random() < 0.8:
        is_dict = isinstance(value, dict)
        key = rng.choice(list(value)) if is_dict else rng.randrange(len(value))
        out = dict(value) if is_dict else list(value)
        roll = rng.random()
        if roll < 0.1:
            del out[key]
        elif is_dict and roll < 0.15:  # a stray key beside the real one
            out[key + rng.choice(["", "_", "\x00"]) + "x"] = rng.choice(HOSTILE)
        elif not is_dict and roll < 0.2:  # one item twice
            out.append(out[key])
        else:
            out[key] = _mutate_value(value[key], rng, depth + 1)
        return out
    if isinstance(value, str) and value[:1] in "{[" and rng.random() < 0.7:
        try:  # JSON inside a string (the packed file's metadata): mutate inside it
            inner = json.loads(value)
        except ValueError:
            pass
        else:
            return json.dumps(_mutate_value(inner, rng, depth + 1))
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.4:
        return value + rng.choice([-1, 1, -value, value, 2**31, 2**63, -(2**31)])
    if rng.random() < 0.05:
        return "__HOSTILE__"
    return rng.choice(HOSTILE)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        if not b:
            break
        op = rng.random()
        i = rng.randrange(len(b))
        if op < 0.35:
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.55:
            b[i] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x20, ord("9"), ord("["), ord('"')])
        elif op < 0.65:
            del b[i:i + rng.randrange(1, 64)]
        elif op < 0.75:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        elif op < 0.85:
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randrange(1, 256)]
        elif op < 0.9:
            del b[rng.randrange(len(b)):]
        else:
            b[i:i + 4] = struct.pack("<I", rng.choice([0, 1, 2**31, 2**32 - 1, rng.randrange(2**32)]))
    return bytes(b)


def _safetensors_split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def mutate_safetensors(data: bytes, rng: random.Random, packed: bool) -> bytes:
    """Mutate the header JSON (keeping the data 64-byte aligned), the data bytes, or raw bytes."""
    roll = rng.random()
    if roll < 0.25:
        return mutate_bytes(data, rng)
    header, body = _safetensors_split(data)
    if roll < 0.45:  # damage tensor data (e.g. NaN norms), header intact
        body = bytearray(body)
        for _ in range(rng.choice([1, 4, 64])):
            i = rng.randrange(len(body))
            body[i:i + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -1e30, 0.0, 65504.0]))
        body = bytes(body)
    else:
        header = _mutate_value(header, rng)
        if packed and isinstance(header, dict) and isinstance(header.get("__metadata__"), dict) and rng.random() < 0.7:
            # a valid metadata checksum lets the case reach the code behind the check
            from bitnet_cli.pack.format import metadata_checksum

            meta = header["__metadata__"]
            if all(isinstance(v, str) for v in meta.values()):
                meta["metadata_checksum"] = metadata_checksum(meta)
    text = _json_text(header, rng).encode("utf-8", "surrogatepass")
    text += b" " * ((-(8 + len(text))) % 64)
    return struct.pack("<Q", len(text)) + text + body


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        return mutate_bytes(data, rng)
    return _json_text(_mutate_value(json.loads(data), rng), rng).encode("utf-8", "surrogatepass")


YAML_SNIPPETS = ["&a [*a]", "*nope", "!!python/object:os.system ls", "[" * 200 + "]" * 200, "{" * 50,
                 "18446744073709551616", "1e999", ".nan", "-.inf", "0x7fffffffffffffff", "~", "[]", "{}",
                 "2001-13-45", "!!binary AAAA", "'\\udc80'", '"\\udc80"', "|\n  text", "&x 1", "<<: {a: 1}",
                 "? [a, b]\n: c", "%YAML 1.1\n---"]


def mutate_yaml(data: bytes, rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        return mutate_bytes(data, rng)
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    if roll < 0.7:  # replace a value
        i = rng.randrange(len(lines))
        key = lines[i].split(":", 1)[0]
        value = rng.choice(YAML_SNIPPETS + [json.dumps(v) if not isinstance(v, float) else repr(v)
                                            for v in HOSTILE if not (isinstance(v, str) and len(v) > 100)])
        lines[i] = f"{key}: {value}"
    elif roll < 0.85:  # a billion-laughs prefix, and an alias where a value was
        bomb = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        bomb += [f"l{k}: &l{k} [{','.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 9)]
        lines = bomb + lines + ["  steps: *l8"]
    else:  # deep nesting
        lines.append("deep: " + "[" * rng.choice([50, 500, 5000]) + "]" * rng.choice([0, 50, 500, 5000]))
    return "\n".join(lines).encode("utf-8", "surrogateescape")


PATTERN_SNIPPETS = ["(", ")", "[", "]", "{", "}", "{99999}", "{2,1}", "*", "+?", "|", "^", "$", "\\", "\\1", "(?=",
                    "(?<n>", "\\p{L}", "\\u12", "\\x", "[^\\s\\S]", "(a*)*", "(a|a)*b", "[\\d-z]", ".{0,4000}",
                    "(" * 400, ")" * 400, "é", "\"", "\\b", "[z-a]", "\\cA", "(?i)"]


def mutate_pattern(data: bytes, rng: random.Random) -> bytes:
    """A schema with snippets of regular expressions spliced into its patterns (or a new pattern where none was)."""
    schema = json.loads(data)
    props = schema["properties"]
    name = rng.choice(sorted(props))
    old = props[name].get("pattern", "") if isinstance(props[name], dict) else ""
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(old))
        old = old[:at] + rng.choice(PATTERN_SNIPPETS) + old[at:]
    props[name] = {"type": "string", "pattern": old}
    return json.dumps(schema).encode()


def mutate_gguf(data: bytes, rng: random.Random) -> bytes:
    """Bytes, biased to the header (counts, key/value metadata, tensor infos) where the parser works."""
    if rng.random() < 0.7:
        head = min(len(data), 4096)
        return mutate_bytes(data[:head], rng) + data[head:]
    return mutate_bytes(data, rng)


def mutate_request(data: bytes, rng: random.Random) -> bytes:
    """One of the request seeds, its body mutated: ``PATH\nBODY``."""
    path, body = rng.choice(json.loads(data))
    if rng.random() < 0.15 and isinstance(body.get("response_format"), dict):  # patterns spliced into its schema
        schema = body["response_format"].get("json_schema", {}).get("schema")
        if isinstance(schema, dict):
            schema = json.loads(mutate_pattern(json.dumps(schema).encode(), rng))
            body["response_format"]["json_schema"]["schema"] = schema
    if rng.random() < 0.1:
        return path.encode() + b"\n" + mutate_bytes(json.dumps(body).encode(), rng)
    for _ in range(rng.choice([1, 1, 2, 3])):  # values inside the body, the root kept an object
        mutated = _mutate_value(body, rng)
        body = mutated if isinstance(mutated, dict) else body
    return path.encode() + b"\n" + _json_text(body, rng).encode("utf-8", "surrogatepass")


def mutate(seed: Seed, data: bytes, rng: random.Random) -> bytes:
    if seed.format == "request":
        return mutate_request(data, rng)
    if seed.format in ("packed", "safetensors"):
        return mutate_safetensors(data, rng, packed=seed.format == "packed")
    if seed.format == "recipe":
        return mutate_yaml(data, rng)
    if seed.format == "gguf":
        return mutate_gguf(data, rng)
    if seed.format == "schema" and rng.random() < 0.3:
        return mutate_pattern(data, rng)
    return mutate_json(data, rng)


# ------------------------------------------------------------------------------ running a case


def _maxrss_bytes(ru) -> int:
    return ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_case(argv: list[str], cwd: Path, sanitize: bool, base_vm: int, base_rss: int) -> Outcome:
    """Run `bitnet ARGV` in a forked child (the parent has imported everything already) and judge it."""
    out_path, err_path = cwd / ".stdout", cwd / ".stderr"
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        # a crash is judged by the signal; pytest's faulthandler would print the child's stack into the run's log
        faulthandler.disable()
        try:
            os.chdir(cwd)
            os.environ.update(COLUMNS="1000", TQDM_DISABLE="1")  # one message, one line (rich wraps at 80)
            with open(out_path, "wb") as o, open(err_path, "wb") as e, open(os.devnull, "rb") as n:
                os.dup2(n.fileno(), 0)
                os.dup2(o.fileno(), 1)
                os.dup2(e.fileno(), 2)
            # fresh streams on fds 1 and 2 (under pytest sys.stderr is a capture object, not fd 2)
            sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
            sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
            if not sanitize:  # ASan reserves terabytes of address space for its shadow memory
                resource.setrlimit(resource.RLIMIT_AS, (base_vm + MEMORY_BYTES, base_vm + MEMORY_BYTES))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            cpu = int(TIMEOUT_S) + 1  # SIGXCPU past the limit (the parent judges the exact figure)
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            from bitnet_cli.cli import app

            app(argv, prog_name="bitnet")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    deadline = t0 + WALL_TIMEOUT_S
    status = ru = None
    while True:
        got, status, ru = os.wait4(pid, os.WNOHANG)
        if got:
            break
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status, ru = os.wait4(pid, 0)
            return Outcome(False, "hang", f"more than {WALL_TIMEOUT_S:.0f} s wall time", time.perf_counter() - t0,
                           _maxrss_bytes(ru))
        time.sleep(0.005)
    seconds = ru.ru_utime + ru.ru_stime
    rss = _maxrss_bytes(ru)
    err = err_path.read_bytes().decode("utf-8", "replace")
    if seconds > TIMEOUT_S or (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU):
        return Outcome(False, "timeout", f"more than {TIMEOUT_S:.0f} s of CPU time", seconds, rss)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return Outcome(False, f"signal {signal.Signals(sig).name}", _tail(err), seconds, rss)
    code = os.WEXITSTATUS(status)
    if "AddressSanitizer" in err or "runtime error:" in err or "LeakSanitizer" in err:
        return Outcome(False, "sanitizer", _tail(err), seconds, rss)
    if "Traceback (most recent call last)" in err:
        return Outcome(False, "traceback", _tail(err), seconds, rss)
    if rss > base_rss + MEMORY_BYTES and not sanitize:
        return Outcome(False, "memory", f"{rss / 2**30:.2f} GiB resident", seconds, rss)
    if code == 0:
        return Outcome(True, "ok", "", seconds, rss)
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    if code == 1 and len(error_lines) == 1:
        return Outcome(True, "error", error_lines[0], seconds, rss)
    return Outcome(False, f"exit {code}", _tail(err), seconds, rss)


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def signature(o: Outcome) -> str:
    """What went wrong, without the details that differ between cases (numbers, paths)."""
    last = o.detail.strip().splitlines()[-1] if o.detail.strip() else ""
    if o.kind == "traceback":
        # the exception line: the last line of the traceback that is not indented
        lines = o.detail.split("Traceback (most recent call last)")[-1].splitlines()
        last = next((line for line in reversed(lines) if line[:1].strip()), last).split(":", 1)[0]
        frames = re.findall(r'File "([^"]+)", line (\d+)', o.detail)
        if frames:
            last += f" at {Path(frames[-1][0]).name}:{frames[-1][1]}"
    if o.kind == "bad answer":  # what is wrong, not the answer quoted after it
        last = o.detail.split(":", 1)[0]
    return f"{o.kind}: {re.sub(r'[0-9]+', 'N', last)[:160]}"


# ------------------------------------------------------------------------------ a request case

ERROR_STATUSES = (400, 404, 405, 413, 503)  # answers with OpenAI's error object that a bad request may get


def judge_response(status: int, content_type: str, raw: bytes) -> str | None:
    """What is wrong with an HTTP answer (None: nothing): a 200 is one JSON object, or a stream of ``data:`` events
    each a JSON object, ending in ``[DONE]`` unless an error event ended it; an error is one of ERROR_STATUSES with
    ``{"error": {"message": ...}}``. A stream is cut into lines as str.splitlines does, as httpx's iter_lines (with
    which many clients read one) does: at U+2028 too."""
    def obj(text: bytes | str):
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    if status == 200 and content_type.startswith("text/event-stream"):
        events = [line[6:] for line in raw.decode("utf-8", "replace").splitlines() if line.startswith("data: ")]
        if not events:
            return "an empty stream"
        bad = next((e for e in events if e != "[DONE]" and obj(e) is None), None)
        if bad is not None:
            return f"a stream event that is not a JSON object: {bad[:200]}"
        if events[-1] != "[DONE]" and "error" not in obj(events[-1]):
            return "a stream that ends without [DONE] or an error"
        return None
    body = obj(raw)
    if status == 200:
        return None if body is not None else f"a 200 whose body is not a JSON object: {raw[:200]!r}"
    if status not in ERROR_STATUSES:
        return f"status {status}: {raw[:300].decode('utf-8', 'replace')}"
    error = (body or {}).get("error")
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or not error["message"]:
        return f"a {status} without OpenAI's error object: {raw[:200]!r}"
    return None


class RequestServer:
    """One `bitnet serve` of the request seed's model for the request cases: started at the first case, and again
    after one kills it or hangs it. Its log (stderr) goes to a file, read after each case."""

    def __init__(self, model: Path, log: Path):
        self.model, self.log = model, log
        self.proc: subprocess.Popen | None = None
        self.read = 0  # bytes of the log judged already

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bitnet_cli.cli", "serve", str(self.model), "--port", "0", "--json",
                 "--threads", "1", "--parallel", "2", "--max-queue", "4"],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "1000"})
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bitnet serve did not start: {_tail(self.log.read_text('utf-8', 'replace'))}")
        url = json.loads(line)["url"]
        self.host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
        self.port = int(port)
        self.base_rss = self.rss()
        self.read = self.log.stat().st_size

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return 0
        return int(next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), 0)) * 1024

    def new_log(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self.read)
            text = f.read()
        self.read += len(text)
        return text.decode("utf-8", "replace")

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
            self.proc.stdout.close()

    def run(self, data: bytes) -> Outcome:
        """Send one case (``PATH\nBODY``) and judge the answer, the log and the server."""
        if not self.alive():
            self.start()
        path, _, body = data.partition(b"\n")
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=WALL_TIMEOUT_S)
        try:
            conn.request("POST", path.decode(), body=body, headers={"content-type": "application/json"})
            answer = conn.getresponse()
            status, content_type, raw = answer.status, answer.getheader("content-type", ""), answer.read()
        except TimeoutError:
            self.stop()
            return Outcome(False, "hang", f"no answer in {WALL_TIMEOUT_S:.0f} s", time.perf_counter() - t0, 0)
        except (ConnectionError, http.client.HTTPException) as e:
            status, content_type, raw = 0, "", repr(e).encode()
        finally:
            conn.close()
        seconds, log, rss = time.perf_counter() - t0, self.new_log(), self.rss()
        if not self.alive():
            code = self.proc.poll()
            self.stop()
            return Outcome(False, "server died", f"exit {code}\n{_tail(log)}", seconds, rss)
        if "Traceback (most recent call last)" in log:
            return Outcome(False, "traceback", _tail(log), seconds, rss)
        if rss > self.base_rss + MEMORY_BYTES:
            self.stop()
            return Outcome(False, "memory", f"{rss / 2**30:.2f} GiB resident", seconds, rss)
        problem = judge_response(status, content_type, raw)
        if problem:
            return Outcome(False, "bad answer", problem, seconds, rss)
        return Outcome(True, "ok" if status == 200 else "error", "" if status == 200 else raw[:300].decode(
            "utf-8", "replace"), seconds, rss)


# ------------------------------------------------------------------------------ the campaign


@dataclasses.dataclass
class Report:
    executions: int = 0
    by_format: dict = dataclasses.field(default_factory=dict)
    outcomes: dict = dataclasses.field(default_factory=dict)  # "ok"/"error"/finding kind -> count
    findings: dict = dataclasses.field(default_factory=dict)  # signature -> first case directory
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _prepare_parent(formats=FORMATS) -> tuple[int, int]:
    """Import what the cases run (once, before forking); the parent's (address-space size, resident size)."""
    import importlib

    for module in ["bitnet_cli.cli", "bitnet_cli.engine", "bitnet_cli.pack"] + (
            ["bitnet_cli.train"] if "recipe" in formats else []):  # torch: the recipe cases' dry run
        importlib.import_module(module)
    from bitnet_cli import kernels

    kernels.lib()
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.split()
    return int(status["VmSize"][0]) * 1024, int(status["VmRSS"][0]) * 1024


def fuzz(*, minutes: float | None = None, cases: int | None = None, formats=FORMATS, seed: int = 0,
         out: Path | None = None, sanitize: bool = False, progress=None, work: Path | None = None) -> Report:
    """Run cases until `minutes` or `cases` is reached (cases are spread over `formats` in turn)."""
    base_vm, base_rss = _prepare_parent(formats)
    if sanitize:  # make sure the cases really drive the sanitized kernels
        from bitnet_cli import kernels

        maps = Path("/proc/self/maps").read_text()
        if "libasan" not in maps or not kernels._ALT or os.environ.get("BITNET_KERNELS", "") not in maps:
            raise SystemExit("fuzz --sanitize: libasan or the sanitized kernels module is not loaded")
    rng = random.Random(seed)
    report = Report()
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="bitnet-fuzz-")) if own_work else Path(work)
    server = None
    try:
        seeds = build_seeds(work / "seeds", calls=list(TOOL_TEMPLATES)[seed % len(TOOL_TEMPLATES)])
        originals = {f: seeds[f].path.read_bytes() for f in formats}
        if "request" in formats:
            server = RequestServer(seeds["request"].root / "model.bin", work / "server.log")
        t0 = time.perf_counter()
        i = 0
        while True:
            if cases is not None and i >= cases:
                break
            if minutes is not None and time.perf_counter() - t0 > minutes * 60:
                break
            fmt = formats[i % len(formats)]
            s = seeds[fmt]
            case_dir = work / "case"
            data = mutate(s, originals[fmt], rng)
            if fmt == "request":
                argv = ["serve", str(s.root / "model.bin"), "# POST", data.partition(b"\n")[0].decode()]
                o = server.run(data)
            else:
                shutil.rmtree(case_dir, ignore_errors=True)
                shutil.copytree(s.root, case_dir, symlinks=True)
                target = case_dir / s.path.relative_to(s.root)
                target.write_bytes(data)
                argv = [a.replace("{file}", str(target)).replace("{dir}", str(case_dir)) for a in rng.choice(s.argv)]
                o = run_case(argv, case_dir, sanitize, base_vm, base_rss)
            report.executions += 1
            report.by_format[fmt] = report.by_format.get(fmt, 0) + 1
            report.outcomes[o.kind] = report.outcomes.get(o.kind, 0) + 1
            if not o.ok:
                sig = signature(o)
                if sig not in report.findings:
                    where = _save_finding(out or work / "findings", fmt, argv, data, o, case_dir)
                    report.findings[sig] = str(where)
            if progress:
                progress(report, fmt, o)
            i += 1
        report.seconds = time.perf_counter() - t0
    finally:
        if server is not None:
            server.stop()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return report


def _save_finding(root: Path, fmt: str, argv: list[str], data: bytes, o: Outcome, case_dir: Path) -> Path:
    d = Path(root) / f"{fmt}-{hashlib.sha1(data).hexdigest()[:12]}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "input").write_bytes(data)
    (d / "report.txt").write_text(f"format: {fmt}\nwhat: {o.kind} ({o.seconds:.1f} s)\ncommand: bitnet "
                                  f"{' '.join(argv)}\n(the case directory was {case_dir})\n\n{o.detail}\n")
    return d


# ------------------------------------------------------------------------------ sanitizer build


def build_sanitized_kernels(repo: Path) -> Path:
    """The cffi kernels module compiled with -fsanitize=address,undefined; returns the .so path."""
    sys.path.insert(0, str(repo / "kernels"))
    import build_cffi
    from cffi import FFI

    out = repo / "kernels" / "build" / "asan-module"
    out.mkdir(parents=True, exist_ok=True)
    ffi = FFI()
    ffi.cdef(build_cffi._cdef())
    ffi.set_source("_kernels", '#include "bitnet.h"',
                   sources=[str(repo / "kernels" / s) for s in build_cffi.SOURCES],
                   include_dirs=[str(repo / "kernels")],
                   extra_compile_args=["-O1", "-g", "-std=gnu11", "-pthread", "-fno-omit-frame-pointer",
                                       "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                                       "-ffp-contract=off"],
                   extra_link_args=["-pthread", "-fsanitize=address,undefined"], libraries=["m"])
    return Path(ffi.compile(tmpdir=str(out)))


def _reexec_under_asan(args: list[str]) -> int:
    repo = Path(__file__).resolve().parents[1]
    module = build_sanitized_kernels(repo)
    libasan = subprocess.run(["cc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, BITNET_KERNELS=str(module), LD_PRELOAD=libasan, BITNET_FUZZ_SANITIZED="1",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1",
               UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1")
    return subprocess.call([sys.executable, "-m", "bitnet_cli.fuzz", *args], env=env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitnet_cli.fuzz", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--minutes", type=float, help="run for this long (default: 1, unless --cases is given)")
    ap.add_argument("--cases", type=int, help="run this many cases")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, from {', '.join(FORMATS)}")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the mutations")
    ap.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="where findings are written")
    ap.add_argument("--sanitize", action="store_true", help="run against kernels built with ASan/UBSan")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the seeds' BPE training, then fork
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        ap.error(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if args.sanitize and not os.environ.get("BITNET_FUZZ_SANITIZED"):
        return _reexec_under_asan(argv if argv is not None else sys.argv[1:])
    minutes = args.minutes if args.minutes is not None or args.cases is not None else 1.0
    last = [0.0]

    def progress(report: Report, fmt: str, o: Outcome) -> None:
        if time.perf_counter() - last[0] > 5 or not o.ok:
            last[0] = time.perf_counter()
            print(f"{report.executions} executions, {len(report.findings)} findings" +
                  ("" if o.ok else f"  [{fmt}] {o.kind}"), file=sys.stderr, flush=True)

    report = fuzz(minutes=minutes, cases=args.cases, formats=formats, seed=args.seed, out=args.out,
                  sanitize=bool(os.environ.get("BITNET_FUZZ_SANITIZED")), progress=progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"{report.executions} executions in {report.seconds:.0f} s "
              f"({', '.join(f'{k} {v}' for k, v in sorted(report.by_format.items()))})")
        print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items())))
        print(f"{len(report.findings)} distinct findings" + (f", written to {args.out}" if report.findings else ""))
        for sig, where in report.findings.items():
            print(f"  {sig}\n    {where}")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
