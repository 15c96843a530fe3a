"""The sampler (bitnet_cli.sampling): its candidate tokens and weights against a naive full sort, and
its draws against the probabilities they should follow."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_cli.errors import BitnetError
from bitnet_cli.sampling import SamplingParams, candidates, sample


def naive(z: np.ndarray, params: SamplingParams) -> dict[int, float]:
    """Every token sorted (likeliest first, equal values by id), cut to top_k, then to the smallest
    set with probability >= top_p: {id: probability}."""
    ids = np.lexsort((np.arange(z.size), -z))
    if 0 < params.top_k < z.size:
        ids = ids[: params.top_k]
    with np.errstate(under="ignore"):
        p = np.exp(z[ids] - z[ids[0]])
    p /= p.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p)) + 1
        ids, p = ids[:keep], p[:keep] / p[:keep].sum()
    return {int(i): float(q) for i, q in zip(ids, p) if q > 0}


def z_of(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64)
    with np.errstate(over="ignore", under="ignore"):
        return (z - z.max()) / temperature


def logit_sets(rng):
    for size in (7, 300, 5000):
        yield rng.normal(size=size) * 3
        yield np.round(rng.normal(size=size) * 2) / 2           # many equal values: ties at every cut
        flat = np.zeros(size)
        flat[: size // 10] = 1.0                                # a flat nucleus larger than the first selection
        yield flat
        masked = rng.normal(size=size) * 5
        masked[rng.random(size) < 0.7] = -np.inf               # constrained decoding's -inf logits
        masked[0] = 0.0
        yield masked


@pytest.mark.parametrize("temperature", [1.0, 0.3, 1e-300])
def test_candidates_are_the_naive_full_sort_s(temperature):
    rng = np.random.default_rng(0)
    for logits in logit_sets(rng):
        z = z_of(logits, temperature)
        for top_k in (0, 1, 40, z.size):
            for top_p in (1.0, 0.95, 0.5, 1e-9):
                params = SamplingParams(temperature, top_k, top_p)
                ids, weights = candidates(z, params)
                ids = np.arange(z.size) if ids is None else ids
                got = {int(i): w / weights.sum() for i, w in zip(ids, weights) if w > 0}
                want = naive(z, params)
                assert got.keys() == want.keys(), (z.size, top_k, top_p)
                assert np.allclose([got[i] for i in want], list(want.values()), rtol=1e-9, atol=0)


def test_draws_follow_the_probabilities():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=30) * 1.5).astype(np.float32)
    for params in (SamplingParams(1.0, 0, 1.0), SamplingParams(0.7, 0, 0.9), SamplingParams(1.3, 5, 1.0),
                   SamplingParams(1.0, 10, 0.8)):
        want = naive(z_of(logits, params.temperature), params)
        draws = np.bincount([sample(logits, params, rng) for _ in range(20000)], minlength=30) / 20000
        assert set(np.flatnonzero(draws)) <= set(want)
        assert max(abs(draws[i] - q) for i, q in want.items()) < 0.012, params
    assert {sample(logits, SamplingParams(0.0), rng) for _ in range(5)} == {int(np.argmax(logits))}


def test_penalties_and_biases_are_openai_s_formula():
    """apply_penalties: each token's logit less frequency_penalty x its count among the generated tokens, less
    presence_penalty if it occurs, plus its bias (the prompt does not count); sample applies them after the repeat
    penalty and before the mask, so -100 bans a token and +100 all but forces it."""
    from bitnet_cli.sampling import apply_penalties, logit_bias_pairs

    rng = np.random.default_rng(5)
    logits = rng.normal(size=40).astype(np.float32)
    generated = [3, 3, 7, 3, 11]
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=-0.25, logit_bias=((7, 2.0), (20, -100.0)))
    want = logits.astype(np.float64)
    for t in set(generated):
        want[t] -= 0.5 * generated.count(t) - 0.25
    want[7] += 2.0
    want[20] -= 100.0
    np.testing.assert_array_equal(apply_penalties(logits, generated, params), want.astype(np.float32))
    assert apply_penalties(logits, [], SamplingParams()) is logits  # nothing asked: nothing copied
    top = int(np.argmax(logits))
    banned = SamplingParams(temperature=0, logit_bias=((top, -100.0),))
    assert sample(logits, banned, rng) != top
    forced = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, logit_bias=((13, 100.0),))
    assert all(sample(logits, forced, np.random.default_rng(s)) == 13 for s in range(20))
    repeated = SamplingParams(temperature=0, frequency_penalty=2.0)
    assert sample(logits, repeated, rng, generated=[top] * 30) != top
    assert logit_bias_pairs({"5": 1, 2: -3.5}, 10) == ((2, -3.5), (5, 1.0))


@pytest.mark.parametrize("bias, why", [({"10": 1}, "not a token id"), ({"-1": 1}, "not a token id"),
                                       ({"x": 1}, "not a token id"), ({True: 1}, "not a token id"),
                                       ({"3": 101}, "between -100 and 100"), ({"3": float("nan")}, "between"),
                                       ({"3": "1"}, "between"), ({str(i): 0 for i in range(1025)}, "at most 1024")])
def test_bad_logit_biases_are_clear_errors(bias, why):
    from bitnet_cli.sampling import logit_bias_pairs

    with pytest.raises(BitnetError, match=why) as e:
        logit_bias_pairs(bias, 10 if len(bias) < 1000 else 5000)
    assert e.value.param == "logit_bias"


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [2.5, -2.01, float("nan")])
def test_penalties_outside_their_range_are_clear_errors(field, value):
    with pytest.raises(BitnetError, match=f"{field} must be between -2 and 2") as e:
        SamplingParams(**{field: value}).check()
    assert e.value.param == field
