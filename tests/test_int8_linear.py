"""The int8 BitLinear (train.int8_matmul) held to the plain fake-quantised path, on the CPU.

On a CPU ``bitnet::int8_mm`` runs ``int8_mm_reference``, the pure-torch statement of what the
Triton kernel computes (benchmarks/int8_kernels.py checks the kernel against it bit for bit on a
GPU); everything around it (quantisers, autograd, the per-step ternary cache, the trainer's
wiring) is the same code the GPU runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import micro_recipe, token_cache  # noqa: F401 (token_cache: autouse)

from bitnet_cli.errors import BitnetError
from bitnet_cli.model import BitLinear, BitNetConfig, BitNetForCausalLM, _quant_activation, _quant_weight
from bitnet_cli.train import int8_linear as L
from bitnet_cli.train import load_recipe, train


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantisers_give_the_plain_paths_values_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 300, generator=g) * torch.rand(37, 1, generator=g) * 5
    x[3] = 0  # an all-zero token: the 1e-5 clamp, no division by zero
    q, s = L.quantize_rows(x)
    assert q.dtype == torch.int8 and s.shape == (37,)
    assert torch.equal(q.float() / s[:, None], _quant_activation(x))
    w = torch.randn(64, 96, generator=g) * 0.02
    t, s_w = L.ternary_weight(w)
    assert set(t.unique().tolist()) == {-1, 0, 1}
    assert torch.equal(t.float() / s_w, _quant_weight(w))


def test_reference_product_is_the_exact_integer_product_then_two_scalings():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-128, 128, (50, 333), dtype=torch.int8, generator=g)
    b = torch.randint(-1, 2, (70, 333), dtype=torch.int8, generator=g)
    row_mul, col_mul = torch.rand(50, generator=g), torch.rand(70, generator=g)
    exact = a.double() @ b.double().t()
    got = L.int8_mm(a, b, row_mul, col_mul, torch.float32)
    assert torch.equal(got, (exact.float() * row_mul[:, None] * col_mul[None, :]))
    assert torch.equal(L.int8_mm(a, b, row_mul, None, torch.float32), exact.float() * row_mul[:, None])
    assert L.int8_mm(a, b, row_mul, col_mul, torch.bfloat16).dtype == torch.bfloat16


def _grad_parts(seed: int, widths: list[int], m: int, dtype: torch.dtype, scale: float):
    g = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(m, w, generator=g) * scale * torch.rand(m, 1, generator=g) * 4).to(dtype) for w in widths]
    for p in parts:
        p[1] = 0  # an all-zero token row: the floor
    col = torch.cat([torch.full((w,), 0.013 * (i + 1)) for i, w in enumerate(widths)])
    return parts, col


def test_grad_rows_reference_rounds_the_scaled_concatenation_per_token():
    """``quantize_grad_rows`` (the op the backward calls with one part per projection) is
    quantize_rows of ``cat(parts) * col_scale`` with the gradients' floor, whatever the parts' widths
    and layouts (a transposed part as attention's backward may hand one over)."""
    parts, col = _grad_parts(4, [48, 16, 16], 9, torch.bfloat16, 3e-8)
    parts[1] = parts[1].t().contiguous().t() if parts[1].shape[0] == parts[1].shape[1] else parts[1]
    q, s = L.quantize_grad_rows(parts, col)
    g = torch.cat([p.float() for p in parts], -1) * col
    s_want = 127.0 / g.abs().amax(-1).clamp(min=L.GRAD_ABSMAX_FLOOR)
    assert torch.equal(s, s_want)
    assert torch.equal(q, (g * s_want[:, None]).round().clamp(-128, 127).to(torch.int8))
    assert q[1].abs().max() == 0 and q.abs().amax(-1)[0] == 127  # the zero row stays 0; a row's max is 127
    one = L.quantize_grad_rows(parts[:1], col[:48])
    want = L.quantize_rows(parts[0].float() * col[:48], L.GRAD_ABSMAX_FLOOR)
    assert torch.equal(one[0], want[0]) and torch.equal(one[1], want[1])


# Triton 3.6's interpreter turns a loop bound into a Python int with int() of a one-element numpy
# array, which numpy >= 2.4 refuses; the kernels' loops need it to take the element instead.
_INTERPRETER_LOOP_BOUNDS = """
import numpy as np
import triton.runtime.interpreter as I
_patch = I._patch_lang_tensor
def _patch_lang_tensor(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
I._patch_lang_tensor = _patch_lang_tensor
"""

_INTERPRETED_PRODUCT = _INTERPRETER_LOOP_BOUNDS + """
import json, sys, torch, triton
from bitnet_cli.train import int8_linear as L, int8_triton as T
out = []
for kernel, M, N, K, bm, bn, bk, col, *rest in json.loads(sys.argv[1]):
    # rest: the output dtype ("bf16"; fp32 if absent) and the TMA tile's options (EPI_SPLIT, WARP_SPEC)
    bf16, options = rest[0] == "bf16" if rest else False, rest[1] if len(rest) > 1 else {}
    g = torch.Generator().manual_seed(M + N + K)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-1, 2, (N, K), dtype=torch.int8, generator=g)
    rm = torch.rand(M, generator=g) * 0.02 + 1e-4
    cm = torch.rand(N, generator=g) * 0.05 + 1e-3 if col else None
    tile = {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 2}
    cfg = triton.Config({**tile, **options}, num_warps=4, num_stages=2)
    if bf16:  # the TMA kernel's TMA store (a 2-byte output) against the pointer kernel's stores
        assert T.tma_store(N, torch.bfloat16)
        got = T.int8_mm(a, b, rm, cm, torch.bfloat16, kernel=kernel, config=cfg)
        out.append(torch.equal(got, T.int8_mm(a, b, rm, cm, torch.bfloat16, kernel="pointer",
                                              config=triton.Config(tile, num_warps=4, num_stages=2))))
        continue
    got = T.int8_mm(a, b, rm, cm, torch.float32, kernel=kernel, config=cfg)
    out.append(torch.equal(got, L.int8_mm_reference(a, b, rm, cm, torch.float32)))
print(json.dumps(out))
"""


def _interpret(script: str, cases: list) -> list:
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])


_INTERPRETED_GRAD_ROWS = """
import json, sys, torch
from bitnet_cli.train import int8_linear as L, int8_triton as T
from test_int8_linear import _grad_parts
out = []
for seed, widths, m, dtype, scale in json.loads(sys.argv[1]):
    parts, col = _grad_parts(seed, widths, m, getattr(torch, dtype), scale)
    q_ref, s_ref = L.quantize_grad_rows_reference(parts, col)
    for rows in (None, 2, 4):  # one row per program, and blocks of rows with a ragged last block
        q, s = T.quantize_grad_rows(parts, col, rows=rows)
        out.append(torch.equal(q, q_ref) and torch.equal(s, s_ref))
print(json.dumps(out))
"""


@pytest.mark.parametrize("stride_hint", ["0", "1", None])
def test_grad_rows_triton_kernel_matches_its_reference_in_the_interpreter(stride_hint, monkeypatch):
    """The Triton kernel's logic (parts, masks, scale, rounding ties) run by Triton's CPU interpreter
    against the reference bit for bit (benchmarks/int8_kernels.py checks the compiled kernel on a GPU)."""
    pytest.importorskip("triton")
    cases = [[5, [96, 32, 32], 7, "bfloat16", 3e-8], [6, [100, 100], 5, "float32", 1.0], [7, [70], 4, "bfloat16", 1.0]]
    if stride_hint is None:  # the default: hinted where a stride is not a multiple of 16 (100, 70)
        monkeypatch.delenv("BITNET_QGR_STRIDE_HINT", raising=False)
    else:
        monkeypatch.setenv("BITNET_QGR_STRIDE_HINT", stride_hint)  # row strides 96, 100, 70: hints 16, 4, 2
    assert _interpret(_INTERPRETED_GRAD_ROWS, cases) == [True] * (3 * len(cases))


def test_int8_product_kernels_match_the_reference_in_the_interpreter():
    """Both Triton products (the pointer-load kernel and the persistent TMA one) against
    ``int8_mm_reference`` in Triton's CPU interpreter: several tiles per row and column, a group
    walk, rows, columns and K ragged against the tile (TMA's zero fill, the masks), with and
    without the column scale. fp32 outputs, bit for bit: the interpreter rounds fp32 to bf16 by
    truncation, where the GPU rounds to nearest as torch does (the bf16 outputs are checked on
    the GPU by benchmarks/int8_kernels.py)."""
    pytest.importorskip("triton")
    cases = [["tma", 100, 80, 160, 32, 32, 64, True], ["tma", 64, 96, 48, 32, 32, 32, False],
             ["tma", 33, 17, 16, 16, 16, 16, True], ["pointer", 100, 80, 150, 32, 32, 64, True],
             ["pointer", 64, 64, 64, 32, 32, 32, False], ["tma", 100, 80, 160, 32, 32, 64, True, "bf16"],
             ["tma", 33, 40, 16, 16, 16, 16, False, "bf16"],
             # the TMA store in two halves of columns (EPI_SPLIT): a ragged last tile, whose second half is clipped
             ["tma", 100, 72, 160, 32, 32, 64, True, "bf16", {"EPI_SPLIT": 2}],
             ["tma", 33, 40, 16, 16, 32, 16, False, "bf16", {"EPI_SPLIT": 2}],
             # warp specialisation (the epilogue's rows addressed from off_m), ragged rows and columns; pointer stores
             ["tma", 100, 72, 160, 32, 32, 64, True, "bf16", {"WARP_SPEC": True}],
             ["tma", 33, 40, 16, 16, 16, 16, False, "bf16", {"WARP_SPEC": True}],
             ["tma", 100, 80, 160, 32, 32, 64, True, "fp32", {"WARP_SPEC": True}]]
    assert _interpret(_INTERPRETED_PRODUCT, cases) == [True] * len(cases)


# int8_mm's direct launches (``int8_triton._LAUNCHES``) in the interpreter: Triton's autotuner and
# compiled kernel are stood in for by objects that run the interpreted kernel, the compiled one from the
# arguments exactly as a compiled kernel's runner takes them (all of them in signature order, constexprs
# included, and a grid of three dimensions), so that a wrong order, tile or grid gives wrong bits or fails.
_INTERPRETED_DIRECT_LAUNCH = _INTERPRETER_LOOP_BOUNDS + """
import json, sys, torch, triton
from bitnet_cli.train import int8_linear as L, int8_triton as T
TILE = triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 2}, num_warps=4, num_stages=2)
launches = []
class Compiled:
    def __init__(self, autotuned): self.autotuned = autotuned
    def __getitem__(self, grid):
        def runner(*args):
            x, y, z = grid[0], grid[1], grid[2]
            assert (y, z) == (1, 1) and len(args) == len(self.autotuned.arg_names)
            launches.append("direct")
            kw = dict(zip(self.autotuned.arg_names[11:], args[11:]))
            if "NUM_SMS" in kw:
                kw["NUM_SMS"] = 1  # the interpreter runs one persistent program
            jit = self.autotuned.real.fn
            jit = jit.fn if "EVEN_K" in kw else jit  # the pointer kernel's heuristics wrapper
            jit[(x,)](*args[:11], **kw)
        return runner
class Autotuned:
    def __init__(self, real): self.real, self.arg_names, self.fn, self.best_config = real, real.arg_names, real.fn, TILE
    def __getitem__(self, grid):
        def run(*args, **extra):
            launches.append("autotuned")
            self.real.fn[grid(TILE.kwargs)](*args, **{**extra, "NUM_SMS": 1} if "NUM_SMS" in extra else extra,
                                            **TILE.all_kwargs())
            return Compiled(self)
        return run
T._int8_mm_kernel, T._int8_mm_tma_kernel = Autotuned(T._int8_mm_kernel), Autotuned(T._int8_mm_tma_kernel)
out = []
for kernel, M, N, K in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(M + N + K)
    a = L.pad_rows(torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g))
    b = L.pad_rows(torch.randint(-1, 2, (N, K), dtype=torch.int8, generator=g))
    rm, cm = torch.rand(M, generator=g), torch.rand(N, generator=g)
    ref = L.int8_mm_reference(a, b, rm, cm, torch.float32)
    out.append([torch.equal(T.int8_mm(a, b, rm, cm, torch.float32, kernel), ref) for _ in range(3)])
print(json.dumps([out, launches]))
"""


def test_int8_products_launch_the_compiled_kernel_directly_once_tuned():
    """The first product of a shape goes through the autotuner; the next ones launch its compiled kernel
    with the same arguments, tile and grid (K 96: EVEN_K; K 67: rows padded, masked K)."""
    pytest.importorskip("triton")
    cases = [["pointer", 70, 50, 96], ["pointer", 40, 64, 67], ["tma", 70, 50, 96], ["tma", 40, 64, 67]]
    results, launches = _interpret(_INTERPRETED_DIRECT_LAUNCH, cases)
    assert results == [[True] * 3] * len(cases)
    assert launches == ["autotuned", "direct", "direct"] * len(cases)


# The op's direct launches (``int8_triton._DIRECT``, :func:`int8_triton.int8_mm_op`) in the interpreter:
# the compiled kernel's launcher is stood in for by one that takes its arguments exactly as Triton 3.6's
# CudaLauncher.launch does (grid, stream, function, cooperative and PDL flags, the two scratches, packed
# metadata, launch metadata, the two hooks, then every kernel argument in signature order) and runs the
# interpreted kernel with them; the device's current stream is stood in for too (the tensors are on the CPU).
_INTERPRETED_OP_LAUNCH = _INTERPRETED_DIRECT_LAUNCH.split("out = []")[0] + """
import os
torch._C._cuda_getCurrentRawStream = lambda index: 7
torch.cuda.is_current_stream_capturing = lambda: False
class Launcher:
    global_scratch_size, profile_scratch_size, launch_cooperative_grid, launch_pdl, num_ctas = 128, 0, False, False, 1
    def __init__(self, owner): self.owner = owner
    def launch(self, x, y, z, stream, function, coop, pdl, scratch, profile, meta, launch_meta, enter, exit_, *args):
        assert (y, z, stream, function, meta, coop, pdl, profile) == (1, 1, 7, "fn", "meta", False, False, None)
        assert launch_meta is enter is exit_ is None and len(args) == len(self.owner.autotuned.arg_names)
        assert scratch is T._SCRATCH[(args[0].device, 7)] and scratch.numel() >= 128 * x  # the descriptors' scratch, kept
        launches.append("op")
        Compiled.__getitem__(self.owner, (x, y, z))(*args)
        launches.pop()
def _init(self, autotuned):
    self.autotuned, self.run, self.function, self.packed_metadata = autotuned, Launcher(self), "fn", "meta"
Compiled.__init__ = _init
out = []
for kernel, M, N, K, col in json.loads(sys.argv[1]):
    os.environ["BITNET_INT8_MM"] = kernel
    g = torch.Generator().manual_seed(M + N + K)
    a = L.pad_rows(torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g))
    b = L.pad_rows(torch.randint(-1, 2, (N, K), dtype=torch.int8, generator=g))
    rm = torch.rand(M, generator=g)
    cm = torch.rand(N, generator=g) if col else None
    ref = L.int8_mm_reference(a, b, rm, cm, torch.float32)
    out.append([torch.equal(T.int8_mm_op(a, b, rm, cm, torch.float32), ref) for _ in range(4)])
print(json.dumps([out, launches]))
"""


