"""`python -m bitnet_cli ...`: the `bitnet` command, for environments without the console script on PATH."""

from bitnet_cli.cli import app

app(prog_name="bitnet")
