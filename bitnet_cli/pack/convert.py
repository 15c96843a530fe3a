"""`bitnet pack`: checkpoint -> packed file, streamed one tensor at a time.

The header is computed from the config before any weight is read; then each tensor is read,
checked, converted and written, so the resident set stays near the size of the largest
BitLinear weight (or one chunk of the embedding), whatever the model size.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bitnet_cli.arch import BITLINEAR_NORM, EMBED, LAYER_PREFIX, LM_HEAD, SUB_NORMS, ModelDims, split_layer_tensor
from bitnet_cli.checkpoint import KINDS, Checkpoint, bitnet_convention, open_checkpoint
from bitnet_cli.errors import BitnetError
from bitnet_cli.pack.embeddings import embedding_type
from bitnet_cli.pack.format import (
    CONVERTER, FORMAT, PackedWriter, TensorSpec, check_output_path, file_version,
    tensor_specs, write_embedding_rows, write_stored_rows,
)
from bitnet_cli.pack.ternary import layout, ternarize, unpack_hf_packed
from bitnet_cli.progress import Progress  # (tensors done, tensors total, current name)

EMBEDDING_CHUNK_ROWS = 8192
PACK_TARGETS = ("native", "gguf")  # our packed file, or a GGUF for llama.cpp / bitnet.cpp
SOURCE_KINDS = (*KINDS, "gguf")  # open_source's: a checkpoint's kinds, or a GGUF file
F16_MAX = 65504.0


@dataclass
class PackSummary:
    source: str
    source_kind: str
    output: str
    format: str
    embeddings: str
    parameters: int
    ternary_parameters: int
    ternary_bits_per_weight: float  # ternary payload bits / ternary weights (includes K padding)
    bits_per_weight: float  # whole file bits / all parameters
    file_bytes: int
    bf16_bytes: int
    compression_ratio: float
    seconds: float
    notes: list[str] = field(default_factory=list)  # what an import changed or inferred (GGUF sources)
    layout: str = "i2_k128"  # the ternary layout of a native file (pack/ternary.py's LAYOUTS)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_finite(ckpt: Checkpoint, name: str, w: np.ndarray) -> None:
    if not np.isfinite(w).all():
        bad = np.argwhere(~np.isfinite(w))[0]
        raise BitnetError(
            f"{ckpt.file_of(name)}: tensor {name!r} has a non-finite value ({w[tuple(bad)]}) at index {bad.tolist()}"
        )


def _check_shape(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> None:
    got = ckpt.entry(name).shape
    if tuple(got) != tuple(shape):
        raise BitnetError(
            f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(got)} but config.json implies {list(shape)}"
        )


def ternary_weight(ckpt: Checkpoint, name: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.float32]:
    """(trits int8 [N, K], gamma float32) of one BitLinear weight, from any supported source kind."""
    n, k = shape
    if ckpt.kind == "gguf":
        return ckpt.ternary(name, shape)
    if ckpt.kind != "hf-packed":
        _check_shape(ckpt, name, shape)
        w = ckpt.read(name)
        if w.dtype != np.float32:
            raise BitnetError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {ckpt.entry(name).dtype}, expected floats")
        _check_finite(ckpt, name, w)
        return ternarize(w)

    # HF offline-quantised: uint8 [ceil(N/4), K] (or already-unpacked ternary floats) + weight_scale
    entry = ckpt.entry(name)
    where = f"{ckpt.file_of(name)}: tensor {name!r}"
    if entry.dtype == "U8":
        _check_shape(ckpt, name, (-(-n // 4), k))
        try:
            trits = unpack_hf_packed(ckpt.read(name), n)
        except ValueError as e:
            raise BitnetError(f"{where}: {e}") from None
    else:
        _check_shape(ckpt, name, shape)
        w = ckpt.read(name)
        if not np.isin(w, (-1.0, 0.0, 1.0)).all():
            bad = np.argwhere(~np.isin(w, (-1.0, 0.0, 1.0)))[0]
            raise BitnetError(f"{where}: non-ternary value {w[tuple(bad)]} at index {bad.tolist()} in a packed checkpoint")
        trits = w.astype(np.int8)
    scale, op = _weight_scale(ckpt, name)
    # transformers: AutoBitLinear multiplies the output by weight_scale; BitLinear divides by it.
    return trits, np.float32(scale if op == "multiply" else np.float32(1.0) / scale)


def _weight_scale(ckpt: Checkpoint, name: str) -> tuple[np.float32, str]:
    """(weight_scale, "multiply" or "divide") of weight `name` in an HF offline-quantised checkpoint."""
    scale_name = name + "_scale"
    if scale_name not in ckpt.tensors:
        raise BitnetError(f"{ckpt.path}: tensor {scale_name!r} is missing (packed checkpoints carry a weight_scale per layer)")
    scale = ckpt.read(scale_name).reshape(-1)
    if scale.size != 1 or scale.dtype != np.float32:
        raise BitnetError(f"{ckpt.file_of(scale_name)}: tensor {scale_name!r} must be one float, got shape {list(ckpt.entry(scale_name).shape)}")
    _check_finite(ckpt, scale_name, scale)
    if scale[0] <= 0:
        raise BitnetError(f"{ckpt.file_of(scale_name)}: tensor {scale_name!r} must be positive, got {scale[0]}")
    _, op = bitnet_convention(ckpt.config.get("quantization_config"), str(ckpt.path / "config.json"))
    return scale[0], op


def projection_bias(ckpt: Checkpoint, name: str, shape: tuple[int]) -> np.ndarray:
    """A projection's float bias as the engine adds it, after the rescaled product. transformers'
    AutoBitLinear offline adds it inside the product and then multiplies by weight_scale, so there it
    is stored times weight_scale; everywhere else as it is."""
    _check_shape(ckpt, name, shape)
    b = ckpt.read(name).astype(np.float32)
    _check_finite(ckpt, name, b)
    if ckpt.kind == "hf-packed":
        _, op = bitnet_convention(ckpt.config.get("quantization_config"), str(ckpt.path / "config.json"))
        if op == "multiply":
            scale, _ = _weight_scale(ckpt, name.removesuffix(".bias") + ".weight")
            b = b * scale
    return b


def _write_embedding(writer: PackedWriter, ckpt: Checkpoint, name: str, dims: ModelDims, embeddings: str) -> None:
    """Stream an embedding matrix in row chunks, each encoded to the chosen storage type (or, for a
    GGUF tensor type the storage type holds without loss, its stored bytes converted as they are)."""
    _check_shape(ckpt, name, (dims.vocab_size, dims.hidden_size))
    if ckpt.entry(name).dtype not in ("F32", "F16", "BF16", "F64"):
        raise BitnetError(f"{ckpt.file_of(name)}: tensor {name!r} must hold floats, got {ckpt.entry(name).dtype}")
    def chunks():
        for start in range(0, dims.vocab_size, EMBEDDING_CHUNK_ROWS):
            rows = ckpt.read(name, slice(start, start + EMBEDDING_CHUNK_ROWS))
            _check_finite(ckpt, name, rows)
            if embeddings == "f16" and np.abs(rows).max(initial=0) > F16_MAX:
                raise BitnetError(f"{ckpt.file_of(name)}: tensor {name!r} exceeds the f16 range; use embeddings int8",
                                  param="embeddings")
            yield rows

    if ckpt.kind != "gguf":
        write_embedding_rows(writer, name, chunks(), dims.vocab_size, embeddings)
        return
    loss = _EmbeddingLoss()
    t = ckpt.gguf_tensor(name)
    transcode = embedding_type(embeddings).transcode.get(t.type_name)
    if transcode is None:
        write_embedding_rows(writer, name, chunks(), dims.vocab_size, embeddings, check=loss)
        how = "dequantised exactly"
    else:
        def converted():
            for start, rows in zip(range(0, dims.vocab_size, EMBEDDING_CHUNK_ROWS), chunks()):
                stored = transcode(ckpt.read_raw(name, slice(start, start + len(rows))), dims.hidden_size)
                loss(rows, stored, embeddings)  # checks the conversion against ggml's dequantisation
                yield stored

        write_stored_rows(writer, name, converted(), dims.vocab_size, embeddings)
        how = "its codes and scales converted as they are"
    ckpt.notes.append(f"{ckpt.path}: tensor {t.name!r} ({t.type_name}, {how}) stored as "
                      f"{embeddings} embeddings: {loss.describe()}")


class _EmbeddingLoss:
    """Counts the values an embedding storage type changes (it sees each chunk's floats and stored arrays)."""

    def __init__(self):
        self.changed, self.total, self.max_abs = 0, 0, 0.0

    def __call__(self, rows: np.ndarray, stored: list[np.ndarray], embeddings: str) -> None:
        from bitnet_cli.pack.embeddings import decode

        diff = np.abs(decode(stored, rows.shape[1], embeddings) - rows)
        self.changed += int(np.count_nonzero(diff))
        self.total += diff.size
        self.max_abs = max(self.max_abs, float(diff.max(initial=0)))

    def describe(self) -> str:
        if not self.changed:
            return "lossless"
        return f"{self.changed:,} of {self.total:,} values rounded (largest change {self.max_abs:.3g})"


def pack_metadata(config: dict, dims: ModelDims, tokenizer_json: str, tokenizer_config: dict,
                  embeddings: str, source: str, ternary_layout: str = "i2") -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": file_version(dims),
        "config": json.dumps(dims.hf_config(config)),
        "tokenizer": tokenizer_json,
        "tokenizer_config": json.dumps(tokenizer_config),
        "layout": layout(ternary_layout).name,
        "embeddings": embeddings,
        "source": source,
        "converter": CONVERTER,
    }


