"""Chat templates rendered as transformers renders them (engine.render_chat): the text a model reads is the text it
was trained on."""

import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from bitnet_cli.engine import _template_turn, render_chat
from bitnet_cli.errors import BitnetError

render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather at a place <city> & 'quoted'.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Zürich, e.g."}},
                   "required": ["city"]}}}]
CONVERSATIONS = {
    "plain": [{"role": "system", "content": "Be brief & <kind>."}, {"role": "user", "content": "Hi 'there' <b>"}],
    "tools": [{"role": "user", "content": "Weather in Zürich?"},
              {"role": "assistant", "content": "", "tool_calls": [{"id": "call_abc123456", "type": "function",
                                                                   "function": {"name": "get_weather",
                                                                                "arguments": '{"city": "Zürich"}'}}]},
              {"role": "tool", "tool_call_id": "call_abc123456", "name": "get_weather", "content": '{"temp": 3}'},
              {"role": "user", "content": "Thanks"}],
}


def rendered(template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    """render_chat's text (an engine that encodes nothing: the text itself), BOS and EOS written as <s> and </s>."""
    tokens = {1: "<s>", 2: "</s>"}
    engine = SimpleNamespace(tokenizer_config={"chat_template": template}, bos_token_id=None, eos_token_id=2,
                             tokenizer=SimpleNamespace(id_to_token=tokens.get,
                                                       encode=lambda text, **_: SimpleNamespace(ids=text)),
                             pm=SimpleNamespace(path="m.bin"), encode=lambda text: text)
    return render_chat(engine, messages, tools)


def transformers_text(template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    text = render_jinja_template([[_template_turn(m) for m in messages]], tools=tools, chat_template=template,
                                 add_generation_prompt=True, bos_token="", eos_token="</s>")
    return text[0][0] if isinstance(text, tuple) else text[0]


@pytest.mark.parametrize("template", [
    "{{ tools | tojson }}|{{ messages[0].content | tojson }}",  # keys in order, no HTML escapes, no ASCII escapes
    "{{ tools[0] | tojson(indent=2) }}{{ messages | tojson(separators=(',', ':'), sort_keys=true) }}",
    "{% for m in messages %}{% if m.role == 'user' %}{% break %}{% endif %}[{{ m.content }}]{% endfor %}",
    "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{{ eos_token }}{% endfor %}",
    "{{ strftime_now('%d %b %Y') }}: {{ messages[-1].content }}",  # Llama 3's system turn's date
])
def test_what_jinja_does_otherwise_renders_as_in_transformers(template):
    """Where Jinja's defaults differ from transformers' environment: tojson (Jinja sorts the keys and escapes <>&'),
    its json.dumps arguments, {% break %}, {% generation %} and strftime_now."""
    messages = CONVERSATIONS["plain"]
    for _ in range(2):  # the date read twice, should the day turn between two readings
        if rendered(template, messages, TOOLS) == transformers_text(template, messages, TOOLS):
            break
    assert rendered(template, messages, TOOLS) == transformers_text(template, messages, TOOLS)


def test_a_template_s_own_error_is_one_error_naming_the_file():
    """raise_exception(message), as templates call it on conversations they refuse: a BitnetError with the message;
    a template that does not parse, the same."""
    refusing = "{% if messages[0].role != 'user' %}{{ raise_exception('Roles must alternate!') }}{% endif %}x"
    assert rendered(refusing, CONVERSATIONS["tools"]) == "x"
    with pytest.raises(BitnetError, match="m.bin: chat_template cannot be rendered: Roles must alternate!"):
        rendered(refusing, CONVERSATIONS["plain"])
    with pytest.raises(BitnetError, match="m.bin: chat_template cannot be rendered: .*endif"):
        rendered("{% if true %}", CONVERSATIONS["plain"])


def test_real_chat_templates_render_as_transformers_renders_them(shared_data, tmp_path):
    """Every chat template in llama.cpp's collection (../shared/anchors/llama.cpp.tar.xz, models/templates: Llama 3,
    Qwen, Mistral, Gemma, DeepSeek, GLM, Granite, Hermes, Phi, ... 70 of them), over a conversation with a system turn
    (and <, &, ' in its text) and one with tools, a call and its result: render_chat gives transformers' text. Before
    it compiled them as Jinja does by default, and 69 of the 140 texts differed (tools' keys sorted and HTML-escaped,
    no strftime_now, {% break %} or {% generation %})."""
    anchors = Path(shared_data).parent / "anchors" / "llama.cpp.tar.xz"
    if not anchors.is_file():
        pytest.skip(f"{anchors} not found")
    with tarfile.open(anchors) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("llama.cpp/models/templates/")
                   and m.name.endswith(".jinja")]
        templates = {Path(m.name).name: tar.extractfile(m).read().decode("utf-8") for m in members}
    assert len(templates) >= 60
    differ = []
    for name, template in sorted(templates.items()):
        for kind, messages in CONVERSATIONS.items():
            tools = TOOLS if kind == "tools" else None
            try:
                want = transformers_text(template, messages, tools)
            except Exception:  # noqa: BLE001 (a template transformers refuses for this conversation)
                with pytest.raises(BitnetError):
                    rendered(template, messages, tools)
                continue
            if rendered(template, messages, tools) != want:
                differ.append((name, kind))
    assert differ == []


def test_a_message_s_name_reaches_the_template():
    """OpenAI's optional ``name`` of a turn (a speaker's, or a tool result's function) reaches the template, as
    transformers passes a turn's keys; absent, the template sees no key."""
    from bitnet_cli.serve.app import ChatMessage

    template = "{% for m in messages %}{{ m.role }}{% if m.name is defined %} ({{ m.name }}){% endif %}: " \
               "{{ m.content }}\n{% endfor %}"
    turns = [ChatMessage(role="user", content="Hi", name="ann").rendered(0),
             ChatMessage(role="tool", content="3 C", tool_call_id="c1", name="get_weather").rendered(1),
             ChatMessage(role="user", content="Thanks").rendered(2)]
    assert rendered(template, turns) == "user (ann): Hi\ntool (get_weather): 3 C\nuser: Thanks\n"
    assert rendered(template, turns) == transformers_text(template, turns)
