"""Batched decoding (bn_forward_batch): several sequences in one pass give each of them, bit for
bit, the logits it gets alone through the single-sequence path that `bitnet run` takes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_hf_checkpoint

from bitnet_cli import kernels
from bitnet_cli.engine import Engine
from bitnet_cli.errors import BitnetError
from bitnet_cli.pack import pack_checkpoint

SHAPES = {
    # head rows of 96 (whole 32-blocks): the f16 head's SIMD body only
    "tiny": dict(),
    # hidden 100: the 8-wide and scalar tails of the f16 head; one KV head; untied head
    "odd": dict(hidden_size=100, num_attention_heads=5, num_key_value_heads=1, intermediate_size=150,
                tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=[(s, e) for s in sorted(SHAPES) for e in ("f16", "int8")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def packed(request, tmp_path_factory, test_tokenizer_dir):
    shape, embeddings = request.param
    tmp = tmp_path_factory.mktemp(f"batch_{shape}")
    ckpt = make_hf_checkpoint(tmp / "hf", test_tokenizer_dir, torch_dtype="float16", initializer_range=0.1,
                              **SHAPES[shape])
    pack_checkpoint(ckpt, tmp / "model.bin", embeddings=embeddings)
    return tmp / "model.bin"


def random_ids(n, seed):
    return [int(i) for i in np.random.default_rng(seed).integers(2, 389, n)]


def alone(eng, ids):
    """Logits of every position as `bitnet run` computes them: the prompt's first token, then one
    token per call (the decode path: a single-token pass and the single-row head)."""
    rows = [eng.forward(ids[:1])[0]]
    for i in range(1, len(ids)):
        rows.append(eng.forward([ids[i]], n_past=i, all_logits=False)[0])
    return np.stack(rows)


def f16_head(w, h, isa):
    ffi, lib = kernels.lib()
    y = np.empty((len(h), len(w)), np.float32)
    w16 = np.ascontiguousarray(w).view(np.uint16)
    rc = lib.bn_head_logits(ffi.NULL, kernels.ISAS[isa], lib.BN_EMB_F16, ffi.from_buffer("uint16_t[]", w16),
                            ffi.NULL, len(w), w.shape[1], ffi.from_buffer("float[]", h), len(h),
                            ffi.from_buffer("float[]", y))
    assert rc == 0
    return y


@pytest.mark.parametrize("isa", kernels.available_isas())
def test_the_f16_head_gives_a_token_the_same_logits_whatever_the_token_count(isa):
    """The f16 head's tiles (several tokens: a streaming pair, then tiles of 4, 3, 2 or 1 tokens
    over slices of 1024 inputs) sum each row as the single-token row does, bit for bit."""
    rng = np.random.default_rng(0)
    # k: the SIMD body only, its 8-wide and scalar tails, several slices and a partial one;
    # 101 rows: blocks of 48 (k < 2731) or 24 rows, ragged tiles and rows
    for k in (96, 100, 256 + 13, 1024 + 32 + 8 + 3, 2560 + 32):
        w = rng.standard_normal((101, k)).astype(np.float16)
        h = rng.standard_normal((17, k)).astype(np.float32)
        one = np.concatenate([f16_head(w, h[i:i + 1], isa) for i in range(len(h))])
        for m in (1, 2, 3, 5, 16, 17):
            np.testing.assert_array_equal(f16_head(w, h[:m], isa), one[:m], err_msg=f"k={k} m={m}")
        # the single-token row against float64: a plain sum, close up to float rounding
        want = h.astype(np.float64) @ w.astype(np.float64).T
        np.testing.assert_allclose(one, want, rtol=1e-4, atol=1e-3 * np.sqrt(k))


@pytest.mark.parametrize("threads,kv_cache", [(1, "f32"), (2, "f32"), (2, "f16")])
def test_a_batch_gives_every_sequence_its_logits_alone(packed, threads, kv_cache):
    """With either KV cache element type; the prefix copy moves the type's bytes."""
    lengths = [5, 70, 12]  # 70 crosses a prefill chunk of 64
    seqs = [random_ids(n, seed=i) for i, n in enumerate(lengths)]
    with Engine.load(packed, threads=threads, kv_cache=kv_cache) as eng:
        want = [alone(eng, ids) for ids in seqs]
        eng.set_sequences(4)
        got = [[] for _ in seqs]
        done = [0] * len(seqs)
        # prompts in pieces of different sizes, mixed with other sequences' single tokens
        schedule = [{0: 3, 2: 10}, {0: 1, 1: 40, 2: 1}, {1: 30, 0: 1}, {2: 1, 0: 1}]
        while any(d < len(s) for d, s in zip(done, seqs)):
            step = schedule.pop(0) if schedule else {i: 1 for i in range(len(seqs))}
            tokens, seq, pos = [], [], []
            for i, n in step.items():
                n = min(n, len(seqs[i]) - done[i])
                tokens += seqs[i][done[i]:done[i] + n]
                seq += [i] * n
                pos += list(range(done[i], done[i] + n))
                done[i] += n
            rows = eng.forward_batch(tokens, seq, pos, [True] * len(tokens))
            for s, r in zip(seq, rows):
                got[s].append(r)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.stack(g), w)

        # a fourth sequence starts from a copy of the second one's first 30 positions
        eng.copy_prefix(1, 3, 30)
        tail = random_ids(6, seed=9)
        rows = eng.forward_batch(tail, [3] * 6, list(range(30, 36)), [False] * 5 + [True])
        np.testing.assert_array_equal(rows[0], alone(eng, seqs[1][:30] + tail)[-1])


