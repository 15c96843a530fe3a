"""Writing output files safely: a finished temporary file is renamed over the target in one step,
so a crash or a bad input never leaves a half-written file where a good one was expected."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where bitnet-cli caches files it can remake (synthetic models, imported GGUF): $XDG_CACHE_HOME/bitnet-cli."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bitnet-cli"


def publish(tmp, out: Path) -> Path:
    """Rename a finished temporary file onto `out`, with the permissions an ordinary new file gets.

    mkstemp creates 0600; a model or results file is an ordinary file (0666 less the umask).
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)
    return out
