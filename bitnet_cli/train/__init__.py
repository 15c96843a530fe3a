"""``bitnet train``: recipes, data, the loop, checkpoints and scale-out, as a library.

    from bitnet_cli.train import load_recipe, train
    result = train(load_recipe("recipes/tiny.yaml", ["train.steps=100"]), out_dir="runs/tiny")
    result.checkpoint  # runs/tiny/final: an HF-layout checkpoint directory

Heavy imports (torch) happen on first use of ``train``/``describe``, not on import.
"""

from __future__ import annotations

from bitnet_cli.train.recipe import PRESETS, Recipe, load_recipe

__all__ = ["PRESETS", "Recipe", "TrainResult", "describe", "load_recipe", "train"]


def __getattr__(name):
    if name in ("train", "describe", "TrainResult"):
        from bitnet_cli.train import loop

        return getattr(loop, name)
    raise AttributeError(name)
