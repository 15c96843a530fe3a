"""Reading checkpoints: HF-layout directories (ours, HF bf16/fp32, HF packed), shards, hub ids.

Tensors are read lazily, one at a time, with plain file reads (no mmap) so that packing a
multi-GB checkpoint keeps a small resident set: page-cache pages of a read() are not ours.
Every safetensors header is validated before use, since a checkpoint is untrusted input.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bitnet_cli import safejson
from bitnet_cli.errors import BitnetError
from bitnet_cli.files import special_kind
from bitnet_cli.tokenizer import token_text

# safetensors dtype name -> (numpy dtype used to hold the raw bytes, bytes per element)
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 by `bf16_to_f32`
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER_BYTES = 100_000_000  # the limit of the reference safetensors implementation
MAX_RANK = 8

KINDS = ("auto", "own", "hf", "hf-packed", "hub")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: `begin`/`end` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: Path) -> tuple[int, dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a safetensors header: (data start offset, tensors, metadata).

    Checks everything a hostile file could get wrong: header length, JSON shape, dtypes,
    shapes, byte counts, offsets inside the file, overlapping tensors, truncation.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BitnetError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise BitnetError(
                    f"{path}: not a safetensors file or truncated (header length {n}, file size {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise BitnetError(f"{path}: cannot read: {e.strerror or e}") from None
    header = safejson.loads(raw, str(path), "safetensors header", dict)
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise BitnetError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        where = f"{path}: tensor {safejson.short(name, 100)}"  # a name can run on for megabytes
        if not isinstance(info, dict):
            raise BitnetError(f"{where}: corrupt header entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise BitnetError(f"{where}: unsupported dtype {safejson.short(dtype)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_RANK
                and all(type(d) is int and 0 <= d <= size for d in shape)):
            raise BitnetError(f"{where}: bad shape {safejson.short(shape)}")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise BitnetError(f"{where}: bad data_offsets {safejson.short(offsets)}")
        # Python integers: a shape of 2^64 cannot overflow the product (each dimension is at most
        # the file size, and a non-empty tensor's bytes must fit in the file, checked below).
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != expected:
            raise BitnetError(
                f"{where}: {safejson.short(offsets[1] - offsets[0])} bytes stored but dtype {dtype} shape "
                f"{safejson.short(shape)} needs {safejson.short(expected)}"
            )
        if offsets[1] > data_len:
            raise BitnetError(
                f"{where}: data ends at byte {data_start + offsets[1]} but the file has {size} bytes (truncated?)"
            )
        tensors[name] = TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    spans = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.begin)
    for a, b in zip(spans, spans[1:]):
        if b.begin < a.end:
            raise BitnetError(f"{path}: tensors {safejson.short(a.name, 100)} and {safejson.short(b.name, 100)} overlap")
    return data_start, tensors, metadata


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 raw bits (uint16) -> float32, exactly (one pass, no uint32 temporary)."""
    out = np.empty(bits.shape, dtype=np.uint32)
    np.left_shift(bits, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


@dataclass
class Checkpoint:
    """An HF-layout checkpoint directory: config, tokenizer and lazily read tensors."""

    path: Path
    config: dict
    kind: str  # "own", "hf" (float weights) or "hf-packed" (uint8 trits + weight_scale)
    tensors: dict[str, tuple[Path, TensorEntry]]
    tokenizer_json: str
    tokenizer_config: dict = field(default_factory=dict)
    source: str = ""

    def entry(self, name: str) -> TensorEntry:
        if name not in self.tensors:
            raise BitnetError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return self.tensors[name][1]

    def file_of(self, name: str) -> Path:
        return self.tensors[name][0]

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or a range of its leading dimension) as a fresh array.

        Floats come back as float32 (bf16/f16 widened exactly); integers keep their dtype.
        """
        e = self.entry(name)
        path = self.file_of(name)
        dtype = SAFETENSORS_DTYPES[e.dtype]
        shape = e.shape
        begin, count = e.begin, int(np.prod(shape, dtype=np.int64))
        if rows is not None:
            start, stop, _ = rows.indices(shape[0] if shape else 1)
            row_elems = int(np.prod(shape[1:], dtype=np.int64))
            begin += start * row_elems * dtype.itemsize
            count = (stop - start) * row_elems
            shape = (stop - start, *shape[1:])
        out = np.empty(count, dtype=dtype)
        try:
            with open(path, "rb") as f:
                f.seek(begin)
                got = f.readinto(memoryview(out).cast("B"))
        except OSError as err:
            raise BitnetError(f"{path}: tensor {name!r}: cannot read: {err.strerror or err}") from None
        if got != out.nbytes:
            raise BitnetError(f"{path}: tensor {name!r}: file is truncated")
        out = out.reshape(shape)
        if e.dtype == "BF16":
            return bf16_to_f32(out)
        if e.dtype in FLOAT_DTYPES:
            return out.astype(np.float32, copy=False)
        return out


def bitnet_convention(qc: dict | None, where: str) -> tuple[str, str] | None:
    """How a checkpoint stores its BitLinears, from its ``quantization_config``:
    None (full precision), ``("online", "multiply")`` (latent weights ternarised on the fly), or
    ``("offline", "multiply" | "divide")`` (trits + weight_scale that the output is multiplied /
    divided by). Follows transformers' BitNetQuantConfig: ``linear_class`` defaults to
    ``bitlinear`` (divide) and ``quantization_mode`` to ``offline``, which is how
    HF1BitLLM/Llama3-8B-1.58 and onebitllms' ``quantize_to_1bit`` write it (``quant_method`` only).
    What cannot be determined is refused, naming the key."""
    if not qc and isinstance(qc, (dict, list, type(None))):  # absent, null or empty: full precision
        return None
    if not isinstance(qc, dict):
        raise BitnetError(f"{where}: quantization_config must be a JSON object, got {safejson.short(qc)}")
    if "quant_method" not in qc:
        raise BitnetError(f"{where}: quantization_config has no 'quant_method' key: cannot tell how the weights are stored")
    if qc["quant_method"] != "bitnet":
        raise BitnetError(f"{where}: unsupported quantization_config quant_method {safejson.short(qc['quant_method'])} "
                          "(only 'bitnet')")
    cls = qc.get("linear_class", "bitlinear")
    mode = qc.get("quantization_mode", "offline")
    if cls not in ("bitlinear", "autobitlinear"):
        raise BitnetError(f"{where}: unknown quantization_config.linear_class {safejson.short(cls)} "
                          "(bitlinear or autobitlinear)")
    if mode not in ("online", "offline"):
        raise BitnetError(f"{where}: unknown quantization_config.quantization_mode {safejson.short(mode)} "
                          "(online or offline)")
    if mode == "online" and cls != "autobitlinear":
        raise BitnetError(f"{where}: quantization_mode 'online' needs linear_class 'autobitlinear' "
                          "(transformers' BitLinear only reads packed weights)")
    return mode, "multiply" if cls == "autobitlinear" else "divide"


# ------------------------------------------------------------------ locating the checkpoint


def _hub_cache_dir() -> str | None:
    """The HF hub cache, read from the environment at call time (tests set it per test)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve_hub_id(repo_id: str) -> Path:
    """Download (or find in the local cache) the files a pack needs from a hub repository."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise BitnetError(
            f"{repo_id!r} looks like a hub id but huggingface-hub is not installed (pip install 'bitnet-cli[hub]')"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(
            snapshot_download(
                repo_id,
                cache_dir=_hub_cache_dir(),
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "*.jinja"],
            )
        )
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set and it is" if offline else "it is"
        raise BitnetError(f"hub model {repo_id!r}: {why} not in the local cache ({_hub_cache_dir() or 'default HF cache'})") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise BitnetError(f"hub model {repo_id!r}: {e}") from None


def _checkpoint_dir(src: str | os.PathLike, kind: str) -> tuple[Path, str]:
    """The local directory holding config.json, and a description of where it came from."""
    text = str(src)
    path = Path(text).expanduser()
    if kind == "hub" or (not path.exists() and HUB_ID.match(text) and not text.startswith((".", "/", "~"))):
        try:
            return resolve_hub_id(text), f"hub:{text}"
        except BitnetError as e:
            if kind == "hub":
                raise
            # runs/small-float reads as a hub id too: say that the directory is missing as well
            raise BitnetError(f"{e}; nor is there a local directory {path}") from None
    if not path.exists():
        raise BitnetError(f"{path}: no such file or directory")
    if special := special_kind(path):
        raise BitnetError(f"{path}: is {special}, not a checkpoint directory or file")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise BitnetError(f"{path}: expected a checkpoint directory (config.json + *.safetensors)")
        path = path.parent
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        path = path / "final"  # a training run directory: its final checkpoint
    return path.resolve(), str(path.resolve())


def read_json(path: Path, what: str, kind: type = dict):
    """A checkpoint's JSON file (bounded, of type `kind`); errors name the file and `what` it holds."""
    return safejson.read(path, what, kind)


