"""Continuous batching: many requests decoded together on one Engine, in a thread of their own.

Each sequence (one choice of one prompt) owns one of the engine's KV caches, a *slot*, while it
runs. Every step is one `Engine.forward_batch` call: the next token of every decoding sequence,
plus up to a chunk of prompt tokens of sequences still being prefilled, so the ternary matrices
are streamed once per step for all of them and running streams keep flowing while a long prompt
comes in. A sequence joins at the next step after it arrives and leaves as soon as it ends or is
cancelled. Its tokens are chosen exactly as `Engine.generate` chooses them (same sampler, same
seeded generator, same stop rules, same JSON constraint), and the C engine gives every token of a
batch the logits it gets alone, so batching never changes what a request receives.

With prompt lookup (`lookup`, bitnet_cli.lookup) a decoding sequence also runs up to that many draft tokens in
the same step, copied from where its last tokens appeared before; its rows are sampled in order as without them,
and the drafts are kept while they equal what was sampled, so the text is the same and each accepted draft saves a
step.

A slot keeps the tokens whose keys and values it holds after its sequence ends. A new sequence
takes the free slot that shares the longest prefix with its prompt, or has that prefix copied in
from any slot (busy or not), and prefills only the rest: a system prompt or a chat history is
computed once.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bitnet_cli.constrain import JsonConstraint
from bitnet_cli.engine import Engine, TextStream, common_prefix
from bitnet_cli.errors import BitnetError
from bitnet_cli.lookup import DraftLength, PromptLookup, check_lookup
from bitnet_cli.sampling import SamplingParams, sample

STEP_TOKENS = 64  # tokens per step at most (the C engine's prefill chunk): weights streamed once
MIN_PREFILL = 8   # prompt tokens per step even when decoding sequences fill the chunk


class QueueFull(Exception):
    """More sequences are waiting for a slot than max_queue allows."""


@dataclass
class TokenEvent:
    text: str            # the text this token completes (may be "": held back, or mid-character)
    token: int | None    # None: text held back until the sequence ended, no token of its own
    logprob: float | None = None
    top: dict[str, float] | None = None


@dataclass
class PromptLogprobs:
    """Per prompt token: its log-probability given the tokens before it (None for the first), and
    the `top` likeliest alternatives there."""
    logprobs: list[float | None]
    top: list[dict[str, float] | None]


@dataclass
class DoneEvent:
    finish_reason: str   # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int   # prompt tokens whose keys/values came from the prefix cache


@dataclass
class ErrorEvent:
    message: str


@dataclass
class Job:
    """One sequence to generate. `sink` receives its events, from the scheduler thread."""
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    seed: int | None
    sink: Callable[[object], None]
    stops: list[str] = field(default_factory=list)
    logprobs: int | None = None   # alternatives per generated token (None: no log-probabilities)
    prompt_logprobs: bool = False  # also for the prompt's tokens (echo with logprobs)
    ignore_eos: bool = False       # generate through end-of-sequence tokens (for benchmarks)
    constraint: JsonConstraint | None = None  # response_format json_object: this sequence's own
    cancelled: bool = False        # set from any thread: the sequence leaves at the next step


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.cached: list[int] = []  # tokens whose keys/values fill positions 0..len-1
        self.job: Job | None = None
        self.last_used = 0

    def start(self, job: Job, reuse: int, tokenizer, rng, order: int, lookup: int = 0):
        self.job, self.cached = job, self.cached[:reuse]
        self.order = order                  # admission count: prompts are prefilled first come first
        self.todo = job.prompt[reuse:]      # prompt tokens still to run
        self.reused = reuse
        self.history = list(job.prompt)     # prompt + generated, for the repeat penalty
        self.text = TextStream(tokenizer, job.stops)
        self.rng = rng
        self.generated = 0
        self.next_token: int | None = None  # sampled, to be run at the next step
        self.prompt_lp: list[float | None] = [None]
        self.prompt_top: list[dict | None] = [None]
        self.drafts = PromptLookup() if lookup else None  # prompt lookup: the sequence's n-grams
        if self.drafts:
            self.drafts.extend(job.prompt)
        self.draft_length = DraftLength(lookup)
        self.expected: list[int] = []       # draft tokens run this step after next_token, not yet checked


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max()
    return z - np.log(np.exp(z).sum())


def check_limits(parallel: int, max_queue: int) -> None:
    """The scheduler's sizes: at least one slot, and a queue that may be empty."""
    if type(parallel) is not int or parallel < 1:
        raise BitnetError(f"parallel must be a positive integer, got {parallel!r}", param="parallel")
    if type(max_queue) is not int or max_queue < 0:
        raise BitnetError(f"max_queue must be >= 0, got {max_queue!r}", param="max_queue")


