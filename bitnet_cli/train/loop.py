"""The training loop: ``train(recipe, out_dir) -> TrainResult``.

One function a Python user (or ``bitnet quickstart``) calls; the CLI only parses options.
AdamW on fp32 master weights, optional bf16 autocast, gradient accumulation and clipping,
periodic evaluation and atomic checkpoints, exact resume, DDP/FSDP under torchrun.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bitnet_cli.arch import DIM_LIMITS
from bitnet_cli.errors import BitnetError
from bitnet_cli.files import special_kind
from bitnet_cli.model import BitNetConfig, BitNetForCausalLM, set_quant_lambda
from bitnet_cli.tokenizer import special_id
from bitnet_cli.train import checkpoint as ckpt_io
from bitnet_cli.train import distributed as D
from bitnet_cli.train import int8_linear
from bitnet_cli.train.data import (TokenData, cache_root, corpus_hash, load_tokenizer,
                                   prepare_tokenizer, resolve_files, tokenize_to_memmap, tokenizer_config)
from bitnet_cli.train.distill import distill_loss
from bitnet_cli.train.recipe import Recipe
from bitnet_cli.train.schedule import lr_at, quant_lambda_at, weight_decay_at
from bitnet_cli.train.source import Source, float_model, load_weights, open_source, student_config

# Dense bf16 tensor-core peaks (FLOP/s) for the MFU figure; BITNET_PEAK_FLOPS overrides.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


@dataclass
class TrainResult:
    checkpoint: Path          # the final checkpoint directory (HF layout)
    out_dir: Path
    steps: int
    tokens: int               # training tokens processed in this run's optimiser steps (all steps)
    train_loss: float         # mean loss over the last logging window
    val_loss: float
    unigram_entropy: float    # nats/token of the train split's token frequencies
    parameters: int
    seconds: float            # this call's training time (a resumed run: since the resume)
    tokens_per_second: float
    mfu: float | None = None
    start_step: int = 0       # steps done before this call (resumed runs); == steps: nothing left to train
    peak_memory_gib: float | None = None  # this process's peak GPU memory allocated by torch (None off CUDA)

    def to_json(self) -> dict:
        d = asdict(self)
        d["checkpoint"], d["out_dir"] = str(self.checkpoint), str(self.out_dir)
        return d


# ----------------------------------------------------------------------------- set-up helpers


def total_steps(recipe: Recipe, world: int = 1) -> int:
    t = recipe.train
    if t.steps is not None:
        return t.steps
    per_step = t.batch_size * t.grad_accum * world * t.seq_len
    return max(1, math.ceil(t.tokens / per_step))


def model_config(recipe: Recipe, tokenizer_vocab: int | None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> BitNetConfig:
    """The BitNetConfig a recipe describes (vocab from the tokenizer unless the recipe fixes it)."""
    dims = recipe.model.resolved()
    vocab = dims.pop("vocab_size", None) or tokenizer_vocab
    if vocab is None:
        raise BitnetError("model.vocab_size is unknown: set it, or give a tokenizer")
    if tokenizer_vocab is not None and vocab < tokenizer_vocab:
        raise BitnetError(f"model.vocab_size {vocab} is smaller than the tokenizer's {tokenizer_vocab} tokens")
    r = recipe.model.round_vocab_to
    vocab = -(-vocab // r) * r
    if vocab > DIM_LIMITS["vocab_size"]:
        raise BitnetError(f"model.vocab_size {vocab} (rounded up to a multiple of {r}) is more than "
                          f"{DIM_LIMITS['vocab_size']}, the most the packer and engine accept")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
               if dims.get(k) is None]
    if missing:
        raise BitnetError(f"model: give a preset or {', '.join('model.' + k for k in missing)}")
    dims.setdefault("num_key_value_heads", dims["num_attention_heads"])
    if dims.get("max_position_embeddings") is None:
        dims["max_position_embeddings"] = recipe.train.seq_len
    if recipe.train.seq_len > dims["max_position_embeddings"]:
        raise BitnetError(f"train.seq_len {recipe.train.seq_len} exceeds model.max_position_embeddings "
                          f"{dims['max_position_embeddings']}")
    return BitNetConfig(vocab_size=vocab, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **dims)


def describe(recipe: Recipe) -> dict:
    """What --dry-run prints: the resolved shape, parameter count and FLOPs per token. No data is read."""
    src, teacher = sources(recipe)
    if src is not None:
        config = converted_config(recipe, src, load_tokenizer(src.path).get_vocab_size())
    else:
        vocab = None
        if recipe.model.resolved().get("vocab_size") is None:
            if recipe.data.tokenizer.path:
                vocab = load_tokenizer(recipe.data.tokenizer.path, recipe.base_dir).get_vocab_size()
            else:
                vocab = recipe.data.tokenizer.vocab_size
        config = model_config(recipe, vocab)
    steps = total_steps(recipe)
    t = recipe.train
    tokens_per_step = t.batch_size * t.grad_accum * t.seq_len
    out = {
        "config": config.to_hf_dict(),
        "parameters": config.arch.parameters(),
        "parameters_non_embedding": config.arch.parameters(exclude_embeddings=True),
        "flops_per_token": config.arch.training_flops_per_token(t.seq_len),
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "total_tokens": steps * tokens_per_step,
    }
    if src is not None:
        out["init_from"] = src.where
    if teacher is not None:
        out["teacher"] = teacher.where
    out["machine"] = machine_plan(recipe)
    return out


def machine_plan(recipe: Recipe) -> dict:
    """How one process on this machine would run ``recipe`` (what --dry-run reports beside its shape): the device
    (``problem`` where there is none to run on); the BitLinear ``products``: ``int8`` (int8 tensor cores), ``int8
    emulation`` (their pure-torch form off CUDA, for tests), ``plain`` (fake-quantised; ``int8_off`` says why not int8)
    or ``full precision`` (``quant: none``); and whether the compiled step runs under CUDA graphs."""
    t = recipe.train
    try:
        device = pick_device(t.device)
        int8, graphs = _int8_and_graphs(recipe, device)
    except BitnetError as e:
        return {"device": None, "problem": str(e)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    why_not = None
    if recipe.model.quant != "bitnet":
        products = "full precision"
    elif int8:
        products = "int8" if device.type == "cuda" else "int8 emulation"
    else:
        products = "plain"
        if t.int8_matmul == "off":
            why_not = "train.int8_matmul is off"
        elif device.type != "cuda":
            why_not = "the int8 kernels need a CUDA GPU"
        else:
            capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
            why_not = int8_linear.available(device) or (
                f"train.int8_matmul auto turns them on for Hopper GPUs (compute capability 9.x), where they were "
                f"measured faster; this one is {capability}: set it to on to use them")
    return {"device": name, "products": products, "int8_off": why_not, "cuda_graphs": graphs}


def _int8_and_graphs(recipe: Recipe, device: torch.device, distributed: bool = False) -> tuple[bool, bool]:
    """Whether a process of ``recipe`` on ``device`` runs the int8 products, and its compiled step under CUDA graphs
    (``distributed``: as a torchrun rank)."""
    t = recipe.train
    int8 = int8_linear.resolve(t.int8_matmul, device, recipe.model.quant, fsdp=distributed and t.distributed == "fsdp")
    return int8, bool(t.compile) and _compile_mode(t.cuda_graphs, device.type, int8, distributed) == "reduce-overhead"


def sources(recipe: Recipe) -> tuple[Source | None, Source | None]:
    """(init checkpoint, distillation teacher), opened and checked; only configs and headers are read."""
    src = open_source(recipe.model.init_from, recipe.base_dir) if recipe.model.init_from else None
    if src is not None and not (src.path / "tokenizer.json").is_file():
        raise BitnetError(f"model.init_from: {src.path} has no tokenizer.json (the converted model keeps the "
                          "source's tokenizer)")
    teacher = None
    if recipe.distill.alpha > 0:
        teacher = src if recipe.distill.teacher is None else open_source(recipe.distill.teacher, recipe.base_dir,
                                                                         "distill.teacher")
        if src is not None and teacher is not src:
            student_vocab = student_config(src, "none", False).vocab_size
            teacher_vocab = student_config(teacher, "none", False).vocab_size
            if teacher_vocab != student_vocab:
                raise BitnetError(f"distill.teacher: its vocabulary has {teacher_vocab} tokens, the model's "
                                  f"{student_vocab}; distillation compares logits token by token")
    return src, teacher


def converted_config(recipe: Recipe, src: Source, tokenizer_vocab: int) -> BitNetConfig:
    """The shape of a converted model: the source's, checked against the tokenizer and seq_len."""
    config = student_config(src, recipe.model.quant, recipe.model.insert_subln)
    if tokenizer_vocab > config.vocab_size:
        raise BitnetError(f"{src.path}: tokenizer.json has {tokenizer_vocab} tokens but the model only "
                          f"{config.vocab_size} embeddings")
    if recipe.train.seq_len > config.max_position_embeddings:
        raise BitnetError(f"train.seq_len {recipe.train.seq_len} exceeds the source's max_position_embeddings "
                          f"{config.max_position_embeddings}")
    return config


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BitnetError("train.device is cuda but torch sees no CUDA device (use device: cpu or auto)")
    return torch.device(name)


