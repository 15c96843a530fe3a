"""`bitnet eval`: the lm-eval adapter against lm-eval's own `hf` backend, packed vs checkpoint.

The model is a small random transformers BitNetForCausalLM saved in fp16 (so packing its f16
embeddings loses nothing); the data are the real ARC/HellaSwag/MMLU files under shared/data.
Accuracy is near chance, which is fine: the tests are about agreement, not skill.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from conftest import make_hf_checkpoint  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def eval_data(shared_data):
    return shared_data / "eval"


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory, test_tokenizer_dir):
    """(checkpoint dir, packed file) of one small model."""
    from bitnet_cli.pack import pack_checkpoint

    root = tmp_path_factory.mktemp("eval_model")
    ckpt = make_hf_checkpoint(root / "ckpt", test_tokenizer_dir, max_position_embeddings=512, torch_dtype="float16")
    packed = root / "model.bin"
    pack_checkpoint(ckpt, packed)
    return ckpt, packed


@pytest.fixture(scope="module")
def hf_lm(eval_model):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(eval_model[0]), dtype="float32", device="cpu", batch_size=16)


def _bitnet_lm(path, **kw):
    from bitnet_cli.eval.adapter import BitNetLM

    return BitNetLM(pretrained=str(path), threads=1, **kw)


def _run(lm, tasks, limit, data_dir):
    from bitnet_cli.eval.tasks import task_manager

    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, limit=limit, log_samples=True, task_manager=task_manager(data_dir)
    )


def _per_example(results, task):
    """[(logprob, is_greedy)] of every choice of every example, in document order."""
    return [r for s in results["samples"][task] for r in s["filtered_resps"]]


def _compare(ours, reference, tasks, logprob_tol, acc_tol=0.005):
    for task in tasks:
        mine, ref = _per_example(ours, task), _per_example(reference, task)
        assert len(mine) == len(ref) > 0
        diff = np.abs(np.array([m[0] for m in mine]) - np.array([r[0] for r in ref]))
        logprob_tol(task, diff)
        for metric in ("acc,none", "acc_norm,none"):
            if metric in reference["results"][task]:
                a, b = ours["results"][task][metric], reference["results"][task][metric]
                assert abs(a - b) <= acc_tol, f"{task} {metric}: {a} vs {b}"


def _within_1e3(task, diff):
    # Same fp32 torch ops as transformers, but not the same GEMM shapes (batches are grouped
    # differently), and a 1-ulp difference can flip one int8 activation rounding: rare, and then
    # worth ~0.01 on this toy model. Everything else agrees to ~1e-6.
    assert np.mean(diff < 1e-3) >= 0.95 and diff.max() < 0.1, f"{task}: {np.mean(diff < 1e-3):.1%} within 1e-3, max {diff.max():.2e}"


def _engine_tolerance(task, diff):
    # The C engine rounds activations to int8 like torch does, but its fp32 sums run in another
    # order: a 1-ulp difference can flip one rounding, which on this 96-wide toy model moves a
    # log-likelihood by ~0.01-0.1. A wrong cache offset or tokenisation would move it by units.
    assert np.median(diff) < 0.02 and diff.max() < 0.5, f"{task}: median {np.median(diff):.3f} max {diff.max():.3f}"


# ---------------------------------------------------------------- agreement


def test_checkpoint_matches_lm_eval_hf_backend(eval_model, hf_lm, eval_data):
    tasks = ["arc_easy", "mmlu_anatomy"]
    ours = _run(_bitnet_lm(eval_model[0], batch_size=16), tasks, 25, eval_data)
    ref = _run(hf_lm, tasks, 25, eval_data)
    _compare(ours, ref, tasks, _within_1e3)
    greedy = [m[1] == r[1] for t in tasks for m, r in zip(_per_example(ours, t), _per_example(ref, t))]
    assert all(greedy)


def test_packed_matches_checkpoint(eval_model, eval_data):
    tasks = ["arc_easy", "mmlu_anatomy"]
    engine = _bitnet_lm(eval_model[1])
    assert engine.backend.name == "engine"
    _compare(_run(engine, tasks, 25, eval_data), _run(_bitnet_lm(eval_model[0]), tasks, 25, eval_data),
             tasks, _engine_tolerance)


def test_engine_scores_continuations_that_only_fit_the_context_one_by_one(eval_model):
    from bitnet_cli.eval.backends import EngineBackend

    context, conts = [5, 6, 7, 8, 9, 10], [[11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21]]
    small = EngineBackend(eval_model[1], threads=1, ctx_size=10)  # room for 4 more tokens at a time
    got = small.continuation_logits([(context, conts)])[0]
    eng = small.engine
    first = eng.forward(context)[-1:]
    for cont, logits in zip(conts, got):
        want = np.vstack([first, eng.forward(cont[:-1], n_past=len(context))]) if len(cont) > 1 else first
        np.testing.assert_allclose(logits, want, atol=1e-5)


@pytest.mark.slow
def test_correctness_bar_200_examples(eval_model, hf_lm, eval_data):
    """The issue's bar: >= 200 examples each of ARC-Easy, HellaSwag and three MMLU subjects."""
    tasks = ["arc_easy", "hellaswag", "mmlu_high_school_psychology", "mmlu_elementary_mathematics",
             "mmlu_miscellaneous"]
    ref = _run(hf_lm, tasks, 200, eval_data)
    checkpoint = _run(_bitnet_lm(eval_model[0], batch_size=16), tasks, 200, eval_data)
    _compare(checkpoint, ref, tasks, _within_1e3)
    _compare(_run(_bitnet_lm(eval_model[1]), tasks, 200, eval_data), checkpoint, tasks, _engine_tolerance)
    assert all(len(ref["samples"][t]) == 200 for t in tasks)


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_rolling_loglikelihood_matches_hf(eval_model, shakespeare):
    """Perplexity-style scoring over several context windows (max_length 64, texts of ~150 tokens)."""
    from lm_eval.models.huggingface import HFLM

    text = shakespeare.read_text(encoding="utf-8")
    docs = [(text[i : i + 400],) for i in (0, 5000, 9000)]
    ref = HFLM(pretrained=str(eval_model[0]), dtype="float32", device="cpu", batch_size=4, max_length=64)
    expected = ref.loglikelihood_rolling(_instances("loglikelihood_rolling", docs))
    mine = _bitnet_lm(eval_model[0], max_length=64).loglikelihood_rolling(_instances("loglikelihood_rolling", docs))
    np.testing.assert_allclose(mine, expected, atol=1e-3)
    packed = _bitnet_lm(eval_model[1], max_length=64).loglikelihood_rolling(_instances("loglikelihood_rolling", docs))
    np.testing.assert_allclose(packed, expected, rtol=0.01)


