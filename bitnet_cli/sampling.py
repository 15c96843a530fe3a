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


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, recent: Sequence[int] = (),
           allowed: np.ndarray | None = None) -> int:
    """One token id from a [V] float32 logits vector (finite: the engine refuses NaN logits).

    allowed: a bool [V] mask (constrained decoding, bitnet_cli.constrain): every other token's
    logit becomes -inf after the repeat penalty, so it is never chosen and the rest are sampled
    as they would be among themselves."""
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
    if 0 < params.top_k < z.size:
        candidates = np.argpartition(-z, params.top_k - 1)[: params.top_k]
    else:
        candidates = np.arange(z.size)
    candidates = candidates[np.argsort(-z[candidates], kind="stable")]
    with np.errstate(under="ignore"):
        p = np.exp(z[candidates] - z[candidates[0]])
    p /= p.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p)) + 1  # smallest set with mass >= top_p
        candidates, p = candidates[:keep], p[:keep] / p[:keep].sum()
    return int(candidates[rng.choice(p.size, p=p)])
