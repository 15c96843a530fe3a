"""`bitnet serve` against the official `openai` client (and httpx for what a client must not send),
on 127.0.0.1 with small local models: every answer is checked against the in-process Engine, the
path `bitnet run` takes, and scoring through lm-eval's own `local-completions` against `bitnet eval`."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, load_benchmark, make_hf_checkpoint

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from bitnet_cli.engine import Engine, render_chat  # noqa: E402
from bitnet_cli.pack import pack_checkpoint  # noqa: E402


class Served:
    """A `bitnet serve` subprocess on a free loopback port."""

    def __init__(self, model, *args, env: dict | None = None, api_key: str = "none"):
        self.model = model
        cmd = [sys.executable, "-m", "bitnet_cli.cli", "serve", str(model), "--port", "0", "--json", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bitnet serve did not start: {self.proc.stderr.read()}")
        self.info = json.loads(line)
        self.url = self.info["url"]
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=self.url.removesuffix("/v1"), timeout=60)

    def health(self) -> dict:
        return self.http.get("/health").json()

    def stop(self) -> int:
        """SIGTERM, then the exit code (the server drains first)."""
        self.http.close()
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def packed(tmp_path_factory, test_tokenizer_dir):
    """A small fp16 model (its f16 embeddings pack losslessly) with a 512-token context."""
    root = tmp_path_factory.mktemp("serve_model")
    ckpt = make_hf_checkpoint(root / "ckpt", test_tokenizer_dir, max_position_embeddings=512, torch_dtype="float16",
                              initializer_range=0.1)
    pack_checkpoint(ckpt, root / "model.bin")
    return root / "model.bin"


@pytest.fixture(scope="module")
def server(packed):
    s = Served(packed, "--threads", "2", "--parallel", "16")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def engine(packed):
    with Engine.load(packed, threads=1) as eng:
        yield eng


def alone(engine, prompt, **kw) -> tuple[str, object]:
    gen = engine.generate(prompt, **kw)
    return "".join(gen), gen


PROMPTS = ["ROMEO:", "To be, or not to be", "KING HENRY:\nMy lord, the", "a", "What say you? " * 9,
           "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."]


# ---------------------------------------------------------------- answers


def test_greedy_completions_equal_bitnet_run_with_usage(server, engine):
    model = server.info["model"]
    assert [m.id for m in server.client.models.list().data] == [model]
    for prompt in PROMPTS[:3]:
        r = server.client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0)
        text, gen = alone(engine, prompt, max_tokens=20, temperature=0)
        assert r.choices[0].text == text
        assert r.usage.prompt_tokens == len(engine.encode(prompt))
        assert r.usage.completion_tokens == gen.stats.generated_tokens
        assert r.choices[0].finish_reason == ("length" if gen.stats.stop_reason == "max_tokens" else "stop")
    # token ids are taken as given (no BOS added)
    ids = engine.encode("ROMEO:", add_bos=False)
    r = server.client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == alone(engine, ids, max_tokens=8, temperature=0)[0]


def ask_all_at_once(served, jobs):
    """Greedy completions of (prompt, max_tokens) jobs, all sent concurrently; their texts in order."""
    def ask(job):
        prompt, n = job
        return served.client.completions.create(model=served.info["model"], prompt=prompt, max_tokens=n,
                                                temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(ask, jobs))


def test_sixteen_concurrent_greedy_requests_equal_their_sequential_outputs(server, engine):
    """Different prompt and output lengths, some sharing prefixes (the prefix cache), all at once."""
    jobs = [(PROMPTS[i % len(PROMPTS)] + " x" * (i // len(PROMPTS)) * 7, 8 + 5 * i) for i in range(16)]
    want = [alone(engine, p, max_tokens=n, temperature=0)[0] for p, n in jobs]

    assert ask_all_at_once(server, jobs) == want
    assert server.health()["busy"] == 0


def test_an_f16_kv_cache_serves_sixteen_concurrent_requests_as_bitnet_run_with_it(packed, server):
    """--kv-cache f16 means in `bitnet serve` what it means in `bitnet run`: every concurrent greedy
    output equals the engine's alone with that cache, and a slot costs half the bytes."""
    jobs = [(PROMPTS[i % len(PROMPTS)] + " x" * (i // len(PROMPTS)) * 5, 6 + 4 * i) for i in range(16)]
    with Engine.load(packed, threads=1, kv_cache="f16") as f16:
        want = [alone(f16, p, max_tokens=n, temperature=0)[0] for p, n in jobs]
    half = Served(packed, "--threads", "2", "--parallel", "16", "--kv-cache", "f16")
    try:
        assert half.info["kv_cache"] == "f16" and server.info["kv_cache"] == "f32"
        assert half.info["kv_bytes_per_slot"] * 2 == server.info["kv_bytes_per_slot"]
        assert ask_all_at_once(half, jobs) == want
        health = half.health()
        assert health["kv_cache"] == "f16" and health["kv_bytes_per_slot"] == half.info["kv_bytes_per_slot"]
    finally:
        assert half.stop() == 0


def test_a_shared_prefix_is_computed_once(server, engine):
    """A second request that extends the first one's prompt (a chat history) prefills only the rest."""
    model = server.info["model"]
    first = PROMPTS[5]
    server.client.completions.create(model=model, prompt=first, max_tokens=4, temperature=0)
    longer = first + "\nFirst Citizen:\nYou are all resolved rather to die than to famish?"
    r = server.client.completions.create(model=model, prompt=longer, max_tokens=12, temperature=0)
    shared = len(engine.encode(first)) - 2  # the last token of `first` may merge with what follows
    assert r.usage.prompt_tokens_details.cached_tokens >= shared
    assert r.choices[0].text == alone(engine, longer, max_tokens=12, temperature=0)[0]


def test_streaming_gives_the_same_text_and_usage(server, engine):
    model = server.info["model"]
    prompt = PROMPTS[2]
    stream = server.client.completions.create(model=model, prompt=prompt, max_tokens=30, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text, gen = alone(engine, prompt, max_tokens=30, temperature=0)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == gen.stats.generated_tokens


def test_stream_events_stay_whole_for_clients_that_read_lines(server):
    """Text holding U+2028, U+2029 or U+0085 (line ends for str.splitlines, and so for httpx's iter_lines) is escaped
    in stream events: each event is one line that parses whole. Here the echoed prompt carries them."""
    prompt = "ROMEO:\u2028a\x85b\u2029c"
    with server.http.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "echo": True,
                                                              "stream": True, "temperature": 0}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines), lines
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events).startswith(prompt)


def test_chat_through_the_template_streamed_and_whole(server, engine):
    model = server.info["model"]
    messages = [{"role": "user", "content": "Who art thou?"}, {"role": "assistant", "content": "A friend."},
                {"role": "user", "content": "Speak again."}]
    want, _ = alone(engine, render_chat(engine, messages), max_tokens=16, temperature=0)
    r = server.client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(render_chat(engine, messages))
    chunks = list(server.client.chat.completions.create(model=model, messages=messages, max_tokens=16,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    r = server.client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) <= 2 for c in content)
    assert all(c.logprob == max(t.logprob for t in c.top_logprobs) for c in content)  # greedy: the best


def test_stop_strings_cut_the_text(server, engine):
    model = server.info["model"]
    full, _ = alone(engine, PROMPTS[1], max_tokens=30, temperature=0)
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip())
    r = server.client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_a_seed_reproduces_bitnet_run_and_n_gives_independent_choices(server, engine):
    model = server.info["model"]
    kw = dict(model=model, prompt="ROMEO:", max_tokens=20, temperature=1.0, top_p=1.0, seed=5)
    a = server.client.completions.create(**kw).choices[0].text
    assert a == server.client.completions.create(**kw).choices[0].text
    assert a == alone(engine, "ROMEO:", max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=5)[0]
    two = server.client.completions.create(**{**kw, "n": 2}).choices
    assert [c.index for c in two] == [0, 1] and two[0].text == a
    assert two[1].text == alone(engine, "ROMEO:", max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=6)[0]


