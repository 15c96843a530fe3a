"""Shared fixtures: real data from ../shared/data and tiny models built locally.

Nothing here downloads anything. Reference models are random `transformers.BitNetForCausalLM`
instances saved to disk together with a byte-level BPE tokenizer trained on TinyShakespeare.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# transformers' BitNet quantisation helpers are torch.compile'd; compiling them on CPU costs ~26 s.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BITNET_SHARED_DATA", REPO.parent / "shared" / "data"))

# The quantization block that makes transformers ternarise a bf16/fp32 BitNet checkpoint on the fly.
ONLINE_QUANT = {
    "quant_method": "bitnet",
    "linear_class": "autobitlinear",
    "quantization_mode": "online",
}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set BITNET_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare(shared_data) -> Path:
    return shared_data / "corpus" / "tinyshakespeare.txt"


def train_test_tokenizer(corpus: Path, out_dir: Path, vocab_size: int = 389) -> Path:
    """A byte-level BPE on the first 300 kB of `corpus`, saved as out_dir/tokenizer.json.

    The default size is deliberately not a multiple of 8 so that kernels see ragged vocab tails.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = corpus.read_text(encoding="utf-8")[:300_000]
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                    "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256})
    )
    return out_dir / "tokenizer.json"


@pytest.fixture(scope="session")
def test_tokenizer_dir(tmp_path_factory, shakespeare) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_test_tokenizer(shakespeare, out)
    return out


# The model both checkpoint builders make unless a test says otherwise (their **shape overrides it).
TINY_SHAPE = dict(vocab_size=389, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)


def _tiny_shape(overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(TINY_SHAPE))
    if unknown:
        raise TypeError(f"not a TINY_SHAPE field: {', '.join(unknown)}")
    return {**TINY_SHAPE, **overrides}


