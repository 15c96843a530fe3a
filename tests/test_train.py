"""`bitnet train`: recipes, schedules, data, the loop, checkpoints, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, load_hf_reference
from safetensors.torch import load_file
from typer.testing import CliRunner

from bitnet_cli.cli import app
from bitnet_cli.errors import BitnetError
from bitnet_cli.train import describe, load_recipe, train
from bitnet_cli.train.data import TokenData, prepare_tokenizer, resolve_files, tokenize_to_memmap
from bitnet_cli.train.recipe import OptimSpec
from bitnet_cli.train.schedule import lr_at, weight_decay_at


@pytest.fixture(scope="module", autouse=True)
def token_cache(tmp_path_factory):
    """One tokenizer/memmap cache for the module, never the user's ~/.cache."""
    old = os.environ.get("BITNET_CACHE")
    os.environ["BITNET_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["BITNET_CACHE"])
    if old is None:
        os.environ.pop("BITNET_CACHE")
    else:
        os.environ["BITNET_CACHE"] = old


def micro_recipe(**train_overrides) -> dict:
    """A model small enough that a CPU step takes milliseconds."""
    train = dict(batch_size=4, seq_len=32, steps=12, device="cpu", threads=1, eval_every=6, eval_batches=2,
                 log_every=2, checkpoint_every=4, keep_last=2)
    train.update(train_overrides)
    return {
        "name": "micro",
        "seed": 7,
        "model": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2),
        "data": {"tokenizer": {"vocab_size": 320, "train_chars": 200_000}},
        "optim": dict(lr=3e-3, warmup_steps=2),
        "train": train,
    }


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- recipes


