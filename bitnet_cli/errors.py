"""The one exception type the CLI turns into a clean message and a non-zero exit."""

import sys
from typing import Callable, NoReturn


class BitnetError(Exception):
    """A problem with the user's input or environment, explained in words.

    Raise it with a message that names the file, key or value at fault; the CLI prints
    the message (no traceback) and exits with ``exit_code``.
    """

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def run_script(main: Callable[[list[str]], int | None]) -> NoReturn:
    """Exit with `main(sys.argv[1:])`'s status; a BitnetError becomes one `error: ...` line on
    stderr and its exit code, as in the CLI (for the scripts in benchmarks/)."""
    try:
        sys.exit(main(sys.argv[1:]))
    except BitnetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
