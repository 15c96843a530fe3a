"""Float-to-ternary conversion in `bitnet train`: init_from, lambda warm-up, distillation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import micro_recipe, run_killed_and_resumed, token_cache, write_recipe  # noqa: F401 (token_cache: autouse)
from typer.testing import CliRunner

from bitnet_cli.cli import app
from bitnet_cli.errors import BitnetError
from bitnet_cli.model import BitNetConfig, BitNetForCausalLM, set_quant_lambda
from bitnet_cli.train import load_recipe, train
from bitnet_cli.train.distill import distill_loss
from bitnet_cli.train.recipe import QuantSpec
from bitnet_cli.train.schedule import quant_lambda_at


@pytest.fixture(scope="module")
def float_run(tmp_path_factory, token_cache) -> Path:
    """A tiny full-precision model trained here (our own `quant: none` run)."""
    out = tmp_path_factory.mktemp("float") / "run"
    r = load_recipe(None, ["model.quant=none", "train.steps=8", "optim.lr=1e-2"], data=micro_recipe())
    train(r, out_dir=out, progress=False)
    return out


def convert_recipe(init_from: Path, **train_overrides) -> dict:
    r = micro_recipe(**train_overrides)
    del r["model"]  # the shape comes from the source
    r["model"] = {"init_from": str(init_from)}
    r["data"] = {}  # and so does the tokenizer
    r["optim"] = {"lr": 1e-3, "warmup_steps": 1}
    return r


def tiny_config(**kw) -> BitNetConfig:
    return BitNetConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, bos_token_id=None, eos_token_id=None, **kw)


# ----------------------------------------------------------------------------- lambda


@pytest.mark.parametrize("schedule", ["linear", "sigmoid", "exponential"])
def test_lambda_follows_its_schedule(schedule):
    spec = QuantSpec(warmup_steps=10, warmup_schedule=schedule, warmup_k=6.0)
    lams = [quant_lambda_at(spec, s) for s in range(14)]
    assert lams[0] == 0.0 and lams[10:] == [1.0] * 4
    assert all(a < b for a, b in zip(lams[:11], lams[1:11]))  # strictly rising through the warm-up
    p = 3 / 10
    expected = {"linear": p, "exponential": math.expm1(6 * p) / math.expm1(6),
                "sigmoid": (1 / (1 + math.exp(-6 * (p - 0.5))) - 1 / (1 + math.exp(3))) /
                           (1 / (1 + math.exp(-3)) - 1 / (1 + math.exp(3)))}[schedule]
    assert lams[3] == pytest.approx(expected, rel=1e-12)
    if schedule == "sigmoid":
        assert lams[5] == pytest.approx(0.5)  # symmetric about the middle of the warm-up
    if schedule == "exponential":
        assert lams[5] < 0.5  # slow start, fast finish
    assert quant_lambda_at(QuantSpec(), 0) == 1.0  # no warm-up: ternary from the first step


def test_lambda_one_is_bitnet_and_lambda_zero_is_float_exactly():
    torch.manual_seed(0)
    ternary = BitNetForCausalLM(tiny_config())
    plain = BitNetForCausalLM(tiny_config())
    plain.load_state_dict(ternary.state_dict())
    floating = BitNetForCausalLM(tiny_config(quant="none"))
    floating.load_state_dict(ternary.state_dict())
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            set_quant_lambda(ternary, 0.0)
            assert torch.equal(ternary(ids), floating(ids))
            set_quant_lambda(ternary, 1.0)
            assert torch.equal(ternary(ids), plain(ids))
            set_quant_lambda(ternary, 0.5)
            mid = ternary(ids)
            assert not torch.equal(mid, plain(ids)) and not torch.equal(mid, floating(ids))
    # the gradient passes straight through at any lambda
    set_quant_lambda(ternary, 0.3)
    ternary(ids).sum().backward()
    assert ternary.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        set_quant_lambda(ternary, 1.5)


# ----------------------------------------------------------------------------- distillation


def test_distillation_loss_is_zero_for_identical_models_and_positive_otherwise():
    torch.manual_seed(0)
    a = torch.randn(2, 5, 97)
    assert distill_loss(a, a.clone(), 2.0).item() == 0.0
    kd = distill_loss(a, torch.randn(2, 5, 97), 2.0)
    assert kd.item() > 0
    # T^2 * KL(teacher || student), averaged over the 10 tokens
    t, s = torch.randn(10, 97), torch.randn(10, 97)
    pt, ps = (t / 3).softmax(-1), (s / 3).softmax(-1)
    ref = 9 * (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert distill_loss(s, t, 3.0).item() == pytest.approx(ref.item(), rel=1e-5)


def assert_packs_and_runs_as_reference(run_dir: Path, packed: Path, ids: list[int]) -> None:
    """`run_dir` packs like any run, and the C engine's logits for `ids` on the packed file match
    the numpy reference forward's."""
    from bitnet_cli.engine import Engine
    from bitnet_cli.pack import reference
    from bitnet_cli.pack.convert import pack_checkpoint
    from bitnet_cli.pack.format import PackedModel

    pack_checkpoint(run_dir, packed)
    with Engine.load(packed, threads=1) as eng:
        got = eng.forward(ids)
    with PackedModel.open(packed) as pm:
        assert abs(got - reference.forward(pm, ids)).max() < 1e-3


