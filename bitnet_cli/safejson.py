"""JSON from untrusted files (safetensors headers, packed-file metadata, config/index/tokenizer
JSON of a checkpoint): every way the parser can fail becomes one BitnetError naming the file.

Python's json raises RecursionError on deep nesting, ValueError on integers of more than 4,300
digits and UnicodeDecodeError on bad bytes; all of those are the file's fault, not a bug.
"""

from __future__ import annotations

import json
from pathlib import Path

from bitnet_cli.errors import BitnetError

MAX_JSON_BYTES = 100_000_000  # the safetensors header limit; config and index files are far smaller

_KIND_NAMES = {dict: "a JSON object", list: "a JSON array", str: "a JSON string"}


def loads(raw: str | bytes, where: str, what: str = "JSON", kind: type | None = None):
    """Parse `raw`; with `kind`, insist on that top-level type (dict, list, str)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise BitnetError(f"{where}: corrupt {what} (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError and the int-digits limit are ValueErrors
        raise BitnetError(f"{where}: corrupt {what} ({_first_line(e)})") from None
    if kind is not None and not isinstance(value, kind):
        raise BitnetError(f"{where}: corrupt {what} (must be {_KIND_NAMES.get(kind, kind.__name__)}, "
                          f"got {type(value).__name__})")
    return value


def read(path: Path, what: str, kind: type | None = None, max_bytes: int = MAX_JSON_BYTES):
    """Read and parse a JSON file (at most `max_bytes`)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise BitnetError(f"{path}: missing ({what})") from None
    except OSError as e:
        raise BitnetError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise BitnetError(f"{path}: {what} is larger than {max_bytes:,} bytes")
    return loads(raw, str(path), what, kind)


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def short(value, limit: int = 60) -> str:
    """repr of a value from an untrusted file, cut short (a 5,000-digit number stays readable)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr
        text = f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else "<unprintable>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_utf8(text: str) -> bool:
    """False for a str that cannot be written as UTF-8: a lone surrogate, as JSON's "\\udc80"
    decodes to, or as a non-UTF-8 command-line argument arrives (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dumps(obj, **kwargs) -> str:
    """json.dumps(ensure_ascii=False) whose text can always be written as UTF-8: a lone surrogate (a
    non-UTF-8 file name arrives as one, e.g. \\udcff) becomes its JSON escape instead of failing the write."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    return text if is_utf8(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")