def test_recipe_errors_name_key_and_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel:\n  hidden_size: wide\n  colour: red\ntrain:\n  steps: 5\n")
    with pytest.raises(BitnetError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"{p}:3: model.hidden_size" in msg and "integer" in msg
    assert f"{p}:4: model.colour: unknown key" in msg
    with pytest.raises(BitnetError, match=r"overrides optim\.nope=1: optim\.nope: unknown key"):
        load_recipe(write_recipe(tmp_path / "ok.yaml", micro_recipe()), ["optim.nope=1"])
    with pytest.raises(BitnetError, match="exactly one of train.steps and train.tokens"):
        load_recipe(None, data={"train": {"steps": 3, "tokens": 1000}})
    with pytest.raises(BitnetError, match="expected KEY=VALUE"):
        load_recipe(None, ["optim.lr"], data=micro_recipe())
    r = load_recipe(None, ["optim.lr=1e-3", "model.quant=none"], data=micro_recipe())
    assert r.optim.lr == 1e-3 and r.model.quant == "none"


def test_cli_reports_bad_recipe_without_traceback(tmp_path):
    p = write_recipe(tmp_path / "r.yaml", {**micro_recipe(), "optimiser": {}})
    res = CliRunner().invoke(app, ["train", str(p)])
    assert res.exit_code == 1
    assert "optimiser: unknown key" in res.output and "Traceback" not in res.output


def test_a_run_refused_before_it_writes_leaves_no_empty_run_directory(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not UTF-8")
    recipe = {**micro_recipe(), "data": {**micro_recipe()["data"], "files": [str(bad)]}}
    p = write_recipe(tmp_path / "r.yaml", recipe)
    out = tmp_path / "new" / "run"
    res = CliRunner().invoke(app, ["train", str(p), "-o", str(out)])
    assert res.exit_code == 1 and "not UTF-8" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "new").exists()  # was left behind, empty
    kept = tmp_path / "kept"
    kept.mkdir()
    res = CliRunner().invoke(app, ["train", str(p), "-o", str(kept)])
    assert res.exit_code == 1 and kept.is_dir()  # a directory the user made stays


@pytest.mark.parametrize("name,low,high", [
    ("tiny", 0.5e6, 2e6), ("small", 80e6, 130e6), ("bitnet-b1.58-700m", 0.6e9, 0.85e9),
    ("bitnet-b1.58-1.3b", 1.1e9, 1.5e9), ("bitnet-b1.58-3b", 2.8e9, 3.6e9), ("bitnet-b1.58-2b4t", 2.2e9, 2.6e9),
])
def test_every_recipe_passes_dry_run(name, low, high):
    path = REPO / "recipes" / f"{name}.yaml"
    res = CliRunner().invoke(app, ["train", str(path), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert low <= d["parameters"] <= high
    assert d["flops_per_token"] > 6 * d["parameters_non_embedding"]
    assert d["recipe"]["model"]["quant"] == "bitnet"


def test_every_recipe_file_is_tested():
    tested = {"tiny", "small", "bitnet-b1.58-700m", "bitnet-b1.58-1.3b", "bitnet-b1.58-3b", "bitnet-b1.58-2b4t",
              "convert-small", "convert-qwen2.5-0.5b"}  # the convert-* dry-runs are in test_convert.py
    assert {p.stem for p in (REPO / "recipes").glob("*.yaml")} == tested


# ----------------------------------------------------------------------------- schedules


def test_two_stage_schedule_drops_lr_and_weight_decay_at_the_midpoint():
    o = OptimSpec(lr=1.5e-3, lr_stage2=1e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1)
    total = 100
    lrs = [lr_at(o, s, total) for s in range(total)]
    assert lrs[0] == pytest.approx(1.5e-4) and lrs[9] == pytest.approx(1.5e-3)
    assert all(a >= b for a, b in zip(lrs[9:49], lrs[10:50]))  # decays through stage one
    assert lrs[50] < lrs[49] * 0.7  # the drop
    assert lrs[-1] == pytest.approx(1e-3 * (1 - 0.9 * 89 / 90))
    assert weight_decay_at(o, 49, total) == 0.1 and weight_decay_at(o, 50, total) == 0.0
    c = OptimSpec(lr=1e-3, schedule="cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert lr_at(c, 0, 100) == pytest.approx(1e-3) and lr_at(c, 100, 100) == pytest.approx(1e-4)
    assert weight_decay_at(c, 90, 100) == c.weight_decay


# ----------------------------------------------------------------------------- data


def test_memmap_is_cached_and_batches_are_deterministic(tmp_path, token_cache):
    r = load_recipe(None, data=micro_recipe())
    files = resolve_files(r.data, r.base_dir)
    assert files[0].name == "tinyshakespeare.txt"
    tok, _ = prepare_tokenizer(r.data, files, r.base_dir, "digest-a")
    assert tok.get_vocab_size() == 320
    path = tokenize_to_memmap(files, tok, token_cache, "digest-a")
    assert tokenize_to_memmap(files, tok, token_cache, "digest-a") == path  # cache hit
    data = TokenData.open(path, 0.05, 32, seed=7)
    assert data.tokens.dtype == np.uint16 and data.n_val > 0
    text = files[0].read_text()[:2000]
    assert tok.decode(list(map(int, data.tokens[:600])))[:200] == text[:200]
    x1, y1 = data.train_batch(5, 0, 0, 1, 4, 1)
    x2, _ = data.train_batch(5, 0, 0, 1, 4, 1)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(x1, data.train_batch(6, 0, 0, 1, 4, 1)[0])
    # Two ranks with half the batch see exactly the one-process batch between them.
    full, _ = data.train_batch(3, 0, 0, 1, 8, 1)
    halves = [data.train_batch(3, 0, rank, 2, 4, 1)[0] for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), full)
    assert 4.0 < data.unigram_entropy() < np.log(320)


# ----------------------------------------------------------------------------- the loop


def test_train_end_to_end_checkpoint_loads_in_transformers(tmp_path):
    r = load_recipe(None, ["train.steps=16", "train.eval_every=8"], data=micro_recipe())
    res = train(r, out_dir=tmp_path / "run", progress=False)
    assert res.checkpoint == tmp_path / "run" / "final"
    names = {p.name for p in res.checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "trainer_state.pt"} <= names
    assert json.loads((res.checkpoint / "config.json").read_text())["quantization_config"]["quant_method"] == "bitnet"
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in rows if "loss" in m]
    assert [m["step"] for m in rows if "val_loss" in m] == [8, 16]
    assert losses[-1] < losses[0] and np.isfinite(res.val_loss)
    # keep_last: only the newest two step checkpoints survive (steps 8 and 12; 16 is final)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000008", "step_0000012"]

    from bitnet_cli.model import BitNetForCausalLM

    ours = BitNetForCausalLM.from_pretrained(res.checkpoint)
    ref = load_hf_reference(res.checkpoint)
    ids = torch.randint(0, 320, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(res.checkpoint)
    assert hf_tok.eos_token == "<|end_of_text|>"
    # A second run into the same directory is refused without --resume.
    with pytest.raises(BitnetError, match="pass resume to continue it, or choose another out_dir"):
        train(r, out_dir=tmp_path / "run", progress=False)


def test_quant_none_trains_the_float_baseline(tmp_path):
    r = load_recipe(None, ["model.quant=none", "train.steps=4"], data=micro_recipe())
    res = train(r, out_dir=tmp_path / "fp", progress=False)
    assert "quantization_config" not in json.loads((res.checkpoint / "config.json").read_text())


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "bitnet_cli.cli", "train", *args, "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def run_killed_and_resumed(recipe: Path, tmp_path: Path, kill_at_step: int) -> str:
    """Train `recipe` into tmp_path/ref uninterrupted, and into tmp_path/cut with a SIGKILL once the
    checkpoint of `kill_at_step` exists, then --resume; the resumed run's output."""
    ref = _cli([str(recipe), "--out", str(tmp_path / "ref")])
    assert ref.wait(timeout=600) == 0, ref.stdout.read().decode()
    victim = _cli([str(recipe), "--out", str(tmp_path / "cut")])
    target = tmp_path / "cut" / "checkpoints" / f"step_{kill_at_step:07d}" / "trainer_state.pt"
    deadline = time.time() + 600
    while not target.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "cut" / "final").exists()
    resumed = _cli([str(recipe), "--out", str(tmp_path / "cut"), "--resume"])
    out = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, out
    return out


def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", micro_recipe(steps=30, checkpoint_every=5, eval_every=10))
    assert "resuming" in run_killed_and_resumed(recipe, tmp_path, 15)
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # no step logged twice after the resume


def test_jsonl_globs_and_bad_data_files(tmp_path, token_cache):
    import gzip

    docs = [{"text": f"Document number {i}. " * 20} for i in range(50)]
    (tmp_path / "data").mkdir()
    with gzip.open(tmp_path / "data" / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs[:25])
    (tmp_path / "data" / "b.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[25:]))
    r = load_recipe(write_recipe(tmp_path / "r.yaml", {**micro_recipe(), "data": {
        "files": ["data/*.jsonl*"], "tokenizer": {"vocab_size": 300}}}))
    files = resolve_files(r.data, r.base_dir)
    assert [f.name for f in files] == ["a.jsonl.gz", "b.jsonl"]
    tok, _ = prepare_tokenizer(r.data, files, r.base_dir, "digest-jsonl")
    data = TokenData.open(tokenize_to_memmap(files, tok, token_cache, "digest-jsonl"), 0.1, 16, seed=0)
    eos = tok.token_to_id("<|end_of_text|>")
    assert int((data.tokens == eos).sum()) == 50  # one separator per document
    r.data.files = ["data/*.txt"]
    with pytest.raises(BitnetError, match=r"no file matches 'data/\*\.txt'"):
        resolve_files(r.data, r.base_dir)
    os.mkfifo(tmp_path / "pipe.txt")  # named, not found: was "not found" (reading it would wait for a writer)
    for name, says in (("data", r"data is a directory \(name its files"), ("pipe.txt", r"pipe.txt is a named pipe"),
                       ("nowhere.txt", r"nowhere.txt not found")):
        r.data.files = [name]
        with pytest.raises(BitnetError, match=says):
            resolve_files(r.data, r.base_dir)
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    with pytest.raises(BitnetError, match=r"bad.jsonl:1: expected a JSON object with a 'text' field"):
        tokenize_to_memmap([tmp_path / "bad.jsonl"], tok, token_cache, "digest-bad")


def test_a_kill_between_the_two_renames_keeps_the_old_checkpoint(tmp_path):
    from bitnet_cli.train import checkpoint as ckpt_io

    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    os.rename(final, tmp_path / ".old-final-4242")  # the state a SIGKILL inside save_checkpoint leaves
    (tmp_path / ".tmp-final-4242").mkdir()
    ckpt_io.remove_stale_temporaries(tmp_path)
    assert (final / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_checkpoint_s_weights_are_as_readable_as_its_other_files(tmp_path):
    """safetensors' save_file creates model.safetensors 0600; config.json and the rest beside it are 0644."""
    import stat

    from bitnet_cli.files import ordinary_mode
    from bitnet_cli.model import BitNetConfig
    from bitnet_cli.train import checkpoint as ckpt_io

    class Tokenizer:
        def save(self, path):
            Path(path).write_text("{}")

    config = BitNetConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                          num_key_value_heads=1)
    out = ckpt_io.save_checkpoint(tmp_path / "final", {"model.norm.weight": torch.ones(8)}, config, Tokenizer(), {},
                                  None, "name: x\n")
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == ordinary_mode(), modes


def test_an_unknown_compile_mode_is_one_clear_error(monkeypatch):
    from bitnet_cli.train.loop import _compile_mode

    monkeypatch.setenv("BITNET_COMPILE_MODE", "fastest")
    with pytest.raises(BitnetError, match="BITNET_COMPILE_MODE='fastest': expected one of default, reduce-overhead"):
        _compile_mode()
    monkeypatch.setenv("BITNET_COMPILE_MODE", "reduce-overhead")
    assert _compile_mode() == "reduce-overhead"
    assert _compile_mode("on", "cuda", True, False) == "reduce-overhead"  # the variable wins over the recipe
    monkeypatch.setenv("BITNET_COMPILE_MODE", "default")
    assert _compile_mode("auto", "cuda", True, False) == "default"
    monkeypatch.delenv("BITNET_COMPILE_MODE")
    assert _compile_mode() is None


@pytest.mark.parametrize("setting, device, int8, distributed, expected", [
    ("auto", "cuda", True, False, "reduce-overhead"),  # the int8 step on one GPU: host-bound without graphs
    ("auto", "cuda", False, False, None),  # the bf16 step: graphs made it slower
    ("auto", "cuda", True, True, None),  # under torchrun
    ("auto", "cpu", True, False, None),
    ("on", "cuda", False, False, "reduce-overhead"),
    ("off", "cuda", True, False, None),
    ("on", "cpu", False, False, "error"),
    ("on", "cuda", True, True, "error"),
])
def test_cuda_graphs_follow_the_recipe(monkeypatch, setting, device, int8, distributed, expected):
    """train.cuda_graphs: auto puts the compiled step under CUDA graphs where the int8 matmuls run on one GPU; on
    wherever one GPU runs it, and elsewhere one clear error; off never."""
    from bitnet_cli.train.loop import _compile_mode

    monkeypatch.delenv("BITNET_COMPILE_MODE", raising=False)
    if expected == "error":
        with pytest.raises(BitnetError, match="train.cuda_graphs is on, but CUDA graphs need one CUDA GPU"):
            _compile_mode(setting, device, int8, distributed)
    else:
        assert _compile_mode(setting, device, int8, distributed) == expected
    assert load_recipe(None, [f"train.cuda_graphs={setting}"], data={"train": {"steps": 1}}).train.cuda_graphs == \
        setting


@pytest.mark.parametrize("value", ["abc", "0", "-5e12", "nan", "inf"])
def test_a_bad_peak_flops_is_one_clear_error(monkeypatch, value):
    from bitnet_cli.train.loop import peak_flops

    monkeypatch.setenv("BITNET_PEAK_FLOPS", value)
    with pytest.raises(BitnetError, match=f"BITNET_PEAK_FLOPS='{value}': expected a positive number of FLOP/s"):
        peak_flops(torch.device("cpu"))
    monkeypatch.setenv("BITNET_PEAK_FLOPS", "989e12")
    assert peak_flops(torch.device("cpu")) == 989e12


def test_the_compiled_token_loss_is_the_eager_one():
    """train.compile compiles the loss with the model (loop.token_loss): the same loss and logit gradient as eager
    torch's, for training (mean) and evaluation (sum), from bf16 logits as autocast gives them."""
    import torch

    from bitnet_cli.train.loop import token_loss

    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 16, 257)).to(torch.bfloat16)
    targets = torch.randint(0, 257, (2, 16))
    compiled = torch.compile(token_loss)
    for reduction in ("mean", "sum"):
        grads = []
        for fn in (token_loss, compiled):
            x = logits.clone().requires_grad_()
            loss = fn(x, targets, reduction=reduction)
            loss.backward()
            grads.append((loss.detach(), x.grad))
        (loss_e, grad_e), (loss_c, grad_c) = grads
        assert loss_c.dtype == torch.float32 and grad_c.dtype == torch.bfloat16
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad_c.float(), grad_e.float(), rtol=0.01, atol=1e-6)


