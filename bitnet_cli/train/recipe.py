"""The training recipe: a YAML file validated against a documented schema.

Every field below has a description; ``bitnet train RECIPE --dry-run`` prints the resolved
recipe. Errors name the key and its line in the YAML file (or the ``--set`` that gave it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bitnet_cli.arch import ACTIVATIONS, DIM_LIMITS, FAMILIES, FAMILY_BY_MODEL_TYPE, PRESETS
from bitnet_cli.errors import BitnetError
from bitnet_cli.files import bundled, bundled_recipes, special_kind

BUNDLED_CORPUS = "bundled:tinyshakespeare"

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Bounds of the sizes below: the model's are what the packer and the C engine accept (DIM_LIMITS),
# so that a recipe that validates also packs and runs; the rest keep every product of them
# (tokens per step, total tokens) far inside int64.
_L = DIM_LIMITS
BIG = 1 << 40


class ModelSpec(_Strict):
    preset: Optional[Literal[tuple(PRESETS)]] = Field(  # type: ignore[valid-type]
        None, description=f"A named shape ({', '.join(PRESETS)}: bitnet_cli.arch.PRESETS, shared with "
                          "`bitnet bench --shape`); any field given below overrides it.")
    vocab_size: Optional[int] = Field(
        None, gt=0, le=_L["vocab_size"], description="Vocabulary size; default: the tokenizer's (rounded up to a multiple of 64 "
                                "only if round_vocab_to is set).")
    round_vocab_to: int = Field(1, ge=1, le=1 << 16, description="Pad the vocabulary up to a multiple of this (e.g. 64 "
                                                     "for tensor-core friendly shapes).")
    # qwen2 (q/k/v biases, which start from a checkpoint's) is only reached through init_from
    family: Optional[Literal[tuple(k for k, f in FAMILIES.items() if not f.qkv_bias)]] = Field(  # type: ignore[valid-type]
        None, description="bitnet: BitNet b1.58 (sub-norms, relu2 gate); llama: the Llama-architecture 1.58-bit "
                          "models (no sub-norms, SiLU gate, checkpoints of model_type llama); default: the "
                          "preset's, else bitnet.")
    hidden_act: Optional[Literal[ACTIVATIONS]] = Field(  # type: ignore[valid-type]
        None, description="The FFN gate's activation (relu2 or silu); default: the family's.")
    head_dim: Optional[int] = Field(None, gt=0, le=4096, description="Per-head width; default: hidden_size / "
                                                                     "num_attention_heads (free in the llama family).")
    hidden_size: Optional[int] = Field(None, gt=0, le=_L["hidden_size"], description="Model width.")
    intermediate_size: Optional[int] = Field(None, gt=0, le=_L["intermediate_size"], description="FFN width.")
    num_hidden_layers: Optional[int] = Field(None, gt=0, le=_L["num_hidden_layers"], description="Decoder layers.")
    num_attention_heads: Optional[int] = Field(None, gt=0, le=_L["num_attention_heads"], description="Query heads.")
    num_key_value_heads: Optional[int] = Field(None, gt=0, le=_L["num_key_value_heads"], description="Key/value heads (GQA); default: "
                                                                       "num_attention_heads.")
    max_position_embeddings: Optional[int] = Field(None, gt=0, le=_L["max_position_embeddings"], description="Longest context; default: "
                                                                           "train.seq_len.")
    rope_theta: Optional[float] = Field(None, gt=0, description="RoPE base frequency; default: the preset's, "
                                                                "else 10000.")
    rms_norm_eps: Optional[float] = Field(None, gt=0, description="RMSNorm epsilon; default: the preset's, else 1e-5.")
    initializer_range: float = Field(0.02, gt=0, description="Std of the normal init of linears and embeddings.")
    tie_word_embeddings: Optional[bool] = Field(None, description="Share the input embedding with lm_head; "
                                                                  "default: the preset's, else true.")
    quant: Literal["bitnet", "none"] = Field(
        "bitnet", description="bitnet: ternary weights + int8 activations (b1.58); none: the same "
                              "architecture in full precision (the baseline).")
    init_from: Optional[str] = Field(
        None, description="Start from a trained full-precision model instead of a random init (conversion "
        "to ternary): a checkpoint directory (a Hugging Face Llama, Qwen2, Qwen3 or BitNet model, sharded or "
        "not, or one of our runs: its directory or its final/), or a Hugging Face hub id. Shape, RoPE, "
        "vocabulary and tokenizer come from it, so no shape key may be set; see docs/CONVERT.md for what is "
        "accepted.")
    insert_subln: bool = Field(
        False, description="With init_from: add BitNet b1.58's two sub-norms (before o_proj and down_proj), "
        "weights initialised to ones, as BitDistill does; the result is a BitNet b1.58 model. Without it the "
        "source family is kept and only its projections become ternary.")

    def resolved(self) -> dict[str, Any]:
        """Defaults, then the preset's fields, then the explicit fields (explicit wins)."""
        out = {"rope_theta": 10000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
        if self.preset:
            fields = dict(PRESETS[self.preset].fields)
            out["family"] = FAMILY_BY_MODEL_TYPE[fields.pop("model_type", "bitnet")]
            out.update(fields)
        for k, v in self.model_dump(exclude={"preset", "round_vocab_to", "init_from", "insert_subln"}).items():
            if v is not None:
                out[k] = v
        return out

    @model_validator(mode="after")
    def _init_from_owns_the_shape(self):
        if self.init_from is None:
            if self.insert_subln:
                raise ValueError("insert_subln needs init_from (a from-scratch BitNet model has its sub-norms)")
            return self
        given = [k for k in ("preset", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                             "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                             "rope_theta", "tie_word_embeddings", "family", "hidden_act", "head_dim")
                 if getattr(self, k) is not None]
        if given:
            raise ValueError(f"with init_from the shape comes from the checkpoint; remove {', '.join(given)}")
        return self


class QuantSpec(_Strict):
    warmup_steps: int = Field(0, ge=0, le=BIG, description=(
        "Quantisation warm-up (converting a float model): over the first N steps weights and activations are "
        "v + lambda * (q(v) - v), lambda rising from 0 (float) to 1 (ternary) by warmup_schedule; 0: ternary "
        "from the first step. lambda is logged in metrics.jsonl and drawn in loss.png."))
    warmup_schedule: Literal["linear", "sigmoid", "exponential"] = Field("linear", description=(
        "lambda at p = step / warmup_steps: linear p; sigmoid (1/(1+e^(-k(p-1/2))) rescaled to run from 0 to 1); "
        "exponential (e^(kp) - 1) / (e^k - 1). The Hugging Face 1.58-bit write-up compared these three."))
    warmup_k: float = Field(8.0, gt=0, le=100, description="Steepness k of the sigmoid and exponential schedules.")


class DistillSpec(_Strict):
    alpha: float = Field(0.0, ge=0, le=1, description=(
        "Knowledge distillation from a float teacher: loss = (1 - alpha) * cross-entropy + alpha * T^2 * "
        "KL(teacher || student) on the logits at temperature T. 0: off."))
    teacher: Optional[str] = Field(None, description="The teacher checkpoint (same forms as model.init_from); "
                                                     "default: model.init_from.")
    temperature: float = Field(1.0, gt=0, le=100, description="Softmax temperature T of the distillation KL.")


class TokenizerSpec(_Strict):
    path: Optional[str] = Field(None, description="An existing tokenizer.json, or a directory holding one "
                                                  "(an HF model dir). If unset, a byte-level BPE is trained.")
    vocab_size: int = Field(1024, ge=300, le=_L["vocab_size"], description="Size of the byte-level BPE to train (256 bytes + merges "
                                                      "+ 2 special tokens).")
    train_chars: int = Field(5_000_000, gt=0, le=BIG, description="Train the BPE on at most this many characters "
                                                          "from the start of the corpus.")


class DataSpec(_Strict):
    files: list[str] = Field([BUNDLED_CORPUS], min_length=1, description=(
        "Text files or globs (.txt, or .jsonl/.jsonl.gz with a 'text' field per line), relative to the "
        "recipe file. 'bundled:tinyshakespeare' is the corpus shipped with bitnet-cli."))
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="The last fraction of the token stream held "
                                                                "out for validation.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer to train or load.")
    cache_dir: Optional[str] = Field(None, description="Where token memmaps are cached (by content hash); "
                                                       "default bitnet_cli.files.cache_root(): $BITNET_CACHE, else "
                                                       "$XDG_CACHE_HOME/bitnet-cli or ~/.cache/bitnet-cli.")


class OptimSpec(_Strict):
    lr: float = Field(1.5e-3, gt=0, description="Peak learning rate (stage one of two_stage).")
    lr_stage2: Optional[float] = Field(None, gt=0, description="two_stage: peak learning rate of stage two "
                                                               "(default 2/3 of lr).")
    schedule: Literal["two_stage", "cosine", "constant"] = Field(
        "two_stage", description="two_stage (BitNet b1.58): linear warm-up, then linear decay to "
        "min_lr_ratio whose peak drops from lr to lr_stage2 at stage_split of the run, and weight decay "
        "turns off in stage two; cosine: warm-up then cosine to min_lr_ratio * lr; constant: warm-up then flat.")
    stage_split: float = Field(0.5, gt=0, lt=1, description="two_stage: fraction of the steps in stage one.")
    warmup_steps: int = Field(100, ge=0, le=BIG, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (stage one; matrices only, not "
                                                       "norms or embeddings).")
    weight_decay_stage2: float = Field(0.0, ge=0, description="two_stage: weight decay in stage two.")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="Clip the global gradient norm to this; null: off.")


class TrainSpec(_Strict):
    batch_size: int = Field(16, gt=0, le=1 << 20, description="Sequences per micro-batch, per process.")
    grad_accum: int = Field(1, gt=0, le=1 << 20, description="Micro-batches accumulated per optimiser step.")
    seq_len: int = Field(256, gt=1, le=_L["max_position_embeddings"], description="Tokens per training sequence.")
    steps: Optional[int] = Field(None, gt=0, le=BIG, description="Optimiser steps; exactly one of steps and tokens.")
    tokens: Optional[float] = Field(None, gt=0, le=1e18, description="Token budget: steps = tokens / (global batch x "
                                                            "seq_len), rounded up.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32, or bf16 autocast (fp32 master "
                                                                   "weights and optimiser state).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available, else cpu.")
    compile: bool = Field(False, description="torch.compile the model (fuses the quantisation; GPU).")
    threads: Optional[int] = Field(None, gt=0, le=4096, description="CPU threads for torch (default: torch's).")
    eval_every: int = Field(100, gt=0, le=BIG, description="Evaluate on the validation split every N steps (and at the end).")
    eval_batches: int = Field(8, gt=0, le=1 << 20, description="Validation micro-batches per evaluation.")
    log_every: int = Field(10, gt=0, le=BIG, description="Write a metrics.jsonl line every N steps.")
    checkpoint_every: int = Field(500, gt=0, le=BIG, description="Save a resumable checkpoint every N steps.")
    keep_last: int = Field(2, gt=0, le=1 << 20, description="Keep this many step checkpoints (the final one is kept apart).")
    int8_matmul: Literal["auto", "on", "off"] = Field(
        "auto", description="BitLinear products on int8 tensor cores (Triton kernels; ternary weights x int8 "
        "activations, scales in the epilogue). on: use them (CUDA GPU of compute capability 8.0+ with triton; "
        "on a CPU, the kernels' pure-torch emulation: for testing, slower); off: the plain fake-quantised "
        "products; auto: on for Hopper GPUs (compute capability 9.x, one GPU or DDP), where it was measured "
        "faster and training to the plain path's loss (benchmarks/RESULTS.md, session 18), off elsewhere. "
        "Only for model.quant bitnet.")
    int8_grad_input: bool = Field(True, description="With int8_matmul: the input gradient through the "
                                                    "ternary weight in int8 too (output gradient quantised "
                                                    "per token); false: in the compute dtype.")
    int8_grad_weight: Literal["on", "off"] = Field(
        "off", description="With int8_matmul: the weight gradient on int8 tensor cores too (the output gradient "
        "divided by the activations' per-token scale, rounded per 128 tokens and per column; exact int32 products "
        "with the forward's int8 activations); off: in the compute dtype. Off by default: on an H200 it made the "
        "steps slower (700m: 0.684 s against 0.583) and trains within 0.01 of the plain path's loss "
        "(benchmarks/RESULTS.md, session 18).")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="With compile on one CUDA GPU: the compiled step under CUDA graphs (torch.compile's "
        "reduce-overhead mode), which takes the host's launches out of each step and costs memory for the graphs' "
        "pools. auto: on where the int8 matmuls run (their many small kernels leave the step partly host-bound: on "
        "four H100s small.yaml's int8 step took 0.227-0.261 s without graphs and 0.233-0.237 s under them, "
        "benchmarks/RESULTS.md sessions 27-28), off elsewhere (the bf16 step took as long with graphs as without them, "
        "0.2438 s against 0.2439-0.2445 on an H100, session 34); on: whenever compile runs on one CUDA GPU; off: "
        "never. Not under torchrun.")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="Under torchrun: DistributedDataParallel, "
                                                                   "or FSDP (fully_shard) for large shapes.")

    @field_validator("int8_matmul", "int8_grad_weight", "cuda_graphs", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        # YAML 1.1 reads a bare on/off as a boolean.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _steps_or_tokens(self):
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of train.steps and train.tokens")
        return self


class Recipe(_Strict):
    name: str = Field("run", description="Run name; the default output directory is runs/<name>.")
    out_dir: Optional[str] = Field(None, description="Output directory (checkpoints, metrics.jsonl, loss.png); "
                                                     "default runs/<name>, relative to the working directory.")
    seed: int = Field(1337, ge=0, lt=1 << 63, description="Seeds the init and the batch order (batches depend only on seed and step).")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The model shape.")
    data: DataSpec = Field(default_factory=DataSpec, description="Corpus, split and tokenizer.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="AdamW and the schedule.")
    quant: QuantSpec = Field(default_factory=QuantSpec, description="Quantisation warm-up (float-to-ternary).")
    distill: DistillSpec = Field(default_factory=DistillSpec, description="Distillation from a float teacher.")
    train: TrainSpec = Field(description="Batch, length, budget, precision, device, evaluation, checkpoints.")
    # Directory the recipe's relative paths are resolved against (not a YAML key).
    base_dir: Path = Field(Path("."), exclude=True, description="internal")

    @model_validator(mode="after")
    def _conversion_needs_a_source(self):
        if self.distill.alpha > 0 and self.distill.teacher is None and self.model.init_from is None:
            raise ValueError("distill.alpha > 0 needs distill.teacher or model.init_from (the default teacher)")
        if self.model.init_from is not None and self.data.tokenizer.path is not None:
            raise ValueError("with model.init_from the tokenizer is the source's; remove data.tokenizer.path")
        if self.quant.warmup_steps and self.model.quant != "bitnet":
            raise ValueError("quant.warmup_steps needs model.quant: bitnet (there is nothing to warm up)")
        return self

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading


MAX_RECIPE_BYTES = 1_000_000  # a recipe is a page of settings; this bounds the parser's work
MAX_YAML_DEPTH = 32  # the schema nests 3 deep; far below Python's recursion limit
MAX_YAML_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases and bounds nesting depth and node count.

    Aliases (``*name``) are what billion-laughs documents and self-referencing anchors are made
    of; a recipe has no use for them. The depth bound turns 1,000-deep nesting into a clear error
    instead of a RecursionError in the recursive composer.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"YAML aliases (*{event.anchor}) are not allowed in a "
                                              "recipe; write the value out", event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_NODES:,} values",
                                              self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(text: str, where: str):
    """(value, line map) of a YAML document, bounded (see _BoundedLoader); BitnetError names the line.

    The line map takes (key path) -> 1-based line of that key; it walks the composed node tree
    once, which has no shared nodes since aliases are refused.
    """
    if len(text) > MAX_RECIPE_BYTES:
        raise BitnetError(f"{where}: {len(text):,} characters; at most {MAX_RECIPE_BYTES:,}")
    try:
        loader = _BoundedLoader(text)  # the reader checks the characters here
    except yaml.reader.ReaderError as e:
        raise BitnetError(f"{where}: invalid YAML (character U+{e.character:04X} at position {e.position} is not "
                          "allowed)") from None
    try:
        node = loader.get_single_node()
        value = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise BitnetError(f"{where}:{at} invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except (ValueError, OverflowError, RecursionError) as e:  # e.g. a timestamp or number that does not fit
        raise BitnetError(f"{where}: invalid YAML value ({e})") from None
    finally:
        loader.dispose()
    lines: dict[tuple[str, ...], int] = {}
    stack = [(node, ())] if node is not None else []
    while stack:
        n, path = stack.pop()
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                p = path + (str(k.value),)
                lines[p] = k.start_mark.line + 1
                stack.append((v, p))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[path + (str(i),)] = v.start_mark.line + 1
                stack.append((v, path + (str(i),)))
    return value, lines


def _apply_override(data: dict, override: str) -> tuple[str, ...]:
    from bitnet_cli.tokenizer import bad_text, shown_text

    why = bad_text(override)  # argv bytes that are not UTF-8 arrive as lone surrogates: no key or value holds them
    if why:  # the bytes as given, \xff for each one that is not UTF-8
        raise BitnetError(f"overrides '{shown_text(override, 'backslashreplace')}': {why}", param="overrides")
    if "=" not in override:
        raise BitnetError(f"overrides {override!r}: expected KEY=VALUE, e.g. optim.lr=1e-3", param="overrides")
    key, raw = override.split("=", 1)
    path = tuple(p for p in key.strip().split("."))
    if not all(path):
        raise BitnetError(f"overrides {override!r}: empty key component", param="overrides")
    try:
        value = parse_yaml(raw, f"overrides {key}")[0] if raw.strip() else None
    except BitnetError:
        value = raw  # not YAML: the text itself (the schema then says what it should be)
    node = data
    for p in path[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise BitnetError(f"overrides {key}: {p} is not a section", param="overrides")
        node = node.setdefault(p, {})
    node[path[-1]] = value
    return path


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or the name of a recipe shipped with bitnet-cli (``tiny``, ``small``, ...)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.is_dir():
        raise BitnetError(f"{p}: is a directory (give a recipe .yaml file)")
    kind = special_kind(p)
    if kind:  # reading a pipe would wait for a writer forever
        raise BitnetError(f"{p}: is {kind}, not a recipe file")
    if os.path.lexists(p):  # there, but stat fails: a symlink loop, a dangling link, no permission on the way
        try:
            os.stat(p)
        except OSError as e:
            raise BitnetError(f"{p}: cannot read ({e.strerror or e})") from None
    shipped = bundled("recipes", f"{p.name}.yaml")
    if len(p.parts) == 1 and shipped.is_file():  # names like bitnet-b1.58-700m have a dot: no suffix test
        return shipped
    raise BitnetError(f"{p}: recipe file not found (or give a bundled name: {', '.join(bundled_recipes())})")


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict | None = None) -> Recipe:
    """Read and validate a recipe (a YAML file, or a dict), with ``a.b=value`` overrides applied.

    Raises BitnetError naming the key and its line for an unknown key or a wrong type.
    """
    where = "recipe"
    lines: dict[tuple[str, ...], int] = {}
    base_dir = Path(".")
    if path is not None:
        p = find_recipe(path)
        try:
            with open(p, "rb") as f:
                raw = f.read(MAX_RECIPE_BYTES + 1)
            if len(raw) > MAX_RECIPE_BYTES:
                raise BitnetError(f"{p}: more than {MAX_RECIPE_BYTES:,} bytes; a recipe is a page of settings")
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BitnetError(f"{p}: not a YAML text file (not UTF-8: {e.reason} at byte {e.start})") from None
        except OSError as e:
            raise BitnetError(f"{p}: cannot read ({e.strerror or e})") from None
        data, lines = parse_yaml(text, str(p))
        where = str(p)
        base_dir = p.resolve().parent
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BitnetError(f"{where}: the top level must be a mapping of sections")
    data = dict(data)
    from_set: dict[tuple[str, ...], str] = {}
    for ov in overrides:
        from_set[_apply_override(data, ov)] = ov
    try:
        recipe = Recipe.model_validate({**data, "base_dir": base_dir})
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = tuple(str(x) for x in err["loc"])
            key = ".".join(loc) or "(top level)"
            origin = next((f"overrides {from_set[loc[:i]]}" for i in range(len(loc), 0, -1) if loc[:i] in from_set),
                          None)
            if origin is None:
                line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
                origin = f"{where}:{line}" if line else where
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] == "missing":
                msg = "required key is missing"
            msgs.append(f"{origin}: {key}: {msg}")
        raise BitnetError("invalid recipe\n  " + "\n  ".join(msgs), param="overrides") from None
    return recipe
