"""`bitnet run` end to end: streaming, --json, seeds, chat, and clean errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bitnet_cli import kernels
from bitnet_cli.cli import app
from bitnet_cli.errors import BitnetError

runner = CliRunner()


@pytest.fixture(scope="module")
def packed(tiny_packed):
    return tiny_packed[1]


def run(*args, input=None):
    return runner.invoke(app, ["run", *map(str, args)], input=input)


def test_run_streams_text_and_is_reproducible_with_a_seed(packed):
    a = run(packed, "-p", "ROMEO:", "-n", "24", "--seed", "3", "-t", "1")
    assert a.exit_code == 0, a.output
    b = run(packed, "-p", "ROMEO:", "-n", "24", "--seed", "3", "-t", "2")
    assert a.stdout == b.stdout and a.stdout.startswith("ROMEO:") and len(a.stdout.strip()) > len("ROMEO:")
    assert "tok/s" in a.stderr and "generated" in a.stderr


def test_run_echoes_the_prompt_unless_told_not_to(packed):
    a = run(packed, "-p", "ROMEO:", "-n", "12", "--seed", "3")
    b = run(packed, "-p", "ROMEO:", "-n", "12", "--seed", "3", "--no-echo")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert a.stdout == "ROMEO:" + b.stdout and not b.stdout.startswith("ROMEO:")


def test_run_json_reports_text_and_timings(packed):
    r = run(packed, "-p", "ROMEO:", "-n", "10", "--temperature", "0", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    for key in ("text", "load_s", "time_to_first_token_s", "prompt_tokens_per_s", "generation_tokens_per_s"):
        assert key in out
    assert out["generated_tokens"] <= 10 and out["prompt_tokens"] > 1
    again = json.loads(run(packed, "-p", "ROMEO:", "-n", "10", "--temp", "0", "--json").stdout)
    assert again["text"] == out["text"]  # greedy is deterministic


def test_run_with_an_f16_kv_cache_is_the_engine_s_with_it(packed):
    from bitnet_cli.engine import Engine

    r = run(packed, "-p", "ROMEO:", "-n", "16", "--temperature", "0", "--json", "--kv-cache", "f16")
    assert r.exit_code == 0, r.output
    with Engine.load(packed, kv_cache="f16") as eng:
        assert json.loads(r.stdout)["text"] == "".join(eng.generate("ROMEO:", max_tokens=16, temperature=0))


def test_chat_answers_and_ends_on_an_empty_line(packed):
    r = run(packed, "--chat", "-n", "8", "--seed", "1", input="Hello there\nAnd again\n\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("model>") == 2
    assert r.stderr.count("generated") == 2


def test_a_chat_message_too_long_for_the_context_names_the_options(packed):
    """It said "lower max_tokens or raise ctx_size" where every other message of `run` names --ctx-size."""
    r = run(packed, "--chat", "--ctx-size", "4", input="Hello there, a message longer than four tokens\n\n")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "lower --max-tokens or raise --ctx-size" in " ".join(r.output.split()), r.output


def test_chat_outlives_its_context_keeps_the_system_prompt_and_reuses_the_cache(packed):
    """A 64-token context and eight turns: the oldest turns go, the conversation goes on."""
    turns = "".join(f"Tell me about the {w} of Verona, good friend\n" for w in
                    ("walls", "gates", "houses", "streets", "people", "rivers", "bells", "towers"))
    r = run(packed, "--chat", "-n", "6", "--seed", "1", "--ctx-size", "64", "--system", "Be brief.", input=turns)
    assert r.exit_code == 0, r.output
    assert r.stdout.count("model>") == 8 and "error" not in r.output
    assert "oldest message(s) dropped" in r.stderr and "system prompt kept" in r.stderr
    assert "reused from the cache" in r.stderr  # the turn after a turn that dropped nothing


def test_fit_chat_keeps_the_system_prompt_and_the_newest_turns(packed):
    from bitnet_cli.engine import Engine, fit_chat, render_chat

    engine = Engine.load(packed, threads=1, ctx_size=128)
    system = {"role": "system", "content": "You are brief."}
    turns = []
    for i in range(10):
        turns += [{"role": "user", "content": f"question number {i} about Verona"},
                  {"role": "assistant", "content": f"answer {i}"}]
    messages = [system, *turns[:-1]]  # ends with the newest question
    ids, dropped = fit_chat(engine, messages, reply_room=8)
    assert 0 < dropped < len(turns) - 3 and len(ids) + 8 <= 128  # more than the newest question stays
    assert ids == render_chat(engine, [system, *turns[dropped:-1]])
    assert len(render_chat(engine, [system, *turns[dropped - 2:-1]])) + 8 > 128  # one more turn would not fit
    with pytest.raises(BitnetError, match="newest message"):
        fit_chat(engine, [system, {"role": "user", "content": "Verona " * 200}], reply_room=8)


def test_chat_prints_a_newline_after_ctrl_d(packed):
    r = run(packed, "--chat", "-n", "4", "--seed", "1", input="Hello\n")  # then end of input, as Ctrl-D
    assert r.exit_code == 0, r.output
    assert r.stdout.endswith("you> \n")


def test_the_module_is_importable_without_torch(packed):
    code = ("import sys; from bitnet_cli.cli import app; "
            f"app(['run', {str(packed)!r}, '-p', 'hi', '-n', '3'], standalone_mode=False); "
            "assert 'torch' not in sys.modules, 'bitnet run imported torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_run_penalties_and_logit_bias_are_the_engine_s(packed):
    """--frequency-penalty, --presence-penalty and --logit-bias (ID=BIAS, or llama.cpp's ID+BIAS / ID-BIAS) give the
    text Engine.generate gives with them."""
    from bitnet_cli.engine import Engine

    with Engine.load(packed) as eng:
        greedy = eng.generate("ROMEO:", max_tokens=16, temperature=0)
        "".join(greedy)
        first = greedy.token_ids[0]
        want = "".join(eng.generate("ROMEO:", max_tokens=16, temperature=0, frequency_penalty=1.5,
                                    presence_penalty=0.5, logit_bias={first: -100, 9: 1.5, 11: 0.5}))
    r = run(packed, "-p", "ROMEO:", "-n", "16", "--temperature", "0", "--json", "--frequency-penalty", "1.5",
            "--presence-penalty", "0.5", "--logit-bias", f"{first}=-100", "-l", "9+1.5", "-l", "11=5e-1")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["text"] == want


@pytest.mark.parametrize("args,message", [
    (["-p", ""], "prompt is empty"),
    (["-p", "hi", "--threads", "0"], "--threads"),
    (["-p", "hi", "--threads", "100000"], "more than this model can use"),
    (["-p", "ROMEO: " * 100, "--ctx-size", "32"], "context holds 32"),
    (["-p", "hi", "--ctx-size", "0"], "--ctx-size"),
    (["-p", "hi", "--kv-cache", "bf16"], "--kv-cache must be one of f32, f16, got 'bf16'"),
    (["-p", "hi", "--top-p", "0"], "--top-p"),
    (["-p", "hi", "--temperature", "-1"], "--temperature"),
    ([], "give a prompt"),
    (["-p", "hi", "--logit-bias", "5=abc"], "--logit-bias '5=abc': expected TOKEN_ID=BIAS"),
    (["-p", "hi", "-l", "99999999=1"], "is not a token id of this model"),
    (["-p", "hi", "-l", "5=-101"], "between -100 and 100"),
    (["-p", "hi", "--frequency-penalty", "3"], "must be between -2 and 2"),
])
def test_bad_options_fail_cleanly(packed, args, message):
    r = run(packed, *args)
    assert r.exit_code != 0
    assert message in r.stderr.replace("\n", " ")
    assert "Traceback" not in r.output


def test_bad_files_fail_cleanly(packed, tmp_path):
    not_model = tmp_path / "notes.txt"
    not_model.write_text("hello, this is not a model\n" * 10)
    half = tmp_path / "half.bin"
    half.write_bytes(packed.read_bytes()[: packed.stat().st_size * 9 // 10])
    header_only = tmp_path / "tiny.bin"
    header_only.write_bytes(packed.read_bytes()[:100])
    for path in (not_model, half, header_only, tmp_path / "missing.bin", tmp_path):
        r = run(path, "-p", "hi")
        assert r.exit_code != 0, path
        assert str(path.name) in r.stderr.replace("\n", "") and "Traceback" not in r.output, r.output


def test_a_prompt_from_a_file_or_stdin_is_the_same_as_p(packed, tmp_path):
    """-f PATH and -f - (standard input) read the prompt as llama.cpp's -f does: the file's text less one trailing
    newline, so that `echo "ROMEO:" > p.txt` continues "ROMEO:", as -p "ROMEO:" does."""
    greedy = ["-n", "12", "--temperature", "0", "--json"]
    want = json.loads(run(packed, "-p", "ROMEO:\nJULIET:", *greedy).stdout)
    prompt = tmp_path / "prompt.txt"
    for ending in ("", "\n", "\r\n"):
        prompt.write_bytes(f"ROMEO:\nJULIET:{ending}".encode())
        r = run(packed, "-f", prompt, *greedy)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["text"] == want["text"] and json.loads(r.stdout)["prompt"] == "ROMEO:\nJULIET:"
    r = run(packed, "--file", "-", *greedy, input="ROMEO:\nJULIET:\n")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["text"] == want["text"]
    r = run(packed, "-f", prompt, "-n", "4", "--seed", "1")
    assert r.exit_code == 0 and r.stdout.startswith("ROMEO:\nJULIET:"), r.output  # echoed like -p


def test_bad_prompt_files_fail_cleanly(packed, tmp_path, monkeypatch):
    from bitnet_cli import files

    not_utf8, empty, large = tmp_path / "latin1.txt", tmp_path / "empty.txt", tmp_path / "large.txt"
    not_utf8.write_bytes("café".encode("latin-1"))
    empty.write_text("\n")
    large.write_text("x" * 65)
    monkeypatch.setattr(files, "PROMPT_FILE_LIMIT", 64)
    for args, message in [
        (["-f", tmp_path / "missing.txt"], "missing.txt: cannot read the prompt: "),  # the OS's words follow
        (["-f", tmp_path], f"{tmp_path}: cannot read the prompt: "),
        (["-f", not_utf8], "latin1.txt: the prompt is not UTF-8 text (byte 3 is 0xe9)"),
        (["-f", large], "large.txt: the prompt is larger than"),
        (["-f", empty], "prompt is empty"),
        (["-f", empty, "-p", "hi"], "give the prompt with -p/--prompt or -f/--file, not both"),
    ]:
        r = run(packed, *args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert r.stderr.startswith("error: ") and message in " ".join(r.stderr.split()), r.stderr
    r = run(packed, "-f", "-", input="x" * 65)
    assert r.exit_code == 1 and "standard input: the prompt is larger than" in " ".join(r.stderr.split()), r.output


def test_missing_compiled_module_says_how_to_build(monkeypatch):
    import bitnet_cli

    monkeypatch.setitem(sys.modules, "bitnet_cli._kernels", None)  # makes the import fail
    monkeypatch.delattr(bitnet_cli, "_kernels", raising=False)
    with pytest.raises(BitnetError, match="pip install"):
        kernels.lib()


def test_a_stop_text_that_is_not_utf8_is_refused(packed):
    """argv bytes that are not UTF-8 (lone surrogates in Python) can never appear in the decoded text:
    such a --stop was silently never matched."""
    from bitnet_cli.engine import stop_texts

    r = run(packed, "-p", "ROMEO:", "-n", "4", "--stop", "", "--stop", "a\udcff")
    assert r.exit_code == 1, r.output
    assert r.output.strip() == "error: --stop text 2 is not valid UTF-8 text (byte 0xff at character 1)"
    with pytest.raises(BitnetError, match=r"stop text 1 is not a string \(int\)"):
        stop_texts([3])  # a library caller's mistake, named (was a TypeError inside the stream)
    assert stop_texts("ab") == ["ab"] and stop_texts(["", "x"]) == ["x"]  # one string is one stop text
