"""Where bitnet-cli's files are, and writing output files safely.

`bundled` finds files shipped in the package (recipes, the corpus); `cache_root` is the one
cache directory (token memmaps, trained tokenizers, synthetic models); `TempFile` / `publish`
rename a finished temporary file over the target in one step, so a crash or a bad input never
leaves a half-written file where a good one was expected.

A temporary file is named ``.NAME.XXXXXXXX.tmp`` (NAME: the target's name; XXXXXXXX: mkstemp's
eight random characters) in the target's directory, and its writer holds an exclusive ``flock`` on
it until it is renamed or removed. A process killed mid-write (SIGKILL, power loss) leaves its
temporary file behind but not its lock, since the kernel drops a dead process's locks; the next
write to the same target removes such files and says so. Files that do not match the pattern
exactly, are not ours, are symlinks, or are locked (a writer is alive) are never touched.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import sys
import tempfile
from importlib import resources
from pathlib import Path

from bitnet_cli.errors import BitnetError, warn


def special_kind(path: str | os.PathLike) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a directory ("a named pipe
    (FIFO)", "a character device", ...), else None. Reading such a file blocks for a writer or never
    ends, and renaming a finished output over one replaces the device itself (as root: /dev/null)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, kind in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def bundled(*parts: str) -> Path:
    """A file shipped inside the bitnet_cli package, e.g. bundled("recipes", "tiny.yaml")."""
    return Path(str(resources.files("bitnet_cli").joinpath(*parts)))


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped with bitnet-cli (`bitnet train NAME`), sorted."""
    root = bundled("recipes")
    return sorted(f.stem for f in root.glob("*.yaml")) if root.is_dir() else []


def bundled_corpus() -> Path:
    """The corpus shipped with bitnet-cli (TinyShakespeare; `bundled:tinyshakespeare` in recipes)."""
    return bundled("data", "tinyshakespeare.txt")


# The most a prompt file may hold: some 2 million tokens of English, more than the contexts of the models this runs
# (2B4T 4,096, Llama 3 131,072). A larger one is refused after reading this much rather than read whole, so that
# `-f /dev/zero` ends too.
PROMPT_FILE_LIMIT = 8 << 20
# The most a text scored for its perplexity (`bitnet eval -f`) may hold: WikiText-103's whole training split, 540 MB,
# would not pass, its test split (1.3 MB) and books do.
TEXT_FILE_LIMIT = 256 << 20


def read_text_file(path: str, what: str = "prompt", limit: int | None = None) -> str:
    """The UTF-8 text of ``path`` (``-``: standard input), less one trailing newline (the one an editor or ``echo``
    adds, which the model would otherwise continue from), as llama.cpp's ``-f`` reads a file. Pipes and process
    substitutions (``<(cmd)``) are read like files; more than ``limit`` bytes, a file that cannot be read (missing,
    a directory) or text that is not UTF-8 is a :class:`BitnetError` naming ``what`` the file holds. ``limit``:
    :data:`PROMPT_FILE_LIMIT` unless given."""
    limit = PROMPT_FILE_LIMIT if limit is None else limit
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            stdin = getattr(sys.stdin, "buffer", None)
            if stdin is None:
                raise BitnetError(f"-f -: there is no standard input to read the {what} from")
            data = stdin.read(limit + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
    except OSError as e:
        raise BitnetError(f"{name}: cannot read the {what}: {e.strerror or e}") from None
    if len(data) > limit:
        raise BitnetError(f"{name}: the {what} is larger than {limit >> 20} MiB, the most such a file may hold")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BitnetError(f"{name}: the {what} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x})") from None
    for newline in ("\r\n", "\n"):
        if text.endswith(newline):
            return text[:-len(newline)]
    return text


def cache_root() -> Path:
    """Where bitnet-cli keeps what it can rebuild: $BITNET_CACHE, else $XDG_CACHE_HOME/bitnet-cli,
    else ~/.cache/bitnet-cli."""
    if os.environ.get("BITNET_CACHE"):
        return Path(os.environ["BITNET_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "bitnet-cli"


_RANDOM = "[a-z0-9_]{8}"  # tempfile's name alphabet, 8 characters


def _stale_pattern(out: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(out.name)}\.{_RANDOM}\.tmp")


def remove_stale_temps(out: Path) -> list[tuple[Path, int]]:
    """Remove our temporary files for `out` left by writers that died; returns (path, bytes) of each.

    A file is removed only if its name matches ``.NAME.XXXXXXXX.tmp`` exactly, it is a regular file
    owned by this user, and no process holds its lock (every live writer does).
    """
    out = Path(out)
    pattern = _stale_pattern(out)
    removed = []
    try:
        names = os.listdir(out.parent)
    except OSError:
        return removed
    for name in names:
        if not pattern.fullmatch(name):
            continue
        path = out.parent / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # gone, a symlink, or unreadable: not ours to judge
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            # Still the same file under that name (not replaced between open and lock)?
            try:
                if os.lstat(path).st_ino != st.st_ino:
                    continue
                os.unlink(path)
            except OSError:
                continue
            removed.append((path, st.st_size))
        finally:
            os.close(fd)
    for path, size in removed:
        warn(f"note: removed {path.name} ({size / 1e6:.1f} MB), a temporary file left by an "
                    f"interrupted write of {out.name}")
    return removed


class TempFile:
    """The temporary file a write to `out` goes to: created next to `out` (after removing stale
    ones), locked while this object is open; `publish()` moves it onto `out`, `discard()` removes it.

    ``fd`` is the locked descriptor; writers may open `path` again or ``os.dup(fd)`` (a dup shares
    the lock). Data is fsynced through ``fd`` at publish, which covers writes made through any
    descriptor of the same file once they are flushed from user-space buffers.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        remove_stale_temps(self.out)
        while True:
            try:
                fd, name = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent)
            except OSError as e:  # a directory that takes no new files, e.g. /proc (writable by os.access for root)
                raise BitnetError(f"{self.out.parent}: cannot create a file there ({e.strerror or e})") from None
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # a cleaner may have removed it between mkstemp and flock: then make another
                if os.lstat(name).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd: int | None = fd
        self.path = Path(name)

    def publish(self) -> Path:
        """fsync, give the file ordinary permissions, rename it onto `out`, fsync the directory."""
        try:
            publish(self.path, self.out, fd=self.fd)
        finally:
            self._close()
        return self.out

    def discard(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock, after the rename or the unlink
            self.fd = None


def publish(tmp, out: Path, fd: int | None = None) -> Path:
    """Rename a finished temporary file onto `out`, with the permissions an ordinary new file gets.

    The file's data is fsynced before the rename and the directory after it, so that after a power
    loss `out` is the old file or the complete new one, never an empty or partial file under the
    final name. mkstemp creates 0600; a model or results file is an ordinary file (0666 less the umask).
    """
    own = fd is None
    if own:
        fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.fchmod(fd, ordinary_mode())
        os.replace(tmp, out)
    finally:
        if own:
            os.close(fd)
    fsync_directory(Path(out).parent)
    return Path(out)


def ordinary_mode() -> int:
    """The permissions an ordinary new file gets, 0666 less the umask: for files made by writers that
    create them private (mkstemp, safetensors' save_file: 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_directory(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself has happened
    finally:
        os.close(dfd)