def test_cuda_graph_training_keeps_gradients_allocated_and_marks_each_micro_batch(tmp_path, monkeypatch):
    """$BITNET_COMPILE_MODE=reduce-overhead (CUDA graphs): each micro-batch's forward starts a new replay
    (cudagraph_mark_step_begin) and .grad stays allocated, so that a replay's output is added into it rather than kept
    as it (the next replay would overwrite it); the same losses as the default mode. The graphs take the model and
    its loss as one module (loop._ModelLoss): a logits' gradient made outside them would be copied into their input at
    every replay. torch.compile is stubbed out: the bookkeeping is the loop's, and a CPU has no CUDA graphs."""
    marks, cleared, compiled = [], [], []
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kw: (compiled.append((type(fn).__name__, kw.get("mode"))), fn)[1])
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    zero_grad = torch.optim.Optimizer.zero_grad
    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad",
                        lambda self, set_to_none=True: (cleared.append(set_to_none), zero_grad(self, set_to_none)))
    r = lambda name: load_recipe(write_recipe(tmp_path / f"{name}.yaml", micro_recipe(  # noqa: E731
        steps=3, grad_accum=2, compile=True, eval_every=100, checkpoint_every=100, log_every=1)))
    default = train(r("default"), out_dir=tmp_path / "default", progress=False)
    assert marks == [] and cleared == [True] * 3
    monkeypatch.setenv("BITNET_COMPILE_MODE", "reduce-overhead")
    graphs = train(r("graphs"), out_dir=tmp_path / "graphs", progress=False)
    assert len(marks) == 3 * 2 and cleared == [True] * 3 + [False] * 3
    assert graphs.train_loss == default.train_loss
    assert ("_ModelLoss", "reduce-overhead") in compiled