def summarize(specs: list[TensorSpec], dims: ModelDims, out: Path, source: str, kind: str,
              embeddings: str, seconds: float, fmt: str = "native") -> PackSummary:
    ternary, params = dims.ternary_parameters(), dims.parameters()
    # the packed projections only: a q4 embedding is stored as U8 too, but it is not ternary
    ternary_names = tuple(f".{proj.name}.weight" for proj in dims.projections())
    ternary_bytes = sum(s.nbytes for s in specs if s.name.endswith(ternary_names))
    size = out.stat().st_size
    return PackSummary(
        source=source, source_kind=kind, output=str(out), format=fmt, embeddings=embeddings,
        parameters=params, ternary_parameters=ternary,
        ternary_bits_per_weight=round(ternary_bytes * 8 / ternary, 6),
        bits_per_weight=round(size * 8 / params, 6),
        file_bytes=size, bf16_bytes=params * 2, compression_ratio=round(params * 2 / size, 4),
        seconds=round(seconds, 3),
    )


def pack_checkpoint(src, out, embeddings: str | None = None, force: bool = False, kind: str = "auto",
                    to: str = "native", gguf_type: str = "tq2_0", progress: Progress | None = None,
                    gguf_head: str | None = None, i2s_block: int | None = None,
                    ternary_layout: str = "i2") -> PackSummary:
    """Pack a checkpoint (directory, .safetensors file or hub id) into `out`; return a summary.

    `to="gguf"` writes a GGUF file for llama.cpp / bitnet.cpp instead (via a temporary
    native file next to `out`). A GGUF file as `src` is imported (bitnet_cli.pack.gguf_source).
    `embeddings` None: f16, or for a GGUF source the storage type that loses nothing (else f16).
    `i2s_block`: a GGUF source's I2_S layout, 128 (bitnet.cpp's x86 build) or 64 (ARM); None: see gguf_source.
    `ternary_layout`: the native file's ternary weight layout, "i2" (2 bits per weight) or "tq1" (1.6 bits;
    pack/ternary.py); a GGUF export has its own (`gguf_type`).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if embeddings is not None:
        embedding_type(embeddings, param="embeddings")
    if to not in PACK_TARGETS:
        raise BitnetError(f"to must be one of {', '.join(PACK_TARGETS)}, got {to!r}", param="to")
    layout(ternary_layout, param="ternary_layout")
    if to == "gguf" and ternary_layout != "i2":
        raise BitnetError(f"ternary_layout {ternary_layout} is a layout of our packed files; a GGUF export writes "
                          "the ternary type gguf_type names", param=("ternary_layout", "gguf_type"))
    if not str(src).strip():  # Path("") is the current directory: it was searched for a config.json
        raise BitnetError("give a source checkpoint (SRC is empty)")
    check_output_path(out, force)
    ckpt = open_source(src, kind, i2s_block)
    try:
        check_not_an_input(ckpt, out)
        return _pack_source(ckpt, out, embeddings, force, to, gguf_type, gguf_head, progress, t0, ternary_layout)
    finally:
        if ckpt.kind == "gguf":
            ckpt.close()


# the files of a checkpoint directory that packing reads besides its tensor files
_CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json", "model.safetensors.index.json")


def check_not_an_input(ckpt, out: Path) -> None:
    """Refuse an output that would replace a file the source is read from (force or not): packing
    `run/final` into `run/final/model.safetensors --force` used to leave the packed file where the
    checkpoint's weights were."""
    if not out.exists():
        return
    if ckpt.kind == "gguf":
        inputs = {Path(ckpt.path)}
    else:
        inputs = {Path(f) for f, _ in ckpt.tensors.values()} | {Path(ckpt.path) / n for n in _CHECKPOINT_FILES}
    for given in inputs:
        try:
            same = given.exists() and os.path.samefile(given, out)
        except OSError:
            same = False
        if same:
            raise BitnetError(f"{out}: is an input of this pack ({given}); choose another output file")