def test_response_format_json_is_bitnet_run_format_json(server, engine):
    """Each choice (sampled, several at once, streamed or whole, chat or completion) is what the
    engine's JSON-constrained generation gives alone (any object, or a schema's); a schema keyword that
    would not be enforced and function calling are refused, not ignored."""
    from bitnet_cli.constrain import is_prefix

    model, fmt = server.info["model"], {"type": "json_object"}
    kw = dict(max_tokens=200, temperature=1.0, top_k=0, top_p=1.0, output_format="json_object")
    r = server.client.completions.create(model=model, prompt="Data:", max_tokens=200, temperature=1.0, seed=3, n=4,
                                         extra_body={"response_format": fmt})
    for c in r.choices:
        want, gen = alone(engine, "Data:", seed=3 + c.index, **kw)
        assert c.text == want and is_prefix(c.text)
        assert c.finish_reason == ("stop" if gen.stats.stop_reason == "eos" else "length")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
    messages = [{"role": "user", "content": "Reply in JSON."}]
    ids = render_chat(engine, messages)
    want = alone(engine, ids, seed=9, **{**kw, "max_tokens": 40})[0]
    chat = dict(model=model, messages=messages, max_tokens=40, temperature=1.0, seed=9, response_format=fmt)
    assert server.client.chat.completions.create(**chat).choices[0].message.content == want
    chunks = server.client.chat.completions.create(**chat, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    for field, value in [("functions", [{"name": "f"}]), ("function_call", {"name": "f"})]:
        r = server.http.post("/v1/chat/completions", json={"messages": messages, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field and "function calling" in r.text
    r = server.http.post("/v1/chat/completions", json={"messages": messages, "tools": [], "tool_choice": "none",
                                                       "max_tokens": 1})
    assert r.status_code == 200
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "n"],
              "properties": {"name": {"type": "string"}, "n": {"type": "integer"}, "tags": {"type": "array",
                                                                                         "items": {"enum": ["a", "b"]}}}}
    want = alone(engine, ids, seed=2, **{**kw, "output_format": "json_schema", "json_schema": schema})[0]
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "strict": True, "schema": schema}}
    got = server.client.chat.completions.create(**{**chat, "seed": 2, "max_tokens": 200, "response_format": fmt})
    assert got.choices[0].message.content == want and is_prefix(want, schema)
    for bad, why in [({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                         "a": {"type": "string", "format": "iri"}}}}}, "format 'iri' is not supported"),
                     ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs json_schema.schema"),
                     ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array"}}}, "root must"),
                     ({"type": "xml"}, "response_format"), ("json", "response_format")]:
        r = server.http.post("/v1/chat/completions", json={"messages": messages, "response_format": bad})
        assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "response_format"


def test_a_forced_tool_call_is_the_json_schema_reply_as_a_call(server, engine):
    """tool_choice naming a function (or "required" with one tool): the reply is one call of it whose arguments are
    what the engine's schema-constrained generation gives alone for the function's parameters, on the prompt the
    template renders with the tools; streamed, the deltas name the call once and carry the same arguments. Where
    the model would choose whether to call, the request is refused, never answered in text."""
    import jsonschema

    model = server.info["model"]
    params = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
              "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                          "maximum": 14}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast.",
                                               "parameters": params}},
             {"type": "function", "function": {"name": "now"}}]
    messages = [{"role": "user", "content": "Weather in Rome for three days?"}]
    ids = render_chat(engine, messages, tools)
    want, gen = alone(engine, ids, seed=4, max_tokens=60, temperature=1.0, top_k=0, top_p=1.0,
                      output_format="json_schema", json_schema=params)
    chat = dict(model=model, messages=messages, max_tokens=60, temperature=1.0, seed=4, tools=tools,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = server.client.chat.completions.create(**chat)
    choice = r.choices[0]
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert call.function.arguments == want and r.usage.prompt_tokens == len(ids)
    assert choice.finish_reason == ("tool_calls" if gen.stats.stop_reason == "eos" else "length")
    if choice.finish_reason == "tool_calls":
        jsonschema.validate(json.loads(call.function.arguments), params)
    chunks = [c for c in server.client.chat.completions.create(**chat, stream=True, stop=["}"]) if c.choices]
    first = chunks[0].choices[0].delta.tool_calls[0]
    assert first.id and first.function.name == "get_weather"
    assert "".join(d.function.arguments for c in chunks for d in c.choices[0].delta.tool_calls or []) == want
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason  # the stop string "}" does not cut it
    one = server.client.chat.completions.create(**{**chat, "tools": tools[1:], "tool_choice": "required"})
    assert one.choices[0].message.tool_calls[0].function.name == "now"
    args = one.choices[0].message.tool_calls[0].function.arguments
    assert one.choices[0].finish_reason != "tool_calls" or json.loads(args) == {}  # no arguments
    text = server.client.chat.completions.create(**{**chat, "tool_choice": "none", "seed": 4})
    assert text.choices[0].message.tool_calls is None and text.choices[0].message.content is not None
    # the conversation goes on with the call and its result, as a client sends them back
    turns = messages + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sun"}'}]
    rendered = [{**m, "content": m["content"] or ""} for m in turns]
    want, _ = alone(engine, render_chat(engine, rendered), max_tokens=12, temperature=0)
    after = server.client.chat.completions.create(model=model, messages=turns, max_tokens=12, temperature=0,
                                                  tools=tools, tool_choice="none")
    assert after.choices[0].message.content == want and after.usage.prompt_tokens == len(render_chat(engine, rendered))
    for bad, param in [({"role": "tool", "content": "x"}, "messages.1.tool_call_id"),
                       ({"role": "user"}, "messages.1.content"), ({"role": "assistant"}, "messages.1.content")]:
        r = server.http.post("/v1/chat/completions", json={"messages": messages + [bad], "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    for change, param, why in [({"tool_choice": "auto"}, "tool_choice", "shows no way to call"),
                               ({"tool_choice": None}, "tool_choice", "shows no way to call"),
                               ({"tools": tools + tools[:1], "tool_choice": "required"}, "tools", "the same name"),
                               ({"tools": tools * 65}, "tools", "at most 128"),
                               ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
                                "not among the tools"),
                               ({"tools": None}, "tool_choice", "needs tools"),
                               ({"response_format": {"type": "json_object"}}, "response_format", "cannot go together"),
                               ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                                   "type": "object", "properties": {"a": {"not": {}}}}}}],
                                 "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools",
                                "not is not supported"),
                               ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "")]:
        body = {k: v for k, v in {**chat, **change}.items() if v is not None}
        r = server.http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] in (param, f"{param}.0.function.name"), r.text
        assert why in r.json()["error"]["message"], r.text


