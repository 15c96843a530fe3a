"""What is being benchmarked: a packed file the user gave, or a synthetic model of a named shape.

Synthetic files are written once with random ternary weights and cached, keyed by shape,
embedding type and packed-format version, so repeated runs never rewrite a 1.2 GB file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from bitnet_cli.errors import BitnetError
from bitnet_cli.files import cache_root
from bitnet_cli.pack.embeddings import embedding_type
from bitnet_cli.pack.ternary import layout


def default_cache_dir() -> Path:
    return cache_root() / "synthetic"


@dataclass
class Target:
    name: str            # shape name, or the file name
    shape: str | None    # the named shape (None for a user's file)
    config: dict         # HF config dict
    embeddings: str      # a head type of pack/embeddings.py: "f16", "int8", "q6" or "q4"
    path: Path           # the packed file; for a synthetic shape, where it is (or will be) cached
    layout: str = "i2"   # the ternary layout (an --layout choice of pack/ternary.py): "i2" or "tq1"

    def ensure_file(self, progress=None) -> Path:
        """The packed file, writing the synthetic one first if it is not cached yet."""
        if self.path.exists():
            return self.path
        from bitnet_cli.pack.synthetic import write_random_model

        def tensor_done(done: int, total: int, name: str) -> None:
            if progress:
                progress(f"writing synthetic {self.shape} model (once, cached): tensor {done}/{total}")

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BitnetError(f"cannot create the synthetic model cache {self.path.parent}: {e.strerror}") from None
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            write_random_model(tmp, shape=self.shape, embeddings=self.embeddings, seed=0, progress=tensor_done,
                               ternary_layout=self.layout)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return self.path


def from_file(path: Path) -> Target:
    from bitnet_cli.pack import PackedModel
    from bitnet_cli.pack.gguf_cache import model_file

    if path.is_dir():
        if not (path / "model.bin").is_file():  # e.g. runs/quickstart, which holds its packed model.bin
            raise BitnetError(f"{path}: is a directory, not a packed model file (pack a checkpoint first: "
                              f"bitnet pack {path} model.bin)")
        path = path / "model.bin"
    if not path.exists():  # anything else that is not a regular file: PackedModel.open says what it is
        raise BitnetError(f"{path}: no such file (expected a packed model file made by bitnet pack)")
    name, path = path.name, model_file(path)  # a GGUF: its cached import (bitnet_cli.pack.gguf_cache)
    with PackedModel.open(path) as pm:
        config = dict(pm.config)
        embeddings = pm.metadata.get("embeddings", "f16")
        ternary_layout = pm.ternary_layout.option
    return Target(name=name, shape=None, config=config, embeddings=embeddings, path=path, layout=ternary_layout)


def from_shape(shape: str, embeddings: str = "f16", cache_dir: Path | None = None, ternary_layout: str = "i2") -> Target:
    """A synthetic model of a preset (bitnet_cli.arch.PRESETS). The cache file's name carries a
    digest of the config, so a preset whose numbers change is written anew, never read stale."""
    from bitnet_cli.pack import synthetic
    from bitnet_cli.pack.format import FORMAT_VERSION

    embedding_type(embeddings, param="embeddings")
    layout(ternary_layout, param="ternary_layout")
    config = synthetic.shape_config(shape)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    name = f"{shape}-{embeddings}" + ("" if ternary_layout == "i2" else f"-{ternary_layout}")  # i2: the old names
    path = cache / f"{name}-v{FORMAT_VERSION}-{digest}.bin"
    return Target(name=shape, shape=shape, config=config, embeddings=embeddings, path=path, layout=ternary_layout)


def context_length(target: Target) -> int:
    """The longest sequence the target's model can run (its max_position_embeddings)."""
    return int(target.config.get("max_position_embeddings") or 0) or 2**31 - 1


def describe(target: Target) -> dict:
    """The model part of the results (JSON-ready)."""
    c = target.config
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    return {
        "name": target.name,
        "shape": target.shape,
        "path": str(target.path),
        "embeddings": target.embeddings,
        "layout": target.layout,
        "config": {k: c.get(k) for k in keys},
    }
