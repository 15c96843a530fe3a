"""The int8 BitLinear kernels on a GPU: exactness against the reference, then speed against bf16.

    python benchmarks/int8_kernels.py [--out int8_kernels.json] [--models small,700m,1.3b]
    python benchmarks/int8_kernels.py --skip-checks --models 700m,1.3b --tiles 700m   # timings alone

1. Both Triton products behind ``bitnet::int8_mm`` (pointer loads; persistent with TMA loads where
   the rows are 16-byte aligned) and the op itself against ``int8_mm_reference`` (pure torch, on the
   CPU) on fresh random int8 x ternary operands, aligned and ragged shapes, bf16 and fp32 outputs,
   with and without the per-column scale: bit for bit.
2. ``bitnet::quantize_grad_rows`` (Triton: the output gradient's parts rounded per token in one
   pass) against ``quantize_grad_rows_reference`` on the CPU: q/k/v-, gate/up- and single-shaped
   parts, bf16 and fp32, training-sized (3e-8) and O(1) gradients, all-zero rows: bit for bit.
3. The per-step ternary refresh at the 700m and 1.3b layer shapes, Triton against eager: bit for bit, and
   each one's time per call (:func:`check_refresh`).
3b. The autograd function (forward, grad_input in int8 and in bf16, grad_weight) on the GPU
   against the same code on the CPU (the emulation), one projection and three stacked: relative errors.
4. The host's cost of one product's launch (a 256 x 256 x 256 product, whose GPU time is a few
   microseconds, issued 500 times without waiting: the issuing rate is the host's), each kernel
   called directly and through ``bitnet::int8_mm``, against a bf16 ``F.linear`` (cuBLAS).
5. Timings (median of ``triton.testing.do_bench``) at each product of a layer at the recipes' shapes
   (forward, tokens per micro-batch x K -> N; grad_input, tokens x N -> K; grad_weight, N x tokens
   -> K; q/k/v and gate/up stacked as the trainer runs them): bf16 as the trainer runs it (cuBLAS),
   the two Triton int8 kernels with their epilogue (autotuned; for grad_weight, which the trainer
   runs in bf16, what int8 operands would give), the op ``bitnet::int8_mm`` with its dispatch,
   ``torch._int_mm`` alone (no scales), and the compiled per-token quantisation that feeds the int8
   product; ``--tiles MODELS`` also times every tile of both kernels alone (their autotuning lists and
   a few more, :func:`sweep_tiles`), each checked bit for bit against the autotuned pointer kernel.
   TFLOP/s (TOP/s) count 2 x M x N x K. ``--skip-checks`` leaves out 1.-4.
6. ``--grad-rows MODELS`` (alone): ``quantize_grad_rows`` at those models' output-gradient shapes with each
   launch (rows per program, warps), timed and checked against the default launch (:func:`sweep_grad_rows`).
7. ``--norm-quant MODELS`` (alone): ``bitnet::norm_quant`` against its reference on the GPU (:func:`check_norm_quant`),
   then its launches at those models' sub-norm shapes, timed beside the compiled torch code (:func:`sweep_norm_quant`).
7b. ``--residual-norm MODELS`` (alone): ``bitnet::residual_norm_quant`` against its reference on the GPU
   (:func:`check_residual_norm_quant`) and its backward kernel ``bitnet::residual_norm_grad`` against its reference
   (:func:`check_residual_norm_grad`; with delta's int8 rows too, ``bitnet::residual_norm_grad_rows``), a two-layer
   model's loss and gradients with and without them under bf16 autocast (:func:`check_residual_norm_autograd`; also
   with ``$BITNET_INT8_RESIDUAL_ROWS=1``), then the forward's launches at those models' hidden widths, timed beside the
   compiled torch code it replaces, and the backward beside its compiled torch ops and, with the rows, beside itself
   then ``quantize_grad_rows`` (:func:`sweep_residual_norm_quant`).
7c. ``--gated MODELS`` (alone): ``bitnet::gated_norm_grad`` (the relu2 MLP's sub-norm backward with gate/up's
   output-gradient rounding; its one-pass kernel and the wide one, ``$BITNET_INT8_GATED_WIDE``) against its reference
   on the GPU (:func:`check_gated_norm_grad`), a two-layer model's loss and gradients with and without it under bf16
   autocast at 700m's and (wide) 1.3b's widths (:func:`check_gated_autograd`), then both kernels' launches at those
   models' gate/up widths, timed beside the compiled torch ops and ``quantize_grad_rows`` it replaces
   (:func:`sweep_gated_norm_grad`).
7d. ``--rope MODELS`` (alone): ``bitnet::rope_grad_rows`` (q/k/v's RoPE backward with their output-gradient rounding,
   ``$BITNET_INT8_ROPE_ROWS``) against its reference on the GPU, SDPA's own gradients as input
   (:func:`check_rope_grad_rows`), a two-layer model's loss and gradients with and without it under bf16 autocast
   (:func:`check_rope_autograd`), then its launches at those models' heads, timed beside the compiled torch RoPE
   backward and ``quantize_grad_rows`` it replaces (:func:`sweep_rope_grad_rows`).
8. ``--grad-weight MODELS`` (alone): the int8 weight gradient (``quantize_grad_cols``, ``int8_grad_weight``) against its
   references (:func:`check_grad_weight`), then timed at those models' shapes beside the bf16 products
   (:func:`sweep_grad_weight`).
8b. ``--fp8-grad-weight MODELS`` (alone): the trainer's fp8 weight gradient (``$BITNET_INT8_FP8_GRAD_WEIGHT``:
   ``torch._scaled_mm``, G^T and X~ in e4m3, one scale per tensor) against the bf16 products, time and
   error, its casts apart and with them (:func:`sweep_fp8_grad_weight`): whether an fp8 weight gradient pays.
9. ``--tma-variants MODELS`` (alone): the TMA kernel's tile options (the TMA store in halves, group widths, warp
   specialisation) at those models' forward and grad_input products, each timed and checked against the exact
   product (:func:`sweep_tma_variants`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's bitnet_cli
from bitnet_cli.train import int8_linear as L  # noqa: E402

SHAPES = {  # name: (tokens per micro-batch, [(K, N) of qkv, o, gate-up, down]); grad_input is (N, K)
    "small": (32 * 1024, [(768, 2304), (768, 768), (768, 4096), (2048, 768)]),
    "700m": (16 * 2048, [(1536, 4608), (1536, 1536), (1536, 8192), (4096, 1536)]),
    "1.3b": (16 * 2048, [(2048, 6144), (2048, 2048), (2048, 10920), (5460, 2048)]),
}

# M, N, K of the exactness checks: ragged and aligned, 1.3b's K = 5460 (rows padded for TMA), wide N.
EXACT_CASES = [(300, 200, 333), (300, 200, 336), (4096, 768, 768), (1000, 5460, 2048), (777, 2048, 5460),
               (4096, 2304, 768), (333, 10920, 2048), (64, 64, 64)]


def check_exact(cases: list[tuple[int, int, int]]) -> list[dict]:
    """Both kernels (the TMA one where its alignment allows) against the reference. Each case runs one
    tile of each kernel, the tiles taken in turn so that every tile of both is checked, instead of
    autotuning every case (compiling all tiles for each case's specialisation took minutes); then both
    kernels and the op ``bitnet::int8_mm`` as the trainer runs them, three calls a shape (the first
    autotunes, the others launch the cached compiled kernel)."""
    from triton.runtime.errors import OutOfResources

    from bitnet_cli.train import int8_triton

    out = []
    tiles = {"pointer": int8_triton._CONFIGS, "tma": int8_triton._TMA_CONFIGS}
    for case, (M, N, K) in enumerate(cases):
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
        b = torch.randint(-1, 2, (N, K), dtype=torch.int8)
        rm = torch.rand(M) * 0.02 + 1e-4
        cm = torch.rand(N) * 0.05 + 1e-3
        # The pointer kernel on contiguous operands; the TMA one on rows padded to 16 bytes (L.pad_rows),
        # as the trainer hands them over where K is not a multiple of 16.
        operands = {"pointer": (a.cuda(), b.cuda()), "tma": (L.pad_rows(a.cuda()), L.pad_rows(b.cuda()))}
        for kernel, (ag, bg) in operands.items():
            for dt, col in ((torch.bfloat16, cm), (torch.float32, cm), (torch.bfloat16, None)):
                ref = L.int8_mm_reference(a, b, rm, col, dt)
                # A tile whose shared memory this specialisation exceeds (the TMA kernel's fp32 epilogue, or
                # an unaligned N, stages its tile through shared memory) cannot compile: the autotuner drops
                # it, and so does this check, taking the next tile.
                skipped = []
                # the TMA tiles this product's autotuning offers (warp specialisation only with the TMA store)
                offered = tiles[kernel] if kernel == "pointer" else int8_triton._tma_tiles(
                    tiles[kernel], {}, TMA_STORE=int8_triton.tma_store(N, dt))
                try:
                    for turn in range(len(offered)):
                        tile = offered[(case + turn) % len(offered)]
                        try:
                            got = int8_triton.int8_mm(ag, bg, rm.cuda(), None if col is None else col.cuda(), dt,
                                                      kernel, config=tile).cpu()
                            break
                        except OutOfResources:
                            skipped.append(str(tile))
                    else:
                        raise RuntimeError("no tile fits")
                except Exception as e:  # noqa: BLE001 (recorded as a failed check; the other cases still run)
                    out.append({"kernel": kernel, "M": M, "N": N, "K": K, "tile": str(tile), "bit_exact": False,
                                "error": repr(e)[:500]})
                    print(json.dumps(out[-1]), flush=True)
                    continue
                exact = torch.equal(got, ref)
                out.append({"kernel": kernel, "M": M, "N": N, "K": K, "tile": str(tile), "dtype": str(dt),
                            "col_mul": col is not None, "skipped_tiles": skipped,
                            "bit_exact": exact, "max_abs": (got.float() - ref.float()).abs().max().item(),
                            "nan": bool(got.isnan().any())})
                print(json.dumps(out[-1]), flush=True)
    # As the trainer calls them: autotuned, then (second and third call of a shape) launched directly by
    # int8_triton's cache of compiled kernels; each kernel through int8_triton.int8_mm, and the op.
    for M, N, K in [(4096, 2304, 768), (777, 2048, 5460)]:
        a, b = torch.randint(-128, 128, (M, K), dtype=torch.int8), torch.randint(-1, 2, (N, K), dtype=torch.int8)
        rm, cm = torch.rand(M) * 0.02 + 1e-4, torch.rand(N) * 0.05 + 1e-3
        ag, bg = L.pad_rows(a.cuda()), L.pad_rows(b.cuda())
        for kernel in ("pointer", "tma", f"{int8_triton.default_kernel()} (bitnet::int8_mm)"):
            for dt, col in ((torch.bfloat16, cm), (torch.bfloat16, None)):
                ref = L.int8_mm_reference(a, b, rm, col, dt)
                colg = None if col is None else col.cuda()
                for call in range(3):
                    if kernel in ("pointer", "tma"):
                        got = int8_triton.int8_mm(ag, bg, rm.cuda(), colg, dt, kernel).cpu()
                    else:
                        got = L.int8_mm(ag, bg, rm.cuda(), colg, dt).cpu()
                    out.append({"kernel": kernel, "M": M, "N": N, "K": K, "dtype": str(dt), "col_mul": col is not None,
                                "call": call, "bit_exact": torch.equal(got, ref)})
                    print(json.dumps(out[-1]), flush=True)
    return out


def check_grad_rows() -> list[dict]:
    out = []
    torch.manual_seed(1)
    for m, widths in [(4096, [768, 768, 768]), (2048, [2048, 2048]), (1000, [5460, 5460]), (333, [300, 100, 57]),
                      (4096, [768]), (64, [2048, 512, 512])]:
        for dt, scale in ((torch.bfloat16, 3e-8), (torch.bfloat16, 1.0), (torch.float32, 3e-8)):
            parts = [(torch.randn(m, w) * scale * torch.rand(m, 1) * 4).to(dt) for w in widths]
            parts[0][5:9] = 0
            for p in parts:
                p[7] = 0  # an all-zero token row: the floor
            col = torch.cat([torch.full((w,), 0.01 * (i + 1) + 0.003) for i, w in enumerate(widths)])
            q_ref, s_ref = L.quantize_grad_rows_reference(parts, col)
            q, s = L.quantize_grad_rows([p.cuda() for p in parts], col.cuda())
            out.append({"M": m, "widths": widths, "dtype": str(dt), "scale": scale,
                        "bit_exact": torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref),
                        "q_diff": int((q.cpu().int() - q_ref.int()).abs().max()),
                        "s_ulps_differ": int((s.cpu() != s_ref).sum())})
            print(json.dumps(out[-1]), flush=True)
    return out


# (M, K, gate) of the norm_quant checks: attention's sub-norm (o_proj's input) and the MLP's (relu2 first, down_proj's
# input) at each recipe's widths; K = 5460 (1.3b's FFN) pads the int8 rows; 333 rows leave a ragged last block.
NORM_CASES = [(4096, 768, False), (4096, 2048, True), (4096, 1536, False), (4096, 4096, True), (2048, 2048, False),
              (1000, 5460, True), (333, 100, True)]


def _norm_case(m: int, k: int, gate: bool, exact_sums: bool, seed: int):
    """bf16 x (and gate as the half of a [m, 2k] product's rows, as the MLP hands it over), fp32 norm weight, on the
    GPU. ``exact_sums``: small multiples of powers of two, so that every order of the sum of squares gives the same
    fp32 (then the kernel must match torch bit for bit); else normal activations with a spread of row scales."""
    g = torch.Generator().manual_seed(seed)
    if exact_sums:  # y = relu(gate)^2 x: multiples of 1/16 up to 2, their squares' sums below 2^24 / 256
        x, gt = torch.randint(-8, 9, (m, 2 * k), generator=g) / 4, torch.randint(-2, 3, (m, 2 * k), generator=g) / 2
    else:
        x, gt = (torch.randn(m, 2 * k, generator=g) * torch.rand(m, 1, generator=g) * 3 for _ in range(2))
    w = torch.rand(k, generator=g) + 0.5
    x, gt = (t.to(torch.bfloat16).cuda()[:, k:] for t in (x, gt))
    return x, gt if gate else None, w.cuda()


def check_norm_quant() -> list[dict]:
    """``bitnet::norm_quant`` (Triton) against :func:`norm_quant_reference` run by torch on the same GPU (the plain
    path's eager numerics): with exact sums of squares bit for bit (``bit_exact``); with normal inputs the fraction
    of int8 values and of scales that differ (the sum's order differs from torch's reduction), and the fraction of
    int8 values in which the torch.compile'd rounding of the plain path (inductor's fusion of the same torch code,
    the int8 path before norm_quant) differs from eager torch."""
    from bitnet_cli.model import relu2, rms_norm

    torch._dynamo.config.cache_size_limit = 64  # one compilation per case's shape

    @torch.compile(dynamic=False)
    def inductor(x, gt, w):
        y = x if gt is None else relu2(gt, x)
        return L.quantize_rows(rms_norm(y, w, 1e-5))[0]

    out = []
    for i, (m, k, gate) in enumerate(NORM_CASES):
        # relu2 in bf16, and in fp32 as CUDA's bf16 autocast computes it (int8_linear.norm_quant_reference)
        for exact_sums, yd in ((True, None), (False, None)) + (((True, torch.float32), (False, torch.float32)) if gate else ()):
            x, gt, w = _norm_case(m, k, gate, exact_sums, i)
            ref = L.norm_quant_reference(x, gt, w, 1e-5, torch.bfloat16, yd)
            got = L.norm_quant(x, gt, w, 1e-5, torch.bfloat16, yd)
            row = {"M": m, "K": k, "gate": gate, "y_dtype": str(yd or x.dtype), "exact_sums": exact_sums,
                   "bit_exact": all(torch.equal(a, b) for a, b in zip(got, ref)),
                   "q_differ": float((got[0] != ref[0]).float().mean()), "q_diff_max": int((got[0].int() - ref[0].int()).abs().max()),
                   "s_differ": float((got[1] != ref[1]).float().mean()), "rstd_differ": float((got[3] != ref[3]).float().mean()),
                   "xd_differ": float((got[2] != ref[2]).float().mean()),
                   # X~ from the kernel's own int8 rows and scales: its division, apart from the sum's order
                   "xd_exact_given_q": torch.equal(got[2], (got[0].float() / got[1][:, None]).to(torch.bfloat16)),
                   "inductor_q_differ": float((inductor(x, gt, w) != ref[0]).float().mean())}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def check_norm_quant_autograd() -> list[dict]:
    """The sub-norm and its BitLinear on the int8 path (bf16 autocast, as the trainer runs them) with norm_quant
    against the same modules without it (the torch ops): the relative differences of the output and of the
    gradients of x, gate, the norm's weight and the projection's weight (norm_quant's backward is its own), and
    whether the products' int8 inputs are the same."""
    from bitnet_cli.model import BitLinear, RMSNorm, _sub_norm_project

    out = []
    for k, n, gate in ((1536, 1536, False), (4096, 1536, True)):
        torch.manual_seed(0)
        norm, proj = RMSNorm(k, 1e-5).cuda(), BitLinear(k, n).cuda()
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        L.enable(proj, True, cache=True)
        L.refresh(proj, "torch")
        x0 = torch.randn(4, 1024, k, device="cuda", dtype=torch.bfloat16)
        g0 = torch.randn_like(x0) if gate else None
        d = torch.randn(4, 1024, n, device="cuda", dtype=torch.bfloat16) * 1e-4
        res = {}
        for fused in (True, False):
            proj.int8.norm_quant = fused
            norm.weight.grad = proj.weight.grad = None
            x = x0.clone().requires_grad_()
            g = g0.clone().requires_grad_() if gate else None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = _sub_norm_project(norm, proj, x, gate=g)
            y.backward(d)
            res[fused] = [y.detach(), x.grad, norm.weight.grad, proj.weight.grad] + ([g.grad] if gate else [])
        names = ["y", "grad_x", "grad_norm_weight", "grad_weight", "grad_gate"]
        row = {"K": k, "N": n, "gate": gate}
        for name, a, b in zip(names, res[True], res[False]):
            row[name] = float((a.float() - b.float()).norm() / b.float().norm())
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def sweep_norm_quant(models: list[str], m: int = 32768) -> list[dict]:
    """``norm_quant``'s launches (rows per program, warps) at the models' sub-norm shapes (o_proj's input; down_proj's,
    relu2 first), each checked against the default launch's bits, beside the torch.compile'd torch code it replaces."""
    from triton.testing import do_bench

    from bitnet_cli.model import relu2, rms_norm
    from bitnet_cli.train import int8_triton as T

    @torch.compile(dynamic=False)
    def inductor(x, gt, w):
        y = x if gt is None else relu2(gt, x)
        q, s = L.quantize_rows(rms_norm(y, w, 1e-5))
        return q, s, (q.float() / s[:, None]).to(torch.bfloat16)

    out = []
    for name in models:
        hidden, ffn = SHAPES[name][1][1][0], SHAPES[name][1][3][0]
        for k, gate in ((hidden, False), (ffn, True)):
            x, gt, w = _norm_case(m, k, gate, False, k)
            ref = T.norm_quant(x, gt, w, 1e-5, torch.bfloat16)
            default = T.norm_quant_launch(k)
            ms = do_bench(lambda: inductor(x, gt, w), return_mode="median")
            out.append({"model": name, "K": k, "gate": gate, "inductor": True, "ms": round(ms, 4)})
            print(json.dumps(out[-1]), flush=True)
            for r, wp in [(1, 2), (1, 4), (1, 8), (1, 16), (2, 4), (2, 8), (4, 4), (4, 8), (8, 4), (8, 8), (16, 8)]:
                got = T.norm_quant(x, gt, w, 1e-5, torch.bfloat16, rows=r, warps=wp)
                ms = do_bench(lambda: T.norm_quant(x, gt, w, 1e-5, torch.bfloat16, rows=r, warps=wp), return_mode="median")
                out.append({"model": name, "K": k, "gate": gate, "rows": r, "warps": wp, "default": (r, wp) == default,
                            "ms": round(ms, 4), "bit_exact": all(torch.equal(a, b) for a, b in zip(got, ref))})
                print(json.dumps(out[-1]), flush=True)
    return out


# (M, K) of the residual_norm_quant checks: each recipe's hidden width (the residual stream's); 333 rows and K = 100
# leave a ragged last block and a masked row tail.
RESIDUAL_CASES = [(4096, 768), (4096, 1536), (2048, 2048), (333, 100)]


def _residual_case(m: int, k: int, exact_sums: bool, seed: int):
    """The fp32 residual stream x and a bf16 block output delta [m, k] (as the trainer's bf16 autocast hands them to
    the residual add), an fp32 norm weight, on the GPU. ``exact_sums``: small multiples of powers of two (x + delta
    multiples of 1/8 up to 3: every order of the sum of squares gives the same fp32, so the kernel must match torch
    bit for bit); else normal values with a spread of row scales (the add's h must match bit for bit either way)."""
    g = torch.Generator().manual_seed(seed)
    if exact_sums:
        x, d = torch.randint(-8, 9, (m, k), generator=g) / 4, torch.randint(-8, 9, (m, k), generator=g) / 8
    else:
        x = torch.randn(m, k, generator=g) * 10
        d = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 3
    return x.cuda(), d.to(torch.bfloat16).cuda(), (torch.rand(k, generator=g) + 0.5).cuda()


def _inductor_residual_norm():
    """The torch code residual_norm_quant replaces, compiled: the add, the norm, the rounding and X~."""
    from bitnet_cli.model import rms_norm

    @torch.compile(dynamic=False)
    def inductor(x, d, w):
        h = x + d
        q, s = L.quantize_rows(rms_norm(h, w, 1e-5))
        return h, q, s, (q.float() / s[:, None]).to(torch.bfloat16)

    return inductor


def check_residual_norm_quant() -> list[dict]:
    """``bitnet::residual_norm_quant`` (Triton) against :func:`residual_norm_quant_reference` run by torch on the same
    GPU: ``h_exact`` (the add) always, ``bit_exact`` (h, q, s, X~, rstd) with exact sums of squares; with normal inputs
    the fractions that differ (the sum's order), and those of the compiled torch code's int8 values."""
    torch._dynamo.config.cache_size_limit = 64
    inductor = _inductor_residual_norm()
    out = []
    for i, (m, k) in enumerate(RESIDUAL_CASES):
        for exact_sums in (True, False):
            x, d, w = _residual_case(m, k, exact_sums, i)
            ref = L.residual_norm_quant_reference(x, d, w, 1e-5, torch.bfloat16)
            got = L.residual_norm_quant(x, d, w, 1e-5, torch.bfloat16)
            row = {"M": m, "K": k, "exact_sums": exact_sums, "h_exact": torch.equal(got[0], ref[0]),
                   "bit_exact": all(torch.equal(a, b) for a, b in zip(got, ref)),
                   "q_differ": float((got[1] != ref[1]).float().mean()),
                   "q_diff_max": int((got[1].int() - ref[1].int()).abs().max()),
                   "s_differ": float((got[2] != ref[2]).float().mean()),
                   "rstd_differ": float((got[4] != ref[4]).float().mean()),
                   "inductor_q_differ": float((inductor(x, d, w)[1] != ref[1]).float().mean())}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def _residual_grad_case(m: int, k: int, exact_sums: bool, seed: int):
    """residual_norm_grad's inputs as the trainer's bf16 autocast hands them over: the fp32 stream's gradient, the
    bf16 gradient of the norm's output (the product's grad_input), the saved fp32 h, fp32 weight and rstd, on the GPU.
    ``exact_sums``: h, grad_n and the weight small multiples of powers of two (every sum of ``dh * h`` exact)."""
    g = torch.Generator().manual_seed(seed)
    if exact_sums:
        h, gn = torch.randint(-24, 25, (m, k), generator=g) / 8, torch.randint(-8, 9, (m, k), generator=g) / 4
        w = torch.randint(1, 64, (k,), generator=g) / 32
    else:
        h, gn = torch.randn(m, k, generator=g) * 3, torch.randn(m, k, generator=g) * 1e-3
        w = torch.rand(k, generator=g) + 0.5
    gh = torch.randn(m, k, generator=g) * 1e-3
    rstd = torch.rsqrt(h.pow(2).mean(-1) + 1e-5)
    return gh.cuda(), gn.to(torch.bfloat16).cuda(), h.cuda(), w.cuda(), rstd.cuda()


def check_residual_norm_grad() -> list[dict]:
    """``bitnet::residual_norm_grad`` (Triton) against :func:`residual_norm_grad_reference` run by torch on the same GPU:
    x's and delta's gradients with exact sums bit for bit (``bit_exact``); with normal inputs the fraction of values
    that differ and the largest relative difference (the sum's order); the norm weight's gradient (summed in another
    order) as a relative difference."""
    from bitnet_cli.train import int8_triton as T

    out = []
    for i, (m, k) in enumerate(RESIDUAL_CASES):
        for exact_sums, stream_grad in ((True, True), (True, False), (False, True)):
            gh, gn, h, w, rstd = _residual_grad_case(m, k, exact_sums, i)
            args = (gh if stream_grad else None, gn, h, w, rstd, torch.float32, torch.bfloat16)
            ref, got = L.residual_norm_grad_reference(*args), T.residual_norm_grad(*args)
            # with delta's int8 rows (bitnet::residual_norm_grad_rows), the product's column scales as ternary_weight's
            col = 1.0 / (torch.rand(k, generator=torch.Generator().manual_seed(i), device="cpu") * 20 + 0.01).cuda()
            ref_rows = L.residual_norm_grad_rows_reference(*args[:5], col, *args[5:])
            got_rows = T.residual_norm_grad(*args, col_scale=col)
            row = {"M": m, "K": k, "exact_sums": exact_sums, "stream_grad": stream_grad,
                   "bit_exact": all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got[:2], ref[:2])),
                   "gx_differ": float((got[0] != ref[0]).float().mean()),
                   "gx_rel": float((got[0] - ref[0]).norm() / ref[0].norm()),
                   "grad_weight_rel": float((got[2] - ref[2]).norm() / ref[2].norm()),
                   # the rows from the kernel's own delta gradient: exact wherever that gradient is
                   "rows_bit_exact": all(torch.equal(a, b) for a, b in zip(got_rows[3:], ref_rows[3:])),
                   "rows_of_own_grad_exact": all(torch.equal(a, b) for a, b in zip(
                       got_rows[3:], L.quantize_grad_rows_reference([got_rows[1]], col)))}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def check_residual_norm_autograd() -> list[dict]:
    """A two-layer model at 700m's widths under bf16 autocast (as the trainer runs it) with the residual norms fused
    (residual_norm_quant; their backward in torch ops, with $BITNET_INT8_RESIDUAL_GRAD=1 through residual_norm_grad, and
    with $BITNET_INT8_RESIDUAL_ROWS=1 o_proj's and down_proj's products inside them, residual_norm_grad_rows) and as
    torch ops ($BITNET_INT8_RESIDUAL_NORM=0): the loss and each parameter group's gradient, relative differences from
    the torch ops'."""
    import os

    from bitnet_cli.model import BitNetConfig, BitNetForCausalLM

    cfg = BitNetConfig(vocab_size=4096, hidden_size=1536, intermediate_size=4096, num_hidden_layers=2,
                       num_attention_heads=16, num_key_value_heads=16, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (4, 1025), device="cuda")
    res = {}
    switches = ("BITNET_INT8_RESIDUAL_NORM", "BITNET_INT8_RESIDUAL_GRAD", "BITNET_INT8_RESIDUAL_ROWS")
    for envs in ("100", "110", "111", "000"):
        os.environ.update(zip(switches, envs))
        env = envs[:2] if envs != "111" else envs
        torch.manual_seed(0)
        model = BitNetForCausalLM(cfg).cuda()
        L.enable(model, True, cache=True)
        L.refresh(model, "torch")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        res[env] = loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}
    for name in switches:
        os.environ.pop(name)
    rows = []
    for key, name in (("10", "fused"), ("11", "fused, residual_norm_grad"),
                      ("111", "fused, o_proj/down_proj inside, residual_norm_grad_rows")):
        row = {"variant": name, "loss": res[key][0], "loss_torch": res["00"][0]}
        for part in ("embed_tokens", "layernorm", "self_attn", "mlp"):
            names = [n for n in res[key][1] if part in n]
            a = torch.cat([res[key][1][n].flatten() for n in names])
            b = torch.cat([res["00"][1][n].flatten() for n in names])
            row[f"grad_{part}"] = float((a - b).norm() / b.norm())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def sweep_residual_norm_quant(models: list[str], m: int = 32768) -> list[dict]:
    """``residual_norm_quant``'s launches (rows per program, warps) at the models' hidden widths (fp32 stream, bf16
    delta), each checked against the default launch's bits, beside the torch.compile'd torch code it replaces."""
    from triton.testing import do_bench

    from bitnet_cli.train import int8_triton as T

    inductor = _inductor_residual_norm()
    out = []
    for name in models:
        k = SHAPES[name][1][1][0]
        x, d, w = _residual_case(m, k, False, k)
        ref = T.residual_norm_quant(x, d, w, 1e-5, torch.bfloat16)
        default = T.norm_quant_launch(k)
        ms = do_bench(lambda: inductor(x, d, w), return_mode="median")
        out.append({"model": name, "K": k, "inductor": True, "ms": round(ms, 4)})
        print(json.dumps(out[-1]), flush=True)
        for r, wp in [(1, 2), (1, 4), (1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (8, 4), (8, 8), (16, 8)]:
            got = T.residual_norm_quant(x, d, w, 1e-5, torch.bfloat16, rows=r, warps=wp)
            ms = do_bench(lambda: T.residual_norm_quant(x, d, w, 1e-5, torch.bfloat16, rows=r, warps=wp),
                          return_mode="median")
            out.append({"model": name, "K": k, "rows": r, "warps": wp, "default": (r, wp) == default,
                        "ms": round(ms, 4), "bit_exact": all(torch.equal(a, b) for a, b in zip(got, ref))})
            print(json.dumps(out[-1]), flush=True)
        # the backward: residual_norm_grad against the compiled torch ops it replaces (int8_linear._residual_norm_grads
        # and the norm weight's gradient)
        args = (*_residual_grad_case(m, k, False, k), torch.float32, torch.bfloat16)

        def replaced(grad_h, grad_n, h, weight, rstd, x_dtype, delta_dtype):
            return (*L._residual_norm_grads(grad_h, grad_n, h, weight, rstd, x_dtype, delta_dtype),
                    L._rms_norm_weight_grad(h, rstd, weight, grad_n))

        compiled = torch.compile(replaced, dynamic=False)
        ms = do_bench(lambda: compiled(*args), return_mode="median")
        out.append({"model": name, "K": k, "backward": True, "inductor": True, "ms": round(ms, 4)})
        print(json.dumps(out[-1]), flush=True)
        ms = do_bench(lambda: T.residual_norm_grad(*args), return_mode="median")
        out.append({"model": name, "K": k, "backward": True, "rows": default[0], "warps": default[1],
                    "ms": round(ms, 4)})
        print(json.dumps(out[-1]), flush=True)
        # residual_norm_grad_rows against residual_norm_grad and then the quantize_grad_rows pass it saves (o_proj's or
        # down_proj's output gradient, bf16): the gain per residual norm whose delta a deferred product wrote
        col = torch.rand(k, device="cuda") + 0.5
        ms_rows = do_bench(lambda: T.residual_norm_grad(*args, col_scale=col), return_mode="median")
        gd = T.residual_norm_grad(*args)[1]
        ms_qgr = do_bench(lambda: T.quantize_grad_rows([gd], col), return_mode="median")
        out.append({"model": name, "K": k, "backward": True, "with_rows": True, "ms": round(ms_rows, 4),
                    "replaced_ms": round(ms + ms_qgr, 4), "quantize_grad_rows_ms": round(ms_qgr, 4)})
        print(json.dumps(out[-1]), flush=True)
    return out


# residual_norm_grad's launches swept by --residual-grad: (rows per block, warps) and blocks per program
RESIDUAL_GRAD_LAUNCHES = [(1, 4), (2, 4), (4, 4), (4, 8)]
RESIDUAL_GRAD_CHUNKS = [1, 2, 4, 32]


def sweep_residual_norm_grad(models: list[str], m: int = 32768) -> list[dict]:
    """``residual_norm_grad``'s launches (rows per block, warps, blocks per program) at the models' hidden widths, with
    and without delta's int8 rows (``col_scale``, residual_norm_grad_rows), beside the compiled torch ops and the
    quantize_grad_rows pass the rows replace. Each launch is checked against the default launch's bits on inputs whose
    sums are exact (the gradients, rows and scales: ``bit_exact``; with other inputs a row's sums follow the layout),
    and its norm weight's gradient, a sum whose order follows the launch, as a relative difference."""
    from triton.testing import do_bench

    from bitnet_cli.train import int8_triton as T

    def replaced(grad_h, grad_n, h, weight, rstd, x_dtype, delta_dtype):
        return (*L._residual_norm_grads(grad_h, grad_n, h, weight, rstd, x_dtype, delta_dtype),
                L._rms_norm_weight_grad(h, rstd, weight, grad_n))

    compiled = torch.compile(replaced, dynamic=False)
    out = []
    for name in models:
        k = SHAPES[name][1][1][0]
        args = (*_residual_grad_case(m, k, False, k), torch.float32, torch.bfloat16)
        col = torch.rand(k, device="cuda") + 0.5
        gd = T.residual_norm_grad(*args)[1]
        inductor_ms = do_bench(lambda: compiled(*args), return_mode="median")
        rows_pass_ms = do_bench(lambda: T.quantize_grad_rows([gd], col), return_mode="median")
        base = {"model": name, "K": k, "default": T.residual_norm_grad_launch(k),
                "default_with_rows": T.residual_norm_grad_launch(k, True), "inductor_ms": round(inductor_ms, 4),
                "quantize_grad_rows_ms": round(rows_pass_ms, 4)}
        out.append(base)
        print(json.dumps(base), flush=True)
        exact = (*_residual_grad_case(m, k, True, k), torch.float32, torch.bfloat16)
        for with_rows in (False, True):
            extra = {"col_scale": col} if with_rows else {}
            ref, ref_exact = T.residual_norm_grad(*args, **extra), T.residual_norm_grad(*exact, **extra)
            for (r, w), c in itertools.product(RESIDUAL_GRAD_LAUNCHES, RESIDUAL_GRAD_CHUNKS):
                launch = {"rows": r, "warps": w, "chunk": c}
                got = T.residual_norm_grad(*args, **launch, **extra)
                got_exact = T.residual_norm_grad(*exact, **launch, **extra)
                ms = do_bench(lambda: T.residual_norm_grad(*args, **launch, **extra), return_mode="median")
                row = {"model": name, "K": k, "with_rows": with_rows, **launch, "ms": round(ms, 4),
                       "bit_exact": all(torch.equal(a, b) for i, (a, b) in enumerate(zip(got_exact, ref_exact))
                                        if i != 2),
                       "grad_weight_rel": float((got[2].float() - ref[2].float()).norm() / ref[2].float().norm())}
                out.append(row)
                print(json.dumps(row), flush=True)
    return out


# (M, F) of the gated_norm_grad checks: the recipes' intermediate widths (gate's half of the stacked product), and a
# ragged one (1.3b's 5460: up's half of the gradient rows then starts at column 5464)
GATED_CASES = [(4096, 2048), (4096, 4096), (2048, 5460), (333, 100)]


def _gated_case(m: int, f: int, exact_sums: bool, seed: int):
    """gated_norm_grad's inputs as the trainer's bf16 autocast hands them over: the bf16 gate/up product output, the bf16
    gradient of the sub-norm's output, an fp32 weight, rstd and the product's column scales (one 1/s_w per half), on
    the GPU. ``exact_sums``: y, grad_n and the weight small multiples of powers of two (every sum of ``dh * y`` exact)."""
    g = torch.Generator().manual_seed(seed)
    if exact_sums:
        y, gn = torch.randint(-4, 5, (m, 2 * f), generator=g) / 2, torch.randint(-8, 9, (m, f), generator=g) / 4
        w = torch.randint(1, 64, (f,), generator=g) / 32
    else:
        y, gn = torch.randn(m, 2 * f, generator=g) * 2, torch.randn(m, f, generator=g) * 1e-5
        w = torch.rand(f, generator=g) + 0.5
    col = torch.cat([torch.full((f,), 0.021), torch.full((f,), 0.034)])
    rstd = torch.rand(m, generator=g) + 0.05
    return (y.to(torch.bfloat16).cuda(), gn.to(torch.bfloat16).cuda(), rstd.cuda(), w.float().cuda(), col.cuda(),
            torch.float32)


def check_gated_norm_grad() -> list[dict]:
    """``bitnet::gated_norm_grad`` (Triton) against :func:`gated_norm_grad_reference` run by torch on the same GPU: with
    exact sums the gradient rows, int8 rows and scales bit for bit (``bit_exact``); with normal inputs the fraction of
    int8 values that differ; the norm weight's gradient (summed in another order) as a relative difference."""
    from bitnet_cli.train import int8_triton as T

    out = []
    for i, (m, f) in enumerate(GATED_CASES):
        for exact_sums in (True, False):
            args = _gated_case(m, f, exact_sums, i)
            ref = L.gated_norm_grad_reference(*args)
            fp = L.gated_grad_columns(f, torch.bfloat16)
            halves = [slice(0, f), slice(fp, fp + f)]
            for wide in (False, True):  # the one-pass kernel and the wide one (column chunks, $BITNET_INT8_GATED_WIDE)
                got = T.gated_norm_grad(*args, wide=wide)
                row = {"M": m, "F": f, "wide": wide, "exact_sums": exact_sums,
                       "bit_exact": all(torch.equal(got[0][:, h], ref[0][:, h]) for h in halves)
                       and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2]),
                       "q_differ": float((got[1] != ref[1]).float().mean()),
                       "grad_weight_rel": float((got[3] - ref[3]).norm() / ref[3].norm())}
                out.append(row)
                print(json.dumps(row), flush=True)
    return out


