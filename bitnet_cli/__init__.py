"""bitnet-cli: train, pack, run, evaluate and benchmark BitNet b1.58 ternary LLMs.

Stages (one module each, the CLI in ``cli.py`` is a thin layer over them):
``model`` (torch BitNet b1.58), ``train`` (recipes, loop), ``checkpoint`` (reading HF/own
checkpoints), ``pack`` (the packed file), ``engine`` (C inference via cffi), ``eval``
(lm-eval adapter), ``bench`` (speed and roofline).
"""

__version__ = "0.1.0"
