"""The one exception type the CLI turns into a clean message and a non-zero exit, and `warn` for
notes that are not errors."""

import logging
import re
import sys
from typing import Callable, Mapping, NoReturn


class BitnetError(Exception):
    """A problem with the user's input or environment, explained in words.

    Raise it with a message that names the file, key or value at fault; the CLI prints
    the message (no traceback) and exits with ``exit_code``.
    """

    exit_code = 1
    param: str | tuple[str, ...] | None = None

    def __init__(self, message: str, exit_code: int | None = None, param: str | tuple[str, ...] | None = None):
        """``param``: the function parameter(s) at fault, named in the message as the caller wrote them
        (``top_p must be in (0, 1]``); the CLI shows its options instead (``--top-p``, see `as_flags`)."""
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
        self.param = param


def flag(param: str) -> str:
    """The command-line option of a library parameter: Typer's rule, top_p -> --top-p."""
    return "--" + param.replace("_", "-")


# A value the message quotes, 'like this' or "like this" (not the apostrophe of "model's"): a user's
# text, never a parameter's name.
_QUOTED = re.compile(r"""(?<!\w)('[^'\n]*'|"[^"\n]*")(?!\w)""")


def as_flags(error: BitnetError, options: Mapping[str, str] | None = None) -> str:
    """The message of `error` with its parameters spelled as command-line options: `options` where
    a command names one otherwise (pack's `kind` is ``--from``), else Typer's rule (`flag`).

    A parameter is replaced where it stands as a word of its own, not inside a quoted value, a path
    or another word: ``host 'no such host'`` becomes ``--host 'no such host'``."""
    params = (error.param,) if isinstance(error.param, str) else error.param or ()
    words = [(re.compile(rf"(?<![\w/.\\-]){re.escape(p)}(?![\w/\\-]|\.\w)"), (options or {}).get(p) or flag(p))
             for p in params]
    parts = _QUOTED.split(str(error))  # the quoted values at the odd indexes
    for i in range(0, len(parts), 2):
        for word, option in words:
            parts[i] = word.sub(lambda _: option, parts[i])
    return "".join(parts)


class _CurrentStderr(logging.Handler):
    """Writes to whatever sys.stderr is when a record is emitted (CliRunner and pytest swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # a closed stream must not turn a note into a crash
            self.handleError(record)


log = logging.getLogger("bitnet_cli")
if not log.handlers:
    log.addHandler(_CurrentStderr())
    log.propagate = False  # one copy on stderr; remove the handler to route notes elsewhere


def warn(message: str) -> None:
    """A note or warning for the user on stderr, not an error (the logger 'bitnet_cli', WARNING)."""
    log.warning(message)


def run_script(main: Callable[[list[str]], int | None]) -> NoReturn:
    """Exit with `main(sys.argv[1:])`'s status; a BitnetError becomes one `error: ...` line on
    stderr and its exit code, as in the CLI (for the scripts in benchmarks/)."""
    try:
        sys.exit(main(sys.argv[1:]))
    except BitnetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
