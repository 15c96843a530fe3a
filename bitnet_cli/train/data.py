"""Corpus -> tokenizer -> one flat token memmap (cached by content hash) -> deterministic batches.

The corpus is read and tokenised in chunks and written straight to disk, so a corpus larger
than RAM works; training reads windows out of the memmap. Batches depend only on
(seed, step, micro-step, rank), so a resumed or re-sharded run sees the same data.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from bitnet_cli.errors import BitnetError
from bitnet_cli.files import bundled_corpus, special_kind
from bitnet_cli.files import cache_root as shared_cache_root
from bitnet_cli.tokenizer import BOS, EOS, special_id
from bitnet_cli.tokenizer import train_bpe as train_bpe_on
from bitnet_cli.train.recipe import BUNDLED_CORPUS, DataSpec
_CHUNK_CHARS = 1 << 20  # tokenise ~1 MB of text at a time


def cache_root(spec: DataSpec) -> Path:
    return Path(spec.cache_dir).expanduser() if spec.cache_dir else shared_cache_root()


def cache_subdir(root: Path, name: str) -> Path:
    """``root/name``, created; an unusable cache is named with the settings that choose it."""
    path = root / name
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise BitnetError(f"token cache {root}: cannot write {path} ({e.strerror or e}); set data.cache_dir "
                          "or $BITNET_CACHE to a writable directory") from None
    return path


def resolve_files(spec: DataSpec, base_dir: Path) -> list[Path]:
    """The corpus files in recipe order (globs expanded, sorted), each checked to exist."""
    out: list[Path] = []
    for pattern in spec.files:
        if pattern == BUNDLED_CORPUS:
            out.append(bundled_corpus())
            continue
        p = Path(pattern).expanduser()
        if not p.is_absolute():
            p = base_dir / p
        if any(c in pattern for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            if not matches:
                raise BitnetError(f"data.files: no file matches {pattern!r} (looked in {p.parent})")
            out.extend(m for m in matches if m.is_file())
        elif not p.is_file():
            kind = "a directory (name its files, e.g. with a glob: dir/*.txt)" if p.is_dir() else special_kind(p)
            raise BitnetError(f"data.files: {p} is {kind}" if kind else f"data.files: {p} not found")
        else:
            out.append(p)
    return out


def iter_documents(path: Path) -> Iterator[tuple[str, bool]]:
    """(text piece, ends a document) pairs: a .txt file is one document read in ~1 MB pieces cut at
    line ends; .jsonl(.gz) holds one document per line in its 'text' field."""
    name = path.name
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise BitnetError(f"{path}:{i}: expected a JSON object with a 'text' field") from None
                    yield text, True
            return
        with open(path, "r", encoding="utf-8") as f:
            while True:
                piece = f.read(_CHUNK_CHARS)
                if not piece:
                    break
                piece += f.readline()  # finish the line so no word is cut in two
                yield piece, False
        yield "", True
    except UnicodeDecodeError as e:
        raise BitnetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise BitnetError(f"{path}: cannot read ({e})") from None


def corpus_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- tokenizer


def train_bpe(files: list[Path], vocab_size: int, max_chars: int):
    """A byte-level BPE (bitnet_cli.tokenizer.train_bpe) on at most `max_chars` of the corpus files."""

    def texts():
        left = max_chars
        for p in files:
            for piece, _ in iter_documents(p):
                if left <= 0:
                    return
                piece = piece[:left]
                left -= len(piece)
                for i in range(0, len(piece), 10_000):
                    yield piece[i : i + 10_000]

    return train_bpe_on(texts(), vocab_size)


def load_tokenizer(path: str | Path, base_dir: Path = Path(".")):
    from tokenizers import Tokenizer

    p = Path(path).expanduser()
    if not p.is_absolute():
        p = base_dir / p
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise BitnetError(f"data.tokenizer.path: {p} not found")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise BitnetError(f"{p}: not a tokenizer.json ({e})") from None


def tokenizer_config(tok, src_dir: Path | None = None) -> dict:
    """tokenizer_config.json: the source's if it has one, else bos/eos from our special tokens."""
    if src_dir is not None and (src_dir / "tokenizer_config.json").is_file():
        return json.loads((src_dir / "tokenizer_config.json").read_text())
    vocab = tok.get_vocab()
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if BOS in vocab:
        cfg["bos_token"] = BOS
    if EOS in vocab:
        cfg["eos_token"] = EOS
    return cfg


