"""Where bitnet-cli's files are, and writing output files safely.

`bundled` finds files shipped in the package (recipes, the corpus); `cache_root` is the one
cache directory (token memmaps, trained tokenizers, synthetic models); `publish` renames a
finished temporary file over the target in one step, so a crash or a bad input never leaves a
half-written file where a good one was expected."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def bundled(*parts: str) -> Path:
    """A file shipped inside the bitnet_cli package, e.g. bundled("recipes", "tiny.yaml")."""
    return Path(str(resources.files("bitnet_cli").joinpath(*parts)))


def cache_root() -> Path:
    """Where bitnet-cli keeps what it can rebuild: $BITNET_CACHE, else $XDG_CACHE_HOME/bitnet-cli,
    else ~/.cache/bitnet-cli."""
    if os.environ.get("BITNET_CACHE"):
        return Path(os.environ["BITNET_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "bitnet-cli"


def publish(tmp, out: Path) -> Path:
    """Rename a finished temporary file onto `out`, with the permissions an ordinary new file gets.

    mkstemp creates 0600; a model or results file is an ordinary file (0666 less the umask).
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)
    return out