def test_the_compiled_training_loss_is_the_eager_one_with_and_without_a_teacher():
    """train.compile compiles the model, its loss and the distillation teacher as one module (loop._ModelLoss, one
    graph, so that CUDA graphs copy nothing into the backward): compiled by inductor (on the CPU here), the same loss,
    parts and gradients as eager torch, with a teacher and without one."""
    from bitnet_cli.model import BitNetConfig, BitNetForCausalLM
    from bitnet_cli.train.loop import _ModelLoss

    def config(quant):
        return BitNetConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, quant=quant)

    torch.manual_seed(0)
    student, teacher = BitNetForCausalLM(config("bitnet")), BitNetForCausalLM(config("none")).requires_grad_(False)
    x, y = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    for with_teacher in (False, True):
        results = []
        for compiled in (False, True):
            module = _ModelLoss(student, teacher if with_teacher else None, alpha=0.3, temperature=2.0)
            student.zero_grad(set_to_none=True)
            loss, parts = (torch.compile(module) if compiled else module)(x, y)
            loss.backward()
            results.append((loss.detach(), parts, [p.grad.clone() for p in student.parameters()]))
        (loss_e, parts_e, grads_e), (loss_c, parts_c, grads_c) = results
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        assert (parts_e is None) == (parts_c is None) == (not with_teacher)
        if with_teacher:
            torch.testing.assert_close(parts_c, parts_e, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(loss_e, 0.7 * parts_e[0] + 0.3 * parts_e[1], rtol=1e-6, atol=0)
        for g_c, g_e in zip(grads_c, grads_e):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)


