"""Bad input to train / pack / info / eval / quickstart: one clear message, a non-zero exit, no traceback.

Every case here fails before any long work (training, packing, evaluating) starts, so the whole
file runs in seconds. Each message must name the culprit (file, key or value).
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bitnet_cli.cli import app

MICRO = {
    "name": "micro",
    "model": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "data": {"tokenizer": {"vocab_size": 320, "train_chars": 200_000}},
    "train": dict(batch_size=4, seq_len=32, steps=4, device="cpu", threads=1),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, hf_tiny_checkpoint, shared_data):
    """A good checkpoint, packed file and recipe, and the broken things the cases point at."""
    from bitnet_cli.pack import pack_checkpoint

    root = tmp_path_factory.mktemp("bad_input")
    packed = root / "model.bin"
    pack_checkpoint(hf_tiny_checkpoint, packed)
    (root / "recipe.yaml").write_text(yaml.safe_dump(MICRO))
    (root / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (root / "a_file").write_text("not a directory\n")
    (root / "a_dir").mkdir()
    (root / "fake.gguf").write_bytes(b"\x00" * 64)  # named .gguf, without GGUF's magic
    (root / "broken.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0) + bytes(16))  # absurd count
    (root / "bad_tok").mkdir()
    for f in hf_tiny_checkpoint.iterdir():
        (root / "bad_tok" / f.name).write_bytes(f.read_bytes())
    (root / "bad_tok" / "tokenizer.json").write_text("{ this is not a tokenizer")
    for name in ("fifo.bin", "fifo.gguf"):  # reading one would wait for a writer forever
        os.mkfifo(root / name)
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    return {"tmp": root, "ckpt": hf_tiny_checkpoint, "packed": packed, "data": shared_data / "eval"}


def invoke(args: list[str], files: dict):
    """`env:NAME=VALUE` items set an environment variable instead of passing an argument."""
    args = [a.format(**files) for a in args]
    env = {"BITNET_CACHE": str(files["tmp"] / "cache"), "TQDM_DISABLE": "1", "BITNET_EVAL_DATA": None}
    env |= dict(a.removeprefix("env:").split("=", 1) for a in args if a.startswith("env:"))
    return CliRunner().invoke(app, [a for a in args if not a.startswith("env:")], env=env)


CASES = [
    # train
    (["train", "{tmp}/latin1.yaml"], "latin1.yaml: not a YAML text file"),
    (["train", "{tmp}/a_dir"], "a_dir: is a directory"),
    (["train", "{tmp}/recipe.yaml", "--set", "train.threads=0"], "train.threads"),
    (["train", "{tmp}/recipe.yaml", "--set", "optim.lr"], "--set 'optim.lr': expected KEY=VALUE"),
    (["train", "{tmp}/recipe.yaml", "--set", "optim.lr=x"], "--set optim.lr=x: optim.lr: Input should be"),
    # argv bytes that are not UTF-8 (Python's lone surrogates): named as given, not blamed on the recipe file
    (["train", "{tmp}/recipe.yaml", "--set", "\udcff=1"], "--set '\\xff=1': not valid UTF-8 text (byte 0xff"),
    (["train", "{tmp}/recipe.yaml", "--set", "train.steps=\udcff"], "--set 'train.steps=\\xff': not valid UTF-8"),
    (["train", "{tmp}/recipe.yaml", "--out", "{tmp}/a_file"],
     "a_file: is a file, not a run directory (choose another --out)"),
    (["train", "{tmp}/recipe.yaml", "--out", "{tmp}/a_file/run"], "a_file/run: cannot write the run directory"),
    (["train", "{tmp}/recipe.yaml", "--out", "{tmp}/run_c", "--set", "data.cache_dir={tmp}/a_file/cache"],
     "a_file/cache: cannot write"),
    # pack
    (["pack", "{tmp}/bad_tok", "{tmp}/out.bin"], "bad_tok/tokenizer.json: not a valid tokenizer.json"),
    (["pack", "{ckpt}", "{tmp}/a_file/out.bin"], "a_file: is a file, not a directory"),
    (["pack", "{ckpt}", "{tmp}/missing/out.bin"], "missing: output directory does not exist"),
    (["pack", "{ckpt}", "{tmp}/a_dir"], "a_dir: is a directory"),
    (["pack", "{ckpt}", ""], "give an output file name"),
    (["pack", "", "{tmp}/out.bin"], "give a source checkpoint (SRC is empty)"),  # was "./config.json: missing"
    (["pack", "{ckpt}", "{tmp}/o.gguf", "--to", "gguf", "--layout", "tq1"], "the ternary type --gguf-type names"),
    (["pack", "{ckpt}", "{packed}"], "model.bin: already exists (use --force to overwrite)"),
    (["pack", "{ckpt}", "{tmp}/o.gguf", "--to", "gguf", "--embeddings", "q4"], "unless --gguf-head f16|q6_k"),
    (["pack", "{ckpt}", "{tmp}/out.gguf", "--to", "gguf"], "config.json: self_attn.q_proj has 96 inputs"),
    (["pack", "{packed}", "{tmp}/out.bin"], "model.bin: expected a checkpoint directory"),
    (["pack", "{tmp}/fifo.gguf", "{tmp}/out.bin"], "fifo.gguf: is a named pipe (FIFO), not a checkpoint directory"),
    # --force replaces files, not pipes or devices (as root, a rename onto /dev/null replaced the device; the
    # suite never aims at /dev/null, which a regression would replace)
    (["pack", "{ckpt}", "{tmp}/fifo.bin", "--force"], "fifo.bin: is a named pipe (FIFO), not a regular file"),
    # info
    (["info", "{tmp}/a_dir"], "a_dir: is a directory, not a packed model file"),
    (["info", "{tmp}/recipe.yaml"], "recipe.yaml: not a safetensors file"),
    (["info", "{tmp}/fifo.bin"], "fifo.bin: is a named pipe (FIFO), not a packed model file"),  # hung
    (["info", "{tmp}/fifo.gguf"], "fifo.gguf: is a named pipe (FIFO), not a packed model file"),  # hung
    (["run", "{tmp}/fifo.bin", "-p", "x"], "fifo.bin: is a named pipe (FIFO), not a packed model file"),  # hung
    (["info", "/dev/zero"], "/dev/zero: is a character device, not a packed model file"),  # was "is a directory"
    (["info", "{tmp}/loop_a"], "loop_a: cannot read ("),  # a symlink loop (was "no such file")
    (["train", "{tmp}/fifo.bin"], "fifo.bin: is a named pipe (FIFO), not a recipe file"),  # was "not found"
    (["train", "{tmp}/recipe.yaml", "--out", "{tmp}/fifo.gguf"], "fifo.gguf: is a named pipe (FIFO), not a run"),
    (["run", "{packed}", "-p", "x", "env:BITNET_HUGEPAGES=maybe"], "$BITNET_HUGEPAGES must be 0 (off) or 1 (on)"),
    (["train", "{tmp}/loop_a"], "loop_a: cannot read ("),  # was "recipe file not found"
    (["bench", "--model", "{tmp}/fifo.bin", "--what", "e2e"], "fifo.bin: is a named pipe (FIFO)"),  # was "no such file"
    # the e2e worker's error lost its parameter: "threads 100000 is more ..." where run says "--threads 100000"
    (["bench", "--model", "{packed}", "--what", "e2e", "--threads", "100000"], "--threads 100000 is more than this"),
    (["bench", "--model", "{packed}", "--what", "e2e", "--threads", ""], "--threads: '' is not a whole number"),  # default
    # --force overwrote the model being measured with the PNG (eval and pack refuse their inputs, force or not)
    (["bench", "--model", "{packed}", "--what", "e2e", "--plot", "{packed}", "--force"],
     "--plot {packed}: is the model this benchmark reads"),
    (["info", "{ckpt}/model.safetensors"], "not a bitnet-cli packed model"),
    (["info", "{tmp}/fake.gguf"], "fake.gguf: not a GGUF file (it does not start with the GGUF magic)"),
    (["info", "{tmp}/a\udcffb.bin"], "a\\xffb.bin: no such file"),  # a non-UTF-8 byte as \xff, not as \udcff
    (["bench", "--shape", "x\udcff", "--what", "kernels"], "unknown shape 'x\\xff'"),  # quoted with repr() too
    # eval: all of these fail before lm-eval indexes its tasks or loads the model
    (["eval", "{tmp}/nope.bin", "--tasks", "arc_easy"], "nope.bin: no such file or directory"),
    (["eval", "{packed}", "--tasks", "arc_easy", "--output", "{tmp}/missing/r.json"],
     "missing: output directory does not exist"),
    (["eval", "{packed}", "--tasks", "arc_easy", "--output", "{tmp}/a_file/r.json"], "a_file: is a file"),
    (["eval", "{packed}", "--tasks", "arc_easy", "--output", "{tmp}/a_dir"], "a_dir: is a directory"),
    (["eval", "{packed}", "--tasks", "arc_easy", "--output", "{tmp}/fifo.bin", "--force"],
     "fifo.bin: is a named pipe (FIFO), not a regular file"),
    (["eval", "{tmp}/fifo.bin", "--tasks", "tinyshakespeare_heldout"], "fifo.bin: is a named pipe (FIFO)"),
    (["eval", "{packed}", "--tasks", "arc_easy", "--limit", "0"], "--limit 0: must be positive"),
    (["eval", "{packed}", "--tasks", "arc_easy", "--limit", "nan"], "--limit nan: must be positive and finite"),  # traceback
    (["eval", "{packed}", "--tasks", "arc_easy", "--limit", "inf"], "--limit inf: must be positive and finite"),  # traceback
    (["eval", "{packed}", "--tasks", "arc_easy", "--data-dir", "{data}", "--threads", "-1"],
     "--threads must be a positive integer, got -1"),  # was "--threads -1: not a whole number"
    (["eval", "{packed}", "--tasks", " , "], "no --tasks given"),
    (["eval", "{packed}", "--tasks", "arc_easy", "--data-dir", "{data}", "--threads", "0"],
     "--threads must be a positive integer, got 0"),  # as run, serve and bench say it (was "threads=0: ...")
    (["eval", "{packed}", "--tasks", "arc_easy", "--data-dir", "{tmp}/nowhere"], "nowhere: no such directory"),
    # the variable's value was blamed on --data-dir, which the user never gave
    (["eval", "{packed}", "--tasks", "arc_easy", "env:BITNET_EVAL_DATA={tmp}/nowhere"],
     "$BITNET_EVAL_DATA {tmp}/nowhere: no such directory"),
    (["quickstart", "--out", "{tmp}/qs", "env:BITNET_EVAL_DATA={tmp}/nowhere"],
     "$BITNET_EVAL_DATA {tmp}/nowhere: no such directory"),
    # quickstart: bad eval settings fail before the training stage
    (["quickstart", "--out", "{tmp}/a_file"], "a_file: is a file, not a directory (choose another --out)"),
    (["quickstart", "--out", "{tmp}/qs", "--tasks", "", "--data-dir", "{data}"], "no --tasks given (e.g. arc_easy)"),
    (["quickstart", "--out", "{tmp}/qs", "--data-dir", "{tmp}/nowhere"], "nowhere: no such directory"),
    (["quickstart", "--out", "{tmp}/qs", "--set", "train.steps=abc"], "train.steps"),
    (["quickstart", "--out", "{tmp}/qs", "--threads", "0"], "--threads must be a positive integer, got 0"),  # trained first
]


@pytest.mark.parametrize("args, message", CASES, ids=[f"{a[0]}: {m[:40]}" for a, m in CASES])
def test_bad_input_one_clear_message(files, args, message):
    r = invoke(args, files)
    flat = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 1, r.output
    assert not (r.exception and not isinstance(r.exception, SystemExit)), repr(r.exception)
    assert "Traceback" not in r.output
    assert message.format(**files) in flat, r.output


def test_a_broken_gguf_is_one_line_not_announced_as_an_import(files):
    """A GGUF whose header is corrupt fails with its one error line before the "importing ... into the cache" note."""
    r = invoke(["info", "{tmp}/broken.gguf"], files)
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [r.output.strip()] and r.output.startswith("error:"), r.output
    assert "more than the file can hold" in " ".join(r.output.split())


def test_nothing_is_started_or_clobbered(files):
    """The failures above leave no output file behind and do not touch an existing one."""
    tmp = files["tmp"]
    before = files["packed"].read_bytes()
    invoke(["pack", "{ckpt}", "{packed}"], files)
    assert files["packed"].read_bytes() == before
    assert not (tmp / "out.bin").exists() and not (tmp / "out.gguf").exists()
    assert not (tmp / "qs").exists()  # quickstart failed before creating its run directory
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # no temporary files


def test_pack_force_leaves_a_pipe_a_pipe(files):
    """--force replaces a file; a rename onto a pipe or device would replace it with the packed file."""
    import stat

    r = invoke(["pack", "{ckpt}", "{tmp}/fifo.bin", "--force"], files)
    assert r.exit_code == 1 and "not a regular file" in " ".join(r.output.split())
    assert stat.S_ISFIFO(os.stat(files["tmp"] / "fifo.bin").st_mode)


def test_a_directory_that_takes_no_new_file_is_one_error(tmp_path, monkeypatch):
    """/proc passes os.access(W_OK) for root, then refuses the temporary file: an error line, not a traceback."""
    import tempfile

    from bitnet_cli.errors import BitnetError
    from bitnet_cli.files import TempFile

    def refuse(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(BitnetError, match=f"{tmp_path}: cannot create a file there"):
        TempFile(tmp_path / "out.bin")


def test_info_verify_names_the_flipped_tensor(files, tmp_path):
    from bitnet_cli.pack import PackedModel

    bad = tmp_path / "flipped.bin"
    raw = bytearray(files["packed"].read_bytes())
    with PackedModel.open(files["packed"]) as pm:
        entry = pm.entries["model.layers.1.mlp.up_proj.weight"]
    raw[entry.begin + 5] ^= 0xFF
    bad.write_bytes(bytes(raw))
    r = CliRunner().invoke(app, ["info", str(bad), "--verify"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "model.layers.1.mlp.up_proj.weight" in " ".join(r.output.split())


def test_train_ctrl_c_says_how_to_resume(files, monkeypatch):
    from bitnet_cli.train import loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_train", interrupted)
    r = invoke(["train", "{tmp}/recipe.yaml", "--out", "{tmp}/run_int"], files)
    assert r.exit_code == 130 and "Traceback" not in r.output
    assert "run it again with --resume to continue" in " ".join(r.output.split())


def test_quickstart_ctrl_c_and_rerun_continue_the_run(files, monkeypatch):
    """A second quickstart with the same --out resumes its training run instead of refusing it."""
    import bitnet_cli.train as train_pkg
    from bitnet_cli import quickstart as qs
    from bitnet_cli.train.loop import TrainInterrupted

    run = files["tmp"] / "qs_again" / "train"
    step = run / "checkpoints" / "step_0000007"
    step.mkdir(parents=True)
    (step / "trainer_state.pt").write_bytes(b"")
    (step / "model.safetensors").write_bytes(b"")
    calls = []

    def fake_train(recipe, out_dir, resume=False, **kwargs):
        calls.append(resume)
        raise TrainInterrupted(Path(out_dir), 7)

    monkeypatch.setattr(train_pkg, "train", fake_train)
    monkeypatch.setattr(qs, "default_eval_data", lambda: None)  # no eval stage: no lm-eval task index
    r = invoke(["quickstart", "--out", "{tmp}/qs_again"], files)
    assert calls == [True]
    assert r.exit_code == 130 and "Traceback" not in r.output
    assert "same `bitnet quickstart` command continues" in " ".join(r.output.split())


def test_task_yaml_that_is_not_a_task(files):
    from bitnet_cli.errors import BitnetError
    from bitnet_cli.eval.tasks import check_task_file

    with pytest.raises(BitnetError, match="recipe.yaml: not an lm-eval task YAML"):
        check_task_file(files["tmp"] / "recipe.yaml")


def test_eval_outside_git_prints_no_git_error(tmp_path, monkeypatch, capfd):
    """lm-eval runs `git describe` to record a commit; outside a checkout git's 'fatal:' must not leak."""
    pytest.importorskip("lm_eval")
    from lm_eval import evaluator

    from bitnet_cli.eval.runner import _quiet_git_describe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    original = evaluator.get_git_commit_hash
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    original()  # lm-eval's own lookup, to show the test can fail
    assert "fatal" in capfd.readouterr().err
    with _quiet_git_describe():
        assert evaluator.get_git_commit_hash() is None
    assert "fatal" not in capfd.readouterr().err
    assert evaluator.get_git_commit_hash is original
    assert os.getcwd() == str(tmp_path)


@pytest.mark.parametrize("error,said", [
    (MemoryError(), "error: out of memory: this needs more memory than the machine has"),
    (None, "error: the GPU ran out of memory: CUDA out of memory. Tried to allocate 44.00 MiB."),
])
def test_running_out_of_memory_is_one_error_line(files, monkeypatch, error, said):
    import torch

    from bitnet_cli.pack import PackedModel

    def open_(*args, **kwargs):
        raise error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 44.00 MiB.\nmore details")

    monkeypatch.setattr(PackedModel, "open", open_)
    r = CliRunner().invoke(app, ["info", str(files["packed"])])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert " ".join(r.output.split()).startswith(said)
