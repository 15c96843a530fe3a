"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling, with a repeat penalty, OpenAI's
frequency and presence penalties and per-token logit biases.

All randomness comes from the `numpy.random.Generator` passed in, so a seed fixes the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from bitnet_cli.errors import BitnetError

REPEAT_WINDOW = 64  # the penalty looks at this many most recent tokens (prompt included)
MAX_PENALTY = 2.0  # frequency_penalty and presence_penalty lie in [-2, 2], as OpenAI's
MAX_BIAS = 100.0  # a logit bias lies in [-100, 100], as OpenAI's (either end bans or all but forces a token)
MAX_BIASED = 1024  # tokens one request may bias


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # <= 0: greedy (argmax)
    top_k: int = 40           # 0: no limit (check() refuses a negative k)
    top_p: float = 0.95       # 1.0: no limit
    repeat_penalty: float = 1.0  # 1.0: off; > 1 discourages recent tokens
    frequency_penalty: float = 0.0  # subtracted from a token's logit once per time it was generated
    presence_penalty: float = 0.0  # subtracted from the logit of a token generated at least once
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), ids ascending

    def check(self) -> "SamplingParams":
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise BitnetError(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise BitnetError(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}", param="top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise BitnetError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if not np.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise BitnetError(f"repeat_penalty must be > 0, got {self.repeat_penalty}", param="repeat_penalty")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:  # NaN fails too
                raise BitnetError(f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, got {value}",
                                  param=name)
        return self


def logit_bias_pairs(bias: Mapping, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """A {token id: bias} mapping (ids as ints or their decimal strings, as OpenAI's JSON has them) as
    SamplingParams.logit_bias, checked: ids within the vocabulary, biases finite within +-MAX_BIAS."""
    if len(bias) > MAX_BIASED:
        raise BitnetError(f"logit_bias: at most {MAX_BIASED} tokens, got {len(bias)}", param="logit_bias")
    pairs = {}
    for key, value in bias.items():
        text = str(key).strip()
        if isinstance(key, bool) or not text.isdecimal() or not int(text) < vocab_size:
            raise BitnetError(f"logit_bias: {key!r} is not a token id of this model (0 to {vocab_size - 1})",
                              param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_BIAS <= value <= MAX_BIAS:
            raise BitnetError(f"logit_bias: token {text}: the bias must be a number between -{MAX_BIAS:g} and "
                              f"{MAX_BIAS:g}, got {value!r}", param="logit_bias")
        pairs[int(text)] = float(value)
    return tuple(sorted(pairs.items()))


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty (as in transformers and llama.cpp): divide positive logits, multiply negative.

    Computed in float64 and clipped to float32's finite range, so that an extreme penalty (1e-320
    or 1e300) gives huge but finite logits, never inf (whose differences would be NaN).
    """
    if penalty == 1.0 or not len(recent):
        return logits
    logits = logits.copy()
    ids = np.unique(np.asarray(recent[-REPEAT_WINDOW:], dtype=np.int64))
    seen = logits[ids].astype(np.float64)
    with np.errstate(over="ignore", under="ignore", divide="ignore"):
        penalised = np.where(seen > 0, seen / penalty, seen * penalty)
    big = float(np.finfo(np.float32).max)
    logits[ids] = np.clip(penalised, -big, big)
    return logits


def apply_penalties(logits: np.ndarray, generated: Sequence[int], params: SamplingParams) -> np.ndarray:
    """OpenAI's frequency and presence penalties and logit bias, all added to the logits: a token's logit less
    frequency_penalty times the number of times it was generated, less presence_penalty if it was at all, plus its
    bias. Only the generated tokens count (the prompt does not), as OpenAI and vLLM have it."""
    penalised = (params.frequency_penalty or params.presence_penalty) and len(generated)
    if not penalised and not params.logit_bias:
        return logits
    logits = logits.astype(np.float64)  # exact sums; back to float32 below
    if penalised:
        ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits[list(ids)] += biases
    return logits.astype(np.float32)


def _likeliest(z: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """ids ordered likeliest first; equal values by id, so the order never depends on how a
    partial selection happened to arrange them."""
    return ids[np.lexsort((ids, -z[ids]))]


def _top(z: np.ndarray, k: int) -> np.ndarray:
    """The k likeliest ids, likeliest first, exactly a full sort's first k: where equal values
    straddle the cut, the lowest ids (a partial selection alone would keep arbitrary ones)."""
    part = np.argpartition(-z, k - 1)[:k]
    cut = z[part].min()
    above = part[z[part] > cut]
    return _likeliest(z, np.concatenate([above, np.flatnonzero(z == cut)[: k - above.size]]))


def _nucleus(z: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of likeliest tokens whose probability reaches top_p, and their weights.

    Sorting all V values costs ~20 ms at V = 128k; the nucleus is nearly always among the few
    hundred likeliest, so those are taken first and the selection grows until it holds the set."""
    with np.errstate(under="ignore"):
        weights = np.exp(z)  # z <= 0 with its maximum at 0: no overflow
    total = weights.sum()
    size = 256
    while True:
        ids = _top(z, min(size, z.size))
        keep = int(np.searchsorted(np.cumsum(weights[ids] / total), top_p)) + 1  # smallest set with mass >= top_p
        if keep <= ids.size or ids.size == z.size:
            ids = ids[:keep]
            return ids, weights[ids]
        size *= 4


def candidates(z: np.ndarray, params: SamplingParams) -> tuple[np.ndarray | None, np.ndarray]:
    """The tokens a draw chooses among and their (unnormalised) weights, from z = (logits - max) /
    temperature: the top_k likeliest (0: every token), then of those the smallest set with
    probability >= top_p. None for ids means every token, in id order (no sort needed)."""
    if 0 < params.top_k < z.size:
        ids = _top(z, params.top_k)
        with np.errstate(under="ignore"):
            weights = np.exp(z[ids] - z[ids[0]])
        if params.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(weights / weights.sum()), params.top_p)) + 1
            ids, weights = ids[:keep], weights[:keep]
        return ids, weights
    if params.top_p < 1.0:
        return _nucleus(z, params.top_p)
    with np.errstate(under="ignore"):
        return None, np.exp(z)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, recent: Sequence[int] = (),
           allowed: np.ndarray | None = None, generated: Sequence[int] = ()) -> int:
    """One token id from a [V] float32 logits vector (finite: the engine refuses NaN logits).

    recent: the tokens so far, prompt included (the repeat penalty's); generated: those generated so far (the
    frequency and presence penalties'). The repeat penalty applies first, then apply_penalties. allowed: a bool [V]
    mask (constrained decoding, bitnet_cli.constrain): every other token's logit becomes -inf after the penalties,
    so it is never chosen and the rest are sampled as they would be among themselves. One uniform draw from rng per
    sampled token."""
    if not np.isfinite(logits).all():
        raise BitnetError("sampling: the logits hold NaN or infinite values")
    logits = apply_repeat_penalty(logits, recent, params.repeat_penalty)
    logits = apply_penalties(logits, generated, params)
    if allowed is not None:
        logits = np.where(allowed, logits, np.float32(-np.inf))
    if params.temperature <= 0:
        return int(np.argmax(logits))  # first maximum, like torch.argmax
    z = logits.astype(np.float64)
    # Shift first, then scale: every value is <= 0 before dividing, so a tiny temperature (1e-320)
    # sends the others to -inf (probability 0) and keeps the maximum at 0, never inf - inf = NaN.
    with np.errstate(over="ignore", under="ignore"):
        z = (z - z.max()) / params.temperature
    ids, weights = candidates(z, params)
    cdf = np.cumsum(weights)
    # the inverse CDF at one uniform draw; a zero weight is never chosen (its CDF step is empty)
    i = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), cdf.size - 1)
    return i if ids is None else int(ids[i])