def test_the_op_launches_the_compiled_kernel_directly_once_tuned():
    """``bitnet::int8_mm`` on CUDA (int8_triton.int8_mm_op): the first product of a shape is autotuned, the
    second launches the compiled kernel through int8_mm, and from then on the op hands the compiled
    kernel's launcher the arguments itself (``_DIRECT``): the same bits each time. On another Triton than the 3.6
    whose launcher interface ``_DIRECT`` calls, the op keeps int8_mm's direct launch instead."""
    triton = pytest.importorskip("triton")
    cases = [["pointer", 70, 50, 96, True], ["pointer", 40, 64, 67, False], ["tma", 70, 50, 96, False],
             ["tma", 40, 64, 67, True]]
    results, launches = _interpret(_INTERPRETED_OP_LAUNCH, cases)
    assert results == [[True] * 4] * len(cases)
    op = "op" if triton.__version__.split(".")[:2] == ["3", "6"] else "direct"
    assert launches == ["autotuned", "direct", op, op] * len(cases)


def test_tma_tiles_offered_per_product(monkeypatch):
    """Warp-specialised tiles unless ``$BITNET_INT8_WARP_SPEC=0``; the store in halves only where there is a TMA
    store."""
    pytest.importorskip("triton")
    from bitnet_cli.train import int8_triton as T

    def kinds(store):
        return {(c.kwargs.get("WARP_SPEC", False), c.kwargs.get("EPI_SPLIT", 1))
                for c in T._tma_tiles(T._TMA_CONFIGS, {}, TMA_STORE=store, HAS_COL_MUL=False)}

    monkeypatch.delenv("BITNET_INT8_WARP_SPEC", raising=False)
    assert kinds(True) == {(True, 1), (False, 2), (False, 1)}
    assert kinds(False) == {(True, 1), (False, 1)}
    monkeypatch.setenv("BITNET_INT8_WARP_SPEC", "0")
    assert kinds(True) == {(False, 2), (False, 1)}
    assert kinds(False) == {(False, 1)}
    monkeypatch.setenv("BITNET_INT8_WARP_SPEC", "off")
    with pytest.raises(BitnetError, match="BITNET_INT8_WARP_SPEC='off': expected 0 or 1"):
        kinds(True)


def test_int8_product_kernel_choice_from_the_environment(monkeypatch):
    """``$BITNET_INT8_MM`` picks the kernel ``bitnet::int8_mm`` runs ("auto", the faster per shape, by
    default); a bad value is one clear error."""
    pytest.importorskip("triton")
    from bitnet_cli.train import int8_triton as T

    monkeypatch.delenv("BITNET_INT8_MM", raising=False)
    assert T.default_kernel() == "auto"
    monkeypatch.setenv("BITNET_INT8_MM", "pointer")
    assert T.default_kernel() == "pointer"
    monkeypatch.setenv("BITNET_INT8_MM", "fast")
    with pytest.raises(BitnetError, match="BITNET_INT8_MM='fast'"):
        T.default_kernel()


