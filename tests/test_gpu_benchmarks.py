"""The GPU benchmarks' own logic, on the CPU: benchmarks/train_gpu.py's variant switches (``int8+NAME`` / ``int8-NAME``
run int8 with BITNET_INT8_NAME=1 / 0 for that run alone) and benchmarks/int8_kernels.py's fp8 weight-gradient probe."""

import os

import pytest

from conftest import load_benchmark


def test_a_variant_names_its_switches():
    train_gpu = load_benchmark("train_gpu")
    assert train_gpu.variant_switches("none") == ("none", {})
    assert train_gpu.variant_switches("int8+ROPE_ROWS-GATED_GRAD") == (
        "int8", {"BITNET_INT8_ROPE_ROWS": "1", "BITNET_INT8_GATED_GRAD": "0"})


@pytest.mark.parametrize("spec", ["int9", "int8+rope", "int8+", "int8 +X", "+X"])
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
    with pytest.raises(RuntimeError, match="stop here"):
        train_gpu.run(train_gpu.REPO / "recipes" / "tiny.yaml", "int8+RESIDUAL_ROWS-GATED_GRAD", False, 4,
                      ["train.device=cpu"], run_dir=str(tmp_path))
    assert seen == {"BITNET_INT8_GATED_GRAD": "0", "BITNET_INT8_RESIDUAL_ROWS": "1"}
    assert os.environ["BITNET_INT8_GATED_GRAD"] == "1" and "BITNET_INT8_RESIDUAL_ROWS" not in os.environ


@pytest.mark.parametrize("g_dtype, rowwise", [("float8_e5m2", False), ("float8_e4m3fn", False), ("float8_e4m3fn", True)])
def test_the_fp8_weight_gradient_probe_computes_g_transpose_x(g_dtype, rowwise):
    """int8_kernels.fp8_grad_weight: [G_0 | G_1]^T X~ from fp8 operands, within fp8's rounding (a few percent, far
    above bf16's) of the exact product; a wrong layout, scale or part order would be off by 100%."""
    import torch

    int8_kernels = load_benchmark("int8_kernels")
    torch.manual_seed(0)
    m, k = 512, 96
    token_scale = torch.randn(m, 1).exp()
    parts = [(torch.randn(m, w) * 3e-5 * token_scale).to(torch.bfloat16) for w in (64, 32)]
    x = (torch.randn(m, k) * 2).to(torch.bfloat16)
    dw = int8_kernels.fp8_grad_weight(parts, x, getattr(torch, g_dtype), rowwise)
    exact = torch.cat([g.double().t() @ x.double() for g in parts])
    assert dw.shape == (96, k) and dw.dtype == torch.float32
    err = ((dw.double() - exact).norm() / exact.norm()).item()
    assert 1e-3 < err < 0.1, err


def test_the_fp8_curve_experiment_trains_on_fp8_weight_gradients_and_restores_the_trainer(monkeypatch, tmp_path):
    from bitnet_cli.train import int8_linear

    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "cache"))
    curve = load_benchmark("fp8_grad_weight_curve")
    calls = []
    fp8 = curve.int8_kernels.fp8_grad_weight
    monkeypatch.setattr(curve.int8_kernels, "fp8_grad_weight", lambda *a: calls.append(1) or fp8(*a))
    trainer_products = int8_linear._grad_weights
    row = curve.run("e4m3", 2, str(curve.REPO / "recipes" / "tiny.yaml"),
                    ["train.batch_size=2", "train.seq_len=32", "data.tokenizer.vocab_size=320", "train.eval_batches=1"])
    assert row["mode"] == "e4m3" and row["curve"][-1][0] == 2 and row["val"] > 0
    assert len(calls) == 2 * 2 * 7  # steps x layers x projections (one fp8 product each)
    assert int8_linear._grad_weights is trainer_products