def test_convert_own_float_run_with_warmup_and_distillation(tmp_path, float_run):
    r = load_recipe(None, ["quant.warmup_steps=4", "distill.alpha=0.5", "distill.temperature=2"],
                    data=convert_recipe(float_run, steps=6, log_every=1, eval_every=3))
    res = train(r, out_dir=tmp_path / "conv", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "conv" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in rows if "loss" in m]
    assert [m["quant_lambda"] for m in logged] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    # step 1 runs the student at lambda 0: it is the teacher, so the distillation term is exactly 0
    assert logged[0]["distill_loss"] == 0.0 and logged[-1]["distill_loss"] > 0
    assert logged[0]["loss"] == pytest.approx(0.5 * logged[0]["ce_loss"], abs=1e-5)
    assert (tmp_path / "conv" / "loss.png").stat().st_size > 1000
    cfg = json.loads((res.checkpoint / "config.json").read_text())
    src_cfg = json.loads((float_run / "final" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitnet" and "quantization_config" not in src_cfg
    assert {k: cfg[k] for k in ("vocab_size", "hidden_size", "rope_theta")} == \
        {k: src_cfg[k] for k in ("vocab_size", "hidden_size", "rope_theta")}
    assert (res.checkpoint / "tokenizer.json").read_text() == (float_run / "final" / "tokenizer.json").read_text()
    # the converted run packs like any run, and the engine's logits match the reference's
    assert_packs_and_runs_as_reference(tmp_path / "conv", tmp_path / "conv.bin", [1, 5, 9, 33, 2, 17])


def test_student_at_lambda_zero_reproduces_the_float_source(float_run):
    from bitnet_cli.train.source import float_model, load_weights, open_source, student_config

    src = open_source(str(float_run))
    student = BitNetForCausalLM(student_config(src, "bitnet", insert_subln=False))
    load_weights(src, student)
    teacher = float_model(src, torch.device("cpu"), torch.float32)
    set_quant_lambda(student, 0.0)
    ids = torch.randint(0, student.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student(ids), teacher(ids))


# ----------------------------------------------------------------------------- refusals


def test_unknown_sources_and_bad_settings_are_refused_before_any_work(tmp_path, float_run):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    out = tmp_path / "never"
    r = load_recipe(None, data=convert_recipe(gpt2))
    with pytest.raises(BitnetError, match=r"model_type 'gpt2'.*cannot be converted\. Accepted: bitnet"):
        train(r, out_dir=out, progress=False)
    assert not out.exists()
    with pytest.raises(BitnetError, match="no such file"):
        train(load_recipe(None, data=convert_recipe(tmp_path / "nowhere")), out_dir=out, progress=False)
    with pytest.raises(BitnetError, match="has its sub-norms already"):
        train(load_recipe(None, ["model.insert_subln=true"], data=convert_recipe(float_run)), out_dir=out,
              progress=False)
    with pytest.raises(BitnetError, match="exceeds the run's 12 steps"):
        train(load_recipe(None, ["quant.warmup_steps=13"], data=convert_recipe(float_run)), out_dir=out,
              progress=False)
    assert not out.exists()
    with pytest.raises(BitnetError, match="shape comes from the checkpoint; remove hidden_size"):
        load_recipe(None, ["model.hidden_size=64"], data=convert_recipe(float_run))
    with pytest.raises(BitnetError, match="needs distill.teacher or model.init_from"):
        load_recipe(None, ["distill.alpha=0.5"], data=micro_recipe())
    res = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "g.yaml", convert_recipe(gpt2))), "--dry-run"])
    text = " ".join(res.output.split())  # rich wraps at 80 columns
    assert res.exit_code == 1 and "Traceback" not in text and "cannot be converted" in text


# ----------------------------------------------------------------------------- resume


