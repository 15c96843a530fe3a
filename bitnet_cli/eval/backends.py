"""The two ways `bitnet eval` runs a model: the C engine (packed file) or torch (checkpoint dir).

Both answer the same two questions the lm-eval adapter asks:

* ``continuation_logits(groups)``: for each group ``(context, [continuation, ...])`` the logits
  that predict every continuation token, ``[len(continuation), V]`` float32 each;
* ``greedy(tokens, max_new_tokens, stop)``: greedy decoding until ``stop(generated)`` says so.

plus the tokenizer and the special tokens. Scoring is the callers' (the lm-eval adapter, the perplexity),
through one log-softmax, :func:`token_logprobs`, so the two backends cannot disagree on what a log-likelihood is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from bitnet_cli.engine import DEFAULT_KV_CACHE, kv_cache_type
from bitnet_cli.errors import BitnetError
from bitnet_cli.tokenizer import special_id

Group = tuple[list[int], list[list[int]]]


def token_logprobs(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """log p(token) float64 [len(tokens)] from the logits [len(tokens), V] that predict each token.

    The exponentials are float32 (each within an ulp; 4x faster than float64 over a 32k vocabulary),
    their sums and everything after float64."""
    top = logits.max(axis=-1, keepdims=True)
    log_z = top[:, 0].astype(np.float64) + np.log(np.exp(logits - top).sum(axis=-1, dtype=np.float64))
    return logits[np.arange(len(tokens)), tokens].astype(np.float64) - log_z


class Backend(Protocol):
    tokenizer: object  # tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_id: int
    max_length: int
    name: str

    def continuation_logits(self, groups: Sequence[Group]) -> list[list[np.ndarray]]: ...

    def greedy(self, tokens: list[int], max_new_tokens: int, stop: Callable[[list[int]], bool]) -> list[int]: ...

    def sort_key(self, context: Sequence[int]): ...


def check_kv_cache(path: str | Path, kv_cache: str) -> None:
    """kv_cache is a KV cache type, and other than f32 only for a packed file: the torch path keeps
    transformers' own cache."""
    if kv_cache_type(kv_cache) != DEFAULT_KV_CACHE and Path(path).is_dir():
        raise BitnetError(f"kv_cache {kv_cache} is for packed models on the C engine; {path} is a checkpoint "
                          "directory, evaluated on torch", param="kv_cache")


def open_backend(path: str | Path, *, threads: int | None = None, ctx_size: int | None = None,
                 kv_cache: str = DEFAULT_KV_CACHE) -> Backend:
    """A packed ``.bin`` file runs on the C engine (with a KV cache of kv_cache elements); a
    checkpoint directory runs on torch."""
    p = Path(path)
    check_kv_cache(p, kv_cache)
    if p.is_dir():
        return TorchBackend(p, threads=threads, max_length=ctx_size)
    if p.exists():  # a file that is not a regular one: the engine's load says what it is
        return EngineBackend(p, threads=threads, ctx_size=ctx_size, kv_cache=kv_cache)
    raise BitnetError(f"{p}: no such file or directory (expected a packed .bin file or a checkpoint directory)")


class EngineBackend:
    """The packed model on the C engine, with a KV cache reused across requests.

    Requests are visited in token order (``sort_key``), so neighbours share long prefixes
    (the few-shot preamble, the question) and only the new suffix is run through the model.
    """

    name = "engine"

    def __init__(self, path: Path, *, threads: int | None, ctx_size: int | None, kv_cache: str = DEFAULT_KV_CACHE):
        from bitnet_cli.engine import Engine

        self.engine = Engine.load(path, threads=threads, ctx_size=ctx_size, kv_cache=kv_cache)
        self.tokenizer = self.engine.tokenizer
        self.bos_token_id = self.engine.bos_token_id
        self.eos_token_id = self.engine.eos_token_id
        self.max_length = int(self.engine.ctx_size)

    def sort_key(self, context: Sequence[int]):
        return tuple(context)

    def _extend_to(self, tokens: list[int]) -> np.ndarray:
        """Logits after the last of `tokens`, running only what the engine's cache does not hold yet."""
        shared = self.engine.cached_prefix(tokens)
        return self.engine.forward(tokens[shared:], n_past=shared, all_logits=False)[-1]

    def continuation_logits(self, groups: Sequence[Group]) -> list[list[np.ndarray]]:
        out = []
        for context, continuations in groups:
            first = self._extend_to(context)[None, :]  # predicts every continuation's first token
            longer = [cont[:-1] for cont in continuations if len(cont) > 1]
            rests = iter([logits for part in _packs(longer, self.max_length - len(context))
                          for logits in self.engine.forward_branches(len(context), part)])
            out.append([np.vstack([first, next(rests)]) if len(cont) > 1 else first for cont in continuations])
        return out

    def greedy(self, tokens: list[int], max_new_tokens: int, stop: Callable[[list[int]], bool]) -> list[int]:
        logits = self._extend_to(tokens)
        generated: list[int] = []
        while len(generated) < max_new_tokens and len(tokens) + len(generated) < self.max_length:
            generated.append(int(np.argmax(logits)))
            if stop(generated):
                break
            logits = self.engine.forward(generated[-1:], n_past=len(tokens) + len(generated) - 1, all_logits=False)[-1]
        return generated