class Scheduler:
    """Runs Jobs on `engine` with up to `parallel` sequences at once, `max_queue` more waiting; `lookup`: draft tokens
    per decoding sequence and step at most (prompt lookup; 0: none)."""

    def __init__(self, engine: Engine, parallel: int, max_queue: int, lookup: int = 0):
        check_limits(parallel, max_queue)
        self.lookup = check_lookup(lookup)
        engine.set_sequences(parallel)
        self.engine, self.parallel, self.max_queue = engine, parallel, max_queue
        self.slots = [_Slot(i) for i in range(parallel)]
        self._pending: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._admitted = 0
        self.generated_tokens = 0  # since start, every sequence together (/health)
        # what the engine ran since start (/health): where a served run's time goes (benchmarks/serve_load.py)
        self.engine_steps = 0       # forward_batch calls (a slot's last_used is the last it was in)
        self.engine_seconds = 0.0   # wall time inside them
        self.decode_rows = 0        # their generated tokens run (one row per decoding sequence and step)
        self.prompt_rows = 0        # their prompt tokens run (prefill, after any prefix reuse)
        self.draft_rows = 0         # their draft tokens run (prompt lookup)
        self.accepted_drafts = 0    # of those, the ones kept (each saved a step of its sequence)
        self._piece_cache: dict[int, str] = {}
        self._thread = threading.Thread(target=self._run, name="bitnet-batch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ from any thread

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none): QueueFull when more would wait than max_queue."""
        with self._wake:
            if self._closing:
                raise QueueFull("the server is shutting down")
            free = sum(s.job is None for s in self.slots)
            waiting = len(self._pending) + len(jobs) - free
            if waiting > self.max_queue:
                raise QueueFull(f"{self.parallel - free} of {self.parallel} slots are busy and {len(self._pending)} "
                                f"sequences wait; this request's {len(jobs)} would make {waiting} wait, more than "
                                f"the server's queue holds ({self.max_queue}); try again later")
            self._pending.extend(jobs)
            self._wake.notify()

    def cancel(self, jobs: list[Job]) -> None:
        with self._wake:
            for job in jobs:
                job.cancelled = True
            self._wake.notify()

    @property
    def busy(self) -> int:
        return sum(s.job is not None for s in self.slots)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Stop the thread; sequences still running or waiting end with an ErrorEvent."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    # ------------------------------------------------------------------ the scheduler thread

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._pending and all(s.job is None for s in self.slots):
                    self._wake.wait()
                if self._closing:
                    break
                self._drop_cancelled()
                self._admit()
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - never let one bad step kill the server
                for slot in self.slots:
                    if slot.job is not None:
                        self._finish(slot, ErrorEvent(f"the engine failed: {e}"), cached_ok=False)
            # let the event loop send this step's tokens now: on a small model the next steps
            # would otherwise hold the GIL for its whole switch interval and tokens leave in bursts
            time.sleep(0)
        for slot in self.slots:
            if slot.job is not None:
                self._finish(slot, ErrorEvent("the server is shutting down"))
        while self._pending:
            self._pending.popleft().sink(ErrorEvent("the server is shutting down"))

    def _drop_cancelled(self) -> None:
        self._pending = collections.deque(j for j in self._pending if not j.cancelled)
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                slot.job = None

    def _admit(self) -> None:
        while self._pending and any(s.job is None for s in self.slots):
            job = self._pending.popleft()
            try:  # a request that cannot start fails alone, never the scheduler thread
                self._start(job)
            except Exception as e:  # noqa: BLE001
                job.sink(ErrorEvent(f"the request could not start: {e}"))

    def _start(self, job: Job) -> None:
        """Give `job` a free slot: the one sharing the longest prefix with its prompt, or the least
        recently used one with that prefix copied in."""
        if job.max_tokens == 0 and not job.prompt_logprobs:
            job.sink(DoneEvent("length", len(job.prompt), 0, 0))
            return
        try:
            rng = np.random.default_rng(job.seed)
        except (TypeError, ValueError) as e:
            raise BitnetError(f"seed {job.seed!r}: {e}") from None
        # at least the last prompt token runs (its logits choose the first new token); with
        # prompt log-probabilities every prompt token does
        limit = 0 if job.prompt_logprobs else len(job.prompt) - 1
        best, best_len = None, 0
        for slot in self.slots:
            n = min(common_prefix(slot.cached, job.prompt), limit)
            if n > best_len or (n == best_len and best is not None and best.job is not None and slot.job is None):
                best, best_len = slot, n
        if best is not None and best.job is None:
            chosen = best
        else:
            chosen = min((s for s in self.slots if s.job is None), key=lambda s: s.last_used)
            if best_len:
                self.engine.copy_prefix(best.index, chosen.index, best_len)
                chosen.cached = job.prompt[:best_len]
            else:
                chosen.cached = []
        self._admitted += 1
        chosen.start(job, best_len, self.engine.tokenizer, rng, self._admitted, self.lookup)

    def _step(self) -> None:
        tokens, seqs, pos, want = [], [], [], []
        # per wanted row, its slot and what it is for: "score" the next prompt token, choose the
        # "first" generated token (after the last prompt token), or the "next" one
        rows: list[tuple[_Slot, str]] = []

        def feed(slot: _Slot, token: int, kind: str | None) -> None:
            tokens.append(token), seqs.append(slot.index), pos.append(len(slot.cached))
            want.append(kind is not None)
            if kind is not None:
                rows.append((slot, kind))
            slot.cached.append(token)

        active = [s for s in self.slots if s.job is not None]
        decoding = [s for s in active if not s.todo and s.next_token is not None]
        share = STEP_TOKENS // max(len(decoding), 1) - 1  # drafts keep a step within the engine's chunk
        draft_rows = 0
        for slot in decoding:
            feed(slot, slot.next_token, "next")
            slot.next_token = None
            if slot.drafts:  # as Engine.generate drafts: within the context and the tokens still wanted
                room = min(slot.draft_length.now, share, self.engine.ctx_size - len(slot.history),
                           slot.job.max_tokens - slot.generated - 1)
                slot.expected = slot.drafts.propose(room)
                slot.draft_length.start()
                for token in slot.expected:
                    feed(slot, token, "draft")
                draft_rows += len(slot.expected)
        decode_rows = len(decoding)  # the prompt tokens follow
        budget = max(STEP_TOKENS - len(tokens), MIN_PREFILL)
        for slot in sorted(active, key=lambda s: s.order):  # prompts first come first, a chunk a step
            if budget <= 0 or not slot.todo:
                continue
            take = slot.todo[:budget]
            del slot.todo[:len(take)]
            budget -= len(take)
            for i, t in enumerate(take):
                last = not slot.todo and i == len(take) - 1
                feed(slot, t, "first" if last else "score" if slot.job.prompt_logprobs else None)
        if not tokens:
            return
        started = time.perf_counter()
        logits = self.engine.forward_batch(tokens, seqs, pos, want)
        self.engine_seconds += time.perf_counter() - started
        self.engine_steps += 1
        self.decode_rows += decode_rows
        self.draft_rows += draft_rows
        self.prompt_rows += len(tokens) - decode_rows - draft_rows
        for (slot, kind), row in zip(rows, logits):
            slot.last_used = self.engine_steps
            job = slot.job
            if kind == "score":  # the row after prompt token i scores prompt token i + 1
                lp = _log_softmax(row)
                slot.prompt_lp.append(float(lp[job.prompt[len(slot.prompt_lp)]]))
                slot.prompt_top.append(self._top(lp, job.logprobs or 0))
                continue
            if kind == "draft":  # the row after a draft token: worth sampling while the draft holds
                if job is None or not slot.expected:
                    continue  # the sequence ended, or an earlier draft token was refused
                if slot.next_token != slot.expected.pop(0):  # refused: forget it and the drafts after it
                    slot.draft_length.miss()
                    del slot.cached[len(slot.cached) - len(slot.expected) - 1:]
                    slot.expected = []
                    continue
                self.accepted_drafts += 1
                slot.draft_length.hit(whole=not slot.expected)
                self._choose(slot, row)  # next_token already ran, as this draft token: choose the one after it
                continue
            if kind == "first" and job.prompt_logprobs:
                job.sink(PromptLogprobs(slot.prompt_lp, slot.prompt_top))
                if job.max_tokens == 0:
                    self._finish(slot, DoneEvent("length", len(job.prompt), 0, slot.reused))
                    continue
            self._choose(slot, row)

    def _choose(self, slot: _Slot, row: np.ndarray) -> None:
        """The next token of slot's sequence from its logits row, as Engine.generate picks it."""
        job = slot.job
        try:
            allowed = job.constraint.allowed() if job.constraint else None
        except BitnetError as e:  # this sequence's schema leads nowhere (deeper than MAX_DEPTH): it alone fails
            self._finish(slot, ErrorEvent(str(e)), cached_ok=False)
            return
        token = sample(row, job.params, slot.rng, slot.history, allowed, slot.history[len(job.prompt):])
        lp = top = None
        if job.logprobs is not None:
            full = _log_softmax(row)
            lp, top = float(full[token]), self._top(full, job.logprobs)
        if token in self.engine.stop_token_ids and not job.ignore_eos:
            if job.logprobs is not None:  # listed (no text): scoring clients count on one entry per token
                job.sink(TokenEvent("", token, lp, top))
            self._finish(slot, DoneEvent("stop", len(job.prompt), slot.generated, slot.reused))
            return
        if job.constraint:
            job.constraint.push(token)
        slot.history.append(token)
        if slot.drafts:
            slot.drafts.extend([token])
        slot.generated += 1
        self.generated_tokens += 1
        piece = slot.text.push(token)
        reason = "stop" if slot.text.stopped else "length" if (
            slot.generated >= job.max_tokens or len(slot.history) >= self.engine.ctx_size) else None
        if reason == "length":
            piece += slot.text.flush()  # the last token carries all the text: one event per token
        job.sink(TokenEvent(piece, token, lp, top))
        if reason:
            self._finish(slot, DoneEvent(reason, len(job.prompt), slot.generated, slot.reused))
        else:
            slot.next_token = token

    def _finish(self, slot: _Slot, event, cached_ok: bool = True) -> None:
        job, slot.job = slot.job, None
        if not cached_ok:
            slot.cached = []
        if isinstance(event, DoneEvent):
            rest = slot.text.flush()  # text held back when an end-of-sequence token ended it
            if rest:
                job.sink(TokenEvent(rest, None))
        job.sink(event)

    def piece(self, token: int) -> str:
        """A token's own text (for log-probability listings)."""
        text = self._piece_cache.get(token)
        if text is None:
            text = self._piece_cache[token] = self.engine.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def _top(self, lp: np.ndarray, k: int) -> dict[str, float] | None:
        if k <= 0:
            return None
        ids = np.argpartition(-lp, k - 1)[:k] if k < lp.size else np.arange(lp.size)
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        out: dict[str, float] = {}
        for i in ids:
            out.setdefault(self.piece(int(i)), float(lp[i]))
        return out


__all__ = ["DoneEvent", "ErrorEvent", "Job", "PromptLogprobs", "QueueFull", "Scheduler", "TokenEvent"]
