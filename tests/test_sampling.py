"""The sampler (bitnet_cli.sampling): its candidate tokens and weights against a naive full sort, and
its draws against the probabilities they should follow."""

from __future__ import annotations

import numpy as np
import pytest

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