def peak_memory_gib(device: torch.device) -> float | None:
    """The most GPU memory torch has allocated on ``device`` in this process so far, GiB (None off CUDA): how close
    a run's micro-batch is to the GPU's limit."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s for MFU: ``$BITNET_PEAK_FLOPS`` (e.g. ``989e12``), else the table's."""
    env = os.environ.get("BITNET_PEAK_FLOPS")
    if env:
        try:
            value = float(env)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise BitnetError(f"BITNET_PEAK_FLOPS={env!r}: expected a positive number of FLOP/s, e.g. 989e12")
        return value
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)


def make_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on the projection matrices only (not norms, not the embedding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed_tokens" not in name else no_decay).append(p)
    o = recipe.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=device.type == "cuda")


def plot_losses(metrics_path: Path, out_png: Path) -> bool:
    """Draw train/val loss to ``out_png``; False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val, lam = [], [], []
    for line in metrics_path.read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            train.append((m["step"], m["loss"]))
        if "val_loss" in m:
            val.append((m["step"], m["val_loss"]))
        if "quant_lambda" in m:
            lam.append((m["step"], m["quant_lambda"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lam:  # quantisation warm-up: lambda on its own axis
        ax2 = ax.twinx()
        handles += ax2.plot(*zip(*lam), "--", color="tab:green", label="quant lambda")
        labels.append("quant lambda")
        ax2.set_ylabel("quantisation lambda")
        ax2.set_ylim(-0.02, 1.05)
    ax.legend(handles, labels)
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return True


# ----------------------------------------------------------------------------- the loop


def train(recipe: Recipe, out_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          console=None) -> TrainResult:
    """Train ``recipe`` into ``out_dir`` (default runs/<name>) and return where the result is.

    With ``resume`` the run continues from the newest step checkpoint in ``out_dir`` and ends
    with exactly the weights an uninterrupted run would have.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    device = pick_device(recipe.train.device)
    out_dir = Path(out_dir or recipe.out_dir or Path("runs") / recipe.name)
    info = D.init(device.type)
    created = _missing_dirs(out_dir)
    try:
        return _train(recipe, out_dir, resume, progress, console, device, info)
    except KeyboardInterrupt:
        _remove_empty(created)
        saved = ckpt_io.step_checkpoints(out_dir)
        raise TrainInterrupted(out_dir, saved[-1][0] if saved else 0) from None
    except torch.OutOfMemoryError:
        _remove_empty(created)
        raise BitnetError(out_of_memory(recipe, device, info)) from None
    except Exception:
        _remove_empty(created)  # a run refused before it wrote anything leaves no empty run directory
        raise
    finally:
        D.shutdown(info)