def test_a_required_call_among_several_tools_names_one_and_follows_its_parameters(server, engine):
    """tool_choice "required" with several tools: the reply is one call of one of them, written as
    {"name": ..., "arguments": ...} under constrain.tool_call_schema and taken apart; its arguments follow that
    function's parameters. Streamed with the same seed, the deltas name the call once the name is known and carry the
    same arguments, the whole call's closing brace held back (the arguments nest objects, whose braces must go out)."""
    import jsonschema

    point = {"type": "object", "additionalProperties": False, "required": ["x"],
             "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}}
    params = {"move": {"type": "object", "additionalProperties": False, "required": ["to", "fast"],
                       "properties": {"to": point, "fast": {"type": "boolean"}}},
              "stop": {"type": "object", "additionalProperties": False, "required": ["now"],
                       "properties": {"now": {"enum": [True, 1]}}}}
    tools = [{"type": "function", "function": {"name": name, "parameters": p}} for name, p in params.items()]
    chat = dict(model=server.info["model"], messages=[{"role": "user", "content": "Move to 3."}], max_tokens=250,
                temperature=1.0, tools=tools, tool_choice="required")
    names, finished = set(), 0
    for seed in range(8):
        r = server.client.chat.completions.create(**chat, seed=seed)
        choice = r.choices[0]
        assert choice.message.content is None and len(choice.message.tool_calls) <= 1
        if choice.finish_reason == "tool_calls":
            call = choice.message.tool_calls[0].function
            names.add(call.name)
            jsonschema.validate(json.loads(call.arguments), params[call.name])
            finished += 1
        chunks = [c for c in server.client.chat.completions.create(**chat, seed=seed, stream=True) if c.choices]
        deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
        assert chunks[-1].choices[0].finish_reason == choice.finish_reason
        if choice.message.tool_calls:
            whole = choice.message.tool_calls[0]
            assert deltas[0].id.startswith("call_") and deltas[0].function.name == whole.function.name
            assert all(d.function.name is None for d in deltas[1:])
            assert "".join(d.function.arguments for d in deltas) == whole.function.arguments
    assert finished >= 3 and names == {"move", "stop"}, (finished, names)
    whole = server.client.chat.completions.create(**chat, seed=11, n=2)
    chunks = [c for c in server.client.chat.completions.create(**chat, seed=11, n=2, stream=True) if c.choices]
    for choice in whole.choices:  # each choice's stream is taken apart on its own
        deltas = [d for c in chunks if c.choices[0].index == choice.index for d in c.choices[0].delta.tool_calls or []]
        calls = choice.message.tool_calls
        assert [d.function.name for d in deltas if d.function.name] == [c.function.name for c in calls]
        assert "".join(d.function.arguments for d in deltas) == "".join(c.function.arguments for c in calls)


# A chat template in Hermes' style (as Qwen2.5's): the tools shown in a system turn, a call written
# <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, its result in a tool turn.
TOOL_TEMPLATE = """{%- if tools %}<|system|>
To call a function write <tool_call> and {"name": ..., "arguments": {...}}. Functions:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|assistant|>
{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{% endfor %}
{%- else %}<|{{ message.role }}|>
{{ message.content }}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""


# Falcon3's style: the calls written as one JSON list between the tags,
# <tool_call>\n[{"name": ..., ...}, ...]\n</tool_call>.
LIST_TOOL_TEMPLATE = TOOL_TEMPLATE.replace(
    """{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{% endfor %}""", """<tool_call>
[{% for call in message.tool_calls %}{"name": "{{ call.function.name }}",
{{- ' ' }}"arguments": {{ call.function.arguments | tojson }}}
{%- if not loop.last %}, {% endif %}{% endfor %}]
</tool_call>
""").replace('write <tool_call> and {"name": ..., "arguments": {...}}',
          'write them as a list, <tool_call>\n[{"name": ..., "arguments": {...}}, ...]\n</tool_call>')
TOOL_TEMPLATES = {"each": TOOL_TEMPLATE, "listed": LIST_TOOL_TEMPLATE}

# Llama 3.1's and 3.2's style: the tools shown in the first user turn, a call written as the whole reply with no tag,
# {"name": ..., "parameters": {...}} (one a turn), its result in an ipython turn.
BARE_TOOL_TEMPLATE = """{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|assistant|>
{% set call = message.tool_calls[0].function %}
{{- '{"name": "' + call.name + '", ' }}{{ '"parameters": ' }}{{ call.arguments | tojson }}{{ "}" }}
{% elif message.role == "tool" %}<|ipython|>
{{ message.content }}
{% else %}<|{{ message.role }}|>
{% if tools and loop.first %}Call a function by answering {"name": its name, "parameters": its arguments}, one of:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}{% endif %}{{ message.content }}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""


@pytest.fixture(scope="module", params=list(TOOL_TEMPLATES))
def tool_served(request, tmp_path_factory, test_tokenizer_dir):
    """The small model with TOOL_TEMPLATE (a call between each pair of tags) or LIST_TOOL_TEMPLATE (the calls as a list
    between them), and <tool_call> and </tool_call> as tokens of their own (added, not special, as Qwen's tokenizer
    has them): served, and loaded as an Engine."""
    from tokenizers import AddedToken, Tokenizer

    root = tmp_path_factory.mktemp("tool_model")
    tok = Tokenizer.from_file(str(test_tokenizer_dir / "tokenizer.json"))
    tok.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    (root / "tokenizer").mkdir()
    tok.save(str(root / "tokenizer" / "tokenizer.json"))
    config = json.loads((test_tokenizer_dir / "tokenizer_config.json").read_text())
    template = TOOL_TEMPLATES[request.param]
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    ckpt = make_hf_checkpoint(root / "ckpt", root / "tokenizer", max_position_embeddings=1024, torch_dtype="float16",
                              initializer_range=0.1, vocab_size=tok.get_vocab_size())
    pack_checkpoint(ckpt, root / "model.bin")
    s = Served(root / "model.bin", "--threads", "2", "--parallel", "4")
    with Engine.load(root / "model.bin", threads=1) as eng:
        yield s, eng
    assert s.stop() == 0


# two functions for the tool-call tests, whose arguments a random model finishes within a few tokens
CALL_PARAMS = {"move": {"type": "object", "additionalProperties": False, "required": ["to"],
                        "properties": {"to": {"type": "integer", "minimum": 0, "maximum": 9}}},
               "wait": {"type": "object", "additionalProperties": False, "required": ["seconds"],
                        "properties": {"seconds": {"enum": [1, 5]}}}}
CALL_TOOLS = [{"type": "function", "function": {"name": name, "parameters": p}} for name, p in CALL_PARAMS.items()]


def naive_calls(text: str, listed: bool = False) -> tuple[str, list[dict]]:
    """The text before the first <tool_call>, and each complete call after it read by json's raw_decode (then space,
    the closing tag and space before the next tag; ``listed``: the calls as the items of one list, each read so)."""
    content, found, rest = text.partition("<tool_call>")
    calls = []
    if listed and found:
        rest = rest.lstrip().removeprefix("[")
        while True:
            try:
                call, end = json.JSONDecoder().raw_decode(rest.lstrip())
            except ValueError:  # cut by max_tokens
                return content, calls
            calls.append(call)
            rest = rest.lstrip()[end:].lstrip().removeprefix(",")
    while found:
        try:
            call, end = json.JSONDecoder().raw_decode(rest.lstrip())
        except ValueError:  # cut by max_tokens
            break
        calls.append(call)
        rest = rest.lstrip()[end:].lstrip().removeprefix("</tool_call>").lstrip()
        found, rest = rest.startswith("<tool_call>"), rest.removeprefix("<tool_call>")
    return content, calls


def constrained_greedy(engine, ids: list[int], constraint, max_tokens: int, bias: dict) -> str:
    """The reply greedy decoding gives under constraint, one full forward pass per token (the naive loop)."""
    from bitnet_cli.sampling import SamplingParams, logit_bias_pairs, sample

    params, out = SamplingParams(0.0, logit_bias=logit_bias_pairs(bias, engine.vocab_size)), []
    for _ in range(max_tokens):
        token = sample(engine.forward(ids + out)[-1], params, np.random.default_rng(0), ids + out,
                       constraint.allowed(), out)
        if token in engine.stop_token_ids:
            break
        constraint.push(token)
        out.append(token)
    return engine.decode(out)


def test_calls_follow_a_template_that_writes_them_between_tags(tool_served, server):
    """On a model whose chat template writes calls between <tool_call> tags, every reply is what greedy decoding gives
    under constrain.ToolCallConstraint, token by token. tool_choice "auto" (the default with tools): biased against
    the tag, text (content, finish "stop"); biased towards it, calls whose names are tools' and whose arguments
    follow their parameters (the last one maybe cut by max_tokens), the text before the tag their content. "required"
    and a named function: calls from the start, of that function; parallel_tool_calls false: one. Streamed, content
    and calls come out as whole. A call goes back into the conversation as the template renders it; on a model whose
    template shows no way to call, "auto" is refused. The same where the template lists the calls (Falcon3's form:
    one JSON list between the tags)."""
    import jsonschema

    from bitnet_cli.constrain import tool_call_schema
    from bitnet_cli.engine import ToolCallFormat

    served, engine = tool_served
    listed = engine.tokenizer_config["chat_template"] == LIST_TOOL_TEMPLATE
    assert served.info["tool_call_tag"] == "<tool_call>" and server.info["tool_call_tag"] is None  # start-up line
    assert served.info["tool_calls_listed"] is listed and server.info["tool_calls_listed"] is False
    tag, close = engine.encode("<tool_call>", add_bos=False), engine.encode("</tool_call>", add_bos=False)
    assert len(tag) == len(close) == 1  # the added tokens, whole
    params, tools, messages = CALL_PARAMS, CALL_TOOLS, [{"role": "user", "content": "Move to 3."}]
    ids = render_chat(engine, messages, tools)
    assert "Functions:" in engine.decode(ids)  # the template showed the tools
    chat = dict(model=served.info["model"], messages=messages, max_tokens=100, temperature=0, tools=tools)
    tags, wait = {tag[0]: 100, close[0]: 50}, {"type": "function", "function": {"name": "wait"}}
    comma = engine.encode(",", add_bos=False)
    most = 0  # the most calls in one reply
    for tool_choice, bias, expect_call, extra in [
            ("auto", {tag[0]: 100, comma[0]: 50}, True, {}),  # listed: with "," favoured, item after item
            ("auto", {tag[0]: -100}, False, {}), ("auto", {tag[0]: 100}, True, {}),
            ("auto", tags, True, {}), ("auto", {}, None, {}),  # with both tags favoured, call after call
            ("required", {}, True, {}), (wait, tags, True, {}), ("auto", tags, True, {"parallel_tool_calls": False})]:
        names = ["wait"] if tool_choice == wait else list(params)
        written = ToolCallFormat("<tool_call>", "</tool_call>", listed)
        constraint = engine.tool_call_constraint(tool_call_schema([(n, params[n]) for n in names]), written,
                                                 required=tool_choice != "auto",
                                                 several=extra.get("parallel_tool_calls", True))
        want = constrained_greedy(engine, ids, constraint, 100, bias)
        chat = {**chat, "tool_choice": tool_choice, "logit_bias": {str(t): b for t, b in bias.items()}, **extra}
        r = served.client.chat.completions.create(**chat)
        choice = r.choices[0]
        content, calls = naive_calls(want, listed)
        if "<tool_call>" not in want:
            assert expect_call is not True and choice.message.content == want and choice.message.tool_calls is None
            assert choice.finish_reason in ("stop", "length")
            continue
        assert expect_call is not False and choice.message.content == (content.rstrip() or None)
        made = choice.message.tool_calls
        assert len(made) - len(calls) in (0, 1) and len({c.id for c in made}) == len(made), want  # the last may be cut
        assert [[c.function.name, json.loads(c.function.arguments)] for c in made[:len(calls)]] == \
            [[c["name"], c["arguments"]] for c in calls]
        for c in calls:
            jsonschema.validate(c["arguments"], params[c["name"]])
        assert choice.finish_reason in ("tool_calls", "length")
        assert choice.finish_reason == "length" or len(made) == len(calls)
        assert {c.function.name for c in made} <= set(names) and (extra == {} or len(made) == 1)
        most = max(most, len(made))
        assert tool_choice == "auto" or want.lstrip().startswith("<tool_call>")
        chunks = [c for c in served.client.chat.completions.create(**chat, stream=True) if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == content.rstrip()
        deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
        named = [(d.index, d.function.name) for d in deltas if d.id]
        assert named == [(k, c.function.name) for k, c in enumerate(made)]
        assert ["".join(d.function.arguments for d in deltas if d.index == k) for k in range(len(made))] == [
            c.function.arguments for c in made]
        assert chunks[-1].choices[0].finish_reason == choice.finish_reason
        call = made[0]  # the conversation goes on with a call and its result
        turns = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                            {"role": "tool", "tool_call_id": call.id, "content": "done"}]
        rendered = engine.decode(render_chat(engine, [{**m, "content": m["content"] or ""} for m in turns], tools))
        arguments = json.dumps(json.loads(call.function.arguments))  # as tojson writes it (json.dumps, keys in order)
        opened = "<tool_call>\n[" if listed else "<tool_call>\n"
        assert f'{opened}{{"name": "{call.function.name}", "arguments": {arguments}}}' in rendered
        after = served.client.chat.completions.create(**{**chat, "messages": turns, "max_tokens": 4})
        assert after.usage.prompt_tokens > len(ids)
    assert most >= 2 or not listed  # a list of several calls, whole (a call after each tag is cut by max_tokens here)
    chat = {**chat, "tool_choice": "auto", "logit_bias": {str(tag[0]): -100}, "parallel_tool_calls": None}
    streamed = [c for c in served.client.chat.completions.create(**chat, stream=True) if c.choices]
    whole = served.client.chat.completions.create(**chat)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content
    for arguments in ("[" * 100_000, "9" * 5000, "not json"):  # left as text for the template (rendered, then measured)
        turns = messages + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "move", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "c", "content": "done"}]
        r = served.http.post("/v1/chat/completions", json={**chat, "messages": turns, "max_tokens": 1})
        assert r.status_code == 200 or r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = server.http.post("/v1/chat/completions", json={**chat, "model": server.info["model"]})
    assert r.status_code == 400 and "shows no way to call" in r.json()["error"]["message"], r.text


