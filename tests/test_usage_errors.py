"""Usage errors are one `error:` line (and a `try: ... --help` hint) with exit 2, like every other error."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bitnet_cli.cli import app

runner = CliRunner()


@pytest.mark.parametrize("argv, message, hint", [
    (["run", "--bogus"], "error: No such option: --bogus", "try: bitnet run --help"),
    (["run"], "error: Missing argument 'model'.", "try: bitnet run --help"),
    (["nosuch"], "error: No such command 'nosuch'.", "try: bitnet --help"),
    (["eval", "m", "--limit", "x"], "error: Invalid value for '--limit'", "try: bitnet eval --help"),
    (["pack", "a", "b", "--embeddings", "f8"], "error: Invalid value for '--embeddings'", "try: bitnet pack --help"),
    (["--bogus"], "error: No such option: --bogus", "try: bitnet --help"),
])
def test_usage_error_is_one_line_and_exit_2(argv, message, hint):
    result = runner.invoke(app, argv, prog_name="bitnet")
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) <= 2 and lines[0].startswith(message), result.output
    assert hint in result.output
    assert "╭" not in result.output and "Usage:" not in result.output


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "bitnet_cli", "run", "--bogus"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: No such option: --bogus", "try: bitnet run --help"]
    done = subprocess.run([sys.executable, "-m", "bitnet_cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("bitnet-cli ")
