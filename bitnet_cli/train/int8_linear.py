"""BitLinear on int8 tensor cores for training (``train.int8_matmul``).

The plain ``BitLinear`` (bitnet_cli.model) fake-quantises: it rounds activations to int8 and
weights to ternary values, then multiplies them as bf16 numbers. Here the same integers go to
the int8 tensor cores instead, whose rate on Hopper/Ampere is twice the bf16 rate:

* forward: ``y = (Xq @ T^T) * (1 / s_x[token]) * (1 / s_w)``, Xq the per-token absmax int8
  activations (the plain path's ``round(x * s_x)``), T the ternary weight (``round(W * s_w)``),
  accumulated exactly in int32; both scales are applied in the kernel's epilogue.
* grad_input: ``dX = (Gq @ T) * (1 / s_g[token]) * (1 / s_w)`` with the output gradient G
  quantised per token to int8 the same way (round to nearest, absmax scale). This is the
  "SwitchBack" choice (Wortsman et al., 2023: int8 forward and input gradient, 16-bit weight
  gradient): the per-row scale follows each token's gradient magnitude, so a row's error is at
  most 1/254 of its own largest entry, and the straight-through estimator already treats this
  product as an approximation. ``train.int8_grad_input: false`` keeps it in bf16 instead.
* grad_weight: ``dW = G^T @ X~`` in the compute dtype, X~ the dequantised activations exactly
  as the plain path has them (``Xq / s_x``); the weight gradient sums over all tokens, where
  int8 rounding of G would bias small updates, so it stays 16-bit.

The activations are saved for the backward as int8 plus one scale per token (half of bf16).
The ternary weight, its transpose and ``s_w`` are computed once per optimiser step
(:func:`refresh`) rather than in every micro-batch's forward; under FSDP, where the full weight
exists only inside the forward, they are computed there instead.

The quantisations are written in torch so that torch.compile fuses them with their neighbours
(the RMSNorm before a projection, the elementwise backward before a gradient); the products are
one custom op, ``bitnet::int8_mm``: a Triton kernel on CUDA, and on other devices
:func:`int8_mm_reference`, the pure-torch statement of exactly what the kernel computes (used by
the CPU tests to hold the fast path to the plain one).
"""

from __future__ import annotations

import torch
from torch import nn

from bitnet_cli.errors import BitnetError

# ----------------------------------------------------------------------------- quantisers


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8, the plain path's activation arithmetic in fp32.

    Returns ``(q, s)``: ``q = clamp(round(x * s), -128, 127)`` as int8 and ``s = 127 / max|x|``
    (fp32, one per row), so that ``q / s`` is bit for bit the plain path's dequantised tensor.
    """
    xf = x.float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    q = (xf * s).round().clamp(-128, 127).to(torch.int8)
    return q, s.squeeze(-1)


def ternary_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarisation as the plain path does it: ``(T int8, s_w fp32 scalar)``, W~ = T / s_w."""
    wf = w.detach().float()
    s = 1.0 / wf.abs().mean().clamp(min=1e-5)
    return (wf * s).round().clamp(-1, 1).to(torch.int8), s


# ----------------------------------------------------------------------------- the product


