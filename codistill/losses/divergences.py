"""Divergences between a student's and a teacher's logits, as pure tensor functions.

Each returns one value per sample (summed over classes): `(student_logits, teacher_logits,
temperature) -> (B,)`; the batch reduction is the caller's (`batchmean`). Registry: DIVERGENCES;
a new divergence is one function and one entry. No ray, no mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from codistill.registry import Registry

__all__ = ["DIVERGENCES", "Divergence", "js", "kl", "mse", "reverse_kl", "zscore"]

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)): forward KL, teacher first (Hinton et al. 2015; Zhang et al.,
    DML, CVPR 2018)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(s/T) || softmax(t/T)): mode-seeking (Gu et al., MiniLLM, ICLR 2024)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * (log_q.exp() * (log_q - log_p)).sum(-1)


def js(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * Jensen-Shannon divergence between softmax(s/T) and softmax(t/T): symmetric, at most T^2 log 2."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return temperature**2 * 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))


def mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean over classes of (s - t)^2 on logits: the high-temperature limit of KD (Hinton et al. 2015, sec. 2.1).
    With zero-mean logits its gradient is 2x that of `kl` (T^2 KL -> (s - t) / N)."""
    del temperature  # logit matching has no temperature
    return (student_logits - teacher_logits).pow(2).mean(-1)


DIVERGENCES: Registry[Divergence] = Registry("divergence", {"kl": kl, "reverse_kl": reverse_kl, "js": js, "mse": mse})


def zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Standardise each logit vector: (z - mean) / std (Sun et al., "Logit Standardization in KD", CVPR 2024)."""
    mean = logits.mean(-1, keepdim=True)
    std = logits.std(-1, keepdim=True)
    return (logits - mean) / (std + eps)