@pytest.mark.parametrize("grad_scale", [1.0, 3e-8])
@pytest.mark.parametrize("int8_grad", [False, True])
@pytest.mark.parametrize("width_in,width_out", [(96, 80), (90, 42)])
def test_forward_and_gradients_match_the_plain_bitlinear(int8_grad, grad_scale, width_in, width_out):
    """``grad_scale`` 3e-8: output gradients of the size training gives them (a loss averaged over
    32k tokens puts about 3e-5 on an entry, and grad_input folds in mean|W|, about 0.02, before
    rounding), where a 1e-5 floor on the gradient's per-token absmax rounded them all to 0.
    Widths 90 -> 42: int8 rows padded to 16-byte boundaries (the TMA kernel's layout, as 1.3b's 5460)."""
    torch.manual_seed(0)
    plain, fast = BitLinear(width_in, width_out), BitLinear(width_in, width_out)
    fast.load_state_dict(plain.state_dict())
    L.enable(fast, int8_grad, cache=True)
    L.refresh(fast)
    assert fast.int8.trits.stride(0) % 16 == 0 and fast.int8.trits_t.stride(0) % 16 == 0
    x1 = torch.randn(3, 20, width_in, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = plain(x1), fast(x2)
    assert rel(y2, y1) < 1e-6
    g = torch.randn_like(y1) * grad_scale
    y1.backward(g)
    y2.backward(g)
    # grad_weight: the same dequantised activations and the same product as the plain path.
    assert rel(fast.weight.grad, plain.weight.grad) < 1e-6
    if int8_grad:
        # The output gradient rounded per token to int8: error well under 1% of the gradient.
        assert 1e-4 < rel(x2.grad, x1.grad) < 1e-2
    else:
        assert rel(x2.grad, x1.grad) < 1e-6
    # Without gradients (eval, inference) the plain path runs, bit for bit transformers' arithmetic.
    with torch.no_grad():
        assert torch.equal(fast(x1), plain(x1))


def test_bf16_autocast_computes_in_bf16_and_returns_fp32_gradients():
    torch.manual_seed(0)
    plain, fast = BitLinear(64, 48), BitLinear(64, 48)
    fast.load_state_dict(plain.state_dict())
    L.enable(fast, True, cache=True)
    L.refresh(fast)
    x1 = torch.randn(4, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = plain(x1), fast(x2)
    assert y1.dtype == y2.dtype == torch.bfloat16
    assert rel(y2, y1) < 1e-2  # the plain path also rounds x~ and W~ to bf16; the int8 path is exact
    (y2.float().square().sum()).backward()
    assert x2.grad.dtype == fast.weight.grad.dtype == torch.float32


def test_the_ternary_cache_is_refreshed_per_step_and_stays_out_of_checkpoints():
    cfg = BitNetConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
    model = BitNetForCausalLM(cfg)
    keys = set(model.state_dict())
    assert L.enable(model, True, cache=True) == 7
    assert set(model.state_dict()) == keys  # the cached trits are not persistent
    L.refresh(model)
    ids = torch.randint(0, 64, (2, 8))
    model(ids).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with pytest.raises(BitnetError, match="stale"):
        model(ids)
    L.refresh(model)
    # q/k/v share one stacked product on their owner (rows in that order), o_proj has its own.
    attn = model.model.layers[0].self_attn
    fused, rows = attn.int8_fused, 0
    for p in (attn.q_proj, attn.k_proj, attn.v_proj):
        t, s = L.ternary_weight(p.weight)
        n = p.out_features
        assert torch.equal(fused.trits[rows:rows + n], t) and torch.equal(fused.trits_t[:, rows:rows + n], t.t())
        assert torch.equal(fused.col_scale[rows:rows + n], (1.0 / s).expand(n))
        rows += n
    assert rows == fused.trits.shape[0]
    t, s = L.ternary_weight(attn.o_proj.weight)
    assert torch.equal(attn.o_proj.int8.trits, t) and torch.equal(attn.o_proj.int8.col_scale, (1.0 / s).expand(len(t)))


@pytest.mark.parametrize("int8_grad", [False, True])
def test_aligned_grad_weight_gives_the_same_gradients(monkeypatch, int8_grad):
    """BITNET_INT8_ALIGN_GRAD_WEIGHT=1: widths that are not multiples of 8 (1.3b's 5460) take grad_weight
    through bitnet::grad_weight, whose operands are padded copies with 16-byte-aligned rows: same values."""
    torch.manual_seed(5)
    ws = [torch.randn(42, 90) * 0.05, torch.randn(30, 90) * 0.05]
    x = torch.randn(3, 7, 90)
    grads = []
    for flag in ("0", "1"):
        monkeypatch.setenv("BITNET_INT8_ALIGN_GRAD_WEIGHT", flag)
        wd = [w.clone().requires_grad_() for w in ws]
        ys = L.int8_linear(x, wd, int8_grad=int8_grad)
        sum((y * (i + 1)).sum() for i, y in enumerate(ys)).backward()
        grads.append([w.grad for w in wd])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    g = torch.randn(64, 5460, dtype=torch.bfloat16)[:, 3:]  # unaligned start and row stride
    a = L.aligned_rows(g)
    assert torch.equal(a, g) and a.stride(0) % 8 == 0 and a.data_ptr() % 16 == 0
    monkeypatch.setenv("BITNET_INT8_ALIGN_GRAD_WEIGHT", "yes")
    with pytest.raises(BitnetError, match="BITNET_INT8_ALIGN_GRAD_WEIGHT='yes': expected 0 or 1"):
        L.align_grad_weight()
    xx = torch.randn(64, 24, dtype=torch.bfloat16)
    assert torch.equal(L.grad_weight(g, xx, torch.float32), (g.t() @ xx).float())


def test_refresh_kernel_setting(monkeypatch):
    """$BITNET_INT8_REFRESH picks the CUDA refresh (a CUDA graph by default); a CPU model always refreshes in torch."""
    monkeypatch.delenv("BITNET_INT8_REFRESH", raising=False)
    assert L.refresh_kernel() == "graph"
    for kind in ("triton", "torch"):
        monkeypatch.setenv("BITNET_INT8_REFRESH", kind)
        assert L.refresh_kernel() == kind
    cfg = BitNetConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
    model = BitNetForCausalLM(cfg)
    L.enable(model, True, cache=True)
    L.refresh(model)  # graph requested, CPU model: the torch form, no graph kept
    assert "_int8_refresh_graph" not in model.__dict__
    t, _ = L.ternary_weight(model.model.layers[0].self_attn.o_proj.weight)
    assert torch.equal(model.model.layers[0].self_attn.o_proj.int8.trits, t)
    monkeypatch.setenv("BITNET_INT8_REFRESH", "cuda-graph")
    with pytest.raises(BitnetError, match="BITNET_INT8_REFRESH"):
        L.refresh_kernel()


_INTERPRETED_REFRESH = """
import json, sys, torch
from bitnet_cli.model import BitNetConfig, BitNetForCausalLM
from bitnet_cli.train import int8_linear as L
out = []
for hidden, inter, heads, kv, dtype in json.loads(sys.argv[1]):
    cfg = BitNetConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=kv, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(hidden + inter)
    model = BitNetForCausalLM(cfg).to(getattr(torch, dtype))
    for i, p in enumerate(model.parameters()):
        p.data.mul_(0.5 + i % 5)  # weights of different scales; exact ties of W * s at 0.5 among them
    L.enable(model, True, cache=True)
    L.refresh(model, "torch")
    cached = lambda: [b for n, b in model.named_buffers() if n.split(".")[-1] in ("trits", "trits_t", "col_scale")]
    want = [b.clone() for b in cached()]
    for b in cached():
        b.fill_(7)
    L.refresh(model, "triton")
    got = cached()
    out.append(len(got) == len(want) > 0 and all(torch.equal(a, b) for a, b in zip(got, want)))
    model(torch.randint(0, 64, (1, 4)))  # the versions were recorded: not stale
print(json.dumps(out))
"""


def test_the_triton_refresh_gives_the_eager_refresh_bits_in_the_interpreter():
    """int8_triton.refresh_products (one kernel per weight, the scales formed by torch as
    ternary_weight forms them) against the eager Int8Product.refresh, bit for bit: trits, trits_t
    (rows padded to 16 bytes) and col_scale, with rows and K ragged against the kernel's 32 x 128
    tiles, grouped-query k/v narrower than q, fp32 and bf16 latent weights."""
    pytest.importorskip("triton")
    cases = [[48, 136, 4, 2, "float32"], [40, 200, 5, 5, "bfloat16"], [160, 96, 4, 1, "float32"]]
    assert _interpret(_INTERPRETED_REFRESH, cases) == [True] * len(cases)


def test_projections_with_their_own_input_norm_are_not_stacked():
    """use_rms_norm: each BitLinear quantises its own normed input, so q/k/v and gate/up keep one
    product each; the model's output is still the plain path's."""
    cfg = BitNetConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                       bitlinear_norm_eps=1e-6)
    torch.manual_seed(0)
    plain = BitNetForCausalLM(cfg)
    fast = BitNetForCausalLM(cfg)
    fast.load_state_dict(plain.state_dict())
    assert L.enable(fast, False, cache=True) == 7
    L.refresh(fast)
    layer = fast.model.layers[0]
    assert layer.self_attn.int8_fused is None and layer.mlp.int8_fused is None
    assert layer.self_attn.q_proj.int8.cache
    ids = torch.randint(0, 64, (2, 8))
    assert rel(fast(ids), plain(ids)) < 1e-5


@pytest.mark.parametrize("int8_grad", [False, True])
def test_a_stacked_product_equals_its_projections_one_by_one(int8_grad):
    """q/k/v (different sizes and scales, one with a bias) as one product against each alone:
    the forward bit for bit; the input gradient too in bf16, and to the int8 rounding (the
    per-token scale of the stacked output gradient differs from each part's) with int8_grad."""
    torch.manual_seed(3)
    projs = [BitLinear(48, 64), BitLinear(48, 32, bias=True), BitLinear(48, 32)]
    for p, scale in zip(projs, (0.02, 0.5, 3.0)):
        torch.nn.init.normal_(p.weight, std=scale)
    alone = [BitLinear(48, p.out_features, bias=p.bias is not None) for p in projs]
    for a, p in zip(alone, projs):
        a.load_state_dict(p.state_dict())
        L.enable(a, int8_grad, cache=True)
        L.refresh(a)
    stacked = L.Int8Product(projs, int8_grad, cache=True)
    stacked.refresh(*projs)
    x1 = torch.randn(2, 9, 48, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1 = [a(x1) for a in alone]
    y2 = stacked(x2, *projs)
    for a, b in zip(y1, y2):
        assert torch.equal(a, b)
    gs = [torch.randn_like(y) for y in y1]
    torch.autograd.backward(y1, gs)
    torch.autograd.backward(y2, gs)
    for a, p in zip(alone, projs):
        assert rel(p.weight.grad, a.weight.grad) < 1e-6
    assert torch.equal(projs[1].bias.grad, alone[1].bias.grad)
    assert rel(x2.grad, x1.grad) < (1e-2 if int8_grad else 1e-6)


def test_int8_matmul_setting(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  steps: 1\n  int8_matmul: on\n")
    assert load_recipe(p).train.int8_matmul == "on"  # YAML's bare on/off are booleans
    assert load_recipe(None, ["train.int8_matmul=off"], data={"train": {"steps": 1}}).train.int8_matmul == "off"
    with pytest.raises(BitnetError, match="int8_matmul"):
        load_recipe(None, ["train.int8_matmul=fast"], data={"train": {"steps": 1}})
    cpu = torch.device("cpu")
    assert L.resolve("on", cpu, "bitnet") and not L.resolve("auto", cpu, "bitnet")
    assert not L.resolve("on", cpu, "none") and not L.resolve("off", cpu, "bitnet")
    assert "CUDA" in L.available(cpu)


@pytest.mark.parametrize("capability, fsdp, expected", [((9, 0), False, True), ((9, 0), True, False),
                                                        ((8, 0), False, False), ((10, 0), False, False)])
def test_int8_matmul_auto(monkeypatch, capability, fsdp, expected):
    """auto turns the int8 path on only where it was measured (Hopper, without FSDP); on stays on."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(L, "available", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert L.resolve("auto", cuda, "bitnet", fsdp=fsdp) is expected
    assert L.resolve("on", cuda, "bitnet", fsdp=fsdp) and not L.resolve("auto", cuda, "none")
    monkeypatch.setattr(L, "available", lambda device: "triton is not installed")
    assert not L.resolve("auto", cuda, "bitnet")
    with pytest.raises(BitnetError, match="triton is not installed"):
        L.resolve("on", cuda, "bitnet")


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_trainer_runs_the_int8_path_with_grad_accumulation(tmp_path):
    sets = ["train.steps=6", "train.grad_accum=2", "train.log_every=1", "train.eval_every=6"]
    a = train(load_recipe(None, [*sets, "train.int8_matmul=on"], data=micro_recipe()), tmp_path / "a",
              progress=False)
    b = train(load_recipe(None, [*sets, "train.int8_matmul=off"], data=micro_recipe()), tmp_path / "b",
              progress=False)
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert la[0] == pytest.approx(lb[0], abs=1e-5)  # the same model before any update
    assert la == pytest.approx(lb, abs=2e-3) and la[-1] < la[0]
    assert a.val_loss == pytest.approx(b.val_loss, abs=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("int8_grad", [False, True])
def test_tiny_recipe_50_steps_int8_emulation_matches_the_plain_path(tmp_path, int8_grad):
    """The issue's CPU check: the tiny recipe for 50 steps, int8 products against the plain path.
    Their forwards differ by rounding only (1e-7 relative), but ternary training amplifies it: a
    last-bit difference in a latent weight at a rounding boundary flips a trit, and Adam turns tiny
    gradient differences into lr-sized steps, and how far that goes depends on the CPU and its thread
    count: the logged losses stayed within 3.6e-3 of each other on one 2-core machine and drifted up
    to 0.018 (fp32 grad_input) and 0.025 (int8 grad_input), 0.5% relative, on another, and on a third (an AMD EPYC
    with AVX-512 BF16) one logged batch's loss by 0.057 (1.02%) while the last ones agreed within 0.1%. A logged loss is
    one batch's: held to 2% each, and the mean of the last five, where the two runs have settled, to 0.5%."""
    sets = ["train.steps=50", "train.log_every=5", "train.eval_every=50", "train.checkpoint_every=50"]
    runs = {}
    for v in ("on", "off"):
        r = load_recipe("recipes/tiny.yaml" if Path("recipes/tiny.yaml").is_file() else "tiny",
                        [*sets, f"train.int8_matmul={v}", f"train.int8_grad_input={str(int8_grad).lower()}"])
        train(r, tmp_path / v, progress=False)
        runs[v] = _losses(tmp_path / v)
    assert len(runs["on"]) == 10 and runs["on"][-1] < runs["on"][0] - 0.5
    assert runs["on"] == pytest.approx(runs["off"], rel=2e-2)
    assert sum(runs["on"][-5:]) == pytest.approx(sum(runs["off"][-5:]), rel=5e-3)


def test_grad_rows_launch_by_row_width(monkeypatch):
    """quantize_grad_rows' launch: one row a program, 2 warps up to 2,048 lanes, 4 up to 16,384 (1.3b's gate/up:
    2 x 5460 -> 2 x 8192; 16 warps there took 1.22 ms a call against 0.83 with 4 on an H200), then 8;
    $BITNET_QGR overrides it."""
    pytest.importorskip("triton")
    from bitnet_cli.train import int8_triton as T

    monkeypatch.delenv("BITNET_QGR", raising=False)
    assert T.grad_rows_launch([768]) == (1, 2)
    assert T.grad_rows_launch([1536]) == (1, 2)
    assert T.grad_rows_launch([768] * 3) == (1, 4)
    assert T.grad_rows_launch([5460, 5460]) == (1, 4)
    assert T.grad_rows_launch([8192, 8192, 4096]) == (1, 8)
    monkeypatch.setenv("BITNET_QGR", "2,8")
    assert T.grad_rows_launch([768]) == (2, 8)
    for bad in ("2", "a,4", "0,4", "2,3", "2,-4"):
        monkeypatch.setenv("BITNET_QGR", bad)
        with pytest.raises(BitnetError, match="BITNET_QGR"):
            T.grad_rows_launch([768])


def test_residual_norm_grad_launch_by_row_width(monkeypatch):
    """residual_norm_grad's launch (an H100's sweep, session 31): with delta's int8 rows one row a block up to 1,024
    columns and four up to 1,536; without them four rows and four blocks a program; wider rows as norm_quant's rows;
    four warps. $BITNET_RNG overrides all three."""
    pytest.importorskip("triton")
    from bitnet_cli.train import int8_triton as T

    monkeypatch.delenv("BITNET_RNG", raising=False)
    monkeypatch.delenv("BITNET_NQ", raising=False)
    assert [T.residual_norm_grad_launch(k, True) for k in (768, 1536, 2048)] == [(1, 4, 32), (4, 4, 32), (2, 4, 32)]
    assert [T.residual_norm_grad_launch(k) for k in (768, 1536, 2048)] == [(4, 4, 4), (4, 4, 4), (2, 4, 32)]
    monkeypatch.setenv("BITNET_RNG", "2,8,4")
    assert T.residual_norm_grad_launch(768) == T.residual_norm_grad_launch(768, True) == (2, 8, 4)
    for bad in ("2,8", "a,4,1", "0,4,1", "3,4,1", "2,3,1", "2,4,0"):
        monkeypatch.setenv("BITNET_RNG", bad)
        with pytest.raises(BitnetError, match="BITNET_RNG"):
            T.residual_norm_grad_launch(768)


def test_grad_rows_stride_hint_where_a_row_stride_is_not_a_multiple_of_16(monkeypatch):
    pytest.importorskip("triton")
    from bitnet_cli.train import int8_triton as T

    monkeypatch.delenv("BITNET_QGR_STRIDE_HINT", raising=False)
    assert not T.stride_hint([1536, 1536, 1536]) and T.stride_hint([5460, 5460]) and T.stride_hint([768, 10920 + 2])
    monkeypatch.setenv("BITNET_QGR_STRIDE_HINT", "0")
    assert not T.stride_hint([5460])
    monkeypatch.setenv("BITNET_QGR_STRIDE_HINT", "1")
    assert T.stride_hint([1536])
    monkeypatch.setenv("BITNET_QGR_STRIDE_HINT", "yes")
    with pytest.raises(BitnetError, match="BITNET_QGR_STRIDE_HINT"):
        T.stride_hint([1536])


def _norm_inputs(seed: int, m: int, k: int, dtype: torch.dtype, gate: bool, stride: int | None = None):
    """x (and gate) [m, k] in ``dtype``, as views of rows ``stride`` wide (the MLP's gate and up are halves of one
    product's rows), and an fp32 norm weight. Values are small multiples of powers of two, so that every sum of
    squares is exact in fp32 whatever its order (relu2's y: multiples of 1/16 up to 2): the kernel's reduction order
    then cannot move a bit."""
    g = torch.Generator().manual_seed(seed)
    stride = stride or k

    def part(top, div):
        return (torch.randint(-top, top + 1, (m, stride), generator=g) / div).to(dtype)[:, :k]

    w = (torch.randint(1, 64, (k,), generator=g) / 32).float()
    return part(8, 4), part(2, 2) if gate else None, w


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_quant_reference_is_the_plain_paths_sub_norm_then_rounding(gate, dtype):
    """What bitnet::norm_quant computes is, bit for bit, the plain path's sub-norm (after relu2 with a gate) and the
    next BitLinear's rounding of it: its x_deq is the plain path's dequantised input, as the product reads it."""
    from bitnet_cli.model import RMSNorm, relu2

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(33, 90, generator=g) * torch.rand(33, 1, generator=g) * 3).to(dtype)
    gt = (torch.randn(33, 90, generator=g)).to(dtype) if gate else None
    norm = RMSNorm(90, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(90, generator=g) + 0.5)
        plain = _quant_activation(norm(relu2(gt, x) if gate else x))
    q, s, x_deq, rstd = L.norm_quant_reference(x, gt, norm.weight.detach(), 1e-5, torch.float32)
    assert q.dtype == torch.int8 and q.stride(0) % 16 == 0 and s.shape == rstd.shape == (33,)
    assert torch.equal(x_deq, plain) and torch.equal(q.float() / s[:, None], plain)
    assert torch.equal(L.norm_quant(x, gt, norm.weight.detach(), 1e-5, torch.float32)[2], plain)  # the CPU op
    if gate:  # relu2 in fp32 (as CUDA's bf16 autocast computes it) from the same inputs
        with torch.no_grad():
            plain32 = _quant_activation(norm(relu2(gt.float(), x.float())))
        got = L.norm_quant(x, gt, norm.weight.detach(), 1e-5, torch.float32, torch.float32)[2]
        assert torch.equal(got, plain32) and (dtype == torch.float32 or not torch.equal(got, plain))


_INTERPRETED_NORM_QUANT = """
import json, sys, torch
from bitnet_cli.train import int8_linear as L, int8_triton as T
from test_int8_linear import _norm_inputs
out = []
for seed, m, k, dtype, gate, stride, out_dtype, y_dtype in json.loads(sys.argv[1]):
    x, g, w = _norm_inputs(seed, m, k, getattr(torch, dtype), gate, stride)
    yd = getattr(torch, y_dtype) if y_dtype else None
    ref = L.norm_quant_reference(x, g, w, 1e-5, getattr(torch, out_dtype), yd)
    for rows in (None, 2):  # one row per program, and two with a ragged last block
        got = T.norm_quant(x, g, w, 1e-5, getattr(torch, out_dtype), rows=rows, y_dtype=yd)
        out.append([torch.equal(a, b) for a, b in zip(got, ref)])
    got = T.norm_quant(x, g, w, 1e-5, getattr(torch, out_dtype), rows=2, y_dtype=yd, with_x_deq=False)
    out.append([torch.equal(got[i], ref[i]) for i in (0, 1, 3)])  # x_deq not stored: the rest unchanged
print(json.dumps(out))
"""


def test_norm_quant_triton_kernel_matches_its_reference_in_the_interpreter():
    """The fused sub-norm kernel (relu2, RMSNorm, absmax, rounding, X~) in Triton's CPU interpreter against the
    reference, bit for bit: q, s_x, x_deq and rstd (benchmarks/int8_kernels.py checks the compiled kernel on a GPU);
    without X~'s store (with_x_deq=False) the same q, s_x and rstd."""
    pytest.importorskip("triton")
    cases = [[1, 5, 64, "bfloat16", False, None, "bfloat16", None], [2, 7, 64, "bfloat16", True, 160, "bfloat16", None],
             [3, 3, 96, "float32", False, None, "float32", None], [4, 5, 32, "float32", True, 72, "bfloat16", None],
             [5, 6, 100, "bfloat16", True, 200, "bfloat16", None], [6, 5, 64, "bfloat16", True, 128, "bfloat16", "float32"]]
    assert _interpret(_INTERPRETED_NORM_QUANT, cases) == [[True] * 4, [True] * 4, [True] * 3] * len(cases)


def _residual_inputs(seed: int, m: int, k: int, x_dtype: torch.dtype, delta_dtype: torch.dtype, exact: bool):
    """The residual stream x, a block's output delta [m, k] and an fp32 norm weight. ``exact``: small multiples of
    powers of two (x + delta multiples of 1/8 up to 3), so that every sum of squares is exact in fp32 whatever its
    order (as _norm_inputs); else normal values of spread magnitudes, whose sums round (checked: the add alone)."""
    g = torch.Generator().manual_seed(seed)
    if exact:
        x = (torch.randint(-8, 9, (m, k), generator=g) / 4).to(x_dtype)
        delta = (torch.randint(-8, 9, (m, k), generator=g) / 8).to(delta_dtype)
    else:
        x = (torch.randn(m, k, generator=g) * 10).to(x_dtype)
        delta = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 3).to(delta_dtype)
    return x, delta, (torch.randint(1, 64, (k,), generator=g) / 32).float()


@pytest.mark.parametrize("x_dtype,delta_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float32)])
def test_residual_norm_quant_reference_is_the_plain_paths_add_norm_then_rounding(x_dtype, delta_dtype):
    """What bitnet::residual_norm_quant computes is, bit for bit, the decoder layer's residual add (h in the promoted
    dtype: fp32 from the fp32 stream and a bf16 block output under autocast), its residual norm, and the next
    BitLinear's rounding of it."""
    from bitnet_cli.model import RMSNorm

    x, delta, w = _residual_inputs(5, 33, 90, x_dtype, delta_dtype, exact=False)
    norm = RMSNorm(90, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
        h_plain = x + delta
        plain = _quant_activation(norm(h_plain))
    for op in (L.residual_norm_quant_reference, L.residual_norm_quant):  # the reference, and the op (CPU)
        h, q, s, x_deq, rstd = op(x, delta, w, 1e-5, torch.float32)
        assert h.dtype == torch.promote_types(x_dtype, delta_dtype) and torch.equal(h, h_plain)
        assert q.dtype == torch.int8 and q.stride(0) % 16 == 0 and s.shape == rstd.shape == (33,)
        assert torch.equal(x_deq, plain) and torch.equal(q.float() / s[:, None], plain)


_INTERPRETED_RESIDUAL_NORM_QUANT = """
import json, sys, torch
from bitnet_cli.train import int8_linear as L, int8_triton as T
from test_int8_linear import _residual_inputs
out = []
for seed, m, k, x_dtype, delta_dtype, out_dtype, exact in json.loads(sys.argv[1]):
    x, d, w = _residual_inputs(seed, m, k, getattr(torch, x_dtype), getattr(torch, delta_dtype), exact)
    ref = L.residual_norm_quant_reference(x, d, w, 1e-5, getattr(torch, out_dtype))
    for rows in (None, 2):  # the default launch, and two rows a program with a ragged last block
        got = T.residual_norm_quant(x, d, w, 1e-5, getattr(torch, out_dtype), rows=rows)
        same = [torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, ref)]
        out.append(same if exact else same[:1])  # inexact sums of squares: h (the add) alone is order-free
    if exact:  # without X~'s store: h, q, s_x and rstd unchanged
        got = T.residual_norm_quant(x, d, w, 1e-5, getattr(torch, out_dtype), rows=2, with_x_deq=False)
        out.append([torch.equal(got[i], ref[i]) for i in (0, 1, 2, 4)])
print(json.dumps(out))
"""


def test_residual_norm_quant_triton_kernel_matches_its_reference_in_the_interpreter():
    """norm_quant's kernel with the residual add (x + delta stored as h, then the norm and rounding of h) in Triton's
    CPU interpreter against the reference, bit for bit: h, q, s_x, x_deq, rstd; ragged rows and widths, the stream
    in fp32 or bf16, the delta in bf16 or fp32; with inputs whose fp32 sums round, the add's h alone; without X~'s
    store (with_x_deq=False), the same h, q, s_x and rstd."""
    pytest.importorskip("triton")
    cases = [[1, 5, 64, "float32", "bfloat16", "bfloat16", True], [2, 7, 96, "bfloat16", "bfloat16", "bfloat16", True],
             [3, 3, 100, "float32", "float32", "float32", True], [4, 6, 48, "float32", "bfloat16", "float32", True],
             [5, 7, 100, "float32", "bfloat16", "bfloat16", False], [6, 5, 64, "bfloat16", "bfloat16", "bfloat16", False]]
    expected = [e for c in cases for e in ([[True] * 5] * 2 + [[True] * 4] if c[-1] else [[True]] * 2)]
    assert _interpret(_INTERPRETED_RESIDUAL_NORM_QUANT, cases) == expected


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("int8_grad", [False, True])
def test_sub_norm_then_bitlinear_through_norm_quant_matches_the_plain_path(gate, int8_grad, monkeypatch):
    """model._sub_norm_project (the sub-norm before o_proj / down_proj, relu2 first with a gate) on the int8 path with
    norm_quant: the same output as the plain path, and the gradients of x, gate, the norm's weight and the
    projection's weight (the norm's backward is norm_quant's own, in torch ops)."""
    from bitnet_cli.model import RMSNorm, _sub_norm_project

    monkeypatch.delenv("BITNET_INT8_NORM_QUANT", raising=False)
    torch.manual_seed(0)
    norms, projs = [RMSNorm(96, 1e-5) for _ in range(2)], [BitLinear(96, 40) for _ in range(2)]
    with torch.no_grad():
        norms[0].weight.uniform_(0.5, 1.5)
    norms[1].load_state_dict(norms[0].state_dict())
    projs[1].load_state_dict(projs[0].state_dict())
    L.enable(projs[1], int8_grad, cache=True)
    L.refresh(projs[1])
    assert projs[1].int8.norm_quant
    x = [torch.randn(3, 20, 96, requires_grad=True)]
    x.append(x[0].detach().clone().requires_grad_())
    g = [torch.randn(3, 20, 96, requires_grad=True) if gate else None]
    g.append(g[0].detach().clone().requires_grad_() if gate else None)
    ys = [_sub_norm_project(n, p, xi, gate=gi) for n, p, xi, gi in zip(norms, projs, x, g)]
    assert rel(ys[1], ys[0]) < 1e-6
    d = torch.randn_like(ys[0])
    for y in ys:
        y.backward(d)
    tol = 1e-2 if int8_grad else 1e-5  # int8 grad_input: the output gradient rounded per token (as without the norm)
    assert rel(projs[1].weight.grad, projs[0].weight.grad) < 1e-6
    assert rel(x[1].grad, x[0].grad) < tol and rel(norms[1].weight.grad, norms[0].weight.grad) < tol
    if gate:
        assert rel(g[1].grad, g[0].grad) < tol


def _residual_grad_inputs(seed: int, m: int, k: int, h_dtype: torch.dtype, stream_grad: bool):
    """The saved h, the gradients of h (or None) and of the norm's output (bf16, as the product's grad_input), an fp32
    norm weight and a positive rstd: small multiples of powers of two (rstd aside), so that every sum of ``dh * h`` is
    exact in fp32 whatever its order (h multiples of 1/8 up to 3, grad_n of 1/4 up to 2, weight of 1/32)."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randint(-24, 25, (m, k), generator=g) / 8).to(h_dtype)
    grad_h = torch.randn(m, k, generator=g).to(h_dtype) if stream_grad else None
    grad_n = (torch.randint(-8, 9, (m, k), generator=g) / 4).to(torch.bfloat16)
    return grad_h, grad_n, h, (torch.randint(1, 64, (k,), generator=g) / 32).float(), torch.rand(m, generator=g) + 0.1


def test_residual_norm_grad_reference_is_autograds_gradient_of_the_add_and_norm():
    """residual_norm_grad_reference against autograd through the plain path's h = x + delta, rms_norm(h) (the
    straight-through rounding passes the norm's output gradient on), h also read on by the stream: x's (fp32) and
    delta's (bf16) gradients, the same values in their dtypes, and the norm weight's; two separate tensors where the
    dtypes are equal."""
    from bitnet_cli.model import rms_norm

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(9, 40, generator=g) * 3).requires_grad_()
    delta = torch.randn(9, 40, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.rand(40, generator=g) + 0.5).requires_grad_()
    grad_h, grad_n = torch.randn(9, 40, generator=g), torch.randn(9, 40, generator=g).to(torch.bfloat16)
    h = x + delta
    torch.autograd.backward([h, rms_norm(h, w, 1e-5)], [grad_h, grad_n.float()])
    hd, wd = h.detach(), w.detach()
    rstd = torch.rsqrt(hd.pow(2).mean(-1) + 1e-5)
    for op in (L.residual_norm_grad_reference, torch.ops.bitnet.residual_norm_grad.default):
        gx, gd, gw = op(grad_h, grad_n, hd, wd, rstd, torch.float32, torch.bfloat16)
        assert gx.dtype == torch.float32 and gd.dtype == torch.bfloat16
        assert rel(gx, x.grad) < 1e-6 and torch.equal(gd, gx.to(torch.bfloat16))
        assert rel(gd, delta.grad) < 1e-2 and rel(gw, w.grad) < 1e-6
    gx, gd, _ = L.residual_norm_grad_reference(None, grad_n, hd, wd, rstd, torch.float32, torch.float32)
    assert torch.equal(gx, gd) and gx.data_ptr() != gd.data_ptr()


_INTERPRETED_RESIDUAL_NORM_GRAD = """
import json, sys, torch
from bitnet_cli.train import int8_linear as L, int8_triton as T
from test_int8_linear import _residual_grad_inputs
out = []
for seed, m, k, h_dtype, x_dtype, delta_dtype, stream_grad in json.loads(sys.argv[1]):
    args = _residual_grad_inputs(seed, m, k, getattr(torch, h_dtype), stream_grad)
    dtypes = getattr(torch, x_dtype), getattr(torch, delta_dtype)
    ref = L.residual_norm_grad_reference(*args, *dtypes)
    # the default launch, and two rows a block, two blocks a program, with a ragged last block and program
    for rows, chunk in ((None, None), (2, 2)):
        got = T.residual_norm_grad(*args, *dtypes, rows=rows, chunk=chunk)
        out.append([torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got[:2], ref[:2])]
                   + [got[2].dtype == ref[2].dtype and bool(torch.allclose(got[2], ref[2], rtol=1e-5, atol=0))])
print(json.dumps(out))
"""


def test_residual_norm_grad_triton_kernel_matches_its_reference_in_the_interpreter():
    """The residual norm's backward kernel (bitnet::residual_norm_grad) in Triton's CPU interpreter against its
    reference, bit for bit: x's and delta's gradients; the norm weight's (summed per program, then over programs) within
    fp32 rounding; ragged rows and widths, h in fp32 or bf16, with and without the stream's own gradient."""
    pytest.importorskip("triton")
    cases = [[1, 5, 64, "float32", "float32", "bfloat16", True], [2, 7, 100, "float32", "float32", "bfloat16", False],
             [3, 3, 96, "bfloat16", "bfloat16", "bfloat16", True], [4, 6, 48, "float32", "float32", "float32", True]]
    assert _interpret(_INTERPRETED_RESIDUAL_NORM_GRAD, cases) == [[True, True, True]] * (2 * len(cases))


_INTERPRETED_RESIDUAL_NORM_GRAD_ROWS = """
import json, sys, torch
from bitnet_cli.train import int8_linear as L, int8_triton as T
from test_int8_linear import _residual_grad_inputs
out = []
for seed, m, k, h_dtype, x_dtype, delta_dtype, stream_grad in json.loads(sys.argv[1]):
    args = _residual_grad_inputs(seed, m, k, getattr(torch, h_dtype), stream_grad)
    dtypes = getattr(torch, x_dtype), getattr(torch, delta_dtype)
    # the column scales of the product that wrote delta: 1 / s_w, one per column, some very small, as ternary_weight's
    col = 1.0 / (torch.rand(k, generator=torch.Generator().manual_seed(seed)) * 20 + 0.01)
    ref = L.residual_norm_grad_rows_reference(*args, col, *dtypes)
    for rows, chunk in ((None, None), (2, 2)):
        got = T.residual_norm_grad(*args, *dtypes, rows=rows, chunk=chunk, col_scale=col)
        exact = [torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got[:2] + got[3:], ref[:2] + ref[3:])]
        out.append(exact + [got[3].stride(0) % 16 == 0, bool(torch.allclose(got[2], ref[2], rtol=1e-5, atol=0))])
print(json.dumps(out))
"""


def test_residual_norm_grad_rows_reference_is_the_gradients_then_their_rounding():
    """residual_norm_grad_rows_reference (and its op off CUDA): residual_norm_grad_reference's three gradients, then
    delta's rounded per token with the product's column scales, exactly as quantize_grad_rows rounds it (the rows the
    product's grad_input reads without the rows pass), 16-byte aligned."""
    g = torch.Generator().manual_seed(3)
    args = _residual_grad_inputs(5, 7, 40, torch.float32, True)
    col = torch.rand(40, generator=g) + 0.1
    plain = L.residual_norm_grad_reference(*args, torch.float32, torch.bfloat16)
    for op in (L.residual_norm_grad_rows_reference, torch.ops.bitnet.residual_norm_grad_rows.default):
        gx, gd, gw, gq, s_g = op(*args, col, torch.float32, torch.bfloat16)
        assert all(torch.equal(a, b) for a, b in zip((gx, gd, gw), plain))
        q_ref, s_ref = L.quantize_grad_rows([plain[1]], col)
        assert torch.equal(gq, q_ref) and torch.equal(s_g, s_ref) and gq.dtype == torch.int8
        assert gq.stride(0) % 16 == 0 and gq.abs().max() == 127


def test_residual_norm_grad_rows_triton_kernel_matches_its_reference_in_the_interpreter():
    """The residual norm's backward kernel with delta's int8 rows (bitnet::residual_norm_grad_rows) in Triton's CPU
    interpreter against its reference, bit for bit: x's and delta's gradients, the int8 rows (16-byte aligned) and their
    scales; the norm weight's gradient within fp32 rounding; ragged rows and widths, h in fp32 or bf16, delta's
    gradient in bf16 or fp32, with and without the stream's own gradient."""
    pytest.importorskip("triton")
    cases = [[1, 5, 64, "float32", "float32", "bfloat16", True], [2, 7, 100, "float32", "float32", "bfloat16", False],
             [3, 3, 96, "bfloat16", "bfloat16", "bfloat16", True], [4, 6, 48, "float32", "float32", "float32", True]]
    assert _interpret(_INTERPRETED_RESIDUAL_NORM_GRAD_ROWS, cases) == [[True] * 6] * (2 * len(cases))


_SM90 = """
import collections, json, re, subprocess, sys, tempfile, triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bitnet_cli.train import int8_triton as T
try:
    from triton.backends.nvidia.compiler import get_ptxas
    PTXAS = get_ptxas(90).path
except Exception:  # a Triton without its CUDA tools: nothing to compile with
    print(json.dumps("no ptxas"))
    sys.exit(0)

def compile_sm90(fn, types, constexprs, warps, aligned=lambda n: n.endswith("_ptr") or n.startswith("stride"),
                 stage="ptx"):
    # fn's PTX (or another ``stage``: "ttgir") for sm_90: its arguments typed by ``types`` ("*bf16", "i32", ...), the
    # rest ``constexprs``; those that ``aligned`` names 16-byte divisible, as Triton specialises the pointers and row
    # strides of the recipes' shapes (not the arguments the kernel does not let it specialise)
    names = list(fn.arg_names)
    index = {n: (i,) for i, n in enumerate(names)}
    kept = set(fn.do_not_specialize)
    src = ASTSource(fn=fn, signature={n: types.get(n, "constexpr") for n in names},
                    constexprs={index[n]: v for n, v in constexprs.items()},
                    attrs={index[n]: [["tt.divisibility", 16]] for n in names if aligned(n) and n not in kept})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "enable_fp_fusion": False}).asm[stage]

def accesses(ptx):
    return collections.Counter(re.findall(r"(?:ld|st)[.]global[.\\w]*", ptx))

def spills(ptx):  # bytes of spill stores and loads, as ptxas -v reports them
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as fh:
        fh.write(ptx)
        fh.flush()
        r = subprocess.run([PTXAS, "-arch=sm_90a", "-v", fh.name, "-o", "/dev/null"], capture_output=True, text=True)
    return [int(n) for n in re.findall(r"(\\d+) bytes spill (?:stores|loads)", r.stdout + r.stderr)]
"""


def _sm90(script: str, arg) -> object:
    """The JSON result of ``script`` after :data:`_SM90` (kernels compiled for sm_90 on the CPU by Triton's own ptxas),
    given ``arg``; skipped where Triton has no CUDA tools."""
    pytest.importorskip("triton")
    here = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _SM90 + script, json.dumps(arg)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.splitlines()[-1])
    if result == "no ptxas":
        pytest.skip("Triton's ptxas is not available here")
    return result


# The norm kernels' argument types and constexprs as the trainer launches them (x: the stream's dtype, "bf16" or
# "fp32"), for the scripts below: (types, constexprs) each, and the gated kernel's warps.
_NORM_KERNEL_TYPES = """
def typed(pointers, scalars):
    return {**{n: "*" + t for n, t in pointers.items()}, **scalars}

def norm_quant_types(gate, residual, k, x, rows):
    y = tl.float32 if x == "fp32" else tl.bfloat16
    pointers = {"x_ptr": x, "b_ptr": "bf16", "w_ptr": "fp32", "q_ptr": "i8", "s_ptr": "fp32", "xd_ptr": "bf16",
                "rstd_ptr": "fp32", "h_ptr": x}
    ints = ["M", "stride_x", "stride_b", "stride_q", "stride_xd", "stride_h"]
    consts = {"K": k, "BLOCK": triton.next_power_of_2(k), "R": rows, "GATE": gate, "RESIDUAL": residual, "Y_DTYPE": y,
              "Y_BF16": y == tl.bfloat16, "N_DTYPE": tl.float32, "N_BF16": False, "OUT_BF16": True, "DX": 16, "DB": 16,
              "HINT": False, "STORE_XD": True}
    return typed(pointers, {**{n: "i32" for n in ints}, "eps": "fp32", "inv_k": "fp32"}), consts

def residual_grad_types(k, x, rows, with_rows):
    y = tl.float32 if x == "fp32" else tl.bfloat16
    pointers = {"gh_ptr": x, "gn_ptr": "bf16", "h_ptr": x, "w_ptr": "fp32", "rstd_ptr": "fp32", "gx_ptr": x,
                "gd_ptr": "bf16", "wp_ptr": "fp32", "col_ptr": "fp32", "q_ptr": "i8", "s_ptr": "fp32"}
    ints = ["M", "stride_gh", "stride_gn", "stride_h", "stride_gx", "stride_gd", "stride_q"]
    consts = {"K": k, "BLOCK": triton.next_power_of_2(k), "R": rows, "CHUNK": 32, "HAS_GH": True, "Y_DTYPE": y,
              "Y_BF16": y == tl.bfloat16, "GX_BF16": y == tl.bfloat16, "GD_BF16": True, "ROWS": with_rows,
              "FLOOR": 1e-30}
    return typed(pointers, {**{n: "i32" for n in ints}, "inv_k": "fp32"}), consts

def gated_types(f):
    pointers = {"y_ptr": "bf16", "gn_ptr": "bf16", "rstd_ptr": "fp32", "w_ptr": "fp32", "col_ptr": "fp32",
                "d_ptr": "bf16", "q_ptr": "i8", "s_ptr": "fp32", "wp_ptr": "fp32"}
    ints = ["M", "stride_y", "stride_gn", "stride_d", "stride_q"]
    rows, warps = T.gated_norm_grad_launch(f)
    consts = {"F": f, "F_PAD": f, "BLOCK": f, "CHUNK": rows, "Y_DTYPE": tl.float32, "Y_BF16": False, "D_BF16": True,
              "FLOOR": 1e-30}
    return typed(pointers, {**{n: "i32" for n in ints}, "inv_k": "fp32"}), consts, warps
"""

_COMPILED_NORM_KERNELS = _NORM_KERNEL_TYPES + """
out = []
for gate, residual, k, x in json.loads(sys.argv[1]):
    out.append(accesses(compile_sm90(T._norm_quant_kernel, *norm_quant_types(gate, residual, k, x, 2), 4)))
    if residual:  # the backward of the same shapes, and with delta's int8 rows (bitnet::residual_norm_grad_rows)
        out += [accesses(compile_sm90(T._residual_norm_grad_kernel, *residual_grad_types(k, x, 2, rows), 4))
                for rows in (False, True)]
for f in (2048, 4096):  # the gated MLP's backward at small's and 700m's widths, launched as the trainer does
    out.append(accesses(compile_sm90(T._gated_norm_grad_kernel, *gated_types(f))))
print(json.dumps(out))
"""


def test_norm_kernels_compile_for_hopper_with_16_byte_accesses():
    """The norm kernels' GPU branches (libdevice's rsqrt, the mean by torch's CUDA factor, the fma-corrected division:
    the interpreter runs the other branches) compiled for sm_90 on the CPU by Triton's own ptxas: they compile, and
    with 16-byte-aligned rows every global load and store of a row is a 16-byte vector access but the int8 rows' 8-byte
    ones (only the per-row scalars are 4-byte ones): the sub-norm, relu2 and the residual add forwards, the residual
    (with and without delta's int8 rows) and gated MLP backwards."""
    cases = [[False, False, 1536, "bf16"], [True, False, 4096, "bf16"], [False, True, 1536, "fp32"],
             [False, True, 768, "bf16"]]
    counts = _sm90(_COMPILED_NORM_KERNELS, cases)
    assert len(counts) == 10
    for i, c in enumerate(counts):
        assert c.get("ld.global.v4.b32", 0) > 0 and c.get("st.global.v4.b32", 0) > 0
        # int8 rows are stored 8 bytes a thread (test_int8_row_stores_keep_the_blocks_layout)
        allowed = {"ld.global.v4.b32", "st.global.v4.b32", "ld.global.b32", "st.global.b32", "st.global.v2.b32"}
        assert set(c) <= allowed, c


_ROW_BLOCK_LAYOUTS = _NORM_KERNEL_TYPES + """
def conversions(fn, types, consts, warps, shape):
    # layout conversions of whole blocks of rows (through shared memory, with barriers) in fn's TTGIR for sm_90
    ir = compile_sm90(fn, types, consts, warps, stage="ttgir")
    return len(re.findall(rf"convert_layout %\\S+ : tensor<{shape}x", ir))

out = {}
for residual, k, rows in [(False, 768, 4), (True, 768, 4), (True, 1536, 2)]:  # the norms before the products
    x = "fp32" if residual else "bf16"
    out[f"norm_quant {x} {k}"] = conversions(T._norm_quant_kernel, *norm_quant_types(False, residual, k, x, rows), 4,
                                             f"{rows}x{triton.next_power_of_2(k)}")
for k, rows, warps in [(768, 2, 4), (768, 4, 4), (1536, 4, 4), (1536, 4, 8)]:  # the residual norms' backward
    for with_rows in (False, True):
        out[f"residual_norm_grad {k} {rows}x{warps} rows={with_rows}"] = conversions(
            T._residual_norm_grad_kernel, *residual_grad_types(k, "fp32", rows, with_rows), warps,
            f"{rows}x{triton.next_power_of_2(k)}")
# the gated MLP's backward at small's width, launched as the trainer does
out["gated_norm_grad 2048"] = conversions(T._gated_norm_grad_kernel, *gated_types(2048), "2048")
print(json.dumps(out))
"""


def test_int8_row_stores_keep_the_blocks_layout():
    """The norm kernels that write int8 rows, compiled for sm_90 on the CPU: a block of rows is converted between
    layouts only for an fp32 store (the residual stream, its gradient), never for its int8 rows. Triton lays a block
    out for its widest access; with the rows' stride specialised as a multiple of 16, int8 stores took 16 values a
    thread and every block went through shared memory again for its bf16 and fp32 loads and stores (one conversion
    more each for norm_quant, the residual backward with the rows and the gated backward; two more for the latter).
    On an H100 the residual backward with the rows took 0.27-0.63 ms a call at small's 768 against 0.16-0.18 without
    them (benchmarks/RESULTS.md, session 31). The kernels keep the stride unspecialised
    (``int8_triton._at_8_bytes``)."""
    counts = _sm90(_ROW_BLOCK_LAYOUTS, None)
    expected = {"norm_quant bf16 768": 0, "norm_quant fp32 768": 1, "norm_quant fp32 1536": 1,
                **{f"residual_norm_grad {k} {r}x{w} rows={rows}": 1
                   for k, r, w in [(768, 2, 4), (768, 4, 4), (1536, 4, 4), (1536, 4, 8)] for rows in (False, True)},
                "gated_norm_grad 2048": 1}
    assert counts == expected


def _tiny_models(monkeypatch, int8_grad: bool, layers: int = 2):
    """A tiny BitNet three ways from one init: the plain path, the int8 path with the residual norms as torch ops
    ($BITNET_INT8_RESIDUAL_NORM=0) and with them fused (residual_norm_quant; norm_quant for the first layer)."""
    cfg = BitNetConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    models = {"plain": BitNetForCausalLM(cfg)}
    with torch.no_grad():  # norm weights away from 1, so that their gradients and the norm's weighting count
        for name, p in models["plain"].named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    for name, env in (("torch", "0"), ("fused", "1")):
        monkeypatch.setenv("BITNET_INT8_RESIDUAL_NORM", env)
        m = models[name] = BitNetForCausalLM(cfg)
        m.load_state_dict(models["plain"].state_dict())
        L.enable(m, int8_grad, cache=True)
        L.refresh(m)
        assert all(layer.mlp.int8_fused.norm_quant == (env == "1") for layer in m.model.layers)
    return models


def _loss_and_grads(model, ids, autocast: bool, forward=None):
    """The next-token loss of ``ids`` through ``forward`` (default: ``model``; a compiled wrapper of it) and the
    gradients of ``model``'s parameters."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = (model if forward is None else forward)(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _same_training_fewer_rows_passes(monkeypatch, models: dict, name: str, ids, autocast: bool) -> int:
    """Asserts that ``models[name]`` gives ``models["off"]``'s loss and gradients bit for bit; returns how many fewer
    ``bitnet::quantize_grad_rows`` passes its backward made."""
    calls, results = {}, {}
    rows_pass = L.quantize_grad_rows
    for run in ("off", name):
        calls[run] = 0

        def counted(parts, col_scale, run=run):
            calls[run] += 1
            return rows_pass(parts, col_scale)

        monkeypatch.setattr(L, "quantize_grad_rows", counted)
        results[run] = _loss_and_grads(models[run], ids, autocast)
    (loss, grads), (loss_off, grads_off) = results[name], results["off"]
    assert torch.equal(loss, loss_off)
    for param, g in grads.items():
        assert torch.equal(g, grads_off[param]), param
    return calls["off"] - calls[name]


@pytest.mark.parametrize("grad_op", ["0", "1"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("int8_grad", [False, True])
def test_fused_residual_norms_give_the_models_loss_and_gradients(int8_grad, autocast, grad_op, monkeypatch):
    """The whole model with each residual add folded into the next residual norm's rounding (residual_norm_quant):
    the loss of the int8 path with those as torch ops, and its gradients (every parameter, embeddings and norm weights
    included: the add's backward hands the stream and the block's output the same gradient, plus the norm's), in fp32
    and under bf16 autocast (fp32 stream, bf16 block outputs), the backward in torch ops or through
    bitnet::residual_norm_grad ($BITNET_INT8_RESIDUAL_GRAD=1); close to the plain path as the int8 path is."""
    monkeypatch.setenv("BITNET_INT8_RESIDUAL_GRAD", grad_op)
    models = _tiny_models(monkeypatch, int8_grad)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    got = {name: _loss_and_grads(m, ids, autocast) for name, m in models.items()}
    (loss, grads), (loss_torch, grads_torch) = got["fused"], got["torch"]
    assert torch.equal(loss, loss_torch)
    for name, g in grads.items():
        assert rel(g, grads_torch[name]) < (1e-5 if autocast else 1e-6), name
    assert loss == pytest.approx(got["plain"][0].item(), abs=1e-2 if autocast else 1e-5)


@pytest.mark.parametrize("grad_op", ["0", "1"])
def test_fused_residual_norms_under_torch_compile(grad_op, monkeypatch):
    """torch.compile of the tiny model with the fused residual norms (the ops' fake kernels give inductor their
    outputs), their backward in torch ops or through bitnet::residual_norm_grad: the eager model's loss and gradients."""
    monkeypatch.setenv("BITNET_INT8_RESIDUAL_GRAD", grad_op)
    models = _tiny_models(monkeypatch, int8_grad=True, layers=1)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(disable=False):  # conftest turns compilation off for the other tests
        loss, grads = _loss_and_grads(models["fused"], ids, False, torch.compile(models["fused"]))
    models["fused"].zero_grad(set_to_none=True)
    eager_loss, eager_grads = _loss_and_grads(models["fused"], ids, autocast=False)
    assert loss.item() == pytest.approx(eager_loss.item(), abs=1e-5)
    for name, g in grads.items():
        assert rel(g, eager_grads[name]) < 1e-4, name


def test_residual_norm_quant_setting(monkeypatch):
    """$BITNET_INT8_RESIDUAL_NORM=0 leaves the residual adds and norms to torch (measurements), independently of the
    sub-norms' $BITNET_INT8_NORM_QUANT; anything but 0/1 is an error. $BITNET_INT8_RESIDUAL_GRAD=1 (off by default)
    puts their backward on bitnet::residual_norm_grad."""
    cfg = BitNetConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
    model = BitNetForCausalLM(cfg)
    monkeypatch.setenv("BITNET_INT8_RESIDUAL_NORM", "0")
    L.enable(model, True, cache=True)
    layer = model.model.layers[0]
    assert not layer.self_attn.int8_fused.norm_quant and layer.self_attn.o_proj.int8.norm_quant
    monkeypatch.setenv("BITNET_INT8_RESIDUAL_NORM", "off")
    with pytest.raises(BitnetError, match="BITNET_INT8_RESIDUAL_NORM"):
        L.enable(model, True, cache=True)
    monkeypatch.delenv("BITNET_INT8_RESIDUAL_GRAD", raising=False)
    assert not L.residual_norm_grad_kernel()  # opt-in
    monkeypatch.setenv("BITNET_INT8_RESIDUAL_GRAD", "1")
    assert L.residual_norm_grad_kernel()


def test_norm_quant_setting(monkeypatch):
    """$BITNET_INT8_NORM_QUANT=0 leaves the sub-norms to torch (measurements); anything but 0/1 is an error."""
    monkeypatch.setenv("BITNET_INT8_NORM_QUANT", "0")
    lin = BitLinear(32, 16)
    L.enable(lin, True, cache=True)
    assert not lin.int8.norm_quant
    monkeypatch.setenv("BITNET_INT8_NORM_QUANT", "on")
    with pytest.raises(BitnetError, match="BITNET_INT8_NORM_QUANT"):
        L.enable(lin, True, cache=True)


def test_int8_grad_weight_error_script_is_exact_on_int8_representable_operands():
    """benchmarks/int8_grad_weight_error.py's blockwise int8 weight gradient is G^T X exactly where rounding loses
    nothing (each block's column holds 127 and integers), and its error on random inputs is measured, not zero."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from int8_grad_weight_error import int8_grad_weight

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(-127, 128, (64, n), generator=g).float() for n in (12, 20))
    a[::16], b[::16] = 127.0, 127.0  # every 16-token block's column has its absmax 127: scale 1
    assert torch.equal(int8_grad_weight(a, b, 16), a.double().t() @ b.double())
    x = torch.randn(64, 12, generator=g)
    assert 1e-4 < rel(int8_grad_weight(x, x, 16), x.double().t() @ x.double()) < 0.05


def test_norm_quant_launch_by_row_width(monkeypatch):
    """norm_quant's launch: 4 warps, four rows a program up to 1,024 columns, two up to 2,048, then one (the fastest
    on an H200 at the recipes' widths); $BITNET_NQ overrides it."""
    pytest.importorskip("triton")
    from bitnet_cli.train import int8_triton as T

    monkeypatch.delenv("BITNET_NQ", raising=False)
    assert T.norm_quant_launch(768) == (4, 4) and T.norm_quant_launch(1536) == (2, 4) and T.norm_quant_launch(2048) == (2, 4)
    assert T.norm_quant_launch(4096) == (1, 4) and T.norm_quant_launch(5460) == (1, 4)
    monkeypatch.setenv("BITNET_NQ", "2,4")
    assert T.norm_quant_launch(768) == (2, 4)
    for bad in ("2", "3,4", "2,3", "0,4"):
        monkeypatch.setenv("BITNET_NQ", bad)
        with pytest.raises(BitnetError, match="BITNET_NQ"):
            T.norm_quant_launch(768)


def _grad_weight_case(seed: int, m: int, widths: list[int], k: int, dtype: torch.dtype = torch.bfloat16):
    """Training-sized output-gradient parts (an all-zero column in the first block: the floor), the forward's
    int8 rows of O(1) activations and their per-token scales."""
    g = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(m, w, generator=g) * 3e-5 * torch.rand(m, 1, generator=g) * 4).to(dtype) for w in widths]
    parts[0][: L.GRAD_WEIGHT_BLOCK, 0] = 0
    q, s_x = L.quantize_rows(torch.randn(m, k, generator=g) * (torch.rand(m, 1, generator=g) * 3 + 0.1))
    return parts, q, s_x