def test_sigkill_then_resume_is_exact_with_warmup_and_distillation(tmp_path, float_run):
    data = convert_recipe(float_run, steps=24, checkpoint_every=4, eval_every=12, log_every=2)
    data["quant"] = {"warmup_steps": 16, "warmup_schedule": "sigmoid"}
    data["distill"] = {"alpha": 0.7, "temperature": 2.0}
    recipe = write_recipe(tmp_path / "r.yaml", data)
    run_killed_and_resumed(recipe, tmp_path, 8)
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda m: {k: v for k, v in m.items() if k not in ("tokens_per_s", "elapsed_s")}  # noqa: E731
    assert [strip(m) for m in rows("ref")] == [strip(m) for m in rows("cut")]


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_conversion_under_torchrun_matches_one_process(tmp_path, float_run, strategy):
    from test_train_dist import _run

    data = convert_recipe(float_run, steps=6, log_every=1, eval_every=6, checkpoint_every=3)
    data["quant"] = {"warmup_steps": 4}
    data["distill"] = {"alpha": 0.5, "temperature": 2.0}
    recipe = write_recipe(tmp_path / "r.yaml", data)
    one, w1 = _run(recipe, tmp_path / "one", 1, "train.batch_size=4", "train.grad_accum=2")
    two, w2 = _run(recipe, tmp_path / "two", 2, "train.batch_size=2", "train.grad_accum=2",
                   f"train.distributed={strategy}")
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, rel=1e-4, abs=1e-4)
    kd = [json.loads(x).get("distill_loss") for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert kd[0] == 0.0 and max(k for k in kd if k is not None) > 0
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-3, atol=1e-4), k


# ----------------------------------------------------------------------------- recipes