def test_running_out_of_gpu_memory_is_one_error_line_that_says_what_to_lower(tmp_path, monkeypatch):
    from bitnet_cli.train import loop

    def step(self, step, steps):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 44.00 MiB. GPU 0 has a total capacity of "
                                     "79.18 GiB of which 10.19 MiB is free.")

    monkeypatch.setattr(loop._Run, "train_step", step)
    p = write_recipe(tmp_path / "r.yaml", micro_recipe())
    res = CliRunner().invoke(app, ["train", str(p), "-o", str(tmp_path / "run")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    said = " ".join(res.output.split())
    assert ("error: the cpu device ran out of memory: lower train.batch_size (4) and raise train.grad_accum (1) by "
            "the same factor (the same tokens per step)") in said, said


@pytest.mark.parametrize("cuda_graphs,int8,hint", [("auto", True, True), ("on", False, True), ("off", True, False),
                                                    ("auto", False, False)])
def test_out_of_gpu_memory_names_the_cuda_graphs_where_the_step_ran_under_them(monkeypatch, cuda_graphs, int8, hint):
    from types import SimpleNamespace

    from bitnet_cli.train import int8_linear, loop

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 << 30))
    monkeypatch.setattr(int8_linear, "resolve", lambda *a, **kw: int8)
    monkeypatch.delenv("BITNET_COMPILE_MODE", raising=False)
    recipe = load_recipe(REPO / "recipes" / "bitnet-b1.58-1.3b.yaml", [f"train.cuda_graphs={cuda_graphs}",
                                                                       "train.batch_size=16", "train.compile=true"])
    said = loop.out_of_memory(recipe, torch.device("cuda"), SimpleNamespace(enabled=False))
    assert said.startswith("the GPU ran out of memory (NVIDIA H100 80GB HBM3, 80 GiB): lower train.batch_size (16)")
    assert ("train.cuda_graphs to off" in said) == hint