def test_grad_cols_reference_rounds_g_over_the_token_scale_per_block_and_column():
    """``quantize_grad_cols_reference``: G' = G / s_x rounded per block of 128 tokens and per column (a partial last
    block), transposed; each block's column absmax maps to +-127, every value within half a step of G'."""
    parts, q, s_x = _grad_weight_case(0, 300, [40, 24], 48)
    gq_t, d = L.quantize_grad_cols_reference(parts, s_x)
    assert gq_t.shape == (64, 300) and gq_t.stride(0) % 16 == 0 and d.shape == (3, 64)
    gp = torch.cat([p.float() for p in parts], -1) / s_x[:, None]
    step = d.repeat_interleave(L.GRAD_WEIGHT_BLOCK, 0)[:300]  # each value's block and column step
    assert ((gq_t.t().float() * step - gp).abs() <= 0.5 * step * (1 + 1e-6)).all()
    assert (gq_t.abs().reshape(64, -1)[:, :256].reshape(64, 2, 128).amax(-1)[1:] == 127).all()
    assert gq_t[0, :128].abs().max() == 0  # the all-zero column block: the floor, no division by zero


def test_int8_grad_weight_is_close_to_the_exact_weight_gradient():
    """The int8 weight gradient (int8_grad_weights: G' rounded, exact integer products with the forward's rows) is
    G^T X~ within rounding: under 1.5% (0.7% on normal inputs of 8,192 tokens by benchmarks/int8_grad_weight_error.py),
    and its reference is exact where G' needs no rounding (integers whose blocks' columns hold 127)."""
    parts, q, s_x = _grad_weight_case(1, 1024, [96, 32], 80)
    exact = torch.cat([p.double() for p in parts], -1).t() @ (q.double() / s_x.double()[:, None])
    dw = torch.cat(L.int8_grad_weights(parts, q, s_x))
    assert dw.dtype == torch.float32 and 1e-4 < rel(dw, exact) < 1.5e-2
    ints = torch.randint(-127, 128, (256, 16), generator=torch.Generator().manual_seed(2)).float()
    ints[::128] = 127.0
    s_one = torch.ones(256)
    gq_t, d = L.quantize_grad_cols_reference([ints], s_one)
    assert torch.equal(d, torch.ones(2, 16))
    assert torch.equal(L.int8_grad_weight_reference(gq_t, q[:256].t().contiguous(), d),
                       (ints.double().t() @ q[:256].double()).float())