def test_convert_small_recipe_dry_run(float_run):
    from conftest import REPO

    res = CliRunner().invoke(app, ["train", str(REPO / "recipes" / "convert-small.yaml"), "--dry-run", "--json",
                                   "--set", f"model.init_from={float_run}", "--set", "train.seq_len=32"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    src = json.loads((float_run / "final" / "config.json").read_text())
    assert d["config"]["hidden_size"] == src["hidden_size"] and d["config"]["quantization_config"]
    assert d["recipe"]["quant"]["warmup_steps"] > 0 and d["recipe"]["distill"]["alpha"] > 0
    assert d["init_from"] == d["teacher"] == str((float_run / "final").resolve())
    # the recipe's real setting: 1024-token windows, which this tiny source cannot take
    res = CliRunner().invoke(app, ["train", str(REPO / "recipes" / "convert-small.yaml"), "--dry-run",
                                   "--set", f"model.init_from={float_run}"])
    assert res.exit_code == 1 and "max_position_embeddings" in " ".join(res.output.split())


# ----------------------------------------------------------------------------- Hugging Face sources


def hf_float_source(out: Path, tokenizer_dir: Path, cls: str, sharded: bool = False, **kw) -> Path:
    """A random transformers float model (LlamaForCausalLM, Qwen2ForCausalLM, ...) with our test tokenizer."""
    import transformers

    config = getattr(transformers, cls.replace("ForCausalLM", "Config"))(**{
        "vocab_size": 400, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, **kw})
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).float().eval()
    with torch.no_grad():  # transformers zero-initialises biases; make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(out, **({"max_shard_size": "40KB"} if sharded else {}))
    assert (out / "model.safetensors.index.json").is_file() == sharded
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out


def _student_logits_at_lambda_zero(src_dir: Path, ids: torch.Tensor, insert_subln: bool = False):
    from bitnet_cli.train.source import load_weights, open_source, student_config

    src = open_source(str(src_dir))
    student = BitNetForCausalLM(student_config(src, "bitnet", insert_subln=insert_subln))
    load_weights(src, student, insert_subln)
    set_quant_lambda(student, 0.0)
    with torch.no_grad():
        return student, student(ids)


@pytest.mark.parametrize("cls,kw", [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"tie_word_embeddings": True, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ("Qwen2ForCausalLM", {}),
    ("LlamaForCausalLM", {"sharded": True}),
])
def test_init_from_transformers_models_reproduces_their_logits(tmp_path, test_tokenizer_dir, cls, kw):
    import transformers

    src = hf_float_source(tmp_path / "src", test_tokenizer_dir, cls, **kw)
    teacher = getattr(transformers, cls).from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, 400, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = teacher(ids).logits
    student, got = _student_logits_at_lambda_zero(src, ids)
    assert (got - want).abs().max().item() < 1e-5
    assert student.config.quant == "bitnet" and student.config.vocab_size == 400


def test_insert_subln_adds_unit_sub_norms_to_a_llama_source(tmp_path, test_tokenizer_dir):
    src = hf_float_source(tmp_path / "src", test_tokenizer_dir, "LlamaForCausalLM")
    ids = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    student, _ = _student_logits_at_lambda_zero(src, ids, insert_subln=True)
    cfg = student.config.to_hf_dict()
    assert cfg["model_type"] == "bitnet" and cfg["hidden_act"] == "silu"
    layer = student.model.layers[0]
    assert torch.equal(layer.self_attn.attn_sub_norm.weight, torch.ones(64))
    assert torch.equal(layer.mlp.ffn_sub_norm.weight, torch.ones(160))


@pytest.mark.parametrize("insert_subln", [False, True])
def test_converted_llama_trains_packs_and_runs(tmp_path, test_tokenizer_dir, insert_subln):
    src = hf_float_source(tmp_path / "src", test_tokenizer_dir, "LlamaForCausalLM")
    data = convert_recipe(src, steps=4, log_every=1, eval_every=4, checkpoint_every=4)
    data["model"]["insert_subln"] = insert_subln
    data["quant"] = {"warmup_steps": 2}
    data["distill"] = {"alpha": 0.5}
    res = train(load_recipe(None, data=data), out_dir=tmp_path / "run", progress=False)
    cfg = json.loads((res.checkpoint / "config.json").read_text())
    assert cfg["model_type"] == ("bitnet" if insert_subln else "llama") and cfg["hidden_act"] == "silu"
    assert_packs_and_runs_as_reference(tmp_path / "run", tmp_path / "m.bin", [0, 5, 9, 33, 2, 17])


def test_qwen3_is_refused_naming_what_is_unsupported(tmp_path, test_tokenizer_dir):
    src = hf_float_source(tmp_path / "src", test_tokenizer_dir, "Qwen3ForCausalLM", head_dim=16)
    r = load_recipe(None, data=convert_recipe(src))
    with pytest.raises(BitnetError, match="qwen3 model, which cannot be converted yet: Qwen3's per-head q_norm/k_norm"):
        train(r, out_dir=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_converted_qwen2_trains_evaluates_packs_and_runs(tmp_path, test_tokenizer_dir):
    from bitnet_cli.engine import Engine
    from bitnet_cli.pack import reference
    from bitnet_cli.pack.convert import pack_checkpoint
    from bitnet_cli.pack.format import PackedModel

    src = hf_float_source(tmp_path / "src", test_tokenizer_dir, "Qwen2ForCausalLM")
    data = convert_recipe(src, steps=3, log_every=1, eval_every=3, checkpoint_every=3)
    data["quant"] = {"warmup_steps": 2}
    data["distill"] = {"alpha": 0.5}
    res = train(load_recipe(None, data=data), out_dir=tmp_path / "run", progress=False)
    cfg = json.loads((res.checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["quantization_config"]["quant_method"] == "bitnet"
    ours = BitNetForCausalLM.from_pretrained(res.checkpoint)  # resumable and evaluable: the biases round-trip
    assert ours.model.layers[0].self_attn.q_proj.bias is not None
    pack_checkpoint(tmp_path / "run", tmp_path / "m.bin")
    ids = [0, 5, 9, 33, 2, 17]
    with Engine.load(tmp_path / "m.bin", threads=1) as eng:
        got = eng.forward(ids)
    with PackedModel.open(tmp_path / "m.bin") as pm:
        assert pm.dims.family == "qwen2" and "model.layers.1.self_attn.k_proj.bias" in pm.names
        assert abs(got - reference.forward(pm, ids)).max() < 1e-3
    with pytest.raises(BitnetError, match="q/k/v biases, which BitNet b1.58 does not have"):
        train(load_recipe(None, ["model.insert_subln=true"], data=convert_recipe(src)), out_dir=tmp_path / "x",
              progress=False)


def test_convert_qwen_recipe_dry_run_with_a_local_tiny_qwen2(tmp_path, test_tokenizer_dir):
    from conftest import REPO

    src = hf_float_source(tmp_path / "qwen", test_tokenizer_dir, "Qwen2ForCausalLM", tie_word_embeddings=True,
                          max_position_embeddings=4096)
    res = CliRunner().invoke(app, ["train", str(REPO / "recipes" / "convert-qwen2.5-0.5b.yaml"), "--dry-run", "--json",
                                   "--set", f"model.init_from={src}"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["config"]["model_type"] == "qwen2" and d["config"]["tie_word_embeddings"] is True
    assert d["init_from"] == d["teacher"] == str(src.resolve())
    assert d["recipe"]["quant"]["warmup_steps"] == 1000 and d["recipe"]["distill"]["alpha"] > 0