def out_of_memory(recipe: Recipe, device: torch.device, info: D.DistInfo) -> str:
    """What to change when the GPU ran out of memory: a smaller micro-batch (the same tokens per step with more
    accumulation) and, where the step ran under CUDA graphs, graphs off (their pool keeps each compiled graph's
    memory apart: on an 80 GB H100, 1.3b's int8 step fits 8 sequences of 2,048 under them, not 16)."""
    t = recipe.train
    what = (f"the GPU ran out of memory ({torch.cuda.get_device_name(device)}, "
            f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)" if device.type == "cuda" else
            f"the {device.type} device ran out of memory")
    fix = (f"lower train.batch_size ({t.batch_size}) and raise train.grad_accum ({t.grad_accum}) by the same factor "
           "(the same tokens per step)" if t.batch_size > 1 else "shorten train.seq_len or train a smaller model")
    if device.type == "cuda" and _int8_and_graphs(recipe, device, info.enabled)[1]:
        fix += ", or set train.cuda_graphs to off (CUDA graphs keep memory of their own)"
    return f"{what}: {fix}"


def _missing_dirs(out_dir: Path) -> list[Path]:
    """`out_dir` and those of its parents that do not exist yet, deepest first."""
    missing, d = [], out_dir
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    return missing


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the directories this run created while they are still empty (deepest first)."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:  # not empty (something was written), already gone, or another rank's
            return