def prepare_tokenizer(spec: DataSpec, files: list[Path], base_dir: Path, corpus_digest: str):
    """(tokenizer, source dir or None): load data.tokenizer.path, or train a BPE once and cache it."""
    from tokenizers import Tokenizer

    if spec.tokenizer.path:
        tok = load_tokenizer(spec.tokenizer.path, base_dir)
        src = Path(spec.tokenizer.path).expanduser()
        src = src if src.is_absolute() else base_dir / src
        return tok, (src if src.is_dir() else src.parent)
    key = hashlib.sha256(f"{corpus_digest}:{spec.tokenizer.vocab_size}:{spec.tokenizer.train_chars}".encode())
    path = cache_subdir(cache_root(spec), "tokenizers") / f"{key.hexdigest()[:24]}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path)), None
    tok = train_bpe(files, spec.tokenizer.vocab_size, spec.tokenizer.train_chars)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok, None


# ----------------------------------------------------------------------------- token memmap


def tokenize_to_memmap(files: list[Path], tok, cache_dir: Path, corpus_digest: str, progress=None) -> Path:
    """Tokenise the corpus once into ``<hash>.bin`` (uint16, or uint32 for vocabularies > 65535).

    Documents are separated by the tokenizer's end-of-text token. The file is written to a
    temporary name and renamed, so an interrupted run never leaves a truncated cache entry.
    """
    key = hashlib.sha256(f"{corpus_digest}:{tok.to_str()}".encode()).hexdigest()[:24]
    out = cache_subdir(cache_dir, "tokens") / f"{key}.bin"
    if out.is_file() and out.with_suffix(".json").is_file():
        return out
    dtype = np.uint16 if tok.get_vocab_size() <= 65535 else np.uint32
    eos = special_id("eos", tok, {}, {}, guess=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    n = 0
    total = sum(p.stat().st_size for p in files)
    done = 0
    with open(tmp, "wb") as f:
        for p in files:
            batch: list[str] = []
            ends: list[bool] = []

            def flush():
                nonlocal n
                for enc, end in zip(tok.encode_batch(batch, add_special_tokens=False), ends):
                    ids = enc.ids + ([eos] if end and eos is not None else [])
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
                    n += len(ids)
                batch.clear()
                ends.clear()

            for piece, end in iter_documents(p):
                batch.append(piece)
                ends.append(end)
                if sum(map(len, batch)) >= 8 * _CHUNK_CHARS:
                    flush()
            flush()
            done += p.stat().st_size
            if progress is not None:
                progress(done, total)
    out.with_suffix(".json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "tokens": n,
                                                     "files": [str(p) for p in files]}))
    os.replace(tmp, out)
    return out


@dataclass
class TokenData:
    """The token stream split into train (head) and validation (tail) parts."""

    tokens: np.ndarray  # memmap, 1-D
    n_train: int
    seq_len: int
    seed: int

    @classmethod
    def open(cls, path: Path, val_fraction: float, seq_len: int, seed: int) -> "TokenData":
        meta = json.loads(path.with_suffix(".json").read_text())
        tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
        n_val = int(len(tokens) * val_fraction)
        n_train = len(tokens) - n_val
        if n_train < 4 * (seq_len + 1) or n_val < seq_len + 1:
            raise BitnetError(
                f"the corpus has {len(tokens)} tokens: too few for train.seq_len {seq_len} "
                f"(val_fraction {val_fraction}); use more text or a shorter seq_len")
        return cls(tokens, n_train, seq_len, seed)

    @property
    def n_val(self) -> int:
        return len(self.tokens) - self.n_train

    def _windows(self, offsets: np.ndarray):
        import torch

        idx = offsets[:, None] + np.arange(self.seq_len + 1)[None, :]
        w = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def train_batch(self, step: int, micro: int, rank: int, world: int, batch_size: int, grad_accum: int):
        """Micro-batch ``micro`` of ``rank`` at optimiser ``step``: a slice of the step's global batch,
        whose window offsets depend on (seed, step) only."""
        n_global = batch_size * world * grad_accum
        rng = np.random.default_rng([self.seed, step])
        offsets = rng.integers(0, self.n_train - self.seq_len - 1, size=n_global)
        first = (micro * world + rank) * batch_size
        return self._windows(offsets[first : first + batch_size])

    def val_batches(self, n_batches: int, batch_size: int, rank: int, world: int):
        """The same evenly spaced validation windows every time, split evenly over the ranks (each
        rank runs the same number of forwards, which FSDP's collectives need)."""
        per_rank = max(1, n_batches // world)
        count = per_rank * world * batch_size
        offsets = np.linspace(self.n_train, len(self.tokens) - self.seq_len - 1, count).astype(np.int64)
        for b in range(rank * per_rank, (rank + 1) * per_rank):
            yield self._windows(offsets[b * batch_size : (b + 1) * batch_size])

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the train split's token frequencies: the loss of the best
        context-free model, a bar a trained LM must clear by far."""
        counts = np.zeros(int(self.tokens.max()) + 1, dtype=np.int64)
        for i in range(0, self.n_train, 1 << 24):
            chunk = self.tokens[i : min(i + (1 << 24), self.n_train)]
            c = np.bincount(chunk, minlength=len(counts))
            counts[: len(c)] += c
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