@pytest.fixture(scope="module")
def bare_tool_served(tmp_path_factory, test_tokenizer_dir):
    """The small model with BARE_TOOL_TEMPLATE: served, and loaded as an Engine."""
    root = tmp_path_factory.mktemp("bare_tool_model")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_bytes((test_tokenizer_dir / "tokenizer.json").read_bytes())
    config = json.loads((test_tokenizer_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = BARE_TOOL_TEMPLATE
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    ckpt = make_hf_checkpoint(root / "ckpt", root / "tokenizer", max_position_embeddings=1024, torch_dtype="float16",
                              initializer_range=0.1)
    pack_checkpoint(ckpt, root / "model.bin")
    s = Served(root / "model.bin", "--threads", "2", "--parallel", "4")
    with Engine.load(root / "model.bin", threads=1) as eng:
        yield s, eng
    assert s.stop() == 0


def test_a_template_whose_call_is_the_whole_reply_lets_the_model_choose_by_its_first_byte(bare_tool_served):
    """On a model whose chat template writes a call as the whole reply with no tag (Llama 3.1's and 3.2's
    {"name": ..., "parameters": {...}}), every reply is what greedy decoding gives under constrain.ToolCallConstraint
    with no tag, token by token. tool_choice "auto": biased towards "{", one call whose name is a tool's and whose
    arguments follow its parameters (content null); biased against it, text, even where "{" comes later; "required"
    and a named function: a call. Streamed, content and call come out as whole; the call goes back into the
    conversation as the template writes it."""
    import jsonschema

    from bitnet_cli.constrain import tool_call_schema
    from bitnet_cli.engine import ToolCallFormat

    served, engine = bare_tool_served
    assert served.info["tool_call_tag"] == "" and served.info["tool_calls"] == '{"name": ..., "parameters": ...}'
    brace = engine.encode("{", add_bos=False)
    assert len(brace) == 1
    params, tools, messages = CALL_PARAMS, CALL_TOOLS, [{"role": "user", "content": "Move to 3."}]
    ids = render_chat(engine, messages, tools)
    assert '"parameters": its arguments' in engine.decode(ids)  # the template showed the tools
    chat = dict(model=served.info["model"], messages=messages, max_tokens=100, temperature=0, tools=tools)
    wait = {"type": "function", "function": {"name": "wait"}}
    written, calls_made = ToolCallFormat("", "", key="parameters"), 0
    # a random model writes much space between a call's tokens (within constrain.MAX_INDENT): tabs and newlines
    # biased against, so that calls end within max_tokens
    calm = {engine.encode(t, add_bos=False)[0]: -100 for t in ("\t", "\n")}
    for tool_choice, bias in [("auto", {brace[0]: 100}), ("auto", {brace[0]: -100}), ("auto", {}),
                              ("required", {}), (wait, {}), ("auto", {brace[0]: 8})]:
        bias = {**bias, **calm}
        names = ["wait"] if tool_choice == wait else list(params)
        constraint = engine.tool_call_constraint(tool_call_schema([(n, params[n]) for n in names], "parameters"),
                                                 written, required=tool_choice != "auto")
        want = constrained_greedy(engine, ids, constraint, 100, bias)
        chat = {**chat, "tool_choice": tool_choice, "logit_bias": {str(t): b for t, b in bias.items()}}
        choice = served.client.chat.completions.create(**chat).choices[0]
        streamed = [c for c in served.client.chat.completions.create(**chat, stream=True) if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == (choice.message.content or "")
        assert streamed[-1].choices[0].finish_reason == choice.finish_reason
        if not want.lstrip().startswith("{"):
            assert tool_choice == "auto" and bias.get(brace[0], 0) <= 0
            assert choice.message.content == want and choice.message.tool_calls is None
            assert choice.finish_reason in ("stop", "length")
            continue
        assert tool_choice != "auto" or bias.get(brace[0], 0) >= 0
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        made = choice.message.tool_calls[0]
        deltas = [d for c in streamed for d in c.choices[0].delta.tool_calls or []]
        assert deltas[0].id and deltas[0].function.name == made.function.name in names
        assert "".join(d.function.arguments for d in deltas) == made.function.arguments
        try:
            call, end = json.JSONDecoder().raw_decode(want.lstrip())
        except ValueError:  # cut by max_tokens
            assert choice.finish_reason == "length"
            continue
        assert want.lstrip()[end:].strip() == "" and choice.finish_reason == "tool_calls"
        assert list(call) == ["name", "parameters"] and call["name"] == made.function.name
        assert json.loads(made.function.arguments) == call["parameters"]
        jsonschema.validate(call["parameters"], params[call["name"]])
        calls_made += 1
        turns = messages + [{"role": "assistant", "content": "", "tool_calls": [made.model_dump()]},
                            {"role": "tool", "tool_call_id": made.id, "content": "done"}]
        rendered = engine.decode(render_chat(engine, turns, tools))
        arguments = json.dumps(call["parameters"])
        assert f'<|assistant|>\n{{"name": "{made.function.name}", "parameters": {arguments}}}\n<|ipython|>' in rendered
    assert calls_made >= 2


def test_the_start_up_line_says_how_the_model_writes_calls(bare_tool_served):
    """Without --json, `bitnet serve`'s start-up line shows the template's form of a call (ToolCallFormat's str),
    whole however narrow the terminal."""
    served, _ = bare_tool_served
    proc = subprocess.Popen([sys.executable, "-m", "bitnet_cli.cli", "serve", str(served.model), "--port", "0",
                             "--threads", "1"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "40"})
    try:
        line = "x"
        while line and not line.startswith("serving "):  # past any warning before it; "" at the end
            line = proc.stderr.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert 'tool calls {"name": ..., "parameters": ...}' in line, line


EACH, LISTED, LISTED_PLURAL = (("<tool_call>", False), ("<tool_call>", True), ("<tool_calls>", True))
BARE = ("", False, "parameters")


@pytest.mark.parametrize("template, written", [
    (TOOL_TEMPLATE, EACH),
    ("""{{- '<tool_call>\\n{"name": "' + c.name + '", "arguments": ' + (c.arguments | tojson) + '}' }}""", EACH),
    ("""{{- "<tool_call>\n" }}\n{{- '{"name": <function-name>, "arguments": <args-dict>}' }}""", EACH),
    ("""Call within <tool_call></tool_call> XML tags: <tool_call>{\\"name\\": <name>}""", EACH),
    ("""{{- '<tool_call>\\n<function=' + c.name + '>' }}""", None),  # Qwen3-Coder's XML
    ("""<tool_call>{{ c.name }}<arg_key>{{ k }}</arg_key>""", None),  # GLM's key tags
    (LIST_TOOL_TEMPLATE, LISTED),
    # Falcon3's: the format shown in a string of the template, its quotes escaped
    ("""{{- 'MUST follow this format:\\n<tool_call>\\n[\\n  {\\"name\\": \\"function_name\\", \\"arguments\\": {}}' }}""",
     LISTED),
    ("""within <tool_call></tool_call> tags: <tool_call>[{"name": "f", "arguments": {}}]""", LISTED),
    ("""{{- '\\n<tool_calls>[' -}}{%- for c in calls -%}{{- '{"name": "' + c.name }}""", None),  # no JSON after "["
    ("""as follows:\n<tool_calls>[{"name": <function-name-1>, "arguments": <args-dict-1>}, ...]</tool_calls>""",
     LISTED_PLURAL),  # Apriel's
    # MiniMax-M1's: calls one per line, no list
    ("""<tool_calls>\n{"name": <tool-name>, "arguments": <args-json-object>}\n...\n</tool_calls>""", None),
    ("""{{ messages[0].content }} {"name": "x", "arguments": {}}""", None),  # no tag
    # Llama 3.1's and 3.2's: the call is the whole reply, its arguments under "parameters"
    ("""{{- '{"name": "' + tool_call.name + '", ' }}\n        {{- '"parameters": ' }}""", BARE),
    ("""Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.""",
     BARE),
    ("""{"name": "get_weather", "description": "The weather in a city, as the service reports it for today and the
     days after", "parameters": {}}""", None),  # a tool's definition, its "parameters" far from its name
    (BARE_TOOL_TEMPLATE, BARE),
])
def test_a_template_lets_the_model_choose_where_it_writes_json_calls_after_the_tag(template, written):
    """engine.template_tool_calls: the tag followed by {"name" (through the template's own syntax, escaped quotes or
    newlines), or by a list of such calls ("[" first: Falcon3's and Apriel's), not by another format between the same
    tags; without a tag, {"name" soon followed by "parameters" (Llama's)."""
    from bitnet_cli.engine import ToolCallFormat, template_tool_calls

    found = template_tool_calls(template)
    tag = written and written[0]
    assert found == (None if written is None else ToolCallFormat(tag, tag.replace("<", "</"), *written[1:]))


@pytest.mark.parametrize("pieces, content, calls, written", [
    (["Sure", ",", " ", "\n", "<", "tool", "_call>", "\n{", '"name": "move", "arguments": {"to"', ": 3}", "}"],
     "Sure,", [("move", '{"to": 3}')], EACH),
    (["a ", "<tool", "_ca", "ll", "<b", " ", "\n"], "a <tool_call<b \n", [], EACH),  # the tag begun, not finished
    (["<tool_call>", '{"name": "wait", "arguments": {}', "}", "\n</tool", "_call>\n", "<tool_call>", '\n{"name"',
      ': "move", "arguments": {"to": "</tool_call><tool_call>"}}', "\n</tool_call>"],
     None, [("wait", "{}"), ("move", '{"to": "</tool_call><tool_call>"}')], EACH),
    # listed (Falcon3's form): the calls as the items of one list; brackets, braces and commas inside strings
    (["Ok", " <tool_call>", "\n[", '\n  {"name": "wait", "arguments": {}', "},", ' {"name": "move", "arg',
      'uments": {"to": "]}, {\\"["}}', "\n]", "\n</tool_call>"],
     "Ok", [("wait", "{}"), ("move", '{"to": "]}, {\\"["}')], LISTED),
    (["<tool_call>[", '{"name": "move", "arguments": {"to": [1, {"a": "}"}]}}', "]"],
     None, [("move", '{"to": [1, {"a": "}"}]}')], LISTED),
    # tag-less (Llama's): a reply that opens with "{" past its space is one call, under "parameters"
    (["\n ", '{"na', 'me": "move", "par', 'ameters": {"to": "}"', "}", "}", "\n"],
     None, [("move", '{"to": "}"}')], BARE),
    (["Sure", ': {"name": "move", "parameters": {}}'], 'Sure: {"name": "move", "parameters": {}}', [], BARE),
    ([" ", " "], "  ", [], BARE),
])
def test_chosen_calls_are_split_from_the_content_before_them_whole_and_streamed(pieces, content, calls, written):
    """Where the model chooses (a tag), the reply's text is taken apart into the content before the first tag (its
    space dropped) and the calls after it, each closed by the JSON (a tag inside a string is the call's). Streamed,
    the content's end is held back while it may begin the tag, and what the deltas carry joins up to the whole
    reply's content and calls, however the pieces cut the tags. Without a tag, a reply that opens with "{" is a call
    and any other is text, however much JSON follows."""
    from types import SimpleNamespace

    from bitnet_cli.engine import ToolCallFormat
    from bitnet_cli.serve.app import ChatRequest, _Chat
    from bitnet_cli.serve.scheduler import DoneEvent, TokenEvent

    req = ChatRequest(messages=[{"role": "user", "content": "x"}], tools=[
        {"type": "function", "function": {"name": name}} for name in ("move", "wait")])
    server = SimpleNamespace(model_id="m", scheduler=SimpleNamespace(piece=str))
    written = ToolCallFormat(written[0], written[0].replace("<", "</"), *written[1:])
    reply = _Chat(server, req, [[1]], [None], req.called_functions, written)
    deltas = [reply.first_chunk(0)["choices"][0]["delta"]]
    for event in [TokenEvent(piece, 7) for piece in pieces] + [DoneEvent("stop", 1, len(pieces), 0)]:
        reply.take(0, event)
        chunk = reply.chunk(0, event)
        deltas += [chunk["choices"][0]["delta"]] if chunk else []
        sent = "".join(d.get("content") or "" for d in deltas)
        assert content is None or content.startswith(sent), (sent, content)  # nothing sent is taken back
    whole = reply.choice(0)
    assert whole["message"]["content"] == content
    assert "".join(d.get("content") or "" for d in deltas) == (content or "")
    streamed = {}
    for call in [c for d in deltas for c in d.get("tool_calls") or []]:
        if "id" in call:  # a call's first delta names it, once
            assert call["index"] == len(streamed) and call["id"] not in [c[0] for c in streamed.values()]
            streamed[call["index"]] = [call["id"], call["function"]["name"], ""]
        streamed[call["index"]][2] += call["function"]["arguments"]
    assert [tuple(c[1:]) for c in streamed.values()] == calls
    if not calls:
        assert "tool_calls" not in whole["message"] and whole["finish_reason"] == "stop"
    else:
        assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]] \
            == [tuple(c) for c in streamed.values()]
        assert whole["finish_reason"] == "tool_calls"


def test_penalties_and_logit_bias_are_bitnet_run_s(server, engine):
    """frequency_penalty, presence_penalty and logit_bias give the text Engine.generate gives with them, greedy and
    seeded, in completions and chat (which had refused anything but their neutral values)."""
    model = server.info["model"]
    ids = engine.encode("ROMEO:")
    greedy, _ = alone(engine, ids, max_tokens=20, temperature=0)
    first = engine.encode(greedy, add_bos=False)[0]
    kw = dict(frequency_penalty=1.2, presence_penalty=-0.3, logit_bias={first: -100, 7: 2.5})
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=3)):
        want, _ = alone(engine, ids, max_tokens=20, top_k=0, top_p=1.0, **sampling, **kw)
        r = server.client.completions.create(model=model, prompt=ids, max_tokens=20, **sampling, **{
            **kw, "logit_bias": {str(t): b for t, b in kw["logit_bias"].items()}})
        assert r.choices[0].text == want and want != greedy
    messages = [{"role": "user", "content": "Hello"}]
    want, _ = alone(engine, render_chat(engine, messages), max_tokens=12, temperature=0, **kw)
    r = server.client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                              frequency_penalty=1.2, presence_penalty=-0.3,
                                              logit_bias={str(first): -100, "7": 2.5})
    assert r.choices[0].message.content == want