_INTERPRETED_GRAD_WEIGHT = _INTERPRETER_LOOP_BOUNDS + """
import json, sys, torch, triton
from bitnet_cli.train import int8_linear as L, int8_triton as T
from test_int8_linear import _grad_weight_case
out = []
cfg = triton.Config({"BM": 16, "BN": 16, "GROUP_M": 2}, num_warps=4, num_stages=2)
for seed, m, widths, k, dtype in json.loads(sys.argv[1]):
    parts, q, s_x = _grad_weight_case(seed, m, widths, k, getattr(torch, dtype))
    gq_ref, d_ref = L.quantize_grad_cols_reference(parts, s_x)
    dw_ref = L.int8_grad_weight_reference(gq_ref, q.t().contiguous(), d_ref)
    for transposed in (True, False):  # the operand layouts int8_kernels.py times
        gq, d = T.quantize_grad_cols(parts, s_x, transposed=transposed, columns=16)
        for q_t in (L.pad_rows(q).t().contiguous(), q.t()):
            dw = T.int8_grad_weight(gq, q_t, d, config=cfg)
            out.append(torch.equal(gq, gq_ref) and torch.equal(d, d_ref) and torch.equal(dw, dw_ref))
print(json.dumps(out))
"""


def test_int8_grad_weight_kernels_match_their_references_in_the_interpreter():
    """``quantize_grad_cols`` and ``int8_grad_weight`` (Triton) in the CPU interpreter against their references bit
    for bit: several tiles per row and column, a partial last block of tokens, one and three parts, bf16 and fp32,
    transposed and untransposed operands."""
    pytest.importorskip("triton")
    cases = [[3, 300, [40, 24], 48, "bfloat16"], [4, 256, [16, 16, 8], 20, "float32"]]
    assert _interpret(_INTERPRETED_GRAD_WEIGHT, cases) == [True] * (4 * len(cases))