def check_gated_autograd() -> list[dict]:
    """A two-layer model at 700m's widths under bf16 autocast with the gated MLP's backward in one kernel
    ($BITNET_INT8_GATED_GRAD=1, Int8Product.residual_mlp) and without it (0): the loss and each parameter group's
    gradient, relative differences from the latter's (zero but for the order of the norm weight's sum); then the same
    at 1.3b's widths with the wide kernel ($BITNET_INT8_GATED_WIDE=1)."""
    return [_gated_autograd(1536, 4096, "0"), _gated_autograd(2048, 5460, "1")]


def _two_layer_runs(hidden: int, intermediate: int, runs: dict[str, dict[str, str]], took) -> dict:
    """A two-layer model at these widths under bf16 autocast, one forward and backward per run from the same seed and
    tokens (``runs``: name -> the ``$BITNET_INT8_*`` switches it sets, removed after; ``took(layer, switches)``
    asserts they took): name -> (loss, each parameter's gradient in fp32)."""
    import os

    from bitnet_cli.model import BitNetConfig, BitNetForCausalLM

    cfg = BitNetConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                       num_attention_heads=16, num_key_value_heads=16, bos_token_id=None, eos_token_id=None)
    ids = torch.randint(0, 4096, (4, 1025), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    res = {}
    for name, switches in runs.items():
        os.environ.update(switches)
        try:
            torch.manual_seed(0)
            model = BitNetForCausalLM(cfg).cuda()
            L.enable(model, True, cache=True)
            L.refresh(model, "torch")
            assert all(took(layer, switches) for layer in model.model.layers), name
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            res[name] = loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}
        finally:
            for k in switches:
                os.environ.pop(k)
    return res