def test_echo_with_logprobs_scores_the_prompt(server, engine):
    ids = engine.encode("KING HENRY:\nMy lord", add_bos=False)
    r = server.client.completions.create(model=server.info["model"], prompt=ids, max_tokens=1, temperature=0,
                                         logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    logits = engine.forward(ids).astype(np.float64)
    logsm = logits - logits.max(1, keepdims=True)
    logsm -= np.log(np.exp(logsm).sum(1, keepdims=True))
    want = [logsm[i - 1, ids[i]] for i in range(1, len(ids))] + [logsm[-1].max()]  # greedy: the best
    np.testing.assert_allclose(lp.token_logprobs[1:], want, rtol=0, atol=1e-9)
    assert all(len(t) <= 3 and max(t.values()) >= v - 1e-12 for t, v in zip(lp.top_logprobs[1:], want))
    assert r.choices[0].text.startswith(engine.decode(ids))


# ---------------------------------------------------------------- bad requests


def test_bad_requests_get_openai_errors_not_tracebacks(server, engine):
    http, model = server.http, server.info["model"]
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
        (json.dumps({"prompt": [], "max_tokens": 1}).encode(), 400, "prompt"),
        (json.dumps({"prompt": [10**6]}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x" * (1 << 20)}).encode(), 400, "prompt"),  # 1 MB: past the context
        (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "model"),
        (json.dumps({"prompt": "x", "seed": -1}).encode(), 400, "seed"),  # once killed the scheduler thread
        (b'{"prompt": "a\\udcffb"}', 400, "prompt"),  # a lone surrogate: was a 500 and a traceback in the log
        (b'{"prompt": "x", "stop": ["\\udcff"]}', 400, "stop"),  # could never match: was silently no stop at all
        (b"[" * 100_000 + b"]" * 100_000, 400, None),  # nested past Python's recursion limit: was a 500 and a traceback
        (b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),  # was "should be less than or equal to 2"
        (json.dumps({"prompt": [[5]] * 81, "max_tokens": 1}).encode(), 400, "prompt"),  # > 16 slots + 64 queued
        (json.dumps({"prompt": "x", "logit_bias": {"5": 101}}).encode(), 400, "logit_bias"),
        (json.dumps({"prompt": "x", "logit_bias": {"99999999": 1}}).encode(), 400, "logit_bias"),  # not a token id
        (json.dumps({"prompt": "x", "frequency_penalty": 2.5}).encode(), 400, "frequency_penalty"),
        # asked-for sampling the server does not do: refused (was ignored: results without it)
        (json.dumps({"prompt": "x", "best_of": 3}).encode(), 400, "best_of"),
        (json.dumps({"prompt": "x", "suffix": "end"}).encode(), 400, "suffix"),
    ]
    for body, status, param in cases:
        r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body[:40], r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and "Traceback" not in r.text
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text  # was silently none
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "logit_bias": {}, "best_of": 1, "suffix": ""})
    assert r.status_code == 200, r.text  # their neutral values are fine
    r = http.post("/v1/completions", content=b'{"prompt": "x", "top_p": Infinity}')
    assert "finite" in r.json()["error"]["message"], r.text
    r = http.post("/tokenize", content=b'{"prompt": "\\udcff"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = http.post("/v1/completions", json={"prompt": "x" * (1 << 20)})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    assert http.get("/v1/nothing").status_code == 404 and http.get("/v1/completions").status_code == 405
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model=model, prompt="x", max_tokens=-5)
    assert server.client.completions.create(model=model, prompt="x", max_tokens=2).choices  # still serving