def make_hf_checkpoint(
    out_dir: Path,
    tokenizer_dir: Path | None = None,
    *,
    tie_word_embeddings: bool = True,
    torch_dtype: str = "float32",
    quantized: bool = True,
    initializer_range: float = 0.05,
    seed: int = 0,
    random_norms: bool = False,
    **shape: int,
) -> Path:
    """Save a randomly initialised transformers BitNetForCausalLM to `out_dir` (HF layout), of
    TINY_SHAPE with the fields of `shape` changed.

    With `quantized` the config carries the online `quantization_config` block, so transformers
    ternarises on load exactly as it does for microsoft/bitnet-b1.58-2B-4T-bf16.
    `random_norms`: norm weights drawn from [0.5, 1.5) instead of transformers' ones.
    """
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM

    torch.manual_seed(seed)
    config = BitNetConfig(
        **_tiny_shape(shape),
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = BitNetForCausalLM(config)
    if random_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
    model = model.to(getattr(torch, torch_dtype))
    model.save_pretrained(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    if quantized:
        cfg["quantization_config"] = dict(ONLINE_QUANT)
    return _finish_checkpoint(out_dir, cfg, tokenizer_dir)


def _finish_checkpoint(out_dir: Path, cfg: dict, tokenizer_dir: Path | None) -> Path:
    """Write the (edited) config.json and copy the tokenizer files beside the weights."""
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out_dir


def write_shards(tensors: dict, out_dir: Path, shards: int, save_file) -> None:
    """`tensors` as `shards` safetensors files plus model.safetensors.index.json in `out_dir`, the
    way HF shards a checkpoint (names dealt round-robin). `save_file`: safetensors.numpy's or
    safetensors.torch's, whichever holds the tensors' type."""
    names, weight_map = sorted(tensors), {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(out_dir / shard))
        weight_map.update({n: shard for n in part})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is scripts, not a package), to test its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_hf_reference(ckpt_dir: Path):
    """transformers' own BitNetForCausalLM from `ckpt_dir`, fp32, eval mode: the reference forward."""
    import torch
    from transformers import BitNetForCausalLM

    model = BitNetForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_tiny_checkpoint(tmp_path_factory, test_tokenizer_dir) -> Path:
    """A tiny random HF BitNet checkpoint (fp32, online-quantised config, tied embeddings)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf_tiny"), test_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_packed(tmp_path_factory, test_tokenizer_dir) -> tuple[Path, Path]:
    """(checkpoint dir, packed file) of one tiny random HF BitNet model saved in f16, so that packing its embeddings
    loses nothing; shared by the tests of the engine, `bitnet run` and the perplexity, which only read it."""
    from bitnet_cli.pack import pack_checkpoint

    root = tmp_path_factory.mktemp("tiny_packed")
    ckpt = make_hf_checkpoint(root / "hf", test_tokenizer_dir, torch_dtype="float16", initializer_range=0.1)
    pack_checkpoint(ckpt, root / "model.bin")
    return ckpt, root / "model.bin"


@pytest.fixture(autouse=True)
def _console_width_80(monkeypatch):
    """The CLI's consoles at rich's width for a non-terminal (80), whatever COLUMNS says.

    rich reads COLUMNS once, when the console is made; tests that read tables must not depend on
    the terminal they happen to run in. Error lines are never wrapped at any width
    (test_first_hour.py checks that at 40 columns).
    """
    from bitnet_cli import cli

    monkeypatch.setattr(cli.console, "width", 80)
    monkeypatch.setattr(cli.err_console, "width", 80)


# The quantization_config blocks of the Llama-architecture 1.58-bit checkpoints, by convention:
# how the BitLinear weights are stored and what the output does with weight_scale (transformers'
# BitNetQuantConfig defaults linear_class to bitlinear and quantization_mode to offline).
LLAMA_CONVENTIONS = {
    # latent bf16/fp32 weights, ternarised on the fly (Falcon-E's prequantized revision, our training)
    "online": dict(ONLINE_QUANT),
    # HF1BitLLM/Llama3-8B-1.58 and onebitllms' quantize_to_1bit: only quant_method; uint8, divide
    "bitlinear-default": {"quant_method": "bitnet", "modules_to_not_convert": None},
    "bitlinear": {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"},
    # AutoBitLinear offline: uint8 (or ternary floats), multiply
    "autobitlinear-offline": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
    "autobitlinear-offline-floats": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                     "quantization_mode": "offline"},
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def make_llama_checkpoint(
    out_dir: Path,
    tokenizer_dir: Path | None = None,
    *,
    convention: str = "online",
    rope_scaling: dict | None = None,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.05,
    seed: int = 0,
    f16_embeddings: bool = True,
    architecture: str = "Llama",
    bitlinear_norm_eps: float | None = None,
    **shape: int,
) -> Path:
    """Save a random transformers LlamaForCausalLM of TINY_SHAPE (with the fields of `shape` changed; or
    `architecture` "Qwen2": Qwen2ForCausalLM, whose q/k/v biases get random values) and the bitnet
    quantization_config of `convention` (LLAMA_CONVENTIONS). Offline conventions store transformers' own pack_weights of the absmean
    trits with weight_scale = gamma (autobitlinear: multiplied) or 1/gamma (bitlinear: divided).
    With `f16_embeddings` the embedding and head values are f16-representable (exact when packed).
    With `bitlinear_norm_eps` the config says use_rms_norm (that rms_norm_eps) and every projection gets
    a random `<proj>.rms_norm.weight`, as transformers' BitLinear / AutoBitLinear then read."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers.integrations.bitnet import pack_weights

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0} if rope_scaling is None else dict(rope_scaling, rope_theta=10000.0)
    config = getattr(transformers, f"{architecture}Config")(
        **_tiny_shape(shape), tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range, bos_token_id=0, eos_token_id=1, rope_parameters=rope, hidden_act="silu",
        **({"head_dim": head_dim} if head_dim else {}),  # Qwen2Attention reads head_dim=None as given
    )
    model = getattr(transformers, f"{architecture}ForCausalLM")(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))  # norms that are not all ones
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)  # transformers zero-initialises biases; make them matter
            elif f16_embeddings and ("embed_tokens" in name or "lm_head" in name):
                p.copy_(p.half().float())
    model.save_pretrained(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["quantization_config"] = dict(LLAMA_CONVENTIONS[convention])
    state = load_file(str(out_dir / "model.safetensors"))
    if bitlinear_norm_eps is not None:
        cfg["quantization_config"].update(use_rms_norm=True, rms_norm_eps=bitlinear_norm_eps)
        for name in [n for n in state if n.endswith("_proj.weight")]:
            state[name.replace(".weight", ".rms_norm.weight")] = 1 + 0.2 * torch.randn(state[name].shape[1])
    if convention != "online":
        for name in [n for n in state if n.endswith("_proj.weight")]:
            w = state[name]
            s = 1.0 / w.abs().mean().clamp(min=1e-5)
            trits = (w * s).round().clamp(-1, 1)
            state[name] = trits if convention.endswith("floats") else pack_weights(trits.clone().to(torch.int8))
            scale = s if convention.startswith("bitlinear") else 1.0 / s
            state[name.replace(".weight", ".weight_scale")] = scale.reshape(1).float()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return _finish_checkpoint(out_dir, cfg, tokenizer_dir)


def load_hf_llama_reference(ckpt_dir: Path):
    """transformers' own LlamaForCausalLM or Qwen2ForCausalLM, as config.json says (its bitnet quantizer
    applying the config's convention), fp32."""
    import torch
    import transformers

    cls = json.loads((ckpt_dir / "config.json").read_text())["architectures"][0]
    return getattr(transformers, cls).from_pretrained(ckpt_dir, dtype=torch.float32).eval()


def assert_greedy_matches_transformers(ckpt_dir: Path, packed: Path, tokens: int = 64) -> None:
    """Greedy decoding of `tokens` tokens on the C engine from `packed` gives transformers' own
    greedy tokens from `ckpt_dir` (load_hf_llama_reference), with stopping off on both sides."""
    import numpy as np
    import torch

    from bitnet_cli.engine import Engine

    prompt = [int(i) for i in np.random.default_rng(1).integers(2, 389, 5)]
    with torch.no_grad():
        want = load_hf_llama_reference(ckpt_dir).generate(torch.tensor([prompt]), max_new_tokens=tokens,
                                                          do_sample=False, eos_token_id=None,
                                                          pad_token_id=0)[0, len(prompt):].tolist()
    with Engine.load(packed, threads=2) as eng:
        eng.stop_token_ids = set()  # transformers was told not to stop either
        gen = eng.generate(prompt, max_tokens=tokens, temperature=0)
        "".join(gen)
    assert gen.token_ids == want and len(want) == tokens


def rounding_fragile_rows(packed: Path, ids, margin: float = 1e-4):
    """The token positions at which the numpy reference's forward on `packed` rounds some activation to int8
    from within `margin` of a rounding boundary (x * s within margin of k + 0.5). There another float path
    (transformers', whose matmuls and norms round differently from CPU to CPU) may round the other way: one
    int8 step of one activation, a few 1e-3 on that position's logits. Measured on a 2-core Xeon (AVX-512,
    AMX), where transformers' logits differed from the engine's and the reference's at one position each of
    two tests: those activations were 1.1e-5 and 1.5e-5 from a boundary; 9-18 of 100 positions come within 1e-4."""
    import numpy as np

    from bitnet_cli.pack import PackedModel, reference

    closest = np.full(len(ids), np.inf)
    quantize = reference.quantize_activations

    def spy(x):
        y = x * (np.float32(127) / np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-5)))
        if x.shape[0] == len(ids):  # a per-position activation (not the head's rows)
            np.minimum(closest, np.abs(y - np.floor(y) - 0.5).min(axis=-1), out=closest)
        return quantize(x)

    reference.quantize_activations = spy
    try:
        with PackedModel.open(packed) as pm:
            reference.forward(pm, ids)
    finally:
        reference.quantize_activations = quantize
    return set(np.flatnonzero(closest < margin).tolist())


