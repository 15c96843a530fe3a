"""The `bitnet` command line: option parsing, rich output and exit codes only.

Every command is a call into the library (``bitnet_cli.<stage>``) that a Python user can
make too. Heavy modules (torch, lm-eval, the compiled kernels) are imported inside the
commands, so ``bitnet --help`` stays fast and inference needs no torch.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from bitnet_cli import __version__
from bitnet_cli.errors import BitnetError

app = typer.Typer(
    name="bitnet",
    help="Train, pack, run, evaluate and benchmark BitNet b1.58 ternary LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors():
    """Turn expected failures into one red line and a non-zero exit, never a traceback."""
    try:
        yield
    except BitnetError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130)


def _version_callback(value: bool):
    if value:
        console.print(f"bitnet-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
):
    """Train, pack, run, evaluate and benchmark BitNet b1.58 ternary LLMs."""


# ---------------------------------------------------------------- train (issue 2)


# ---------------------------------------------------------------- pack / info (issue 3)


# ---------------------------------------------------------------- run (issue 4)


# ---------------------------------------------------------------- eval (issue 5)


# ---------------------------------------------------------------- bench (issue 6)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
