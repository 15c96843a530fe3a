"""bitnet-cli: train, pack, run, evaluate and benchmark BitNet b1.58 ternary LLMs.

Stages (one module each, the CLI in ``cli.py`` is a thin layer over them):
``model`` (torch BitNet b1.58), ``train`` (recipes, loop), ``checkpoint`` (reading HF/own
checkpoints), ``pack`` (the packed file), ``engine`` (C inference via cffi), ``eval``
(lm-eval adapter, perplexity), ``bench`` (speed and roofline).

The main library calls are importable from here (loaded on first use, so importing the
package stays fast and inference never imports torch)::

    from bitnet_cli import Engine, pack_checkpoint, evaluate, load_recipe, train

    pack_checkpoint("runs/quickstart/train", "model.bin")        # a checkpoint -> one ternary file
    engine = Engine.load("model.bin", threads=2)                   # the C engine, no torch
    print("".join(engine.generate("ROMEO:", max_tokens=32, seed=1)))
    logits = engine.forward(engine.encode("ROMEO:"))               # [tokens, vocab], KV cache kept
    results = evaluate("model.bin", ["tinyshakespeare_heldout"])   # lm-eval's results dict (bundled data)
    ppl = perplexity("model.bin", open("notes.txt").read(), ctx_size=128).perplexity   # as llama-perplexity
    run = train(load_recipe("tiny", ["train.steps=100"]), out_dir="runs/tiny")   # run.checkpoint

Every failure a user can cause raises :class:`BitnetError` with a message that says what to fix.
"""

__version__ = "0.1.0"

# name -> module that defines it (imported when the name is first used)
_LAZY = {
    "Engine": "bitnet_cli.engine",
    "PackedModel": "bitnet_cli.pack",
    "pack_checkpoint": "bitnet_cli.pack",
    "evaluate": "bitnet_cli.eval.runner",
    "perplexity": "bitnet_cli.eval.perplexity",
    "load_recipe": "bitnet_cli.train",
    "train": "bitnet_cli.train",
    "quickstart": "bitnet_cli.quickstart",
    "BitnetError": "bitnet_cli.errors",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bitnet_cli' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