def _grad_difference(res: dict, part: str, run: str, base: str) -> float:
    """The relative difference of run's gradients from base's over the parameters whose names contain ``part``."""
    names = [n for n in res[base][1] if part in n]
    a = torch.cat([res[run][1][n].flatten() for n in names])
    b = torch.cat([res[base][1][n].flatten() for n in names])
    return float((a - b).norm() / b.norm())


def _gated_autograd(hidden: int, intermediate: int, wide: str) -> dict:
    """:func:`check_gated_autograd` at one model width, ``wide`` the value of $BITNET_INT8_GATED_WIDE."""
    res = _two_layer_runs(hidden, intermediate, {
        env: {"BITNET_INT8_GATED_WIDE": wide, "BITNET_INT8_GATED_GRAD": env} for env in ("1", "0")},
        lambda layer, sw: layer.mlp.int8_fused.gated_mlp == (sw["BITNET_INT8_GATED_GRAD"] == "1"))
    row = {"intermediate": intermediate, "wide": wide, "loss": res["1"][0], "loss_unfused": res["0"][0]}
    for part in ("embed_tokens", "layernorm", "self_attn", "mlp.gate", "mlp.up", "mlp.down", "ffn_sub_norm"):
        row[f"grad_{part}"] = _grad_difference(res, part, "1", "0")
    print(json.dumps(row), flush=True)
    return row