def test_a_logged_loss_is_read_after_the_next_step_is_queued(tmp_path, monkeypatch):
    """Reading a loss waits for the GPU; read as the step is logged, the GPU would idle while the host logs and
    prepares the next step. So a row is written once the next step is queued, except where the run evaluates or
    saves at that step (and at the end), which read it at once: the rows are those of an immediate read."""
    from bitnet_cli.train import loop

    events = []
    train_step, append = loop._Run.train_step, loop._append_metrics

    def step(self, i, steps):
        out = train_step(self, i, steps)
        events.append(("queued", i + 1))
        return out

    monkeypatch.setattr(loop._Run, "train_step", step)
    monkeypatch.setattr(loop, "_append_metrics", lambda path, row, info: (
        events.append(("loss" if "loss" in row else "val", row["step"])), append(path, row, info)))
    recipe = load_recipe(None, [], data=micro_recipe(steps=12, log_every=2, eval_every=6, checkpoint_every=4))
    train(recipe, out_dir=tmp_path / "run", progress=False)
    q, loss, val = "queued", "loss", "val"
    assert events == [(q, 1), (q, 2), (q, 3), (loss, 2), (q, 4), (loss, 4), (q, 5), (q, 6), (loss, 6), (val, 6),
                      (q, 7), (q, 8), (loss, 8), (q, 9), (q, 10), (q, 11), (loss, 10), (q, 12), (loss, 12), (val, 12)]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8, 10, 12]
    assert all(r["tokens_per_s"] > 0 and np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_a_loss_that_is_not_finite_stops_the_run_before_the_next_checkpoint(tmp_path, monkeypatch):
    from bitnet_cli.train import checkpoint, loop

    train_step = loop._Run.train_step

    def step(self, i, steps):
        out = train_step(self, i, steps)
        if i + 1 == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(loop._Run, "train_step", step)
    recipe = load_recipe(None, [], data=micro_recipe(steps=12, log_every=1, eval_every=12, checkpoint_every=4))
    with pytest.raises(BitnetError, match=r"^the loss became nan at step 3: lower optim.lr"):
        train(recipe, out_dir=tmp_path / "run", progress=False)
    assert checkpoint.step_checkpoints(tmp_path / "run") == []  # step 4's was not written


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU says")
def test_dry_run_says_how_this_machine_would_run_the_recipe():
    res = CliRunner().invoke(app, ["train", "tiny", "--dry-run"])
    assert res.exit_code == 0
    assert "here cpu: fake-quantised products (the int8 kernels need a CUDA GPU)" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["train", "tiny", "--set", "model.quant=none", "--dry-run", "--json"])
    assert json.loads(res.output)["machine"] == {"device": "cpu", "products": "full precision", "int8_off": None,
                                                 "cuda_graphs": False}