def _packs(branches: list[list[int]], room: int):
    """branches in order, as runs whose total length fits in room (each branch alone fits)."""
    part: list[list[int]] = []
    for branch in branches:
        if part and sum(map(len, part)) + len(branch) > room:
            yield part
            part = []
        part.append(branch)
    if part:
        yield part


class TorchBackend:
    """A checkpoint directory (HF layout) on our torch ``BitNetForCausalLM``, batched and padded."""

    name = "torch"

    def __init__(self, ckpt_dir: Path, *, threads: int | None, max_length: int | None):
        import torch

        from bitnet_cli import tokenizer
        from bitnet_cli.model import BitNetForCausalLM

        if threads:
            torch.set_num_threads(threads)
        from bitnet_cli.checkpoint import read_tokenizer_json

        tok_path = ckpt_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise BitnetError(f"{tok_path}: missing (a checkpoint needs its tokenizer to be evaluated)")
        self.tokenizer = tokenizer.load(read_tokenizer_json(tok_path), str(tok_path))
        self.model = BitNetForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32)
        config = self.model.config
        self.bos_token_id, self.eos_token_id = _special_ids(ckpt_dir, self.tokenizer, config)
        self.max_length = int(max_length or config.max_position_embeddings)
        self.vocab_size = config.vocab_size

    def sort_key(self, context: Sequence[int]):
        return -len(context)  # longest first: padding stays small, memory peaks early

    def _logits(self, rows: list[list[int]]) -> np.ndarray:
        import torch

        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: causal attention never looks at it
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        with torch.inference_mode():
            return self.model(ids).float().numpy()

    def continuation_logits(self, groups: Sequence[Group]) -> list[list[np.ndarray]]:
        rows = [context + cont[:-1] for context, conts in groups for cont in conts]
        logits = self._logits(rows)
        out, i = [], 0
        for context, conts in groups:
            per_cont = []
            for cont in conts:
                start = len(context) - 1
                per_cont.append(logits[i, start : start + len(cont), : self.vocab_size])
                i += 1
            out.append(per_cont)
        return out

    def greedy(self, tokens: list[int], max_new_tokens: int, stop: Callable[[list[int]], bool]) -> list[int]:
        generated: list[int] = []  # no KV cache in the training model: each step reruns the prefix
        while len(generated) < max_new_tokens and len(tokens) + len(generated) < self.max_length:
            logits = self._logits([tokens + generated])[0, -1, : self.vocab_size]
            generated.append(int(np.argmax(logits)))
            if stop(generated):
                break
        return generated


def _special_ids(ckpt_dir: Path, tokenizer, config) -> tuple[int | None, int]:
    """BOS/EOS as transformers' tokenizer sees them (tokenizer_config.json), else from config.json."""
    from bitnet_cli.checkpoint import tokenizer_config

    cfg, hf = tokenizer_config(ckpt_dir), config.to_hf_dict()
    bos, eos = (special_id(kind, tokenizer, cfg, hf) for kind in ("bos", "eos"))
    if eos is None:
        raise BitnetError(f"{ckpt_dir}: no eos token in tokenizer_config.json or config.json")
    return bos, int(eos)
