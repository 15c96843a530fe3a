"""The C engine against transformers' BitNetForCausalLM and the numpy reference, on random tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_hf_reference, make_hf_checkpoint

from bitnet_cli import kernels
from bitnet_cli.engine import Engine, rope_tables
from bitnet_cli.errors import BitnetError
from bitnet_cli.pack import PackedModel, pack_checkpoint, reference
from bitnet_cli.pack.embeddings import decode

# f16 checkpoints: the packed f16 embedding is then bit-identical to what transformers reads.
# initializer_range 0.1 makes logits peaky enough that greedy choices have clear margins.
# The engine rescales each exact integer dot product once (acc / s * gamma); transformers sums
# float products (xq/s) * (T/s_w). The two differ by float rounding (~1e-7), which is invisible
# unless an activation sits within that distance of an int8 rounding boundary: then one int8 value
# differs by 1, and on a random net the change grows to ~0.05 in the logits. transformers' own
# eager and sdpa attention disagree with each other the same way on such models. The seeds here
# sit on no boundary; the numpy reference (same arithmetic as the engine) is checked on all of them.
SHAPES = {
    "tiny": dict(),
    # hidden not a multiple of 64 or 128, one KV head, untied head, FFN not a multiple of 128
    "odd": dict(hidden_size=100, num_attention_heads=5, num_key_value_heads=1, intermediate_size=150,
                tie_word_embeddings=False),
    # head_dim 16, 15 query heads sharing 3 KV heads, hidden > 128 with a ragged block
    "gqa": dict(hidden_size=240, num_attention_heads=15, num_key_value_heads=3, intermediate_size=260),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def model(request, tmp_path_factory, test_tokenizer_dir):
    """(HF checkpoint dir, packed file) for one shape."""
    tmp = tmp_path_factory.mktemp(request.param)
    ckpt = make_hf_checkpoint(tmp / "hf", test_tokenizer_dir, torch_dtype="float16", initializer_range=0.1,
                              seed=0, **SHAPES[request.param])
    out = tmp / "model.bin"
    pack_checkpoint(ckpt, out)
    return ckpt, out


def random_ids(n, vocab=389, seed=0):
    return [int(i) for i in np.random.default_rng(seed).integers(2, vocab, n)]


def hf_logits(ckpt, ids):
    with torch.no_grad():
        return load_hf_reference(ckpt)(torch.tensor([ids])).logits[0].numpy()


def test_logits_match_transformers_and_numpy_reference(model):
    ckpt, packed = model
    ids = random_ids(32)
    with Engine.load(packed, threads=2) as eng:
        got = eng.forward(ids)
    assert got.shape == (32, eng.vocab_size)
    with PackedModel.open(packed) as pm:
        assert np.abs(got - reference.forward(pm, ids)).max() < 1e-3
    # Against transformers, an activation that lands within an ulp of an int8 rounding boundary
    # can round the other way (torch sums in another order; its own eager and sdpa attention
    # disagree the same way), and the random net amplifies that one flip. Positions before the
    # first flip agree to ~1e-6; every position is within 1e-3 unless a flip happened at all.
    err = np.abs(got - hf_logits(ckpt, ids)).max(axis=-1)
    assert np.median(err) < 1e-3 and err.max() < 0.2, err


def test_greedy_generation_matches_transformers(model):
    ckpt, packed = model
    prompt = random_ids(5, seed=1)
    hf = load_hf_reference(ckpt)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    with Engine.load(packed, threads=2) as eng:
        eng.stop_token_ids = set()  # transformers was told not to stop either
        gen = eng.generate(prompt, max_tokens=64, temperature=0)
        text = "".join(gen)
    assert gen.token_ids == out and len(out) == 64
    assert text == eng.decode(out)
    assert gen.stats.stop_reason == "max_tokens" and gen.stats.generated_tokens == 64


def test_kv_cache_continuation_and_rewind(tiny_packed):
    _, packed = tiny_packed
    ids = random_ids(40, seed=2)
    with Engine.load(packed, threads=2) as eng:
        full = eng.forward(ids)
        # a shared context once, then two continuations scored from its cache
        eng.forward(ids[:25])
        a = eng.forward(ids[25:], n_past=25)
        b = eng.forward([7, 8, 9], n_past=25)
        c = eng.forward(ids[25:], n_past=25, all_logits=False)
        step = [eng.forward([t], n_past=i)[0] for i, t in enumerate(ids[:10])]  # token by token decode
        with pytest.raises(BitnetError, match="positions are cached"):
            eng.forward([1], n_past=11)
    np.testing.assert_allclose(a, full[25:], atol=1e-5)
    np.testing.assert_allclose(c[0], full[-1], atol=1e-5)
    assert b.shape == (3, eng.vocab_size)
    np.testing.assert_allclose(np.stack(step), full[:10], atol=1e-5)


def test_branches_in_one_pass_match_separate_continuations(tiny_packed):
    _, packed = tiny_packed
    context = random_ids(30, seed=6)
    # different lengths, a single token, and together more than one prefill chunk of 64
    branches = [random_ids(n, seed=7 + n) for n in (12, 1, 40, 25)]
    with Engine.load(packed, threads=2) as eng:
        eng.forward(context)
        want = [eng.forward(b, n_past=len(context)) for b in branches]
        got = eng.forward_branches(len(context), branches)
        assert eng._cached == context  # the branches' keys/values are no one sequence
        again = eng.forward(branches[0], n_past=len(context))  # the context's cache is intact
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
    np.testing.assert_allclose(again, want[0], atol=1e-5)


def test_branches_bad_arguments_are_clear_errors(tiny_packed):
    _, packed = tiny_packed
    with Engine.load(packed, threads=1, ctx_size=32) as eng:
        eng.forward(random_ids(10))
        with pytest.raises(BitnetError, match="positions are cached"):
            eng.forward_branches(11, [[1, 2]])
        with pytest.raises(BitnetError, match="do not fit the context of 32"):
            eng.forward_branches(10, [random_ids(12), random_ids(11)])
        with pytest.raises(BitnetError, match="at least one token"):
            eng.forward_branches(10, [[1], []])
        with pytest.raises(BitnetError, match="out of range"):
            eng.forward_branches(10, [[1], [10**6]])
        assert eng.forward_branches(10, [random_ids(11), random_ids(11)])[1].shape == (11, eng.vocab_size)


def test_long_prompt_runs_in_several_prefill_chunks(tiny_packed):
    _, packed = tiny_packed
    ids = random_ids(150, seed=4)  # > 2 chunks of 64
    with Engine.load(packed, threads=1) as eng:
        got = eng.forward(ids)
    with PackedModel.open(packed) as pm:
        assert np.abs(got - reference.forward(pm, ids)).max() < 1e-3


@pytest.mark.parametrize("isa", kernels.available_isas())
def test_every_isa_and_thread_count_agree(tiny_packed, isa):
    _, packed = tiny_packed
    ids = random_ids(20, seed=5)
    with Engine.load(packed, threads=1, isa="scalar") as eng:
        want = eng.forward(ids)
    for threads in (1, 3):
        with Engine.load(packed, threads=threads, isa=isa) as eng:
            got = eng.forward(ids)
        np.testing.assert_allclose(got, want, atol=1e-5)  # only the head's float summation order differs


def test_weights_in_huge_pages_give_the_same_logits(tiny_packed, monkeypatch):
    _, packed = tiny_packed
    ids = random_ids(12, seed=7)
    monkeypatch.setenv("BITNET_HUGEPAGES", "0")
    with Engine.load(packed, threads=2) as eng:
        assert not eng.huge_pages
        mapped = eng.forward(ids)
    monkeypatch.setenv("BITNET_HUGEPAGES", "1")
    with Engine.load(packed, threads=2) as eng:
        assert eng.huge_pages == kernels.huge_pages_available()
        copied = eng.forward(ids)
    np.testing.assert_array_equal(copied, mapped)


@pytest.mark.parametrize("embeddings", ["int8", "q4"])
def test_integer_head_matches_numpy_reference(tmp_path, test_tokenizer_dir, monkeypatch, embeddings):
    # Norm weights away from 1: with transformers' ones, a q4 embedding row (integers sub * q times
    # one scale) puts the first norm's output on exact int8 rounding ties (127 * n_i / n_max = k + 1/2)
    # for some token ids, where float noise picks the side (up to 9 of 16 tokens differed, seeds 0-7).
    ckpt = make_hf_checkpoint(tmp_path / "hf", test_tokenizer_dir, torch_dtype="float16", initializer_range=0.1,
                              tie_word_embeddings=False, random_norms=True)
    pack_checkpoint(ckpt, tmp_path / "m.bin", embeddings=embeddings)
    ids = random_ids(16, seed=6)
    with Engine.load(tmp_path / "m.bin", threads=2) as eng, PackedModel.open(tmp_path / "m.bin") as pm:
        got = eng.forward(ids)
        float_head = reference.forward(pm, ids)
        # An integer head takes the final hidden state quantised per token (absmax int8, like a
        # BitLinear input) and dots it exactly with the integer rows (int8 values, or q4's
        # sub * q). The reference's hidden state, read out through an identity head, gives what
        # those logits must be.
        values, w_scale = pm.tensor("lm_head.weight"), pm.tensor("lm_head.weight_scale")
        vocab, hidden = pm.dims.vocab_size, pm.dims.hidden_size
        w_int = decode([values, np.ones(vocab, np.float32)], hidden, embeddings).astype(np.int64)
        embedding = pm.embedding
        monkeypatch.setattr(pm, "embedding", lambda name="model.embed_tokens.weight", rows=slice(None): (
            np.eye(vocab, hidden, dtype=np.float32)[rows] if name == "lm_head.weight" else embedding(name, rows)))
        hq, s = reference.quantize_activations(reference.forward(pm, ids)[:, :hidden])
    want = (hq.astype(np.int64) @ w_int.T).astype(np.float32) / s * w_scale
    # Tokens agree to the float rescale, except where a hidden value of the reference lies within
    # float noise of an int8 rounding boundary (the note at the top of this file): allow one token.
    exact = np.isclose(got, want, rtol=1e-6, atol=1e-6).all(axis=1)
    assert exact.sum() >= len(ids) - 1, f"tokens {np.flatnonzero(~exact)} differ"
    # and the quantised head moves the logits by a few percent of their range at most
    assert np.abs(got - float_head).max() < 0.05 * np.abs(float_head).max()


def test_q6_head_matches_numpy_reference(tmp_path, test_tokenizer_dir, monkeypatch):
    """q6 (bitnet.h): per 256-input block the exact integer sum of scale * q * x with the hidden state
    quantised per token, the blocks' sums added in float in block order (d * sum), over x_scale.
    Each token alone (position 0), so that one whose hidden state meets an int8 rounding boundary
    inside a layer (the note at the top of this file) moves only its own logits."""
    from bitnet_cli.pack.embeddings import q6_fields

    ckpt = make_hf_checkpoint(tmp_path / "hf", test_tokenizer_dir, torch_dtype="float16", initializer_range=0.1,
                              tie_word_embeddings=False)
    pack_checkpoint(ckpt, tmp_path / "m.bin", embeddings="q6")
    ids = random_ids(16, seed=6)
    with Engine.load(tmp_path / "m.bin", threads=2) as eng, PackedModel.open(tmp_path / "m.bin") as pm:
        got = np.concatenate([eng.forward([i]) for i in ids])
        float_head = np.concatenate([reference.forward(pm, [i]) for i in ids])  # numpy's decode of the q6 rows
        vocab, hidden = pm.dims.vocab_size, pm.dims.hidden_size
        codes, scales, d = q6_fields(pm.tensor("lm_head.weight"))
        nb = codes.shape[0] // vocab
        q = (codes.astype(np.int64) - 32) * np.repeat(scales.astype(np.int64), 16, axis=1)  # [vocab * nb, 256]
        embedding = pm.embedding
        monkeypatch.setattr(pm, "embedding", lambda name="model.embed_tokens.weight", rows=slice(None): (
            np.eye(vocab, hidden, dtype=np.float32)[rows] if name == "lm_head.weight" else embedding(name, rows)))
        final = np.concatenate([reference.forward(pm, [i])[:, :hidden] for i in ids])
    hq, s = reference.quantize_activations(final)
    x = np.zeros((len(ids), nb * 256), np.int64)
    x[:, :hidden] = hq
    block_sums = np.einsum("vbi,tbi->tvb", q.reshape(vocab, nb, 256), x.reshape(len(ids), nb, 256))
    total = np.zeros((len(ids), vocab), np.float32)
    step = d.view(np.float16).astype(np.float32).reshape(vocab, nb)
    for b in range(nb):
        total = total + step[:, b] * block_sums[:, :, b].astype(np.float32)
    want = total / s
    exact = np.isclose(got, want, rtol=1e-6, atol=1e-6).all(axis=1)
    assert exact.sum() >= len(ids) - 1, f"tokens {np.flatnonzero(~exact)} differ"
    # the int8 hidden state and the 6-bit rows together move the logits by a few percent at most
    assert np.abs(got - float_head).max() < 0.05 * np.abs(float_head).max()


@pytest.mark.parametrize("isa", kernels.available_isas())
def test_q6_head_logits_within_tolerance_of_f16(isa):
    """The output head alone, on Gaussian rows with a few outliers (like a trained embedding): q6
    logits are within 3% (RMS, of the logits' spread) of the f16 head's, about what the int8 head
    costs (both quantise the hidden state to int8) and under half of q4's error; and every ISA
    gives the scalar path's q6 logits bit for bit."""
    from bitnet_cli.pack.embeddings import EMBEDDING_TYPES, encode

    ffi, lib = kernels.lib()
    rng = np.random.default_rng(3)
    vocab, hidden, tokens = 500, 2560, 5
    rows = rng.standard_normal((vocab, hidden)).astype(np.float32) * 0.02
    rows[rng.integers(0, vocab, 50), rng.integers(0, hidden, 50)] = 0.3
    h = rng.standard_normal((tokens, hidden)).astype(np.float32)

    def head(embeddings, isa_name="scalar"):
        values = encode(rows, embeddings)
        y = np.empty((tokens, vocab), np.float32)
        scale = ffi.from_buffer("float[]", values[1]) if len(values) > 1 else ffi.NULL
        assert lib.bn_head_logits(ffi.NULL, kernels.ISAS[isa_name], getattr(lib, EMBEDDING_TYPES[embeddings].c_enum),
                                  ffi.from_buffer(values[0]), scale, vocab, hidden, ffi.from_buffer("float[]", h),
                                  tokens, ffi.from_buffer("float[]", y)) == 0
        return y

    f16 = head("f16")
    q6 = head("q6", isa)
    np.testing.assert_array_equal(q6, head("q6"))
    err = {name: np.sqrt(np.mean((y - f16) ** 2)) / f16.std() for name, y in
           (("q6", q6), ("int8", head("int8")), ("q4", head("q4")))}
    assert err["q6"] < 0.03 and err["q6"] < 1.5 * err["int8"] and err["q6"] < err["q4"] / 2, err


def test_tq1_layout_gives_the_i2_logits_and_greedy_tokens(tmp_path, test_tokenizer_dir):
    """The same checkpoint packed with --layout i2 and tq1 (widths of whole 640-input blocks plus an
    i2_k128 end): on every ISA the logits are bit for bit the same, so greedy tokens are too."""
    ckpt = make_hf_checkpoint(tmp_path / "hf", test_tokenizer_dir, hidden_size=704, intermediate_size=1280,
                              num_attention_heads=11, num_key_value_heads=1)
    pack_checkpoint(ckpt, tmp_path / "i2.bin")
    pack_checkpoint(ckpt, tmp_path / "tq1.bin", ternary_layout="tq1")
    ids = random_ids(12, seed=4)
    for isa in kernels.available_isas():
        out = {}
        for layout in ("i2", "tq1"):
            with Engine.load(tmp_path / f"{layout}.bin", threads=2, isa=isa) as eng:
                eng.stop_token_ids = set()
                gen = eng.generate(ids, max_tokens=16, temperature=0)
                "".join(gen)
                out[layout] = (eng.forward(ids, all_logits=True), gen.token_ids)
        np.testing.assert_array_equal(out["tq1"][0], out["i2"][0], err_msg=isa)
        assert out["tq1"][1] == out["i2"][1] and len(out["i2"][1]) == 16, isa


def test_sampling_is_seeded_and_stops(tiny_packed):
    _, packed = tiny_packed
    with Engine.load(packed, threads=1) as eng:
        a = eng.generate("ROMEO:", max_tokens=20, seed=7, temperature=1.0)
        a_text = "".join(a)
        b_text = "".join(eng.generate("ROMEO:", max_tokens=20, seed=7, temperature=1.0))
        c = eng.generate("ROMEO:", max_tokens=20, seed=8, temperature=1.0, top_k=0, top_p=0.5, repeat_penalty=1.3)
        "".join(c)
        assert a_text == b_text
        assert a.stats.prompt_tokens == len(eng.encode("ROMEO:")) and a.stats.generated_tokens <= 20
        assert a.stats.reused_tokens == 0
        # the same prompt again reuses the cached prompt positions
        again = eng.generate("ROMEO:", max_tokens=2, seed=7, temperature=1.0)
        "".join(again)
        assert again.stats.reused_tokens == again.stats.prompt_tokens - 1
        # stop strings cut the text before them
        greedy = "".join(eng.generate("ROMEO:", max_tokens=30, temperature=0))
        stop = greedy[5:8]
        if stop.strip():
            cut = eng.generate("ROMEO:", max_tokens=30, temperature=0, stop=[stop])
            assert "".join(cut) == greedy[: greedy.find(stop)] and cut.stats.stop_reason == "stop"


def test_frequency_presence_and_bias_follow_a_naive_decoding_loop(tiny_packed):
    """generate(frequency_penalty=, presence_penalty=, logit_bias=) greedy is the argmax of each step's logits with
    OpenAI's formula applied by hand (counts over the generated tokens only), step by step through forward; a
    banned token never appears; a bad bias id or penalty is one clear error naming it."""
    _, packed = tiny_packed
    with Engine.load(packed, threads=1) as eng:
        eng.stop_token_ids = set()
        ids = eng.encode("ROMEO:")
        plain = eng.generate(ids, max_tokens=24, temperature=0)
        "".join(plain)
        banned = plain.token_ids[0]
        freq, pres, bias = 0.7, 0.4, {banned: -100.0, 5: 1.5}
        gen = eng.generate(ids, max_tokens=24, temperature=0, frequency_penalty=freq, presence_penalty=pres,
                           logit_bias=bias)
        "".join(gen)
        want, logits = [], eng.forward(ids, all_logits=False)[-1]
        for _ in range(24):
            z = logits.astype(np.float64)
            for t in set(want):
                z[t] -= freq * want.count(t) + pres
            for t, b in bias.items():
                z[t] += b
            want.append(int(np.argmax(z.astype(np.float32))))
            logits = eng.forward([want[-1]], n_past=len(ids) + len(want) - 1, all_logits=False)[-1]
        assert gen.token_ids == want and banned not in want
        assert len(set(want)) > len(set(plain.token_ids))  # the penalties spread the choice
        for kw, param in [(dict(logit_bias={eng.vocab_size: 1.0}), "logit_bias"),
                          (dict(frequency_penalty=3.0), "frequency_penalty")]:
            with pytest.raises(BitnetError) as e:
                eng.generate(ids, **kw)
            assert e.value.param == param


def test_bad_arguments_are_clear_errors(tiny_packed, tmp_path):
    _, packed = tiny_packed
    with pytest.raises(BitnetError, match="threads must be a positive integer") as e:
        Engine.load(packed, threads=0)
    assert e.value.param == "threads"  # the CLI shows it as --threads
    with pytest.raises(BitnetError, match="more than this model can use"):
        Engine.load(packed, threads=10_000)
    with pytest.raises(BitnetError, match="ctx_size must be between"):
        Engine.load(packed, ctx_size=10**6)
    with Engine.load(packed, threads=1, ctx_size=16) as eng:
        with pytest.raises(BitnetError, match="context holds 16"):
            eng.generate(random_ids(20), max_tokens=1)
        # a prompt exactly as long as the context: "16 tokens but the context holds 16" read as a contradiction
        with pytest.raises(BitnetError, match="the prompt is 16 tokens but the context holds 16, the prompt and at "
                                              "least one new token together"):
            eng.generate(random_ids(16), max_tokens=0)
        with pytest.raises(BitnetError, match="empty"):
            eng.generate("   ")
        # one stop string given as a str is that string, not a stop at each of its characters
        full = "".join(eng.generate(random_ids(4), max_tokens=8, temperature=0))
        assert full and "\x00" not in full
        never = full[-1] + "\x00"  # its first character is in the text (the old reading stopped there)
        assert "".join(eng.generate(random_ids(4), max_tokens=8, temperature=0, stop=never)) == full
        with pytest.raises(BitnetError, match="out of range"):
            eng.forward([10**6])
        gen = eng.generate(random_ids(10), max_tokens=100, temperature=0)
        "".join(gen)
        assert gen.stats.stop_reason in ("context", "eos") and len(eng._cached) <= 16
    with pytest.raises(BitnetError, match="ISA|instruction set"):
        Engine.load(packed, isa="sse9")


def test_rope_tables_match_transformers():
    from transformers import BitNetConfig
    from transformers.models.bitnet.modeling_bitnet import BitNetRotaryEmbedding

    cfg = BitNetConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    rot = BitNetRotaryEmbedding(cfg)
    pos = torch.arange(4096)[None]
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    want_cos, want_sin = cos[0, :, :32].numpy(), sin[0, :, :32].numpy()
    got_cos, got_sin = rope_tables(4096, 64, cfg.rope_parameters["rope_theta"])
    assert np.abs(got_cos - want_cos).max() < 1e-6 and np.abs(got_sin - want_sin).max() < 1e-6
