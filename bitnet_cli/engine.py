"""The inference engine: a packed model file run by the C decoder (kernels/).

    from bitnet_cli.engine import Engine
    eng = Engine.load("model.bin", threads=None, ctx_size=None)  # threads: physical cores
    eng = Engine.load("model.bin", kv_cache="f16")  # half the KV cache's bytes (see KV_CACHE_TYPES)
    logits = eng.forward(ids)                     # float32 [len(ids), vocab]; fills the KV cache
    more = eng.forward(cont, n_past=len(ids))     # continue from the cached positions
    gen = eng.generate("Once upon a time", max_tokens=64, seed=1)
    for piece in gen: print(piece, end="")        # text as it is produced
    gen.stats                                      # load / first-token time, tokens per second

The weights streamed for every token (the ternary matrices and the output head) are read once into
anonymous memory backed by 2 MB transparent huge pages where Linux offers them (decode measured
~8% faster at 2 threads: a 4 KB page costs a TLB miss every 4 KB of a sequential read); without
huge pages, or with $BITNET_HUGEPAGES=0, the C model points into the file's memory map instead.
Either way the Engine keeps that memory alive until close(). One KV cache per Engine; forward(tokens, n_past)
drops cached positions >= n_past, so a shared context can be computed once and several
continuations scored from it; forward_branches(n_past, [cont, ...]) scores them all in one pass. The kernels' ISA follows $BITNET_ISA (see bitnet_cli.kernels).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import mmap
import re
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from bitnet_cli import kernels, safejson, tokenizer
from bitnet_cli.arch import EMBED, FINAL_NORM, layer_tensor
from bitnet_cli.constrain import (JSON_OBJECT, JsonConstraint, JsonVocabulary, Schema, ToolCallConstraint, ToolCalls,
                                  output_schema, token_bytes, tool_call_list_schema)
from bitnet_cli.errors import BitnetError, warn
from bitnet_cli.lookup import DraftLength, PromptLookup, check_lookup
from bitnet_cli.pack.embeddings import embedding_type
from bitnet_cli.rope import inv_freq as rope_inv_freq
from bitnet_cli.sampling import SamplingParams, logit_bias_pairs, sample
from bitnet_cli.tokenizer import special_id

DEFAULT_CTX = 4096

# The KV cache's element types (kernels/bitnet.h, BN_KV_*): name -> (C enum, bytes per element).
# f32 keeps keys and values as computed (the results match transformers'); f16 rounds them to
# nearest even as they are written, halving the bytes per position, and attention widens them
# back to f32 exactly, so every kernel path still gives the same bits as the scalar one.
KV_CACHE_TYPES = {"f32": ("BN_KV_F32", 4), "f16": ("BN_KV_F16", 2)}
DEFAULT_KV_CACHE = "f32"
DEFAULT_MAX_TOKENS = 128  # tokens generated when the caller gives no limit (`bitnet run -n`)


def kv_cache_type(name) -> str:
    """`name` when it is a KV cache type (KV_CACHE_TYPES), else a BitnetError naming the choices."""
    if not isinstance(name, str) or name not in KV_CACHE_TYPES:
        raise BitnetError(f"kv_cache must be one of {', '.join(KV_CACHE_TYPES)}, got {name!r}", param="kv_cache")
    return name


def kv_bytes_per_position(dims, kv_cache: str = DEFAULT_KV_CACHE) -> int:
    """Bytes one cached position takes: keys and values of every layer and KV head."""
    return 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * KV_CACHE_TYPES[kv_cache][1]


def rope_tables(ctx: int, head_dim: int, theta: float, scaling: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin float32 [ctx, head_dim/2] as transformers computes them in fp32 (inv_freq, with any
    llama3 scaling: bitnet_cli.rope; then pos * inv_freq).

    The fp32 angles are those of torch; cos/sin are taken in float64 and rounded once, which is
    what torch's (<= 1 ulp) fp32 cos/sin approximate. Rows are computed in blocks so that the
    float64 temporaries stay small whatever the context (only the float32 tables grow with it).
    """
    f32 = np.float32
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    cos = np.empty((ctx, head_dim // 2), dtype=f32)
    sin = np.empty_like(cos)
    block = max(1, (1 << 20) // max(1, head_dim // 2))
    for start in range(0, ctx, block):
        stop = min(ctx, start + block)
        angles = (np.arange(start, stop, dtype=f32)[:, None] * inv_freq[None, :]).astype(np.float64)
        cos[start:stop] = np.cos(angles)
        sin[start:stop] = np.sin(angles)
    return cos, sin


def context_bytes(dims, ctx: int, threads: int, kv_cache: str = DEFAULT_KV_CACHE) -> int:
    """Memory a context of `ctx` tokens takes once it is full: the KV cache (keys and values of
    every layer, in kv_cache's element type), the RoPE tables and the attention scratch
    (kernels/model.c, bn_model_new)."""
    kv = kv_bytes_per_position(dims, kv_cache) * ctx
    rope = ctx * dims.head_dim * 4
    scratch = threads * ctx * 4 * (dims.num_heads // dims.num_kv_heads + 1)
    return kv + rope + scratch


def memory_limit() -> int:
    """Bytes this process may use: physical memory, or less under an address-space/data rlimit."""
    try:
        limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        limit = 1 << 62
    try:
        import resource

        for which in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
            soft = resource.getrlimit(which)[0]
            if soft != resource.RLIM_INFINITY:
                limit = min(limit, soft)
    except (ImportError, ValueError, OSError):
        pass
    return limit


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token lists: how much of a cached sequence
    a new one can reuse (Engine.cached_prefix, the server's slots)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def read_into_huge_pages(pm, names: list[str]) -> tuple[mmap.mmap, dict[str, np.ndarray]]:
    """Tensors `names` of a packed file read (not mapped) into one anonymous huge-page region:
    the region, and a view per tensor. Reading through the file keeps the file's pages out of
    this process, so resident memory holds the weights once."""
    offsets, total = {}, 0
    for name in dict.fromkeys(names):
        offsets[name] = total
        total += -(-pm.entries[name].nbytes // 64) * 64  # keep every tensor 64-byte aligned
    region = kernels.huge_page_region(total)
    views, memory = {}, memoryview(region)
    try:
        with open(pm.path, "rb") as f:
            for name, at in offsets.items():
                e = pm.entries[name]
                f.seek(e.begin)
                if f.readinto(memory[at:at + e.nbytes]) != e.nbytes:
                    raise BitnetError(f"{pm.path}: file is truncated inside tensor {name!r}")
                views[name] = pm.tensor_view(name, region, at)
    except OSError as e:
        raise BitnetError(f"{pm.path}: cannot read: {e.strerror}") from None
    finally:
        memory.release()
    return region, views


def check_threads(threads) -> int:
    """`threads` if it is a positive integer, else the one error every command gives for --threads."""
    if type(threads) is not int or threads < 1:
        raise BitnetError(f"threads must be a positive integer, got {threads!r}", param="threads")
    return threads


@dataclass
class GenerationStats:
    load_s: float = 0.0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV was already cached
    prompt_s: float = 0.0
    time_to_first_token_s: float = 0.0
    generated_tokens: int = 0
    generation_s: float = 0.0
    drafted_tokens: int = 0   # prompt lookup (generate(lookup=)): draft tokens run ...
    accepted_tokens: int = 0  # ... and those that were what sampling chose (each saved a pass)
    stop_reason: str = ""  # "eos", "stop", "max_tokens" or "context"

    @property
    def prompt_tokens_per_s(self) -> float:
        run = self.prompt_tokens - self.reused_tokens
        return run / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def generation_tokens_per_s(self) -> float:
        # the first token comes from the prompt pass; the rest each cost one decode step
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.generation_s if self.generation_s > 0 else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), prompt_tokens_per_s=round(self.prompt_tokens_per_s, 2),
                    generation_tokens_per_s=round(self.generation_tokens_per_s, 2))


class Generation:
    """An iterator of text pieces; once iteration ends, `stats` is complete, `text` holds all of the
    text and `token_ids` the generated ids (an end-of-sequence token is not included)."""

    def __init__(self, pieces: Iterator[str], stats: GenerationStats, token_ids: list[int]):
        self._pieces = pieces
        self.stats = stats
        self.text = ""
        self.token_ids = token_ids

    def __iter__(self):
        return self

    def __next__(self) -> str:
        piece = next(self._pieces)
        self.text += piece
        return piece


class Engine(kernels.CResource):
    """A packed model on the C engine (no torch): open it with :meth:`load`.

    :meth:`generate` streams text (sampling, stop strings, stats); :meth:`forward` returns logits and
    keeps a KV cache of ``ctx_size`` positions, which :meth:`generate` reuses for a shared prefix;
    :meth:`encode`/:meth:`decode` use the tokenizer embedded in the file. :meth:`close` (or ``with``)
    releases the weights.
    """

    def __init__(self, pm, threads: int, ctx_size: int, isa: int, kv_cache: str = DEFAULT_KV_CACHE):
        t0 = time.perf_counter()
        self._ffi, self._lib = kernels.lib()
        self.pm = pm
        self.config = pm.config
        self.dims = pm.dims
        self.vocab_size = pm.dims.vocab_size
        self.ctx_size = ctx_size
        self.threads = threads
        self.kv_cache = kv_cache_type(kv_cache)
        self.isa = kernels.isa_name(isa, pm.ternary_layout.option)
        self._init_tokens(pm)
        self._keep: list = []  # cdata buffers that must outlive the C model
        desc = self._describe(pm, ctx_size)
        err = self._ffi.new("char[256]")
        model = self._lib.bn_model_new(desc, threads, isa, err, 256)
        if model == self._ffi.NULL:
            raise BitnetError(f"{pm.path}: {self._ffi.string(err).decode()}")
        self._model = model
        self._cached: list[int] = []  # the tokens whose keys/values fill cache positions 0..n-1
        self.n_sequences = 1  # KV caches (set_sequences); forward() uses the first
        self._json_vocabulary: JsonVocabulary | None = None  # json_constraint(): built when first asked for
        self.load_s = time.perf_counter() - t0

    def _init_tokens(self, pm) -> None:
        """The stored tokenizer, its config, and the special ids the engine acts on."""
        self.tokenizer = tokenizer.load(pm.tokenizer_json, f"{pm.path}: the stored tokenizer")
        self.tokenizer_config = pm.tokenizer_config
        self.bos_token_id = special_id("bos", self.tokenizer, self.tokenizer_config, self.config, self.vocab_size)
        self.eos_token_id = special_id("eos", self.tokenizer, self.tokenizer_config, self.config, self.vocab_size)
        self.stop_token_ids = self._stop_ids()

    def _pointer(self, array: np.ndarray, ctype: str):
        """A C pointer to `array`, both kept alive as long as the engine."""
        buf = self._ffi.from_buffer(ctype + "[]", array)
        self._keep.append((array, buf))
        return buf

    def _describe(self, pm, ctx_size: int):
        """The C model's descriptor: pointers to every tensor, named by bitnet_cli.arch's tables.
        The tensors streamed per token (projections, head) are read into huge pages when Linux
        offers them; the rest (and, without huge pages, everything) stays in the file's map."""
        d, ffi, ptr = pm.dims, self._ffi, self._pointer
        streamed = [layer_tensor(i, proj.name) for i in range(d.num_layers) for proj in d.projections()]
        self.huge_pages = kernels.huge_pages_available()
        views: dict[str, np.ndarray] = {}
        if self.huge_pages:
            region, views = read_into_huge_pages(pm, streamed + [d.head_name])
            self._keep.append(region)

        def tensor(name: str) -> np.ndarray:
            return views[name] if name in views else pm.tensor(name)

        def finite(name: str) -> np.ndarray:
            """A float32 tensor checked for NaN/inf: the norms and scales are small, and one bad
            value in them turns every logit into NaN."""
            t = pm.tensor(name)
            if not np.isfinite(t).all():
                raise BitnetError(f"{pm.path}: tensor {name!r} holds NaN or infinite values (a damaged file? "
                                  "`bitnet info --verify` checks every tensor)")
            return t

        layers = ffi.new("bn_layer_desc[]", d.num_layers)
        self._keep.append(layers)
        for i in range(d.num_layers):
            for norm in d.layer_norms():
                setattr(layers[i], norm.c_field, ptr(finite(layer_tensor(i, norm.name)), "float"))
            for proj in d.projections():
                setattr(layers[i], "w" + proj.c_field, ptr(tensor(layer_tensor(i, proj.name)), "uint8_t"))
                setattr(layers[i], "g" + proj.c_field, float(finite(layer_tensor(i, proj.name, "weight_scale"))[0]))
                if d.has_bias(proj.name):
                    setattr(layers[i], "b" + proj.c_field, ptr(finite(layer_tensor(i, proj.name, "bias")), "float"))
                if d.bitlinear_norm(proj.name):
                    setattr(layers[i], "n" + proj.c_field, ptr(finite(layer_tensor(i, d.bitlinear_norm(proj.name))), "float"))
        desc = ffi.new("bn_model_desc *")
        self._keep.append(desc)
        desc.n_layers, desc.hidden, desc.ffn = d.num_layers, d.hidden_size, d.intermediate_size
        desc.n_heads, desc.n_kv_heads, desc.head_dim = d.num_heads, d.num_kv_heads, d.head_dim
        desc.vocab, desc.ctx, desc.rms_eps = d.vocab_size, ctx_size, d.rms_norm_eps
        kind = embedding_type(pm.embeddings)
        desc.emb_type = desc.head_type = getattr(self._lib, kind.c_enum)
        for name in dict.fromkeys([EMBED, d.head_name]):
            problem = kind.check(tensor(name)) if kind.check else None
            if problem:
                raise BitnetError(f"{pm.path}: tensor {name!r}: {problem} (a damaged file? "
                                  "`bitnet info --verify` checks every tensor)")
        desc.embed = ptr(tensor(EMBED), kind.c_values)
        desc.head = ptr(tensor(d.head_name), kind.c_values)
        if "_scale" in kind.suffixes:
            desc.embed_scale = ptr(finite(EMBED + "_scale"), "float")
            desc.head_scale = ptr(finite(d.head_name + "_scale"), "float")
        desc.final_norm = ptr(finite(FINAL_NORM), "float")
        cos, sin = rope_tables(ctx_size, d.head_dim, d.rope_theta, d.rope_scaling)
        desc.ffn_act = {"relu2": self._lib.BN_ACT_RELU2, "silu": self._lib.BN_ACT_SILU}[d.hidden_act]
        desc.bitlinear_norm_eps = d.bitlinear_norm_eps or 0.0
        desc.rope_cos, desc.rope_sin = ptr(cos, "float"), ptr(sin, "float")
        desc.layers = layers
        desc.layout = getattr(self._lib, pm.ternary_layout.c_enum)
        desc.kv_type = getattr(self._lib, KV_CACHE_TYPES[self.kv_cache][0])
        return desc

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path, threads: int | None = None, ctx_size: int | None = None, isa: str | None = None,
             verify: bool = False, kv_cache: str = DEFAULT_KV_CACHE) -> "Engine":
        """Open a packed model (`bitnet pack` output), or a GGUF (imported once into a cached packed file).
        threads: default physical cores; ctx_size: default min(max_position_embeddings, 4096); isa: default
        $BITNET_ISA, else the autotune's choice (bitnet_cli.kernels); kv_cache: the KV cache's element
        type, "f32" (default) or "f16" (half the bytes; KV_CACHE_TYPES).

        The metadata checksum (config, tokenizer) is always checked, and the norms and scales must
        be finite; verify=True also recomputes every tensor's crc32 (reads the whole file, as
        `bitnet info --verify` does)."""
        from bitnet_cli.pack import PackedModel
        from bitnet_cli.pack.format import metadata_checksum
        from bitnet_cli.pack.gguf_cache import model_file

        t0 = time.perf_counter()
        isa_id = kernels.resolve_isa(isa)
        kv_cache_type(kv_cache)
        path = model_file(path)  # a GGUF: imported once into a cached packed file
        pm = PackedModel.open(path)
        d = pm.dims
        size = Path(path).stat().st_size
        end = max(e.begin + e.nbytes for e in pm.entries.values())
        if end > size:
            raise BitnetError(f"{path}: file is truncated ({size} bytes, the header describes {end})")
        if pm.metadata.get("metadata_checksum") != metadata_checksum(pm.metadata):
            raise BitnetError(f"{path}: the metadata (config, tokenizer) does not match its checksum: the file "
                              "is damaged (re-pack it)")
        if verify:
            bad = pm.verify()
            if bad:
                raise BitnetError(f"{path}: {len(bad)} tensor(s) do not match their checksums, e.g. {bad[0]!r}: "
                                  "the file is damaged (re-pack it)")
        smallest = min(min(p.shape(d)[0] for p in d.projections()), d.vocab_size)
        cores = kernels.physical_cores()
        if threads is None:
            threads = min(cores, smallest)
        check_threads(threads)
        limit = min(smallest, kernels.ThreadPool.MAX_THREADS)
        if threads > limit:
            why = (f"its smallest weight matrix has {smallest} rows" if smallest < kernels.ThreadPool.MAX_THREADS
                   else "the thread pool's limit")
            raise BitnetError(f"threads {threads} is more than this model can use (at most {limit}: {why}); "
                              f"this machine has {cores} physical core(s), the default", param="threads")
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if threads > cpus:
            warn(f"warning: {threads} threads are more than the {cpus} CPU(s) this process may run on "
                 f"({cores} physical core(s)); threads will wait for each other (the default is {min(cores, smallest)})")
        max_ctx = d.max_position_embeddings
        if ctx_size is None:
            ctx_size = min(max_ctx, DEFAULT_CTX)
        if type(ctx_size) is not int or not 1 <= ctx_size <= max_ctx:
            raise BitnetError(f"ctx_size must be between 1 and {max_ctx} (the model's max_position_embeddings), "
                              f"got {ctx_size!r}", param="ctx_size")
        need, have = context_bytes(d, ctx_size, threads, kv_cache) + size, memory_limit()
        if need > have:
            raise BitnetError(f"ctx_size {ctx_size} needs {need / 2**30:.1f} GiB (the model, and a KV cache and "
                              f"RoPE tables for {ctx_size} tokens) but this process may use "
                              f"{have / 2**30:.1f} GiB; choose a smaller context", param="ctx_size")
        engine = cls(pm, threads, ctx_size, isa_id, kv_cache)
        engine.load_s = time.perf_counter() - t0
        return engine

    def _stop_ids(self) -> set[int]:
        ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        value = self.config.get("eos_token_id")
        for v in value if isinstance(value, list) else [value]:
            if type(v) is int and 0 <= v < self.vocab_size:
                ids.add(v)
        return ids

    def close(self):
        if getattr(self, "_model", None) is not None:
            self._lib.bn_model_free(self._model)
            self._model = None
            self._keep.clear()

    # ------------------------------------------------------------------ tokens

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, starting with BOS (once) when the model has one and add_bos."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ forward

    def _checked_ids(self, what: str, tokens, n_past: int) -> np.ndarray:
        """tokens as int32, once they are known to fit after n_past cached positions."""
        if self._model is None:
            raise BitnetError("the engine is closed")
        ids = token_ids(tokens, self.vocab_size, what)
        if not _is_int(n_past) or not 0 <= n_past <= len(self._cached):
            raise BitnetError(f"{what}: n_past={n_past!r} but only {len(self._cached)} positions are cached "
                              f"(give an integer from 0 to {len(self._cached)})")
        if n_past + ids.size > self.ctx_size:
            raise BitnetError(f"{n_past + ids.size} tokens do not fit the context of {self.ctx_size} "
                              "(raise ctx_size, up to the model's max_position_embeddings)", param="ctx_size")
        return ids

    def forward(self, tokens: Sequence[int], n_past: int = 0, all_logits: bool = True) -> np.ndarray:
        """Logits float32 [len(tokens), V] (or [1, V] for the last token) for tokens at positions
        n_past.. ; cached positions >= n_past are replaced. n_past may not exceed the cached count."""
        ids = self._checked_ids("forward", tokens, n_past)
        out = np.empty((ids.size if all_logits else 1, self.vocab_size), dtype=np.float32)
        ffi = self._ffi
        del self._cached[n_past:]
        rc = self._lib.bn_forward(self._model, ffi.from_buffer("int32_t[]", ids), ids.size, n_past,
                                  ffi.from_buffer("float[]", out), int(all_logits))
        if rc != 0:
            raise BitnetError("forward: the C engine refused its arguments")
        self._cached.extend(int(i) for i in ids)
        _check_logits(out, self.pm.path)
        return out

    def forward_branches(self, n_past: int, branches: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits [len(b), V] for each branch b, every one continuing the first n_past cached
        tokens (as forward(b, n_past) would), all run in one pass: the weights are streamed once
        for all of them. Together the branches need n_past + their total length <= ctx_size.
        Afterwards only the first n_past positions stay cached."""
        branches = list(branches)
        if not branches or any(hasattr(b, "__len__") and len(b) == 0 for b in branches):
            raise BitnetError("forward_branches: every branch needs at least one token")
        parts = [token_ids(b, self.vocab_size, "forward_branches") for b in branches]
        lengths = [p.size for p in parts]
        ids = self._checked_ids("forward_branches", np.concatenate(parts), n_past)
        owner = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
        out = np.empty((ids.size, self.vocab_size), dtype=np.float32)
        ffi = self._ffi
        del self._cached[n_past:]
        rc = self._lib.bn_forward_branches(self._model, ffi.from_buffer("int32_t[]", ids), ids.size, n_past,
                                           ffi.from_buffer("int32_t[]", owner), ffi.from_buffer("float[]", out))
        if rc != 0:
            raise BitnetError("forward_branches: the C engine refused its arguments")
        _check_logits(out, self.pm.path)
        return np.split(out, np.cumsum(lengths)[:-1])

    # ------------------------------------------------------------------ several sequences

    @property
    def kv_bytes_per_sequence(self) -> int:
        """Bytes of one sequence's KV cache at the full context (keys and values of every layer, in
        the kv_cache element type); committed as positions are written. An extra sequence costs this
        and nothing else."""
        return kv_bytes_per_position(self.dims, self.kv_cache) * self.ctx_size

    def set_sequences(self, parallel: int) -> None:
        """Room for `parallel` independent sequences (forward_batch), each with its own KV cache of
        ctx_size positions; every cached position is dropped. forward() uses sequence 0."""
        if self._model is None:
            raise BitnetError("the engine is closed")
        if type(parallel) is not int or parallel < 1:
            raise BitnetError(f"parallel must be a positive integer, got {parallel!r}", param="parallel")
        need, have = self.kv_bytes_per_sequence * parallel, memory_limit()
        if need > have:  # committed only as positions fill: a server would start, then be killed under load
            raise BitnetError(f"parallel {parallel} needs {need / 2**30:.1f} GiB of KV caches once every sequence "
                              f"fills its {self.ctx_size} positions ({self.kv_bytes_per_sequence / 2**20:.2f} MiB each) "
                              f"but this process may use {have / 2**30:.1f} GiB; lower parallel or ctx_size",
                              param=("parallel", "ctx_size"))
        if self._lib.bn_model_set_seqs(self._model, parallel) != 0:
            raise BitnetError(f"out of memory for {parallel} KV caches of {self.ctx_size} positions "
                              f"({self.kv_bytes_per_sequence / 2**20:.0f} MiB each); lower parallel or ctx_size",
                              param=("parallel", "ctx_size"))
        self.n_sequences = parallel
        self._cached = []

    def forward_batch(self, tokens: Sequence[int], seqs: Sequence[int], positions: Sequence[int],
                      want: Sequence[bool]) -> np.ndarray:
        """One pass over tokens of several sequences (see set_sequences): token i belongs to
        sequence seqs[i] at position positions[i] and sees that sequence's positions up to its own;
        a sequence's tokens come in order at consecutive positions, the earlier ones cached. Returns
        float32 logits [sum(want), V], one row per wanted token, each exactly what forward() gives
        that token when its sequence runs alone."""
        if self._model is None:
            raise BitnetError("the engine is closed")
        ffi = self._ffi
        ids = token_ids(tokens, self.vocab_size, "forward_batch")
        seq = np.ascontiguousarray(seqs, dtype=np.int32)
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        flags = np.ascontiguousarray(want, dtype=np.int8)
        if not ids.size or not ids.size == seq.size == pos.size == flags.size:
            raise BitnetError("forward_batch: tokens, seqs, positions and want need one entry per token")
        out = np.empty((int(np.count_nonzero(flags)), self.vocab_size), dtype=np.float32)
        if 0 in seq:
            self._cached = []  # sequence 0 is forward()'s: its record no longer holds
        rc = self._lib.bn_forward_batch(self._model, ffi.from_buffer("int32_t[]", ids), ids.size,
                                        ffi.from_buffer("int32_t[]", seq), ffi.from_buffer("int32_t[]", pos),
                                        ffi.from_buffer("int8_t[]", flags), ffi.from_buffer("float[]", out))
        if rc != 0:
            raise BitnetError("forward_batch: a token, sequence or position is out of range or out of order")
        _check_logits(out, self.pm.path)
        return out

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Positions [0, n) of sequence src's KV cache copied into sequence dst's."""
        if self._model is None or self._lib.bn_copy_prefix(self._model, src, dst, n) != 0:
            raise BitnetError(f"copy_prefix: bad arguments ({src}, {dst}, {n})")

    def cached_prefix(self, ids: Sequence[int]) -> int:
        """How many leading tokens of ids the KV cache already holds, leaving at least the last
        token to run (its logits are what a caller wants): forward(ids[n:], n_past=n) then
        gives what forward(ids) would."""
        return common_prefix(self._cached, ids[:-1])

    def _prefill(self, ids: list[int]) -> tuple[np.ndarray, int]:
        """Last-token logits for ids, reusing the longest cached prefix; returns (logits, reused)."""
        reuse = self.cached_prefix(ids)
        return self.forward(ids[reuse:], n_past=reuse, all_logits=False)[0], reuse

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_or_ids: str | Sequence[int], max_tokens: int = DEFAULT_MAX_TOKENS,
                 temperature: float = SamplingParams.temperature, top_k: int = SamplingParams.top_k,
                 top_p: float = SamplingParams.top_p, repeat_penalty: float = SamplingParams.repeat_penalty,
                 seed: int | None = None, stop: Sequence[str] = (), output_format: str = "text",
                 json_schema: dict | None = None, lookup: int = 0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, logit_bias: Mapping[int, float] | None = None) -> Generation:
        """Stream the continuation of a prompt (text, or token ids used as given) as text pieces.

        Stops at an end-of-sequence token, at any of the `stop` strings (a list, or one string; not
        included in the text), after max_tokens, or when the context is full. temperature 0 is greedy.
        output_format "json_object" allows only text that begins one JSON object, "json_schema" one
        that json_schema describes; the generation ends once it is closed (bitnet_cli.constrain).
        lookup > 0: prompt lookup decoding, up to that many draft tokens per pass (bitnet_cli.lookup);
        the text is the same as without, only the time differs. frequency_penalty, presence_penalty (each in
        [-2, 2]) and logit_bias ({token id: bias in [-100, 100]}) are OpenAI's (sampling.apply_penalties).
        """
        params = SamplingParams(temperature, top_k, top_p, repeat_penalty, frequency_penalty, presence_penalty,
                                logit_bias_pairs(logit_bias or {}, self.vocab_size)).check()
        root = output_schema(output_format, json_schema)
        check_lookup(lookup)
        if type(max_tokens) is not int or max_tokens < 0:
            raise BitnetError(f"max_tokens must be >= 0, got {max_tokens!r}", param="max_tokens")
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise BitnetError(f"seed must be a non-negative integer, got {seed!r}", param="seed")
        stops = stop_texts(stop)
        if isinstance(prompt_or_ids, str):
            if not prompt_or_ids.strip():
                raise BitnetError("the prompt is empty")
            ids = self.encode(prompt_or_ids)
        else:
            ids = token_ids(prompt_or_ids, self.vocab_size, "the prompt").tolist()
        if not ids:
            raise BitnetError("the prompt is empty")
        if len(ids) >= self.ctx_size:
            raise BitnetError(f"the prompt is {len(ids)} tokens but the context holds {self.ctx_size}, the prompt and "
                              "at least one new token together; shorten it or raise ctx_size (up to the model's max_position_embeddings)", param="ctx_size")
        stats = GenerationStats(load_s=self.load_s, prompt_tokens=len(ids))
        rng = np.random.default_rng(seed)
        out_ids: list[int] = []
        constraint = self.json_constraint(root) if root is not None else None
        stream = self._stream(ids, max_tokens, params, rng, stops, stats, out_ids, constraint, lookup)
        return Generation(stream, stats, out_ids)

    def json_vocabulary(self) -> JsonVocabulary:
        """This model's vocabulary arranged for constrained decoding: built at the first call (a second or so for a
        128k vocabulary), then shared by every constraint."""
        if self._json_vocabulary is None:
            self._json_vocabulary = JsonVocabulary(
                token_bytes(self.pm.tokenizer_json, self.tokenizer, self.vocab_size), sorted(self.stop_token_ids))
        return self._json_vocabulary

    def json_constraint(self, root: Schema = JSON_OBJECT) -> JsonConstraint:
        """A fresh JsonConstraint (any JSON object, or root's schema: constrain.output_schema)."""
        return JsonConstraint(self.json_vocabulary(), root)

    def tool_call_constraint(self, root: Schema, written: ToolCallFormat, required: bool = False,
                             several: bool = True) -> ToolCallConstraint:
        """A fresh ToolCallConstraint: calls of root's (constrain.tool_call_schema) as the chat template writes them
        (``written``: each between the tags, or all as one list between them); after text where a call is not
        ``required``; ``several``: more than one."""
        if written.listed:
            root, several = tool_call_list_schema(root, several), False  # one list, of one call or more
        calls = ToolCalls(written.tag.encode("utf-8"), written.close.encode("utf-8"), root, several)
        return ToolCallConstraint(self.json_vocabulary(), calls, required)

    def _stream(self, ids, max_tokens, params, rng, stops, stats, out_ids, constraint=None,
                lookup: int = 0) -> Iterator[str]:
        t0 = time.perf_counter()
        if max_tokens == 0:
            stats.stop_reason = "max_tokens"
            return
        logits, stats.reused_tokens = self._prefill(ids)
        history = list(ids)
        drafts = PromptLookup() if lookup else None
        if drafts:
            drafts.extend(ids)
        text = TextStream(self.tokenizer, stops)
        t_first = None
        pending = [logits]       # logits rows computed and not yet sampled from, in order
        expected: list[int] = []  # the draft token each pending row (but the last) was run with after it
        length = DraftLength(lookup)
        while True:
            token = sample(pending.pop(0), params, rng, history, constraint.allowed() if constraint else None,
                           out_ids)
            if expected:
                if token == expected.pop(0):
                    stats.accepted_tokens += 1
                    length.hit(whole=not expected)
                else:  # the rows after a refused draft token were computed from it: worthless
                    length.miss()
                    pending, expected = [], []
            if t_first is None:
                t_first = time.perf_counter()
                stats.prompt_s = stats.time_to_first_token_s = t_first - t0
            if token in self.stop_token_ids:
                stats.stop_reason = "eos"
                break
            if constraint:
                constraint.push(token)
            history.append(token)
            if drafts:
                drafts.extend([token])
            out_ids.append(token)
            stats.generated_tokens += 1
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                stats.stop_reason = "stop"
                break
            if stats.generated_tokens >= max_tokens:
                stats.stop_reason = "max_tokens"
                break
            if len(history) >= self.ctx_size:
                stats.stop_reason = "context"
                break
            if pending:  # the next row is ready: its input was the draft token just accepted
                continue
            # a draft may use the context's free positions and no more tokens than are still wanted
            room = min(length.now, self.ctx_size - len(history), max_tokens - stats.generated_tokens - 1)
            draft = drafts.propose(room) if drafts else []
            stats.drafted_tokens += len(draft)
            length.start()
            pending = list(self.forward([token] + draft, n_past=len(history) - 1, all_logits=bool(draft)))
            expected = draft
        piece = text.flush()
        if piece:
            yield piece
        stats.generation_s = time.perf_counter() - (t_first or t0)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def token_ids(tokens, vocab_size: int, what: str = "forward") -> np.ndarray:
    """A 1-D sequence of token ids (ints or an integer array) as a fresh int32 array, each in
    [0, vocab_size). Floats, strings, None, nested or ragged lists and 2-D arrays are refused:
    silently truncating 1.7 or flattening a batch would compute the wrong thing."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise BitnetError(f"{what}: token ids must be a 1-D integer array, got {tokens.ndim}-D {tokens.dtype}")
        values = tokens
    else:
        if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
            raise BitnetError(f"{what}: token ids must be a list of integers, got {type(tokens).__name__}")
        values = list(tokens)
        for t in values:
            if not _is_int(t):
                raise BitnetError(f"{what}: token ids must be integers, got {safejson.short(t)} "
                                  f"({type(t).__name__})")
    if len(values) == 0:
        raise BitnetError(f"{what}: no tokens given")
    lo, hi = (int(min(values)), int(max(values))) if not isinstance(values, np.ndarray) else (
        int(values.min()), int(values.max()))
    if lo < 0 or hi >= vocab_size:
        raise BitnetError(f"{what}: token id {lo if lo < 0 else hi} out of range [0, {vocab_size})")
    return np.array(values, dtype=np.int32)


def _check_logits(out: np.ndarray, path) -> None:
    """NaN/inf logits mean damaged weights (the norms and scales are checked at load; the ternary and
    embedding bytes only by `bitnet info --verify`): an error, not garbage text."""
    if not np.isfinite(out).all():
        raise BitnetError(f"{path}: the model produced NaN or infinite logits: its weights are damaged "
                          "(check with `bitnet info --verify`, then re-pack)")


def stop_texts(stop: str | Sequence[str]) -> list[str]:
    """The stop strings of a generation: one string or a list (as OpenAI's `stop` takes it, not one
    per character), the empty ones dropped. Text that is not UTF-8 (argv bytes arrive as lone
    surrogates) could never appear in the decoded output, so it is refused rather than never matching."""
    stops = [stop] if isinstance(stop, str) else list(stop)
    for i, text in enumerate(stops):
        why = tokenizer.bad_text(text) if isinstance(text, str) else f"not a string ({type(text).__name__})"
        if why:
            raise BitnetError(f"stop text {i + 1} is {why}", param="stop")
    return [text for text in stops if text]


class TextStream:
    """Generated tokens to text pieces: a piece is shown once it is whole UTF-8 and cannot be the
    start of a stop string; at a stop string the text ends before it (`stopped` is set)."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self._detok = _Detokenizer(tokenizer)
        self._stops = [s for s in stops if s]
        self._held = ""  # decoded text not yet shown: it could be the start of a stop string
        self.stopped = False

    def push(self, token: int) -> str:
        held = self._held + self._detok.push(token)
        if not self._stops:
            self._held = ""
            return held
        cut = min((held.find(s) for s in self._stops if s in held), default=-1)
        if cut >= 0:
            self._held, self.stopped = "", True
            return held[:cut]
        keep = _stop_prefix_len(held, self._stops)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep]

    def flush(self) -> str:
        """The text still held back, once generation has ended (nothing after a stop string)."""
        if self.stopped:
            return ""
        held, self._held = self._held + self._detok.flush(), ""
        return held


class _Detokenizer:
    """Incremental decoding: emits text only once it no longer ends in a partial UTF-8 sequence."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted (kept for context)
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that begins some stop string (held back, not yet shown)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


# --------------------------------------------------------------------- chat


FALLBACK_CHAT = "User: {content}\nAssistant:"  # one turn; turns are joined with a newline


class ToolCallFormat(NamedTuple):
    """How a chat template writes tool calls: each call's JSON between ``tag`` and ``close``, or (``listed``) all of
    them as one JSON list between the two; with no tag, one call as the whole reply (Llama 3.1's and 3.2's bare JSON).
    ``key`` holds a call's arguments: ``{"name": ..., key: {...}}``."""

    tag: str
    close: str
    listed: bool = False
    key: str = "arguments"

    def __str__(self) -> str:
        if not self.tag:
            return f'{{"name": ..., "{self.key}": ...}}'
        return self.tag + ("[...]" if self.listed else "")


# The ways chat templates teach a model to write tool calls, where it chooses whether to call (tool_choice "auto"):
# Hermes' and Qwen's `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (a call each), Falcon3's
# `<tool_call>\n[{"name": ..., "arguments": {...}}, ...]\n</tool_call>`, Apriel's `<tool_calls>[...]</tool_calls>`,
# and Llama 3.1's and 3.2's reply that is one call, `{"name": ..., "parameters": {...}}`, with no tag (their templates
# refuse several calls in a turn). Not MiniMax-M1's `<tool_calls>`, which holds calls one per line without a list,
# nor Llama's `<|python_tag|>` calls of its built-in tools (Python-like, not JSON).
TOOL_CALL_FORMATS = (ToolCallFormat("<tool_call>", "</tool_call>"), ToolCallFormat("<tool_call>", "</tool_call>", True),
                     ToolCallFormat("<tool_calls>", "</tool_calls>", True), ToolCallFormat("", "", key="parameters"))
# what may come between the tag and a JSON call in a template that shows one: space, the escape \n or the template's
# own syntax between two of its expressions (quotes, braces, ~, +, -); then {"name" (its quotes maybe escaped), after
# a "[" where the calls are listed
_TEMPLATE_GAP = r'(?:[\s"\'{}~+\-]|\\n){0,32}?'
_CALL_OPENS = _TEMPLATE_GAP + r'\{\\?"name\\?"'
# a tag-less call as a template writes it: {"name" and then the arguments' key, with at most the name's expression
# and the template's syntax between (Llama's '{"name": "' + tool_call.name + '", ' }}\n{{- '"parameters": ')
_BARE_CALL = r'\{\\?"name\\?":[\s\S]{0,96}?\\?"%s\\?":'


def template_tool_calls(template: str) -> ToolCallFormat | None:
    """How a chat template writes JSON tool calls (one of TOOL_CALL_FORMATS), or None. The template must write (or
    show) the tag followed by ``{"name"``, or by ``[`` and ``{"name"`` for a list: GLM's, Qwen3-Coder's and others put
    other formats (XML, key tags) between the same tags, and holding their calls to JSON would make them write what
    they were never trained to. A tag-less format needs its own arguments' key after ``{"name"`` (Llama's
    ``"parameters"``: a template that only shows Hermes' ``{"name": ..., "arguments": ...}`` without a tag is not
    taken)."""
    def writes(f: ToolCallFormat) -> bool:
        if not f.tag:
            return re.search(_BARE_CALL % re.escape(f.key), template) is not None
        return re.search(re.escape(f.tag) + (_TEMPLATE_GAP + r"\[" if f.listed else "") + _CALL_OPENS,
                         template) is not None

    return next((f for f in TOOL_CALL_FORMATS if writes(f)), None)


def tool_call_format(engine: Engine) -> ToolCallFormat | None:
    """template_tool_calls of this model's chat template; None without one (the plain fallback)."""
    template = engine.tokenizer_config.get("chat_template")
    return template_tool_calls(template) if isinstance(template, str) else None


def _template_turn(message: dict) -> dict:
    """A turn as chat templates read it: a tool call's arguments as a mapping where they are a JSON object (OpenAI
    sends them as text; templates write them with ``tojson``, as transformers' chat templates document)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    turned = []
    for call in calls:
        arguments = call["function"]["arguments"]
        with contextlib.suppress(BitnetError):  # not JSON (or nested past the parser's limit): left as text
            parsed = safejson.loads(arguments, "arguments")
            arguments = parsed if isinstance(parsed, dict) else arguments
        turned.append({**call, "function": {**call["function"], "arguments": arguments}})
    return {**message, "tool_calls": turned}


@functools.lru_cache(maxsize=16)
def _chat_template(template: str):
    """A chat template compiled as transformers' apply_chat_template compiles it: sandboxed (the template comes from
    the file), blocks trimmed, ``{% break %}`` and ``{% continue %}``, ``{% generation %}`` (which marks the
    assistant's text for transformers' training masks: rendered as its body), ``raise_exception(message)``,
    ``strftime_now(format)`` (Llama 3's templates date the system turn with it), and ``tojson`` as json.dumps with its
    own arguments (keys in order, no HTML escapes: Jinja's own sorts the keys and escapes ``<>&'``, so a model would
    read its tools written otherwise than in training). ImportError without jinja2."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda format: datetime.datetime.now().strftime(format))
    return env.from_string(template)


def render_chat(engine: Engine, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation ending in a user turn, ready for the assistant's reply.

    Uses the tokenizer config's `chat_template` (Jinja, as transformers does) when the file has
    one and jinja2 is installed, with ``tools`` (OpenAI's tool definitions) for templates that show them;
    otherwise the plain fallback: "User: ...\\nAssistant: ..." turns.
    """
    template = engine.tokenizer_config.get("chat_template")
    if isinstance(template, str) and template:
        try:
            bos = engine.tokenizer.id_to_token(engine.bos_token_id) if engine.bos_token_id is not None else ""
            eos = engine.tokenizer.id_to_token(engine.eos_token_id) if engine.eos_token_id is not None else ""
            text = _chat_template(template).render(messages=[_template_turn(m) for m in messages],
                                                   add_generation_prompt=True, bos_token=bos, eos_token=eos,
                                                   tools=tools)
        except ImportError:  # no jinja2: the plain fallback
            pass
        except Exception as e:  # a template error is the file's fault, not the user's
            raise BitnetError(f"{engine.pm.path}: chat_template cannot be rendered: {e}") from None
        else:
            ids = engine.tokenizer.encode(text, add_special_tokens=False).ids
            return ids if bos else engine.encode(text)
    turns = []
    for m in messages:
        if m["role"] == "system":
            turns.append(m["content"])
        elif m["role"] == "user":
            turns.append(FALLBACK_CHAT.format(content=m["content"]))
        elif m["role"] == "tool":  # a call's result: the next user turn, marked as such
            turns.append(FALLBACK_CHAT.format(content=f"(result of {m.get('tool_call_id', 'a tool call')}) "
                                                      f"{m['content']}"))
        elif m["role"] == "assistant":
            calls = " ".join(f"{c['function']['name']}({c['function']['arguments']})"
                             for c in m.get("tool_calls") or [])
            turns[-1] += " " + " ".join(part for part in (m["content"], calls) if part)
    return engine.encode("\n".join(turns))


def fit_chat(engine: Engine, messages: list[dict], reply_room: int) -> tuple[list[int], int]:
    """The conversation's token ids with room for ``reply_room`` reply tokens, and how many of its
    oldest messages were dropped to make that room.

    System messages always stay; the newest turns that fit stay with them, starting at a user turn.
    Only the newest user message not fitting by itself is an error.
    """
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    for start in range(len(turns)):
        if turns[start]["role"] != "user":
            continue
        ids = render_chat(engine, system + turns[start:])
        if len(ids) + reply_room <= engine.ctx_size:
            return ids, start
    needed = len(render_chat(engine, system + turns[-1:]))
    raise BitnetError(f"the newest message needs {needed} tokens with the system prompt, and the context holds "
                      f"{engine.ctx_size} with room for a {reply_room}-token reply; shorten it, lower max_tokens "
                      "or raise ctx_size (up to the model's max_position_embeddings)", param=("max_tokens", "ctx_size"))


__all__ = ["Engine", "Generation", "GenerationStats", "TextStream", "fit_chat", "render_chat", "rope_tables"]
