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

With a ``base`` model (``bitnet eval MODEL -f FILE --kl-base BASE``), the same scored tokens also measure how far
MODEL's next-token distributions are from BASE's, as ``llama-perplexity --kl-divergence`` does: the mean
``KL(base || model)`` per token with its standard error, its median, 99th percentile and maximum, and how often the
two agree on the likeliest token. Against the checkpoint a file was packed from, or an f16-head pack against a
q4-head one, it is the measure of what packing lost. The base runs with the f32 KV cache whatever ``kv_cache``
says, so a file against itself with ``kv_cache="f16"`` measures what the f16 cache changes.

Where it differs: llama.cpp needs two chunks of text, one is enough here; the tokens are the model's own tokenizer's
(tokenizer.json), where llama.cpp runs its port of it from the GGUF; llama.cpp stores the base's logits in a file
first, here both models run side by side.
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
class Divergence:
    """MODEL against a base model over the same scored tokens (nats per token)."""
    base: str
    base_perplexity: float
    kld: float  # mean KL(base || model)
    kld_stderr: float
    kld_median: float
    kld_p99: float
    kld_max: float
    same_top: float  # the share of scored tokens where both models' likeliest next token is the same
    same_top_stderr: float


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
    seconds: float  # the model's forward passes and scoring (a base model's are not counted)
    divergence: Divergence | None = None  # against a base model, when one was given

    @property
    def tokens_per_s(self) -> float:
        """Tokens run through the model (whole chunks) per second of its own time."""
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


def chunk_logits(backend: Backend, chunk: list[int]) -> tuple[np.ndarray, list[int]]:
    """(the logits [n, V] that predict each scored token of one chunk, those n tokens): the tokens after its first
    half, each predicted from the tokens before it."""
    first = len(chunk) // 2
    context, scored = chunk[:first + 1], chunk[first + 1:]
    [[logits]] = backend.continuation_logits([(context, [scored])])
    return logits, scored