def sweep_gated_norm_grad(models: list[str], m: int = 32768) -> list[dict]:
    """``gated_norm_grad``'s launches (rows per program, warps; the one-pass kernel's and the wide one's) at the models'
    gate/up widths, each checked against its kernel's default launch's bits, beside what it replaces: the compiled
    torch ops of _NormQuant's backward with a gate and then ``quantize_grad_rows`` of its two outputs."""
    from triton.testing import do_bench

    from bitnet_cli.train import int8_triton as T

    from bitnet_cli.model import relu2

    def replaced(y, gn, rstd, w, col, y_dtype):
        f = y.shape[1] // 2
        gate, up = y[:, :f], y[:, f:]
        dy, grad_w = L._rms_norm_backward(relu2(gate.to(y_dtype), up.to(y_dtype)), rstd, w, gn, True)
        grad_up, grad_gate = L._relu2_backward(dy, gate, up, y_dtype)
        return grad_gate, grad_up, grad_w

    def same(got, ref, f):  # d's two halves (not the gap between them, which neither writes), q and s
        fp = L.gated_grad_columns(f, got[0].dtype)
        return (all(torch.equal(got[0][:, h], ref[0][:, h]) for h in (slice(0, f), slice(fp, fp + f)))
                and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2]))

    compiled = torch.compile(replaced, dynamic=False)
    out = []
    for name in models:
        f = SHAPES[name][1][2][1] // 2
        args = _gated_case(m, f, False, f)
        ref, ref_wide = T.gated_norm_grad(*args, wide=False), T.gated_norm_grad(*args, wide=True)
        ms_torch = do_bench(lambda: compiled(*args), return_mode="median")
        gate, up, _ = compiled(*args)
        ms_rows = do_bench(lambda: T.quantize_grad_rows([gate, up], args[4]), return_mode="median")
        out.append({"model": name, "F": f, "replaced": "compiled backward + quantize_grad_rows", "ms_backward": round(
            ms_torch, 4), "ms_grad_rows": round(ms_rows, 4), "ms": round(ms_torch + ms_rows, 4)})
        print(json.dumps(out[-1]), flush=True)
        default = T.gated_norm_grad_launch(f)
        for r, wp in sorted({default, (16, 8), (32, 8), (64, 8), (32, 16), (32, 4)}):
            got = T.gated_norm_grad(*args, rows=r, warps=wp, wide=False)
            ms = do_bench(lambda: T.gated_norm_grad(*args, rows=r, warps=wp, wide=False), return_mode="median")
            out.append({"model": name, "F": f, "rows": r, "warps": wp, "default": (r, wp) == default, "ms": round(ms, 4),
                        "bit_exact": same(got, ref, f)})
            print(json.dumps(out[-1]), flush=True)
        # the wide kernel (each row walked in column chunks, $BITNET_INT8_GATED_WIDE): launches and chunk widths, each
        # against its default's bits (other chunk widths sum a row's mean in another order: the last bit may differ)
        for r, wp, cols in sorted({(32, 4, T.GATED_WIDE_COLUMNS), (32, 8, 2048), (16, 4, 1024), (64, 4, 1024),
                                   (32, 4, 512), (32, 2, 512)}):
            got = T.gated_norm_grad(*args, rows=r, warps=wp, wide=True, columns=cols)
            ms = do_bench(lambda: T.gated_norm_grad(*args, rows=r, warps=wp, wide=True, columns=cols),
                          return_mode="median")
            out.append({"model": name, "F": f, "wide": True, "rows": r, "warps": wp, "columns": cols,
                        "default": (r, wp, cols) == (32, 4, T.GATED_WIDE_COLUMNS), "ms": round(ms, 4),
                        "bit_exact": same(got, ref_wide, f)})
            print(json.dumps(out[-1]), flush=True)
    return out