def test_an_f16_kv_cache_halves_the_bytes_and_stays_close_to_f32(packed):
    """f16 keys and values: half the bytes per slot (and in the memory estimate); the logits move by
    the f16 rounding only, and do move (the option reaches the C engine)."""
    from bitnet_cli.engine import context_bytes

    ids = random_ids(40, seed=3)
    with Engine.load(packed, threads=1) as f32, Engine.load(packed, threads=1, kv_cache="f16") as f16:
        assert (f32.kv_cache, f16.kv_cache) == ("f32", "f16")
        assert f16.kv_bytes_per_sequence * 2 == f32.kv_bytes_per_sequence
        a, b = alone(f32, ids), alone(f16, ids)
        assert not np.array_equal(a[1:], b[1:])
        np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max())
        assert (np.argmax(a, axis=1) == np.argmax(b, axis=1)).mean() > 0.9
        d = f32.dims
        kv = 2 * d.num_layers * d.num_kv_heads * d.head_dim * 100
        assert context_bytes(d, 100, 1) - context_bytes(d, 100, 1, "f16") == kv * 2
    for bad in ("f8", "F16", None, 16):
        with pytest.raises(BitnetError, match="kv_cache must be one of f32, f16") as e:
            Engine.load(packed, threads=1, kv_cache=bad)
        assert e.value.param == "kv_cache"  # the commands show it as --kv-cache


def test_batch_arguments_are_checked(packed):
    with Engine.load(packed, threads=1) as eng:
        eng.set_sequences(2)
        assert eng.kv_bytes_per_sequence == 2 * eng.dims.num_layers * eng.dims.num_kv_heads * eng.dims.head_dim \
            * eng.ctx_size * 4
        for tokens, seq, pos in [([1, 2], [0, 0], [0, 2]),   # a gap in one sequence's positions
                                 ([1], [2], [0]),            # no such sequence
                                 ([1], [0], [eng.ctx_size]),  # past the context
                                 ([10**6], [0], [0])]:       # no such token
            with pytest.raises(BitnetError, match="out of range"):  # the token: checked in Python, named
                eng.forward_batch(tokens, seq, pos, [True] * len(tokens))
        with pytest.raises(BitnetError, match="copy_prefix"):
            eng.copy_prefix(0, 5, 1)
        with pytest.raises(BitnetError, match="parallel must be a positive integer") as e:
            eng.set_sequences(0)
        assert e.value.param == "parallel"  # `bitnet serve` shows it as --parallel


def run_jobs(scheduler, specs):
    """Submit Jobs from (prompt, max_tokens, extra kwargs) specs; wait; [(tokens, DoneEvent)]."""
    import threading

    from bitnet_cli.sampling import SamplingParams
    from bitnet_cli.serve.scheduler import DoneEvent, Job, TokenEvent

    out = [([], None) for _ in specs]
    done = threading.Semaphore(0)

    def sink_for(i):
        def sink(ev):
            if isinstance(ev, TokenEvent) and ev.token is not None:
                out[i][0].append(ev.token)
            elif isinstance(ev, DoneEvent):
                out[i] = (out[i][0], ev)
                done.release()
        return sink

    jobs = [Job(p, n, SamplingParams(0.0, 0, 1.0), None, sink_for(i), **kw) for i, (p, n, kw) in enumerate(specs)]
    scheduler.submit(jobs)
    return jobs, out, done