def open_source(src, kind: str = "auto", i2s_block: int | None = None):
    """A checkpoint (directory, .safetensors, hub id) or, for a GGUF file or kind "gguf", a GGUFCheckpoint
    (whose I2_S layout `i2s_block` chooses; it is refused for any other source)."""
    from bitnet_cli.gguf.reader import is_gguf

    if kind == "gguf" or (kind == "auto" and Path(str(src)).is_file() and is_gguf(src)):
        from bitnet_cli.pack.gguf_source import open_gguf

        return open_gguf(src, i2s_block)
    if i2s_block is not None:
        raise BitnetError(f"i2s_block applies to a GGUF source only, and {src} is not a GGUF file", param="i2s_block")
    return open_checkpoint(src, kind)


def _pack_source(ckpt, out: Path, embeddings: str | None, force: bool, to: str, gguf_type: str,
                 gguf_head: str | None, progress: Progress | None, t0: float, ternary_layout: str) -> PackSummary:
    if embeddings is None:
        embeddings = ckpt.embedding_type("model.embed_tokens.weight") if ckpt.kind == "gguf" else "f16"
    if ckpt.kind == "own" and not ckpt.config.get("quantization_config"):
        raise BitnetError(
            f"{ckpt.path / 'config.json'}: this model was trained without ternary quantisation (quant: none); "
            "packing would ternarise weights it never learned to work with"
        )
    where = str(ckpt.path) if ckpt.kind == "gguf" else str(ckpt.path / "config.json")
    dims = ModelDims.from_config(ckpt.config, where)
    if ckpt.kind != "gguf":  # a GGUF source's tensors are checked against its own architecture on import
        _check_family_tensors(ckpt, dims)
    if to == "gguf":
        from bitnet_cli.pack.gguf import check_gguf_shapes, export_gguf

        check_gguf_shapes(dims, gguf_type, where, embeddings, gguf_head)
        native = out.with_name(f".{out.name}.native.tmp")
        try:
            _pack(ckpt, dims, native, embeddings, True, progress)
            export_gguf(native, out, gguf_type, force=force, head=gguf_head)
        finally:
            native.unlink(missing_ok=True)
        specs = tensor_specs(dims, embeddings)
        summary = summarize(specs, dims, out, ckpt.source, ckpt.kind, embeddings, time.perf_counter() - t0,
                            "gguf-" + gguf_type)
    else:
        specs = _pack(ckpt, dims, out, embeddings, force, progress, ternary_layout)
        summary = summarize(specs, dims, out, ckpt.source, ckpt.kind, embeddings, time.perf_counter() - t0)
        summary.layout = layout(ternary_layout).name
    summary.notes = list(getattr(ckpt, "notes", []))
    if to != "gguf" and ternary_layout == "tq1" and summary.ternary_bits_per_weight >= 2:
        from bitnet_cli import kernels

        widest = max(p.shape(dims)[1] for p in dims.projections())
        summary.notes.append(f"layout tq1 saves nothing on this model: it stores whole {kernels.TQ1_BLOCK_K}-input "
                             f"blocks of a row at 1.6 bits per weight, the rest as i2, and no projection here is "
                             f"wider than {widest} inputs (every weight at 2 bits, as --layout i2)")
    return summary