@pytest.mark.parametrize("capability,settings,products,graphs", [
    ((9, 0), [], "int8", True), ((9, 0), ["train.cuda_graphs=off"], "int8", False),
    ((8, 0), [], "plain", False), ((8, 0), ["train.int8_matmul=on"], "int8", True),
])
def test_the_machine_plan_on_a_gpu(monkeypatch, capability, settings, products, graphs):
    from bitnet_cli.train import int8_linear, loop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(int8_linear, "available", lambda device: None)  # triton and int8 tensor cores there
    monkeypatch.delenv("BITNET_COMPILE_MODE", raising=False)
    plan = loop.machine_plan(load_recipe(REPO / "recipes" / "small.yaml", settings))
    assert plan["device"] == "NVIDIA H100 80GB HBM3" and plan["products"] == products and plan["cuda_graphs"] == graphs
    assert (plan["int8_off"] is None) == (products == "int8")
    if products == "plain":
        assert "compute capability 9.x" in plan["int8_off"] and "this one is 8.0" in plan["int8_off"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU says")
def test_dry_run_of_a_gpu_recipe_without_a_gpu_names_the_problem():
    res = CliRunner().invoke(app, ["train", "small", "--dry-run", "--json"])
    assert res.exit_code == 0
    assert json.loads(res.output)["machine"] == {
        "device": None, "problem": "train.device is cuda but torch sees no CUDA device (use device: cpu or auto)"}


def test_the_peak_gpu_memory_is_logged_and_reported(tmp_path, monkeypatch):
    from bitnet_cli.train import loop

    assert loop.peak_memory_gib(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 15 << 30)
    assert loop.peak_memory_gib(torch.device("cuda")) == 15.0
    monkeypatch.setattr(loop, "peak_memory_gib", lambda device: 1.5)  # as a GPU run would see it
    p = write_recipe(tmp_path / "r.yaml", micro_recipe(steps=4, log_every=2, eval_every=4))
    res = CliRunner().invoke(app, ["train", str(p), "-o", str(tmp_path / "run")])
    assert res.exit_code == 0 and "peak GPU memory 1.5 GiB" in " ".join(res.output.split())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["peak_mem_gib"] for r in rows if "loss" in r] == [1.5, 1.5]
    res = CliRunner().invoke(app, ["train", str(p), "-o", str(tmp_path / "run2"), "--json"])
    assert json.loads(res.stdout)["peak_memory_gib"] == 1.5