# (B, T, heads, kv heads, head_dim, k's gradient dtype) of the rope_grad_rows checks: 700m's and 1.3b's heads (MHA),
# and GQA with a head_dim whose halves are not powers of two (k's gradient summed over shared heads in fp32, as under
# bf16 autocast)
ROPE_CASES = [(2, 512, 16, 16, 96, torch.bfloat16), (2, 512, 32, 32, 64, torch.bfloat16),
              (3, 333, 6, 2, 80, torch.float32)]
# heads, head_dim of the models the rope sweep times (bitnet_cli.arch.PRESETS)
ROPE_HEADS = {"small": (12, 64), "700m": (16, 96), "1.3b": (32, 64)}


def _rope_case(b: int, t: int, h: int, kv: int, d: int, k_dtype: torch.dtype, seed: int):
    """rope_grad_rows' inputs as the trainer hands them over: SDPA's gradients of q, k and v (bf16 heads formed from
    token rows, as model.Attention's views; their strides are SDPA's), k's in ``k_dtype``, RoPE's fp32 tables and
    the q/k/v product's column scales, on the GPU."""
    from bitnet_cli.model import rope_cos_sin

    g = torch.Generator("cuda").manual_seed(seed)
    rows = [torch.randn(b, t, n * d, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
            for n in (h, kv, kv)]
    heads = [r.view(b, t, -1, d).transpose(1, 2) for r in rows]
    with torch.no_grad():  # SDPA's inputs, its outputs' gradient: the heads as the model's views make them
        grad_out = torch.randn(b, h, t, d, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
    q, k, v = heads
    if kv != h:
        rep = h // kv
        k, v = (x[:, :, None].expand(b, kv, rep, t, d).reshape(b, h, t, d) for x in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    dq, dk, dv = torch.autograd.grad(out, heads, grad_out * 1e-3)
    cos, sin = rope_cos_sin(t, d, 10000.0, "cuda", torch.float32)
    col = torch.cat([torch.full((h * d,), 0.021), torch.full((kv * d,), 0.034), torch.full((kv * d,), 0.017)])
    return dq, dk.to(k_dtype), dv, cos, sin, col.cuda(), torch.bfloat16


def check_rope_grad_rows() -> list[dict]:
    """``bitnet::rope_grad_rows`` (Triton) against :func:`rope_grad_rows_reference` run by torch on the same GPU: the
    gradients before RoPE, the int8 rows and scales bit for bit (``bit_exact``; no sum is involved but each row's
    maximum), at the default launch and at four tokens a program."""
    from bitnet_cli.train import int8_triton as T

    out = []
    for i, (b, t, h, kv, d, k_dtype) in enumerate(ROPE_CASES):
        args = _rope_case(b, t, h, kv, d, k_dtype, i)
        ref = L.rope_grad_rows_reference(*args)
        for rows in (None, 4):
            got = T.rope_grad_rows(*args, rows=rows)
            row = {"B": b, "T": t, "heads": h, "kv_heads": kv, "head_dim": d, "k_dtype": str(k_dtype), "rows": rows,
                   "strides": [list(x.stride()) for x in args[:3]],
                   "bit_exact": all(torch.equal(g, r) for g, r in zip(got, ref)),
                   "q_differ": float((got[1] != ref[1]).float().mean())}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def check_rope_autograd() -> list[dict]:
    """A two-layer model at 700m's widths (16 heads of 96) under bf16 autocast with q/k/v's product and RoPE as one
    function ($BITNET_INT8_ROPE_ROWS=1, Int8Product.rotary) and without it (0): the loss and each parameter group's
    gradient as relative differences from the latter's (zero on the CPU; here also what SDPA's backward does not
    repeat bit for bit), and the same between two runs without it (``repeat_*``: that noise floor)."""
    res = _two_layer_runs(1536, 4096, {name: {"BITNET_INT8_ROPE_ROWS": env}
                                       for name, env in (("rope", "1"), ("off", "0"), ("repeat", "0"))},
                          lambda layer, sw: layer.self_attn.int8_fused.rope_rows == (sw["BITNET_INT8_ROPE_ROWS"] == "1"))
    row = {"loss": res["rope"][0], "loss_off": res["off"][0], "loss_repeat": res["repeat"][0]}
    for part in ("embed_tokens", "layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "mlp"):
        row[f"grad_{part}"] = _grad_difference(res, part, "rope", "off")
        row[f"repeat_grad_{part}"] = _grad_difference(res, part, "repeat", "off")
    print(json.dumps(row), flush=True)
    return [row]


def sweep_rope_grad_rows(models: list[str], batch: int = 16, t: int = 2048) -> list[dict]:
    """``rope_grad_rows``' launches (tokens per program, warps) at the models' heads (``batch`` x ``t`` tokens, MHA),
    each checked against the default launch's bits, beside what it replaces: the compiled torch RoPE backward of q and
    k (one fused kernel each, as inductor compiles the model's; v's rows as a view or a copy, as torch makes them) and
    then ``quantize_grad_rows`` of the three; ``GBps``: the bytes the kernel must move (the three gradients read, q's
    and k's rows, the int8 rows and scales written) per second."""
    from triton.testing import do_bench

    from bitnet_cli.train import int8_triton as T

    def replaced(dq, dk, dv, cos, sin):
        return [L._token_rows(L.rope_backward_reference(g, cos, sin, torch.bfloat16), torch.bfloat16)
                for g in (dq, dk)] + [L._token_rows(dv, torch.bfloat16)]

    compiled = torch.compile(replaced, dynamic=False)
    out = []
    for name in models:
        h, d = ROPE_HEADS[name]
        args = _rope_case(batch, t, h, h, d, torch.bfloat16, h)
        dq, dk, dv, cos, sin, col, dtype = args
        ms_torch = do_bench(lambda: compiled(dq, dk, dv, cos, sin), return_mode="median")
        parts = compiled(dq, dk, dv, cos, sin)
        ms_rows = do_bench(lambda: T.quantize_grad_rows(parts, col), return_mode="median")
        out.append({"model": name, "heads": h, "head_dim": d, "replaced": "compiled RoPE backward + quantize_grad_rows",
                    "ms_backward": round(ms_torch, 4), "ms_grad_rows": round(ms_rows, 4),
                    "ms": round(ms_torch + ms_rows, 4), "strides": [list(x.stride()) for x in (dq, dk, dv)]})
        print(json.dumps(out[-1]), flush=True)
        m, width = batch * t, 3 * h * d
        moved = m * (width * 2 + 2 * h * d * 2 + width + 4)
        ref = T.rope_grad_rows(*args)
        default = T.rope_grad_rows_launch()
        for r, wp in sorted({default, (1, 4), (1, 8), (1, 16), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8)}):
            got = T.rope_grad_rows(*args, rows=r, warps=wp)
            ms = do_bench(lambda: T.rope_grad_rows(*args, rows=r, warps=wp), return_mode="median")
            out.append({"model": name, "rows": r, "warps": wp, "default": (r, wp) == default, "ms": round(ms, 4),
                        "GBps": round(moved / ms / 1e6, 1),
                        "bit_exact": all(torch.equal(a, b) for a, b in zip(got, ref))})
            print(json.dumps(out[-1]), flush=True)
    return out


def check_autograd() -> list[dict]:
    out = []
    torch.manual_seed(0)
    for int8_grad, rows in ((True, [512]), (False, [512]), (True, [384, 128, 128])):
        ws = [torch.randn(n, 384) * 0.02 * (i + 1) for i, n in enumerate(rows)]
        x = torch.randn(4, 100, 384)
        g = torch.randn(4, 100, sum(rows))
        res = {}
        for dev in ("cpu", "cuda"):
            wd = [w.to(dev).clone().requires_grad_() for w in ws]
            xd = x.to(dev).clone().requires_grad_()
            with torch.autocast(dev, dtype=torch.bfloat16):
                ys = L.int8_linear(xd, wd, int8_grad=int8_grad)
            torch.autograd.backward(ys, list(g.to(dev).to(ys[0].dtype).split(rows, -1)))
            res[dev] = (torch.cat(ys, -1).float().cpu(), xd.grad.cpu(), torch.cat([w.grad for w in wd]).cpu())

        def rel(i):
            a, b = res["cuda"][i], res["cpu"][i]
            return ((a - b).norm() / b.norm()).item()

        out.append({"int8_grad": int8_grad, "stacked": rows, "fwd_rel": rel(0), "grad_x_rel": rel(1), "grad_w_rel": rel(2),
                    "fwd_bit_exact": torch.equal(res["cuda"][0], res["cpu"][0])})
        print(json.dumps(out[-1]), flush=True)
    return out


def check_refresh(layers: int = 24) -> list[dict]:
    """The per-step ternary refresh (``int8_linear.refresh``) of a model at the 700m and 1.3b layer shapes:
    the Triton form (``int8_triton.refresh_products``) against the eager one, bit for bit (trits, trits_t,
    col_scale), and each one's time per call (wall, synchronised: the host issuing the kernels is most of it);
    also the Triton form captured once in a CUDA graph and replayed (``BITNET_INT8_REFRESH=graph``)."""
    import time

    from bitnet_cli.model import BitNetConfig, BitNetForCausalLM

    def timed(f):
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return round(sorted(times)[3] * 1e3, 2)

    out = []
    for name, hidden, inter in (("700m", 1536, 4096), ("1.3b", 2048, 5460)):
        cfg = BitNetConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=16, num_key_value_heads=16, bos_token_id=None, eos_token_id=None)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = BitNetForCausalLM(cfg)
        L.enable(model, True, cache=True)
        bufs = lambda: [b for n, b in model.named_buffers() if n.split(".")[-1] in ("trits", "trits_t", "col_scale")]
        res = {"model": name, "layers": layers, "weights": sum(p.dim() == 2 for p in model.parameters())}
        got = {}
        for kernel in ("torch", "triton"):
            for b in bufs():
                b.fill_(7)
            L.refresh(model, kernel)
            got[kernel] = [b.clone() for b in bufs()]
            res[f"{kernel}_ms"] = timed(lambda: L.refresh(model, kernel))
        res["bit_exact"] = len(got["torch"]) == len(got["triton"]) > 0 and all(
            torch.equal(x, y) for x, y in zip(got["torch"], got["triton"]))
        try:  # the trainer's BITNET_INT8_REFRESH=graph: captured at the first call, replayed after
            L.refresh(model, "graph")
            for b in bufs():
                b.fill_(7)
            L.refresh(model, "graph")
            res["graph_bit_exact"] = all(torch.equal(x, y) for x, y in zip(got["torch"], bufs()))
            res["graph_ms"] = timed(lambda: L.refresh(model, "graph"))
        except Exception as e:  # noqa: BLE001 (a measurement only)
            res["graph_error"] = repr(e)[:300]
        out.append(res)
        print(json.dumps(res), flush=True)
        del model, got
        torch.cuda.empty_cache()
    return out


def launch_cost(calls: int = 500) -> list[dict]:
    """Microseconds of host time per launch (see the module's docstring, 4.); the first call of each
    autotunes and compiles, outside the timing."""
    import time

    from bitnet_cli.train import int8_triton

    a = torch.randint(-128, 128, (256, 256), dtype=torch.int8, device="cuda")
    b = torch.randint(-1, 2, (256, 256), dtype=torch.int8, device="cuda")
    rm, cm = torch.rand(256, device="cuda") * 0.02, torch.rand(256, device="cuda") * 0.05
    x, w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16), torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    ways = {"bf16 F.linear": lambda: F.linear(x, w),
            **{f"{k} kernel": (lambda k=k: int8_triton.int8_mm(a, b, rm, cm, torch.bfloat16, k)) for k in ("pointer", "tma")},
            f"bitnet::int8_mm ({int8_triton.default_kernel()})": lambda: L.int8_mm(a, b, rm, cm, torch.bfloat16)}
    out = []
    for name, f in ways.items():
        f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        issued = time.perf_counter() - t0
        torch.cuda.synchronize()
        out.append({"launch": name, "host_us_per_call": round(1e6 * issued / calls, 1),
                    "wall_us_per_call": round(1e6 * (time.perf_counter() - t0) / calls, 1)})
        print(json.dumps(out[-1]), flush=True)
    return out


# Tiles timed one by one at the products of --tiles's models (beside the autotuned kernels), to choose the
# kernels' autotuning lists (int8_triton._CONFIGS, _TMA_CONFIGS) from: theirs, and others around them.
def _tile(bm, bn, bk, warps, stages):
    import triton

    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


def sweep_tiles() -> dict:
    from bitnet_cli.train import int8_triton

    pointer = [*int8_triton._CONFIGS, _tile(128, 256, 128, 8, 4), _tile(256, 128, 64, 8, 5)]
    tma = [*int8_triton._TMA_CONFIGS, _tile(256, 128, 128, 8, 3), _tile(256, 128, 64, 8, 5)]
    unique = {}
    for kernel, tiles in (("pointer", pointer), ("tma", tma)):
        for t in tiles:
            unique.setdefault((kernel, tile_name(t)), t)
    return unique


def tile_name(c) -> str:
    return f"{c.kwargs['BM']}x{c.kwargs['BN']}x{c.kwargs['BK']} w{c.num_warps} s{c.num_stages}"


def products(name: str) -> list[tuple[str, int, int, int]]:
    """(kind, M, K, N) of one layer's products at a model's shape: forward (tokens x K -> N), grad_input
    (tokens x N -> K) and grad_weight (N x tokens -> K: the sum over tokens; bf16 in the trainer, timed in
    int8 too to see what an int8 weight gradient would buy)."""
    M, kns = SHAPES[name]
    out = []
    for K0, N0 in kns:
        out += [("fwd", M, K0, N0), ("grad_in", M, N0, K0), ("grad_w", N0, M, K0)]
    return out


def bench(models: list[str], tile_models: list[str]) -> list[dict]:
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    from bitnet_cli.train import int8_triton

    quant = torch.compile(L.quantize_rows)
    candidates = sweep_tiles()
    rows = []

    def timed(f):
        return do_bench(f, warmup=10, rep=40, return_mode="median")

    for name in models:
        for kind, M, K, N in products(name):
            torch.manual_seed(M + K + N)
            flop = 2 * M * N * K
            if kind == "grad_w":
                # The trainer's bf16 product: G^T @ X~, G [tokens, N_out] and X~ [tokens, K_in] as saved (row-major).
                g = torch.randn(K, M, device="cuda", dtype=torch.bfloat16)
                xd = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
                bf16 = lambda: g.t() @ xd  # noqa: E731
                q = torch.randint(-128, 128, (M, K), device="cuda", dtype=torch.int8)  # G quantised, transposed
                t = torch.randint(-128, 128, (N, K), device="cuda", dtype=torch.int8)  # X's int8, transposed
                row, col = torch.rand(M, device="cuda") * 1e-3, None
                x = None
            else:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
                bf16 = lambda: F.linear(x, w)  # noqa: E731
                q, s = L.quantize_rows(x)
                t, _, col_scale = L.stacked_ternary([w])
                q, t = L.pad_rows(q), L.pad_rows(t)  # as the trainer lays them out (int8_linear.int8_rows)
                row, col = 1.0 / s, (col_scale if kind == "fwd" else None)

            out = torch.float32 if kind == "grad_w" else torch.bfloat16  # grad_weight: the weights' gradient dtype

            def product(kernel, config=None):
                return lambda: int8_triton.int8_mm(q, t, row, col, out, kernel, config=config)

            ms = {"bf16": timed(bf16), "pointer": timed(product("pointer"))}
            r = {"model": name, "kind": kind, "M": M, "K": K, "N": N,
                 "pointer_tile": tile_name(int8_triton._int8_mm_kernel.best_config)}
            want = product("pointer")()
            if int8_triton.tma_fits(q, t):
                try:
                    ms["tma"] = timed(product("tma"))
                    r["tma_tile"] = tile_name(int8_triton._int8_mm_tma_kernel.best_config)
                    r["tma_equal"] = torch.equal(product("tma")(), want)
                except Exception as e:  # noqa: BLE001 (the other columns still get timed)
                    r["tma_error"] = repr(e)[:300]
            ms["op"] = timed(lambda: L.int8_mm(q, t, row, col, out))  # bitnet::int8_mm, its dispatch included
            qc, tc = q.contiguous(), t.contiguous()
            if K % 8 == 0 and N % 8 == 0:  # torch._int_mm's own limit
                ms["int_mm"] = timed(lambda: torch._int_mm(qc, tc.t()))
            if x is not None:
                ms["quant_x"] = timed(lambda: quant(x))
            if name in tile_models:
                tiles, unequal = {}, []
                for (kernel, tname), cfg in candidates.items():
                    if kernel == "tma" and not int8_triton.tma_fits(q, t):
                        continue
                    try:
                        f = product(kernel, cfg)
                        if not torch.equal(f(), want):
                            unequal.append(f"{kernel} {tname}")
                        tiles[f"{kernel} {tname}"] = round(flop / timed(f) / 1e9, 1)
                    except OutOfResources:
                        tiles[f"{kernel} {tname}"] = None
                    except Exception as e:  # noqa: BLE001
                        tiles[f"{kernel} {tname}"] = repr(e)[:200]
                r["tile_tops"] = tiles
                r["tiles_unequal_to_pointer"] = unequal
                best = max((v, k) for k, v in tiles.items() if isinstance(v, float))
                r["best_tile"], r["best_tile_tops"] = best[1], best[0]
            r.update({f"{k}_ms": round(v, 4) for k, v in ms.items()})
            r.update({f"{k}_tops": round(flop / v / 1e9, 1) for k, v in ms.items() if k != "quant_x"})
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'model':6} {'kind':8} {'M x K -> N':>21} {'bf16':>6} {'ptr-i8':>6} {'tma-i8':>6} {'op':>6} {'_int_mm':>7} "
          f"{'best tile':>9} {'i8/bf16 time':>12}  (TFLOP/s or TOP/s)")
    for r in rows:
        best = min(r["pointer_ms"], r.get("tma_ms", float("inf")))
        print(f"{r['model']:6} {r['kind']:8} {r['M']:>7}x{r['K']:<6}->{r['N']:<6} {r['bf16_tops']:>6.0f} "
              f"{r['pointer_tops']:>6.0f} {r.get('tma_tops', 0):>6.0f} {r['op_tops']:>6.0f} {r.get('int_mm_tops', 0):>7.0f} "
              f"{r.get('best_tile_tops', 0):>9.0f} {best / r['bf16_ms']:>11.2f}x  {r.get('best_tile', '')}")
    return rows


