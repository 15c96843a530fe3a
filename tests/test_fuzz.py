"""The fuzzer (bitnet_cli.fuzz): its oracle catches what it must, and a bounded campaign over every
format we read finds nothing (the slow test: about 2 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import random
import signal

import pytest

from bitnet_cli import fuzz


def judge(monkeypatch, tmp_path, body):
    """run_case on a stand-in for the CLI (the child runs `body` instead of the real app)."""
    import bitnet_cli.cli

    monkeypatch.setattr(bitnet_cli.cli, "app", lambda argv, prog_name: body())
    vm, rss = fuzz._prepare_parent()
    return fuzz.run_case(["x"], tmp_path, False, vm, rss)


def test_oracle_accepts_success_and_one_error_line(monkeypatch, tmp_path):
    assert judge(monkeypatch, tmp_path, lambda: None).kind == "ok"

    def one_error():
        import sys

        print("error: bad input", file=sys.stderr)
        raise SystemExit(1)

    o = judge(monkeypatch, tmp_path, one_error)
    assert o.ok and o.detail == "error: bad input"


def test_oracle_flags_tracebacks_signals_bad_exits_and_memory(monkeypatch, tmp_path):
    def boom():
        raise ValueError("Probabilities contain NaN")

    def two_errors():
        import sys

        print("error: one\nerror: two", file=sys.stderr)
        raise SystemExit(1)

    def hog():
        return bytearray(3 << 30)  # past the 1 GB allowance: MemoryError under RLIMIT_AS

    o = judge(monkeypatch, tmp_path, boom)
    assert (o.ok, o.kind) == (False, "traceback") and fuzz.signature(o).startswith("traceback: ValueError at")
    assert judge(monkeypatch, tmp_path, lambda: os.kill(os.getpid(), signal.SIGSEGV)).kind == "signal SIGSEGV"
    assert judge(monkeypatch, tmp_path, two_errors).kind == "exit 1"
    assert judge(monkeypatch, tmp_path, lambda: (_ for _ in ()).throw(SystemExit(3))).kind == "exit 3"
    assert judge(monkeypatch, tmp_path, hog).kind == "traceback"


def test_mutators_change_the_input_and_keep_the_safetensors_framing():
    rng = random.Random(0)
    header = {"__metadata__": {"config": json.dumps({"a": 1})}, "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    text = json.dumps(header).encode()
    data = len(text).to_bytes(8, "little") + text + b"\0" * 4
    outs = {fuzz.mutate_safetensors(data, rng, packed=True) for _ in range(50)}
    assert len(outs) > 30
    aligned = [o for o in outs if (8 + int.from_bytes(o[:8], "little")) % 64 == 0]
    assert len(aligned) > 20  # header mutations re-frame the file, the data stays 64-byte aligned


def test_request_oracle_accepts_answers_and_errors_and_flags_the_rest():
    """fuzz.judge_response: a 200 of JSON or of a stream of JSON events ending in [DONE] (or an error event), a 4xx
    or 503 with OpenAI's error object; anything else is a finding."""
    ok_stream = b'data: {"a": 1}\n\ndata: [DONE]\n\n'
    good = [(200, "application/json", b'{"id": "x"}'), (200, "text/event-stream", ok_stream),
            (200, "text/event-stream", b'data: {"a": 1}\n\ndata: {"error": {"message": "m"}}\n\n'),
            (400, "application/json", b'{"error": {"message": "bad", "param": "x"}}'),
            (503, "application/json", b'{"error": {"message": "busy"}}')]
    bad = [(500, "text/plain", b"Internal Server Error"), (200, "application/json", b"[1]"),
           (200, "text/event-stream", b'data: {"a": 1}\n\n'), (200, "text/event-stream", b"data: {oops\n\n"),
           (400, "application/json", b'{"detail": "x"}'), (400, "application/json", b'{"error": {"message": ""}}'),
           (422, "application/json", b'{"error": {"message": "m"}}'), (200, "text/event-stream", b"")]
    assert [fuzz.judge_response(*answer) for answer in good] == [None] * len(good)
    assert all(fuzz.judge_response(*answer) for answer in bad)


def test_request_cases_reach_a_server_and_its_tools(tmp_path):
    """A short campaign of mutated requests against one `bitnet serve` (its model's template writes <tool_call>, one
    call after each tag, or by the seed one list of calls or one call as the whole reply): no findings, and the seeds'
    requests themselves are answered 200 by each model (the tool calls among them included)."""
    for calls in fuzz.TOOL_TEMPLATES:
        seeds = fuzz.build_seeds(tmp_path / f"seeds_{calls}", calls=calls)
        server = fuzz.RequestServer(seeds["request"].root / "model.bin", tmp_path / f"server_{calls}.log")
        try:
            for path, body in fuzz.REQUEST_SEEDS:
                o = server.run(path.encode() + b"\n" + json.dumps(body).encode())
                assert (o.ok, o.kind) == (True, "ok"), (calls, path, o)
            o = server.run(b"/v1/chat/completions\n" + json.dumps({**fuzz.REQUEST_SEEDS[3][1], "stream": False}).encode())
            assert o.kind == "ok"
        finally:
            server.stop()
    report = fuzz.fuzz(cases=60, formats=("request",), seed=7, out=tmp_path / "findings", work=tmp_path / "work")
    assert report.executions == 60 and not report.findings, report.findings
    assert report.outcomes.get("ok", 0) >= 5 and report.outcomes.get("error", 0) >= 5, report.outcomes


@pytest.mark.slow
def test_fuzz_campaign_over_every_format_finds_nothing(tmp_path):
    """~2 minutes of mutated packed files, safetensors, shard indexes, configs, tokenizers and recipes."""
    report = fuzz.fuzz(minutes=1.75, formats=fuzz.FORMATS, seed=20261202, out=tmp_path / "findings",
                       work=tmp_path / "work")
    print(f"fuzz: {report.executions} executions, outcomes {report.outcomes}")
    assert set(report.by_format) == set(fuzz.FORMATS)
    assert report.executions >= 2 * len(fuzz.FORMATS)
    assert not report.findings, "\n".join(
        f"{sig}\n{(tmp_path / 'findings').joinpath(where).joinpath('report.txt').read_text()}"
        for sig, where in report.findings.items())
