"""Distillation losses as pure tensor functions.

    loss = (1 - alpha) * CE(s, y) + alpha * D_teachers(s),   alpha = 0 before burn_in

Divergences return one value per sample (summed over classes); the batch reduction is a mean
(`batchmean`). Teacher logits are always detached. Registry: DIVERGENCES; a new divergence is one
function `(student_logits, teacher_logits, temperature) -> (B,)` and one entry.
This module imports neither ray nor mlflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from codistill.config import LossConfig

__all__ = ["kl", "reverse_kl", "js", "mse", "DIVERGENCES", "TEACHER_REDUCERS", "zscore", "reduce_teachers",
           "distillation_loss", "total_loss", "LossParts"]

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)): forward KL, teacher first (Hinton et al. 2015; Zhang et al., DML, CVPR 2018)."""
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


DIVERGENCES: dict[str, Divergence] = {"kl": kl, "reverse_kl": reverse_kl, "js": js, "mse": mse}


def zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Standardise each logit vector: (z - mean) / std (Sun et al., "Logit Standardization in KD", CVPR 2024)."""
    mean = logits.mean(-1, keepdim=True)
    std = logits.std(-1, keepdim=True)
    return (logits - mean) / (std + eps)


def _reduce_each(teachers: Sequence[torch.Tensor], temperature: float) -> list[torch.Tensor]:
    return list(teachers)


def _reduce_logits(teachers: Sequence[torch.Tensor], temperature: float) -> list[torch.Tensor]:
    return [torch.stack(list(teachers)).mean(0)]


def _reduce_probs(teachers: Sequence[torch.Tensor], temperature: float) -> list[torch.Tensor]:
    # One teacher whose softmax(./T) is the mean of the teachers' probabilities (Anil et al., ICLR 2018):
    # its logits are T * log(mean_j softmax(t_j / T)), computed in log space.
    log_probs = torch.stack([F.log_softmax(t / temperature, dim=-1) for t in teachers])
    return [temperature * (torch.logsumexp(log_probs, 0) - math.log(len(teachers)))]


TEACHER_REDUCERS: dict[str, Callable[[Sequence[torch.Tensor], float], list[torch.Tensor]]] = {
    "each": _reduce_each,      # DML: mean over teachers of D(s, t_j)
    "probs": _reduce_probs,    # Anil: D(s, mean of teacher probabilities)
    "logits": _reduce_logits,  # D(s, mean of teacher logits)
}


def reduce_teachers(teacher_logits: Sequence[torch.Tensor], teacher_reduce: str, temperature: float) -> list[torch.Tensor]:
    return TEACHER_REDUCERS[teacher_reduce](teacher_logits, temperature)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], *, divergence: str = "kl",
                      temperature: float = 1.0, teacher_reduce: str = "each", standardize: bool = False,
                      sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """D_teachers(s): batch mean of the per-sample divergence to the (combined) teachers.

    sample_weights (B,) multiply each sample's term before the mean (hook for influence-based
    weighting, LGTM, Ren et al., ACL 2023); all-ones weights give the unweighted loss.
    """
    if not teacher_logits:
        raise ValueError("distillation_loss needs at least one teacher")
    s = student_logits.float()
    teachers = [t.detach().float() for t in teacher_logits]  # no gradient ever flows into another peer
    for t in teachers:
        if t.shape != s.shape:
            raise ValueError(f"teacher logits of shape {tuple(t.shape)} do not match student logits {tuple(s.shape)}")
    if standardize:
        s, teachers = zscore(s), [zscore(t) for t in teachers]
    teachers = reduce_teachers(teachers, teacher_reduce, temperature)
    fn = DIVERGENCES[divergence]
    per_sample = torch.stack([fn(s, t, temperature) for t in teachers]).mean(0)  # (B,)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample)
    return per_sample.mean()


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    distill: torch.Tensor | None
    alpha: float


def total_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Sequence[torch.Tensor] | None,
               cfg: LossConfig, step: int, sample_weights: torch.Tensor | None = None) -> LossParts:
    """(1 - alpha) * CE + alpha * D_teachers, with alpha = 0 before `burn_in` or without teachers."""
    ce = F.cross_entropy(student_logits.float(), labels)
    alpha = cfg.alpha if (teacher_logits and step >= cfg.burn_in) else 0.0
    if alpha == 0.0:
        return LossParts(ce, ce, None, 0.0)
    d = distillation_loss(student_logits, teacher_logits, divergence=cfg.divergence, temperature=cfg.temperature,
                          teacher_reduce=cfg.teacher_reduce, standardize=cfg.zscore, sample_weights=sample_weights)
    return LossParts((1 - alpha) * ce + alpha * d, ce, d, alpha)