class TrainInterrupted(BitnetError):
    """Ctrl-C during training: the step checkpoints already written stay, and resume continues."""

    exit_code = 130

    def __init__(self, out_dir: Path, resume_step: int):
        self.out_dir, self.resume_step = out_dir, resume_step
        where = f"step {resume_step}" if resume_step else "the start (no checkpoint was saved yet)"
        super().__init__(f"interrupted: run it again with resume to continue {out_dir} from {where}",
                         param="resume")


def _prepare_run_dir(out_dir: Path) -> None:
    """Create the run directory and prove it is writable, before any data or model work."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except FileExistsError:
        raise BitnetError(f"{out_dir}: is {special_kind(out_dir) or 'a file'}, not a run directory (choose another "
                          "out_dir)", param="out_dir") from None
    except OSError as e:
        raise BitnetError(f"{out_dir}: cannot write the run directory ({e.strerror or e})") from None


def _train(recipe, out_dir: Path, resume, show_progress, console, device, info: D.DistInfo) -> TrainResult:
    """The run, stage by stage: checks, run directory, data, model, then the step loop."""
    t = recipe.train
    device = _configure_torch(t, device, info)
    say = console.print if info.is_main else (lambda *a, **k: None)
    # An unsupported source or setting is refused before any work.
    src, teacher_src = sources(recipe)
    if src is not None:
        student_config(src, recipe.model.quant, recipe.model.insert_subln)
    steps = total_steps(recipe, info.world)
    if recipe.quant.warmup_steps > steps:
        raise BitnetError(f"quant.warmup_steps {recipe.quant.warmup_steps} exceeds the run's {steps} steps: the "
                          "model would never be fully ternary")
    resume_from = _resume_point(out_dir, resume, info, say)
    data, tok, tok_cfg = _prepare_data(recipe, src, resume_from, info)
    run = _Run.build(recipe, out_dir, device, info, say, data, tok, tok_cfg, src, teacher_src, resume_from)
    finished = run.start_step >= steps  # a finished run: no bar (it would show loss nan, 0 tok/s)
    return run.loop(steps, _progress(show_progress and info.is_main and not finished, console), say)


def _configure_torch(t, device: torch.device, info: D.DistInfo) -> torch.device:
    """Threads, this rank's GPU and TF32 matmuls; the device the run uses."""
    if t.threads:
        torch.set_num_threads(t.threads)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _resume_point(out_dir: Path, resume: bool, info: D.DistInfo, say) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), once the run directory is ready."""
    if not resume and (ckpt_io.step_checkpoints(out_dir) or (out_dir / "final").exists()):
        raise BitnetError(f"{out_dir} already holds a run: pass resume to continue it, or choose another out_dir",
                          param=("resume", "out_dir"))
    if info.is_main:
        _prepare_run_dir(out_dir)
        ckpt_io.remove_stale_temporaries(out_dir)
    D.barrier(info)
    if not resume:
        return None
    final = out_dir / "final"
    resume_from = final if (final / "trainer_state.pt").is_file() else ckpt_io.latest_checkpoint(out_dir)
    if resume_from is None:
        say(f"resume: no checkpoint in {out_dir} yet, starting from step 0")
    return resume_from


def _prepare_data(recipe: Recipe, src: Source | None, resume_from: Path | None, info: D.DistInfo):
    """(token data, tokenizer, tokenizer config): rank 0 tokenises and caches, the others then read the cache."""
    files = resolve_files(recipe.data, recipe.base_dir)
    digest = corpus_hash(files)
    tok_src = None
    for turn in ("main", "others"):
        if (turn == "main") == info.is_main:
            if resume_from is not None:
                tok, tok_src = load_tokenizer(resume_from / "tokenizer.json"), resume_from
            elif src is not None:
                tok, tok_src = load_tokenizer(src.path / "tokenizer.json"), src.path
            else:
                tok, tok_src = prepare_tokenizer(recipe.data, files, recipe.base_dir, digest)
            bin_path = tokenize_to_memmap(files, tok, cache_root(recipe.data), digest)
        D.barrier(info)
    data = TokenData.open(bin_path, recipe.data.val_fraction, recipe.train.seq_len, recipe.seed)
    return data, tok, tokenizer_config(tok, tok_src)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def _compile_mode(cuda_graphs: str = "off", device_type: str = "cpu", int8: bool = False,
                  distributed: bool = False) -> str | None:
    """torch.compile's mode for the model: ``$BITNET_COMPILE_MODE`` where set (for measurements; "reduce-overhead":
    CUDA graphs), else "reduce-overhead" where ``train.cuda_graphs`` puts the step under CUDA graphs (auto: the int8
    matmuls on one GPU), else None (torch's default)."""
    mode = os.environ.get("BITNET_COMPILE_MODE") or None
    if mode is not None:
        if mode not in COMPILE_MODES:
            raise BitnetError(f"BITNET_COMPILE_MODE={mode!r}: expected one of {', '.join(COMPILE_MODES)}")
        return mode
    if cuda_graphs == "on" and (device_type != "cuda" or distributed):
        raise BitnetError("train.cuda_graphs is on, but CUDA graphs need one CUDA GPU (no torchrun); set it to auto "
                          "or off")
    graphs = cuda_graphs == "on" or (cuda_graphs == "auto" and int8 and device_type == "cuda" and not distributed)
    return "reduce-overhead" if graphs else None


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of logits [B, T, V] (the compute dtype) against targets [B, T], in fp32. Compiled with
    the model (train.compile), it is one reduction over the logits as they are, forward and backward, instead of eager
    torch's fp32 copy, log-softmax and gradient, each [B*T, V] in fp32 (at a 128k vocabulary, 16 GiB apiece for 32k
    tokens)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


