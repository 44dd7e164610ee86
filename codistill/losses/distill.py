"""The distillation objective (DESIGN: "Losses"):

    loss = (1 - alpha) * CE(s, y) + alpha * D_teachers(s),   alpha = 0 before burn_in

Teacher logits are always detached. No ray, no mlflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codistill.config import LossConfig
from codistill.losses.divergences import DIVERGENCES, zscore
from codistill.losses.teachers import reduce_teachers

__all__ = ["LossParts", "distillation_loss", "total_loss"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    teacher_reduce: str = "each",
    standardize: bool = False,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
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


def total_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor] | None,
    cfg: LossConfig,
    step: int,
    sample_weights: torch.Tensor | None = None,
) -> LossParts:
    """(1 - alpha) * CE + alpha * D_teachers, with alpha = 0 before `burn_in` or without teachers."""
    ce = F.cross_entropy(student_logits.float(), labels)
    alpha = cfg.alpha if (teacher_logits and step >= cfg.burn_in) else 0.0
    if alpha == 0.0 or not teacher_logits:
        return LossParts(ce, ce, None, 0.0)
    d = distillation_loss(
        student_logits,
        teacher_logits,
        divergence=cfg.divergence,
        temperature=cfg.temperature,
        teacher_reduce=cfg.teacher_reduce,
        standardize=cfg.zscore,
        sample_weights=sample_weights,
    )
    return LossParts((1 - alpha) * ce + alpha * d, ce, d, alpha)
