"""Hostile and pathological input (issue 13): every case ends in one clear `error:` line (exit 1)
or in correct behaviour, never a traceback, a hang or unbounded memory. docs/RELIABILITY.md lists
the failure modes these tests pin down."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from bitnet_cli.cli import app
from bitnet_cli.errors import BitnetError

REPO = Path(__file__).resolve().parents[1]

MICRO = {
    "name": "micro",
    "model": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=320),
    "train": dict(batch_size=4, seq_len=32, steps=4, device="cpu", threads=1),
}


def one_error(result, *needles: str) -> str:
    """Assert a CliRunner result is exit 1 with an `error:` line (no traceback); return the flat text."""
    out = result.output
    assert result.exit_code == 1, out
    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    assert "Traceback" not in out
    flat = " ".join(out.split())
    assert "error:" in flat, out
    for n in needles:
        assert n in flat, out
    return flat


def cli(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


# ------------------------------------------------------------------------ recipes: YAML bombs


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        refs = ",".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + f"\ntrain:\n  steps: *a{levels}\n"


@pytest.mark.parametrize("text, needle", [
    (billion_laughs(), "aliases (*a0) are not allowed"),
    ("name: &a [*a]\ntrain: {steps: 1}\n", "aliases (*a) are not allowed"),
    ("train:\n  steps: " + "[" * 1000 + "]" * 1000 + "\n", "nested more than 32 levels"),
    ("x: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n", "nested more than 32 levels"),
])
def test_yaml_bombs_are_refused_fast(tmp_path, text, needle):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    r = cli("train", path, "--dry-run")
    assert time.perf_counter() - t0 < 10
    one_error(r, "bomb.yaml", needle)


def test_recipe_too_large_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * 1_000_001 + "\n")
    one_error(cli("train", path, "--dry-run"), "more than 1,000,000 bytes")


@pytest.mark.parametrize("override, needle", [
    ("model.round_vocab_to=18446744073709551616", "model.round_vocab_to"),
    ("model.hidden_size=1000000000000", "model.hidden_size: Input should be less than or equal to 131072"),
    ("model.num_hidden_layers=1000000", "model.num_hidden_layers"),
    ("train.tokens=.inf", "train.tokens"),
    ("optim.lr=.nan", "optim.lr"),
    ("seed=-1", "seed"),
    ("model.vocab_size=16777216", None),  # in bounds: fine on its own...
])
def test_recipe_sizes_are_bounded(tmp_path, override, needle):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MICRO))
    r = cli("train", path, "--dry-run", "--json", "--set", override)
    if needle is None:
        assert r.exit_code == 0, r.output
        return
    one_error(r, needle)


def test_recipe_vocab_rounded_past_the_limit(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MICRO))
    r = cli("train", path, "--dry-run", "--set", "model.vocab_size=16777215", "--set", "model.round_vocab_to=1000")
    one_error(r, "16778000 (rounded up to a multiple of 1000)", "16777216")


def test_dry_run_of_the_largest_model_counts_without_building_it(tmp_path):
    """The bounds' corner (4096 layers of width 131072) is counted in a blink, with no model built."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MICRO))
    t0 = time.perf_counter()
    r = cli("train", path, "--dry-run", "--json", "--set", "model.num_hidden_layers=4096",
            "--set", "model.hidden_size=131072", "--set", "model.num_attention_heads=1024",
            "--set", "model.num_key_value_heads=1024")
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - t0 < 5
    assert json.loads(r.output)["parameters"] > 4096 * 4 * 131072**2


def test_parameter_count_matches_the_built_model():
    from bitnet_cli.model import BitNetConfig, BitNetForCausalLM, count_parameters

    for tie in (True, False):
        config = BitNetConfig(vocab_size=77, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                              num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tie)
        model = BitNetForCausalLM(config)
        assert count_parameters(config) == model.num_parameters()
        assert count_parameters(config, exclude_embeddings=True) == model.num_parameters(exclude_embeddings=True)


# ------------------------------------------------------------------------ temp files and fsync


def test_stale_temp_files_are_removed_on_the_next_write(tmp_path, capsys):
    from bitnet_cli.files import TempFile

    out = tmp_path / "m.bin"
    stale = tmp_path / ".m.bin.ab_cd123.tmp"
    stale.write_bytes(b"x" * 1000)
    live = TempFile(out)  # a writer still at work: locked, so kept
    other = [tmp_path / ".m.bin.abcd1234.tmp.keep", tmp_path / ".n.bin.abcd1234.tmp", tmp_path / "m.bin.abcd1234.tmp",
             tmp_path / ".m.bin.abc.tmp"]
    for p in other:
        p.write_bytes(b"not ours")
    link = tmp_path / ".m.bin.zzzzzzzz.tmp"
    link.symlink_to(tmp_path / "target")
    (tmp_path / "target").write_bytes(b"keep me")
    second = TempFile(out)
    assert not stale.exists()
    err = capsys.readouterr().err
    assert "removed .m.bin.ab_cd123.tmp" in err and "interrupted write of m.bin" in err
    assert live.path.exists() and all(p.exists() for p in other) and link.is_symlink()
    second.path.write_bytes(b"new")
    second.publish()
    live.discard()
    assert out.read_bytes() == b"new" and not live.path.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m.bin.")) == [
        ".m.bin.abc.tmp", ".m.bin.abcd1234.tmp.keep", ".m.bin.zzzzzzzz.tmp"]


def test_sigkilled_pack_leaves_a_temp_file_that_the_next_pack_removes(tmp_path, hf_tiny_checkpoint):
    """Kill a pack mid-write (SIGKILL: no cleanup runs); the next pack to the same file removes
    the leftover and says so."""
    out = tmp_path / "m.bin"
    code = ("import sys, os, signal\n"
            "from bitnet_cli.pack import format as F\n"
            "orig = F.PackedWriter.write\n"
            "def write(self, *a, **k):\n"
            "    orig(self, *a, **k)\n"
            "    if self._next == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
            "F.PackedWriter.write = write\n"
            "from bitnet_cli.pack import pack_checkpoint\n"
            f"pack_checkpoint({str(hf_tiny_checkpoint)!r}, {str(out)!r})\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    left = [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
    assert len(left) == 1 and not out.exists()
    r = cli("pack", hf_tiny_checkpoint, out)
    assert r.exit_code == 0, r.output
    assert f"removed {left[0].name}" in r.output
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.bin"]


def test_publish_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    import stat as stat_mod

    from bitnet_cli import files

    synced = []
    real = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append("dir" if stat_mod.S_ISDIR(st.st_mode) else "file")
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    t = files.TempFile(tmp_path / "r.json")
    t.path.write_text("{}")
    t.publish()
    assert synced == ["file", "dir"]
    assert (tmp_path / "r.json").read_text() == "{}"
