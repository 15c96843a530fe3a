"""Learning-rate and weight-decay schedules, pure functions of the step.

two_stage is BitNet b1.58's recipe: because ternary weights change only when a latent weight
crosses a threshold, training starts with a high learning rate and then, at the midpoint,
drops it and switches weight decay off so the model can settle.
"""

from __future__ import annotations

import math

from bitnet_cli.train.recipe import OptimSpec


def lr_at(opt: OptimSpec, step: int, total: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total``."""
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return opt.lr
    span = max(total - opt.warmup_steps, 1)
    progress = min((step - opt.warmup_steps) / span, 1.0)
    if opt.schedule == "cosine":
        return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    # two_stage: one linear decay envelope 1 -> min_lr_ratio, scaled by the peak of the current stage.
    envelope = 1.0 - (1.0 - opt.min_lr_ratio) * progress
    return _stage2_peak(opt) * envelope if in_stage_two(opt, step, total) else opt.lr * envelope


def weight_decay_at(opt: OptimSpec, step: int, total: int) -> float:
    if opt.schedule == "two_stage" and in_stage_two(opt, step, total):
        return opt.weight_decay_stage2
    return opt.weight_decay


def in_stage_two(opt: OptimSpec, step: int, total: int) -> bool:
    return step >= int(total * opt.stage_split)


def _stage2_peak(opt: OptimSpec) -> float:
    return opt.lr_stage2 if opt.lr_stage2 is not None else opt.lr * 2 / 3


def quant_lambda_at(spec, step: int) -> float:
    """Quantisation strength for optimiser step ``step`` (0-based): 0 float, 1 fully ternary.

    ``p = step / warmup_steps`` (so step 0 runs the float model) and, from ``warmup_steps`` on,
    exactly 1. linear: ``p``; exponential: ``(e^(kp) - 1) / (e^k - 1)``; sigmoid:
    ``1 / (1 + e^(-k(p - 1/2)))`` rescaled so that it runs from 0 at p = 0 to 1 at p = 1.
    """
    n = spec.warmup_steps
    if step >= n:
        return 1.0
    p = step / n
    k = spec.warmup_k
    if spec.warmup_schedule == "linear":
        return p
    if spec.warmup_schedule == "exponential":
        return math.expm1(k * p) / math.expm1(k)
    sig = lambda z: 1.0 / (1.0 + math.exp(-k * (z - 0.5)))  # noqa: E731
    lo, hi = sig(0.0), sig(1.0)
    return (sig(p) - lo) / (hi - lo)