def assert_engine_matches(packed: Path, ids, want, ref) -> None:
    """The C engine on `packed` gives the numpy reference's logits `ref` within 1e-3 and transformers'
    `want` within 1e-3 at every position but those where an activation's int8 rounding is decided by float
    rounding (rounding_fragile_rows; at most a fifth of them may differ, so the comparison keeps its
    teeth), and its batched forward (serve's: two sequences in one pass) gives each sequence's logits as if
    it ran alone, bit for bit."""
    import numpy as np

    from bitnet_cli.engine import Engine

    with Engine.load(packed, threads=2) as eng:
        got = eng.forward(ids)
        eng.set_sequences(2)
        batch = eng.forward_batch(list(ids[:10]) + list(ids[:7]), [0] * 10 + [1] * 7,
                                  list(range(10)) + list(range(7)), [True] * 17)
    assert np.abs(got - ref).max() <= 1e-3
    differ = set(np.flatnonzero(np.abs(got - want).max(axis=-1) > 1e-3).tolist())
    if differ:
        fragile = rounding_fragile_rows(packed, ids)
        assert differ <= fragile and len(differ) <= len(ids) // 5, (sorted(differ), sorted(fragile))
    np.testing.assert_array_equal(batch[:10], got[:10])
    np.testing.assert_array_equal(batch[10:], got[:7])
