"""`bitnet run model.gguf` (and info, eval, bench, serve): a GGUF is imported once by the same path as
`bitnet pack model.gguf out.bin` into a cached packed file, which the engine then memory-maps.

The cache entry is keyed by the GGUF's resolved path, size and modification time, so an edited
or replaced file is imported again; entries live in `files.cache_root()`/gguf ($BITNET_CACHE, else
$XDG_CACHE_HOME/bitnet-cli, else ~/.cache/bitnet-cli) and can be deleted at any time.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from bitnet_cli.errors import BitnetError
from bitnet_cli.files import cache_root


def cache_dir() -> Path:
    return cache_root() / "gguf"


def model_file(path: str | Path, quiet: bool = False) -> Path:
    """The packed file a command reads for `path`: `path` itself, or for a GGUF its cached import. A file named
    ``*.gguf`` without GGUF's magic is refused as a GGUF rather than reported as a broken packed file."""
    from bitnet_cli.gguf.reader import is_gguf

    if is_gguf(path):
        return packed_path(Path(path), quiet)
    if Path(path).suffix.lower() == ".gguf" and Path(path).is_file():
        raise BitnetError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    return Path(path)


def packed_path(gguf: Path, quiet: bool = False) -> Path:
    """The packed file imported from `gguf`, importing it now if the cache has no current one."""
    from bitnet_cli.pack import PackedModel, pack_checkpoint

    gguf = Path(gguf)
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / f"{gguf.stem}-{key}.bin"
    if out.is_file():
        try:
            PackedModel.open(out).close()
            return out
        except BitnetError:
            pass  # a damaged entry: import again
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BitnetError(f"{out.parent}: cannot create the GGUF import cache ({e.strerror or e}); "
                          "set BITNET_CACHE to a writable directory") from None
    if not quiet:
        from bitnet_cli.gguf.reader import GGUFFile

        with GGUFFile.open(gguf):  # a broken file is its one error line, not announced as an import first
            pass
        print(f"importing {gguf} into {out} (once; `bitnet pack {gguf.name} out.bin` does the same)", file=sys.stderr)
    summary = pack_checkpoint(gguf, out, force=True)
    if not quiet:
        for note in summary.notes:
            print(f"note: {note}", file=sys.stderr)
    return out