def _shard_path(ckpt: Path, index: Path, shard) -> Path:
    """The file a weight_map entry names, refused unless its name lies inside `ckpt`.

    The name itself may not leave the directory (no absolute path, no '..', no NUL). The file may be
    a symlink, as in the Hugging Face hub cache (snapshots/<rev>/NAME -> ../../blobs/<hash>); its
    target must then lie in `ckpt` or in that cache's blobs directory.
    """
    where = f"{index}: shard {safejson.short(shard)}"
    if not isinstance(shard, str):
        raise BitnetError(f"{where}: weight_map values must be file names (strings)")
    parts = shard.split("/")
    if (not shard or shard.startswith("/") or "\0" in shard or "\\" in shard or ".." in parts
            or any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in parts) or len(shard) > 4096):
        raise BitnetError(f"{where} points outside the checkpoint directory or is not a file name")
    link = ckpt / shard
    try:
        target = link.resolve()
        exists = target.is_file()
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long for the filesystem
        raise BitnetError(f"{where}: cannot open ({getattr(e, 'strerror', None) or e})") from None
    allowed = [ckpt]
    if ckpt.parent.name == "snapshots":  # the hub cache: models--ORG--NAME/{snapshots/REV, blobs}
        allowed.append(ckpt.parent.parent / "blobs")
    if not any(root in target.parents for root in allowed):
        raise BitnetError(f"{where} points outside the checkpoint directory")
    if not exists:
        raise BitnetError(f"{link}: shard listed in {index.name} is missing")
    return target