def training_loss(student, teacher, x: torch.Tensor, y: torch.Tensor, alpha: float, temperature: float,
                  ce=token_loss) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A micro-batch's training loss and its parts: the next-token cross-entropy (``ce``: token_loss, or it compiled
    alone), and with a distillation teacher ``(1 - alpha) * CE + alpha * KD`` (:func:`distill_loss`, the teacher's
    forward without gradients). Returns ``(loss, parts)``, parts ``[CE, KD]`` detached where there is a teacher."""
    logits = student(x)
    loss = ce(logits, y)
    if teacher is None:
        return loss, None
    with torch.no_grad():
        teacher_logits = teacher(x)
    kd = distill_loss(logits, teacher_logits, temperature)
    return (1 - alpha) * loss + alpha * kd, torch.stack([loss.detach(), kd.detach()])


class _ModelLoss(torch.nn.Module):
    """The model, its loss and the distillation teacher (if any) as one module (:func:`training_loss`), so that
    torch.compile makes them one graph: under CUDA graphs (train.cuda_graphs) a tensor made outside the model's graphs
    is copied into their static input at every replay, and the logits' gradient from a separately compiled loss was
    such a tensor (2 GiB a micro-batch at small.yaml's 32k tokens and 32k vocabulary: 7 ms of a 227 ms step on an H100,
    benchmarks/RESULTS.md, session 34). Inside one graph, nothing is copied."""

    def __init__(self, model: torch.nn.Module, teacher: torch.nn.Module | None, alpha: float, temperature: float):
        super().__init__()
        self.model, self.teacher = model, teacher
        self.alpha, self.temperature = alpha, temperature

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return training_loss(self.model, self.teacher, x, y, self.alpha, self.temperature)


@dataclass
class _Run:
    """A run's model, optimiser, data and teacher, and what one step, an evaluation and a save do."""

    recipe: Recipe
    out_dir: Path
    device: torch.device
    info: D.DistInfo
    data: TokenData
    tok: object
    tok_cfg: dict
    config: BitNetConfig
    model: torch.nn.Module  # as wrapped for DDP/FSDP
    fwd: torch.nn.Module  # the model as called for evaluation (compiled or not)
    loss_fn: object  # token_loss as called for evaluation (compiled or not)
    fwd_loss: Callable  # (x, y) -> (loss, parts) of a training micro-batch (training_loss; _ModelLoss on one process)
    distilling: bool  # a distillation teacher: the steps log ce_loss and distill_loss
    opt: torch.optim.Optimizer
    start_step: int
    prior_seconds: float
    int8_refresh: bool  # int8 matmuls with ternary weights cached per step: refresh them before each step
    cuda_graphs: bool = False  # the model compiled with mode="reduce-overhead" (train.cuda_graphs)

    @classmethod
    def build(cls, recipe, out_dir, device, info, say, data, tok, tok_cfg, src, teacher_src, resume_from) -> "_Run":
        """The model (converted, resumed or new), its optimiser and the teacher. The order of the
        steps is the order of the random numbers they draw: a resumed run draws as the original did."""
        t = recipe.train
        if src is not None:
            config = converted_config(recipe, src, tok.get_vocab_size())
        else:
            bos, eos = (special_id(kind, tok, tok_cfg, {}, guess=True) for kind in ("bos", "eos"))
            config = model_config(recipe, tok.get_vocab_size(), bos, eos)
        torch.manual_seed(recipe.seed)
        model = BitNetForCausalLM(config)
        if src is not None and resume_from is None:
            load_weights(src, model, recipe.model.insert_subln)
            say(f"initialised from {src.where}" + (" (sub-norms inserted)" if recipe.model.insert_subln else ""))
        if resume_from is not None:
            loaded = BitNetForCausalLM.from_pretrained(resume_from)
            try:
                model.load_state_dict(loaded.state_dict())
            except RuntimeError:
                raise BitnetError(f"{resume_from}: the checkpoint's model shape differs from the recipe's; resume "
                                  "with the recipe the run started with") from None
            del loaded
        model = model.to(device).train()
        # int8 products: the ternary weights are cached once per step, except under FSDP, where the full
        # weight exists only inside each forward (there each forward ternarises its gathered weight).
        fsdp = info.enabled and t.distributed == "fsdp"
        int8 = int8_linear.resolve(t.int8_matmul, device, config.quant, fsdp=fsdp)
        int8_cache = not fsdp
        if int8:
            n = int8_linear.enable(model, t.int8_grad_input, cache=int8_cache,
                                   int8_weight=t.int8_grad_weight == "on")
            how = "Triton kernels" if device.type == "cuda" else "pure-torch emulation of the kernels"
            extra = int8_linear.enabled_switches(model)
            say(f"int8 tensor-core matmuls for {n} BitLinear layers ({how}"
                + (f"; backward with {', '.join(extra)})" if extra else ")"))
        model = D.wrap(model, t.distributed, info, device)
        opt = make_optimizer(model, recipe, device)
        start_step, prior_seconds = 0, 0.0
        if resume_from is not None:
            state = ckpt_io.load_trainer_state(resume_from)
            D.load_optim_state(model, opt, state["optimizer"], info)
            torch.set_rng_state(state["rng_cpu"])
            start_step, prior_seconds = state["step"], state.get("seconds", 0.0)
            say(f"resuming {out_dir} from step {start_step} ({resume_from.name})")
        mode = _compile_mode(t.cuda_graphs, device.type, int8, info.enabled) if t.compile else None
        if mode == "reduce-overhead":
            say("the compiled step under CUDA graphs (train.cuda_graphs)")
        fwd = torch.compile(model, mode=mode) if t.compile else model
        teacher = _teacher(recipe, teacher_src, config, device, info, say)
        loss_fn = torch.compile(token_loss) if t.compile else token_loss
        alpha, temperature = recipe.distill.alpha, recipe.distill.temperature
        if info.enabled:  # DDP and FSDP keep their wrappers compiled alone (no CUDA graphs there), the loss beside them
            tfwd = torch.compile(teacher) if (teacher is not None and t.compile) else teacher

            def fwd_loss(x, y):
                return training_loss(fwd, tfwd, x, y, alpha, temperature, ce=loss_fn)
        else:
            fwd_loss = _ModelLoss(model, teacher, alpha, temperature)
            fwd_loss = torch.compile(fwd_loss, mode=mode) if t.compile else fwd_loss
        return cls(recipe, out_dir, device, info, data, tok, tok_cfg, config, model, fwd, loss_fn, fwd_loss,
                   teacher is not None, opt, start_step, prior_seconds, bool(int8 and int8_cache),
                   mode == "reduce-overhead")

    @property
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.recipe.train.precision == "bf16")

    def quant_lambda(self, step: int) -> float:
        """Set (during warm-up) and return the quantisation strength the model has at ``step``."""
        q = self.recipe.quant
        lam = quant_lambda_at(q, step)
        if q.warmup_steps:
            set_quant_lambda(D.unwrap(self.model), lam)
        return lam

    def train_step(self, step: int, steps: int) -> dict:
        """One optimiser step (all micro-batches); its lr, weight decay, lambda and loss tensors."""
        t, o, info, device = self.recipe.train, self.recipe.optim, self.info, self.device
        lr, wd = lr_at(o, step, steps), weight_decay_at(o, step, steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.param_groups[0]["weight_decay"] = wd  # group 0 holds the matrices (make_optimizer)
        lam = self.quant_lambda(step)
        step_loss = torch.zeros((), device=device)
        step_parts = torch.zeros(2, device=device)  # cross-entropy, distillation (when distilling)
        if self.int8_refresh:
            int8_linear.refresh(self.model)
        if self.cuda_graphs:
            # Each micro-batch's backward then adds its graph's output into .grad, instead of keeping that output
            # as .grad (what autograd does with a parameter's first gradient), which the next replay overwrites.
            for p in self.model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        for micro in range(t.grad_accum):
            x, y = self.data.train_batch(step, micro, info.rank, info.world, t.batch_size, t.grad_accum)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = micro == t.grad_accum - 1
            # DDP: all-reduce gradients only on the last micro-batch (model is the DDP module; a
            # compiled wrapper around it has no no_sync). FSDP syncs every micro-batch.
            ctx = self.model.no_sync() if (not sync and hasattr(self.model, "no_sync")) else contextlib.nullcontext()
            if self.cuda_graphs:  # a new replay of the model's graphs: the previous one's outputs are consumed
                torch.compiler.cudagraph_mark_step_begin()
            with ctx, self.autocast:
                loss, parts = self.fwd_loss(x, y)
            if parts is not None:
                step_parts += parts / t.grad_accum
            (loss / t.grad_accum).backward()
            step_loss += loss.detach() / t.grad_accum
        if o.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=not self.cuda_graphs)  # under CUDA graphs .grad stays allocated (above)
        return {"lr": lr, "wd": wd, "lam": lam, "loss": step_loss, "parts": step_parts}

    def evaluate(self) -> float:
        """Mean validation cross-entropy over train.eval_batches micro-batches, all ranks together."""
        t, info, device = self.recipe.train, self.info, self.device
        self.fwd.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad(), self.autocast:
            for x, y in self.data.val_batches(t.eval_batches, t.batch_size, info.rank, info.world):
                x, y = x.to(device), y.to(device)
                logits = self.fwd(x)
                total[0] += self.loss_fn(logits, y, reduction="sum").double()
                total[1] += y.numel()
        D.all_reduce_sum(total, info)
        self.fwd.train()
        return (total[0] / total[1]).item()

    def save(self, target: Path, step: int, seconds: float) -> None:
        info = self.info
        model_state = D.full_model_state(self.model, info)
        optim_state = D.full_optim_state(self.model, self.opt, info)
        if info.is_main:
            trainer_state = {"step": step, "optimizer": optim_state, "rng_cpu": torch.get_rng_state(),
                             "seconds": seconds, "world_size": info.world}
            ckpt_io.save_checkpoint(target, model_state, self.config, self.tok, self.tok_cfg, trainer_state,
                                    self.recipe.dump_yaml())
        D.barrier(info)

    def loop(self, steps: int, progress, say) -> TrainResult:
        """Steps start_step..steps with logging, evaluation and checkpoints; then the final save."""
        recipe, t, info, out_dir = self.recipe, self.recipe.train, self.info, self.out_dir
        start_step, prior_seconds = self.start_step, self.prior_seconds
        metrics_path = out_dir / "metrics.jsonl"
        if info.is_main:
            _truncate_metrics(metrics_path, start_step)
            (out_dir / "recipe.yaml").write_text(recipe.dump_yaml())
        tokens_per_step = t.batch_size * t.grad_accum * info.world * t.seq_len
        peak = peak_flops(self.device) if t.precision == "bf16" else None
        fpt = self.config.arch.training_flops_per_token(t.seq_len)
        unigram = self.data.unigram_entropy() if info.is_main else float("nan")
        task = progress.add_task("train", total=steps, completed=start_step, loss=float("nan"), lr=0.0, tps=0.0)
        window_tokens = 0
        last_loss, val_loss = float("nan"), float("nan")
        t_start = time.perf_counter()
        t_window = t_start
        tps = 0.0
        # A logged step's loss is read (a wait for the GPU) only once the next step is queued behind it, so that the
        # GPU does not sit idle while the host logs and prepares that step; evaluations, checkpoints and the last
        # step read it at once.
        pending: dict | None = None

        def read_log(logged: dict) -> None:
            nonlocal last_loss, tps, t_window
            done = logged["step"]
            last_loss = logged["loss"].item()
            now = time.perf_counter()
            tps = logged["tokens"] / max(now - t_window, 1e-9)
            t_window = now
            if not math.isfinite(last_loss):
                raise BitnetError(f"the loss became {last_loss} at step {done}: lower optim.lr or use precision fp32")
            row = {"step": done, "loss": round(last_loss, 5), "lr": logged["lr"], "weight_decay": logged["wd"],
                   "tokens": done * tokens_per_step, "tokens_per_s": round(tps, 1),
                   "elapsed_s": round(prior_seconds + now - t_start, 2)}
            if peak:
                row["mfu"] = round(fpt * tps / (peak * info.world), 4)
            if (memory := peak_memory_gib(self.device)) is not None:
                row["peak_mem_gib"] = memory
            if recipe.quant.warmup_steps:
                row["quant_lambda"] = round(logged["lam"], 6)
            if logged["parts"] is not None:
                parts = logged["parts"].tolist()
                row["ce_loss"], row["distill_loss"] = round(parts[0], 5), round(parts[1], 5)
            _append_metrics(metrics_path, row, info)
            progress.update(task, loss=last_loss, lr=logged["lr"], tps=tps)

        with progress:
            for step in range(start_step, steps):
                s = self.train_step(step, steps)
                done = step + 1
                if pending is not None:
                    read_log(pending)
                    pending = None
                window_tokens += tokens_per_step
                evaluating = done % t.eval_every == 0 or done == steps
                saving = done % t.checkpoint_every == 0 and done != steps
                if done % t.log_every == 0 or done == steps:
                    # Every rank queues its all-reduces at the same steps, in the same order.
                    pending = {"step": done, "loss": D.all_reduce_sum(s["loss"].float().clone(), info) / info.world,
                               "parts": (D.all_reduce_sum(s["parts"].float().clone(), info) / info.world
                                         if self.distilling else None),
                               "lr": s["lr"], "wd": s["wd"], "lam": s["lam"], "tokens": window_tokens}
                    window_tokens = 0
                    if evaluating or saving:
                        read_log(pending)
                        pending = None
                progress.update(task, completed=done)
                if evaluating:
                    self.quant_lambda(done)  # the model as the next step trains it (fully ternary at the end)
                    val_loss = self.evaluate()
                    _append_metrics(metrics_path, {"step": done, "val_loss": round(val_loss, 5)}, info)
                    trained = f"train loss {last_loss:.4f}  " if math.isfinite(last_loss) else ""
                    progress.console.print(f"step {done}: {trained}val loss {val_loss:.4f}") if info.is_main else None
                if saving:
                    self.save(ckpt_io.step_dir(out_dir, done), done, prior_seconds + time.perf_counter() - t_start)
                    if info.is_main:
                        ckpt_io.prune(out_dir, t.keep_last)

        if start_step >= steps:
            self.quant_lambda(steps)
            val_loss = self.evaluate()
        seconds = time.perf_counter() - t_start
        final = out_dir / "final"
        if start_step < steps or not final.exists():
            self.save(final, steps, prior_seconds + seconds)
        if info.is_main:
            if metrics_path.is_file() and not plot_losses(metrics_path, out_dir / "loss.png"):
                say("[yellow]matplotlib is not installed: no loss.png (pip install 'bitnet-cli[train]')[/]")
        run_tokens = (steps - start_step) * tokens_per_step
        avg_tps = run_tokens / seconds if seconds > 0 and run_tokens else tps
        return TrainResult(
            checkpoint=final, out_dir=out_dir, steps=steps, tokens=steps * tokens_per_step,
            train_loss=last_loss, val_loss=val_loss, unigram_entropy=unigram, parameters=self.config.arch.parameters(),
            seconds=round(seconds, 2), tokens_per_second=round(avg_tps, 1),
            mfu=round(fpt * avg_tps / (peak * info.world), 4) if peak else None, start_step=start_step,
            peak_memory_gib=peak_memory_gib(self.device),
        )