def test_a_seed_numpy_refuses_fails_its_job_and_the_scheduler_keeps_serving(packed):
    # the HTTP layer refuses a negative seed; the scheduler (the Python API) must not die on one either
    from bitnet_cli.sampling import SamplingParams
    from bitnet_cli.serve.scheduler import DoneEvent, ErrorEvent, Job, Scheduler
    with Engine.load(packed, threads=1) as eng:
        sched = Scheduler(eng, 2, 4)
        try:
            events: dict[str, list] = {"bad": [], "good": []}
            done = {k: threading.Event() for k in events}

            def sink(key):
                def put(event):
                    events[key].append(event)
                    if isinstance(event, (DoneEvent, ErrorEvent)):
                        done[key].set()
                return put
            ids = eng.encode("ROMEO:")
            sched.submit([Job(ids, 2, SamplingParams(0.8, 0, 1.0, 1.0), -1, sink("bad"))])
            assert done["bad"].wait(10)
            assert isinstance(events["bad"][-1], ErrorEvent) and "seed -1" in events["bad"][-1].message
            sched.submit([Job(ids, 2, SamplingParams(0.8, 0, 1.0, 1.0), 1, sink("good"))])
            assert done["good"].wait(10), "the scheduler thread died"
            assert isinstance(events["good"][-1], DoneEvent) and events["good"][-1].completion_tokens == 2
        finally:
            sched.close()