def test_long_contexts_are_cut_from_the_left_like_hf_and_long_continuations_refused(eval_model, shakespeare):
    """max_length 32: a context far longer than the window is cut from the left exactly as lm-eval's hf
    backend cuts it; a continuation alone longer than the window is refused for itself only."""
    from lm_eval.models.huggingface import HFLM

    text = shakespeare.read_text(encoding="utf-8")
    fits = [(text[:600], " the king"), (text[1000:1400], " and"), ("ROMEO:", " O")]
    ref = HFLM(pretrained=str(eval_model[0]), dtype="float32", device="cpu", batch_size=4, max_length=32)
    expected = ref.loglikelihood(_instances("loglikelihood", fits))
    too_long = ("Speak:", text[2000:2400])  # ~100+ tokens of continuation
    for path, tol in ((eval_model[0], 1e-3), (eval_model[1], 0.05)):
        lm = _bitnet_lm(path, max_length=32)
        got = lm.loglikelihood(_instances("loglikelihood", [fits[0], too_long, *fits[1:]]))
        assert got[1] == (float("-inf"), False) and lm.refused == 1 and lm.longest_refused > 32
        np.testing.assert_allclose([g[0] for g in got[:1] + got[2:]], [e[0] for e in expected], rtol=tol, atol=tol)


def test_generate_until_matches_hf_greedy(eval_model, hf_lm):
    prompts = [("First Citizen:\nBefore we proceed", {"until": ["\n"], "max_gen_toks": 24, "do_sample": False}),
               ("ROMEO:", {"until": ["e"], "max_gen_toks": 16})]
    expected = hf_lm.generate_until(_instances("generate_until", prompts))
    assert _bitnet_lm(eval_model[0]).generate_until(_instances("generate_until", prompts)) == expected
    packed = _bitnet_lm(eval_model[1]).generate_until(_instances("generate_until", prompts))
    assert [len(t) > 0 for t in packed] == [len(t) > 0 for t in expected]
    assert all("\n" not in t for t in packed) and "e" not in packed[1]


def test_encode_pair_moves_trailing_space_like_hflm(eval_model, hf_lm):
    lm = _bitnet_lm(eval_model[1])
    for context, continuation in [("Question: 2+2?\nAnswer: ", "4"), ("The cat", " sat on the mat"), ("a  ", "b")]:
        assert lm._encode_pair(context, continuation) == hf_lm._encode_pair(context, continuation)
    assert lm.prefix_token_id == hf_lm.prefix_token_id and lm.eot_token_id == hf_lm.eot_token_id


# ---------------------------------------------------------------- local task data


def test_local_data_loads_lm_eval_task_definitions(eval_data):
    from bitnet_cli.eval.tasks import task_manager

    loaded = task_manager(eval_data).load(["arc_challenge", "mmlu_anatomy", "hellaswag"])["tasks"]
    arc, anatomy, hellaswag = loaded["arc_challenge"], loaded["mmlu_anatomy"], loaded["hellaswag"]
    assert len(arc.test_docs()) == 1172
    assert len(anatomy.test_docs()) == 135 and {d["subject"] for d in anatomy.test_docs()} == {"anatomy"}
    assert len(anatomy.fewshot_docs()) == 5  # the subject's own dev examples
    doc = hellaswag.validation_docs()[0]
    assert "[" not in doc["query"] and len(doc["choices"]) == 4  # lm-eval's own process_docs ran
    assert hellaswag.doc_to_text(doc) == doc["query"]


