"""Prompt lookup decoding (bitnet_cli.lookup, `generate(lookup=)`, `bitnet run --lookup`, the server's
scheduler with `bitnet serve --lookup`): the drafts against a naive search, and the generated text exactly the one
without drafts."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from bitnet_cli.errors import BitnetError
from bitnet_cli.lookup import PromptLookup


def naive_proposal(tokens: list[int], k: int) -> list[int]:
    for n in (3, 2):
        if len(tokens) < n:
            continue
        tail = tokens[-n:]
        for start in range(len(tokens) - 1, n - 1, -1):  # the latest earlier occurrence
            if tokens[start - n:start] == tail:
                return tokens[start:start + k]
    return []


def test_drafts_are_what_followed_the_latest_earlier_ngram():
    r = random.Random(0)
    for _ in range(300):
        tokens = [r.randrange(4) for _ in range(r.randint(0, 40))]
        drafts = PromptLookup()
        drafts.extend(tokens[:len(tokens) // 2])
        drafts.extend(tokens[len(tokens) // 2:])  # extending in pieces indexes the same n-grams
        for k in (0, 1, 4):
            assert drafts.propose(k) == naive_proposal(tokens, k)[:k], tokens
    drafts = PromptLookup()
    drafts.extend([5, 6, 7, 8, 5, 6])
    assert drafts.propose(3) == [7, 8, 5]


@pytest.fixture(scope="module")
def engine(tiny_packed):
    from bitnet_cli.engine import Engine

    with Engine.load(tiny_packed[1], threads=1) as eng:
        yield eng


REPEATING = "the king, the king, the king, the king, the king, the"


@pytest.mark.parametrize("lookup", [1, 3, 8])
def test_lookup_never_changes_the_text(engine, lookup):
    drafted = accepted = 0
    for prompt in ["ROMEO:", REPEATING]:
        for kw in [dict(temperature=0), dict(temperature=1.0, top_k=0, top_p=1.0, seed=4),
                   dict(temperature=0.8, seed=2, repeat_penalty=1.2), dict(temperature=0, stop=["ing"]),
                   dict(temperature=1.0, seed=1, output_format="json_object")]:
            want = engine.generate(prompt, max_tokens=60, **kw)
            want_text = "".join(want)
            got = engine.generate(prompt, max_tokens=60, lookup=lookup, **kw)
            assert "".join(got) == want_text and got.token_ids == want.token_ids, (prompt, kw)
            assert got.stats.stop_reason == want.stats.stop_reason
            assert 0 <= got.stats.accepted_tokens <= got.stats.drafted_tokens
            drafted, accepted = drafted + got.stats.drafted_tokens, accepted + got.stats.accepted_tokens
    assert accepted > 0 and drafted > accepted  # both outcomes of a draft were exercised


def test_lookup_near_the_end_of_the_context(engine):
    ids = engine.encode(REPEATING)
    ids = (ids * (engine.ctx_size // len(ids)))[: engine.ctx_size - 5]
    want = engine.generate(ids, max_tokens=20, temperature=0)
    got = engine.generate(ids, max_tokens=20, temperature=0, lookup=8)
    assert "".join(got) == "".join(want) and got.stats.stop_reason == want.stats.stop_reason
    for bad in (-1, 65, 2.0, True):
        with pytest.raises(BitnetError, match="lookup must be"):
            engine.generate("x", lookup=bad)


def test_run_lookup(tiny_packed):
    base = [sys.executable, "-m", "bitnet_cli.cli", "run", str(tiny_packed[1]), "-p", REPEATING, "-n", "40",
            "--temp", "0"]
    plain = json.loads(subprocess.run(base + ["--json"], capture_output=True, text=True, check=True).stdout)
    drafted = json.loads(subprocess.run(base + ["--json", "--lookup", "4"], capture_output=True, text=True,
                                        check=True).stdout)
    assert drafted["text"] == plain["text"] and drafted["drafted_tokens"] > 0
    shown = subprocess.run(base + ["--lookup", "4"], capture_output=True, text=True, check=True)
    assert "accepted" in shown.stderr
    bad = subprocess.run(base + ["--lookup", "-2"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.startswith("error: --lookup must be") and "Traceback" not in bad.stderr


def test_served_sequences_with_lookup_are_generate_s_without_it(engine, tiny_packed):
    """The scheduler with lookup decodes several sequences together (greedy, seeded sampling, a repeat penalty, a
    stop string, JSON output, log-probabilities; drafts hit and miss) and each gets exactly the tokens, text and
    finish of Engine.generate without drafts; /health's draft figures count what ran."""
    import threading

    from bitnet_cli.engine import Engine
    from bitnet_cli.sampling import SamplingParams
    from bitnet_cli.serve.scheduler import DoneEvent, ErrorEvent, Job, Scheduler, TokenEvent

    cases = [("ROMEO:", dict(temperature=0)), (REPEATING, dict(temperature=0)),
             (REPEATING, dict(temperature=1.0, top_k=0, top_p=1.0, seed=4)),
             (REPEATING, dict(temperature=0.8, seed=2, repeat_penalty=1.2)), (REPEATING, dict(temperature=0, stop=["ing"])),
             ("ROMEO:", dict(temperature=1.0, seed=1, output_format="json_object")), (REPEATING * 2, dict(temperature=0))]
    with Engine.load(tiny_packed[1], threads=1) as served:
        sched = Scheduler(served, 4, 8, lookup=6)
        try:
            results, done = [[] for _ in cases], [threading.Event() for _ in cases]

            def sink(i):
                def put(event):
                    results[i].append(event)
                    if isinstance(event, (DoneEvent, ErrorEvent)):
                        done[i].set()
                return put

            jobs = []
            for i, (prompt, kw) in enumerate(cases):
                params = SamplingParams(kw.get("temperature", 0.8), kw.get("top_k", 40), kw.get("top_p", 0.95),
                                        kw.get("repeat_penalty", 1.0))
                constraint = served.json_constraint() if kw.get("output_format") else None
                jobs.append(Job(served.encode(prompt), 50, params, kw.get("seed"), sink(i), stops=kw.get("stop", []),
                                logprobs=2, constraint=constraint))
            sched.submit(jobs)
            assert all(d.wait(60) for d in done)
            for (prompt, kw), events in zip(cases, results):
                want = engine.generate(prompt, max_tokens=50, **kw)
                want_text = "".join(want)
                # with log-probabilities an end-of-sequence token is listed too (no text): not a generated one
                tokens = [e.token for e in events if isinstance(e, TokenEvent) and e.token is not None
                          and e.token not in served.stop_token_ids]
                assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == want_text, (prompt, kw)
                assert tokens == want.token_ids[:len(tokens)] and len(tokens) == want.stats.generated_tokens
                finish = events[-1].finish_reason
                assert finish == {"eos": "stop", "stop": "stop", "max_tokens": "length"}[want.stats.stop_reason]
            assert sched.accepted_drafts > 0 and sched.draft_rows > sched.accepted_drafts
        finally:
            sched.close()

