"""The `bitnet` command line: option parsing, rich output and exit codes only.

Every command is a call into the library (``bitnet_cli.<stage>``) that a Python user can
make too. Heavy modules (torch, lm-eval, the compiled kernels) are imported inside the
commands, so ``bitnet --help`` stays fast and inference needs no torch.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from bitnet_cli import __version__
from bitnet_cli.arch import PRESETS
from bitnet_cli.engine import DEFAULT_CTX, DEFAULT_KV_CACHE, DEFAULT_MAX_TOKENS
from bitnet_cli.errors import BitnetError, as_flags, warn
from bitnet_cli.eval.perplexity import DEFAULT_CTX_SIZE as DEFAULT_PPL_CTX_SIZE
from bitnet_cli.eval.runner import DATA_ENV, DEFAULT_BATCH_SIZE
from bitnet_cli.files import TEXT_FILE_LIMIT, bundled_recipes, read_text_file
from bitnet_cli.pack.convert import PACK_TARGETS, SOURCE_KINDS
from bitnet_cli.pack.embeddings import EMBEDDING_TYPES
from bitnet_cli.pack.ternary import LAYOUTS, layout as ternary_layout
from bitnet_cli.pack.gguf import GGUF_TYPES, HEAD_TYPES
from bitnet_cli.quickstart import DEFAULT_EVAL_LIMIT as QUICKSTART_EVAL_LIMIT
from bitnet_cli.quickstart import DEFAULT_OUT as QUICKSTART_OUT
from bitnet_cli.quickstart import DEFAULT_TASKS as QUICKSTART_TASKS
from bitnet_cli.sampling import SamplingParams
from bitnet_cli.serve.server import DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PARALLEL, DEFAULT_PORT

# The usage-error class of the click that typer runs on (newer typers carry their own copy of click,
# so `click.UsageError` would not catch it); typer's public BadParameter derives from it.
UsageError = typer.BadParameter.__mro__[1]


class _OneLineUsageErrors(TyperGroup):
    """Usage errors (unknown option, missing argument, bad value) as one ``error:`` line and exit 2.

    Typer shows them as a boxed panel of several lines; every other failure of ours is one
    ``error:`` line, and scripts grep for that. Parsing happens in ``make_context`` (the group's
    own options) and in ``invoke`` (the subcommand's), so both are covered.
    """

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as e:
            _usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as e:
            _usage_error(e)


def _usage_error(e) -> None:
    print_error(e.format_message())
    if e.ctx is not None:
        err_console.print(f"try: {escape(e.ctx.command_path)} --help", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


app = typer.Typer(
    name="bitnet",
    cls=_OneLineUsageErrors,
    help="Train, pack, run, evaluate and benchmark BitNet b1.58 ternary LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


# ---------------------------------------------------------------- options every command spells alike
# One definition each, so that an option means the same in every command: -t is always --threads
# (bench sweeps a list of them), --json always prints one JSON object on stdout and nothing else.

SAMPLING = SamplingParams()  # the defaults `bitnet run` shows are the library's


def threads_option(what: str = "") -> Optional[int]:
    return typer.Option(None, "--threads", "-t", help=f"CPU threads{what} (default: the physical cores).")


def model_argument() -> Path:
    """The model of the commands that run the C engine (run, serve)."""
    return typer.Argument(..., help="Packed model file (made by `bitnet pack`), or a GGUF (bitnet.cpp's I2_S, "
                                    "llama.cpp's TQ1_0/TQ2_0), imported once into a cache.")


def ctx_size_option(of: str, longer: str) -> Optional[int]:
    return typer.Option(None, "--ctx-size", "-c", help=f"Context length{of} in tokens (default: the model's "
                        f"max_position_embeddings, at most {DEFAULT_CTX}). A longer prompt is {longer}.")


def kv_cache_option() -> str:
    return typer.Option(DEFAULT_KV_CACHE, "--kv-cache", help="KV cache element type: f32, or f16 for half the memory per "
                        "cached token (keys and values rounded to f16 as they are stored; f32 matches transformers).")


def lookup_option(what: str = "") -> int:
    return typer.Option(
        0, "--lookup", metavar="N",
        help=f"Prompt lookup decoding: up to N draft tokens{what} per pass, copied from where the text's last 2-3 "
             "tokens appeared before, checked in the same engine pass. The text is exactly the same; faster where it "
             "repeats earlier text (edits, quotes, lists), a little slower where drafts miss. 0: off.")


# A bad eval data directory is named as the user gave it: --data-dir, or this variable (the default of both commands)
EVAL_DATA_ENV = f"${DATA_ENV}"


def json_option(what: str) -> bool:
    return typer.Option(False, "--json", help=f"Print one JSON object on stdout, nothing else there: {what}.")


def print_error(message: str) -> None:
    """One ``error: ...`` line on stderr.

    soft_wrap: rich would otherwise break the line at the console width (80 columns when stderr is
    not a terminal), splitting paths and words; a terminal wraps long lines by itself. The message
    is escaped so that text like ``bitnet-cli[train]`` is not taken for markup. Bytes of a path or
    argument that are not UTF-8 are shown as the shell would take them back (``\\xff``), not as
    Python's stand-in surrogates (``\\udcff``), also inside a value quoted with repr().
    """
    from bitnet_cli.tokenizer import shown_text

    shown = _QUOTED_SURROGATE.sub(r"\\x\1", shown_text(message, "backslashreplace"))
    err_console.print(f"[bold red]error:[/] {escape(shown)}", highlight=False, soft_wrap=True)


# A value quoted with repr() shows a non-UTF-8 byte of argv as its stand-in surrogate's escape ('x\udcff');
# print_error shows it as the byte the shell would take back ('x\xff'), as it does for unquoted text.
_QUOTED_SURROGATE = re.compile(r"(?<!\\)\\udc([89a-f][0-9a-f])")


@contextlib.contextmanager
def user_errors(extra: str | None = None, options: dict[str, str] | None = None):
    """Turn expected failures into one red line and a non-zero exit, never a traceback.

    ``extra``: the pip extra the command needs (e.g. "train"); a module missing from it is
    reported as the one line that says what to install. ``options``: the command's options whose
    library parameter has another name ({"kind": "--from"}); errors name the option.
    """
    try:
        yield
    except BitnetError as e:
        print_error(as_flags(e, options))  # library messages name parameters; here they are options
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt as e:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(143 if isinstance(e, Terminated) else 130)
    except ModuleNotFoundError as e:
        if extra is None or not e.name or e.name.split(".")[0] == "bitnet_cli":
            raise  # a broken install of our own package is a bug to report, not a missing extra
        kind = "extras" if "," in extra else "extra"
        print_error(f"this command needs the {extra} {kind} (no module named {e.name.split('.')[0]!r}): "
                    f"pip install 'bitnet-cli[{extra}]'")
        raise typer.Exit(1)
    except MemoryError:
        print_error("out of memory: this needs more memory than the machine has (a smaller model, batch or "
                    "context needs less)")
        raise typer.Exit(1)
    except RuntimeError as e:  # torch.OutOfMemoryError, by name: commands that need no torch never import it
        if type(e).__name__ != "OutOfMemoryError":
            raise
        print_error(f"the GPU ran out of memory: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        raise typer.Exit(1)
    except BaseException as e:  # a Rust panic (pyo3 PanicException is a BaseException) on hostile input
        if type(e).__name__ != "PanicException":
            raise
        print_error(f"a library failed on this input: {e}")
        raise typer.Exit(1)



def print_json(obj) -> None:
    """The one JSON convention of every --json: one object on stdout, nothing else there (valid UTF-8)."""
    from bitnet_cli import safejson

    def fallback(value):  # paths, numpy scalars, sets and the odd object lm-eval keeps in its results
        if isinstance(value, (set, frozenset, tuple)):
            return list(value)
        return value.item() if hasattr(value, "item") else str(value)

    sys.stdout.write(safejson.dumps(obj, default=fallback) + "\n")
    sys.stdout.flush()


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a job scheduler, torchrun), raised where the program is, so that what Ctrl-C
    cleans up is cleaned up for it too: a half-written temporary file is removed (the default action
    ended the process and left it, gigabytes for a large pack), a training run says how to resume.
    Exit code 143, the shell's for SIGTERM."""


def _raise_terminated(signum, frame):
    raise Terminated()


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
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # not over a handler someone else installed
        signal.signal(signal.SIGTERM, _raise_terminated)  # serve's uvicorn installs its own while it serves


# ---------------------------------------------------------------- train


@app.command("train")
def train_cmd(
    recipe: Path = typer.Argument(
        ..., help=f"Recipe YAML (e.g. recipes/tiny.yaml), or a bundled recipe's name: {', '.join(bundled_recipes())}."
    ),
    set_: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="Override a recipe key, e.g. --set optim.lr=1e-3 (repeatable)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Run directory (default: the recipe's out_dir, else runs/<name>)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in the run directory from its newest checkpoint (after Ctrl-C or a crash)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved recipe, parameter count and FLOPs/token, then exit."
    ),
    json_out: bool = json_option("the result, or the dry run"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
):
    """Train a BitNet b1.58 model (or its float baseline) from a YAML recipe.

    Writes RUN_DIR/final (an HF-layout checkpoint for [bold]bitnet pack[/] and [bold]bitnet eval[/]), metrics.jsonl, loss.png.

    Example: [bold]bitnet train tiny --set train.steps=300 --out runs/tiny[/]

    Several GPUs: [dim]torchrun --nproc_per_node 8 --no-python bitnet train recipe.yaml[/]
    """
    import os

    with user_errors("train", options={"out_dir": "--out", "overrides": "--set"}):
        from bitnet_cli.train.recipe import load_recipe

        r = load_recipe(recipe, set_)
        if dry_run:
            from bitnet_cli.train import describe

            d = describe(r)
            if json_out:
                print_json({"recipe": r.model_dump(mode="json"), **d})
                return
            console.print(r.dump_yaml(), highlight=False, markup=False)
            quant = "ternary (b1.58)" if r.model.quant == "bitnet" else "full precision"
            console.print(
                f"[bold]model[/]   {d['parameters']:,} parameters ({d['parameters_non_embedding']:,} without the "
                f"embedding), {quant}\n"
                f"[bold]compute[/] {d['flops_per_token'] / 1e9:.3g} GFLOP per training token, "
                f"{d['flops_per_token'] * d['total_tokens']:.3g} FLOP in all\n"
                f"[bold]budget[/]  {d['steps']:,} steps x {d['tokens_per_step']:,} tokens per process "
                f"= {d['total_tokens']:,} tokens"
            )
            m = d["machine"]
            if m["device"] is None:
                here = f"[yellow]{escape(m['problem'])}[/]"
            else:
                products = {"int8": "BitLinear products on int8 tensor cores",
                            "int8 emulation": "the int8 kernels' pure-torch emulation (for tests; slower)",
                            "full precision": "full-precision products",
                            "plain": f"fake-quantised products ({escape(str(m['int8_off']))})"}[m["products"]]
                here = f"{escape(m['device'])}: {products}" + (", the step under CUDA graphs" if m["cuda_graphs"]
                                                                else "")
            console.print(f"[bold]here[/]    {here}")
            return
        from bitnet_cli.train import train

        res = train(r, out_dir=out, resume=resume, progress=progress and not json_out, console=err_console)
        if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
            return
        if json_out:
            print_json(res.to_json())
            return
        if res.start_step >= res.steps:
            did = f"[bold green]done[/] already: the run in {escape(str(res.out_dir))} had finished its {res.steps} steps\n"
        else:
            resumed = f" (resumed at step {res.start_step}, {res.steps} in all)" if res.start_step else ""
            did = (f"[bold green]done[/] {res.steps - res.start_step} steps{resumed} in {res.seconds:.0f} s "
                   f"({res.tokens_per_second:,.0f} tok/s" + (f", MFU {res.mfu:.1%}" if res.mfu else "")
                   + (f", peak GPU memory {res.peak_memory_gib:.1f} GiB" if res.peak_memory_gib else "") + ")\n")
        console.print(
            did +
            f"  val loss {res.val_loss:.4f} nats/token (unigram entropy of the corpus {res.unigram_entropy:.4f})\n"
            f"  checkpoint {res.checkpoint}\n  metrics    {res.out_dir / 'metrics.jsonl'}, {res.out_dir / 'loss.png'}"
        )


# ---------------------------------------------------------------- pack / info

def _choices(name: str, values) -> type[Enum]:
    """A Typer choice type made from a library table, so that adding a value there adds the choice."""
    return Enum(name, {value: value for value in values}, type=str)


EmbeddingType = _choices("EmbeddingType", EMBEDDING_TYPES)  # the head types' traits table
PackTarget = _choices("PackTarget", PACK_TARGETS)
SourceKind = _choices("SourceKind", SOURCE_KINDS)
GGUFType = _choices("GGUFType", GGUF_TYPES)
GGUFHead = _choices("GGUFHead", HEAD_TYPES)
TernaryLayoutChoice = _choices("TernaryLayoutChoice", LAYOUTS)  # the ternary layouts table (pack/ternary.py)


def _human_bytes(n: float) -> str:
    """Three significant digits: '263 MB', '2.89 MB', '120 B' (narrow enough for 80-column tables)."""
    for unit in ("B", "KB", "MB", "GB"):
        if round(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 99.95 else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} GB"


def _progress_display(*columns, enabled: bool = True):
    """A transient rich progress display on stderr (stdout stays clean for --json), drawn only on a
    terminal: elsewhere rich would leave an empty line on stderr, before an `error:` line too."""
    from rich.progress import Progress

    return Progress(*columns, console=err_console, transient=True, disable=not (enabled and err_console.is_terminal))


def _tensor_progress(description: str, enabled: bool):
    """A rich progress bar over tensors on stderr (stdout stays clean for --json)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    progress = _progress_display(
        TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("[dim]{task.fields[name]}"), enabled=enabled,
    )
    task = progress.add_task(description, total=None, name="")

    def update(done: int, total: int, name: str) -> None:
        progress.update(task, completed=done, total=total, name=name)

    return progress, update


@app.command()
def pack(
    src: str = typer.Argument(..., help="Checkpoint directory (ours or HF, bf16/fp32/packed, sharded), a .safetensors file in one, a hub id like microsoft/bitnet-b1.58-2B-4T, or a GGUF file (bitnet.cpp's I2_S or F16/F32, llama.cpp's TQ1_0/TQ2_0)."),
    out: Path = typer.Argument(..., help="Output file (.bin for bitnet run/eval/bench, .gguf with --to gguf)."),
    embeddings: Optional[EmbeddingType] = typer.Option(None, "--embeddings", help="Storage of the embedding and output head, which every decoded token reads in full: f16; int8 with one fp32 scale per row (half the bytes, slightly lossy); q6, 6.56 bits per weight (GGUF Q6_K's precision: 41% of the bytes); q4, 4.25 bits per weight (a quarter of the bytes; see `bitnet eval` for its cost). Default: f16, or for a GGUF source the type that loses nothing (q6 for Q6_K, int8 for our Q8_0 export, else f16), with a note on what was lost."),
    to: PackTarget = typer.Option(PackTarget.native, "--to", help="native: our mmap-ready file (docs/FORMAT.md); gguf: for bitnet.cpp (--gguf-type i2_s) or llama.cpp (tq2_0, tq1_0), which need every ternary matrix's input width (hidden and FFN size) to be a multiple of their block, 256 (the quickstart's model is)."),
    gguf_type: GGUFType = typer.Option(GGUFType.tq2_0, "--gguf-type", help="Ternary tensor type of the GGUF export: i2_s (bitnet.cpp's `bitnet-b1.58`, the official 2B4T layout, 2 bits/weight); tq2_0 (llama.cpp's `bitnet`, 2.06 bits/weight) or tq1_0 (1.69 bits/weight); llama.cpp computes a SiLU FFN for the last two."),
    gguf_head: Optional[GGUFHead] = typer.Option(None, "--gguf-head", help="Type of the GGUF token embedding / tied head: f16, or q6_k (6.56 bits/weight). Default: f16 from f16 embeddings, Q8_0 from int8."),
    source_kind: SourceKind = typer.Option(SourceKind.auto, "--from", help="Force the source kind instead of detecting it: own (bitnet train), hf (bf16/fp32 weights), hf-packed (uint8 trits + weight_scale), hub (treat SRC as a hub id), gguf (a GGUF file)."),
    i2s_block: Optional[int] = typer.Option(None, "--i2s-block", help="I2_S layout of a GGUF source: 128-value blocks (bitnet.cpp's x86 build, the published files) or 64 (its ARM build). Both have the same size and nothing in the file says which, so the default is 128 (64 when a tensor's size allows only that), with a note."),
    layout: TernaryLayoutChoice = typer.Option(TernaryLayoutChoice.i2, "--layout", help="Ternary weight layout of a native file: i2, 2 bits per weight (four codes a byte), or tq1, 1.6 bits per weight (five trits a byte: 20% fewer bytes per token, more decoding work; `bitnet bench --layout` compares them). Both hold the same trits: the same logits."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    json_output: bool = json_option("the summary (no progress bar)"),
):
    """Pack a BitNet b1.58 checkpoint, or a 1.58-bit Llama-architecture one (Llama3-8B-1.58, Falcon3 1.58bit, Falcon-E), into one ternary file (2 bits per weight), ready to run.

    Weights are ternarised with the absmean rule (exactly as transformers does), or taken as stored from an offline-quantised checkpoint (weight_scale divided or multiplied, as its quantization_config says), packed in the layout the C kernels read directly, and written with per-tensor checksums. The output is written to a temporary file and renamed when complete.

    Examples: [bold]bitnet pack runs/tiny tiny.bin[/] (a training run's final checkpoint),
    [bold]bitnet pack microsoft/bitnet-b1.58-2B-4T-bf16 2b4t.bin[/],
    [bold]bitnet pack ggml-model-i2_s.gguf 2b4t.bin[/] (import bitnet.cpp's GGUF),
    [bold]bitnet pack HF1BitLLM/Llama3-8B-1.58-100B-tokens llama3-8b.bin[/] (uint8 trits, weight_scale divided),
    [bold]bitnet pack runs/tiny tiny.gguf --to gguf --gguf-type i2_s --gguf-head q6_k[/] (for bitnet.cpp's llama-cli)
    """

    from bitnet_cli.tables import Table

    with user_errors(options={"kind": "--from", "ternary_layout": "--layout"}):
        from bitnet_cli.pack import pack_checkpoint

        progress, update = _tensor_progress("packing", enabled=not json_output)
        with progress:
            summary = pack_checkpoint(
                src, out, embeddings=embeddings.value if embeddings else None, force=force, kind=source_kind.value,
                to=to.value, gguf_type=gguf_type.value, progress=update,
                gguf_head=gguf_head.value if gguf_head else None, i2s_block=i2s_block, ternary_layout=layout.value,
            )
    if json_output:
        print_json(summary.to_dict())
        return
    table = Table(title=escape(f"packed {summary.output}"), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("source", escape(f"{summary.source} ({summary.source_kind})"))
    table.add_row("format", f"{summary.format}, embeddings {summary.embeddings}" +
                  (f", layout {summary.layout}" if summary.format == "native" else ""))
    table.add_row("parameters", f"{summary.parameters:,} ({summary.ternary_parameters:,} ternary)")
    table.add_row("bits per weight", f"{summary.ternary_bits_per_weight:.4f} ternary, {summary.bits_per_weight:.4f} whole file")
    table.add_row("file size", f"{_human_bytes(summary.file_bytes)} vs {_human_bytes(summary.bf16_bytes)} in bf16")
    table.add_row("compression", f"{summary.compression_ratio:.2f}x")
    table.add_row("time", f"{summary.seconds:.1f} s")
    console.print(table)
    for note in summary.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if to == PackTarget.gguf and gguf_type != GGUFType.i2_s:
        from bitnet_cli.pack.gguf import LLAMA_CPP_CAVEAT

        console.print(f"[yellow]note:[/] {LLAMA_CPP_CAVEAT}")


def _tensor_groups(tensors: list[dict]) -> list[dict]:
    """Tensors grouped by role (layer index replaced by {i}), for a compact `info` table."""
    import re

    groups: dict[str, dict] = {}
    for t in tensors:
        key = re.sub(r"\.layers\.\d+\.", ".layers.{i}.", t["name"])
        g = groups.setdefault(key, {"name": key, "dtype": t["dtype"], "shape": t["shape"], "count": 0, "bytes": 0})
        g["count"] += 1
        g["bytes"] += t["bytes"]
    return list(groups.values())


def _tensor_table(tensors: list[dict]):
    """The grouped tensors; no vertical rules, so a 2B4T model's names and shapes fit 80 columns."""
    from rich import box
    from bitnet_cli.tables import Table

    table = Table(title="tensors ({i}: every layer)", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("name", "dtype", "shape", "n", "bytes"):
        table.add_column(col, justify="right" if col in ("n", "bytes") else "left", overflow="fold",
                         no_wrap=col != "name")
    for g in _tensor_groups(tensors):
        shape = "x".join(map(str, g["shape"]))
        table.add_row(g["name"], g["dtype"], shape, str(g["count"]), _human_bytes(g["bytes"]))
    return table


@app.command()
def info(
    file: Path = typer.Argument(..., help="A packed model file written by `bitnet pack`, or a GGUF (shown as it imports: once, into a cache)."),
    verify: bool = typer.Option(False, "--verify", help="Recompute every tensor's crc32 and compare with the stored checksums (exit 1 on mismatch)."),
    json_output: bool = json_option("everything: config, metadata, every tensor"),
):
    """Show what a packed model file holds: config, tokenizer, layout, tensors, sizes, checksums.

    Example: [bold]bitnet info tiny.bin --verify[/]
    """
    from bitnet_cli.tables import Table

    with user_errors():
        from bitnet_cli.pack import PackedModel
        from bitnet_cli.pack.gguf_cache import model_file

        with PackedModel.open(model_file(file)) as pm:
            bad = None
            if verify:
                progress, update = _tensor_progress("verifying", enabled=not json_output)
                with progress:
                    bad = pm.verify(progress=update)
            d = pm.dims
            report = pm.describe()
            if bad is not None:
                report["verified"] = not bad
                report["checksum_mismatches"] = bad
        if json_output:
            print_json(report)
        else:
            tok = report["tokenizer_config"]
            head = Table(title=escape(str(file)), show_header=False, title_justify="left")
            head.add_column(style="bold")
            head.add_column()
            head.add_row("format", f"bitnet-cli v{report['format_version']}, layout {report['layout']}, "
                                   f"embeddings {report['embeddings']}")
            extras = (", q/k/v biases" if d.qkv_bias else "") + (
                f", projection input norms (use_rms_norm, eps {d.bitlinear_norm_eps:g})" if d.bitlinear_norm_eps else "")
            head.add_row("family", f"{d.family} ({d.hidden_act} FFN gate, {'with' if d.sub_norms else 'no'} sub-norms"
                                   f"{extras})")
            head.add_row("model", f"{d.num_layers} layers, hidden {d.hidden_size}, FFN {d.intermediate_size}, "
                         f"{d.num_heads} heads ({d.num_kv_heads} KV) x {d.head_dim}, vocab {d.vocab_size}, "
                         f"{'tied' if d.tie_word_embeddings else 'untied'} embeddings")
            rope_scaling = f" ({d.rope_scaling['rope_type']} scaling x{d.rope_scaling['factor']:g})" if d.rope_scaling else ""
            head.add_row("context", f"{d.max_position_embeddings} positions, RoPE theta {d.rope_theta:g}{rope_scaling}, "
                                    f"RMSNorm eps {d.rms_norm_eps:g}")
            head.add_row("tokenizer", escape(f"embedded ({report['tokenizer_bytes']:,} bytes), bos {tok.get('bos_token')!r}, "
                         f"eos {tok.get('eos_token')!r}, chat template {'yes' if tok.get('chat_template') else 'no'}"))
            head.add_row("source", escape(f"{report['source']} ({report['converter']})"))
            head.add_row("size", _human_bytes(report["file_bytes"]))
            console.print(head)
            console.print(_tensor_table(report["tensors"]))
            if bad is not None and not bad:
                console.print(f"[green]checksums OK[/] ({len(report['tensors'])} tensors)")
        if bad:
            raise BitnetError(f"{file}: checksum mismatch in {len(bad)} tensor(s): {', '.join(bad[:5])}"
                              + (" ..." if len(bad) > 5 else ""))


# ---------------------------------------------------------------- run


CLI_FORMATS = {"text": "text", "json": "json_object"}  # run --format: the engine's output_format


def read_json_schema(text: str) -> dict:
    """run --json-schema: inline JSON, or the path of a file holding it; checked before the model loads."""
    from bitnet_cli.constrain import compile_schema

    source = "--json-schema" if text.lstrip().startswith("{") else text
    if source != "--json-schema":
        text = read_text_file(text)
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BitnetError(f"{source}: not valid JSON ({e or 'nested too deeply'})") from None
    compile_schema(schema)
    return schema


@app.command()
def run(
    model: Path = model_argument(),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue (with --chat: the first message)."),
    prompt_file: Optional[str] = typer.Option(
        None, "--file", "-f", metavar="PATH",
        help="Read the prompt from this UTF-8 file instead of -p ('-': standard input), less one trailing newline."),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", "-n", help="Most tokens to generate (per reply with --chat)."),
    temperature: float = typer.Option(SAMPLING.temperature, "--temperature", "--temp", help="Sampling temperature; 0 is greedy (always the likeliest token). --temp as in llama.cpp."),
    top_k: int = typer.Option(SAMPLING.top_k, help="Sample among the k likeliest tokens; 0 for no limit."),
    top_p: float = typer.Option(SAMPLING.top_p, help="Sample from the smallest set of tokens with this total probability."),
    repeat_penalty: float = typer.Option(SAMPLING.repeat_penalty, help="> 1 discourages the last 64 tokens (1.0: off)."),
    frequency_penalty: float = typer.Option(
        SAMPLING.frequency_penalty, help="OpenAI's: subtracted from a token's logit for each time it was generated "
        "(-2 to 2; > 0 discourages repeats)."),
    presence_penalty: float = typer.Option(
        SAMPLING.presence_penalty, help="OpenAI's: subtracted from the logit of every token generated already "
        "(-2 to 2; > 0 encourages new tokens)."),
    logit_bias: list[str] = typer.Option(
        [], "--logit-bias", "-l", metavar="ID=BIAS",
        help="Add BIAS (-100 to 100) to token ID's logit, repeatable; -100 bans the token. Also llama.cpp's "
             "ID+BIAS / ID-BIAS."),
    seed: Optional[int] = typer.Option(None, help="Random seed: the same seed gives the same text."),
    threads: Optional[int] = threads_option(),
    ctx_size: Optional[int] = ctx_size_option("", "an error"),
    kv_cache: str = kv_cache_option(),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable); it is not printed."),
    json_output: bool = json_option("the prompt, the text and the timings"),
    chat: bool = typer.Option(
        False, "--chat", help="Interactive conversation using the model's chat template (fallback: 'User:/Assistant:' turns). When the context fills, the oldest turns are dropped (the system prompt stays)."
    ),
    system: Optional[str] = typer.Option(None, "--system", help="With --chat: a system prompt, kept for the whole conversation."),
    echo: bool = typer.Option(True, "--echo/--no-echo", help="Print the prompt before the generated text, as llama.cpp does."),
    output_format: str = typer.Option(
        "text", "--format", metavar="text|json",
        help="json: every token is chosen so that the text is one JSON object, and generation ends when it closes "
             "(the server's response_format json_object; ollama's --format json). The prompt should still ask for JSON."),
    lookup: int = lookup_option(),
    json_schema: Optional[str] = typer.Option(
        None, "--json-schema", "-j", metavar="SCHEMA|PATH",
        help="Like --format json, to one JSON object this schema accepts: the schema inline ('{...}') or a file "
             "(as llama.cpp's -j/-jf). Types, properties, lengths, bounds, patterns, formats, enums, anyOf and $ref "
             "are enforced (docs/SERVE.md lists the keywords); any other keyword is an error naming it."),
):
    """Generate text from a packed model on the CPU, streaming tokens as they come.

    Examples: [bold]bitnet run model.bin -p "Once upon a time" -n 64 --seed 1[/],
    [bold]bitnet run model.bin -f story.txt --no-echo[/], [bold]cat notes.txt | bitnet run model.bin -f -[/],
    [bold]bitnet run ggml-model-i2_s.gguf -p "Hello" --temperature 0[/] (imported once into ~/.cache/bitnet-cli/gguf)
    """

    with user_errors():
        from bitnet_cli.engine import Engine
        from bitnet_cli.lookup import check_lookup

        if prompt is not None and prompt_file is not None:
            raise BitnetError("give the prompt with -p/--prompt or -f/--file, not both")
        if prompt_file is not None:
            prompt = read_text_file(prompt_file)
        if prompt is None and not chat:
            raise BitnetError("give a prompt with -p/--prompt or -f/--file (or use --chat)")
        if chat and json_output:  # it was ignored: the conversation printed as text
            raise BitnetError("--json prints one generation as JSON; it does not combine with --chat")
        if system is not None and not chat:  # it was ignored without a word
            raise BitnetError("--system is the system prompt of --chat; without --chat, put it in -p/--prompt")
        # before a load that may take seconds
        SamplingParams(temperature, top_k, top_p, repeat_penalty, frequency_penalty, presence_penalty).check()
        bias = parse_logit_bias(logit_bias)
        if output_format not in CLI_FORMATS:
            raise BitnetError(f"--format {output_format!r}: choose text or json")
        schema = read_json_schema(json_schema) if json_schema is not None else None
        check_lookup(lookup)
        engine = Engine.load(model, threads=threads, ctx_size=ctx_size, kv_cache=kv_cache)
        options = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                       presence_penalty=presence_penalty, logit_bias=bias, seed=seed, stop=stop, json_schema=schema,
                       lookup=lookup,
                       output_format="json_schema" if schema is not None else CLI_FORMATS[output_format])
        if chat:
            _chat(engine, prompt, system, options)
            return
        gen = engine.generate(prompt, **options)
        if json_output:
            text = "".join(gen)
            print_json({"prompt": prompt, "text": text, **gen.stats.to_dict()})
            return
        if echo:
            console.print(prompt, end="", style="bold", highlight=False, markup=False, soft_wrap=True)
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        _print_run_stats(gen.stats)


def parse_logit_bias(given: list[str]) -> dict[int, float]:
    """`--logit-bias ID=BIAS` (or llama.cpp's ID+BIAS, ID-BIAS), repeatable, as {id: bias}; the engine checks the ids
    and the range."""
    bias = {}
    for text in given:
        m = re.fullmatch(r"\s*(\d+)\s*(?:=\s*([+-]?[0-9.]+(?:[eE][+-]?\d+)?)|([+-][0-9.]+(?:[eE][+-]?\d+)?))\s*", text)
        try:
            bias[int(m[1])] = float(m[2] or m[3])
        except (TypeError, ValueError):
            raise BitnetError(f"--logit-bias {text!r}: expected TOKEN_ID=BIAS, e.g. 15043=-100", param="logit_bias") \
                from None
    return bias


def _print_run_stats(s) -> None:
    reused = f" ({s.reused_tokens} reused from the cache)" if s.reused_tokens else ""
    err_console.print(
        f"[dim]load {s.load_s:.2f} s | prompt {s.prompt_tokens} tokens{reused}, {s.prompt_tokens_per_s:.1f} tok/s | "
        f"first token {s.time_to_first_token_s * 1000:.0f} ms | generated {s.generated_tokens} tokens, "
        f"{s.generation_tokens_per_s:.1f} tok/s"
        + (f" | drafts {s.accepted_tokens}/{s.drafted_tokens} accepted" if s.drafted_tokens else "")
        + f" | stop: {s.stop_reason}[/]",
        highlight=False, soft_wrap=True,
    )


def _chat(engine, first_message: Optional[str], system: Optional[str], options: dict) -> None:
    """A conversation that outlives the context: the oldest turns go first, the system prompt stays.

    Each turn's prompt begins with the previous one's tokens (unless turns were just dropped), so
    the engine runs only the new tokens: its KV cache holds the rest.
    """
    from bitnet_cli.engine import fit_chat

    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    reply_room = min(options["max_tokens"], engine.ctx_size // 2)
    dropped = 0
    err_console.print("[dim]chat: an empty line or Ctrl-D ends the conversation[/]")
    pending = first_message
    while True:
        if pending is None:
            try:
                pending = console.input("[bold green]you>[/] ")
            except EOFError:
                console.print()  # the prompt line was left open
                break
            except UnicodeDecodeError as e:
                raise BitnetError(f"the message is not valid UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
        if not pending.strip():
            break
        messages.append({"role": "user", "content": pending})
        pending = None
        ids, drop = fit_chat(engine, messages, reply_room)
        if drop:
            keep = [m for m in messages if m["role"] == "system"]
            messages = keep + [m for m in messages if m["role"] != "system"][drop:]
            dropped += drop
            err_console.print(f"[dim](context of {engine.ctx_size} tokens full: the {drop} oldest message(s) "
                              f"dropped, {dropped} in all{', the system prompt kept' if system else ''})[/]",
                              highlight=False, soft_wrap=True)
        gen = engine.generate(ids, **options)
        console.print("[bold blue]model>[/] ", end="")
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": gen.text.strip()})
        _print_run_stats(gen.stats)


API_KEY_ENV = "BITNET_API_KEY"  # serve --api-key from the environment


@app.command()
def serve(
    model: Path = model_argument(),
    host: str = typer.Option(DEFAULT_HOST, "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="TCP port; 0 picks a free one (printed at start)."),
    threads: Optional[int] = threads_option(),
    parallel: int = typer.Option(DEFAULT_PARALLEL, "--parallel", help="Sequences decoded together, each with its own KV cache (memory: see the start-up line)."),
    ctx_size: Optional[int] = ctx_size_option(" of each sequence", "a 400 error"),
    kv_cache: str = kv_cache_option(),
    max_queue: int = typer.Option(DEFAULT_MAX_QUEUE, "--max-queue", help="Sequences that may wait for a free slot; beyond that requests get 503 (retry later)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model id clients ask for (default: the file name without its extension)."),
    json_output: bool = json_option("the start-up facts (URL, memory per slot)"),
    lookup: int = lookup_option(" of each sequence"),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar=API_KEY_ENV, show_envvar=False,
        help=f"Require 'Authorization: Bearer KEY' on every endpoint but /health (else 401), as llama-server's "
             f"--api-key; OpenAI clients send it as api_key. ${API_KEY_ENV} keeps it out of the process list."),
):
    """Serve a packed model over an OpenAI-compatible HTTP API, decoding up to --parallel requests together (continuous batching: the weights are read once per step for all of them).

    Endpoints: /v1/completions, /v1/chat/completions (JSON mode, structured outputs, tool calls), /v1/models, /tokenize, /detokenize, /health, /metrics (Prometheus); docs/SERVE.md. Ctrl-C (or SIGTERM) finishes the requests in flight, then exits. Needs the serve extra: pip install 'bitnet-cli\\[serve]'.

    Example: [bold]bitnet serve model.bin --parallel 8 --port 8000[/], then
    [bold]curl localhost:8000/v1/completions -d '{"prompt": "Once upon a time", "max_tokens": 32}'[/]
    or any OpenAI client with base_url="http://localhost:8000/v1".
    """

    with user_errors(options={"model_id": "--name", "api_key": "--api-key", "lookup": "--lookup"}):
        from bitnet_cli.serve.server import serve as run_server

        def ready(info: dict) -> None:
            if json_output:
                print_json(info)
                return
            err_console.print(
                f"serving [bold]{info['model']}[/] at [bold]{info['url']}[/] | {info['parallel']} slots x "
                f"{info['ctx_size']} tokens, {info['kv_cache']} KV cache {_human_bytes(info['kv_bytes_per_slot'])} per slot "
                f"(committed as used) | {info['threads']} threads, {info['isa']} | queue {info['max_queue']}"
                + (f" | lookup {info['lookup']}" if info["lookup"] else "")
                + (f" | tool calls {info['tool_calls']}" if info["tool_calls"] else "")
                + (" | API key required" if info["api_key"] else ""),
                highlight=False, soft_wrap=True)

        if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
            warn(f"serving on {host} without --api-key: anyone who can reach this port can use the model")
        run_server(model, host=host, port=port, threads=threads, parallel=parallel, ctx_size=ctx_size,
                   max_queue=max_queue, model_id=name, ready=ready, kv_cache=kv_cache, api_key=api_key,
                   lookup=lookup)


# ---------------------------------------------------------------- eval


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="A packed model file (runs on the C engine) or a checkpoint directory in HF layout (runs on torch)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", "-T", help="Comma-separated lm-eval task names, e.g. arc_easy,hellaswag or mmlu (a group: its subtasks); tinyshakespeare_heldout needs no data. Required."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", "-k", help="Few-shot examples per prompt (default: each task's own setting, usually 0)."),
    limit: Optional[float] = typer.Option(None, "--limit", help="Evaluate only the first N examples of each task (a value below 1 is a fraction)."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", "-b", min=1, help="Sequences per forward pass on torch; the C engine shares contexts through its KV cache instead."),
    threads: Optional[str] = typer.Option(None, "--threads", "-t", metavar="<int>", help="CPU threads (default: the physical cores). (-t TASKS, the old spelling of --tasks, still works, with a note.)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results JSON here: lm-eval's full results (with --file: the perplexity's). Written atomically; an existing file needs --force, and an input of the command is never overwritten."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --output file."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar=DATA_ENV, help="Read task data from local JSONL files in HF schemas instead of the HuggingFace hub: DIR/arc_easy/test.jsonl, DIR/mmlu/test.jsonl and so on (see bitnet_cli/eval/tasks.py)."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Keep every example's prompt, answers and scores in the results JSON."),
    kv_cache: str = kv_cache_option(),
    text_file: Optional[str] = typer.Option(
        None, "--file", "-f", metavar="PATH",
        help="Instead of --tasks: the perplexity of this UTF-8 text file ('-': standard input), as llama.cpp's "
             "llama-perplexity -f computes it: chunks of --ctx-size tokens, each chunk's second half scored."),
    ctx_size: Optional[int] = typer.Option(
        None, "--ctx-size", "-c",
        help="Context length in tokens. With --tasks the window (default: the model's, at most "
             f"{DEFAULT_CTX} on the C engine; longer contexts are cut from the left); with --file the chunk length "
             f"(default {DEFAULT_PPL_CTX_SIZE}, llama-perplexity's)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="With --file: score only the first N chunks (as "
                                         "llama-perplexity's --chunks; default: every whole chunk of the text)."),
    kl_base: Optional[Path] = typer.Option(
        None, "--kl-base", metavar="BASE",
        help="With --file: also how far this model's next-token distributions are from BASE's (a packed file or a "
             "checkpoint with the same tokenizer, e.g. the one this file was packed from): the mean KL divergence and "
             "how often the likeliest token agrees, as llama-perplexity --kl-divergence."),
    json_output: bool = json_option("lm-eval's results (with --file: the perplexity), instead of the table"),
):
    """Score a model on lm-evaluation-harness tasks (MMLU, ARC, HellaSwag, WikiText, ...), or its perplexity on a text file.

    The task definitions (prompts, choices, metrics) are lm-eval's own, so the numbers mean what the field's numbers mean. A packed file is evaluated by the C engine; a checkpoint directory by our torch model, so a model can be compared before and after packing. With --file, the perplexity is the figure llama.cpp's llama-perplexity prints for the same text and --ctx-size (bitnet_cli/eval/perplexity.py says how it is computed).

    Examples: [bold]bitnet eval 2b4t.bin --tasks arc_easy,hellaswag --data-dir ../shared/data/eval --limit 200[/],
    [bold]bitnet eval 2b4t.bin -f wiki.test.raw -c 512 --chunks 20[/]
    """

    from bitnet_cli.tables import Table

    from_env = ctx.get_parameter_source("data_dir").name == "ENVIRONMENT"
    with user_errors("eval", options={"base": "--kl-base", **({"data_dir": EVAL_DATA_ENV} if from_env else {})}):
        if text_file is not None:
            given = {"--tasks": tasks, "--num-fewshot": num_fewshot, "--limit": limit,
                     "--log-samples": log_samples or None, "--data-dir": None if from_env else data_dir}
            if wrong := [name for name, value in given.items() if value is not None]:
                raise BitnetError(f"{', '.join(wrong)} {'goes' if len(wrong) == 1 else 'go'} with lm-eval tasks, not "
                                  "with --file (the perplexity of a text; --chunks limits how much of it is scored)")
            _eval_perplexity(model, text_file, ctx_size=ctx_size, chunks=chunks, threads=_threads(threads),
                             kv_cache=kv_cache, base=kl_base, output=output, force=force, json_output=json_output)
            return
        if chunks is not None or kl_base is not None:
            raise BitnetError(f"{'--chunks' if chunks is not None else '--kl-base'} goes with --file (the perplexity "
                              "of a text); with --tasks, --limit limits the examples")
        tasks, threads = _tasks_and_threads(tasks, threads)
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        from bitnet_cli.eval.runner import quiet_lm_eval

        quiet_lm_eval()  # before lm-eval is imported: its own bars would fight the rich one
        from bitnet_cli.eval.runner import check_output, evaluate, result_rows, write_results

        if output is not None:
            check_output(output, force=force, inputs=(model, data_dir))  # now, not after minutes of evaluation
        if limit is not None and 1 <= limit < float("inf"):  # inf: evaluate() refuses it, by name
            limit = int(limit)

        bar, progress = _eval_bar()
        with bar:
            results = evaluate(
                model, names, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, threads=threads,
                data_dir=data_dir, log_samples=log_samples, progress=progress, kv_cache=kv_cache, ctx_size=ctx_size,
            )
        if output is not None:
            write_results(results, output, force=force, inputs=(model, data_dir))
    _refused_note(results)
    if json_output:
        print_json(results)
        return
    table = Table(title=escape(f"{model} ({results['config']['model_args']['backend']})"), title_justify="left")
    for col, kw in (("task", {}), ("metric", {}), ("value", {"justify": "right"}), ("stderr", {"justify": "right"})):
        table.add_column(col, **kw)
    for task, metric, value, stderr in result_rows(results):
        table.add_row(task, metric, f"{value:.4f}", "" if stderr is None else f"± {stderr:.4f}")
    console.print(table)
    if output is not None:
        console.print(f"results written to [bold]{escape(str(output))}[/]", soft_wrap=True)


def _eval_perplexity(model: Path, text_file: str, *, ctx_size: Optional[int], chunks: Optional[int],
                     threads: Optional[int], kv_cache: str, base: Optional[Path], output: Optional[Path], force: bool,
                     json_output: bool) -> None:
    """`bitnet eval MODEL --file TEXT`: the perplexity, as a line (or --json), and the same JSON in --output."""
    from bitnet_cli.eval.perplexity import perplexity
    from bitnet_cli.eval.runner import check_output, write_results

    inputs = (model, base, None if text_file == "-" else text_file)  # never overwritten by --output
    if output is not None:
        check_output(output, force=force, inputs=inputs)
    text = read_text_file(text_file, what="text", limit=TEXT_FILE_LIMIT)
    bar, progress = _eval_bar()
    with bar:
        result = perplexity(model, text, ctx_size=DEFAULT_PPL_CTX_SIZE if ctx_size is None else ctx_size,
                            chunks=chunks, threads=threads, kv_cache=kv_cache, progress=progress, base=base)
    report = {"model": str(model), "file": text_file, **result.to_dict()}
    if output is not None:
        write_results(report, output, force=force, inputs=inputs)
    if json_output:
        print_json(report)
        return
    console.print(f"perplexity [bold]{result.perplexity:.4f}[/] +/- {result.stderr:.5f} ({result.backend}): "
                  f"{result.chunks} chunks of {result.ctx_size} tokens, {result.scored_tokens:,} tokens scored of "
                  f"the text's {result.text_tokens:,}, {result.tokens_per_s:.1f} tok/s", soft_wrap=True, highlight=False)
    if (d := result.divergence) is not None:
        console.print(f"against {escape(d.base)} (perplexity {d.base_perplexity:.4f}): KL divergence mean "
                      f"[bold]{d.kld:.6f}[/] +/- {d.kld_stderr:.6f}, median {d.kld_median:.6f}, 99% {d.kld_p99:.6f}, "
                      f"max {d.kld_max:.6f}; same likeliest token {100 * d.same_top:.2f}% +/- "
                      f"{100 * d.same_top_stderr:.2f}%", soft_wrap=True, highlight=False)
    if output is not None:
        console.print(f"results written to [bold]{escape(str(output))}[/]", soft_wrap=True)


def _threads(threads: Optional[str]) -> Optional[int]:
    try:  # a negative number is one (-t -1): the engine says what every command says of it
        return None if threads is None else int(threads)
    except ValueError:
        raise BitnetError(f"--threads {threads}: not a whole number") from None


def _tasks_and_threads(tasks: Optional[str], threads: Optional[str]) -> tuple[str, Optional[int]]:
    """eval's -t was --tasks before it meant --threads as in every command: a -t that is not a
    number, with no --tasks, is still read as the tasks (with a note), so old scripts keep working."""
    if threads is not None and not threads.strip().isdigit() and tasks is None:
        err_console.print("[yellow]note:[/] `bitnet eval -t TASKS` is deprecated: -t is --threads in every command; "
                          "write --tasks (or -T)", soft_wrap=True, highlight=False)
        return threads, None
    if tasks is None:
        raise BitnetError("give the tasks to score with --tasks, e.g. --tasks arc_easy,tinyshakespeare_heldout "
                          "(or a text file's perplexity with --file)")
    return tasks, _threads(threads)


def _eval_bar():
    """A rich bar on stderr and the evaluate(progress=...) callback that drives it."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    bar = _progress_display(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
    )
    job = bar.add_task("loading", total=None)

    def progress(done: int, total: int, what: str) -> None:
        if done == 0:
            bar.reset(job, total=total, description=what)
        bar.update(job, description=what, total=total, completed=done)

    return bar, progress


def _refused_note(results: dict) -> None:
    refused = results["config"].get("refused_requests") or {}
    if refused.get("count"):
        err_console.print(
            f"[yellow]note:[/] {refused['count']} request(s) scored as impossible (log-likelihood -inf): their "
            f"continuation alone, up to {refused['longest_continuation']} tokens, is longer than the context window "
            f"of {refused['context_window']}; longer contexts are cut from the left, as lm-eval's hf backend does",
            soft_wrap=True, highlight=False)



# ---------------------------------------------------------------- bench


@app.command()
def bench(
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", help="Packed model file (or GGUF) to benchmark (default: a synthetic --shape)."),
    shape: Optional[str] = typer.Option(
        None, "--shape", "-s", help="Synthetic model shape with random ternary weights, no download: "
        f"{', '.join(PRESETS)} \\[default: 2b4t]. Written once to the cache dir."),
    embeddings: str = typer.Option("f16", help="Embedding/head type of the synthetic model: f16, int8, q6 or q4."),
    layout: str = typer.Option("i2", "--layout", help="Ternary weight layout of the synthetic model and of the kernel table: i2 (2 bits per weight) or tq1 (1.6); a list (i2,tq1) runs each and compares them. A --model file has its own."),
    threads: Optional[str] = typer.Option(
        None, "--threads", "-t", help="CPU threads, as in every command, but bench sweeps a list: --threads 1,2,4 measures each \\[default: 1 and the physical cores]."),
    repeat: int = typer.Option(3, "--repeat", "-r", help="Runs per figure; tables show the median (min-max)."),
    what: str = typer.Option("roofline,kernels,e2e", help="Sections to run, comma-separated: "
                             "roofline (memory bandwidth, decode ceiling), kernels (per weight shape), "
                             "e2e (load, prompt and generation speed)."),
    prompts: str = typer.Option("128,512", help="e2e prompt lengths: ppN evaluates N tokens in one call."),
    generate: int = typer.Option(128, help="e2e generation length: tgN decodes N tokens one by one."),
    tokens: str = typer.Option("1,8,32,128", help="Kernel token counts: 1 is the decode GEMV, more is prefill GEMM."),
    json_out: bool = json_option("the results, instead of the tables"),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG: thread scaling, and decode vs the roofline."),
    cache_dir: Optional[Path] = typer.Option(
        None, help="Where synthetic models are cached \\[default: synthetic/ in the cache dir: $BITNET_CACHE, "
        "else $XDG_CACHE_HOME/bitnet-cli, else ~/.cache/bitnet-cli]."),
    isa: Optional[str] = typer.Option(
        None, help="Force a kernel path (scalar, avx2, avxvnni, avx512, avx512vnni, amx, neon, neondot) for kernels and e2e "
        "\\[default: $BITNET_ISA, else the fastest by a short measurement, cached per CPU (BITNET_AUTOTUNE=0: the widest)]."),
    kv_cache: str = kv_cache_option(),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --plot file."),
):
    """Measure kernels, memory bandwidth (the decode roofline) and end-to-end speed.

    Example: [bold]bitnet bench --threads 1,2 --repeat 5 --plot bench.png[/]
    """

    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    from bitnet_cli.bench import report, suite, target as targets
    from bitnet_cli.kernels import physical_cores

    with user_errors(options={"sections": "--what", "ternary_layout": "--layout"}):
        if model is not None and shape is not None:
            raise BitnetError("give either --model or --shape, not both")
        if isa is not None:
            from bitnet_cli import kernels

            kernels.resolve_isa(isa)  # a clear error for an unknown or unavailable path, before any work
        from bitnet_cli.engine import kv_cache_type

        kv_cache_type(kv_cache)  # before any work, as --isa
        thread_list = suite.parse_int_list(f"1,{physical_cores()}" if threads is None else threads, "--threads")
        sections = suite.parse_sections(what)
        if plot is not None:
            from bitnet_cli.bench.plot import check_destination

            check_destination(plot, force, model)
        prompt_list = suite.parse_int_list(prompts, "--prompts")
        token_list = suite.parse_int_list(tokens, "--tokens")
        layouts = [ternary_layout(part.strip(), param="ternary_layout").option for part in layout.split(",")]
        layouts = list(dict.fromkeys(layouts))  # in order, once each
        if model is not None and layout != "i2":
            raise BitnetError("--layout is for synthetic --shape models; a --model file has its own layout")
        chosen = ([targets.from_file(model)] if model is not None
                  else [targets.from_shape(shape or "2b4t", embeddings, cache_dir, name) for name in layouts])
        with _progress_display(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as bar:
            task = bar.add_task("starting", total=None)
            results = suite.run_layouts(chosen, thread_list, repeat, sections, prompts=prompt_list, generate=generate,
                                        tokens=token_list, progress=lambda text: bar.update(task, description=text),
                                        isa=isa, kv_cache=kv_cache)
        if plot is not None:
            from bitnet_cli.bench.plot import plot as write_plot

            write_plot(results, plot, force)
        if json_out:
            print_json(results)
        else:
            report.print_report(results, console)
            if plot is not None:
                console.print(f"plot written to {escape(str(plot))}", soft_wrap=True)


# ---------------------------------------------------------------- quickstart (the end-to-end job)


@app.command()
def quickstart(
    out: Path = typer.Option(QUICKSTART_OUT, "--out", "-o", help="Directory for the run, the packed model and results; the same command again continues (or reuses) the run in it."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a tiny.yaml field, e.g. --set train.steps=100 (repeatable)."),
    threads: Optional[int] = threads_option(" for generation and eval"),
    tasks: str = typer.Option(",".join(QUICKSTART_TASKS), "--tasks", help="Comma-separated lm-eval tasks to score the packed model on."),
    limit: int = typer.Option(QUICKSTART_EVAL_LIMIT, "--limit", min=1, help="Examples per eval task."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Local eval data \\[default: $BITNET_EVAL_DATA, else ../shared/data/eval, else the ARC-Easy questions bundled with bitnet-cli]."),
    json_out: bool = json_option("the summary of every stage, at the end"),
):
    """Run the whole pipeline on the bundled default: [bold]train[/] the tiny recipe on TinyShakespeare, [bold]pack[/] it, [bold]run[/] generation on the C engine, [bold]eval[/] with lm-eval.

    A few minutes on a 2-core laptop; leaves OUT/train (checkpoint, metrics.jsonl, loss.png), OUT/model.bin and OUT/eval.json.

    Example: [bold]bitnet quickstart --out runs/qs[/]
    """

    named = {"out_dir": "--out", "overrides": "--set", "eval_tasks": "--tasks"}
    with user_errors("train,eval", options=named if data_dir is not None else {**named, "data_dir": EVAL_DATA_ENV}):
        from bitnet_cli.quickstart import next_steps, quickstart as run_quickstart

        task_list = tuple(t.strip() for t in tasks.split(",") if t.strip())
        result = run_quickstart(out, overrides=tuple(set_), threads=threads, eval_tasks=task_list,
                                eval_limit=limit, data_dir=data_dir, console=err_console, eval_bar=_eval_bar)
    summary = result.to_json()
    if json_out:
        print_json(summary)
        return
    from bitnet_cli.tables import Table

    table = Table(title="bitnet quickstart", show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    t, p, g = summary["train"], summary["pack"], summary["generation"]
    table.add_row("val loss", f"{t['val_loss']:.3f} nats/token (unigram entropy {t['unigram_entropy']:.3f})")
    if t["start_step"] >= t["steps"]:
        table.add_row("training", f"reused the finished run of {t['steps']} steps")
    else:
        resumed = f", resumed at {t['start_step']}" if t["start_step"] else ""
        table.add_row("training", f"{t['steps'] - t['start_step']} steps{resumed}, {t['tokens_per_second']:,.0f} tok/s, "
                                  f"{t['seconds']:.0f} s")
    table.add_row("generation", f"{g['generation_tokens_per_s']:.1f} tok/s")
    run_dir = Path(t["out_dir"])
    table.add_row("checkpoint", escape(t["checkpoint"]))
    table.add_row("loss curve", escape(str(run_dir / "loss.png")))
    table.add_row("model", escape(f"{p['output']} ({p['file_bytes'] / 1e6:.2f} MB)"))
    table.add_row("eval results", escape(summary["eval_file"]))
    console.print(table)
    scores = Table(title="eval", title_justify="left")
    for col, kw in (("task", {}), ("metric", {}), ("value", {"justify": "right"})):
        scores.add_column(col, **kw)
    for key, value in summary["eval"].items():
        task, _, metric = key.partition("/")
        scores.add_row(task, metric, f"{value:.4f}")
    console.print(scores)
    console.print("[bold]next[/]")
    for what, command in next_steps(result):
        console.print(f"  {what:<10} {escape(command)}", highlight=False, soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