def _teacher(recipe: Recipe, teacher_src: Source | None, config: BitNetConfig, device: torch.device,
             info: D.DistInfo, say) -> torch.nn.Module | None:
    """The distillation teacher in eval mode, or None."""
    if teacher_src is None:
        return None
    t, dist = recipe.train, recipe.distill
    # bf16 on GPU (as the teacher was trained to be used); fp32 on CPU, where bf16 matmuls are slow.
    teacher = float_model(teacher_src, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if teacher.config.vocab_size != config.vocab_size:
        raise BitnetError(f"distill.teacher: its vocabulary has {teacher.config.vocab_size} tokens, the "
                          f"model's {config.vocab_size}; distillation compares logits token by token")
    if info.enabled and t.distributed == "fsdp":
        teacher = D.wrap(teacher, "fsdp", info, device)  # sharded like the student; never wrapped in DDP
    say(f"distilling from {teacher_src.where} (alpha {dist.alpha}, temperature {dist.temperature})")
    return teacher


def _append_metrics(path: Path, row: dict, info: D.DistInfo):
    if info.is_main:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int):
    """On resume, drop lines logged after the checkpoint we restart from (they will be redone)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _progress(enabled: bool, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("lr {task.fields[lr]:.2e}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not enabled, transient=False,
    )