def test_wikitext_from_local_raw_files(shared_data):
    from bitnet_cli.eval.tasks import task_manager
    from bitnet_cli.eval.wikitext import wikitext_pages

    pages = wikitext_pages((shared_data / "corpus" / "wikitext-2-raw" / "test.txt").read_text(encoding="utf-8"))
    assert len(pages) == 62 and pages[0].startswith(" = Robert Boulter = ")
    task = task_manager(shared_data / "eval").load(["wikitext"])["tasks"]["wikitext"]  # finds ../corpus
    assert len(task.test_docs()) == 62 and len(task.validation_docs()) == 60


def test_wikitext_scoring_needs_no_lm_eval():
    """The GPU machine has no lm-eval: convert_fp.py scores WikiText through these imports alone."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from bitnet_cli.eval.wikitext import wikitext_detokenizer, wikitext_pages\n"
            "from bitnet_cli.train.data import TokenData\n"
            "assert wikitext_detokenizer('a @-@ b , c') == 'a-b, c'\n"
            "assert len(wikitext_pages(' = A = \\nx\\n = B = \\ny')) == 2")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_split_file_names_the_path(tmp_path, eval_data):
    from bitnet_cli.errors import BitnetError
    from bitnet_cli.eval.tasks import task_manager

    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "train.jsonl").write_bytes((eval_data / "arc_easy" / "train.jsonl").read_bytes())
    with pytest.raises(BitnetError, match=r"arc_easy/test\.jsonl"):
        task_manager(tmp_path).load(["arc_easy"])


# ---------------------------------------------------------------- the command


def _cli(*args):
    from typer.testing import CliRunner

    from bitnet_cli.cli import app

    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_cli_table_and_atomic_results_json(eval_model, eval_data, tmp_path):
    out = tmp_path / "results.json"
    r = _cli(eval_model[1], "--tasks", "arc_easy", "--limit", 8, "--threads", 1, "--data-dir", eval_data,
             "--output", out, "--log-samples")
    assert r.exit_code == 0, r.output
    assert "arc_easy" in r.output and "acc_norm" in r.output
    results = json.loads(out.read_text())
    assert results["config"]["model_args"]["backend"] == "engine"
    assert len(results["samples"]["arc_easy"]) == 8
    assert 0 <= results["results"]["arc_easy"]["acc,none"] <= 1
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_cli_json_output_from_env_data_dir(eval_model, eval_data, monkeypatch):
    monkeypatch.setenv("BITNET_EVAL_DATA", str(eval_data))
    r = _cli(eval_model[1], "--tasks", "mmlu_anatomy", "--limit", 4, "--threads", 1, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"]["mmlu_anatomy"]["acc,none"] >= 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "arc_eazy"], "did you mean: arc_easy"),
        (["--tasks", "hellaswag", "--data-dir", "{tmp}"], "hellaswag/validation.jsonl"),
        (["--tasks", "arc_easy", "--data-dir", "{tmp}/nowhere"], "no such directory"),
        (["--tasks", "arc_easy", "--num-fewshot", "-1"], "--num-fewshot -1"),
        (["--tasks", "arc_easy", "--kv-cache", "f8"], "--kv-cache must be one of f32, f16, got 'f8'"),
    ],
)
def test_cli_bad_input(eval_model, eval_data, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = _cli(eval_model[1], "--data-dir", eval_data, *args) if "--data-dir" not in args else _cli(eval_model[1], *args)
    assert r.exit_code == 1, r.output
    assert message.replace(" ", "") in "".join(r.output.split()) and "Traceback" not in r.output  # rich wraps


def test_cli_kv_cache_reaches_the_engine_and_not_torch(eval_model, eval_data):
    r = _cli(eval_model[1], "--tasks", "arc_easy", "--limit", 4, "--threads", 1, "--data-dir", eval_data,
             "--kv-cache", "f16", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config"]["model_args"]["kv_cache"] == "f16"
    r = _cli(eval_model[0], "--tasks", "arc_easy", "--data-dir", eval_data, "--kv-cache", "f16")
    assert r.exit_code == 1 and "--kv-cache f16 is for packed models" in " ".join(r.output.split())


def test_cli_ctx_size_is_the_task_window(eval_model, eval_data):
    """--ctx-size sets the window lm-eval's requests are fitted to (it was always the model's, 512 here)."""
    r = _cli(eval_model[1], "--tasks", "arc_easy", "--limit", 2, "-t", 1, "--data-dir", eval_data, "-c", 128, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config"]["refused_requests"]["context_window"] == 128
    r = _cli(eval_model[1], "--tasks", "arc_easy", "--data-dir", eval_data, "--ctx-size", 0)
    assert r.exit_code == 1 and "--ctx-size 0: must be 1 or more" in " ".join(r.output.split()), r.output


def test_cli_missing_model(tmp_path, eval_data):
    r = _cli(tmp_path / "nope.bin", "--tasks", "arc_easy", "--data-dir", eval_data)
    assert r.exit_code == 1 and "nope.bin" in r.output and "Traceback" not in r.output
