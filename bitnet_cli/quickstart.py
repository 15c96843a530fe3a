"""The whole pipeline once, on the bundled default: train -> pack -> generate -> eval.

`bitnet quickstart` is the README's first command on a fresh machine: it trains the tiny
recipe on the bundled TinyShakespeare, packs the result, generates from the packed file on
the C engine, and scores it with lm-eval (ARC-Easy from local data when it is found). Each
stage is the same library call the individual subcommands make.
"""

from __future__ import annotations

import os
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

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "train": self.train, "pack": self.pack,
                "generation": self.generation, "eval": self.eval}


def bundled_recipe(name: str = "tiny") -> Path:
    path = bundled("recipes", f"{name}.yaml")
    if not path.is_file():
        raise BitnetError(f"bundled recipe {name!r} not found at {path}; reinstall bitnet-cli")
    return path


def default_eval_data() -> Path | None:
    """Local lm-eval data: $BITNET_EVAL_DATA, else ../shared/data/eval beside a source checkout."""
    env = os.environ.get("BITNET_EVAL_DATA")
    if env:
        return Path(env)
    beside_repo = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
    return beside_repo if beside_repo.is_dir() else None


def quickstart(out_dir: str | Path = "runs/quickstart", *, overrides: tuple[str, ...] = (), threads: int | None = None,
               eval_tasks: tuple[str, ...] = ("arc_easy",), eval_limit: int = 200, data_dir: str | Path | None = None,
               console=None) -> QuickstartResult:
    from rich.console import Console

    from bitnet_cli.engine import Engine
    from bitnet_cli.eval.runner import evaluate, result_rows
    from bitnet_cli.pack import pack_checkpoint
    from bitnet_cli.train import load_recipe, train
    from bitnet_cli.train.checkpoint import step_checkpoints
    from bitnet_cli.train.loop import TrainInterrupted

    console = console or Console(stderr=True)
    out = Path(out_dir)
    result = QuickstartResult(out)
    if out.exists() and not out.is_dir():
        raise BitnetError(f"{out}: is a file, not a directory (choose another --out)")
    recipe = load_recipe(bundled_recipe("tiny"), overrides)
    # Everything the eval stage needs is checked now, not after minutes of training.
    data = Path(data_dir) if data_dir else default_eval_data()
    if data is not None:
        if not eval_tasks:
            raise BitnetError("no eval tasks given (e.g. --tasks arc_easy)")
        from bitnet_cli.eval.tasks import check_task_names, task_manager

        check_task_names(task_manager(data), list(eval_tasks))

    console.rule("[bold]1/4 train[/] recipes/tiny.yaml on the bundled TinyShakespeare")
    run_dir = out / "train"
    again = bool(step_checkpoints(run_dir)) or (run_dir / "final" / "trainer_state.pt").is_file()
    if again:
        console.print(f"{run_dir} holds an earlier quickstart run: continuing it")
    try:
        trained = train(recipe, run_dir, resume=again, console=console)
    except TrainInterrupted as e:
        raise BitnetError(f"interrupted: the same `bitnet quickstart` command continues {run_dir} from step "
                          f"{e.resume_step}", exit_code=130) from None
    result.train = trained.to_json()

    console.rule("[bold]2/4 pack[/] the final checkpoint into one ternary file")
    summary = pack_checkpoint(trained.checkpoint, out / "model.bin", force=True)
    result.pack = summary.to_dict()
    console.print(f"{out / 'model.bin'}: {summary.file_bytes / 1e6:.2f} MB, "
                  f"{summary.ternary_bits_per_weight:.3f} bits per ternary weight")

    console.rule("[bold]3/4 run[/] generation on the C engine (no torch)")
    engine = Engine.load(out / "model.bin", threads=threads)
    gen = engine.generate(PROMPT, max_tokens=80, temperature=0.8, seed=0)
    console.print(PROMPT, end="", style="bold", highlight=False)
    for piece in gen:
        console.print(piece, end="", highlight=False)
    console.print()
    result.generation = {"prompt": PROMPT, "text": gen.text, **gen.stats.to_dict()}

    if data is None:
        console.print("[yellow]4/4 eval skipped:[/] no local eval data (set BITNET_EVAL_DATA or --data-dir)")
        return result
    console.rule(f"[bold]4/4 eval[/] {', '.join(eval_tasks)} (first {eval_limit} examples, data from {data})")
    results = evaluate(out / "model.bin", list(eval_tasks), limit=eval_limit, threads=threads, data_dir=data)
    result.eval = {f"{task}/{metric}": value for task, metric, value, _ in result_rows(results)}
    return result