def int8_mm_reference(a: torch.Tensor, b: torch.Tensor, row_mul: torch.Tensor, mul: torch.Tensor,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """What the kernel computes: ``(a @ b^T)`` exactly in int32, ``* row_mul[:, None] * mul`` in fp32.

    ``a`` is int8 [M, K], ``b`` int8 [N, K] (both K-contiguous, as the int8 tensor cores want),
    ``row_mul`` fp32 [M], ``mul`` a fp32 scalar tensor; the result is rounded once to ``out_dtype``.
    """
    acc = torch.mm(a.to(torch.int32), b.to(torch.int32).t())
    return (acc.float() * row_mul[:, None] * mul).to(out_dtype)


@torch.library.custom_op("bitnet::int8_mm", mutates_args=())
def int8_mm(a: torch.Tensor, b: torch.Tensor, row_mul: torch.Tensor, mul: torch.Tensor,
            out_dtype: torch.dtype) -> torch.Tensor:
    if a.is_cuda:
        from bitnet_cli.train import int8_triton

        return int8_triton.int8_mm(a, b, row_mul, mul, out_dtype)
    return int8_mm_reference(a, b, row_mul, mul, out_dtype)


@int8_mm.register_fake
def _(a, b, row_mul, mul, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


# ----------------------------------------------------------------------------- autograd


class _Int8BitLinear(torch.autograd.Function):
    """Inputs: x [M, K] (any float dtype), the latent weight (for its gradient only), T [N, K],
    T^T [K, N] made contiguous (the K-major operand of grad_input), s_w; ``dtype`` is the compute
    dtype (the autocast dtype, else x's) and ``int8_grad`` picks grad_input's arithmetic."""

    @staticmethod
    def forward(ctx, x, weight, trits, trits_t, s_w, dtype, int8_grad):
        q, s_x = quantize_rows(x)
        inv_w = 1.0 / s_w
        y = int8_mm(q, trits, 1.0 / s_x, inv_w, dtype)
        ctx.save_for_backward(q, s_x, trits, trits_t, s_w)
        ctx.dtype, ctx.int8_grad, ctx.x_dtype, ctx.w_dtype = dtype, int8_grad, x.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        q, s_x, trits, trits_t, s_w = ctx.saved_tensors
        g = g.to(ctx.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if ctx.int8_grad:
                gq, s_g = quantize_rows(g)
                grad_x = int8_mm(gq, trits_t, 1.0 / s_g, 1.0 / s_w, ctx.x_dtype)
            else:
                grad_x = (g @ (trits.float() / s_w).to(ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x_deq = (q.float() / s_x[:, None]).to(ctx.dtype)
            grad_w = (g.t() @ x_deq).to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None, None, None


def int8_bitlinear(x: torch.Tensor, weight: torch.Tensor, trits: torch.Tensor | None = None,
                   trits_t: torch.Tensor | None = None, s_w: torch.Tensor | None = None,
                   int8_grad: bool = True) -> torch.Tensor:
    """``BitLinear(x)`` on int8 products; the ternary weight is derived here unless given."""
    if trits is None:
        trits, s_w = ternary_weight(weight)
        trits_t = trits.t().contiguous()
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    lead = x.shape[:-1]
    y = _Int8BitLinear.apply(x.reshape(-1, x.shape[-1]), weight, trits, trits_t, s_w, dtype, int8_grad)
    return y.reshape(*lead, y.shape[-1])


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


def resolve(setting: str, device: torch.device, quant: str) -> bool:
    """``train.int8_matmul`` -> whether BitLinear runs on int8 products.

    ``on``: on CUDA GPUs with int8 tensor cores and Triton, or the pure-torch emulation of the
    kernels on other devices (for testing; slower than ``off``). ``off``: the plain
    fake-quantised path. ``auto`` is ``off`` for now: on an H200 the int8 path trained
    recipes/small.yaml slower than the plain one (benchmarks/RESULTS.md, GPU training), and auto
    should pick it only where it is measured faster.
    """
    if setting in ("off", "auto") or quant != "bitnet":
        return False
    why = available(device)
    if why is not None and device.type == "cuda":
        raise BitnetError(f"train.int8_matmul is on, but {why}")
    return True


def enable(model: nn.Module, int8_grad: bool, cache: bool) -> int:
    """Switch every BitLinear of ``model`` to int8 products; returns how many.

    ``cache``: keep T, T^T and s_w as (non-persistent) buffers filled by :func:`refresh` once per
    step; without it (FSDP) each forward derives them from the gathered weight.
    """
    from bitnet_cli.model import BitLinear

    n = 0
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.int8 = Int8Config(int8_grad, cache)
            if cache:
                w = m.weight
                m.register_buffer("trits", torch.zeros(w.shape, dtype=torch.int8, device=w.device), persistent=False)
                m.register_buffer("trits_t", torch.zeros(w.shape[::-1], dtype=torch.int8, device=w.device),
                                  persistent=False)
                m.register_buffer("s_w", torch.ones((), dtype=torch.float32, device=w.device), persistent=False)
                m.trits_version = -1
            n += 1
    return n


class Int8Config:
    """Set on a BitLinear by :func:`enable`; BitLinear.forward hands its gradient-mode calls here."""

    def __init__(self, int8_grad: bool, cache: bool):
        self.int8_grad, self.cache = int8_grad, cache

    def forward(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.cache:
            return int8_bitlinear(x, m.weight, int8_grad=self.int8_grad)
        if not torch.compiler.is_compiling() and m.trits_version != m.weight._version:
            raise BitnetError("BitLinear's cached ternary weight is stale: call int8_linear.refresh(model) "
                              "after each optimiser step")
        return int8_bitlinear(x, m.weight, m.trits, m.trits_t, m.s_w, self.int8_grad)


@torch.no_grad()
def refresh(model: nn.Module) -> None:
    """Re-derive the cached ternary weights from the latent ones: once per optimiser step."""
    from bitnet_cli.model import BitLinear

    for m in model.modules():
        if isinstance(m, BitLinear) and getattr(m, "int8", None) is not None and m.int8.cache:
            t, s = ternary_weight(m.weight)
            m.trits.copy_(t)
            m.trits_t.copy_(t.t())
            m.s_w.copy_(s)
            m.trits_version = m.weight._version


__all__ = ["available", "enable", "int8_bitlinear", "int8_mm", "int8_mm_reference", "quantize_rows",
           "refresh", "resolve", "ternary_weight"]