def token_divergence(base_logits: np.ndarray, logits: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(KL(base || model) float64 [n], whether the likeliest token agrees bool [n]) per row of two models' logits
    [n, V] for the same positions; in blocks of rows, so that a large vocabulary's float64 copies stay small."""
    kld, same = np.empty(len(logits)), np.empty(len(logits), dtype=bool)
    for i in range(0, len(logits), block):
        rows = slice(i, i + block)
        log_p, log_q = _log_softmax(base_logits[rows]), _log_softmax(logits[rows])
        kld[rows] = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
        same[rows] = base_logits[rows].argmax(axis=-1) == logits[rows].argmax(axis=-1)
    return np.maximum(kld, 0.0), same  # >= 0 in exact arithmetic; rounding may leave -1e-17


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """The mean and llama.cpp's standard error of it: the spread ``mean(v^2) - mean^2``, over ``n - 1``."""
    mean = float(values.mean())
    spread = float((values ** 2).mean()) - mean * mean
    return mean, (math.sqrt(spread / (values.size - 1)) if spread > 0 and values.size > 1 else 0.0)


def _check_settings(ctx_size: int, chunks: int | None) -> None:
    if type(ctx_size) is not int or ctx_size < 3:  # below 3 a chunk's second half scores no token
        raise BitnetError(f"ctx_size {ctx_size!r}: a perplexity chunk needs at least 3 tokens", param="ctx_size")
    if chunks is not None and (type(chunks) is not int or chunks < 1):
        raise BitnetError(f"chunks {chunks!r}: must be 1 or more", param="chunks")


def perplexity(model: str | Path, text: str, *, ctx_size: int = DEFAULT_CTX_SIZE, chunks: int | None = None,
               threads: int | None = None, kv_cache: str = DEFAULT_KV_CACHE, progress: Progress | None = None,
               backend: Backend | None = None, base: str | Path | Backend | None = None) -> PerplexityResult:
    """The perplexity of ``text`` under ``model`` (a packed file or a checkpoint directory; or an open
    ``backend``), in chunks of ``ctx_size`` tokens, at most ``chunks`` of them; with ``base`` (a model path or an
    open backend), also the divergence of ``model``'s distributions from ``base``'s (module docstring)."""
    _check_settings(ctx_size, chunks)
    if isinstance(base, (str, Path)) and not Path(base).exists():  # before a model load that may take seconds
        raise BitnetError(f"base {base}: no such file or directory (expected a packed file or a checkpoint "
                          "directory)", param="base")
    backend = _backend(model, backend, ctx_size, threads, kv_cache)
    tokens = text_tokens(backend, text)
    base_backend = None
    if base is not None:
        # the base keeps the exact (f32) KV cache: `--kv-cache f16 --kl-base` the same file measures the f16 cache
        base_backend = (base if not isinstance(base, (str, Path))
                        else _backend(base, None, ctx_size, threads, DEFAULT_KV_CACHE))
        if text_tokens(base_backend, text) != tokens:
            raise BitnetError(f"base {base}: reads the text as other tokens than {model} does; a divergence needs the "
                              "same tokenizer", param="base")
    todo = chunks_of(tokens, ctx_size, backend.bos_token_id, chunks)
    if not todo:
        raise BitnetError(f"the text is {len(tokens)} tokens, fewer than one chunk of ctx_size {ctx_size}: give a "
                          "longer text or a smaller ctx_size", param="ctx_size")
    seconds = 0.0  # the model's own: its forward passes and scores, not the base's
    nlls, base_nlls, klds, same_tops = [], [], [], []
    for i, chunk in enumerate(todo):
        if progress:
            progress(i, len(todo), "perplexity")
        t0 = time.perf_counter()
        logits, scored = chunk_logits(backend, chunk)
        nlls.append(-token_logprobs(logits, scored))
        seconds += time.perf_counter() - t0
        if base_backend is not None:
            base_logits, _ = chunk_logits(base_backend, chunk)
            if base_logits.shape != logits.shape:
                raise BitnetError(f"base {base}: has {base_logits.shape[1]} logits a token, {model} "
                                  f"{logits.shape[1]}; a divergence needs the same vocabulary", param="base")
            base_nlls.append(-token_logprobs(base_logits, scored))
            kld, same = token_divergence(base_logits, logits)
            klds.append(kld)
            same_tops.append(same)
    if progress:
        progress(len(todo), len(todo), "perplexity")
    every = np.concatenate(nlls)
    mean, stderr = _mean_and_stderr(every)
    ppl = math.exp(mean)
    divergence = None
    if base_backend is not None:
        kld, same = np.concatenate(klds), np.concatenate(same_tops).astype(np.float64)
        kld_mean, kld_stderr = _mean_and_stderr(kld)
        same_mean, same_stderr = _mean_and_stderr(same)
        divergence = Divergence(
            base=str(base if isinstance(base, (str, Path)) else base_backend.name),
            base_perplexity=math.exp(float(np.concatenate(base_nlls).mean())), kld=kld_mean, kld_stderr=kld_stderr,
            kld_median=float(np.median(kld)), kld_p99=float(np.percentile(kld, 99)), kld_max=float(kld.max()),
            same_top=same_mean, same_top_stderr=same_stderr)
    return PerplexityResult(perplexity=ppl, stderr=ppl * stderr, ctx_size=ctx_size, chunks=len(todo),
                            scored_tokens=int(every.size), text_tokens=len(tokens),
                            chunk_nll=[float(n.mean()) for n in nlls], backend=backend.name, seconds=seconds,
                            divergence=divergence)


def _backend(model: str | Path, backend: Backend | None, ctx_size: int, threads: int | None,
             kv_cache: str) -> Backend:
    """An open backend for ``model`` whose context holds a chunk."""
    if backend is None:
        return open_backend(model, threads=threads, ctx_size=ctx_size, kv_cache=kv_cache)
    if backend.max_length < ctx_size:
        raise BitnetError(f"ctx_size {ctx_size} is more than the model's context ({backend.max_length})",
                          param="ctx_size")
    return backend
