"""The one exception type the CLI turns into a clean message and a non-zero exit."""


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