@pytest.mark.parametrize("norm", [False, True])
def test_int8_grad_weight_in_autograd_matches_the_bf16_weight_gradient(norm, monkeypatch):
    """``int8_weight`` (train.int8_grad_weight: on): the same outputs and input gradient, the weight gradients of
    stacked projections (and after a sub-norm, through norm_quant) within the rounding of G'."""
    from bitnet_cli.model import RMSNorm

    monkeypatch.delenv("BITNET_INT8_NORM_QUANT", raising=False)
    torch.manual_seed(0)
    ws = [torch.randn(n, 96) * 0.02 for n in (64, 32)]
    rms = RMSNorm(96, 1e-5) if norm else None
    x = torch.randn(2, 300, 96)
    g = torch.randn(2, 300, 96) * 3e-5
    res = []
    for int8_weight in (False, True):
        wd = [w.clone().requires_grad_() for w in ws]
        xd = x.clone().requires_grad_()
        ys = L.int8_linear(xd, wd, norm=rms, int8_weight=int8_weight)
        torch.autograd.backward(ys, list(g.split([64, 32], -1)))
        res.append((torch.cat(ys, -1), xd.grad, [w.grad for w in wd]))
    assert torch.equal(res[1][0], res[0][0]) and torch.equal(res[1][1], res[0][1])
    for a, b in zip(res[1][2], res[0][2]):
        assert a.dtype == torch.float32 and 1e-4 < rel(a, b) < 1.5e-2


def test_int8_grad_weight_setting_reaches_the_products(tmp_path):
    """``train.int8_grad_weight`` (off by default; YAML's bare on/off) is handed to every int8 product, and the
    trainer runs with it."""
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  steps: 1\n  int8_grad_weight: on\n")
    assert load_recipe(p).train.int8_grad_weight == "on"
    assert load_recipe(None, data={"train": {"steps": 1}}).train.int8_grad_weight == "off"
    with pytest.raises(BitnetError, match="int8_grad_weight"):
        load_recipe(None, ["train.int8_grad_weight=fast"], data={"train": {"steps": 1}})
    sets = ["train.steps=4", "train.log_every=1", "train.eval_every=4", "train.int8_matmul=on"]
    a = train(load_recipe(None, [*sets, "train.int8_grad_weight=on"], data=micro_recipe()), tmp_path / "a", progress=False)
    b = train(load_recipe(None, sets, data=micro_recipe()), tmp_path / "b", progress=False)
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert la[0] == pytest.approx(lb[0], abs=1e-6) and la == pytest.approx(lb, abs=2e-2) and la[-1] < la[0]
    assert a.val_loss == pytest.approx(b.val_loss, abs=2e-2)
    lin = BitLinear(32, 16)
    L.enable(lin, True, cache=True, int8_weight=True)
    assert lin.int8.int8_weight


def _tiny_int8_models(monkeypatch, switch: str, variants: dict[str, str], layers: int = 2,
                      int8_grad: bool = True, kv_heads: int = 2) -> dict[str, BitNetForCausalLM]:
    """A tiny BitNet from one init on the int8 path, one model per value of the environment switch ``switch``
    (``variants``: name -> value, the switch read as each model is built); norm weights away from 1, so that their
    gradients and the norm's weighting count. Four heads of 12, ``kv_heads`` of them for k and v."""
    cfg = BitNetConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=kv_heads, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    base = BitNetForCausalLM(cfg)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    models = {}
    for name, env in variants.items():
        monkeypatch.setenv(switch, env)
        m = models[name] = BitNetForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        L.enable(m, int8_grad, cache=True)
        L.refresh(m)
    return models


def _gated_models(monkeypatch, layers: int = 2):
    """The MLP's gate/up product and sub-norm as one function (Int8Product.residual_mlp, $BITNET_INT8_GATED_GRAD=1:
    "gated") and without ("unfused": _NormQuant after the product)."""
    return _tiny_int8_models(monkeypatch, "BITNET_INT8_GATED_GRAD", {"unfused": "0", "gated": "1"}, layers)


@pytest.mark.parametrize("autocast", [False, True])
def test_gated_mlp_gives_the_models_loss_and_gradients_bit_for_bit(autocast, monkeypatch):
    """The MLP's gate/up product and sub-norm as one autograd function (_GatedProduct: its backward forms gate's and up's
    output gradients and their int8 rows with bitnet::gated_norm_grad, here its reference) against _NormQuant after the
    stacked product with quantize_grad_rows: the same loss and every parameter's gradient bit for bit, in fp32 and under
    bf16 autocast (relu2 and the sub-norm in fp32, the gradients in bf16)."""
    models = _gated_models(monkeypatch)
    assert all(layer.mlp.int8_fused.gated_mlp for layer in models["gated"].model.layers)
    assert not any(layer.mlp.int8_fused.gated_mlp for layer in models["unfused"].model.layers)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    (loss, grads), (loss_unfused, grads_unfused) = (_loss_and_grads(models[n], ids, autocast) for n in ("gated", "unfused"))
    assert torch.equal(loss, loss_unfused)
    for name, g in grads.items():
        assert torch.equal(g, grads_unfused[name]), name


@pytest.mark.parametrize("fused", ["gated", "residual_rows", "rope_rows", "fp8_grad_weight"])
def test_fused_backwards_under_torch_compile(fused, monkeypatch):
    """torch.compile of the tiny model with the gated MLP ($BITNET_INT8_GATED_GRAD), with o_proj's and down_proj's
    products inside the residual norms ($BITNET_INT8_RESIDUAL_ROWS: RoundedInput passed between the layers) or with
    q/k/v's product and RoPE as one function ($BITNET_INT8_ROPE_ROWS), or with all of those and the fp8 weight gradient
    ($BITNET_INT8_FP8_GRAD_WEIGHT: its casts and torch._scaled_mm traced into the backward graph): the ops' fake kernels
    give inductor their outputs (the gradient rows' padded layout included), and the compiled model gives the eager
    model's loss and gradients."""
    if fused == "gated":
        model = _gated_models(monkeypatch, layers=1)["gated"]
    elif fused == "residual_rows":
        model = _residual_rows_models(monkeypatch, layers=2)["rows"]
    elif fused == "rope_rows":
        model = _rope_rows_models(monkeypatch, layers=2)["rope"]
    else:
        model = _fp8_pair(monkeypatch, "rows")["fp8"]
        monkeypatch.setenv("BITNET_INT8_FP8_GRAD_WEIGHT", "1")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(disable=False):  # conftest turns compilation off for the other tests
        loss, grads = _loss_and_grads(model, ids, False, torch.compile(model))
    model.zero_grad(set_to_none=True)
    eager_loss, eager_grads = _loss_and_grads(model, ids, autocast=False)
    assert loss.item() == pytest.approx(eager_loss.item(), abs=1e-5)
    for name, g in grads.items():
        assert rel(g, eager_grads[name]) < 1e-4, name


def test_gated_mlp_setting(monkeypatch):
    """$BITNET_INT8_GATED_GRAD (on by default) marks relu2 MLPs with a sub-norm gated_mlp where the int8 path's defaults
    hold (int8 grad_input, bf16 grad_weight, fused norms, cached weights) and gate's width is at most GATED_MAX_WIDTH
    in 16-byte rows; 0 or any of those off leaves them to _NormQuant; anything but 0/1 is an error. The gradient rows'
    halves start on 16-byte boundaries."""
    cfg = BitNetConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
    model = BitNetForCausalLM(cfg)
    mlp = model.model.layers[0].mlp
    monkeypatch.delenv("BITNET_INT8_GATED_GRAD", raising=False)
    L.enable(model, True, cache=True)
    assert mlp.int8_fused.gated_mlp and not model.model.layers[0].self_attn.int8_fused.gated_mlp
    for kwargs in ({"int8_grad": False, "cache": True}, {"int8_grad": True, "cache": False},
                   {"int8_grad": True, "cache": True, "int8_weight": True}):
        L.enable(model, **kwargs)
        assert not mlp.int8_fused.gated_mlp, kwargs
    monkeypatch.setenv("BITNET_INT8_RESIDUAL_NORM", "0")
    L.enable(model, True, cache=True)
    assert not mlp.int8_fused.gated_mlp
    monkeypatch.delenv("BITNET_INT8_RESIDUAL_NORM")
    monkeypatch.setenv("BITNET_INT8_GATED_GRAD", "0")
    L.enable(model, True, cache=True)
    assert not mlp.int8_fused.gated_mlp
    monkeypatch.setenv("BITNET_INT8_GATED_GRAD", "yes")
    with pytest.raises(BitnetError, match="BITNET_INT8_GATED_GRAD"):
        L.enable(model, True, cache=True)
    wide = BitNetForCausalLM(BitNetConfig(vocab_size=64, hidden_size=32, intermediate_size=5460, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=None,
                                          eos_token_id=None))
    monkeypatch.delenv("BITNET_INT8_GATED_GRAD")
    L.enable(wide, True, cache=True)
    assert not wide.model.layers[0].mlp.int8_fused.gated_mlp  # 1.3b's width: slower than the unfused path
    monkeypatch.setenv("BITNET_INT8_GATED_WIDE", "1")  # the wide kernel's opt-in
    L.enable(wide, True, cache=True)
    assert wide.model.layers[0].mlp.int8_fused.gated_mlp
    assert [L.gated_grad_columns(f, torch.bfloat16) for f in (4096, 5460, 100)] == [4096, 5464, 104]
    assert L.gated_grad_columns(5460, torch.float32) == 5460


