"""Training checkpoints: HF-layout directories plus the trainer state, written atomically.

Layout of a run directory::

    runs/<name>/
      recipe.yaml             the resolved recipe
      metrics.jsonl           one JSON line per logged step and per evaluation
      loss.png                train/val loss, drawn at the end
      checkpoints/step_0000500/   every train.checkpoint_every steps, the last train.keep_last kept
      final/                  the last step's checkpoint (what pack/eval/run take)

Each checkpoint directory holds ``config.json``, ``model.safetensors`` (fp32),
``tokenizer.json``, ``tokenizer_config.json`` (loadable by transformers and ``bitnet pack``)
and ``trainer_state.pt`` (optimiser, step, RNG states). It is written under a temporary name
and renamed into place, so a kill during a save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from bitnet_cli.files import ordinary_mode
from bitnet_cli.model import BitNetConfig

_STEP = re.compile(r"^step_(\d+)$")


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(target: Path, model_state: dict[str, torch.Tensor], config: BitNetConfig, tokenizer,
                    tokenizer_cfg: dict, trainer_state: dict | None, recipe_yaml: str) -> Path:
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = dict(model_state)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(tmp / "model.safetensors", ordinary_mode())  # save_file makes it 0600, unlike the files beside it
    (tmp / "config.json").write_text(json.dumps(config.to_hf_dict("float32"), indent=2) + "\n")
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_cfg, indent=2) + "\n")
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    for f in tmp.iterdir():  # the data must be on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    return target


def step_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints, oldest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP.match(d.name)
        if m and (d / "trainer_state.pt").is_file() and (d / "model.safetensors").is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = step_checkpoints(out_dir)
    return ckpts[-1][1] if ckpts else None


def prune(out_dir: Path, keep_last: int):
    for _, d in step_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)


def remove_stale_temporaries(out_dir: Path):
    """Clean up after a run killed mid-save: drop half-written ``.tmp-*`` directories, and put
    back a replaced checkpoint (``.old-<name>-<pid>``) whose successor never got renamed in."""
    for root in (out_dir, out_dir / "checkpoints"):
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            if d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
            elif d.name.startswith(".old-"):
                original = root / d.name[len(".old-"):].rsplit("-", 1)[0]
                if original.exists():
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    os.rename(d, original)


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
