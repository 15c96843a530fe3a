"""A new user's first hour (issue 12): nothing is lost, and every failure is one line naming its fix.

Everything here fails (or succeeds) before any long work starts, so the file runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bitnet_cli import cli
from bitnet_cli.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def test_error_message_is_not_wrapped_at_a_narrow_width(tmp_path, monkeypatch):
    """rich would break the line at the console width; a long path must come out whole."""
    monkeypatch.setattr(cli.err_console, "width", 40)
    missing = tmp_path / ("a-rather-long-directory-name-" * 4) / "no-such-model.bin"
    result = runner.invoke(app, ["info", str(missing)])
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert str(missing) in line and "no such file" in line


def test_markup_like_text_in_an_error_is_printed_as_is(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.err_console, "width", 40)
    missing = tmp_path / "[bold]model[train].bin"
    result = runner.invoke(app, ["info", str(missing)])
    assert result.exit_code == 1 and str(missing) in _one_error_line(result.output)


@pytest.mark.parametrize("args, module, extra", [
    (["train", "tiny"], "torch", "train"),
    (["eval", "model.bin", "--tasks", "arc_easy"], "lm_eval", "eval"),
    (["quickstart", "--out", "OUT"], "torch", "train,eval"),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, args, module, extra):
    """As after `pip install -e .` (no extras): the module is made unimportable in a fresh interpreter."""
    args = [a.replace("OUT", str(tmp_path / "qs")) for a in args]
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from bitnet_cli.cli import app\napp({args!r})")
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package, from any working directory
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    line = _one_error_line(done.stderr)
    assert f"pip install 'bitnet-cli[{extra}]'" in line and module in line
    assert "Traceback" not in done.stderr


def _eval_args(model, output, *extra):
    return ["eval", str(model), "--tasks", "arc_easy", "-o", str(output), *extra]


def test_eval_output_is_never_an_input_and_needs_force(tmp_path):
    model = tmp_path / "model.bin"
    model.write_bytes(b"precious model bytes")
    result = runner.invoke(app, _eval_args(model, model))
    assert result.exit_code == 1 and "input" in _one_error_line(result.output)
    result = runner.invoke(app, _eval_args(model, model, "--force"))  # not even with --force
    assert result.exit_code == 1 and "input" in _one_error_line(result.output)
    assert model.read_bytes() == b"precious model bytes"

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    result = runner.invoke(app, _eval_args(ckpt, ckpt / "config.json", "--force"))
    assert result.exit_code == 1 and "input" in _one_error_line(result.output)
    assert (ckpt / "config.json").read_text() == "{}"

    old = tmp_path / "results.json"
    old.write_text("earlier results")
    result = runner.invoke(app, _eval_args(model, old))
    assert result.exit_code == 1 and "--force" in _one_error_line(result.output)
    assert old.read_text() == "earlier results"


def test_eval_offline_without_data_dir_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("BITNET_EVAL_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))  # nothing cached to fall back on
    model = tmp_path / "model.bin"
    model.write_bytes(b"x")
    import socket

    from bitnet_cli.eval import tasks

    def never(*args, **kwargs):
        raise AssertionError("offline: nothing may be tried (lm-eval alone retried the hub for 30 s)")

    monkeypatch.setattr(socket, "create_connection", never)
    monkeypatch.setattr(tasks, "task_manager", never)  # lm-eval's task index: the hub comes next
    result = runner.invoke(app, ["eval", str(model), "--tasks", "arc_eazy,tinyshakespeare_heldout"])
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert "HF_HUB_OFFLINE" in line and "--data-dir" in line and "BITNET_EVAL_DATA" in line
    # the task that needs the hub is named, so that a typo shows (lm-eval's index, which knows, is not built)
    assert "'arc_eazy'" in line and "tinyshakespeare_heldout" not in line


def test_a_bundled_recipe_name_with_a_dot_is_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing named like it here: the bundled recipe is meant
    result = runner.invoke(app, ["train", "bitnet-b1.58-700m", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parameters"] > 0.5e9
    result = runner.invoke(app, ["train", "bitnet-b1.58-70m"])
    assert result.exit_code == 1 and "bitnet-b1.58-700m" in _one_error_line(result.output)  # the names are listed


def test_q4_embeddings_do_not_change_the_ternary_bits_per_weight(hf_tiny_checkpoint, tmp_path):
    from bitnet_cli.pack import pack_checkpoint

    f16 = pack_checkpoint(hf_tiny_checkpoint, tmp_path / "f16.bin")
    q4 = pack_checkpoint(hf_tiny_checkpoint, tmp_path / "q4.bin", embeddings="q4")
    assert q4.ternary_bits_per_weight == f16.ternary_bits_per_weight
    assert 2.0 <= f16.ternary_bits_per_weight < 2.7  # 2 bits, plus the K padding to 128 of this small model
    assert q4.file_bytes < f16.file_bytes


@pytest.mark.parametrize("command", ["train", "pack", "info", "run", "eval", "bench", "quickstart", "serve"])
def test_help_is_readable_at_80_columns(command, monkeypatch):
    """Nothing in --help is cut to `hellas…` or runs past 80 columns."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TERMINAL_WIDTH", "80")
    out = runner.invoke(app, [command, "--help"]).output
    assert "Usage" in out
    assert [line for line in out.splitlines() if "…" in line or len(line) > 80] == []