def tensor_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: its shards in index order, or model.safetensors."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BitnetError(f"{index}: no weight_map")
        files: dict[Path, None] = {}
        for shard in weight_map.values():
            files.setdefault(_shard_path(ckpt, index, shard))
        return list(files)
    single = ckpt / "model.safetensors"
    if single.is_file():
        return [single]
    if any(ckpt.glob("*.bin")) or any(ckpt.glob("*.pt")):
        raise BitnetError(f"{ckpt}: only safetensors checkpoints are supported (found .bin/.pt weights)")
    raise BitnetError(f"{ckpt}: no model.safetensors or model.safetensors.index.json")


def _is_own_checkpoint(ckpt: Path) -> bool:
    """`bitnet train` writes its recipe (and trainer state) next to the HF files."""
    return (ckpt / "recipe.yaml").is_file() or (ckpt / "trainer_state.pt").is_file()


def _detect_kind(ckpt: Path, config: dict, tensors: dict[str, tuple[Path, TensorEntry]]) -> str:
    convention = bitnet_convention(config.get("quantization_config"), str(ckpt / "config.json"))
    probe = tensors.get("model.layers.0.self_attn.q_proj.weight")
    if probe is not None and probe[1].dtype == "U8" and convention is None:
        raise BitnetError(f"{ckpt / 'config.json'}: the weights are packed (uint8) but there is no "
                          "'quantization_config' key to say how weight_scale applies")
    if convention is not None and convention[0] == "offline":
        return "hf-packed"
    if config.get("model_type") == "llama" and convention is None:
        raise BitnetError(f"{ckpt / 'config.json'}: a Llama checkpoint without a 'quantization_config' key holds "
                          "full-precision weights, not a 1.58-bit model; make it ternary with `bitnet train` first")
    return "own" if _is_own_checkpoint(ckpt) else "hf"


