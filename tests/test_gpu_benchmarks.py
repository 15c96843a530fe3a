"""The GPU benchmarks' own logic, on the CPU: benchmarks/train_gpu.py's variant switches (``int8+NAME`` / ``int8-NAME``
run int8 with BITNET_INT8_NAME=1 / 0 for that run alone) and the fp8 weight-gradient curve experiment."""

import os

import pytest

from conftest import load_benchmark


def test_a_variant_names_its_switches():
    train_gpu = load_benchmark("train_gpu")
    assert train_gpu.variant_switches("none") == ("none", {})
    assert train_gpu.variant_switches("int8+ROPE_ROWS-GATED_GRAD") == (
        "int8", {"BITNET_INT8_ROPE_ROWS": "1", "BITNET_INT8_GATED_GRAD": "0"})
    assert train_gpu.variant_switches("int8+ROPE_ROWS@reduce-overhead") == (
        "int8", {"BITNET_INT8_ROPE_ROWS": "1", "BITNET_COMPILE_MODE": "reduce-overhead"})
    assert train_gpu.variant_switches("none@default") == ("none", {"BITNET_COMPILE_MODE": "default"})


@pytest.mark.parametrize("spec", ["int9", "int8+rope", "int8+", "int8 +X", "+X", "int8@fast", "int8@", "int8@default+X"])
def test_a_misspelt_variant_is_one_error_line(spec):
    train_gpu = load_benchmark("train_gpu")
    with pytest.raises(SystemExit, match=r"^error: variant"):
        train_gpu.variant_switches(spec)


def test_the_switches_hold_for_their_run_alone(monkeypatch, tmp_path):
    import bitnet_cli.train as train_package

    train_gpu = load_benchmark("train_gpu")
    monkeypatch.setenv("BITNET_INT8_GATED_GRAD", "1")
    monkeypatch.delenv("BITNET_INT8_RESIDUAL_ROWS", raising=False)
    seen = {}

    def train(recipe, out_dir, progress):  # the trainer as the run calls it: record the switches, then fail
        seen.update({k: os.environ.get(k) for k in ("BITNET_INT8_GATED_GRAD", "BITNET_INT8_RESIDUAL_ROWS")})
        raise RuntimeError("stop here")

    monkeypatch.setattr(train_package, "train", train)
    import torch

    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    with pytest.raises(RuntimeError, match="stop here"):
        train_gpu.run(train_gpu.REPO / "recipes" / "tiny.yaml", "int8+RESIDUAL_ROWS-GATED_GRAD", False, 4,
                      ["train.device=cpu"], run_dir=str(tmp_path))
    assert seen == {"BITNET_INT8_GATED_GRAD": "0", "BITNET_INT8_RESIDUAL_ROWS": "1"}
    assert resets == [1]  # the run compiles afresh: a switch read while tracing is no guard of a cached graph
    assert os.environ["BITNET_INT8_GATED_GRAD"] == "1" and "BITNET_INT8_RESIDUAL_ROWS" not in os.environ
    from bitnet_cli.train import int8_linear

    assert int8_linear.enable.__name__ == "enable"  # the wrapper that notes the chosen switches is gone again


def test_the_fp8_curve_experiment_trains_with_the_switch_and_restores_it(monkeypatch, tmp_path):
    """fp8_grad_weight_curve.run("fp8") trains with $BITNET_INT8_FP8_GRAD_WEIGHT=1 (one fp8 product per stacked
    product and step) and leaves the variable as it found it; "plain" makes none."""
    from bitnet_cli.train import int8_linear

    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BITNET_INT8_FP8_GRAD_WEIGHT", raising=False)
    curve = load_benchmark("fp8_grad_weight_curve")
    calls = []
    fp8 = int8_linear.fp8_grad_weight
    monkeypatch.setattr(int8_linear, "fp8_grad_weight", lambda *a, **kw: calls.append(1) or fp8(*a, **kw))
    small = ["train.batch_size=2", "train.seq_len=32", "data.tokenizer.vocab_size=320", "train.eval_batches=1"]
    row = curve.run("fp8", 2, str(curve.REPO / "recipes" / "tiny.yaml"), small)
    assert row["mode"] == "fp8" and row["curve"][-1][0] == 2 and row["val"] > 0
    assert len(calls) == 2 * 2 * 4  # steps x layers x stacked products (q/k/v, o, gate/up, down)
    assert "BITNET_INT8_FP8_GRAD_WEIGHT" not in os.environ
    curve.run("plain", 1, str(curve.REPO / "recipes" / "tiny.yaml"), small)
    assert len(calls) == 2 * 2 * 4

def test_the_idle_gaps_are_the_stretches_no_kernel_covers():
    """train_gpu.idle_gaps: kernels of several streams overlap; a gap is attributed to the kernel that ended last
    before it and the one that starts it, and waits shorter than the threshold are left out."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    train_gpu = load_benchmark("train_gpu")

    def kernel(name, start, end, device=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))

    events = [kernel("a", 0, 100), kernel("b", 50, 300),  # overlapping: no gap between them
              kernel("host op", 300, 900, DeviceType.CPU),  # not a GPU kernel: ignored
              kernel("c", 800, 850), kernel("d", 855, 900),  # 500 us after b; 5 us after c (under the threshold)
              kernel("c", 1900, 2000), kernel("b", 2500, 2600)]
    gaps = {}
    train_gpu.idle_gaps(SimpleNamespace(events=lambda: events), True, gaps)
    assert gaps == {("b", "c"): (0.5, 1), ("d", "c"): (1.0, 1), ("c", "b"): (0.5, 1)}


def test_the_summary_takes_the_median_of_each_variant_s_runs():
    """train_gpu.summary: --variants none,int8,none,int8 gives one row per variant and mode, its median step time
    over the runs and the ratio of medians; a failed run is left out."""
    train_gpu = load_benchmark("train_gpu")

    def result(variant, step_s, compile_=True):
        return {"variant": variant, "compile": compile_, "step_s": step_s, "tokens_per_s": round(131072 / step_s),
                "mfu": 0.4 * 0.22 / step_s, "batch_size": 32, "grad_accum": 4}

    results = [result("none", 0.2444), result("int8", 0.2213), result("none", 0.2439), result("int8", 0.2210),
               {"variant": "int8", "compile": True, "error": "OOM"}, result("int8", 0.2211),
               result("int8", 0.30, compile_=False)]
    rows = train_gpu.summary(results)
    assert [(r["variant"], r["compile"]) for r in rows] == [("int8", False), ("int8", True), ("none", True)]
    eager, int8, none = rows
    assert int8["step_s_runs"] == [0.2213, 0.2210, 0.2211] and int8["step_s"] == 0.2211
    assert none["step_s"] == round((0.2444 + 0.2439) / 2, 4) and int8["batch"] == "32x4"
    assert int8["vs_none"] == round(0.2211 / ((0.2444 + 0.2439) / 2), 4)
    assert eager["vs_none"] is None  # no eager none to compare with