# ---------------------------------------------------------------- slots, queue, shutdown


@pytest.fixture(scope="module")
def long_model(tmp_path_factory, test_tokenizer_dir):
    """The same small shape with a 4096-token context: a long generation outlasts the test's steps."""
    root = tmp_path_factory.mktemp("serve_long")
    ckpt = make_hf_checkpoint(root / "ckpt", test_tokenizer_dir, max_position_embeddings=4096,
                              torch_dtype="float16", initializer_range=0.02)
    pack_checkpoint(ckpt, root / "model.bin")
    return root / "model.bin"


def wait_until(check, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_frees_the_slot_full_queue_is_503_and_sigterm_drains(long_model):
    s = Served(long_model, "--threads", "1", "--parallel", "1", "--max-queue", "0")
    try:
        model = s.info["model"]
        long = dict(model=model, prompt="ROMEO:", max_tokens=4000, temperature=0)
        # a client that goes away mid-stream frees its slot long before its 4000 tokens
        stream = s.client.completions.create(**long, stream=True)
        next(iter(stream))
        assert s.health()["busy"] == 1
        # the only slot is taken and no one may wait: 503, in OpenAI's shape
        r = s.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded"
        assert r.json()["error"]["message"].startswith("1 of 1 slots are busy and 0 sequences wait")
        # more sequences than the server ever takes at once: no retry helps, so 400 (was 503, "all slots busy")
        r = s.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        with pytest.raises(openai.InternalServerError):
            s.client.completions.create(model=model, prompt="x", max_tokens=1)
        stream.close()
        assert wait_until(lambda: s.health()["busy"] == 0)
        assert s.health()["generated_tokens"] < 3000
        # so does one that gives up waiting for a whole (not streamed) answer
        with pytest.raises(httpx.ReadTimeout):
            s.http.post("/v1/completions", json={**long, "ignore_eos": True}, timeout=0.5)
        assert wait_until(lambda: s.health()["busy"] == 0)
        assert s.health()["generated_tokens"] < 6000
        assert s.client.completions.create(model=model, prompt="x", max_tokens=2).choices
        # SIGTERM while a request is in flight: it completes, then the server exits 0
        stream = s.client.completions.create(**{**long, "max_tokens": 300}, stream=True)
        chunks = iter(stream)
        next(chunks)
        s.proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"
        assert s.proc.wait(timeout=30) == 0
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_a_signal_once_the_start_up_line_is_out_stops_the_server_cleanly(packed):
    """SIGTERM from ready() on (the start-up line) drains and returns, with the caller's handler back after. It was
    raised where the program was, and raised in a weakref callback Python ignored it: the server ran on (CI, once)."""
    script = """if True:
        import os, signal, sys
        from bitnet_cli.cli import _raise_terminated
        from bitnet_cli.serve.server import serve
        signal.signal(signal.SIGTERM, _raise_terminated)  # as the CLI does
        serve(sys.argv[1], port=0, threads=1, ready=lambda info: os.kill(os.getpid(), signal.SIGTERM))
        print("stopped", signal.getsignal(signal.SIGTERM) is _raise_terminated)
        """
    done = subprocess.run([sys.executable, "-c", script, str(packed)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout) == (0, "stopped True\n"), done.stderr


def test_bad_options_fail_cleanly(packed):
    for args, message in [(["--parallel", "0"], "error: --parallel must be a positive integer"),
                          (["--threads", "0"], "error: --threads must be a positive integer"),
                          (["--ctx-size", "100000"], "error: --ctx-size must be between 1 and"),
                          (["--max-queue", "-1"], "error: --max-queue must be >= 0"),
                          (["--kv-cache", "f8"], "error: --kv-cache must be one of f32, f16, got 'f8'"),
                          (["--host", "no such host"], "error: --host 'no such host':"),
                          # JSON holds only text: was a clean start, then a 500 for every request
                          (["--name", "n\udcff"], "error: --name is not valid UTF-8 text (byte 0xff at character 1)"),
                          (["--api-key", "two words"], "error: the API key must be 1 to 512 printable ASCII"),
                          (["--lookup", "99"], "error: --lookup must be an integer from 0 (off) to 64")]:
        r = subprocess.run([sys.executable, "-m", "bitnet_cli.cli", "serve", str(packed), "--port", "0", *args],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    busy = Served(packed, "--threads", "1", "--parallel", "1")
    try:
        port = busy.info["url"].rsplit(":", 1)[1].split("/")[0]
        r = subprocess.run([sys.executable, "-m", "bitnet_cli.cli", "serve", str(packed), "--port", port],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "cannot listen" in r.stderr and "Traceback" not in r.stderr
    finally:
        assert busy.stop() == 0


def test_metrics_are_the_health_figures_in_prometheus_text(server):
    server.client.completions.create(model=server.info["model"], prompt="ROMEO:", max_tokens=3, temperature=0)
    health, r = server.health(), server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            name, labels = name_labels.split("{", 1)
            assert labels == f'model="{server.info["model"]}"}}'
            samples[name] = float(value)
    assert samples["bitnet_generated_tokens_total"] == health["generated_tokens"] >= 3
    assert samples["bitnet_slots"] == health["slots"] == 16
    assert samples["bitnet_engine_seconds_total"] == pytest.approx(health["engine_seconds"], abs=1e-6)
    assert {f"# TYPE {n} counter" for n in samples if n.endswith("_total")} <= set(r.text.splitlines())
    from bitnet_cli.serve.app import SCHEDULER_FIGURES

    assert len(samples) == len(SCHEDULER_FIGURES) == 11


def test_an_api_key_guards_every_endpoint_but_health(packed):
    for args, env in [(["--api-key", "s3cret-key"], None), ([], {"BITNET_API_KEY": "s3cret-key"})]:
        s = Served(packed, "--threads", "1", "--parallel", "1", *args, env=env, api_key="s3cret-key")
        try:
            assert s.info["api_key"] is True
            r = s.client.completions.create(model=s.info["model"], prompt="ROMEO:", max_tokens=2, temperature=0)
            assert r.usage.completion_tokens == 2
            assert s.http.get("/health").status_code == 200
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize"),
                                 ("GET", "/no/such/path")]:
                for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}]:
                    r = s.http.request(method, path, headers=headers, json={"prompt": "x"})
                    assert r.status_code == 401, (path, headers)
                    assert r.json()["error"]["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=s.url, api_key="wrong", max_retries=0).models.list()
        finally:
            assert s.stop() == 0
    open_server = subprocess.run([sys.executable, "-m", "bitnet_cli.cli", "serve", str(packed), "--host", "0.0.0.0",
                                  "--port", "0", "--parallel", "0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "without --api-key" in open_server.stderr  # the warning comes before the options are refused


def test_a_file_name_that_is_not_utf8_is_served_as_text():
    from bitnet_cli.serve.server import served_name

    assert served_name(Path("/m/a\udcffb.bin"), None) == "a\ufffdb"  # os.fsdecode's escape of byte 0xff
    assert served_name(Path("/m/a.bin"), "") == "a" and served_name("a.bin", "mine") == "mine"


def test_serving_never_imports_torch(packed):
    code = f"""
import sys
from starlette.testclient import TestClient
from bitnet_cli.engine import Engine
from bitnet_cli.serve.app import Server
from bitnet_cli.serve.scheduler import Scheduler
eng = Engine.load({str(packed)!r}, threads=1)
with TestClient(Server(eng, Scheduler(eng, 2, 2), "m").app) as c:
    assert c.post("/v1/completions", json={{"prompt": "hi", "max_tokens": 3}}).status_code == 200
    chat = {{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 3, "stream": True}}
    assert c.post("/v1/chat/completions", json=chat).status_code == 200
assert "torch" not in sys.modules, "serving imported torch"
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------- lm-eval through the server


def test_lm_eval_local_completions_scores_like_bitnet_eval(server, packed, shared_data):
    """lm-eval's own OpenAI-API model, tokenising through the server's /tokenize, on 50 ARC-Easy
    questions: the same log-likelihoods and accuracy as the in-process adapter (`bitnet eval`)."""
    lm_eval = pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from bitnet_cli.eval.adapter import BitNetLM
    from bitnet_cli.eval.tasks import task_manager

    def run(model, model_args):
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["arc_easy"], limit=50,
                                       log_samples=True, task_manager=task_manager(shared_data / "eval"))

    args = {"base_url": server.url + "/completions", "model": server.info["model"], "num_concurrent": 8,
            "max_retries": 1, "max_length": 512}
    served = run("local-completions", args)
    local = lm_eval.simple_evaluate(model=BitNetLM(pretrained=str(packed), threads=1), tasks=["arc_easy"],
                                    limit=50, log_samples=True, task_manager=task_manager(shared_data / "eval"))
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"]["arc_easy"][metric] == local["results"]["arc_easy"][metric]
    a = [r[0] for s in served["samples"]["arc_easy"] for r in s["filtered_resps"]]
    b = [r[0] for s in local["samples"]["arc_easy"] for r in s["filtered_resps"]]
    assert len(a) == len(b) >= 150
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_the_load_benchmark_runs_end_to_end(packed, tmp_path):
    """benchmarks/serve_load.py on the small model: every level's streams get all their tokens, in
    both mixes; the engine steps and the bytes per slot are measured, here for an f16 KV cache."""
    r = subprocess.run([sys.executable, "benchmarks/serve_load.py", "--model", str(packed), "--threads", "1",
                        "--mix", "8x5,3x9", "--streams", "1,3", "--requests", "2", "--ctx-size", "64",
                        "--steps", "1,3", "--step-repeats", "2", "--kv-cache", "f16", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "serve_load.json").read_text())
    assert [(m["prompt"], m["generate"]) for m in res["mixes"]] == [(8, 5), (3, 9)]
    for mix, generate in zip(res["mixes"], (5, 9)):
        rows = mix["servers"]["bitnet serve"]
        assert [row["streams"] for row in rows] == [1, 3]
        assert [row["generated_tokens"] for row in rows] == [2 * generate, 6 * generate]
        assert all(row["short_requests"] == 0 for row in rows)
        assert all(0 < row["engine"]["busy"] <= 1 and row["engine"]["steps"] >= generate - 1 for row in rows)
        assert isinstance(mix["bytes_per_slot"], int)
    assert res["meta"]["kv_bytes_per_slot"] == res["meta"]["kv_bytes_per_token"] * 64
    with Engine.load(packed, threads=1, kv_cache="f16") as eng:
        assert res["meta"]["kv_cache"] == "f16" and res["meta"]["kv_bytes_per_token"] * eng.ctx_size == \
            eng.kv_bytes_per_sequence
    assert [row["rows"] for row in res["engine_steps"]["rows"]] == [1, 3]
    assert res["e2e"]["pp128"] > 0 and res["e2e"]["tg64"] > 0 and res["e2e"]["repeats"] == 2
    report = (tmp_path / "SERVE_LOAD.md").read_text()
    assert "| bitnet serve | 3 |" in report and "## Engine steps" in report and "## Without the server" in report


def test_the_load_benchmark_reads_the_engine_share_of_a_level_from_the_counters():
    serve_load = load_benchmark("serve_load")
    before = {"engine_steps": 10, "engine_seconds": 1.0, "decode_rows": 30, "prompt_rows": 64}
    after = {"engine_steps": 30, "engine_seconds": 4.0, "decode_rows": 190, "prompt_rows": 96}
    assert serve_load.engine_share(before, after, 5.0) == {"busy": 0.6, "steps": 20, "decode_rows_per_step": 8.0,
                                                            "prompt_rows": 32}
    assert serve_load.engine_share(None, None, 5.0) is None  # llama-server: no counters


def test_the_load_benchmark_s_steady_rate_leaves_out_ramp_up_and_tail():
    serve_load = load_benchmark("serve_load")
    req = lambda *times: {"arrivals": list(times)}  # noqa: E731
    # stream 0 starts at 1 and ends at 9; stream 1 (two requests) gets its first token at 3, ends at 12:
    # the window (3, 9] holds 0's tokens at 5, 7, 9 and 1's at 4, 6 and 8 (1, 10 and 12 are outside, 3 opens it)
    results = [[req(1, 5, 7, 9)], [req(3, 4), req(6, 8, 10, 12)]]
    assert serve_load.steady_rate(results) == 1.0
    # one stream done before the other began: no window
    assert serve_load.steady_rate([[req(1, 2)], [req(3, 4)]]) is None
    assert serve_load.steady_rate([[req(1, 2)], [req()]]) is None


def test_the_load_benchmark_states_issue_16s_targets_as_ratios():
    serve_load = load_benchmark("serve_load")
    level = lambda streams, rate, ttft: {"streams": streams, "tokens_per_s": rate, "ttft_ms_p50": ttft}  # noqa: E731
    mix = {"servers": {"bitnet serve": [level(1, 20.0, 300.0), level(8, 50.0, 2000.0), level(16, 60.0, 3000.0)],
                       "llama-server": [level(1, 15.0, 700.0), level(8, 25.0, 5000.0)]}}
    t = serve_load.targets(mix, {"pp128": 80.0, "tg64": 30.0})
    assert t == {"x8_over_1": 2.5, "x16_over_pp": 0.75, "x8_over_llama_server": 2.0,
                 "ttft_p50_ms_8": {"ours": 2000.0, "llama-server": 5000.0}}
    line = serve_load.targets_line(t)
    assert "8 streams 2.50x one stream (target >= 2.5x)" in line
    assert "16 streams 0.75 of pp128 (target >= 0.75)" in line
    assert "2.00x llama-server's tokens/s (target >= 1.5x), TTFT p50 2000.0 ms against 5000.0 ms" in line
    # levels that did not run give no ratio, and no line at all when none is left
    assert serve_load.targets({"servers": {"bitnet serve": [level(1, 20.0, 300.0)]}}, None) == {}
    assert serve_load.targets_line({}) == ""