def _gated_grad_inputs(seed: int, m: int, f: int, dtype: torch.dtype):
    """gated_norm_grad's inputs: the gate/up product's output y [m, 2f], the sub-norm output's gradient (bf16), an
    fp32 weight, a positive rstd and one column scale per half; small multiples of powers of two (rstd aside), so that
    every sum of ``dh * y`` is exact in fp32 whatever its order (y multiples of 1/2 up to 2, grad_n of 1/4 up to 2,
    weight of 1/32)."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.randint(-4, 5, (m, 2 * f), generator=g) / 2).to(dtype)
    grad_n = (torch.randint(-8, 9, (m, f), generator=g) / 4).to(torch.bfloat16)
    weight = (torch.randint(1, 64, (f,), generator=g) / 32).float()
    col = torch.cat([torch.full((f,), 0.03), torch.full((f,), 0.011)])
    return y, grad_n, torch.rand(m, generator=g) + 0.1, weight, col


_INTERPRETED_GATED_GRAD = """
import json, sys, torch
from bitnet_cli.train import int8_linear as L, int8_triton as T
from test_int8_linear import _gated_grad_inputs
out = []
for seed, m, f, dtype, y_dtype in json.loads(sys.argv[1]):
    args = (*_gated_grad_inputs(seed, m, f, getattr(torch, dtype)), getattr(torch, y_dtype))
    ref = L.gated_norm_grad_reference(*args)
    fp = L.gated_grad_columns(f, args[0].dtype)
    # the default launch, and a few rows a program with a ragged last block; the same with the wide kernel, its rows
    # walked 16 columns at a time (a ragged last chunk)
    for rows, wide in ((None, False), (2, False), (4, False), (None, True), (3, True)):
        got = T.gated_norm_grad(*args, rows=rows, wide=wide, columns=16)
        halves = [slice(0, f), slice(fp, fp + f)]
        out.append([all(torch.equal(got[0][:, h], ref[0][:, h]) for h in halves), torch.equal(got[1], ref[1]),
                    torch.equal(got[2], ref[2]), bool(torch.allclose(got[3], ref[3], rtol=1e-5, atol=0))])
print(json.dumps(out))
"""


def test_gated_norm_grad_triton_kernel_matches_its_reference_in_the_interpreter():
    """The gated MLP's backward kernel (bitnet::gated_norm_grad) in Triton's CPU interpreter against its reference:
    gate's and up's gradient rows, their int8 rows and scales bit for bit, the norm weight's gradient (summed per
    program, then over programs) within fp32 rounding; ragged rows and widths (up's half then starts after a gap),
    relu2 in fp32 (under autocast) or bf16, fp32 gradients; the one-pass kernel and the wide one
    (``BITNET_INT8_GATED_WIDE``: each row walked in column chunks)."""
    pytest.importorskip("triton")
    cases = [[1, 5, 40, "bfloat16", "float32"], [2, 7, 20, "bfloat16", "bfloat16"], [3, 6, 48, "float32", "float32"]]
    assert _interpret(_INTERPRETED_GATED_GRAD, cases) == [[True] * 4] * (5 * len(cases))


def _residual_rows_models(monkeypatch, layers: int = 2):
    """o_proj's and down_proj's products taken inside the residual norm after them ($BITNET_INT8_RESIDUAL_ROWS=1:
    "rows") and without ("off"); the gated MLP as the caller's environment sets it."""
    return _tiny_int8_models(monkeypatch, "BITNET_INT8_RESIDUAL_ROWS", {"off": "0", "rows": "1"}, layers)


@pytest.mark.parametrize("gated", ["0", "1"])
@pytest.mark.parametrize("autocast", [False, True])
def test_residual_rows_give_the_models_loss_and_gradients_bit_for_bit(autocast, gated, monkeypatch):
    """o_proj's and down_proj's products inside the residual norm after them (_ProductResidualNormQuant: the norm's
    backward rounds their output gradient, bitnet::residual_norm_grad_rows, here its reference) against the products
    on their own with quantize_grad_rows: the same loss and every parameter's gradient bit for bit, in fp32 and under
    bf16 autocast, with the gated MLP (down_proj after _GatedProduct) and without (after _NormQuant with a gate); every
    such product but the last layer's down_proj (the final norm takes it) skips its rows pass."""
    monkeypatch.setenv("BITNET_INT8_GATED_GRAD", gated)
    layers = 2
    models = _residual_rows_models(monkeypatch, layers)
    for layer in models["rows"].model.layers:
        assert layer.self_attn.o_proj.int8.defer and layer.mlp.down_proj.int8.defer
        assert not layer.self_attn.int8_fused.defer and layer.mlp.int8_fused.gated_mlp == (gated == "1")
    assert not any(m.defer for m in models["off"].modules() if isinstance(m, L.Int8Product))
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    assert _same_training_fewer_rows_passes(monkeypatch, models, "rows", ids, autocast) == 2 * layers - 1


def test_residual_rows_setting(monkeypatch):
    """$BITNET_INT8_RESIDUAL_ROWS (on where unset, 0 turns it off) marks o_proj's and down_proj's products ``defer``
    only where the int8 path's defaults hold (int8 grad_input, bf16 grad_weight, fused norms, cached weights); an
    unknown value is an error."""
    cfg = BitNetConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)

    def deferred(model):
        return [m.defer for m in model.modules() if isinstance(m, L.Int8Product)].count(True)

    monkeypatch.setenv("BITNET_INT8_RESIDUAL_ROWS", "0")
    model = BitNetForCausalLM(cfg)
    L.enable(model, True, cache=True)
    assert deferred(model) == 0
    monkeypatch.delenv("BITNET_INT8_RESIDUAL_ROWS")
    for kwargs in ({"int8_grad": False, "cache": True}, {"int8_grad": True, "cache": False},
                   {"int8_grad": True, "cache": True, "int8_weight": True}):
        model = BitNetForCausalLM(cfg)
        L.enable(model, **kwargs)
        assert deferred(model) == 0, kwargs
    model = BitNetForCausalLM(cfg)
    L.enable(model, True, cache=True)
    L.refresh(model)
    assert deferred(model) == 2
    monkeypatch.setenv("BITNET_INT8_RESIDUAL_ROWS", "yes")
    with pytest.raises(BitnetError, match="BITNET_INT8_RESIDUAL_ROWS"):
        L.enable(BitNetForCausalLM(cfg), True, cache=True)


