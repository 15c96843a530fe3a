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


@app.command()
def bench(
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", help="Packed model file to benchmark (default: a synthetic --shape)."),
    shape: Optional[str] = typer.Option(
        None, "--shape", "-s", help="Synthetic model shape with random ternary weights, no download: "
        "2b4t, 700m, 1.3b, 3b or 8b \\[default: 2b4t]. Written once to the cache dir."),
    embeddings: str = typer.Option("f16", help="Embedding/head type of the synthetic model: f16 or int8."),
    threads: Optional[str] = typer.Option(
        None, "--threads", "-t", help="Thread counts to sweep, e.g. 1,2,4,8 \\[default: 1 and all CPUs]."),
    repeat: int = typer.Option(3, "--repeat", "-r", help="Runs per figure; tables show the median (min-max)."),
    what: str = typer.Option("roofline,kernels,e2e", help="Sections to run, comma-separated: "
                             "roofline (memory bandwidth, decode ceiling), kernels (per weight shape), "
                             "e2e (load, prompt and generation speed)."),
    prompts: str = typer.Option("128,512", help="e2e prompt lengths: ppN evaluates N tokens in one call."),
    generate: int = typer.Option(128, help="e2e generation length: tgN decodes N tokens one by one."),
    tokens: str = typer.Option("1,8,32,128", help="Kernel token counts: 1 is the decode GEMV, more is prefill GEMM."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout (no tables)."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG: thread scaling, and decode vs the roofline."),
    cache_dir: Optional[Path] = typer.Option(
        None, help="Where synthetic models are cached \\[default: ~/.cache/bitnet-cli/synthetic]."),
):
    """Measure kernels, memory bandwidth (the decode roofline) and end-to-end speed.

    Example: [bold]bitnet bench --threads 1,2 --repeat 5 --plot bench.png[/]
    """
    import json
    import os

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from bitnet_cli.bench import report, suite, target as targets

    with user_errors():
        if model is not None and shape is not None:
            raise BitnetError("give either --model or --shape, not both")
        thread_list = suite.parse_int_list(threads or f"1,{os.cpu_count() or 1}", "--threads")
        sections = suite.parse_sections(what)
        if repeat < 1:
            raise BitnetError(f"--repeat must be at least 1, got {repeat}")
        if generate < 1:
            raise BitnetError(f"--generate must be at least 1, got {generate}")
        chosen = (targets.from_file(model) if model is not None
                  else targets.from_shape(shape or "2b4t", embeddings, cache_dir))
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=err_console, transient=True) as bar:
            task = bar.add_task("starting", total=None)
            results = suite.run(chosen, thread_list, repeat, sections,
                                prompts=suite.parse_int_list(prompts, "--prompts"), generate=generate,
                                tokens=suite.parse_int_list(tokens, "--tokens"),
                                progress=lambda text: bar.update(task, description=text))
        if plot is not None:
            from bitnet_cli.bench.plot import plot as write_plot

            write_plot(results, plot)
        if json_out:
            print(json.dumps(results, indent=2))
        else:
            report.print_report(results, console)
            if plot is not None:
                console.print(f"plot written to {plot}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
