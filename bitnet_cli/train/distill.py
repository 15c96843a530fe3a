"""Logit distillation from a frozen float teacher (converting a float model to ternary).

``loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T)``, the
KL between the two next-token distributions softened by temperature T (Hinton et al.'s T^2
keeps the gradient scale independent of T), averaged over tokens. BitDistill (2025) uses the
same logits term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over tokens of KL(softmax(teacher / T) || softmax(student / T)), in fp32."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
