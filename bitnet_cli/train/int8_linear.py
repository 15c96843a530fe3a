"""BitLinear on int8 tensor cores for training (``train.int8_matmul``).

The plain ``BitLinear`` (bitnet_cli.model) fake-quantises: it rounds activations to int8 and
weights to ternary values, then multiplies them as bf16 numbers. Here the same integers go to
the int8 tensor cores instead, whose rate on Hopper/Ampere is twice the bf16 rate:

* forward: ``y = (Xq @ T^T) * (1 / s_x[token]) * (1 / s_w)``, Xq the per-token absmax int8
  activations (the plain path's ``round(x * s_x)``), T the ternary weight (``round(W * s_w)``),
  accumulated exactly in int32; both scales are applied in the kernel's epilogue.
* grad_input: ``dX = (Gq @ T) * (1 / s_g[token])`` with ``Gq = round(G / s_w * s_g)``, the output
  gradient (times the weight's scale) quantised per token to int8 the same way (round to
  nearest, absmax scale; the absmax floored at ``GRAD_ABSMAX_FLOOR``, not the activations'
  1e-5, which training gradients are far below). This is the
  "SwitchBack" choice (Wortsman et al., 2023: int8 forward and input gradient, 16-bit weight
  gradient): the per-row scale follows each token's gradient magnitude, so a row's error is at
  most 1/254 of its own largest entry, and the straight-through estimator already treats this
  product as an approximation. ``train.int8_grad_input: false`` keeps it in bf16 instead.
* grad_weight: ``dW = G^T @ X~`` in the compute dtype, X~ the dequantised activations exactly
  as the plain path has them (``Xq / s_x``). ``train.int8_grad_weight: on`` puts it on int8 products too
  (:func:`int8_grad_weights`): ``dW[n, k] = sum_t (G[t, n] / s_x[t]) Xq[t, k]``, so only ``G / s_x`` is rounded,
  per block of 128 tokens and per column; each block's integer product is exact and scaled once. Off by
  default: on an H200 its kernels (the rounding pass, the transposed copy of Xq, a product that rescales its
  accumulator every 128 tokens) took longer than the bf16 product (benchmarks/RESULTS.md, session 18).
  On wide models (:func:`wide_model`) on GPUs with fp8 tensor cores the bf16 one runs on those instead
  (:func:`fp8_grad_weight`: G and X~ each in e4m3 with one scale per tensor, one product for the stacked projections;
  ``$BITNET_INT8_FP8_GRAD_WEIGHT=0`` or ``1`` decides for any model).

The activations are saved for the backward as grad_weight reads them, dequantised in the compute
dtype (as much memory as the plain path's; saving int8 plus a scale per token took half of that,
but a pass over them in every backward to dequantise them again); the fp8 weight gradient saves those instead, since it
casts from them anyway (:func:`_weight_input`).
The ternary weight, its transpose and ``s_w`` are computed once per optimiser step
(:func:`refresh`) rather than in every micro-batch's forward; under FSDP, where the full weight
exists only inside the forward, they are computed there instead.

Projections that read the same input (q/k/v, gate/up: a module's ``shared_input`` in
bitnet_cli.model) run as one product over their stacked ternary weights (:class:`Int8Product`):
the input is quantised and saved once, the forward product is 2304 or 4096 columns wide instead
of 768 or 2048 (small), grad_input sums over K = 2304 or 4096 in one product instead of three or
two short ones, and the weight gradient is one product. Each projection keeps its own ``s_w``:
the forward applies it per output column in the epilogue, and grad_input, where the columns are
the reduction, folds it into the output gradient before the per-token rounding
(``round(G_n / s_w(n) * s_g)``). A single projection is the same with one member.

The stacked product returns one output per projection (views of its one result), so that the
backward receives each projection's output gradient as its consumer's backward wrote it (dq, dk,
dv out of attention and RoPE; dgate, dup out of the MLP's activation) and never concatenates them:
torch.compile made that concatenation into token rows one gather kernel, ten times slower than the
memory it moves (benchmarks/RESULTS.md, session 6). One opaque op, ``bitnet::quantize_grad_rows``,
reads the parts in a single pass and writes the int8 rows of ``[G_0 * c_0, G_1 * c_1, ...]`` and
their scales (:func:`quantize_grad_rows_reference` states it in torch); grad_weight is one product
per projection from its own part.

The activations' quantisation is written in torch so that torch.compile fuses it with its
neighbours, except where a norm precedes the product: after BitNet's sub-norms (before o_proj and
down_proj, relu2 first for down_proj) one op, ``bitnet::norm_quant`` (:func:`norm_quant`, a Triton
kernel that reads each row once), computes the norm and the rounding with the plain path's eager
numerics (inductor's fusion of the same torch code did not: it keeps the norm's bf16 rounding out, and
a few percent of the int8 values came out one step apart), and its backward is in torch ops
(:class:`_NormQuant`); ``$BITNET_INT8_NORM_QUANT=0`` leaves those to torch.compile too. The residual norms before
q/k/v and gate/up are the same kernel with the residual add before them (``bitnet::residual_norm_quant``: it also
writes the new residual stream; :class:`_ResidualNormQuant`, reached through model._residual_norm_project, the
decoder layers leaving each add to the norm after it); ``$BITNET_INT8_RESIDUAL_NORM=0`` leaves those to
torch.compile. BitNet's MLP (relu2 and a sub-norm) goes one step further (:meth:`Int8Product.residual_mlp`): its
gate/up product, relu2 and the sub-norm are one autograd function (:class:`_GatedProduct`), whose backward forms gate's
and up's output gradients and their int8 rows in one kernel (``bitnet::gated_norm_grad``) instead of torch ops and then
``bitnet::quantize_grad_rows``; ``$BITNET_INT8_GATED_GRAD=0`` leaves that to :class:`_NormQuant` (wider than
``GATED_MAX_WIDTH`` only with ``$BITNET_INT8_GATED_WIDE=1``). Likewise (unless the variables below are 0),
o_proj's and down_proj's output gradients get the same treatment from the residual norm after
them (``$BITNET_INT8_RESIDUAL_ROWS``, :class:`_ProductResidualNormQuant`), and q/k/v's from RoPE's backward
(``$BITNET_INT8_ROPE_ROWS``: the q/k/v product and RoPE as one autograd function, :class:`_RotaryProduct`,
whose backward is one kernel, ``bitnet::rope_grad_rows``, reached through model._residual_attention_heads).
The products are one custom op,
``bitnet::int8_mm``: a Triton kernel on CUDA, and on other devices :func:`int8_mm_reference`,
the pure-torch statement of exactly what the kernel computes (used by the CPU tests to hold the
fast path to the plain one). Both custom ops are tested bit for bit against their references on
a GPU by benchmarks/int8_kernels.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from bitnet_cli.errors import BitnetError
from bitnet_cli.model import ternary_scale

# ----------------------------------------------------------------------------- quantisers


# The floor of a gradient row's absmax in :func:`quantize_rows`. Activations keep the plain path's
# 1e-5, but output gradients are far smaller: with the loss a mean over B tokens each entry is of
# order 1/B (3e-5 at 32k tokens per step), times s_w^-1 = mean|W| (about 0.02) where it is folded in,
# so a 1e-5 floor would round nearly every entry to 0 (the int8 path then trained to a loss of 6.2
# instead of 3.2 on an H200). 1e-30 is below any gradient that matters, and 127 / 1e-30 still fits fp32.
GRAD_ABSMAX_FLOOR = 1e-30


def quantize_rows(x: torch.Tensor, floor: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8, the plain path's activation arithmetic in fp32.

    Returns ``(q, s)``: ``q = clamp(round(x * s), -128, 127)`` as int8 and ``s = 127 / max(max|x|, floor)``
    (fp32, one per row), so that with the default floor ``q / s`` is bit for bit the plain path's
    dequantised tensor. Gradients pass ``GRAD_ABSMAX_FLOOR`` instead (see there).
    """
    xf = x.float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=floor)
    q = (xf * s).round().clamp(-128, 127).to(torch.int8)
    return q, s.squeeze(-1)