def test_info_table_of_a_2b4t_sized_model_fits_80_columns():
    """The longest tensor names and widest shapes there are, grouped by layer, without folding."""
    from rich.console import Console

    from bitnet_cli.arch import PRESETS, ModelDims
    from bitnet_cli.pack.format import tensor_specs

    dims = ModelDims.from_config(PRESETS["2b4t"].fields)
    tensors = [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "bytes": s.nbytes}
               for s in tensor_specs(dims, "f16")]
    console = Console(width=80, record=True)
    console.print(cli._tensor_table(tensors))
    text = console.export_text()
    assert "model.layers.{i}.self_attn.attn_sub_norm.weight" in text and "128256x2560" in text
    assert all(len(line) <= 80 for line in text.splitlines())


def test_top_level_api_is_lazy_and_documented():
    code = ("import sys, bitnet_cli\n"
            "from bitnet_cli import Engine, PackedModel, pack_checkpoint, BitnetError\n"
            "assert 'torch' not in sys.modules and 'bitnet_cli.eval.runner' not in sys.modules\n"
            "from bitnet_cli import evaluate, train, load_recipe, quickstart\n"
            "for name in bitnet_cli.__all__[1:]:\n"
            "    assert getattr(bitnet_cli, name).__doc__, name\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bench_kernel_table_of_2b4t_shapes_fits_80_columns():
    from rich.console import Console

    from bitnet_cli.arch import PRESETS
    from bitnet_cli.bench import report
    from bitnet_cli.bench.shapes import weight_shapes

    stat = {"median": 0.0123456, "min": 0.01, "max": 0.02, "n": 3}
    rows = []
    for shape in weight_shapes(PRESETS["2b4t"].fields):
        for impl, backend in (("ternary", "avx512vnni"), ("int8", "int8"), ("f32", "BLAS (default threads)")):
            rows.append({"impl": impl, "backend": backend, "n": shape["n"], "k": shape["k"], "tokens": 128,
                         "threads": 16, "projections": shape["projections"], "seconds": stat,
                         "gbps": {"median": 123.4}, "gops": {"median": 9999.0}, "pct_of_bandwidth": 100.0,
                         "gmacs": {"median": 9999.9}, "pct_of_peak": 100.0})
    console = Console(width=80, record=True)
    report._kernels(rows, console)
    text = console.export_text()
    assert "6912x2560" in text and "gate,up" in text and "12,346" in text and "9999.9  100%" in text and "1.0x" in text
    assert all(len(line) <= 80 for line in text.splitlines())


# ---------------------------------------------------------------- one dialect (issue 11)


def _options(command: str) -> dict[str, tuple[str, ...]]:
    import typer.main

    click_cmd = typer.main.get_command(app).commands[command]
    return {p.name: tuple(p.opts) for p in click_cmd.params}


@pytest.mark.parametrize("command", ["run", "eval", "bench", "quickstart", "serve"])
def test_minus_t_is_threads_in_every_command(command):
    opts = _options(command)
    assert set(opts["threads"]) == {"--threads", "-t"}
    assert all("-t" not in spelled for name, spelled in opts.items() if name != "threads")


def test_threads_is_shown_alike_in_every_command():
    """eval's --threads (a str, to read the old -t TASKS) showed INTEGER where run and serve show <int>."""
    import re

    shown = {}
    for command in ("run", "serve", "eval", "quickstart"):
        out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        shown[command] = re.search(r"--threads\s+-t\s+(\S+)", out).group(1)
    assert set(shown.values()) == {"<int>"}, shown


def test_run_and_serve_share_the_model_and_context_options():
    import typer.main

    run, serve = ({p.name: p for p in typer.main.get_command(app).commands[c].params} for c in ("run", "serve"))
    assert run["model"].help == serve["model"].help and "GGUF" in serve["model"].help
    assert set(run["ctx_size"].opts) == set(serve["ctx_size"].opts) == {"--ctx-size", "-c"}
    assert run["ctx_size"].help.split("(")[1].split(")")[0] == serve["ctx_size"].help.split("(")[1].split(")")[0]


def test_every_json_flag_says_the_same_thing():
    import typer.main

    helps = set()
    for name, click_cmd in typer.main.get_command(app).commands.items():
        for p in click_cmd.params:
            if "--json" in p.opts:
                helps.add(p.help.split(":")[0])
    assert helps == {"Print one JSON object on stdout, nothing else there"}


def test_run_sampling_defaults_are_the_library_s():
    from bitnet_cli.sampling import SamplingParams

    opts = {p.name: p.default for p in __import__("typer.main").main.get_command(app).commands["run"].params}
    d = SamplingParams()
    assert (opts["temperature"], opts["top_k"], opts["top_p"], opts["repeat_penalty"]) == (
        d.temperature, d.top_k, d.top_p, d.repeat_penalty)


def test_eval_old_minus_t_for_tasks_still_works_with_a_note(tmp_path, monkeypatch):
    """`eval MODEL -t arc_easy` (the old spelling): read as the tasks, with a deprecation note; the
    command then goes on (here to the offline error, which names what it would have scored)."""
    monkeypatch.delenv("BITNET_EVAL_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    model = tmp_path / "model.bin"
    model.write_bytes(b"x")
    result = runner.invoke(app, ["eval", str(model), "-t", "arc_easy"])
    assert result.exit_code == 1 and "deprecated" in result.output and "--tasks" in result.output
    assert "--data-dir" in result.output  # it got as far as the tasks' data
    result = runner.invoke(app, ["eval", str(model), "-t", "2"])
    assert result.exit_code == 1 and "give the tasks" in _one_error_line(result.output)


def test_library_errors_name_parameters_and_the_cli_shows_options():
    from bitnet_cli.errors import BitnetError, as_flags
    from bitnet_cli.sampling import SamplingParams

    with pytest.raises(BitnetError) as e:
        SamplingParams(top_p=0).check()
    assert str(e.value).startswith("top_p must be in (0, 1]") and "--" not in str(e.value)
    assert as_flags(e.value).startswith("--top-p must be in (0, 1]")
    with pytest.raises(BitnetError, match="top_k must be an integer >= 0"):
        SamplingParams(top_k=-3).check()  # was taken as "no limit" without a word
    result = runner.invoke(app, ["run", "no-such-model.bin", "-p", "x", "--top-k", "-3"])
    assert result.exit_code == 1 and _one_error_line(result.output).startswith("error: --top-k must be an integer >= 0")
    assert as_flags(BitnetError("a message about nothing in particular")) == "a message about nothing in particular"


@pytest.mark.parametrize("message, param, options, shown", [
    ("host 'no such host': not known", "host", None, "--host 'no such host': not known"),  # not the quoted value
    ("/tmp/force/force.bin: already exists (use force to overwrite)", "force", None,
     "/tmp/force/force.bin: already exists (use --force to overwrite)"),  # not the path
    ("x: already holds a run: pass resume to continue it, or choose another out_dir", ("resume", "out_dir"),
     {"out_dir": "--out"}, "x: already holds a run: pass --resume to continue it, or choose another --out"),
    ("invalid recipe\n  overrides a=1: a: bad\n  overrides b=x: b: bad", "overrides", {"overrides": "--set"},
     "invalid recipe\n  --set a=1: a: bad\n  --set b=x: b: bad"),  # every mention
    ("the model's ctx_size", "ctx_size", None, "the model's --ctx-size"),  # an apostrophe is not a quote
])
def test_as_flags_replaces_the_parameter_words_only(message, param, options, shown):
    from bitnet_cli.errors import BitnetError, as_flags

    assert as_flags(BitnetError(message, param=param), options) == shown


def test_no_library_message_names_a_command_line_option():
    """Library code names parameters (BitnetError(..., param=...)); only cli.py spells options.
    Docstrings, comments and suggested commands (`bitnet info --verify`) may name them."""
    import ast
    import re

    root = Path(__file__).resolve().parent.parent / "bitnet_cli"
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name in ("cli.py", "fuzz.py") or path.parent.name == "bench" and path.name == "e2e.py":
            continue  # the Typer app; the fuzzer's command lines; the e2e worker's own argparse
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                    "BitnetError", "warn", "QueueFull", "ApiError"):
                text = "".join(n.value for a in node.args for n in ast.walk(a)
                               if isinstance(n, ast.Constant) and isinstance(n.value, str))
                if re.search(r"(?<!\w)--[a-z]", re.sub(r"`[^`]*`", "", text)):  # a `bitnet ...` command may
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {text[:80]}")
    assert not found, "\n".join(found)


def test_every_command_s_summary_is_one_paragraph_line():
    """Rich keeps a docstring's line breaks: a summary written over two lines showed in `bitnet --help`
    as a broken line ("... up to --parallel requests" / "together ...") for serve and quickstart."""
    import typer.main

    for name, cmd in typer.main.get_command(app).commands.items():
        summary = (cmd.help or "").strip().split("\n\n")[0]
        assert "\n" not in summary, (name, summary)


@pytest.mark.parametrize("args, message", [
    (["--chat", "--json"], "--json prints one generation as JSON; it does not combine with --chat"),
    (["-p", "x", "--system", "You are Romeo."], "--system is the system prompt of --chat"),
])
def test_run_refuses_options_it_would_ignore(args, message):
    # both were silently ignored: --chat printed its conversation as text, and -p ran without the system prompt
    result = runner.invoke(app, ["run", "no-such-model.bin", *args])
    assert result.exit_code == 1 and _one_error_line(result.output).startswith(f"error: {message}")


def test_quickstart_next_steps_repeat_its_evaluation(tmp_path):
    """The printed eval command reads the quickstart's data with its limit (without --data-dir, eval goes to
    the hub), and paths are quoted for the shell."""
    import shlex

    from bitnet_cli.quickstart import QuickstartResult, next_steps

    out = tmp_path / "my runs" / "qs"
    result = QuickstartResult(out, eval_data=str(tmp_path / "eval data"), eval_tasks=("arc_easy",), eval_limit=20)
    steps = dict(next_steps(result))
    assert shlex.split(steps["evaluate"]) == ["bitnet", "eval", str(out / "model.bin"), "--tasks", "arc_easy",
                                              "--data-dir", str(tmp_path / "eval data"), "--limit", "20"]
    assert shlex.split(steps["inspect"]) == ["bitnet", "info", str(out / "model.bin"), "--verify"]
    assert result.to_json()["eval_data"] == str(tmp_path / "eval data")


@pytest.mark.parametrize("argv", [["pack", "{tmp}/nowhere", "{tmp}/x.bin"],
                                  ["eval", "{tmp}/nowhere.bin", "--tasks", "arc_easy", "--data-dir", "{tmp}"],
                                  ["bench", "--model", "{tmp}/nowhere.bin"]])
def test_error_is_the_first_line_of_stderr_off_a_terminal(argv, tmp_path):
    """No progress display off a terminal: rich left an empty line on stderr before the `error:` line."""
    import subprocess
    import sys

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = subprocess.run([sys.executable, "-m", "bitnet_cli", *argv], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("error: "), done.stderr


def test_tables_fold_cells_instead_of_cutting_them():
    """At 40 columns a long path and every figure survive whole (rich cut them to `…` before)."""
    import io
    import re

    from rich.console import Console

    from bitnet_cli.tables import Table

    path = "/tmp/" + "long_directory_name_" * 8 + "/model.gguf"
    table = Table(title="t")
    for name in ("threads", "load s", "pp128", "tg128"):
        table.add_column(name, justify="right")
    table.add_row("1", "0.0123", "10234.5", "380.25")
    untitled = Table(show_header=False)
    untitled.add_row("source", path)  # columns rich adds by itself fold too
    out = io.StringIO()
    console = Console(file=out, width=40, color_system=None)
    console.print(table)
    console.print(untitled)
    text = out.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 40
    joined = re.sub(r"[\s│┃┏┓┗┛┡┩╇━┳┻┃└┘┌┐├┤─┬┴┼]", "", text)
    for figure in ("0.0123", "10234.5", "380.25", path):
        assert figure in joined


def test_architecture_module_table_lists_every_module():
    """docs/ARCHITECTURE.md's "Modules, bottom up" names each module and subpackage of bitnet_cli, and no
    module that is gone: a newcomer finds where a thing lives from it."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    doc = (repo / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = doc.split("## Modules, bottom up")[1].split("\nC (`kernels/`)")[0]
    named = set(re.findall(r"`(\w+(?:\.py|/))`", section))
    package = repo / "bitnet_cli"
    modules = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    packages = {p.name + "/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert sorted((modules | packages) - named) == []
    assert [n for n in sorted(named) if not (package / n).exists() and not (repo / n).exists()] == []  # gone


def test_train_help_names_every_bundled_recipe():
    """The recipe names in `bitnet train --help` come from the shipped files, so a new recipe shows up."""
    from bitnet_cli.files import bundled_recipes

    out = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output.split())
    names = bundled_recipes()
    assert {"tiny", "small", "convert-small"} <= set(names)
    assert all(name in out for name in names), out


def test_markup_like_paths_are_printed_as_written(tmp_path):
    """A directory named like rich markup (`[/x]`, `[bold]`) is text: pack and info printed it through rich's
    markup parser, which failed on `[/x]` with a MarkupError traceback and swallowed `[bold]`."""
    import re
    import shutil

    fixtures = Path(__file__).resolve().parent / "data" / "gguf"
    closing, opening = tmp_path / "[" / "x]", tmp_path / "[bold]"  # the path tmp/[/x]/...
    closing.mkdir(parents=True)
    opening.mkdir()
    shutil.copy(fixtures / "a-i2_s-f16.gguf", closing / "m.gguf")
    packed = opening / "m.bin"
    squash = lambda text: re.sub(r"[\s│]", "", text)  # noqa: E731 -- rich folds long paths over lines and cells
    result = runner.invoke(app, ["pack", str(closing / "m.gguf"), str(packed)])
    assert result.exit_code == 0, result.output
    assert f"packed{packed}" in squash(result.output) and f"{closing}/m.gguf(gguf" in squash(result.output)
    result = runner.invoke(app, ["info", str(packed)])
    assert result.exit_code == 0 and str(packed) in squash(result.output), result.output


def test_cli_defaults_are_the_librarys():
    """Each option whose library parameter has a default shows that default: one fact, one place (a CLI
    literal beside a library literal drifts apart)."""
    import inspect

    from bitnet_cli import cli, quickstart
    from bitnet_cli.engine import Engine
    from bitnet_cli.eval import runner as eval_runner
    from bitnet_cli.serve import server

    def defaults(func):
        return {name: p.default for name, p in inspect.signature(func).parameters.items()}

    def cli_defaults(command):
        return {name: getattr(p.default, "default", p.default) for name, p in inspect.signature(command).parameters.items()}

    pairs = [  # (command, library function, {option parameter: library parameter})
        (cli.serve, server.serve, {"host": "host", "port": "port", "parallel": "parallel", "max_queue": "max_queue",
                                   "kv_cache": "kv_cache"}),
        (cli.eval_cmd, eval_runner.evaluate, {"batch_size": "batch_size", "kv_cache": "kv_cache"}),
        (cli.run, Engine.generate, {"max_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k",
                                    "top_p": "top_p", "repeat_penalty": "repeat_penalty",
                                    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty"}),
        (cli.quickstart, quickstart.quickstart, {"out": "out_dir", "limit": "eval_limit"}),
    ]
    for command, library, names in pairs:
        ours, theirs = cli_defaults(command), defaults(library)
        for option, param in names.items():
            assert ours[option] == theirs[param], f"{command.__name__} {option}: {ours[option]!r} != {theirs[param]!r}"
    assert cli_defaults(cli.quickstart)["tasks"].split(",") == list(quickstart.DEFAULT_TASKS)
