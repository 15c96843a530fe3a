"""lm-evaluation-harness model type ``bitnet``: packed files on the C engine, checkpoints on torch.

Importing this module registers the model, after which lm-eval resolves ``--model bitnet``:

    lm_eval.simple_evaluate(model="bitnet", model_args="pretrained=out.bin", tasks=["arc_easy"])

Tokenisation follows lm-eval's ``TemplateLM`` exactly (trailing context spaces move to the
continuation; the pair is encoded whole and then split), and (log-probability, is-greedy)
follow ``HFLM``: the sum of the continuation's token log-softmaxes and whether every token is the
argmax. Requests that share a context are scored together, so a 4-way multiple-choice question
runs its context through the model once.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import lm_eval.models  # noqa: F401  (fills lm-eval's registry first; it only self-fills when empty)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from bitnet_cli.engine import DEFAULT_KV_CACHE, check_threads
from bitnet_cli.errors import BitnetError
from bitnet_cli.eval.backends import Backend, open_backend, token_logprobs
from bitnet_cli.progress import Progress  # the CLI draws a rich bar with it; lm-eval's CLI gets tqdm



def score_continuation(logits: np.ndarray, continuation: list[int]) -> tuple[float, bool]:
    """(sum of log p(token), every token greedy) from the logits that predict each token."""
    logprob = float(token_logprobs(logits, continuation).sum())
    return logprob, bool((logits.argmax(axis=-1) == np.asarray(continuation)).all())


@register_model("bitnet")
class BitNetLM(TemplateLM):
    """``pretrained``: a packed ``.bin`` (C engine) or a checkpoint directory (torch).

    Other model_args: ``threads``, ``max_length`` (default: the model's context window),
    ``batch_size`` (sequences per torch forward; the engine runs one sequence at a time and
    shares prefixes through its KV cache instead), ``kv_cache`` (the engine's KV cache element
    type, f32 or f16: bitnet_cli.engine.KV_CACHE_TYPES).
    """

    def __init__(
        self,
        pretrained: str,
        threads: int | None = None,
        max_length: int | None = None,
        batch_size: int | str | None = 8,
        device: str | None = None,  # lm-eval's CLI passes cuda:0 by default; the models run on the CPU
        max_batch_size: int | None = None,  # lm-eval always passes it; nothing to tune here
        progress: Progress | None = None,
        backend: Backend | None = None,
        kv_cache: str = DEFAULT_KV_CACHE,
    ):
        super().__init__()
        if isinstance(threads, str) and threads.strip().lstrip("-").isdigit():
            threads = int(threads)  # lm-eval's --model_args give it as text
        if threads is not None:
            check_threads(threads)
        self.backend = backend or open_backend(
            pretrained, threads=threads, ctx_size=int(max_length) if max_length else None,
            kv_cache=kv_cache,
        )
        self.tokenizer = self.backend.tokenizer
        self._max_length = int(max_length) if max_length else self.backend.max_length
        self._batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        if self._batch_size < 1:
            raise BitnetError(f"batch_size={batch_size}: must be at least 1")
        self.progress = progress
        self.pretrained = str(pretrained)
        # requests whose continuation alone is longer than the context window (scored -inf)
        self.refused = 0
        self.longest_refused = 0

    # ------------------------------------------------------------------ lm-eval's vocabulary

    @property
    def eot_token_id(self) -> int:
        return self.backend.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.backend.bos_token_id
        return bos if bos is not None else self.backend.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kw):
        if add_special_tokens is None:  # as HFLM: no second BOS when the text already starts with one
            add_special_tokens = not string.startswith(self.tok_decode([self.prefix_token_id], False))
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        return {"model": self.pretrained, "backend": self.backend.name, "max_length": self.max_length}

    # ------------------------------------------------------------------ scoring

    def _fit(self, context: list[int], continuation: list[int]) -> list[int] | None:
        """HFLM's window rule: keep the last max_length + 1 tokens (the context truncated from the
        left); the model sees all but the last. None for a continuation that alone is longer than the
        window: HFLM would score a slice of it, we refuse that request (see ``refused``)."""
        if len(continuation) > self.max_length:
            return None
        keep = self.max_length + 1 - len(continuation)
        return context[-keep:]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # TemplateLM tokenises under a tqdm bar of its own; with a progress callback, ours is enough
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.progress is not None)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for i, (_, context, continuation) in enumerate(requests):
            fitted = self._fit(list(context), list(continuation))
            if fitted is None:  # scored as impossible: never the chosen answer, counted in the summary
                results[i] = (float("-inf"), False)
                self.refused += 1
                self.longest_refused = max(self.longest_refused, len(continuation))
                continue
            groups.setdefault(tuple(fitted), []).append((i, list(continuation)))
        order = sorted(groups.items(), key=lambda kv: self.backend.sort_key(kv[0]))

        report = self._reporter(len(requests), "loglikelihood", disable_tqdm)
        report(len(requests) - sum(len(items) for items in groups.values()))
        for batch in self._batches(order):
            logits = self.backend.continuation_logits([(list(ctx), [c for _, c in items]) for ctx, items in batch])
            for (_, items), group_logits in zip(batch, logits):
                for (i, continuation), cont_logits in zip(items, group_logits):
                    results[i] = score_continuation(cont_logits, continuation)
                    if requests[i][0] is not None:  # rolling windows are cached per document instead
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            report(sum(len(items) for _, items in batch))
        report(None)
        return results  # type: ignore[return-value]

    def _batches(self, order):
        """Whole groups, about batch_size sequences at a time (a big group travels alone)."""
        batch, rows = [], 0
        for item in order:
            if batch and rows + len(item[1]) > self._batch_size:
                yield batch
                batch, rows = [], 0
            batch.append(item)
            rows += len(item[1])
        if batch:
            yield batch

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        report = self._reporter(len(requests), "generate_until", disable_tqdm)
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise BitnetError("do_sample=True: bitnet eval decodes greedily only")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
            max_gen = int(kwargs["max_gen_toks"])
            if max_gen >= self.max_length:
                raise BitnetError(f"max_gen_toks={max_gen} leaves no room in the context window ({self.max_length})")
            tokens = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)

            def stop(generated: list[int]) -> bool:
                if generated[-1] == self.eot_token_id:
                    return True
                text = self.tok_decode(generated[-64:])  # a stop string is never longer than this
                return any(s and s in text for s in until)

            generated = self.backend.greedy(tokens, max_gen, stop)
            text = postprocess_generated_text(self.tok_decode(generated), until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
            report(1)
        report(None)
        return out

    # ------------------------------------------------------------------ progress

    def _reporter(self, total: int, what: str, disable_tqdm: bool) -> Callable[[int | None], None]:
        """report(n) after n more requests are done; report(None) at the end."""
        if self.progress is not None:
            progress, done = self.progress, [0]
            progress(0, total, what)

            def report(n: int | None) -> None:
                if n:
                    done[0] += n
                    progress(done[0], total, what)

            return report
        bar = tqdm(total=total, desc=f"bitnet {what}", disable=disable_tqdm)
        return lambda n: bar.update(n) if n is not None else bar.close()