def int8_rows(m: int, n: int, device: torch.device | str) -> torch.Tensor:
    """An uninitialised int8 [m, n] whose rows start on 16-byte boundaries: a view of [m, n rounded up
    to 16], as the TMA product kernel (int8_triton) needs to read it (1.3b's K = 5460 and 10920), and as the norm
    kernels that write int8 rows assume (``int8_triton._at_8_bytes``)."""
    return torch.empty((m, -(-n // 16) * 16), dtype=torch.int8, device=device)[:, :n]


def pad_rows(q: torch.Tensor) -> torch.Tensor:
    """``q`` [m, n] int8 as a view with 16-byte-aligned rows (see :func:`int8_rows`); the same values. ``q``
    itself where its rows already are (n a multiple of 16, or rows padded already, as
    ``quantize_grad_rows`` writes them)."""
    return q if q.shape[-1] % 16 == 0 else aligned_rows(q)


def ternary_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarisation as the plain path does it: ``(T int8, s_w fp32 scalar)``, W~ = T / s_w."""
    wf = w.detach().float()
    s = ternary_scale(wf.abs().mean())
    return (wf * s).round().clamp(-1, 1).to(torch.int8), s


def stacked_ternary(weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ternary weights of projections of one input, stacked by rows: ``(T [N, K], T^T [K, N]
    contiguous, col_scale [N])``, ``col_scale`` each row's ``1 / s_w`` (fp32; ``T * col_scale`` is
    bit for bit the plain path's W~ = T / s_w, T being -1, 0 or 1)."""
    parts = [ternary_weight(w) for w in weights]
    trits = torch.cat([t for t, _ in parts]) if len(parts) > 1 else parts[0][0]
    col_scale = torch.cat([(1.0 / s).expand(t.shape[0]) for t, s in parts])
    return trits, trits.t().contiguous(), col_scale


# ----------------------------------------------------------------------------- the product


def int8_mm_reference(a: torch.Tensor, b: torch.Tensor, row_mul: torch.Tensor, col_mul: torch.Tensor | None,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """What the kernel computes: ``(a @ b^T)`` exactly in int32, ``* row_mul[:, None] (* col_mul[None, :])`` in fp32.

    ``a`` is int8 [M, K], ``b`` int8 [N, K] (both K-contiguous, as the int8 tensor cores want),
    ``row_mul`` fp32 [M], ``col_mul`` fp32 [N] or None; the result is rounded once to ``out_dtype``.
    """
    c = torch.mm(a.to(torch.int32), b.to(torch.int32).t()).float() * row_mul[:, None]
    if col_mul is not None:
        c = c * col_mul[None, :]
    return c.to(out_dtype)


# The two ops are declared through torch.library.Library rather than torch.library.custom_op: the same
# dispatcher ops (bitnet::int8_mm, bitnet::quantize_grad_rows) with the same fake kernels for torch.compile,
# but a call costs the dispatcher alone, without custom_op's Python layers (its autograd wrapper, the
# redispatch, the output-aliasing check: about 9 us against 2.5 per call on this project's CPU host,
# and a 700m step calls them about 580 times). Neither op needs autograd: they run inside _Int8Linear.
_LIB = torch.library.Library("bitnet", "FRAGMENT")
_LIB.define("int8_mm(Tensor a, Tensor b, Tensor row_mul, Tensor? col_mul, ScalarType out_dtype) -> Tensor")
_LIB.define("quantize_grad_rows(Tensor[] parts, Tensor col_scale) -> (Tensor, Tensor)")
_LIB.define("norm_quant(Tensor x, Tensor? gate, Tensor weight, float eps, ScalarType out_dtype, "
            "ScalarType? y_dtype=None, bool with_x_deq=True) -> (Tensor, Tensor, Tensor, Tensor)")
_LIB.define("residual_norm_quant(Tensor x, Tensor delta, Tensor weight, float eps, ScalarType out_dtype, "
            "bool with_x_deq=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _int8_mm_cuda(a, b, row_mul, col_mul, out_dtype):
    from bitnet_cli.train import int8_triton

    return int8_triton.int8_mm_op(a, b, row_mul, col_mul, out_dtype)


_LIB.impl("int8_mm", _int8_mm_cuda, "CUDA")
_LIB.impl("int8_mm", int8_mm_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("bitnet::int8_mm", lib=_LIB)
def _(a, b, row_mul, col_mul, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def int8_mm(a: torch.Tensor, b: torch.Tensor, row_mul: torch.Tensor, col_mul: torch.Tensor | None,
            out_dtype: torch.dtype) -> torch.Tensor:
    """``bitnet::int8_mm``: the Triton product on CUDA (int8_triton.int8_mm_op), :func:`int8_mm_reference` elsewhere."""
    return torch.ops.bitnet.int8_mm.default(a, b, row_mul, col_mul, out_dtype)


def quantize_grad_rows_reference(parts: list[torch.Tensor], col_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``bitnet::quantize_grad_rows`` computes: :func:`quantize_rows` of the output gradient
    ``cat([part.float() for part in parts], -1) * col_scale`` with the gradients' floor
    (``GRAD_ABSMAX_FLOOR``): ``(gq int8 [M, N], s_g fp32 [M])``, N the parts' widths summed."""
    g = torch.cat([p.float() for p in parts], dim=-1) if len(parts) > 1 else parts[0].float()
    return quantize_rows(g * col_scale, GRAD_ABSMAX_FLOOR)


def _quantize_grad_rows_cuda(parts, col_scale):
    from bitnet_cli.train import int8_triton

    return int8_triton.quantize_grad_rows(parts, col_scale)


def _quantize_grad_rows_other(parts, col_scale):
    q, s = quantize_grad_rows_reference(parts, col_scale)
    return pad_rows(q), s  # the rows' layout the GPU kernel writes (int8_rows), as the fake op states it


_LIB.impl("quantize_grad_rows", _quantize_grad_rows_cuda, "CUDA")
_LIB.impl("quantize_grad_rows", _quantize_grad_rows_other, "CompositeExplicitAutograd")


@torch.library.register_fake("bitnet::quantize_grad_rows", lib=_LIB)
def _(parts, col_scale):
    m = parts[0].shape[0]
    n = sum(p.shape[1] for p in parts)
    return int8_rows(m, n, parts[0].device), parts[0].new_empty((m,), dtype=torch.float32)


def quantize_grad_rows(parts: list[torch.Tensor], col_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``bitnet::quantize_grad_rows``: :func:`quantize_grad_rows_reference` (in one Triton pass on CUDA), the
    int8 rows 16-byte aligned (:func:`int8_rows`)."""
    return torch.ops.bitnet.quantize_grad_rows.default(parts, col_scale)


def aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` [m, n] with rows starting on 16-byte boundaries: itself if they already do, else a view of a
    padded copy. TMA reads int8 rows only so (:func:`pad_rows`), and cuBLAS runs its fast bf16 kernels only on
    such operands: at 1.3b's 5460-wide rows (10,920 bytes) it ran at 224-273 TFLOP/s against 700-800 aligned
    (benchmarks/RESULTS.md, session 12)."""
    n, per_row = t.shape[-1], 16 // t.element_size()
    if t.stride(-1) == 1 and t.stride(0) % per_row == 0 and t.data_ptr() % 16 == 0:
        return t
    return torch.nn.functional.pad(t, (0, -n % per_row))[:, :n]


@torch.library.custom_op("bitnet::grad_weight", mutates_args=())
def grad_weight(g: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``(g^T @ x).to(out_dtype)`` (one projection's weight gradient) with both operands' rows 16-byte aligned
    first (:func:`aligned_rows`). An opaque op, so that the padded layout is the one cuBLAS sees (inside a
    compiled graph a pad followed by a slice may be folded away); used only where a width is not a
    multiple of 8 (1.3b's 5460), where the copies cost far less than the unaligned product."""
    return (aligned_rows(g).t() @ aligned_rows(x)).to(out_dtype)


@grad_weight.register_fake
def _(g, x, out_dtype):
    return g.new_empty((g.shape[1], x.shape[1]), dtype=out_dtype)


def align_grad_weight() -> bool:
    """``$BITNET_INT8_ALIGN_GRAD_WEIGHT=1``: grad_weight through :func:`grad_weight` where a width is not a
    multiple of 8. Opt-in: it makes the step slower. At 1.3b on one H200 (benchmarks/RESULTS.md, session 15) the int8
    step took 1.189 s with it against 1.014 without (session 13: 1.241 with it and ``BITNET_INT8_REFRESH=triton``)."""
    return env_switch("BITNET_INT8_ALIGN_GRAD_WEIGHT", default="0")


def _grad_weight(g: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    if (g.shape[1] % 8 or x.shape[1] % 8) and align_grad_weight():
        return grad_weight(g, x, out_dtype)
    return (g.t() @ x).to(out_dtype)


def _weight_input(x_deq: torch.Tensor, q: torch.Tensor, s_x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What a product's forward saves for its weight gradient (:func:`_grad_weights`): X~, the bf16 product's operand;
    with ``$BITNET_INT8_FP8_GRAD_WEIGHT=1`` the int8 rows and their scales instead, which the fp8 operand is cast from
    (half the memory, and X~'s absmax known from the scales)."""
    return (q, s_x) if fp8_grad_weight_enabled() else (x_deq,)


def _x_deq_read() -> bool:
    """Whether anything reads the values of the X~ that the norm ops (:func:`norm_quant`, :func:`residual_norm_quant`)
    hand to the products: the bf16 weight gradient does (:func:`_weight_input`); with the fp8 one X~ is only the
    straight-through estimator's carrier of a gradient, and its store (2 of the 5-9 bytes an element those kernels
    move) is skipped."""
    return not fp8_grad_weight_enabled()


def _grad_weights(gs: list[torch.Tensor], saved: tuple[torch.Tensor, ...], w_dtypes: list[torch.dtype],
                  g_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The weight gradients of projections of one input, ``G_i^T X~`` per output gradient ``G_i``, from what the
    forward saved (:func:`_weight_input`): one bf16 product each, or one fp8 product for all of them
    (:func:`fp8_grad_weight`). ``g_rows``: the scales ``(s_g, col_scale)`` of the int8 rows the backward rounded gs to
    (``round(G * col_scale * s_g)``), which bound G's absmax for the fp8 operand's scale without a pass over G."""
    if len(saved) == 1:
        return [_grad_weight(g, saved[0], dt) for g, dt in zip(gs, w_dtypes)]
    q, s_x = saved
    # |X~| = |q| / s_x <= 127 / s_x; |G| <= 127 / (s_g * col_scale), per token and column (the bound may exceed the
    # absmax by the ratio of the parts' col_scale, costing the fp8 operand that much range at the bottom). G's operand
    # is cast from G, not from those int8 rows (1 byte read instead of 2): the stacked parts share each token's scale,
    # and q's and k's gradients, about 100x smaller than v's in the tiny model, lose 59-98% of their weight gradient
    # to that rounding (session 23; the fp8 switch's model test fails so).
    g_amax = None if g_rows is None else 127.0 / (g_rows[0].min() * g_rows[1].min())
    dw = fp8_grad_weight(gs, q, row_scale=1.0 / s_x, g_amax=g_amax, x_amax=127.0 / s_x.min())
    return [d.to(dt) for d, dt in zip(dw.split([g.shape[1] for g in gs]), w_dtypes)]


# ----------------------------------------------------------------------------- the fp8 weight gradient


# e4m3's largest finite value: each fp8 operand is scaled so that its absmax lands there. e4m3 for both operands: on
# the CPU its product's error was 3.7% against e5m2's 5.9% for G (the per-tensor scale leaves e4m3 range enough).
E4M3_MAX = 448.0


def fp8_grad_weight_enabled() -> bool:
    """``$BITNET_INT8_FP8_GRAD_WEIGHT``: the bf16-path weight gradients on fp8 tensor cores (:func:`fp8_grad_weight`),
    Hopper's fp8 rate being twice its bf16 one. It changes the numerics (each operand rounded to e4m3, about 4% error
    in the product against bf16's 0.2%); training tolerates that: 1,200 steps of small.yaml ended 0.0028 from the bf16
    weight gradient's validation loss (benchmarks/RESULTS.md, session 25). Unset, the last :func:`enable` decides
    (:func:`wide_model`: on for wide models on GPUs with fp8 tensor cores)."""
    return env_switch("BITNET_INT8_FP8_GRAD_WEIGHT", default="1" if _fp8_by_default else "0")


def fp8_capable(device: torch.device) -> bool:
    """Whether ``device`` has fp8 tensor cores that ``torch._scaled_mm`` drives (CUDA compute capability 8.9+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _e4m3_token_major(t: torch.Tensor, scale: torch.Tensor, pad_tokens: int, pad_cols: int) -> torch.Tensor:
    """``t`` [M, N] as e4m3 [N + pad_cols, M + pad_tokens] row-major: ``t * scale`` zero-padded, transposed so that
    tokens (the weight gradient's reduction) are contiguous, as the fp8 tensor cores read both operands."""
    t = torch.nn.functional.pad(t.float() * scale, (0, pad_cols, 0, pad_tokens)).clamp(-E4M3_MAX, E4M3_MAX)
    return t.to(torch.float8_e4m3fn).t().contiguous()


def _e4m3_scale(amax: torch.Tensor) -> torch.Tensor:
    """The factor that maps an operand's absmax ``amax`` to ``E4M3_MAX`` (fp32; an all-zero operand keeps a finite
    one, under the gradients' floor)."""
    return E4M3_MAX / amax.float().clamp(min=GRAD_ABSMAX_FLOOR)


def fp8_operands(gs: list[torch.Tensor], x: torch.Tensor, row_scale: torch.Tensor | None = None,
                 g_amax: torch.Tensor | None = None, x_amax: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weight gradient's operands as ``torch._scaled_mm`` takes them: ``a`` = [G_0 | G_1 | ...]^T [N, M'] in
    e4m3 (row-major), ``b`` = X~ [M', K'] in e4m3 (column-major), and the factors that multiply each back
    (fp32 scalars: one scale per operand, from its absmax). X~ is ``x``, or with ``row_scale`` [M] ``x *
    row_scale[:, None]`` (x the int8 rows, row_scale 1 / s_x). ``g_amax``, ``x_amax``: bounds of the operands' absmax
    where the caller knows them (from the rows' scales), else they are computed (a pass over each). M' and K' are the
    token count and X~'s width rounded up to 16 (the fp8 product's alignment), padded with zeros, which add nothing."""
    m, k = x.shape
    pad_tokens, pad_cols = -m % 16, -k % 16
    if g_amax is None:
        g_amax = torch.stack([g.abs().amax() for g in gs]).amax()
    if x_amax is None:  # each row's absmax times its positive scale: no X~ made for it
        row_amax = x.abs().amax(-1).float()
        x_amax = (row_amax if row_scale is None else row_amax * row_scale).amax()
    s_g, s_x = _e4m3_scale(g_amax), _e4m3_scale(x_amax)
    a = torch.cat([_e4m3_token_major(g, s_g, pad_tokens, 0) for g in gs])
    b = _e4m3_token_major(x, s_x if row_scale is None else (row_scale * s_x)[:, None], pad_tokens, pad_cols).t()
    return a, b, 1.0 / s_g, 1.0 / s_x


def fp8_grad_weight(gs: list[torch.Tensor], x: torch.Tensor, **bounds) -> torch.Tensor:
    """``dW [N, K] fp32 = [G_0 | G_1 | ...]^T X~``, the weight gradients of projections of one input stacked by rows, on
    one fp8 product (:func:`fp8_operands`, which ``bounds`` go to; ``torch._scaled_mm``, fp32 accumulation)."""
    a, b, inv_g, inv_x = fp8_operands(gs, x, **bounds)
    return torch._scaled_mm(a, b, scale_a=inv_g, scale_b=inv_x, out_dtype=torch.float32)[:, :x.shape[1]]


def _int8_grad_input(gq: torch.Tensor, s_g: torch.Tensor, trits_t: torch.Tensor, dtype: torch.dtype,
                     x_dtype: torch.dtype) -> torch.Tensor:
    """grad_input on the int8 product from the output gradient's int8 rows ``gq`` and scales ``s_g``
    (``bitnet::quantize_grad_rows`` or a kernel that rounds them as it forms them), in the input's dtype."""
    return int8_mm(gq, trits_t, 1.0 / s_g, None, dtype).to(x_dtype)


# ----------------------------------------------------------------------------- the int8 weight gradient


# Tokens per scaling block of the int8 weight gradient's output-gradient operand: one reduction step of its product
# (the int8 tensor cores' 128-deep step, DeepSeek-V3's block); each block's exact int32 product is scaled once.
GRAD_WEIGHT_BLOCK = 128


def quantize_grad_cols_reference(parts: list[torch.Tensor], s_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``bitnet::quantize_grad_cols`` computes: the int8 weight gradient's output-gradient operand.

    The weight gradient is ``dW = G^T X~`` with ``X~ = q / s_x`` (the forward's int8 rows and per-token scales), so
    ``dW[n, k] = sum_t G'[t, n] q[t, k]`` with ``G' = G / s_x`` (per token, fp32); only G' is rounded, per block of
    ``GRAD_WEIGHT_BLOCK`` tokens and per column (absmax, the gradients' floor). Returns ``(gq_t int8 [N, M]``: G'
    rounded, transposed (tokens contiguous, the K-major operand of the product; rows 16-byte aligned),
    ``d fp32 [ceil(M / block), N]``: each block and column's ``1 / scale``), N the parts' widths summed."""
    g = torch.cat([p.float() for p in parts], dim=-1) if len(parts) > 1 else parts[0].float()
    g = g / s_x[:, None]
    m, n = g.shape
    blocks = -(-m // GRAD_WEIGHT_BLOCK)
    g = torch.nn.functional.pad(g, (0, 0, 0, blocks * GRAD_WEIGHT_BLOCK - m)).reshape(blocks, GRAD_WEIGHT_BLOCK, n)
    scale = 127.0 / g.abs().amax(dim=1).clamp(min=GRAD_ABSMAX_FLOOR)
    q = (g * scale[:, None, :]).round().clamp(-128, 127).to(torch.int8).reshape(-1, n)[:m]
    return int8_rows(n, m, q.device).copy_(q.t()), 1.0 / scale


def int8_grad_weight_reference(gq_t: torch.Tensor, q_t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """What ``bitnet::int8_grad_weight`` computes: ``dW [N, K] fp32 = sum_b (gq_t_b @ q_t_b^T) * d[b][:, None]``
    over the blocks b of ``GRAD_WEIGHT_BLOCK`` tokens, in order; each block's integer product exact (float64:
    |p| <= 128 * 128 * block), then one fp32 product and one fp32 sum (the kernel runs without fma contraction).
    ``gq_t`` int8 [N, M] and ``d`` from :func:`quantize_grad_cols_reference`, ``q_t`` int8 [K, M]: the forward's
    rows transposed."""
    n, m = gq_t.shape
    out = torch.zeros((n, q_t.shape[0]), dtype=torch.float32, device=gq_t.device)
    for b in range(d.shape[0]):
        cols = slice(b * GRAD_WEIGHT_BLOCK, min((b + 1) * GRAD_WEIGHT_BLOCK, m))
        p = torch.mm(gq_t[:, cols].double(), q_t[:, cols].double().t()).float()
        out = out + p * d[b][:, None]
    return out


_LIB.define("quantize_grad_cols(Tensor[] parts, Tensor s_x) -> (Tensor, Tensor)")
_LIB.define("int8_grad_weight(Tensor gq_t, Tensor q_t, Tensor d) -> Tensor")


def _quantize_grad_cols_cuda(parts, s_x):
    from bitnet_cli.train import int8_triton

    return int8_triton.quantize_grad_cols(parts, s_x)


def _int8_grad_weight_cuda(gq_t, q_t, d):
    from bitnet_cli.train import int8_triton

    return int8_triton.int8_grad_weight(gq_t, q_t, d)


_LIB.impl("quantize_grad_cols", _quantize_grad_cols_cuda, "CUDA")
_LIB.impl("quantize_grad_cols", quantize_grad_cols_reference, "CompositeExplicitAutograd")
_LIB.impl("int8_grad_weight", _int8_grad_weight_cuda, "CUDA")
_LIB.impl("int8_grad_weight", int8_grad_weight_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("bitnet::quantize_grad_cols", lib=_LIB)
def _(parts, s_x):
    m = parts[0].shape[0]
    n = sum(p.shape[1] for p in parts)
    return int8_rows(n, m, parts[0].device), s_x.new_empty((-(-m // GRAD_WEIGHT_BLOCK), n), dtype=torch.float32)


@torch.library.register_fake("bitnet::int8_grad_weight", lib=_LIB)
def _(gq_t, q_t, d):
    return gq_t.new_empty((gq_t.shape[0], q_t.shape[0]), dtype=torch.float32)


def int8_grad_weights(gs: list[torch.Tensor], q: torch.Tensor, s_x: torch.Tensor) -> list[torch.Tensor]:
    """The weight gradients ``[G_i^T X~ for G_i in gs]`` (fp32) of projections of one input on int8 products:
    ``bitnet::quantize_grad_cols`` of the output gradients' parts (one pass), the forward's int8 rows ``q``
    transposed (tokens contiguous), one ``bitnet::int8_grad_weight`` over the stacked projections, split by rows."""
    gq_t, d = torch.ops.bitnet.quantize_grad_cols.default(gs, s_x)
    dw = torch.ops.bitnet.int8_grad_weight.default(gq_t, q.t().contiguous(), d)
    return list(dw.split([g.shape[1] for g in gs])) if len(gs) > 1 else [dw]


# ----------------------------------------------------------------------------- the sub-norms' rounding


def norm_quant_reference(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
                         out_dtype: torch.dtype, y_dtype: torch.dtype | None = None, with_x_deq: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``bitnet::norm_quant`` computes for x [M, K] (and gate [M, K] or None): the model's sub-norm
    ``n = rms_norm(y, weight, eps)`` of ``y = relu2(gate, x)`` (``y = x`` without a gate), then the following
    BitLinear's :func:`quantize_rows` of ``n``. Returns ``(q int8 [M, K] (rows 16-byte aligned, int8_rows), s_x fp32
    [M], x_deq = (q / s_x) in out_dtype, rstd fp32 [M])``: the int8 rows and their scale for the product, the plain
    path's dequantised input for grad_weight, and the norm's ``rsqrt(mean(y^2) + eps)`` for its backward.
    ``y_dtype`` (default x's): the dtype y has in the model, relu2 computed in it: under CUDA's bf16 autocast
    ``square`` runs as ``pow``, which autocast computes in fp32, so the plain path's relu2 output and its sub-norm are
    fp32 there (exact: a product of three bf16 values fits fp32's 24 bits), while o_proj's input stays bf16
    (:func:`_norm_dtype` finds it). Computed with autocast off: a function of its arguments alone. Without
    ``with_x_deq`` (:func:`_x_deq_read`: nothing will read X~'s values) the kernel leaves x_deq unwritten; here it is
    NaN, so that a stray read shows in every result."""
    from bitnet_cli.model import relu2, rms_norm

    yd = y_dtype or x.dtype
    with torch.autocast(x.device.type, enabled=False):
        y = x.to(yd) if gate is None else relu2(gate.to(yd), x.to(yd))
        yf = y.float()
        rstd = torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps)
        q, s_x = quantize_rows(rms_norm(y, weight, eps))
    x_deq = (q.float() / s_x[:, None]).to(out_dtype) if with_x_deq else torch.full_like(q, torch.nan, dtype=out_dtype)
    return pad_rows(q), s_x, x_deq, rstd.squeeze(-1)


def _norm_quant_cuda(x, gate, weight, eps, out_dtype, y_dtype=None, with_x_deq=True):
    from bitnet_cli.train import int8_triton

    return int8_triton.norm_quant(x, gate, weight, eps, out_dtype, y_dtype=y_dtype, with_x_deq=with_x_deq)


_LIB.impl("norm_quant", _norm_quant_cuda, "CUDA")
_LIB.impl("norm_quant", norm_quant_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("bitnet::norm_quant", lib=_LIB)
def _(x, gate, weight, eps, out_dtype, y_dtype=None, with_x_deq=True):
    m, k = x.shape
    return (int8_rows(m, k, x.device), x.new_empty((m,), dtype=torch.float32), x.new_empty((m, k), dtype=out_dtype),
            x.new_empty((m,), dtype=torch.float32))


def norm_quant(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
               out_dtype: torch.dtype, y_dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bitnet::norm_quant``: :func:`norm_quant_reference` in one Triton pass per row on CUDA; X~ written only where
    it is read (:func:`_x_deq_read`)."""
    return torch.ops.bitnet.norm_quant.default(x, gate, weight, eps, out_dtype, y_dtype, _x_deq_read())


def residual_norm_quant_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                                  out_dtype: torch.dtype, with_x_deq: bool = True) -> tuple[torch.Tensor, ...]:
    """What ``bitnet::residual_norm_quant`` computes for x, delta [M, K]: a decoder layer's residual add ``h = x +
    delta`` (the residual stream and a block's output: fp32 and bf16 under the trainer's autocast; h in their promoted
    dtype, as torch's add gives it), then :func:`norm_quant_reference` of h: the residual norm before q/k/v or gate/up
    and the stacked product's rounding of it. Returns ``(h, q, s_x, x_deq, rstd)``."""
    with torch.autocast(x.device.type, enabled=False):
        h = x + delta
    return (h, *norm_quant_reference(h, None, weight, eps, out_dtype, with_x_deq=with_x_deq))


def _residual_norm_quant_cuda(x, delta, weight, eps, out_dtype, with_x_deq=True):
    from bitnet_cli.train import int8_triton

    return int8_triton.residual_norm_quant(x, delta, weight, eps, out_dtype, with_x_deq=with_x_deq)


_LIB.impl("residual_norm_quant", _residual_norm_quant_cuda, "CUDA")
_LIB.impl("residual_norm_quant", residual_norm_quant_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("bitnet::residual_norm_quant", lib=_LIB)
def _(x, delta, weight, eps, out_dtype, with_x_deq=True):
    m, k = x.shape
    return (x.new_empty((m, k), dtype=torch.promote_types(x.dtype, delta.dtype)), int8_rows(m, k, x.device),
            x.new_empty((m,), dtype=torch.float32), x.new_empty((m, k), dtype=out_dtype),
            x.new_empty((m,), dtype=torch.float32))


def residual_norm_quant(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                        out_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``bitnet::residual_norm_quant``: :func:`residual_norm_quant_reference` in one Triton pass per row on CUDA
    (norm_quant's kernel, reading delta beside x and writing h too); X~ written only where it is read
    (:func:`_x_deq_read`)."""
    return torch.ops.bitnet.residual_norm_quant.default(x, delta, weight, eps, out_dtype, _x_deq_read())


def _norm_dtype(x: torch.Tensor, gate: torch.Tensor | None) -> torch.dtype:
    """The dtype the model's sub-norm input has here: x's, or with a gate that of ``relu2(gate, x)`` under the
    current autocast (fp32 under CUDA's bf16 autocast, see :func:`norm_quant_reference`), found on empty slices."""
    from bitnet_cli.model import relu2

    return x.dtype if gate is None else relu2(gate[:0], x[:0]).dtype


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the products compute in: autocast's where it is on for x's device, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def env_switch(variable: str, default: str = "1") -> bool:
    """An on/off environment variable (measurements): 1 or 0, ``default`` where unset; anything else is an error.
    Every ``BITNET_INT8_*`` on/off switch is read through it (int8_triton's too)."""
    import os

    env = os.environ.get(variable, default)
    if env not in ("0", "1"):
        raise BitnetError(f"{variable}={env!r}: expected 0 or 1")
    return env == "1"


def norm_quant_enabled() -> bool:
    """``$BITNET_INT8_NORM_QUANT`` (1 by default): whether :func:`enable` gives BitLinears after a sub-norm the
    fused :func:`norm_quant` (0: the norm, relu2 and the rounding as torch ops, fused by torch.compile as it likes;
    for measurements)."""
    return env_switch("BITNET_INT8_NORM_QUANT")


def residual_norm_quant_enabled() -> bool:
    """``$BITNET_INT8_RESIDUAL_NORM`` (1 by default): whether :func:`enable` gives the stacked products after a
    residual norm (q/k/v, gate/up) their norm, and the residual add before it, in one kernel
    (:func:`residual_norm_quant`; :func:`norm_quant` for the first layer, which has no add before it). 0: the add,
    the norm and the rounding as torch ops, fused by torch.compile as it likes (for measurements). Independent of
    ``$BITNET_INT8_NORM_QUANT``."""
    return env_switch("BITNET_INT8_RESIDUAL_NORM")


class _NormQuant(torch.autograd.Function):
    """:func:`norm_quant` with its backward (torch ops): outputs ``(q, s_x, x_deq, rstd)``, of which only
    ``x_deq`` carries a gradient: the straight-through estimator's, the gradient of the norm's output ``n``
    (the int8 product's grad_input). The backward is the sub-norm's (and relu2's) own chain rule, with ``y``
    recomputed from ``x`` and ``gate`` rather than saved."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps, out_dtype, y_dtype):
        q, s_x, x_deq, rstd = norm_quant(x, gate, weight, eps, out_dtype, y_dtype)
        ctx.y_dtype = y_dtype
        ctx.save_for_backward(x, gate, weight, rstd)
        ctx.mark_non_differentiable(q, s_x, rstd)
        return q, s_x, x_deq, rstd

    @staticmethod
    def backward(ctx, _gq, _gs, grad_n, _grstd):
        from bitnet_cli.model import relu2

        x, gate, weight, rstd = ctx.saved_tensors
        yd = ctx.y_dtype
        y = x.to(yd) if gate is None else relu2(gate.to(yd), x.to(yd))
        dy, grad_w = _rms_norm_backward(y, rstd, weight, grad_n, ctx.needs_input_grad[2])
        if gate is None:
            return dy.to(x.dtype), None, grad_w, None, None, None
        grad_x, grad_gate = _relu2_backward(dy, gate, x, yd)
        return grad_x, grad_gate, grad_w, None, None, None


def _relu2_backward(dy: torch.Tensor, gate: torch.Tensor, x: torch.Tensor,
                    y_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain rule of ``y = relu2(gate, x)`` (relu2 computed in ``y_dtype``) given y's gradient: ``(x's gradient,
    gate's)`` in their dtypes."""
    relu = torch.relu(gate.float())
    grad_x = (dy.float() * (relu * relu).to(y_dtype).float()).to(x.dtype)
    grad_gate = (dy.float() * x.float() * 2.0 * relu).to(gate.dtype)
    return grad_x, grad_gate


def _rms_norm_backward(y: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, grad_n: torch.Tensor,
                       weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chain rule of ``n = rms_norm(y, weight, eps)`` (model.rms_norm) given its ``rstd`` [M] and n's gradient:
    ``(dy in y's dtype, weight's gradient or None)``."""
    yf, r = y.float(), rstd[:, None]
    g = grad_n.float()
    grad_w = _rms_norm_weight_grad(y, rstd, weight, grad_n) if weight_grad else None
    dh = (g * weight.float()).to(y.dtype).float()
    # d/dy of y * rsqrt(mean(y^2) + eps): dh * r - y * r^3 * mean(dh * y)
    dy = (dh * r - yf * (r * r * r * (dh * yf).mean(-1, keepdim=True))).to(y.dtype)
    return dy, grad_w


def residual_norm_grad_reference(grad_h: torch.Tensor | None, grad_n: torch.Tensor, h: torch.Tensor,
                                 weight: torch.Tensor, rstd: torch.Tensor, x_dtype: torch.dtype,
                                 delta_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``bitnet::residual_norm_grad`` computes: the gradients of :func:`residual_norm_quant`'s inputs x and delta
    (the same values, in their dtypes) from those of its outputs h (the stream's own use, None if unused) and x_deq
    (``grad_n``, the norm's output's: the product's grad_input), h the saved sum and rstd its norm's: h's gradient is
    the two summed, as autograd sums a tensor's uses. Two separate tensors, also where the dtypes are equal (an op's
    outputs do not alias). Third, the norm weight's gradient (:func:`_rms_norm_weight_grad`), which the kernel sums from
    the same reads."""
    grad_x, grad_delta = _residual_norm_grads(grad_h, grad_n, h, weight, rstd, x_dtype, delta_dtype)
    return (grad_x, grad_delta.clone() if grad_delta is grad_x else grad_delta,
            _rms_norm_weight_grad(h, rstd, weight, grad_n))


def _residual_norm_grads(grad_h, grad_n, h, weight, rstd, x_dtype, delta_dtype):
    dy, _ = _rms_norm_backward(h, rstd, weight, grad_n, False)
    grad = dy if grad_h is None else grad_h + dy
    return grad.to(x_dtype), grad.to(delta_dtype)


_LIB.define("residual_norm_grad(Tensor? grad_h, Tensor grad_n, Tensor h, Tensor weight, Tensor rstd, "
            "ScalarType x_dtype, ScalarType delta_dtype) -> (Tensor, Tensor, Tensor)")


def _residual_norm_grad_cuda(grad_h, grad_n, h, weight, rstd, x_dtype, delta_dtype):
    from bitnet_cli.train import int8_triton

    return int8_triton.residual_norm_grad(grad_h, grad_n, h, weight, rstd, x_dtype, delta_dtype)


_LIB.impl("residual_norm_grad", _residual_norm_grad_cuda, "CUDA")
_LIB.impl("residual_norm_grad", residual_norm_grad_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("bitnet::residual_norm_grad", lib=_LIB)
def _(grad_h, grad_n, h, weight, rstd, x_dtype, delta_dtype):
    return h.new_empty(h.shape, dtype=x_dtype), h.new_empty(h.shape, dtype=delta_dtype), torch.empty_like(weight)


def residual_norm_grad_rows_reference(grad_h: torch.Tensor | None, grad_n: torch.Tensor, h: torch.Tensor,
                                      weight: torch.Tensor, rstd: torch.Tensor, col_scale: torch.Tensor,
                                      x_dtype: torch.dtype, delta_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """What ``bitnet::residual_norm_grad_rows`` computes: :func:`residual_norm_grad_reference`'s three gradients, then
    the rounding of delta's (the output gradient of the product that wrote delta, whose column scales are
    ``col_scale``) that the product's grad_input reads: :func:`quantize_grad_rows_reference` of it as one part, the
    int8 rows 16-byte aligned (:func:`pad_rows`)."""
    grad_x, grad_delta, grad_w = residual_norm_grad_reference(grad_h, grad_n, h, weight, rstd, x_dtype, delta_dtype)
    gq, s_g = quantize_grad_rows_reference([grad_delta], col_scale)
    return grad_x, grad_delta, grad_w, pad_rows(gq), s_g


_LIB.define("residual_norm_grad_rows(Tensor? grad_h, Tensor grad_n, Tensor h, Tensor weight, Tensor rstd, "
            "Tensor col_scale, ScalarType x_dtype, ScalarType delta_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _residual_norm_grad_rows_cuda(grad_h, grad_n, h, weight, rstd, col_scale, x_dtype, delta_dtype):
    from bitnet_cli.train import int8_triton

    return int8_triton.residual_norm_grad(grad_h, grad_n, h, weight, rstd, x_dtype, delta_dtype, col_scale=col_scale)


_LIB.impl("residual_norm_grad_rows", _residual_norm_grad_rows_cuda, "CUDA")
_LIB.impl("residual_norm_grad_rows", residual_norm_grad_rows_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("bitnet::residual_norm_grad_rows", lib=_LIB)
def _(grad_h, grad_n, h, weight, rstd, col_scale, x_dtype, delta_dtype):
    m, k = h.shape
    return (h.new_empty(h.shape, dtype=x_dtype), h.new_empty(h.shape, dtype=delta_dtype), torch.empty_like(weight),
            int8_rows(m, k, h.device), h.new_empty((m,), dtype=torch.float32))


def residual_norm_grad_kernel() -> bool:
    """``$BITNET_INT8_RESIDUAL_GRAD`` (0 by default): whether :class:`_ResidualNormQuant`'s backward forms x's and
    delta's gradients with ``bitnet::residual_norm_grad`` (a Triton pass per row on CUDA that writes both, the stream's
    fp32 and the block output's bf16, from one read) instead of torch ops, which torch.compile fuses as it likes: on an
    H200 it left the bf16 copy of the stream's gradient to a cast kernel of its own (benchmarks/RESULTS.md, session
    14, 6.6 ms a 700m step) in the unfused path. Opt-in: the 700m step took 0.5760 s with it against 0.5697 without
    (session 20), when the norm weight's gradient was a reduction kernel of its own (13.1 ms a step) that read the
    gradient and h again; the kernel now sums it from its own reads (not measured on a GPU yet)."""
    return env_switch("BITNET_INT8_RESIDUAL_GRAD", default="0")


def _rms_norm_weight_grad(y: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                          grad_n: torch.Tensor) -> torch.Tensor:
    """The norm weight's gradient in :func:`_rms_norm_backward`: n = weight * h, h = (y * rstd) rounded to y's dtype
    (rms_norm)."""
    return (grad_n.float() * (y.float() * rstd[:, None]).to(y.dtype).float()).sum(0).to(weight.dtype)


class _ResidualNormQuant(torch.autograd.Function):
    """:func:`residual_norm_quant` with its backward: outputs ``(h, q, s_x, x_deq, rstd)``, of which ``h`` (the new
    residual stream, read on by the rest of the model) and ``x_deq`` (as :class:`_NormQuant`'s) carry gradients;
    x's and delta's are :func:`residual_norm_grad_reference`'s (from the saved h, not recomputed), in torch ops (the
    norm weight's too) or with ``bitnet::residual_norm_grad`` (:func:`residual_norm_grad_kernel`, which also sums the
    norm weight's)."""

    @staticmethod
    def forward(ctx, x, delta, weight, eps, out_dtype):
        h, q, s_x, x_deq, rstd = residual_norm_quant(x, delta, weight, eps, out_dtype)
        ctx.dtypes = x.dtype, delta.dtype
        ctx.save_for_backward(h, weight, rstd)
        ctx.mark_non_differentiable(q, s_x, rstd)
        return h, q, s_x, x_deq, rstd

    @staticmethod
    def backward(ctx, grad_h, _gq, _gs, grad_n, _grstd):
        h, weight, rstd = ctx.saved_tensors
        if residual_norm_grad_kernel():
            grad_x, grad_delta, grad_w = torch.ops.bitnet.residual_norm_grad.default(grad_h, grad_n, h, weight, rstd,
                                                                                    *ctx.dtypes)
        else:
            grad_x, grad_delta = _residual_norm_grads(grad_h, grad_n, h, weight, rstd, *ctx.dtypes)
            grad_w = _rms_norm_weight_grad(h, rstd, weight, grad_n) if ctx.needs_input_grad[2] else None
        return grad_x, grad_delta, grad_w if ctx.needs_input_grad[2] else None, None, None


def residual_rows_enabled() -> bool:
    """``$BITNET_INT8_RESIDUAL_ROWS`` (on where unset; ``0`` turns it off): whether :func:`enable` lets o_proj's
    and down_proj's products (:attr:`Int8Product.defer`) hand the residual norm after them their rounded input
    (:class:`RoundedInput`) instead of their output, so that one autograd function (:class:`_ProductResidualNormQuant`)
    owns the product and the norm and its backward rounds the product's output gradient (the stream's) in the norm's
    backward kernel (``bitnet::residual_norm_grad_rows``) instead of a ``bitnet::quantize_grad_rows`` pass of its
    own."""
    return env_switch("BITNET_INT8_RESIDUAL_ROWS", default="1")


class RoundedInput(NamedTuple):
    """A single projection's product not yet taken: its input's int8 rows ``q`` [M, K], their scales ``s_x`` and X~
    ``x_deq`` (as :class:`_NormQuant` gives them), the BitLinear ``proj`` (whose ``int8`` holds the cached ternary
    weight), the product's compute ``dtype`` and the ``lead`` dimensions of its output. What a deferring product
    (:attr:`Int8Product.defer`) returns in place of its output, for the residual norm after it to take the product
    (:func:`residual_norm_quant_of`); :meth:`output` takes it where nothing does (the same numbers)."""
    x_deq: torch.Tensor
    q: torch.Tensor
    s_x: torch.Tensor
    proj: nn.Module
    dtype: torch.dtype
    lead: tuple

    def output(self) -> torch.Tensor:
        """The projection's output, as :func:`int8_linear` gives it."""
        product = self.proj.int8
        y = _Int8Linear.apply(self.x_deq, self.q, self.s_x, product.trits, product.trits_t, product.col_scale,
                              self.dtype, True, False, self.proj.weight)
        return y.reshape(*self.lead, y.shape[-1])


class _ProductResidualNormQuant(torch.autograd.Function):
    """A single projection's int8 product (``delta``, inputs as :class:`_Int8Linear`'s after x: its X~, int8 rows and
    scales, the cached ternary weight, the compute dtype) followed by :class:`_ResidualNormQuant` of ``x + delta``
    (then the norm's weight, eps and rounding dtype, and the projection's latent weight): the outputs are
    _ResidualNormQuant's. One function owns both so that the norm's backward kernel, which forms delta's gradient one
    row at a time, also rounds it for the product's grad_input (``bitnet::residual_norm_grad_rows``): the producer
    and the consumer of those rows are the same backward, with no state handed between autograd nodes. The product's
    backward is :class:`_Int8Linear`'s (int8 grad_input, the weight gradient of :func:`_grad_weights`)."""

    @staticmethod
    def forward(ctx, x, x_deq, q, s_x, trits, trits_t, col_scale, dtype, norm_weight, eps, out_dtype, proj_weight):
        delta = int8_mm(q, trits, 1.0 / s_x, col_scale, dtype)
        h, q_n, s_n, x_deq_n, rstd = residual_norm_quant(x, delta, norm_weight, eps, out_dtype)
        ctx.dtypes, ctx.w_dtype, ctx.x_dtype = (x.dtype, delta.dtype), proj_weight.dtype, x_deq.dtype
        ctx.save_for_backward(h, norm_weight, rstd, trits_t, col_scale, *_weight_input(x_deq, q, s_x))
        ctx.mark_non_differentiable(q_n, s_n, rstd)
        return h, q_n, s_n, x_deq_n, rstd

    @staticmethod
    def backward(ctx, grad_h, _gq, _gs, grad_n, _grstd):
        h, norm_weight, rstd, trits_t, col_scale, *x_saved = ctx.saved_tensors
        grad_x, grad_delta, grad_norm_w, gq, s_g = torch.ops.bitnet.residual_norm_grad_rows.default(
            grad_h, grad_n, h, norm_weight, rstd, col_scale, *ctx.dtypes)
        grad_in = _int8_grad_input(gq, s_g, trits_t, ctx.dtypes[1], ctx.x_dtype) if ctx.needs_input_grad[1] else None
        grad_proj_w = (_grad_weights([grad_delta], x_saved, [ctx.w_dtype], (s_g, col_scale))[0]
                       if ctx.needs_input_grad[11] else None)
        return (grad_x, grad_in, None, None, None, None, None, None, grad_norm_w if ctx.needs_input_grad[8] else None,
                None, None, grad_proj_w)


def residual_norm_quant_of(x: torch.Tensor, residual: torch.Tensor | RoundedInput, norm: nn.Module,
                           dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """:class:`_ResidualNormQuant` of ``x + residual`` for x [M, K]; where ``residual`` is a :class:`RoundedInput`,
    with its product taken inside (:class:`_ProductResidualNormQuant`)."""
    if isinstance(residual, RoundedInput):
        product = residual.proj.int8
        return _ProductResidualNormQuant.apply(x, residual.x_deq, residual.q, residual.s_x, product.trits,
                                               product.trits_t, product.col_scale, residual.dtype, norm.weight,
                                               norm.eps, dtype, residual.proj.weight)
    return _ResidualNormQuant.apply(x, residual.reshape(x.shape), norm.weight, norm.eps, dtype)


def _norm_rows(x: torch.Tensor, residual: torch.Tensor | RoundedInput | None, norm: nn.Module,
               dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, q, s_x, x_deq)``: the int8 rows, scales and X~ of ``norm(h)`` for x [M, K], ``h = x + residual``
    (:func:`residual_norm_quant_of`), or of ``norm(x)`` where ``residual`` is None (:class:`_NormQuant`; h None)."""
    if residual is None:
        q, s_x, x_deq, _ = _NormQuant.apply(x, None, norm.weight, norm.eps, dtype, x.dtype)
        return None, q, s_x, x_deq
    h, q, s_x, x_deq, _ = residual_norm_quant_of(x, residual, norm, dtype)
    return h, q, s_x, x_deq


# ----------------------------------------------------------------------------- the gated MLP's backward


def gated_grad_columns(f: int, dtype: torch.dtype) -> int:
    """Where up's half starts in a row of :func:`gated_norm_grad_reference`'s gradient rows: ``f`` (gate's width) rounded
    up to 16 bytes, so that both halves' rows start on 16-byte boundaries (cuBLAS's fast weight-gradient kernels want
    them, :func:`aligned_rows`; 1.3b's 5460 -> 5464)."""
    per_row = 16 // dtype.itemsize
    return -(-f // per_row) * per_row


def gated_norm_grad_reference(y: torch.Tensor, grad_n: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                              col_scale: torch.Tensor, y_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """What ``bitnet::gated_norm_grad`` computes: the backward of the MLP's ``n = rms_norm(relu2(gate, up), weight)``
    (:class:`_NormQuant`'s with a gate: relu2 in ``y_dtype``, :func:`norm_quant_reference`) given ``y = [gate | up]``
    [M, 2F] (the gate/up product's output), n's gradient and the forward's rstd, followed by the gate/up product's
    output-gradient rounding (:func:`quantize_grad_rows_reference` with its ``col_scale`` [2F]). Returns ``(d, gq, s_g,
    grad_weight)``: d [M, 2 * gated_grad_columns(F)] in y's dtype holding gate's gradient in columns :F and up's from
    column gated_grad_columns(F) (the gap unset), gq int8 [M, 2F] (rows 16-byte aligned) and s_g fp32 [M] the rounded
    rows and their scales, and the norm weight's gradient (:func:`_rms_norm_weight_grad`)."""
    from bitnet_cli.model import relu2

    m, n = y.shape
    f, f_pad = n // 2, gated_grad_columns(n // 2, y.dtype)
    gate, up = y[:, :f], y[:, f:]
    with torch.autocast(y.device.type, enabled=False):
        yv = relu2(gate.to(y_dtype), up.to(y_dtype))
        dy, grad_w = _rms_norm_backward(yv, rstd, weight, grad_n, True)
        grad_up, grad_gate = _relu2_backward(dy, gate, up, y_dtype)
    d = y.new_empty((m, 2 * f_pad))
    d[:, :f], d[:, f_pad:f_pad + f] = grad_gate, grad_up
    gq, s_g = quantize_grad_rows_reference([grad_gate, grad_up], col_scale)
    return d, pad_rows(gq), s_g, grad_w


_LIB.define("gated_norm_grad(Tensor y, Tensor grad_n, Tensor rstd, Tensor weight, Tensor col_scale, "
            "ScalarType y_dtype) -> (Tensor, Tensor, Tensor, Tensor)")


def _gated_norm_grad_cuda(y, grad_n, rstd, weight, col_scale, y_dtype):
    from bitnet_cli.train import int8_triton

    return int8_triton.gated_norm_grad(y, grad_n, rstd, weight, col_scale, y_dtype)


_LIB.impl("gated_norm_grad", _gated_norm_grad_cuda, "CUDA")
_LIB.impl("gated_norm_grad", gated_norm_grad_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("bitnet::gated_norm_grad", lib=_LIB)
def _(y, grad_n, rstd, weight, col_scale, y_dtype):
    m, n = y.shape
    return (y.new_empty((m, 2 * gated_grad_columns(n // 2, y.dtype))), int8_rows(m, n, y.device),
            y.new_empty((m,), dtype=torch.float32), torch.empty_like(weight))


def gated_grad_enabled() -> bool:
    """``$BITNET_INT8_GATED_GRAD`` (1 by default): whether :func:`enable` gives the relu2 MLPs with a sub-norm
    (BitNet's) :meth:`Int8Product.residual_mlp`, whose gate/up product and sub-norm are one autograd function
    (:class:`_GatedProduct`) with its backward in one kernel (``bitnet::gated_norm_grad``: the sub-norm's and relu2's
    backward and the rounding of gate/up's output gradient, each row read once). 0: a :class:`_NormQuant` after the
    stacked product, its backward in torch ops and the rounding a pass of its own (``bitnet::quantize_grad_rows``;
    for measurements)."""
    return env_switch("BITNET_INT8_GATED_GRAD")


def gated_wide_enabled() -> bool:
    """``$BITNET_INT8_GATED_WIDE`` (0 by default): whether :func:`enable` also gives MLPs with gate wider than
    ``GATED_MAX_WIDTH`` or rows not of whole 16-byte units (1.3b's 5,460) :meth:`Int8Product.residual_mlp`, whose
    backward then runs ``bitnet::gated_norm_grad``'s wide kernel (int8_triton._gated_norm_grad_wide_kernel: each row
    walked in column chunks, three times, instead of held in registers, which spilled at 5,460). Opt-in until measured
    on a GPU."""
    return env_switch("BITNET_INT8_GATED_WIDE", default="0")


class _GatedProduct(torch.autograd.Function):
    """The MLP's stacked gate/up int8 product followed by its sub-norm of relu2 and down_proj's rounding: inputs as
    :class:`_Int8Linear`'s (x the dequantised input X~ with its int8 rows q and scales s_x, the stacked ternary weight
    of gate and up), then the sub-norm's weight and eps and the two latent weights; outputs ``(q2, s2, x_deq2)``, the
    int8 rows, scales and X~ of down_proj's input (:func:`norm_quant`). The backward (int8 grad_input,
    :func:`_grad_weights`, as _Int8Linear's defaults) forms gate's and up's output gradients and their int8 rows in one pass
    (``bitnet::gated_norm_grad``) instead of torch ops and then ``bitnet::quantize_grad_rows``."""

    @staticmethod
    def forward(ctx, x, q, s_x, trits, trits_t, col_scale, dtype, norm_weight, eps, *weights):
        y = int8_mm(q, trits, 1.0 / s_x, col_scale, dtype)
        f = y.shape[1] // 2
        gate, up = y[:, :f], y[:, f:]
        y_dtype = _norm_dtype(up, gate)
        q2, s2, x_deq2, rstd = norm_quant(up, gate, norm_weight, eps, dtype, y_dtype)
        ctx.save_for_backward(y, trits_t, col_scale, norm_weight, rstd, *_weight_input(x, q, s_x))
        ctx.y_dtype, ctx.dtype, ctx.x_dtype, ctx.w_dtypes = y_dtype, dtype, x.dtype, [w.dtype for w in weights]
        ctx.mark_non_differentiable(q2, s2)
        return q2, s2, x_deq2

    @staticmethod
    def backward(ctx, _gq2, _gs2, grad_n):
        y, trits_t, col_scale, norm_weight, rstd, *x_saved = ctx.saved_tensors
        d, gq, s_g, grad_norm_w = torch.ops.bitnet.gated_norm_grad.default(y, grad_n, rstd, norm_weight, col_scale,
                                                                          ctx.y_dtype)
        f, f_pad = y.shape[1] // 2, d.shape[1] // 2
        grad_x = _int8_grad_input(gq, s_g, trits_t, ctx.dtype, ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grads_w = _grad_weights([d[:, :f], d[:, f_pad:f_pad + f]], x_saved, ctx.w_dtypes, (s_g, col_scale))
        return (grad_x, None, None, None, None, None, None, grad_norm_w if ctx.needs_input_grad[7] else None, None,
                *grads_w)


# ----------------------------------------------------------------------------- q/k/v's rows in RoPE's backward


def rope_backward_reference(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of heads x [B, H, T, D] in ``dtype`` through ``model.apply_rope(x, cos, sin)`` given the gradient
    ``g`` of its result (any float dtype), as torch's eager autograd forms it: each product's gradient (``g * cos``;
    ``g * sin`` through the rotation, its halves swapped and the first negated) computed in fp32 (exact for bf16
    factors) and rounded to ``dtype``, then the two summed and rounded to ``dtype`` (autograd sums x's two uses in
    x's dtype). The compiled plain path (inductor: one fused fp32 kernel) may skip those roundings, so it may differ
    from this in the last bit of ``dtype``."""
    half = g.shape[-1] // 2
    g = g.float()
    through_cos = (g * cos.float()).to(dtype)
    through_sin = (g * sin.float()).to(dtype)
    rotated = torch.cat((through_sin[..., half:], -through_sin[..., :half]), dim=-1)
    return (through_cos.float() + rotated.float()).to(dtype)


def _token_rows(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Heads [B, H, T, D] as the product's output rows [B * T, H * D] in ``dtype`` (a copy where not a view)."""
    b, h, t, d = g.shape
    return g.to(dtype).transpose(1, 2).reshape(b * t, h * d)


def rope_grad_rows_reference(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, col_scale: torch.Tensor,
                             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``bitnet::rope_grad_rows`` computes from the gradients of the rotated q, k [B, H or KV, T, D] and of v [B,
    KV, T, D] (SDPA's, any strides and float dtypes) and RoPE's tables [T, D]: q's and k's gradients before RoPE
    (:func:`rope_backward_reference`) and v's, as token rows in ``dtype`` (the stacked q/k/v product's output
    gradient), then their rounding for the product's grad_input (:func:`quantize_grad_rows_reference` with its
    ``col_scale``). Returns ``(d, gq, s_g)``: d [B * T, (H + KV) * D] q's rows then k's (v's gradient needs no
    change: the grad_weight product reads it as it is), gq int8 [B * T, (H + 2 KV) * D] (rows 16-byte aligned) and
    s_g fp32 [B * T]."""
    rows = [_token_rows(rope_backward_reference(g, cos, sin, dtype), dtype) for g in (dq, dk)]
    gq, s_g = quantize_grad_rows_reference([*rows, _token_rows(dv, dtype)], col_scale)
    return torch.cat(rows, dim=-1), pad_rows(gq), s_g


_LIB.define("rope_grad_rows(Tensor dq, Tensor dk, Tensor dv, Tensor cos, Tensor sin, Tensor col_scale, "
            "ScalarType dtype) -> (Tensor, Tensor, Tensor)")


def _rope_grad_rows_cuda(dq, dk, dv, cos, sin, col_scale, dtype):
    from bitnet_cli.train import int8_triton

    return int8_triton.rope_grad_rows(dq, dk, dv, cos, sin, col_scale, dtype)


_LIB.impl("rope_grad_rows", _rope_grad_rows_cuda, "CUDA")
_LIB.impl("rope_grad_rows", rope_grad_rows_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("bitnet::rope_grad_rows", lib=_LIB)
def _(dq, dk, dv, cos, sin, col_scale, dtype):
    b, h, t, d = dq.shape
    kv = dk.shape[1]
    return (dq.new_empty((b * t, (h + kv) * d), dtype=dtype), int8_rows(b * t, (h + 2 * kv) * d, dq.device),
            dq.new_empty((b * t,), dtype=torch.float32))


def rope_rows_enabled() -> bool:
    """``$BITNET_INT8_ROPE_ROWS`` (on where unset; ``0`` turns it off): whether :func:`enable` gives attention's
    stacked q/k/v product RoPE too (:meth:`Int8Product.rotary`, :class:`_RotaryProduct`), so that RoPE's backward and
    the rounding of q/k/v's output gradient are one kernel (``bitnet::rope_grad_rows``: SDPA's gradients read once)
    instead of torch's RoPE backward (inductor's kernel under torch.compile) and then a ``bitnet::quantize_grad_rows``
    pass."""
    return env_switch("BITNET_INT8_ROPE_ROWS", default="1")


def _rope_rows(owner: nn.Module, projs: list[nn.Module]) -> bool:
    """Whether ``owner`` is an attention whose q/k/v product :meth:`Int8Product.rotary` computes with RoPE: q, k and v
    stacked in this order, as wide as its heads (``n_heads`` and ``n_kv`` of ``head_dim``, an even number), no biases
    (Qwen2's q/k/v biases are added after the product)."""
    dims = [getattr(owner, n, None) for n in ("n_heads", "n_kv", "head_dim")]
    if None in dims or tuple(owner.shared_input) != ("q_proj", "k_proj", "v_proj"):
        return False
    heads, kv, d = dims
    return d % 2 == 0 and [p.out_features for p in projs] == [heads * d, kv * d, kv * d] and all(
        p.bias is None for p in projs)


class _RotaryProduct(torch.autograd.Function):
    """Attention's stacked q/k/v int8 product followed by RoPE (``model.apply_rope``): inputs as :class:`_Int8Linear`'s
    (x the dequantised input X~ with its int8 rows q and scales s_x, the stacked ternary weight), then RoPE's tables
    [T, D], the head counts, the batch and the three latent weights; outputs q and k rotated and v, heads [B, H or KV,
    T, D] as SDPA reads them (the GQA expand after, so that autograd sums k's and v's gradients over the heads that
    share them before this backward). q and k are returned in the compute dtype, the one SDPA computes in (bf16 autocast
    casts them there), so that SDPA's gradients come back in it, except k where heads are shared: that gradient is
    summed in the rotated k's own dtype (fp32 under autocast: the tables' dtype), as in the plain path. The backward
    forms q's and k's gradients before RoPE and the int8 rows of all three in one pass (``bitnet::rope_grad_rows``),
    then grad_input and the weight gradients as :class:`_Int8Linear`'s."""

    @staticmethod
    def forward(ctx, x, q, s_x, trits, trits_t, col_scale, dtype, cos, sin, heads, kv_heads, batch, *weights):
        from bitnet_cli.model import apply_rope

        y = int8_mm(q, trits, 1.0 / s_x, col_scale, dtype)
        d = cos.shape[-1]
        t = y.shape[0] // batch
        yq, yk, yv = y.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q_rot = apply_rope(yq.view(batch, t, heads, d).transpose(1, 2), cos, sin).to(dtype)
        k_rot = apply_rope(yk.view(batch, t, kv_heads, d).transpose(1, 2), cos, sin)
        v = yv.view(batch, t, kv_heads, d).transpose(1, 2)
        ctx.save_for_backward(trits_t, col_scale, cos, sin, *_weight_input(x, q, s_x))
        ctx.dtype, ctx.x_dtype, ctx.w_dtypes, ctx.q_width = dtype, x.dtype, [w.dtype for w in weights], heads * d
        return q_rot, k_rot.to(dtype) if kv_heads == heads else k_rot, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        trits_t, col_scale, cos, sin, *x_saved = ctx.saved_tensors
        d, gq, s_g = torch.ops.bitnet.rope_grad_rows.default(grad_q, grad_k, grad_v, cos, sin, col_scale, ctx.dtype)
        grad_x = _int8_grad_input(gq, s_g, trits_t, ctx.dtype, ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grads_w = _grad_weights([d[:, :ctx.q_width], d[:, ctx.q_width:], _token_rows(grad_v, ctx.dtype)], x_saved,
                                ctx.w_dtypes, (s_g, col_scale))
        return (grad_x, *[None] * 11, *grads_w)


# ----------------------------------------------------------------------------- autograd


class _Int8Linear(torch.autograd.Function):
    """Inputs: x [M, K] (any float dtype); q, s_x: x's int8 rows and scales where rounded already
    (:class:`_NormQuant`; x is then their dequantised values, X~), else None; T [N, K], T^T [K, N] made contiguous (the K-major operand
    of grad_input) and col_scale [N]: the ternary weights of one or more projections of x stacked
    by rows (:func:`stacked_ternary`); ``dtype`` the compute dtype (the autocast dtype, else x's);
    ``int8_grad`` grad_input's arithmetic, ``int8_weight`` grad_weight's (:func:`int8_grad_weights`: the
    forward saves q and s_x for it instead of X~); then the projections' latent weights, in T's row order
    (for their gradients only). Returns one output [M, N_i] per projection (views of one product)."""

    @staticmethod
    def forward(ctx, x, q, s_x, trits, trits_t, col_scale, dtype, int8_grad, int8_weight, *weights):
        if q is None:
            q, s_x = quantize_rows(x)
            # grad_weight's operand, the plain path's X~, is formed here, where torch.compile writes it from
            # the same kernel that rounds x (one more store), rather than by a pass over q in the backward.
            x_deq = None if int8_weight else (q.float() / s_x[:, None]).to(dtype)
        else:  # rounded already (norm_quant): x is its x_deq
            x_deq = x
        y = int8_mm(q, trits, 1.0 / s_x, col_scale, dtype)
        saved = (q, s_x) if int8_weight else _weight_input(x_deq, q, s_x)
        ctx.save_for_backward(trits, trits_t, col_scale, *saved)
        ctx.dtype, ctx.int8_grad, ctx.int8_weight, ctx.x_dtype = dtype, int8_grad, int8_weight, x.dtype
        ctx.rows, ctx.w_dtypes = [w.shape[0] for w in weights], [w.dtype for w in weights]
        return tuple(y.split(ctx.rows, dim=-1)) if len(weights) > 1 else y

    @staticmethod
    def backward(ctx, *gs):
        trits, trits_t, col_scale, *saved = ctx.saved_tensors
        m = saved[0].shape[0]
        # An output nobody used gets no gradient: zeros, so that the parts still line up with T's rows.
        gs = [(saved[0].new_zeros((m, n), dtype=ctx.dtype) if g is None else g.to(ctx.dtype))
              for g, n in zip(gs, ctx.rows)]
        grad_x = g_rows = None
        grads_w = [None] * len(ctx.rows)
        if ctx.needs_input_grad[0]:
            if ctx.int8_grad:
                # Each column's 1/s_w multiplies it before the per-token rounding: the columns are this
                # product's reduction, where one scale per projection cannot be applied afterwards.
                gq, s_g = quantize_grad_rows(gs, col_scale)
                grad_x = _int8_grad_input(gq, s_g, trits_t, ctx.dtype, ctx.x_dtype)
                g_rows = (s_g, col_scale)
            else:
                g = torch.cat(gs, dim=-1) if len(gs) > 1 else gs[0]
                grad_x = (g @ (trits.float() * col_scale[:, None]).to(ctx.dtype)).to(ctx.x_dtype)
        if any(ctx.needs_input_grad[9:]):
            if ctx.int8_weight:
                grads_w = [dw.to(dt) for dw, dt in zip(int8_grad_weights(gs, *saved), ctx.w_dtypes)]
            else:
                grads_w = _grad_weights(gs, saved, ctx.w_dtypes, g_rows)
        return (grad_x, None, None, None, None, None, None, None, None, *grads_w)


def int8_linear(x: torch.Tensor, weights: list[torch.Tensor], trits: torch.Tensor | None = None,
                trits_t: torch.Tensor | None = None, col_scale: torch.Tensor | None = None,
                int8_grad: bool = True, norm: nn.Module | None = None, gate: torch.Tensor | None = None,
                int8_weight: bool = False, residual: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[BitLinear_w(x) for w in weights]`` on int8 products (no biases); the stacked ternary
    weight (:func:`stacked_ternary`) is derived here unless given. ``int8_grad``, ``int8_weight``: grad_input and
    grad_weight on int8 products too (:class:`_Int8Linear`). ``norm`` (an RMSNorm): the products
    read ``norm(x)``, or with ``gate`` ``norm(relu2(gate, x))``, rounded with the norm in one pass (:func:`norm_quant`);
    or with ``residual`` ``norm(h)``, ``h = x + residual`` (:func:`residual_norm_quant`), and h follows the outputs."""
    if trits is None:
        trits, trits_t, col_scale = stacked_ternary(weights)
    dtype = _compute_dtype(x)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    q = s_x = h = None
    if norm is not None and gate is None:
        h, q, s_x, x = _norm_rows(x, residual, norm, dtype)
    elif norm is not None:
        gate = None if gate is None else gate.reshape(-1, gate.shape[-1])
        q, s_x, x, _ = _NormQuant.apply(x, gate, norm.weight, norm.eps, dtype, _norm_dtype(x, gate))
    ys = _Int8Linear.apply(x, q, s_x, trits, trits_t, col_scale, dtype, int8_grad, int8_weight, *weights)
    ys = (ys if isinstance(ys, tuple) else (ys,)) + (() if h is None else (h,))
    return [y.reshape(*lead, y.shape[-1]) for y in ys]


# ----------------------------------------------------------------------------- wiring


def available(device: torch.device) -> str | None:
    """Why the int8 kernels cannot run on ``device`` (None: they can)."""
    if device.type != "cuda":
        return f"device {device.type} (the int8 kernels are CUDA/Triton)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"GPU compute capability {major}.{minor} has no int8 tensor cores that Triton drives (8.0+)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


# Where ``auto`` turns the int8 path on: the GPUs it was measured faster on, training to the plain path's loss
# (Hopper, compute capability 9.x; an H200: 0.783x / 0.754x / 0.911x ``quant: none``'s step at 700m / 1.3b / small.yaml
# (session 26), and 1,200 steps of small.yaml within 0.02 of the plain path (sessions 18, 25); benchmarks/RESULTS.md).
AUTO_CAPABILITIES = ((9, 0),)


def resolve(setting: str, device: torch.device, quant: str, fsdp: bool = False) -> bool:
    """``train.int8_matmul`` -> whether BitLinear runs on int8 products.

    ``on``: on CUDA GPUs with int8 tensor cores and Triton, or the pure-torch emulation of the
    kernels on other devices (for testing; slower than ``off``). ``off``: the plain
    fake-quantised path. ``auto``: on where it was measured faster and training alike
    (:data:`AUTO_CAPABILITIES` with Triton, one GPU or DDP); elsewhere off (older GPUs, where its
    speed is not measured; FSDP, where each forward ternarises its gathered weights again; CPUs).
    """
    if setting == "off" or quant != "bitnet":
        return False
    why = available(device)
    if setting == "auto":
        return why is None and not fsdp and torch.cuda.get_device_capability(device) in AUTO_CAPABILITIES
    if why is not None and device.type == "cuda":
        raise BitnetError(f"train.int8_matmul is on, but {why}")
    return True


class Int8Product(nn.Module):
    """The int8 product of one or more BitLinears that read the same input, set by :func:`enable`
    on the module that owns them: ``product(x, *projs) -> [proj(x) for proj in projs]`` in one
    :func:`int8_linear`. With ``cache`` it keeps the stacked ternary weight as (non-persistent)
    buffers filled by :meth:`refresh` once per step; without it (FSDP, where the full weights
    exist only inside the forward) each forward derives it from the weights it is given."""

    def __init__(self, projs: list[nn.Module], int8_grad: bool, cache: bool, norm_quant: bool = False,
                 int8_weight: bool = False):
        super().__init__()
        self.int8_grad, self.int8_weight, self.cache = int8_grad, int8_weight, cache
        # whether the model hands this product its norm: a BitLinear's sub-norm (model._sub_norm_project, norm_quant),
        # a stacked product's residual norm (model._residual_norm_project, residual_norm_quant)
        self.norm_quant = norm_quant
        self.gated_mlp = False  # whether the model runs this product through residual_mlp (set by enable)
        self.rope_rows = False  # whether the model runs this product through rotary (set by enable)
        # whether this product, after a sub-norm, returns its RoundedInput for the residual norm after it (enable)
        self.defer = False
        self.rows = [p.out_features for p in projs]
        if cache:
            n, k, dev = sum(self.rows), projs[0].in_features, projs[0].weight.device
            # Rows on 16-byte boundaries (int8_rows), which the TMA product kernel needs, whatever n and k.
            self.register_buffer("trits", int8_rows(n, k, dev).zero_(), persistent=False)
            self.register_buffer("trits_t", int8_rows(k, n, dev).zero_(), persistent=False)
            self.register_buffer("col_scale", torch.ones(n, dtype=torch.float32, device=dev), persistent=False)
            self.versions = [-1] * len(projs)

    def forward(self, x: torch.Tensor, *projs: nn.Module, norm: nn.Module | None = None,
                gate: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``norm``, ``gate``, ``residual``: as :func:`int8_linear`'s (the projections read ``norm(x)``,
        ``norm(relu2(gate, x))`` or ``norm(x + residual)``, and then ``x + residual`` follows their outputs)."""
        weights = [p.weight for p in projs]
        if not self.cache:
            outs = int8_linear(x, weights, int8_grad=self.int8_grad, norm=norm, gate=gate, int8_weight=self.int8_weight,
                               residual=residual)
        else:
            self._check_fresh(weights)
            if self.defer and norm is not None and residual is None:
                return [self._rounded_input(x, projs[0], norm, gate)]
            outs = int8_linear(x, weights, self.trits, self.trits_t, self.col_scale, self.int8_grad, norm, gate,
                               self.int8_weight, residual)
        return [o if p.bias is None else o + p.bias for o, p in zip(outs, projs)] + outs[len(projs):]

    def _check_fresh(self, weights: list[torch.Tensor]) -> None:
        """The cached ternary weight was derived from these latent weights as they are now (not while compiling)."""
        if not torch.compiler.is_compiling() and self.versions != [w._version for w in weights]:
            raise BitnetError("BitLinear's cached ternary weight is stale: call int8_linear.refresh(model) "
                              "after each optimiser step")

    @staticmethod
    def _rounded_input(x: torch.Tensor, proj: nn.Module, norm: nn.Module, gate: torch.Tensor | None) -> RoundedInput:
        """``proj``'s product of ``norm(x)`` (or ``norm(relu2(gate, x))``) not yet taken: the norm and rounding only."""
        dtype = _compute_dtype(x)
        flat, flat_gate = x.reshape(-1, x.shape[-1]), None if gate is None else gate.reshape(-1, gate.shape[-1])
        q, s_x, x_deq, _ = _NormQuant.apply(flat, flat_gate, norm.weight, norm.eps, dtype, _norm_dtype(flat, flat_gate))
        return RoundedInput(x_deq, q, s_x, proj, dtype, tuple(x.shape[:-1]))

    def residual_mlp(self, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module, gate_proj: nn.Module,
                     up_proj: nn.Module, sub_norm: nn.Module, down_proj: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, down_proj(sub_norm(relu2(gate_proj(n), up_proj(n)))))`` with ``h = x + residual`` and ``n = norm(h)``:
        BitNet's MLP with the residual add and norm before it (model._residual_mlp), where :func:`enable` set
        ``gated_mlp`` (this product stacks gate and up, down_proj has a cached product of its own): the add, the norm
        and the rounding in one kernel (:class:`_ResidualNormQuant`), the gate/up product with the sub-norm
        (:class:`_GatedProduct`), then down_proj's product."""
        self._check_fresh([gate_proj.weight, up_proj.weight])
        down_proj.int8._check_fresh([down_proj.weight])
        dtype = _compute_dtype(x)
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        h, q, s_x, x_deq, _ = residual_norm_quant_of(x, residual, norm, dtype)
        q2, s2, x_deq2 = _GatedProduct.apply(x_deq, q, s_x, self.trits, self.trits_t, self.col_scale, dtype,
                                             sub_norm.weight, sub_norm.eps, gate_proj.weight, up_proj.weight)
        out = RoundedInput(x_deq2, q2, s2, down_proj, dtype, lead)
        return h.reshape(*lead, h.shape[-1]), out if down_proj.int8.defer else out.output()

    def rotary(self, x: torch.Tensor, residual: torch.Tensor | RoundedInput | None, norm: nn.Module,
               projs: list[nn.Module], cos: torch.Tensor, sin: torch.Tensor, heads: int,
               kv_heads: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(h, (q, k, v))``: a decoder layer's residual add ``h = x + residual`` (x where residual is None), the norm
        after it, the q/k/v projections of ``norm(h)`` and RoPE, q, k and v as heads [B, H or KV, T, D]
        (model.Attention.heads), where :func:`enable` set ``rope_rows``: the add, the norm and the rounding in one
        kernel, then the product and RoPE as one autograd function (:class:`_RotaryProduct`)."""
        self._check_fresh([p.weight for p in projs])
        dtype = _compute_dtype(x)
        lead = x.shape[:-1]
        h, q, s_x, x_deq = _norm_rows(x.reshape(-1, x.shape[-1]), residual, norm, dtype)
        outs = _RotaryProduct.apply(x_deq, q, s_x, self.trits, self.trits_t, self.col_scale, dtype, cos, sin, heads,
                                    kv_heads, lead[0], *[p.weight for p in projs])
        return x if h is None else h.reshape(*lead, h.shape[-1]), outs

    @torch.no_grad()
    def refresh(self, *projs: nn.Module) -> None:
        """Re-derive the cached ternary weights from the projections' latent ones."""
        for buf, value in zip((self.trits, self.trits_t, self.col_scale),
                              stacked_ternary([p.weight for p in projs])):
            buf.copy_(value)
        self.versions = [p.weight._version for p in projs]


def _shared_input_groups(model: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(owner, its BitLinears that read one input) for each module declaring ``shared_input``
    whose projections are all plain trainable BitLinears: not offline-quantised ones, and none
    with an input norm of its own (``use_rms_norm``: then each one quantises a different input)."""
    from bitnet_cli.model import BitLinear

    groups = []
    for m in model.modules():
        projs = [getattr(m, n) for n in getattr(m, "shared_input", ())]
        if projs and all(isinstance(p, BitLinear) and p.scale_op is None and p.rms_norm is None for p in projs):
            groups.append((m, projs))
    return groups


# The hidden size above which the matmuls dominate a step enough that the weight gradients on fp8 tensor cores
# ($BITNET_INT8_FP8_GRAD_WEIGHT) pay for their casts. On one H100 (benchmarks/RESULTS.md, session 25) fp8 and the two
# row fusions took 700m (hidden 1536) from 0.831x of bf16's step to 0.791x, and small.yaml (hidden 768) from 0.954x
# to 1.093x; on one H200 (session 26) 700m 0.783x, 1.3b (hidden 2048) 0.754x, small.yaml 1.017x against plain int8's
# 0.911x. The row fusions ($BITNET_INT8_RESIDUAL_ROWS, $BITNET_INT8_ROPE_ROWS) are on at every width since their
# kernels' layouts and launches were fixed: small.yaml 0.931x against 0.954x on one H100 (session 32).
WIDE_HIDDEN = 1024

# Whether fp8_grad_weight_enabled() is on where its variable is unset: set by the last enable() (the weight gradient
# is chosen inside autograd functions that see no model; one model trains per process).
_fp8_by_default = False


def wide_model(model: nn.Module) -> bool:
    """Whether ``model``'s hidden size exceeds ``WIDE_HIDDEN`` (a model without a config, a lone layer, is not wide)."""
    return getattr(getattr(model, "config", None), "hidden_size", 0) > WIDE_HIDDEN


def enabled_switches(model: nn.Module) -> list[str]:
    """The backward's optional parts :func:`enable` turned on for ``model``, by their variables' short names (what
    ``bitnet train`` reports)."""
    products = [m for m in model.modules() if isinstance(m, Int8Product)]
    return [name for name, on in (("RESIDUAL_ROWS", any(p.defer for p in products)),
                                  ("ROPE_ROWS", any(p.rope_rows for p in products)),
                                  ("FP8_GRAD_WEIGHT", bool(products) and fp8_grad_weight_enabled())) if on]


def enable(model: nn.Module, int8_grad: bool, cache: bool, int8_weight: bool = False) -> int:
    """Switch every BitLinear of ``model`` to int8 products; returns how many.

    Projections of one input (a module's ``shared_input``) get one stacked product on their owner
    (``owner.int8_fused``); every other BitLinear its own (``BitLinear.int8``). ``cache``: keep the
    ternary weights as buffers filled by :func:`refresh` once per step. ``int8_grad``, ``int8_weight``: grad_input,
    grad_weight on int8 products too (``train.int8_grad_input``, ``train.int8_grad_weight``).
    """
    from bitnet_cli.model import BitLinear

    global _fp8_by_default
    if int8_weight and env_switch("BITNET_INT8_FP8_GRAD_WEIGHT", default="0"):  # set explicitly: a conflict
        raise BitnetError("train.int8_grad_weight: on and BITNET_INT8_FP8_GRAD_WEIGHT=1 both choose the weight "
                          "gradient's product: keep one")
    # on by default only where it was measured: the path's defaults (cached weights, so not FSDP; int8 grad_input)
    _fp8_by_default = (wide_model(model) and cache and int8_grad and not int8_weight
                       and fp8_capable(next(model.parameters()).device))
    fused = set()
    rnq = residual_norm_quant_enabled()
    groups = _shared_input_groups(model)
    for owner, projs in groups:
        owner.int8_fused = Int8Product(projs, int8_grad, cache, rnq, int8_weight)
        fused.update(map(id, projs))
    n = 0
    nq = norm_quant_enabled()
    for m in list(model.modules()):
        if isinstance(m, BitLinear):
            # A fused projection keeps a product of its own (deriving its weight per call) for a call outside its owner.
            m.int8 = Int8Product([m], int8_grad, cache and id(m) not in fused, nq, int8_weight)
            n += 1
    # The fused backwards below assume the path's defaults: int8 grad_input, grad_weight from X~ (_grad_weights: bf16
    # or fp8, not the int8 one), cached weights, fused residual norms (and, for those that round a sub-norm's product, fused sub-norms).
    if rnq and int8_grad and cache and not int8_weight:
        rope, gated = rope_rows_enabled(), nq and gated_grad_enabled()
        for owner, projs in groups:
            owner.int8_fused.rope_rows = rope and _rope_rows(owner, projs)
            owner.int8_fused.gated_mlp = gated and _gated_mlp(owner, projs)
        if nq and residual_rows_enabled():
            for m in model.modules():
                proj = getattr(m, getattr(m, "residual_output", ""), None)
                if (isinstance(proj, BitLinear) and proj.scale_op is None and proj.rms_norm is None
                        and proj.bias is None):
                    proj.int8.defer = True
    return n


# The widest gate (and up) of :meth:`Int8Product.residual_mlp` by default, and of the backward kernel that holds a row in
# registers (wider rows take the kernel that walks them in chunks, $BITNET_INT8_GATED_WIDE): on an
# H200 (benchmarks/RESULTS.md, session 20) it took 0.52 ms a call at 700m's 4,096 against 0.78 for what it replaces,
# but 2.47 against 1.21 at 1.3b's 5,460 (8,192 lanes a row, whose registers spill, and rows not 16-byte aligned).
GATED_MAX_WIDTH = 4096


def _gated_mlp(owner: nn.Module, projs: list[nn.Module]) -> bool:
    """Whether ``owner`` is an MLP that :meth:`Int8Product.residual_mlp` computes: relu2 (not SiLU) with a sub-norm
    before down_proj, gate and up stacked in this order, each at most ``GATED_MAX_WIDTH`` wide with rows of whole
    16-byte units (any width with :func:`gated_wide_enabled`), no biases, down_proj a plain BitLinear with a cached
    product."""
    from bitnet_cli.model import BitLinear

    down, f = getattr(owner, "down_proj", None), projs[0].out_features
    return (getattr(owner, "silu", True) is False and hasattr(owner, "ffn_sub_norm") and isinstance(down, BitLinear)
            and [p.out_features for p in projs] == [f] * 2
            and (f <= GATED_MAX_WIDTH and f % 8 == 0 or gated_wide_enabled())
            and tuple(owner.shared_input) == ("gate_proj", "up_proj") and down.scale_op is None
            and down.rms_norm is None and down.int8.cache and all(p.bias is None for p in (*projs, down)))


def refresh_kernel() -> str:
    """How :func:`refresh` re-derives the ternary weights of CUDA models: ``$BITNET_INT8_REFRESH``,
    ``graph`` (default: :func:`int8_triton.refresh_products`, three kernels per weight, captured once in a CUDA
    graph and replayed each step: one launch), ``triton`` (the same kernels launched each step) or ``torch``
    (:meth:`Int8Product.refresh`, about twelve eager kernels per weight). The same bits either way (checked on an
    H200 at the 700m and 1.3b shapes, where a refresh took 4.6 and 10.6 ms as a graph, 19.7 and 19.0 with
    ``triton``, 30.0 and 32.4 eager). The 700m int8 step with ``graph`` (and the op's direct launches) left the GPU
    idle 14.9 ms a step against 53.9 before (benchmarks/RESULTS.md, session 14)."""
    import os

    kind = os.environ.get("BITNET_INT8_REFRESH", "graph")
    if kind not in ("triton", "torch", "graph"):
        raise BitnetError(f"BITNET_INT8_REFRESH={kind!r}: expected 'graph', 'triton' or 'torch'")
    return kind


@torch.no_grad()
def refresh(model: nn.Module, kernel: str | None = None) -> None:
    """Re-derive the cached ternary weights from the latent ones: once per optimiser step.
    ``kernel``: ``torch``, ``triton`` or ``graph`` (default :func:`refresh_kernel`; off CUDA always ``torch``).
    ``graph`` keeps its CUDA graph on ``model`` and captures it again if a weight or buffer has moved."""
    from bitnet_cli.model import BitLinear

    products = []
    for owner, projs in _shared_input_groups(model):
        if getattr(owner, "int8_fused", None) is not None and owner.int8_fused.cache:
            products.append((owner.int8_fused, projs))
    for m in model.modules():
        if isinstance(m, BitLinear) and getattr(m, "int8", None) is not None and m.int8.cache:
            products.append((m.int8, [m]))
    if not products:
        return
    kernel = kernel or (refresh_kernel() if products[0][0].trits.is_cuda else "torch")
    if kernel == "torch":
        for product, projs in products:
            product.refresh(*projs)
        return
    from bitnet_cli.train import int8_triton

    items = [(p.trits, p.trits_t, p.col_scale, [q.weight for q in projs]) for p, projs in products]
    if kernel == "graph":
        # The graph replays the kernels on the same addresses: captured again whenever one has moved.
        key = tuple(t.data_ptr() for trits, trits_t, col, ws in items for t in (trits, trits_t, col, *ws))
        cached = model.__dict__.get("_int8_refresh_graph")
        if cached is None or cached[0] != key:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: compiles the kernel before the capture
                int8_triton.refresh_products(items)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (a data loader's pinned copies) do not void the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                int8_triton.refresh_products(items)
            cached = model.__dict__["_int8_refresh_graph"] = (key, graph)
        cached[1].replay()
        for trits, trits_t, col, _ in items:
            for buf in (trits, trits_t, col):
                torch.autograd.graph.increment_version(buf)
    else:
        int8_triton.refresh_products(items)
    for product, projs in products:
        product.versions = [q.weight._version for q in projs]


__all__ = ["E4M3_MAX", "Int8Product", "align_grad_weight", "aligned_rows", "available", "enable", "fp8_grad_weight",
           "enabled_switches", "fp8_capable", "fp8_grad_weight_enabled", "fp8_operands", "gated_grad_columns",
           "gated_grad_enabled", "gated_norm_grad_reference", "gated_wide_enabled", "grad_weight", "int8_grad_weight_reference",
           "int8_grad_weights", "int8_linear", "int8_mm", "int8_mm_reference", "int8_rows",
           "norm_quant", "norm_quant_enabled", "norm_quant_reference", "pad_rows", "residual_norm_quant",
           "residual_norm_grad_kernel", "residual_norm_grad_reference", "residual_norm_grad_rows_reference",
           "residual_norm_quant_of", "residual_rows_enabled", "rope_backward_reference", "rope_grad_rows_reference",
           "rope_rows_enabled", "RoundedInput", "residual_norm_quant_enabled",
           "residual_norm_quant_reference",
           "quantize_grad_cols_reference", "quantize_grad_rows", "quantize_grad_rows_reference", "quantize_rows", "refresh", "refresh_kernel", "resolve", "stacked_ternary",
           "ternary_weight", "WIDE_HIDDEN", "wide_model"]
