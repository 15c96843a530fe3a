"""The perplexity of a text file, computed as llama.cpp's ``llama-perplexity`` does (``bitnet eval MODEL -f FILE``).

When the field compares quantisations it quotes llama.cpp's figure (``llama-perplexity -f wiki.test.raw -c 512``).
This is that figure for a packed model (C engine) or a checkpoint directory (torch), by the same method:

* the whole text is tokenised once, with BOS in front when the model has one;
* it is cut into ``len(tokens) // ctx_size`` chunks of ``ctx_size`` tokens (a tail that does not fill one is left
  out; ``chunks`` keeps only the first ones). With a BOS token, each chunk's first token is replaced by it, so
  every chunk is read as a document of its own;
* in each chunk only the second half is scored: the tokens at positions ``first + 1 .. ctx_size - 1``
  (``first = ctx_size // 2``), each predicted from at least half a context;
* ``ppl = exp(mean NLL)`` over every scored token, and llama.cpp's ``+/-``: ``ppl * sd(NLL) / sqrt(count - 1)``.

Where it differs: llama.cpp needs two chunks of text, one is enough here; the tokens are the model's own tokenizer's
(tokenizer.json), where llama.cpp runs its port of it from the GGUF.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bitnet_cli.engine import DEFAULT_KV_CACHE
from bitnet_cli.errors import BitnetError
from bitnet_cli.eval.backends import Backend, open_backend, token_logprobs
from bitnet_cli.progress import Progress

DEFAULT_CTX_SIZE = 512  # llama-perplexity's default -c, the context of most published figures


@dataclass
class PerplexityResult:
    perplexity: float
    stderr: float  # llama.cpp's "+/-"
    ctx_size: int
    chunks: int
    scored_tokens: int  # chunks * (ctx_size - ctx_size // 2 - 1)
    text_tokens: int  # the whole text's, BOS included
    chunk_nll: list[float]  # each chunk's mean negative log-likelihood (nats per token)
    backend: str  # engine (packed file) or torch (checkpoint directory)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        """Tokens run through the model (whole chunks) per second."""
        return self.chunks * self.ctx_size / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def text_tokens(backend: Backend, text: str) -> list[int]:
    """The whole text's token ids, with BOS in front when the model has one (llama.cpp's add_bos)."""
    ids = backend.tokenizer.encode(text, add_special_tokens=False).ids
    return ([backend.bos_token_id] if backend.bos_token_id is not None else []) + ids


def chunks_of(tokens: list[int], ctx_size: int, bos: int | None, chunks: int | None = None) -> list[list[int]]:
    """The chunks the perplexity is scored on: consecutive runs of ``ctx_size`` tokens, each beginning with BOS
    (replacing its first token) when there is one; at most ``chunks`` of them."""
    n = len(tokens) // ctx_size if chunks is None else min(chunks, len(tokens) // ctx_size)
    out = []
    for i in range(n):
        chunk = tokens[i * ctx_size:(i + 1) * ctx_size]
        out.append(chunk if bos is None else [bos] + chunk[1:])
    return out


def chunk_nll(backend: Backend, chunk: list[int]) -> np.ndarray:
    """The negative log-likelihood (float64, nats) of each scored token of one chunk: those after its first half."""
    first = len(chunk) // 2
    context, scored = chunk[:first + 1], chunk[first + 1:]
    [[logits]] = backend.continuation_logits([(context, [scored])])
    return -token_logprobs(logits, scored)


def check_settings(ctx_size: int, chunks: int | None) -> None:
    if type(ctx_size) is not int or ctx_size < 3:  # below 3 a chunk's second half scores no token
        raise BitnetError(f"ctx_size {ctx_size!r}: a perplexity chunk needs at least 3 tokens", param="ctx_size")
    if chunks is not None and (type(chunks) is not int or chunks < 1):
        raise BitnetError(f"chunks {chunks!r}: must be 1 or more", param="chunks")


def perplexity(model: str | Path, text: str, *, ctx_size: int = DEFAULT_CTX_SIZE, chunks: int | None = None,
               threads: int | None = None, kv_cache: str = DEFAULT_KV_CACHE, progress: Progress | None = None,
               backend: Backend | None = None) -> PerplexityResult:
    """The perplexity of ``text`` under ``model`` (a packed file or a checkpoint directory; or an open
    ``backend``), in chunks of ``ctx_size`` tokens, at most ``chunks`` of them (module docstring)."""
    check_settings(ctx_size, chunks)
    if backend is None:
        backend = open_backend(model, threads=threads, ctx_size=ctx_size, kv_cache=kv_cache)
    elif backend.max_length < ctx_size:
        raise BitnetError(f"ctx_size {ctx_size} is more than the model's context ({backend.max_length})",
                          param="ctx_size")
    tokens = text_tokens(backend, text)
    todo = chunks_of(tokens, ctx_size, backend.bos_token_id, chunks)
    if not todo:
        raise BitnetError(f"the text is {len(tokens)} tokens, fewer than one chunk of ctx_size {ctx_size}: give a "
                          "longer text or a smaller ctx_size", param="ctx_size")
    t0 = time.perf_counter()
    nlls: list[np.ndarray] = []
    for i, chunk in enumerate(todo):
        if progress:
            progress(i, len(todo), "perplexity")
        nlls.append(chunk_nll(backend, chunk))
    if progress:
        progress(len(todo), len(todo), "perplexity")
    seconds = time.perf_counter() - t0
    every = np.concatenate(nlls)
    mean = float(every.mean())
    spread = float((every ** 2).mean()) - mean * mean  # llama.cpp's estimate, term for term
    stderr = math.sqrt(spread / (every.size - 1)) if spread > 0 and every.size > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(perplexity=ppl, stderr=ppl * stderr, ctx_size=ctx_size, chunks=len(todo),
                            scored_tokens=int(every.size), text_tokens=len(tokens),
                            chunk_nll=[float(n.mean()) for n in nlls], backend=backend.name, seconds=seconds)
