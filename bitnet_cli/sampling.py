"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling, with a repeat penalty.

All randomness comes from the `numpy.random.Generator` passed in, so a seed fixes the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bitnet_cli.errors import BitnetError

REPEAT_WINDOW = 64  # the penalty looks at this many most recent tokens (prompt included)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # <= 0: greedy (argmax)
    top_k: int = 40           # 0: no limit (check() refuses a negative k)
    top_p: float = 0.95       # 1.0: no limit
    repeat_penalty: float = 1.0  # 1.0: off; > 1 discourages recent tokens

    def check(self) -> "SamplingParams":
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise BitnetError(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise BitnetError(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}", param="top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise BitnetError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if not np.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise BitnetError(f"repeat_penalty must be > 0, got {self.repeat_penalty}", param="repeat_penalty")
        return self


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
           allowed: np.ndarray | None = None) -> int:
    """One token id from a [V] float32 logits vector (finite: the engine refuses NaN logits).

    allowed: a bool [V] mask (constrained decoding, bitnet_cli.constrain): every other token's
    logit becomes -inf after the repeat penalty, so it is never chosen and the rest are sampled
    as they would be among themselves. One uniform draw from rng per sampled token."""
    if not np.isfinite(logits).all():
        raise BitnetError("sampling: the logits hold NaN or infinite values")
    logits = apply_repeat_penalty(logits, recent, params.repeat_penalty)
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