def tokenizer_config(ckpt: Path) -> dict:
    """bos/eos tokens and the chat template, from tokenizer_config.json (and chat_template.jinja)."""
    out: dict = {}
    path = ckpt / "tokenizer_config.json"
    raw = read_json(path, "tokenizer config") if path.is_file() else {}
    for key in ("bos_token", "eos_token", "chat_template"):
        value = token_text(raw.get(key))  # a string, or an AddedToken's serialisation
        if value is not None:
            out[key] = value
    jinja = ckpt / "chat_template.jinja"
    if "chat_template" not in out and jinja.is_file():
        try:
            out["chat_template"] = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BitnetError(f"{jinja}: cannot read the chat template ({e})") from None
    for key, value in out.items():  # the packed file stores these as UTF-8 JSON
        if not safejson.is_utf8(value):
            raise BitnetError(f"{path if key != 'chat_template' or path.is_file() else jinja}: {key} is not valid "
                              "Unicode text (a lone surrogate)")
    return out


def read_tokenizer_json(path: Path) -> str:
    """The text of a tokenizer.json, checked to load and run in `tokenizers` (so a broken one fails
    here, not at run time)."""
    from bitnet_cli import tokenizer

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BitnetError(f"{path}: cannot read the tokenizer ({e})") from None
    tokenizer.load(text, str(path))
    return text


def open_checkpoint(src: str | os.PathLike, kind: str = "auto") -> Checkpoint:
    """Locate and index a checkpoint (directory, .safetensors file, or hub id); read no weights yet."""
    if kind not in KINDS:
        raise BitnetError(f"unknown source kind {kind!r}; choose one of {', '.join(KINDS)}")
    ckpt, source = _checkpoint_dir(src, kind)
    config = read_json(ckpt / "config.json", "model config")
    from bitnet_cli.arch import FAMILY_BY_MODEL_TYPE

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILY_BY_MODEL_TYPE:
        raise BitnetError(
            f"{ckpt / 'config.json'}: unsupported architecture model_type={safejson.short(model_type)} "
            f"(architectures={safejson.short(config.get('architectures'))}); BitNet b1.58 (model_type 'bitnet'), "
            "1.58-bit Llama-architecture models (model_type 'llama' with a bitnet quantization_config) and Qwen2 "
            "with BitLinear projections (model_type 'qwen2', e.g. a `bitnet train` conversion) can be packed"
        )
    tensors: dict[str, tuple[Path, TensorEntry]] = {}
    for file in tensor_files(ckpt):
        _, entries, _ = read_safetensors_header(file)
        for name, entry in entries.items():
            tensors[name] = (file, entry)
    tokenizer = ckpt / "tokenizer.json"
    if not tokenizer.is_file():
        raise BitnetError(f"{tokenizer}: missing (the packed file embeds the tokenizer)")
    tokenizer_json = read_tokenizer_json(tokenizer)
    detected = _detect_kind(ckpt, config, tensors)
    if kind in ("own", "hf") and detected == "hf-packed":
        raise BitnetError(f"{ckpt}: kind {kind} given but this checkpoint holds packed (uint8) ternary weights",
                          param="kind")
    if kind == "hf-packed" and detected != "hf-packed":
        raise BitnetError(f"{ckpt}: kind hf-packed given but the weights are not packed (no offline bitnet "
                          "quantization_config)", param="kind")
    return Checkpoint(
        path=ckpt,
        config=config,
        kind=kind if kind in ("own", "hf") else detected,
        tensors=tensors,
        tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config(ckpt),
        source=source,
    )