def test_the_scheduler_reuses_a_prefix_from_a_free_or_a_busy_slot(tmp_path, test_tokenizer_dir):
    from bitnet_cli.serve.scheduler import Scheduler

    ckpt = make_hf_checkpoint(tmp_path / "hf", test_tokenizer_dir, torch_dtype="float16", initializer_range=0.1,
                              max_position_embeddings=512)
    pack_checkpoint(ckpt, tmp_path / "m.bin")
    base, more = random_ids(40, seed=1), random_ids(10, seed=2)
    with Engine.load(tmp_path / "m.bin", threads=1) as ref:
        want = {}
        for name, ids, n in [("base", base, 5), ("more", base + more, 6), ("long", base, 300)]:
            gen = ref.generate(ids, max_tokens=n, temperature=0)
            "".join(gen)
            want[name] = list(gen.token_ids)
    with Engine.load(tmp_path / "m.bin", threads=1) as eng:
        s = Scheduler(eng, 2, 4)
        try:
            # the same slot, free again: its cached prompt serves the longer one
            _, out, done = run_jobs(s, [(base, 5, {})])
            done.acquire(timeout=60)
            _, out2, done2 = run_jobs(s, [(base + more, 6, {})])
            done2.acquire(timeout=60)
            assert out[0][0] == want["base"] and out2[0][0] == want["more"]
            assert out2[0][1].reused_tokens == 40
            # the engine counters (/health): the first prompt in one step, then one decode row per
            # generated token that was run (the last one is not, unless an end-of-sequence followed
            # it); the second prompt prefilled only past the reused 40 tokens
            first = out[0][1]
            rows = first.completion_tokens - (first.finish_reason == "length")
            second = out2[0][1]
            rows2 = second.completion_tokens - (second.finish_reason == "length")
            assert (s.prompt_rows, s.decode_rows, s.engine_steps) == (40 + 10, rows + rows2, 2 + rows + rows2)
            assert s.engine_seconds > 0
            # a busy slot's prefix is copied into a free one while it keeps generating
            _, busy, busy_done = run_jobs(s, [(base, 300, {"ignore_eos": True})])
            _, out3, done3 = run_jobs(s, [(base + more, 6, {})])
            done3.acquire(timeout=60)
            busy_done.acquire(timeout=120)
            # 39 or 40: the busy sequence may not have run its last prompt token yet
            assert out3[0][1].reused_tokens >= 39 and out3[0][0] == want["more"]
            assert busy[0][0][:len(want["long"])] == want["long"]
        finally:
            s.close()


def test_a_constraint_that_leads_nowhere_fails_its_sequence_alone(packed):
    """A JSON constraint with no token to go on (a schema nested past the recognizer's depth) ends
    its own sequence with an error; the sequences batched with it carry on."""
    import threading

    from bitnet_cli.sampling import SamplingParams
    from bitnet_cli.serve.scheduler import DoneEvent, ErrorEvent, Job, Scheduler

    class NowhereToGo:
        def allowed(self):
            raise BitnetError("JSON output: no token of this model's vocabulary continues the JSON here")

    prompt = random_ids(12, seed=3)
    with Engine.load(packed, threads=1) as eng:
        want = eng.generate(prompt, max_tokens=8, temperature=0)
        "".join(want)
        s = Scheduler(eng, 2, 4)
        events, finished = [[], []], threading.Semaphore(0)

        def sink_for(i):
            def sink(event):
                events[i].append(event)
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    finished.release()
            return sink

        try:
            s.submit([Job(prompt, 8, SamplingParams(0.0, 0, 1.0), None, sink_for(0), constraint=NowhereToGo()),
                      Job(prompt, 8, SamplingParams(0.0, 0, 1.0), None, sink_for(1))])
            assert finished.acquire(timeout=60) and finished.acquire(timeout=60)
        finally:
            s.close()
    assert isinstance(events[0][-1], ErrorEvent) and "continues the JSON" in events[0][-1].message
    assert isinstance(events[1][-1], DoneEvent)
    assert [e.token for e in events[1] if getattr(e, "token", None) is not None] == want.token_ids