def _tma_variant(bm, bn, bk, warps, stages, split=1, ws=False, group=8):
    import triton

    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group, "EPI_SPLIT": split, "WARP_SPEC": ws},
                         num_warps=warps, num_stages=stages)


def variant_name(c) -> str:
    kw = {"GROUP_M": 8, **c.kwargs}
    return (f"{tile_name(c)}" + (f" split{kw['EPI_SPLIT']}" if kw.get("EPI_SPLIT", 1) != 1 else "")
            + (" ws" if kw.get("WARP_SPEC") else "") + (f" g{kw['GROUP_M']}" if kw["GROUP_M"] != 8 else ""))


# The TMA kernel's tile options timed by --tma-variants: its autotuning list (int8_triton._TMA_CONFIGS), then
# around it: the wide tile's store in halves at 3 stages and with other group widths, the warp-specialised tiles
# with 8 warps and on the square tile, and the wide tile with a 64-deep K step.
def tma_variants() -> list:
    from bitnet_cli.train import int8_triton

    return [*int8_triton._TMA_CONFIGS, _tma_variant(128, 256, 128, 8, 3, split=2),
            _tma_variant(128, 256, 128, 8, 4, split=2, group=4), _tma_variant(128, 256, 128, 8, 3, group=16),
            _tma_variant(128, 256, 128, 8, 3, ws=True), _tma_variant(128, 128, 128, 4, 5, ws=True),
            _tma_variant(128, 256, 64, 8, 6, split=2)]


