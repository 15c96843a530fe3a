"""lm-eval's own command line, with ``--model bitnet`` registered.

lm-eval 0.4.13 discovers no third-party models by itself (later releases read the
``lm_eval.models`` entry point that pyproject.toml declares), so this imports the adapter
and hands the arguments, untouched, to lm-eval:

    python -m bitnet_cli.eval --model bitnet --model_args pretrained=out.bin --tasks arc_easy

With ``BITNET_EVAL_DATA=DIR`` set, tasks read DIR's local files instead of the hub, as with
``bitnet eval --data-dir DIR``.
"""

import os
import sys
from pathlib import Path

import bitnet_cli.eval.adapter  # noqa: F401  (registers model type "bitnet")
from bitnet_cli.eval.runner import DATA_ENV


def _num_fewshot(argv: list[str]) -> int | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--num_fewshot="):
            return int(arg.split("=", 1)[1])
        if arg == "--num_fewshot" and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


def _use_local_data(data_dir: Path, num_fewshot: int | None) -> None:
    """Make every TaskManager lm-eval's CLI builds read tasks from ``data_dir``."""
    import lm_eval.tasks.manager as manager

    from bitnet_cli.eval.tasks import LocalDataFactory

    class Factory(LocalDataFactory):
        def __init__(self, meta=None):
            super().__init__(data_dir, num_fewshot, meta=meta)

    manager.TaskFactory = Factory


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    if os.environ.get(DATA_ENV):
        _use_local_data(Path(os.environ[DATA_ENV]), _num_fewshot(sys.argv[1:]))
    cli_evaluate()


if __name__ == "__main__":
    main()
