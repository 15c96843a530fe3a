"""Every command block of README.md, run as written in a scratch copy of the repository's root,
after a (shortened) `bitnet quickstart`: the README's examples stay true.

A line fails the test if it exits non-zero, unless the README says on that line that it fails
("# fails: ..."). Lines that cannot run here are listed in SKIP with the reason; `bitnet train`
lines train 8 steps instead of the recipe's hundreds (the same recipe, the same code path).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# substring of a command line -> why this test does not run it
SKIP = {
    "pip install": "installs packages (the test runs in the installed environment)",
    "bash .ci/run": "the CI entry point, which runs this very test",
    "torchrun": "needs several GPUs",
    "convert-small": "needs a trained float model (runs/small-float: a GPU-sized training run)",
    "bitnet-b1.58-2B-4T": "a 2B-parameter checkpoint from the hub, not in the repository",
    "HF1BitLLM/": "an 8B-parameter checkpoint from the hub",
    "ggml-model-i2_s.gguf": "bitnet.cpp's 2B4T GGUF, not in the repository (tests/test_gguf*.py import GGUFs)",
    "bitnet serve": "starts a server that runs until stopped (tests/test_serve*.py cover it)",
    "curl ": "talks to the server above",
    "--shape 2b4t": "writes a 1.2 GB synthetic model and takes minutes",
    "--shape llama3-8b": "writes a multi-GB synthetic model and takes minutes",
    "benchmarks/": "regenerates the published figures (long; llama.cpp binaries)",
}
SHORT_TRAINING = ["--set", "train.steps=8", "--set", "train.eval_every=4", "--set", "train.checkpoint_every=4",
                  "--set", "train.eval_batches=2"]


def readme_blocks() -> list[tuple[str, list[str]]]:
    """(language, lines) of every ```bash and ```python block, comments and blank lines dropped
    for bash (a trailing `# comment` stays: the line's expectation is read from it)."""
    blocks = []
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        if lang == "python":
            blocks.append((lang, [body]))
        else:
            blocks.append((lang, [l for l in body.splitlines() if l.strip() and not l.lstrip().startswith("#")]))
    return blocks


def skip_reason(line: str) -> str | None:
    command = line.split(" # ")[0]  # the command, not its comment
    return next((why for pattern, why in SKIP.items() if pattern in command), None)


def test_readme_blocks_are_found_and_every_skip_is_used():
    lines = [l for lang, ls in readme_blocks() if lang == "bash" for l in ls]
    assert any(l.startswith("bitnet run") for l in lines) and any(l.startswith("bitnet eval") for l in lines)
    unused = [p for p in SKIP if not any(p in l.split(" # ")[0] for l in lines)]
    assert unused == []  # a stale entry would hide nothing, or hide a new line that should run


def _shell(line: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    if line.startswith("bitnet train") and "--dry-run" not in line:
        code, comment = (line.split(" # ", 1) + [""])[:2]
        line = f"{code.rstrip()} {' '.join(SHORT_TRAINING)}"
    # `bitnet` and `python` are this checkout's package on this interpreter (the `bitnet` script on
    # PATH may belong to another installation)
    script = f'bitnet() {{ "{sys.executable}" -m bitnet_cli.cli "$@"; }}\npython() {{ "{sys.executable}" "$@"; }}\n{line}'
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=1200)


@pytest.mark.slow
def test_every_readme_command_works_on_the_quickstart_outputs(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (the README's ../shared/data examples need it)")
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("bitnet_cli", "recipes"):  # the repository's root, as the README's paths expect
        (root / name).symlink_to(REPO / name)
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)  # ../shared beside the clone
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    env.pop("BITNET_EVAL_DATA", None)

    quick = _shell("bitnet quickstart " + " ".join(SHORT_TRAINING) + " --limit 20", root, env)
    assert quick.returncode == 0, quick.stderr[-3000:]
    for name in ("train/final/config.json", "train/loss.png", "model.bin", "eval.json"):
        assert (root / "runs" / "quickstart" / name).is_file(), name
    # the "next" commands the quickstart prints work as printed, offline (its eval on its own data)
    suggested = dict(line.split(None, 1) for line in quick.stdout.splitlines()[-6:])
    assert "--data-dir" in suggested["evaluate"] and "--limit 20" in suggested["evaluate"]
    for what in ("evaluate", "inspect"):
        done = _shell(suggested[what], root, env)
        assert done.returncode == 0, f"{what}: {suggested[what]}\n{done.stderr[-2000:]}"

    failures, ran = [], 0
    for lang, lines in readme_blocks():
        for line in lines:
            if lang == "bash" and skip_reason(line):
                continue
            if lang == "python":
                done = subprocess.run([sys.executable, "-c", line], cwd=root, env=env, capture_output=True,
                                      text=True, timeout=600)
            else:
                done = _shell(line, root, env)
            ran += 1
            expected_failure = "# fails" in line
            if (done.returncode != 0) != expected_failure:
                failures.append(f"$ {line}\n  exit {done.returncode}: {(done.stderr or done.stdout)[-600:]}")
    assert ran >= 15
    assert not failures, "\n".join(failures)
