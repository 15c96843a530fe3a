"""Prompt lookup decoding's drafts: the tokens that followed the last time the text's final few
tokens appeared (in the prompt or in what was generated since).

The engine runs the drafted tokens together with the newest one in one pass (the weights are
read once for all of them) and samples each position as it would have without the draft; a draft
token is kept only while it equals what was sampled. So the text is exactly the one generated
without drafts (the engine's logits for a token do not depend on how many run with it), and the
time saved is every accepted draft's pass. It pays where text repeats: code being edited, quotes,
lists, JSON keys, a model caught in a loop.
"""

from __future__ import annotations

from typing import Iterable

from bitnet_cli.errors import BitnetError

NGRAM_SIZES = (3, 2)  # the final n tokens matched, longest first (one token alone matches too often)
MAX_LOOKUP = 64


def check_lookup(lookup) -> int:
    if type(lookup) is not int or not 0 <= lookup <= MAX_LOOKUP:
        raise BitnetError(f"lookup must be an integer from 0 (off) to {MAX_LOOKUP}, got {lookup!r}", param="lookup")
    return lookup


class PromptLookup:
    """The token sequence so far, indexed by its n-grams: `propose(k)` drafts up to k tokens."""

    def __init__(self, sizes: tuple[int, ...] = NGRAM_SIZES):
        self.sizes = sizes
        self.tokens: list[int] = []
        # n-gram -> the index just after its latest occurrence that has a token after it
        self._after: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # the n-grams ending just before `token` now have a continuation
            for n in self.sizes:
                if end >= n:
                    self._after[tuple(self.tokens[end - n:end])] = end

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the final n-gram (longest
        n first); [] when none occurred before."""
        if k <= 0:
            return []
        for n in self.sizes:
            if len(self.tokens) >= n:
                start = self._after.get(tuple(self.tokens[-n:]))
                if start is not None:
                    return self.tokens[start:start + k]
        return []


class DraftLength:
    """How many tokens the next draft may have, at most `most`. A missed draft token costs part of a pass (about 45%
    of one at 2B4T's shape on 2 cores), so drafts shrink to what was accepted when they miss and grow back by one
    while they are accepted whole. `start()` before each draft, then `hit()` per accepted token or `miss()`."""

    def __init__(self, most: int):
        self.most = self.now = most
        self.hits = 0

    def start(self) -> None:
        self.hits = 0

    def hit(self, whole: bool) -> None:
        """A draft token accepted; ``whole``: it was the draft's last."""
        self.hits += 1
        if whole:
            self.now = min(self.most, self.now + 1)

    def miss(self) -> None:
        self.now = max(1, self.hits or self.now // 2)


__all__ = ["DraftLength", "MAX_LOOKUP", "PromptLookup", "check_lookup"]