def sweep_tma_variants(models: list[str], path: str, offered: bool = False) -> list[dict]:
    """Each of :func:`tma_variants` at the models' forward and grad_input products (bf16 outputs, as the trainer
    runs them): TOP/s (median of do_bench) and bit-exactness against the exact product (``torch._int_mm``, K padded
    with zeros to a multiple of 16, scaled in fp32 by torch as the kernel's epilogue does); where unequal, how many
    elements differ, in which half of the tile's rows (a split of the rows between warp groups), and NaNs.
    ``offered``: the autotuning list's tiles alone (int8_triton._TMA_CONFIGS)."""
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    from bitnet_cli.train import int8_triton

    rows = []
    for name in models:
        for kind, M, K, N in products(name):
            if kind == "grad_w":
                continue
            torch.manual_seed(M + K + N)
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            q, s = L.quantize_rows(x)
            t, _, col_scale = L.stacked_ternary([w])
            row, col = 1.0 / s, (col_scale if kind == "fwd" else None)
            pad_k, pad_n = -K % 16, -N % 16  # torch._int_mm's operands: K and N multiples of 8
            exact = torch._int_mm(F.pad(q, (0, pad_k)), F.pad(t, (0, pad_k, 0, pad_n)).t())[:, :N].float()
            exact = exact * row[:, None]
            ref = (exact if col is None else exact * col[None, :]).to(torch.bfloat16)
            del exact, x, w
            q, t = L.pad_rows(q), L.pad_rows(t)
            flop = 2 * M * N * K
            r = {"model": name, "kind": kind, "M": M, "K": K, "N": N, "tops": {}, "unequal": {}}
            for cfg in (int8_triton._TMA_CONFIGS if offered else tma_variants()):
                vname = variant_name(cfg)
                try:
                    f = lambda: int8_triton.int8_mm(q, t, row, col, torch.bfloat16, "tma", config=cfg)  # noqa: E731
                    got = f()
                    torch.cuda.synchronize()
                    if not torch.equal(got, ref):
                        bad = got != ref
                        bm = cfg.kwargs["BM"]
                        half = bad.view(-1, 2, bm // 2, N).sum(dim=(0, 2, 3)) if M % bm == 0 else None
                        r["unequal"][vname] = {"fraction": bad.float().mean().item(), "nan": int(got.isnan().sum()),
                                               "rows_by_tile_half": None if half is None else half.tolist(),
                                               "max_abs": (got.float() - ref.float()).nan_to_num().abs().max().item()}
                    r["tops"][vname] = round(flop / do_bench(f, warmup=10, rep=40, return_mode="median") / 1e9, 1)
                except OutOfResources:
                    r["tops"][vname] = None
                except Exception as e:  # noqa: BLE001 (recorded; the other variants still run)
                    r["tops"][vname] = repr(e)[:200]
            valid = {k: v for k, v in r["tops"].items() if isinstance(v, float) and k not in r["unequal"]}
            r["best"] = max(valid, key=valid.get) if valid else None
            rows.append(r)
            print(json.dumps(r), flush=True)
            with open(path, "w") as fh:
                json.dump({"gpu": torch.cuda.get_device_name(), "tma_variants": rows}, fh, indent=1)
    return rows


GRAD_ROW_SHAPES = {"small": [[768] * 3, [768], [2048] * 2], "700m": [[1536] * 3, [1536], [4096] * 2],
                   "1.3b": [[2048] * 3, [2048], [5460] * 2]}


def sweep_grad_rows(models: list[str], m: int = 32768, path: str | None = None) -> list[dict]:
    """``quantize_grad_rows`` at the output gradients' shapes (q/k/v, o or down, gate/up; bf16 parts, as
    the trainer hands them over) with each launch (rows per program, warps): the time (median of
    do_bench), the bytes moved per second, and whether the result equals the default launch's bit for bit.
    ``path``: the JSON rewritten after each row (a run cut by a time limit keeps what it measured)."""
    from triton.testing import do_bench

    from bitnet_cli.train import int8_triton as T

    out = []
    torch.manual_seed(3)
    for name in models:
        for widths in GRAD_ROW_SHAPES[name]:
            parts = [(torch.randn(m, w, device="cuda") * 3e-8 * torch.rand(m, 1, device="cuda") * 4).to(torch.bfloat16)
                     for w in widths]
            col = torch.rand(sum(widths), device="cuda") * 0.05 + 1e-3
            ref_q, ref_s = T.quantize_grad_rows(parts, col)
            n = sum(widths)
            moved = m * (3 * n + 4)
            default = T.grad_rows_launch(widths)
            for r, w in [(1, 2), (1, 4), (1, 8), (1, 16), (2, 4), (2, 8), (2, 16), (4, 4), (4, 8), (4, 16),
                         (8, 8), (8, 16), (16, 16)]:
                per_thread = r * sum(1 << max(x - 1, 15).bit_length() for x in widths) / (32 * w)
                if per_thread > 128 or per_thread < 4:
                    continue
                try:
                    q, s = T.quantize_grad_rows(parts, col, rows=r, warps=w)
                    ms = do_bench(lambda: T.quantize_grad_rows(parts, col, rows=r, warps=w), return_mode="median")
                except Exception as e:  # noqa: BLE001
                    out.append({"model": name, "widths": widths, "rows": r, "warps": w, "error": str(e)[:200]})
                    continue
                out.append({"model": name, "widths": widths, "rows": r, "warps": w, "default": (r, w) == default,
                            "ms": round(ms, 4), "TB_s": round(moved / ms / 1e9, 3),
                            "bit_exact": torch.equal(q, ref_q) and torch.equal(s, ref_s)})
                print(json.dumps(out[-1]), flush=True)
                if path:
                    with open(path, "w") as f:
                        json.dump({"gpu": torch.cuda.get_device_name(), "grad_rows_sweep": out}, f, indent=1)
            # The default launch with the stride hint the other way round (int8_triton.stride_hint: on by default
            # where a row stride is not a multiple of 16)
            import os

            hint = not T.stride_hint([p.stride(0) for p in parts])
            os.environ["BITNET_QGR_STRIDE_HINT"] = str(int(hint))
            try:
                q, s = T.quantize_grad_rows(parts, col)
                ms = do_bench(lambda: T.quantize_grad_rows(parts, col), return_mode="median")
                out.append({"model": name, "widths": widths, "rows": default[0], "warps": default[1], "default": False,
                            "stride_hint": hint, "ms": round(ms, 4), "TB_s": round(moved / ms / 1e9, 3),
                            "bit_exact": torch.equal(q, ref_q) and torch.equal(s, ref_s)})
                print(json.dumps(out[-1]), flush=True)
            finally:
                os.environ.pop("BITNET_QGR_STRIDE_HINT")
    return out


# The weight gradients' (input width K, output-gradient parts) per model: q/k/v, o, gate/up, down.
GRAD_WEIGHT_SHAPES = {name: [(k, [n] if len(widths) == 1 else widths) for (k, n), widths in
                             zip(SHAPES[name][1], [GRAD_ROW_SHAPES[name][i] for i in (0, 1, 2, 1)])] for name in SHAPES}


def check_grad_weight() -> list[dict]:
    """``bitnet::quantize_grad_cols`` and ``bitnet::int8_grad_weight`` (Triton) against their references on the
    CPU, bit for bit: ragged token counts (a partial last block), one to three parts, bf16 and fp32 gradients,
    an all-zero column block, K = 5460; the trainer's operand layouts (G' and q transposed, tokens contiguous)."""
    from bitnet_cli.train import int8_triton as T

    out = []
    torch.manual_seed(5)
    for m, widths, k, dtype in [(1000, [200], 336, torch.bfloat16), (4096, [768] * 3, 768, torch.bfloat16),
                                (777, [300, 52], 5460, torch.float32), (2048, [2048] * 2, 1536, torch.bfloat16)]:
        parts = [(torch.randn(m, w) * 3e-8 * torch.rand(m, 1) * 4).to(dtype) for w in widths]
        parts[0][:128, :5] = 0
        s_x = torch.rand(m) * 60 + 0.5
        q = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        gq_ref, d_ref = L.quantize_grad_cols_reference(parts, s_x)
        dw_ref = L.int8_grad_weight_reference(gq_ref, q.t().contiguous(), d_ref)
        gq, d = T.quantize_grad_cols([p.cuda() for p in parts], s_x.cuda())
        dw = T.int8_grad_weight(gq, L.pad_rows(q.cuda()).t().contiguous(), d)
        out.append({"m": m, "widths": widths, "k": k, "dtype": str(dtype),
                    "bit_exact": torch.equal(gq.cpu(), gq_ref) and torch.equal(d.cpu(), d_ref)
                    and torch.equal(dw.cpu(), dw_ref)})
        print(json.dumps(out[-1]), flush=True)
    return out


def sweep_grad_weight(models: list[str], m: int = 32768, path: str | None = None) -> list[dict]:
    """Each weight gradient of a layer (the trainer's micro-batch of ``m`` tokens; bf16 output-gradient parts, X~
    from int8 rows): the bf16 products the trainer runs (one per part, ``g.t() @ x_deq``, then to fp32) against the
    int8 form (:func:`int8_linear.int8_grad_weights`): the rounding of G' (``quantize_grad_cols``), the transposed
    copy of q, the product (autotuned, and each tile of a sweep); where both widths are multiples of 256 also on
    untransposed operands (no copy: Triton converts the layout in the kernel; elsewhere the kernel's contiguity hints
    would not hold). Times are do_bench medians (ms); ``err_*``: the relative error against G^T X~ in float64."""
    import triton
    from triton.testing import do_bench

    from bitnet_cli.train import int8_triton as T

    out = []
    torch.manual_seed(6)
    for name in models:
        for k, widths in GRAD_WEIGHT_SHAPES[name]:
            n = sum(widths)
            parts = [(torch.randn(m, w, device="cuda") * 3e-5).to(torch.bfloat16) for w in widths]
            q, s_x = L.quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            q = L.pad_rows(q)
            x_deq = (q.float() / s_x[:, None]).to(torch.bfloat16)
            flops = 2 * m * n * k
            row = {"model": name, "m": m, "k": k, "widths": widths}
            row["bf16_ms"] = do_bench(lambda: [(g.t() @ x_deq).float() for g in parts], return_mode="median")
            row["quant_ms"] = do_bench(lambda: T.quantize_grad_cols(parts, s_x), return_mode="median")
            row["transpose_ms"] = do_bench(lambda: q.t().contiguous(), return_mode="median")
            gq, d = T.quantize_grad_cols(parts, s_x)
            q_t = q.t().contiguous()
            row["mm_ms"] = do_bench(lambda: T.int8_grad_weight(gq, q_t, d), return_mode="median")
            c = T._int8_grad_weight_kernel.best_config
            row["mm_tile"] = f"{c.kwargs['BM']}x{c.kwargs['BN']} w{c.num_warps} s{c.num_stages}"
            if n % 256 == 0 and k % 256 == 0:  # the kernel's contiguity hints hold along the untransposed axes
                row["mm_q_untransposed_ms"] = do_bench(lambda: T.int8_grad_weight(gq, q.t(), d), return_mode="median")
                gq_n, d_n = T.quantize_grad_cols(parts, s_x, transposed=False)
                row["mm_both_untransposed_ms"] = do_bench(lambda: T.int8_grad_weight(gq_n, q.t(), d_n),
                                                          return_mode="median")
                row["quant_untransposed_ms"] = do_bench(lambda: T.quantize_grad_cols(parts, s_x, transposed=False),
                                                        return_mode="median")
            for bm, bn, w, st in [(128, 128, 8, 4), (128, 128, 4, 4), (128, 256, 8, 3), (256, 128, 8, 3),
                                  (128, 64, 4, 4), (64, 128, 4, 4), (128, 128, 8, 3), (128, 128, 4, 3)]:
                cfg = triton.Config({"BM": bm, "BN": bn, "GROUP_M": 8}, num_warps=w, num_stages=st)
                try:
                    row[f"mm_{bm}x{bn}_w{w}_s{st}_ms"] = do_bench(lambda: T.int8_grad_weight(gq, q_t, d, config=cfg),
                                                                 return_mode="median")
                except Exception as e:  # noqa: BLE001 (a tile that does not fit)
                    row[f"mm_{bm}x{bn}_w{w}_s{st}_ms"] = str(e)[:80]
            row["int8_total_ms"] = row["quant_ms"] + row["transpose_ms"] + row["mm_ms"]
            row["op_ms"] = do_bench(lambda: L.int8_grad_weights(parts, q, s_x), return_mode="median")
            row["bf16_TFLOPs"] = round(flops / row["bf16_ms"] / 1e9, 1)
            row["mm_TOPs"] = round(flops / row["mm_ms"] / 1e9, 1)
            exact = torch.cat([g.double().t() @ x_deq.double() for g in parts])
            dw = torch.cat(L.int8_grad_weights(parts, q, s_x))
            row["err_int8"] = ((dw.double() - exact).norm() / exact.norm()).item()
            bf = torch.cat([(g.t() @ x_deq).float() for g in parts])
            row["err_bf16"] = ((bf.double() - exact).norm() / exact.norm()).item()
            row = {key: round(v, 5) if isinstance(v, float) else v for key, v in row.items()}
            out.append(row)
            print(json.dumps(row), flush=True)
            if path:
                with open(path, "w") as f:
                    json.dump({"gpu": torch.cuda.get_device_name(), "grad_weight_sweep": out}, f, indent=1)
    return out


def sweep_fp8_grad_weight(models: list[str], m: int = 32768) -> list[dict]:
    """Each weight gradient of a layer (:data:`GRAD_WEIGHT_SHAPES`; ``m`` tokens; bf16 output-gradient parts whose
    magnitude varies by token as training's do, X~ from int8 rows): the trainer's bf16 products against its fp8 one
    (``$BITNET_INT8_FP8_GRAD_WEIGHT``, int8_linear.fp8_grad_weight: G and X~ in e4m3), its operands cast as training
    casts them (X~ from the int8 rows and their scales, both absmax bounds known): the product alone (``fp8_mm_ms``),
    the casts into its operands compiled by torch (``fp8_cast_ms``: scale, cast and transposed copy, the passes a
    fused kernel would have to beat), the two together as the compiled trainer runs them (``fp8_total_ms``, to set
    against ``bf16_ms``), and ``err_*`` the relative error against G^T X~ in float64. An error (a shape or layout
    _scaled_mm refuses) is recorded as ``fp8_error``."""
    from triton.testing import do_bench

    out = []
    torch.manual_seed(7)
    for name in models:
        for k, widths in GRAD_WEIGHT_SHAPES[name]:
            n = sum(widths)
            token_scale = torch.randn(m, 1, device="cuda").exp()  # log-normal per-token magnitudes
            parts = [(torch.randn(m, w, device="cuda") * 3e-5 * token_scale).to(torch.bfloat16) for w in widths]
            q, s_x = L.quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            x_deq = (q.float() / s_x[:, None]).to(torch.bfloat16)
            flops = 2 * m * n * k
            exact = torch.cat([g.double().t() @ x_deq.double() for g in parts])
            row = {"model": name, "m": m, "k": k, "widths": widths}
            row["bf16_ms"] = do_bench(lambda: [(g.t() @ x_deq).float() for g in parts], return_mode="median")
            bf = torch.cat([(g.t() @ x_deq).float() for g in parts])
            row["err_bf16"] = ((bf.double() - exact).norm() / exact.norm()).item()
            # what the backward knows without a pass over the operands (int8_linear._grad_weights)
            bounds = {"row_scale": 1.0 / s_x, "x_amax": 127.0 / s_x.min(),
                      "g_amax": torch.stack([g.abs().amax() for g in parts]).amax().float()}
            # static shapes, as the trainer's compiled step has them; a fresh cache per shape (no recompile limit)
            torch._dynamo.reset()
            try:
                cast = torch.compile(lambda: L.fp8_operands(parts, q, **bounds), dynamic=False)
                a, b, sa, sb = cast()
                row["fp8_cast_ms"] = do_bench(cast, return_mode="median")
                row["fp8_mm_ms"] = do_bench(lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb,
                                                                     out_dtype=torch.float32), return_mode="median")
                whole = torch.compile(lambda: L.fp8_grad_weight(parts, q, **bounds), dynamic=False)
                row["fp8_total_ms"] = do_bench(whole, return_mode="median")
                row["fp8_TFLOPs"] = round(flops / row["fp8_mm_ms"] / 1e9, 1)
                row["err_fp8"] = ((whole().double() - exact).norm() / exact.norm()).item()
            except Exception as e:  # noqa: BLE001 (what this torch/cuBLAS refuses, recorded)
                row["fp8_error"] = str(e)[:200]
            row["bf16_TFLOPs"] = round(flops / row["bf16_ms"] / 1e9, 1)
            row = {key: round(v, 5) if isinstance(v, float) else v for key, v in row.items()}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def write_json(path: str, result: dict) -> None:
    """Writes the results so far (again after each stage: a call's time limit keeps what was done)."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def warm_up(seconds: float = 3.0) -> None:
    """bf16 products for ``seconds``, so that the first timings of a process (every mode's, the sweeps run alone and
    those after ``--skip-checks`` included) are not taken while the clocks climb from idle: the first rows of session
    33's norm_quant sweep on an H200 (small's 768, with ``--skip-checks``) came out 2-3x slower than the H100's of
    session 29, the rows after them faster (benchmarks/RESULTS.md)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def checks_then_sweep(path: str, checks: dict, sweep_key: str, sweep, models: str, passed,
                      skip_checks: bool = False) -> None:
    """One op's checks (``checks``: result key -> function giving its rows; none with ``skip_checks``), then its
    launch sweep over the comma-separated ``models``; the results written after each stage; exits 0 when
    ``passed(result)`` (a check skipped counts as no rows)."""
    result = {"gpu": torch.cuda.get_device_name()}
    for key, check in checks.items():
        result[key] = [] if skip_checks else check()
        write_json(path, result)
    result[sweep_key] = sweep([m for m in models.split(",") if m])
    write_json(path, result)
    sys.exit(0 if passed(result) else 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="int8_kernels.json")
    ap.add_argument("--models", default=",".join(SHAPES), help="the shapes to time (SHAPES' names)")
    ap.add_argument("--skip-tiles", action="store_true", help="leave out the per-tile exactness cases (EXACT_CASES)")
    ap.add_argument("--tiles", default="", help="models whose products also time each candidate tile (sweep_tiles)")
    ap.add_argument("--skip-checks", action="store_true", help="only the timings (the checks need a CPU reference); "
                    "with --norm-quant, --residual-norm, --gated, --rope or --grad-weight: their launch sweeps alone")
    ap.add_argument("--grad-rows", default="", help="models whose output-gradient shapes time quantize_grad_rows' launches")
    ap.add_argument("--norm-quant", default="", help="models whose sub-norm shapes time norm_quant's launches, after "
                    "norm_quant's checks (alone)")
    ap.add_argument("--residual-norm", default="", help="models whose hidden widths time residual_norm_quant's "
                    "launches, after its checks (alone)")
    ap.add_argument("--residual-grad", default="", help="models whose hidden widths time residual_norm_grad's "
                    "launches (rows, warps, blocks per program), with and without its int8 rows")
    ap.add_argument("--gated", default="", help="models whose gate/up widths time gated_norm_grad's launches, after "
                    "its checks (alone)")
    ap.add_argument("--rope", default="", help="models whose heads time rope_grad_rows' launches, after its checks "
                    "(alone)")
    ap.add_argument("--grad-weight", default="", help="models whose weight-gradient shapes time the int8 grad_weight "
                    "against bf16, after its checks (alone)")
    ap.add_argument("--fp8-grad-weight", default="", help="models whose weight-gradient shapes time fp8 products "
                    "(torch._scaled_mm) against bf16, with their casts and errors (alone; a probe)")
    ap.add_argument("--tma-variants", default="", help="models whose product shapes time the TMA kernel's tile "
                    "options, each checked against the exact product (alone)")
    ap.add_argument("--offered", action="store_true", help="--tma-variants: the autotuning list's tiles alone")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    warm_up()
    if args.tma_variants:
        sweep_tma_variants([m for m in args.tma_variants.split(",") if m], args.out, args.offered)
        return
    if args.fp8_grad_weight:
        write_json(args.out, {"gpu": torch.cuda.get_device_name(), "fp8_grad_weight": sweep_fp8_grad_weight(
            [m for m in args.fp8_grad_weight.split(",") if m])})
        return
    if args.grad_weight:
        checks_then_sweep(args.out, {"grad_weight": check_grad_weight}, "grad_weight_sweep", sweep_grad_weight,
                          args.grad_weight, lambda r: all(x["bit_exact"] for x in r["grad_weight"]), args.skip_checks)
    if args.norm_quant:
        checks_then_sweep(args.out, {"norm_quant": check_norm_quant, "norm_quant_autograd": check_norm_quant_autograd},
                          "norm_quant_sweep", sweep_norm_quant, args.norm_quant,
                          lambda r: all(x["bit_exact"] for x in r["norm_quant"] if x["exact_sums"]), args.skip_checks)
    if args.residual_norm:
        def residual_norm_passed(r: dict) -> bool:
            checks, grads = r["residual_norm_quant"], r["residual_norm_grad"]
            exact = [x for x in checks + grads if x["exact_sums"]]
            rows = all(x["rows_of_own_grad_exact"] and (x["rows_bit_exact"] or not x["exact_sums"]) for x in grads)
            return all(x["h_exact"] for x in checks) and all(x["bit_exact"] for x in exact) and rows

        checks_then_sweep(args.out, {"residual_norm_quant": check_residual_norm_quant,
                                     "residual_norm_grad": check_residual_norm_grad,
                                     "residual_norm_autograd": check_residual_norm_autograd},
                          "residual_norm_sweep", sweep_residual_norm_quant, args.residual_norm, residual_norm_passed,
                          args.skip_checks)
    if args.gated:
        checks_then_sweep(args.out, {"gated_norm_grad": check_gated_norm_grad, "gated_autograd": check_gated_autograd},
                          "gated_sweep", sweep_gated_norm_grad, args.gated,
                          lambda r: all(x["bit_exact"] for x in r["gated_norm_grad"] if x["exact_sums"]), args.skip_checks)
    if args.rope:
        checks_then_sweep(args.out, {"rope_grad_rows": check_rope_grad_rows, "rope_autograd": check_rope_autograd},
                          "rope_sweep", sweep_rope_grad_rows, args.rope,
                          # the sweep's "replaced" row is a time, not a check
                          lambda r: all(x.get("bit_exact", True) for x in r["rope_grad_rows"] + r["rope_sweep"]),
                          args.skip_checks)
    if args.residual_grad:
        result = {"gpu": torch.cuda.get_device_name(),
                  "residual_grad_sweep": sweep_residual_norm_grad([m for m in args.residual_grad.split(",") if m])}
        write_json(args.out, result)
        return
    if args.grad_rows:
        sweep_grad_rows([m for m in args.grad_rows.split(",") if m], path=args.out)
        return
    if args.skip_checks:
        result = {"gpu": torch.cuda.get_device_name(), "bench": bench([m for m in args.models.split(",") if m],
                                                                       [m for m in args.tiles.split(",") if m])}
        write_json(args.out, result)
        return
    exact = check_exact([] if args.skip_tiles else EXACT_CASES)
    grad_rows = check_grad_rows()
    grads = check_autograd()
    refreshes = check_refresh()
    ok = all(r["bit_exact"] for r in exact)
    ok_rows = all(r["bit_exact"] for r in grad_rows)
    ok_refresh = all(r["bit_exact"] for r in refreshes)
    print(f"\nint8_mm bit-exact against the reference: {ok}; quantize_grad_rows: {ok_rows}; refresh: {ok_refresh}",
          flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "exact": exact, "grad_rows": grad_rows, "autograd": grads, "refresh": refreshes,
              "launch": launch_cost()}
    write_json(args.out, result)
    # --models "": the checks alone
    result["bench"] = bench([m for m in args.models.split(",") if m], [m for m in args.tiles.split(",") if m])
    write_json(args.out, result)
    sys.exit(0 if ok and ok_rows else 1)


if __name__ == "__main__":
    main()