def _check_family_tensors(ckpt: Checkpoint, dims: ModelDims) -> None:
    """Refuse a checkpoint holding norms its config does not describe (BitNet's sub-norms under
    model_type llama; projection input norms without use_rms_norm): packing would silently drop them
    and compute another function."""
    model_type = ckpt.config.get("model_type")
    for name in ckpt.tensors:
        if not name.startswith(LAYER_PREFIX):
            continue
        module = split_layer_tensor(name)[1]
        if module in SUB_NORMS and not dims.sub_norms:
            raise BitnetError(f"{ckpt.file_of(name)}: tensor {name!r} is a BitNet sub-norm, but "
                              f"model_type {model_type!r} has no sub-norms (is config.json the right one?)")
        if module.endswith("." + BITLINEAR_NORM) and dims.bitlinear_norm_eps is None:
            raise BitnetError(f"{ckpt.file_of(name)}: tensor {name!r} is a projection's input norm, but the "
                              "quantization_config does not say use_rms_norm: true (is config.json the right one?)")


def _pack(ckpt: Checkpoint, dims: ModelDims, out: Path, embeddings: str, force: bool,
          progress: Progress | None, ternary_layout: str = "i2") -> list[TensorSpec]:
    specs = tensor_specs(dims, embeddings, ternary_layout)
    meta = pack_metadata(ckpt.config, dims, ckpt.tokenizer_json, ckpt.tokenizer_config, embeddings,
                         f"{ckpt.kind}:{ckpt.source}", ternary_layout)
    pack_trits = layout(ternary_layout).pack
    steps = [s for s in specs if not s.name.endswith("_scale")]
    with PackedWriter(out, specs, meta, force=force) as writer:
        for done, spec in enumerate(steps, 1):
            name = spec.name
            if name in (EMBED, LM_HEAD):
                _write_embedding(writer, ckpt, name, dims, embeddings)
            elif spec.dtype == "U8":
                trits, gamma = ternary_weight(ckpt, name, dims.projection_shape(split_layer_tensor(name)[1]))
                writer.write(name, pack_trits(trits))
                writer.write(name + "_scale", np.array([gamma], dtype=np.float32))
            elif name.endswith(".bias"):
                writer.write(name, projection_bias(ckpt, name, spec.shape))
            else:  # RMSNorm weights
                _check_shape(ckpt, name, spec.shape)
                w = ckpt.read(name)
                _check_finite(ckpt, name, w)
                writer.write(name, w.astype(np.float32))
            if progress:
                progress(done, len(steps), name)
        writer.finish()
    return specs