def test_the_fused_backward_rows_by_default_and_fp8_weight_gradients_for_wide_models(monkeypatch):
    """Where the three switches are unset, enable() turns RESIDUAL_ROWS and ROPE_ROWS on at every width, and
    FP8_GRAD_WEIGHT for models wider than WIDE_HIDDEN where the device has fp8 tensor cores (here pretended: the CPU
    has none), each only where the rest is the path's defaults (int8 grad_input, cached weights, a weight gradient not
    int8 already); a variable set to 0 or 1 wins either way, and enabled_switches() says what was chosen. A wide model
    trains to the same loss as with the switches set."""
    for v in ("BITNET_INT8_RESIDUAL_ROWS", "BITNET_INT8_ROPE_ROWS", "BITNET_INT8_FP8_GRAD_WEIGHT"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(L, "_fp8_by_default", False)  # restored after the test, whatever it enabled
    small = dict(vocab_size=64, intermediate_size=96, num_hidden_layers=1, bos_token_id=None, eos_token_id=None)

    def model(hidden):
        return BitNetForCausalLM(BitNetConfig(hidden_size=hidden, num_attention_heads=8, num_key_value_heads=2, **small))

    all_three = ["RESIDUAL_ROWS", "ROPE_ROWS", "FP8_GRAD_WEIGHT"]
    narrow, wide = model(L.WIDE_HIDDEN), model(L.WIDE_HIDDEN + 16)
    assert not L.wide_model(narrow) and L.wide_model(wide) and not L.wide_model(torch.nn.Linear(2048, 2048))
    L.enable(wide, True, cache=True)
    assert L.enabled_switches(wide) == ["RESIDUAL_ROWS", "ROPE_ROWS"]  # no fp8 tensor cores on the CPU
    monkeypatch.setattr(L, "fp8_capable", lambda device: True)
    L.enable(wide, True, cache=True)
    assert L.enabled_switches(wide) == all_three and L.fp8_grad_weight_enabled()
    L.enable(narrow, True, cache=True)
    assert L.enabled_switches(narrow) == ["RESIDUAL_ROWS", "ROPE_ROWS"] and not L.fp8_grad_weight_enabled()
    L.enable(wide, True, cache=True, int8_weight=True)  # the int8 weight gradient: no fp8 one, and no error
    assert L.enabled_switches(wide) == []
    for kwargs in ({"int8_grad": True, "cache": False}, {"int8_grad": False, "cache": True}):  # FSDP; bf16 grad_input
        L.enable(wide, **kwargs)
        assert not L.fp8_grad_weight_enabled(), kwargs
    monkeypatch.setenv("BITNET_INT8_ROPE_ROWS", "0")
    monkeypatch.setenv("BITNET_INT8_FP8_GRAD_WEIGHT", "0")
    L.enable(wide, True, cache=True)
    assert L.enabled_switches(wide) == ["RESIDUAL_ROWS"]
    monkeypatch.setenv("BITNET_INT8_RESIDUAL_ROWS", "0")
    L.enable(narrow, True, cache=True)
    assert L.enabled_switches(narrow) == []
    for v in ("BITNET_INT8_RESIDUAL_ROWS", "BITNET_INT8_ROPE_ROWS", "BITNET_INT8_FP8_GRAD_WEIGHT"):
        monkeypatch.setenv(v, "1")
    L.enable(narrow, True, cache=True)
    assert L.enabled_switches(narrow) == all_three

    # The default a wide model gets is the switches' computation: one step's loss and gradients as with them set.
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    runs = []
    for setting in ("1", None):
        for v in ("BITNET_INT8_RESIDUAL_ROWS", "BITNET_INT8_ROPE_ROWS", "BITNET_INT8_FP8_GRAD_WEIGHT"):
            monkeypatch.setenv(v, setting) if setting else monkeypatch.delenv(v)
        torch.manual_seed(0)
        m = model(L.WIDE_HIDDEN + 16)
        L.enable(m, True, cache=True)
        L.refresh(m)
        assert L.enabled_switches(m) == all_three
        runs.append(_loss_and_grads(m, ids, autocast=True))
    (loss_set, grads_set), (loss_default, grads_default) = runs
    assert torch.equal(loss_set, loss_default)
    assert all(torch.equal(grads_set[n], grads_default[n]) for n in grads_set)


def test_wide_gated_mlp_gives_the_models_loss_and_gradients_bit_for_bit(monkeypatch):
    """$BITNET_INT8_GATED_WIDE=1 gives MLPs wider than GATED_MAX_WIDTH (here lowered to 64) and with rows not of whole
    16-byte units (gate 100 wide: up's half of the gradient rows starts at column 104) the gated path: the same loss
    and gradients bit for bit as without it, under bf16 autocast."""
    monkeypatch.setattr(L, "GATED_MAX_WIDTH", 64)
    cfg = BitNetConfig(vocab_size=64, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    base = BitNetForCausalLM(cfg)
    models = {}
    for name, env in (("unfused", "0"), ("wide", "1")):
        monkeypatch.setenv("BITNET_INT8_GATED_WIDE", env)
        m = models[name] = BitNetForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        L.enable(m, True, cache=True)
        L.refresh(m)
        assert all(layer.mlp.int8_fused.gated_mlp == (env == "1") for layer in m.model.layers)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    (loss, grads), (loss_unfused, grads_unfused) = (_loss_and_grads(models[n], ids, True) for n in ("wide", "unfused"))
    assert torch.equal(loss, loss_unfused)
    for name, g in grads.items():
        assert torch.equal(g, grads_unfused[name]), name


_PTXAS_SPILLS = """
pointers = {"y_ptr": "bf16", "gn_ptr": "bf16", "rstd_ptr": "fp32", "w_ptr": "fp32", "col_ptr": "fp32",
            "d_ptr": "bf16", "q_ptr": "i8", "s_ptr": "fp32", "wp_ptr": "fp32"}
scalars = {**{n: "i32" for n in ["M", "stride_y", "stride_gn", "stride_d", "stride_q"]}, "inv_k": "fp32"}
out = []
for f in json.loads(sys.argv[1]):  # the wide kernel launched as the trainer does at gate width f
    rows, warps = 32, 4
    consts = {"F": f, "F_PAD": f + (-f % 8), "BC": T.GATED_WIDE_COLUMNS, "CHUNK": rows, "Y_DTYPE": tl.float32,
              "Y_BF16": False, "D_BF16": True, "FLOOR": 1e-30}
    types = {**{n: "*" + t for n, t in pointers.items()}, **scalars}
    out.append(spills(compile_sm90(T._gated_norm_grad_wide_kernel, types, consts, warps)))
print(json.dumps(out))
"""


def test_wide_gated_kernel_compiles_for_hopper_without_spills():
    """The wide gated backward (_gated_norm_grad_wide_kernel) at 1.3b's 5,460 and 700m's 4,096, compiled for sm_90 on
    the CPU by Triton's ptxas: no register spills (the one-pass kernel spilled 292 bytes at 5,460, which is why it is
    not used there)."""
    spills = _sm90(_PTXAS_SPILLS, [5460, 4096])
    assert spills == [[0, 0], [0, 0]]


def _rope_grad_inputs(seed: int, b: int, t: int, h: int, kv: int, d: int, dtype: torch.dtype, k_dtype: torch.dtype):
    """rope_grad_rows' inputs as SDPA and autograd hand them over: q's gradient [b, h, t, d] in the token-major layout
    of the heads' views (strides b, t, h, d order), k's [b, kv, t, d] contiguous in ``k_dtype`` (fp32 where autograd
    summed it over shared heads), v's every other column of a wider buffer (a column stride of 2); RoPE's fp32 tables
    of the model and one column scale per projection."""
    from bitnet_cli.model import rope_cos_sin

    g = torch.Generator().manual_seed(seed)
    dq = torch.randn(b, t, h, d, generator=g).to(dtype).transpose(1, 2)
    dk = (torch.randn(b, kv, t, d, generator=g) * 3).to(dtype).to(k_dtype)
    dv = (torch.randn(b, kv, t, 2 * d, generator=g) * 1e-3).to(dtype)[..., ::2]
    cos, sin = rope_cos_sin(t, d, 10000.0, "cpu", torch.float32)
    col = torch.cat([torch.full((h * d,), 0.03), torch.full((kv * d,), 0.011), torch.full((kv * d,), 0.5)])
    return dq, dk, dv, cos, sin, col, dtype


_INTERPRETED_ROPE_GRAD = """
import json, sys, torch
from bitnet_cli.train import int8_linear as L, int8_triton as T
from test_int8_linear import _rope_grad_inputs
out = []
for seed, b, t, h, kv, d, dtype, k_dtype in json.loads(sys.argv[1]):
    args = _rope_grad_inputs(seed, b, t, h, kv, d, getattr(torch, dtype), getattr(torch, k_dtype))
    ref = L.rope_grad_rows_reference(*args)
    for rows in (None, 2, 3):  # the default launch, and blocks of tokens (the column scales loaded once), ragged
        got = T.rope_grad_rows(*args, rows=rows)
        out.append([torch.equal(g, r) for g, r in zip(got, ref)])
print(json.dumps(out))
"""


def test_rope_grad_rows_triton_kernel_matches_its_reference_in_the_interpreter():
    """q/k/v's backward kernel (bitnet::rope_grad_rows) in Triton's CPU interpreter against its reference: q's and k's
    gradients before RoPE, the int8 rows of all three and their scales bit for bit; ragged token counts, GQA and odd
    head counts, head_dims whose halves are not powers of two, bf16 and fp32, k's gradient in fp32 (summed over
    shared heads under autocast), non-contiguous gradients."""
    pytest.importorskip("triton")
    cases = [[1, 2, 5, 4, 2, 8, "bfloat16", "float32"], [2, 1, 7, 3, 3, 12, "bfloat16", "bfloat16"],
             [3, 3, 2, 6, 2, 10, "float32", "float32"]]
    assert _interpret(_INTERPRETED_ROPE_GRAD, cases) == [[True] * 3] * (3 * len(cases))


def _rope_rows_models(monkeypatch, layers: int = 2, kv_heads: int = 2):
    """q/k/v's product and RoPE as one function ($BITNET_INT8_ROPE_ROWS=1: "rope") and without ("off"); the other fused
    paths as the caller's environment sets them."""
    return _tiny_int8_models(monkeypatch, "BITNET_INT8_ROPE_ROWS", {"off": "0", "rope": "1"}, layers,
                             kv_heads=kv_heads)


@pytest.mark.parametrize("others", ["defaults", "no_gated_mlp", "residual_rows"])
@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("autocast", [False, True])
def test_rope_rows_give_the_models_loss_and_gradients_bit_for_bit(autocast, kv_heads, others, monkeypatch):
    """q/k/v's product and RoPE as one autograd function (_RotaryProduct: its backward forms q's and k's gradients
    before RoPE and the int8 rows of all three with bitnet::rope_grad_rows, here its reference) against the product,
    torch's RoPE and quantize_grad_rows: the same loss and every parameter's gradient bit for bit (RoPE's backward
    rounded as eager autograd rounds it), in fp32 and under bf16 autocast (the rotated q and k in fp32, SDPA in bf16),
    with GQA (k's gradient summed over shared heads in fp32) and MHA, the gated MLP on and off, with o_proj's and
    down_proj's rows in the residual norms; each layer skips its quantize_grad_rows pass for q/k/v."""
    monkeypatch.setenv("BITNET_INT8_GATED_GRAD", "0" if others == "no_gated_mlp" else "1")
    monkeypatch.setenv("BITNET_INT8_RESIDUAL_ROWS", "1" if others == "residual_rows" else "0")
    layers = 2
    models = _rope_rows_models(monkeypatch, layers, kv_heads)
    assert all(layer.self_attn.int8_fused.rope_rows for layer in models["rope"].model.layers)
    assert not any(m.rope_rows for m in models["off"].modules() if isinstance(m, L.Int8Product))
    assert not any(layer.mlp.int8_fused.rope_rows for layer in models["rope"].model.layers)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    assert _same_training_fewer_rows_passes(monkeypatch, models, "rope", ids, autocast) == layers


def test_rope_rows_setting(monkeypatch):
    """$BITNET_INT8_ROPE_ROWS (on where unset, 0 turns it off) marks attention's stacked q/k/v product ``rope_rows``
    only where the int8 path's defaults hold (int8 grad_input, bf16 grad_weight, fused residual norms, cached weights)
    and q/k/v have no biases (Qwen2's); never an MLP's; an unknown value is an error."""
    cfg = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, bos_token_id=None, eos_token_id=None)

    def marked(model):
        return [m.rope_rows for m in model.modules() if isinstance(m, L.Int8Product)].count(True)

    monkeypatch.setenv("BITNET_INT8_ROPE_ROWS", "0")
    model = BitNetForCausalLM(BitNetConfig(**cfg))
    L.enable(model, True, cache=True)
    assert marked(model) == 0
    monkeypatch.delenv("BITNET_INT8_ROPE_ROWS")
    for kwargs in ({"int8_grad": False, "cache": True}, {"int8_grad": True, "cache": False},
                   {"int8_grad": True, "cache": True, "int8_weight": True}):
        L.enable(model, **kwargs)
        assert marked(model) == 0, kwargs
    L.enable(model, True, cache=True)
    assert marked(model) == 1 and model.model.layers[0].self_attn.int8_fused.rope_rows
    monkeypatch.setenv("BITNET_INT8_RESIDUAL_NORM", "0")
    L.enable(model, True, cache=True)
    assert marked(model) == 0
    monkeypatch.delenv("BITNET_INT8_RESIDUAL_NORM")
    qwen = BitNetForCausalLM(BitNetConfig(**cfg, family="qwen2"))
    L.enable(qwen, True, cache=True)
    assert marked(qwen) == 0
    monkeypatch.setenv("BITNET_INT8_ROPE_ROWS", "yes")
    with pytest.raises(BitnetError, match="BITNET_INT8_ROPE_ROWS"):
        L.enable(model, True, cache=True)


_PTXAS_ROPE = """
pointers = {"dq_ptr": "bf16", "dk_ptr": "bf16", "dv_ptr": "bf16", "cos_ptr": "fp32", "sin_ptr": "fp32",
            "col_ptr": "fp32", "d_ptr": "bf16", "q_ptr": "i8", "s_ptr": "fp32"}
strides = [p + n for p in ("sq_", "sk_", "sv_") for n in "bht"] + ["stride_cos", "stride_sin", "stride_d", "stride_q"]
out = []
for heads, d in json.loads(sys.argv[1]):  # MHA under bf16 autocast, launched as the trainer does
    rows, warps = T.rope_grad_rows_launch()
    consts = {"sq_d": 1, "sk_d": 1, "sv_d": 1, "H": heads, "KV": heads, "HALF": d // 2,
              "BH": triton.next_power_of_2(heads), "BKV": triton.next_power_of_2(heads),
              "BD": triton.next_power_of_2(d // 2), "CHUNK": rows, "DTYPE": tl.bfloat16, "BF16": True, "FLOOR": 1e-30}
    types = {**{n: "*" + t for n, t in pointers.items()}, **{n: "i32" for n in ["M", "T", *strides]}}
    # pointers and row strides 16-byte aligned, as at the recipes' shapes (SDPA's heads: a head's stride is d)
    ptx = compile_sm90(T._rope_grad_rows_kernel, types, consts, warps, lambda n: n.endswith("_ptr") or n in strides)
    out.append([spills(ptx), accesses(ptx)])
print(json.dumps(out))
"""


def test_rope_grad_rows_kernel_compiles_for_hopper_without_spills():
    """q/k/v's backward kernel (_rope_grad_rows_kernel) at 700m's heads (16 x 96), 1.3b's (32 x 64) and small's
    (12 x 64), compiled for sm_90 on the CPU by Triton's ptxas as the trainer launches it: no register spills, and at
    700m's and 1.3b's the gradients' halves read and written in vector accesses (SDPA's rows of a head are contiguous;
    at small's a thread holds two bf16 of a half: 4-byte accesses)."""
    result = _sm90(_PTXAS_ROPE, [[16, 96], [32, 64], [12, 64]])
    assert [spills for spills, _ in result] == [[0, 0]] * 3
    for _, accesses in result[:2]:
        assert any(a.startswith("ld.global.v") for a in accesses) and any(a.startswith("st.global.v") for a in accesses)


# ----------------------------------------------------------------------------- the fp8 weight gradient


@pytest.mark.parametrize("m, k", [(512, 96), (300, 90)])
def test_fp8_grad_weight_is_g_transpose_x_within_fp8_rounding(m, k):
    """fp8_grad_weight: [G_0 | G_1]^T X~ (stacked by rows, fp32) from e4m3 operands, within fp8's rounding (a few
    percent, far above bf16's) of the exact product; a wrong layout, scale, padding or part order would be off by
    100%. Token counts and widths that are not multiples of 16 are zero-padded for the product and cut from dW. An
    all-zero output gradient gives an all-zero dW, not NaN."""
    torch.manual_seed(0)
    token_scale = torch.randn(m, 1).exp()  # log-normal per-token magnitudes, as training's gradients have
    parts = [(torch.randn(m, w) * 3e-5 * token_scale).to(torch.bfloat16) for w in (64, 40)]
    q, s_x = L.quantize_rows(torch.randn(m, k))
    x = (q.float() / s_x[:, None]).to(torch.bfloat16)
    dw = L.fp8_grad_weight(parts, x)
    exact = torch.cat([g.double().t() @ x.double() for g in parts])
    assert dw.shape == (104, k) and dw.dtype == torch.float32
    assert 1e-3 < rel(dw.double(), exact) < 0.08
    zero = L.fp8_grad_weight([torch.zeros(m, 8, dtype=torch.bfloat16)], x)
    assert torch.equal(zero, torch.zeros(8, k))
    # as training casts it: X~ from the int8 rows and 1 / s_x, the absmax bounds given rather than computed
    g_bound = torch.stack([g.float().abs().amax() for g in parts]).amax() * 1.5
    dw_rows = L.fp8_grad_weight(parts, q, row_scale=1.0 / s_x, g_amax=g_bound, x_amax=127.0 / s_x.min())
    assert dw_rows.shape == (104, k) and 1e-3 < rel(dw_rows.double(), exact) < 0.08
    assert not torch.equal(dw_rows, dw)


def _fp8_pair(monkeypatch, others: str) -> dict:
    """The tiny int8 model twice from one init; ``others``: which fused backwards it runs ("defaults"; "rows": RoPE's
    and the residual norms' rows too; "no_fusions": the residual norms as torch ops, no gated MLP)."""
    monkeypatch.setenv("BITNET_INT8_ROPE_ROWS", "1" if others == "rows" else "0")
    monkeypatch.setenv("BITNET_INT8_RESIDUAL_ROWS", "1" if others == "rows" else "0")
    monkeypatch.setenv("BITNET_INT8_GATED_GRAD", "0" if others == "no_fusions" else "1")
    residual_norm = "0" if others == "no_fusions" else "1"
    return _tiny_int8_models(monkeypatch, "BITNET_INT8_RESIDUAL_NORM", {"bf16": residual_norm, "fp8": residual_norm})


@pytest.mark.parametrize("others", ["defaults", "rows", "no_fusions"])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_fp8_switch_moves_every_weight_gradient_and_nothing_else(autocast, others, monkeypatch):
    """$BITNET_INT8_FP8_GRAD_WEIGHT=1: each stacked product's weight gradient (q/k/v, o_proj, gate/up, down_proj: four
    a layer) is one fp8 product, through every backward that forms one (_Int8Linear, _GatedProduct, _RotaryProduct,
    _ProductResidualNormQuant), cast from the int8 rows the forward saved; the BitLinear weights' gradients stay within fp8's rounding of the bf16 ones, and every
    other number (the loss, the norms' and embeddings' gradients, which no weight gradient feeds) is bit for bit the
    same."""
    models = _fp8_pair(monkeypatch, others)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    calls = []
    product = L.fp8_grad_weight
    monkeypatch.setattr(L, "fp8_grad_weight",
                        lambda gs, x, **kw: calls.append((len(gs), kw["g_amax"] is not None)) or product(gs, x, **kw))
    monkeypatch.setenv("BITNET_INT8_FP8_GRAD_WEIGHT", "0")
    loss, grads = _loss_and_grads(models["bf16"], ids, autocast)
    assert calls == []
    monkeypatch.setenv("BITNET_INT8_FP8_GRAD_WEIGHT", "1")
    loss8, grads8 = _loss_and_grads(models["fp8"], ids, autocast)
    # per layer: q/k/v (3 parts), o, gate/up (2), down; G's absmax bounded from its int8 rows' scales in each
    assert sorted(calls) == sorted([(3, True), (1, True), (2, True), (1, True)] * 2)
    assert torch.equal(loss8, loss)
    bitlinear = {f"{n}.weight" for n, m in models["fp8"].named_modules() if isinstance(m, BitLinear)}
    assert len(bitlinear) == 2 * 7
    for name, g in grads8.items():
        if name in bitlinear:
            assert g.dtype == torch.float32 and 1e-4 < rel(g, grads[name]) < 0.1, name
        else:
            assert torch.equal(g, grads[name]), name


def test_the_fp8_weight_gradient_setting(monkeypatch, tmp_path):
    """$BITNET_INT8_FP8_GRAD_WEIGHT (off by default) trains: a few steps of the micro recipe follow the bf16 weight
    gradient's losses; with train.int8_grad_weight: on (the int8 weight gradient) it is an error, as is a value
    other than 0 or 1."""
    monkeypatch.delenv("BITNET_INT8_FP8_GRAD_WEIGHT", raising=False)
    assert not L.fp8_grad_weight_enabled()
    sets = ["train.steps=4", "train.log_every=1", "train.eval_every=4", "train.int8_matmul=on"]
    b = train(load_recipe(None, sets, data=micro_recipe()), tmp_path / "b", progress=False)
    monkeypatch.setenv("BITNET_INT8_FP8_GRAD_WEIGHT", "1")
    a = train(load_recipe(None, sets, data=micro_recipe()), tmp_path / "a", progress=False)
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert la[0] == lb[0] and la != lb and la == pytest.approx(lb, abs=2e-2) and la[-1] < la[0]
    assert a.val_loss == pytest.approx(b.val_loss, abs=2e-2)
    with pytest.raises(BitnetError, match="FP8_GRAD_WEIGHT"):
        L.enable(BitLinear(32, 16), True, cache=True, int8_weight=True)
    monkeypatch.setenv("BITNET_INT8_FP8_GRAD_WEIGHT", "e4m3")
    with pytest.raises(BitnetError, match="expected 0 or 1"):
        L.fp8_grad_weight_enabled()
