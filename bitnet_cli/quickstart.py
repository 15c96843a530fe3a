"""The whole pipeline once, on the bundled default: train -> pack -> generate -> eval.

`bitnet quickstart` is the README's first command on a fresh machine: it trains the tiny
recipe on the bundled TinyShakespeare, packs the result, generates from the packed file on
the C engine, and scores it with lm-eval: ARC-Easy (the full set from local data when it is
found, else the 400 questions bundled with bitnet-cli) and perplexity on held-out Shakespeare.
Each stage is the same library call the individual subcommands make. It leaves, under the
output directory: ``train/`` (``final/`` checkpoint, ``metrics.jsonl``, ``loss.png``),
``model.bin`` and ``eval.json``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from bitnet_cli.errors import BitnetError
from bitnet_cli.files import bundled

PROMPT = "ROMEO:\nBut soft, what light"


@dataclass
class QuickstartResult:
    out_dir: Path
    train: dict = field(default_factory=dict)
    pack: dict = field(default_factory=dict)
    generation: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    eval_file: str = ""
    eval_data: str = ""  # the --data-dir the evaluation read (bitnet eval without one goes to the hub)
    eval_tasks: tuple[str, ...] = ()
    eval_limit: int = 0

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "train": self.train, "pack": self.pack,
                "generation": self.generation, "eval": self.eval, "eval_file": self.eval_file,
                "eval_data": self.eval_data, "eval_tasks": list(self.eval_tasks), "eval_limit": self.eval_limit}


def bundled_recipe(name: str = "tiny") -> Path:
    path = bundled("recipes", f"{name}.yaml")
    if not path.is_file():
        raise BitnetError(f"bundled recipe {name!r} not found at {path}; reinstall bitnet-cli")
    return path


def default_eval_data() -> Path | None:
    """Full local lm-eval data: $BITNET_EVAL_DATA, else ../shared/data/eval beside a source checkout."""
    env = os.environ.get("BITNET_EVAL_DATA")
    if env:
        return Path(env)
    beside_repo = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
    return beside_repo if beside_repo.is_dir() else None


def bundled_eval_data() -> Path:
    """The evaluation data shipped with bitnet-cli: the first 400 ARC-Easy test questions
    (CC BY-SA 4.0, see bitnet_cli/data/README.md), in the layout of --data-dir."""
    return bundled("data", "eval")


DEFAULT_TASKS = ("arc_easy", "tinyshakespeare_heldout")
DEFAULT_EVAL_LIMIT = 200  # examples per task: a few minutes on two cores
DEFAULT_OUT = Path("runs/quickstart")


def quickstart(out_dir: str | Path = DEFAULT_OUT, *, overrides: tuple[str, ...] = (), threads: int | None = None,
               eval_tasks: tuple[str, ...] = DEFAULT_TASKS, eval_limit: int = DEFAULT_EVAL_LIMIT,
               data_dir: str | Path | None = None, console=None, eval_bar=None) -> QuickstartResult:
    """Train, pack, generate and evaluate; everything lands in ``out_dir`` (see the module docstring).

    ``eval_bar()`` may return (a context manager that shows a progress display, the
    ``progress(advance, total, what)`` callback of :func:`~bitnet_cli.eval.runner.evaluate`).
    The evaluation reads ``data_dir``, else $BITNET_EVAL_DATA or ../shared/data/eval, else the
    bundled questions, so there are always scores; its results are written to ``out_dir/eval.json``.
    """
    from bitnet_cli.eval.runner import quiet_lm_eval

    quiet_lm_eval()  # first: tqdm reads TQDM_DISABLE when it is imported (by torch's and lm-eval's imports)

    from rich.console import Console
    from rich.markup import escape

    from bitnet_cli.engine import Engine, check_threads
    from bitnet_cli.eval.runner import evaluate, result_rows, write_results
    from bitnet_cli.eval.tasks import check_task_names, task_manager
    from bitnet_cli.pack import pack_checkpoint
    from bitnet_cli.train import load_recipe, train
    from bitnet_cli.train.checkpoint import step_checkpoints
    from bitnet_cli.train.loop import TrainInterrupted

    console = console or Console(stderr=True)
    out = Path(out_dir)
    result = QuickstartResult(out)
    if out.exists() and not out.is_dir():
        raise BitnetError(f"{out}: is a file, not a directory (choose another out_dir)", param="out_dir")
    recipe = load_recipe(bundled_recipe("tiny"), overrides)
    # Everything the run and eval stages need is checked now, not after minutes of training.
    if threads is not None:
        check_threads(threads)
    if not eval_tasks:
        raise BitnetError("no eval_tasks given (e.g. arc_easy)", param="eval_tasks")
    data = Path(data_dir) if data_dir else default_eval_data() or bundled_eval_data()
    check_task_names(task_manager(data), list(eval_tasks))

    console.rule("[bold]1/4 train[/] recipes/tiny.yaml on the bundled TinyShakespeare")
    run_dir = out / "train"
    again = bool(step_checkpoints(run_dir)) or (run_dir / "final" / "trainer_state.pt").is_file()
    if again:
        console.print(f"{escape(str(run_dir))} holds an earlier quickstart run: continuing it", soft_wrap=True)
    try:
        trained = train(recipe, run_dir, resume=again, console=console)
    except TrainInterrupted as e:
        raise BitnetError(f"interrupted: the same `bitnet quickstart` command continues {run_dir} from step "
                          f"{e.resume_step}", exit_code=130) from None
    result.train = trained.to_json()
    if trained.start_step >= trained.steps:
        console.print(f"reused the finished run ({trained.steps} steps, val loss {trained.val_loss:.4f}): nothing "
                      f"left to train; delete {escape(str(run_dir))} or give another --out to train again",
                      soft_wrap=True, highlight=False)

    console.rule("[bold]2/4 pack[/] the final checkpoint into one ternary file")
    model = out / "model.bin"
    summary = pack_checkpoint(trained.checkpoint, model, force=True)
    result.pack = summary.to_dict()
    console.print(f"{escape(str(model))}: {summary.file_bytes / 1e6:.2f} MB, "
                  f"{summary.ternary_bits_per_weight:.3f} bits per ternary weight", soft_wrap=True)

    console.rule("[bold]3/4 run[/] generation on the C engine (no torch)")
    engine = Engine.load(model, threads=threads)
    gen = engine.generate(PROMPT, max_tokens=80, temperature=0.8, seed=0)
    console.print(PROMPT, end="", style="bold", highlight=False, markup=False)
    for piece in gen:
        console.print(piece, end="", highlight=False, markup=False)
    console.print()
    engine.close()
    result.generation = {"prompt": PROMPT, "text": gen.text, **gen.stats.to_dict()}

    where = "the questions bundled with bitnet-cli" if data == bundled_eval_data() else str(data)
    console.rule(f"[bold]4/4 eval[/] {', '.join(eval_tasks)}")
    console.print(f"at most {eval_limit} examples per task; data from {escape(where)}", soft_wrap=True)
    display, progress = eval_bar() if eval_bar else (contextlib.nullcontext(), None)
    with display:
        results = evaluate(model, list(eval_tasks), limit=eval_limit, threads=threads, data_dir=data,
                           progress=progress)
    write_results(results, out / "eval.json", force=True)  # the quickstart's own file, rewritten each run
    result.eval = {f"{task}/{metric}": value for task, metric, value, _ in result_rows(results)}
    result.eval_file = str(out / "eval.json")
    result.eval_data, result.eval_tasks, result.eval_limit = str(data), tuple(eval_tasks), eval_limit
    return result


def next_steps(result: QuickstartResult) -> list[tuple[str, str]]:
    """(what, command) lines to try after a quickstart, with its real paths."""
    q = lambda path: shlex.quote(str(path))  # noqa: E731 -- paths are pasted into a shell
    out = result.out_dir
    model = q(out / "model.bin")
    # The evaluation as the quickstart ran it: its data (without --data-dir, eval reads the hub) and limit.
    evaluate = f"bitnet eval {model} --tasks {','.join(result.eval_tasks or DEFAULT_TASKS)}"
    if result.eval_data:
        evaluate += f" --data-dir {q(result.eval_data)} --limit {result.eval_limit}"
    return [
        ("generate", f'bitnet run {model} -p "ROMEO:" -n 64'),
        ("chat", f"bitnet run {model} --chat"),
        ("inspect", f"bitnet info {model} --verify"),
        ("benchmark", f"bitnet bench --model {model} --threads 1,2"),
        ("evaluate", evaluate),
        ("GGUF", f"bitnet pack {q(out / 'train')} {q(out / 'model.gguf')} --to gguf"),
    ]
