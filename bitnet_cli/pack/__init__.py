"""The packed model file: ternarise and pack checkpoints, read packed files, export GGUF.

`PackedModel.open(path)` reads a packed file (numpy only, zero-copy mmap views);
`pack_checkpoint(src, out)` writes one; `reference.forward` is the numpy oracle forward pass.
"""

from bitnet_cli.arch import ModelDims
from bitnet_cli.pack.convert import PackSummary, pack_checkpoint
from bitnet_cli.pack.format import PackedModel

__all__ = ["ModelDims", "PackSummary", "PackedModel", "pack_checkpoint"]
