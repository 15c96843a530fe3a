"""HellaSwag examples per second: `bitnet eval` (C engine) vs lm-eval's own `hf` backend.

Both score the same lm-eval requests (the first N HellaSwag validation examples, 4 endings
each, from shared/data) on one ~100M-parameter BitNet model: a random transformers
BitNetForCausalLM (hidden 768, 12 layers, FFN 2048, vocab 32000, byte-level BPE trained on the
Gutenberg books) for `hf`, and the same checkpoint packed for the engine. Only the model's
work is timed (lm-eval's `loglikelihood` call), best of --repeats; results agree per example
(which ending wins) is printed too.

    python benchmarks/eval_hellaswag.py --examples 40 --threads 2 [--hf-batch-size 16] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # transformers' BitNet helpers; compiling costs ~30 s
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BITNET_SHARED_DATA", REPO.parent / "shared" / "data"))
DIMS = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)


def build_model(work: Path) -> tuple[Path, Path]:
    """(checkpoint dir, packed file), made once and reused from `work`."""
    ckpt, packed = work / "ckpt-100m", work / "model-100m.bin"
    if packed.is_file():
        return ckpt, packed
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import BitNetConfig, BitNetForCausalLM

    from bitnet_cli.pack import pack_checkpoint

    ckpt.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=DIMS["vocab_size"], special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with gzip.open(SHARED / "corpus" / "gutenberg_books.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"][:400_000] for _, line in zip(range(24), f)]
    tok.train_from_iterator([t[i : i + 10_000] for t in texts for i in range(0, len(t), 10_000)], trainer)
    tok.save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "tokenizer_class": "PreTrainedTokenizerFast"}))

    torch.manual_seed(0)
    config = BitNetConfig(**DIMS, tie_word_embeddings=True, initializer_range=0.02, bos_token_id=0, eos_token_id=1)
    model = BitNetForCausalLM(config).to(torch.float16)  # fp16: the packed f16 embeddings lose nothing
    model.save_pretrained(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    pack_checkpoint(ckpt, packed)
    return ckpt, packed


def requests(n: int):
    from bitnet_cli.eval.tasks import task_manager

    task = task_manager(SHARED / "eval").load(["hellaswag"])["tasks"]["hellaswag"]
    task.build_all_requests(limit=n, rank=0, world_size=1)
    return task.instances


def timed(lm, instances, repeats: int) -> tuple[float, list]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = lm.loglikelihood(instances, disable_tqdm=True)
        best = min(best, time.perf_counter() - t0)
    return best, out


def picks(instances, scores) -> list[int]:
    """Which ending wins, per example (acc's argmax)."""
    by_doc: dict[int, list] = {}
    for inst, (logprob, _) in zip(instances, scores):
        by_doc.setdefault(inst.doc_id, []).append(logprob)
    return [max(range(len(v)), key=v.__getitem__) for _, v in sorted(by_doc.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bitnet-eval-bench"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from bitnet_cli.eval.adapter import BitNetLM

    torch.set_num_threads(args.threads)
    ckpt, packed = build_model(args.work)
    instances = requests(args.examples)
    engine = BitNetLM(pretrained=str(packed), threads=args.threads)
    hf = HFLM(pretrained=str(ckpt), dtype="float32", device="cpu", batch_size=args.hf_batch_size)
    n_params = sum(p.numel() for p in hf.model.parameters())
    t_engine, s_engine = timed(engine, instances, args.repeats)
    t_hf, s_hf = timed(hf, instances, args.repeats)
    a, b = picks(instances, s_engine), picks(instances, s_hf)
    result = {
        "model_parameters": n_params, "examples": args.examples, "requests": len(instances), "threads": args.threads,
        "engine_examples_per_s": args.examples / t_engine, "hf_examples_per_s": args.examples / t_hf,
        "hf_batch_size": args.hf_batch_size, "speedup": t_hf / t_engine,
        "same_choice_fraction": sum(x == y for x, y in zip(a, b)) / len(a),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{n_params / 1e6:.0f}M-parameter model, {args.examples} HellaSwag examples ({len(instances)} requests), "
          f"{args.threads} threads")
    print(f"  bitnet (C engine): {result['engine_examples_per_s']:.2f} examples/s")
    print(f"  lm-eval hf (batch {args.hf_batch_size}): {result['hf_examples_per_s']:.2f} examples/s")
    print(f"  speedup {result['speedup']:.1f}x; same winning ending on {result['same_choice_fraction']:.0%} of examples")


if __name__ == "__main__":
    main()
