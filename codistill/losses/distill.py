"""The distillation objective (DESIGN: "Losses"):

    loss = (1 - alpha) * CE(s, y) + alpha * D_teachers(s),   alpha = 0 before burn_in

Both terms are means over *valid positions*: examples for classification, tokens for language models
(logits (B, T, V) are flattened to positions; targets equal to IGNORE_INDEX, or a `mask` that is
false, are padding and count nowhere). Teacher logits are always detached; a teacher is full logits
(same shape as the student's), or a `TopKLogits` or `SampledLogits` over the same positions. No ray, no mlflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codistill.config import LossConfig
from codistill.losses.divergences import DIVERGENCES, Divergence, zscore
from codistill.losses.sampled import SampledLogits
from codistill.losses.teachers import reduce_teachers
from codistill.losses.topk import TopKLogits

__all__ = [
    "IGNORE_INDEX",
    "LossParts",
    "TeacherSignal",
    "cross_entropy",
    "distillation_loss",
    "flat_targets",
    "per_position_divergences",
    "position_mask",
    "total_loss",
]

IGNORE_INDEX = -100
"""A target with this id is padding: no loss, no metric (PyTorch's cross-entropy convention)."""

TeacherSignal = torch.Tensor | TopKLogits | SampledLogits
CompactTeacher = (TopKLogits, SampledLogits)  # a teacher over positions (N, ...), not full logits


def _positions(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., V) -> (N, V): every leading dimension is a position."""
    return t.reshape(-1, t.shape[-1])


def _position_weights(
    num_positions: int, mask: torch.Tensor | None, sample_weights: torch.Tensor | None
) -> torch.Tensor | None:
    """(N,) weight of each position (0 for padding; an example's weight on each of its tokens), or None for
    all ones. Padding is weighted out, not indexed out: shapes stay fixed and nothing waits for the device."""
    weights = None
    if sample_weights is not None:  # (B,) per example -> one per position of that example
        weights = sample_weights.float().repeat_interleave(num_positions // sample_weights.shape[0])
    if mask is not None:
        valid = mask.reshape(-1).to(torch.float32)
        weights = valid if weights is None else weights.to(valid) * valid
    return weights


def per_position_divergences(
    student_logits: torch.Tensor,
    teacher_logits: Sequence[TeacherSignal],
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    teacher_reduce: str = "each",
    standardize: bool = False,
) -> list[torch.Tensor]:
    """The divergence at every position, (N,), to each teacher (`each`) or to the one combined teacher."""
    if not teacher_logits:
        raise ValueError("distillation_loss needs at least one teacher")
    s = _positions(student_logits.float())  # (N, V)
    teachers: list[TeacherSignal] = []
    for t in teacher_logits:  # no gradient ever flows into another peer
        if isinstance(t, CompactTeacher):
            if t.ids.shape[0] != s.shape[0]:
                raise ValueError(f"a compact teacher covers {t.ids.shape[0]} positions, the student {s.shape[0]}")
            teachers.append(t)
            continue
        if t.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits of shape {tuple(t.shape)} do not match student logits {tuple(student_logits.shape)}"
            )
        teachers.append(_positions(t.detach().float()))
    if standardize:  # a top-k teacher was standardised by its publisher (over all its classes)
        s = zscore(s)
        teachers = [t if isinstance(t, CompactTeacher) else zscore(t) for t in teachers]
    fn = DIVERGENCES[divergence]
    if any(isinstance(t, CompactTeacher) for t in teachers):
        if teacher_reduce != "each":
            raise ValueError(f"top-k and sampled teachers need teacher_reduce 'each', got {teacher_reduce!r}")
        if not isinstance(fn, Divergence):
            raise ValueError(f"divergence {divergence!r} is a plain function: it cannot use top-k or sampled teachers")
    else:
        teachers = list(reduce_teachers(teachers, teacher_reduce, temperature))  # type: ignore[arg-type]
    return [fn(s, t, temperature) for t in teachers]  # type: ignore[arg-type]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: Sequence[TeacherSignal],
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    teacher_reduce: str = "each",
    standardize: bool = False,
    sample_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """D_teachers(s): the mean over valid positions of the divergence to the (combined) teachers.

    sample_weights (B,) multiply each example's terms (all its tokens) before the mean (hook for
    influence-based weighting, LGTM, Ren et al., ACL 2023); all-ones weights give the unweighted loss.
    mask: (B,) or (B, T), true where a position counts.
    """
    per_teacher = per_position_divergences(
        student_logits,
        teacher_logits,
        divergence=divergence,
        temperature=temperature,
        teacher_reduce=teacher_reduce,
        standardize=standardize,
    )
    per_position = torch.stack(per_teacher).mean(0)  # (N,)
    weights = _position_weights(per_position.shape[0], mask, sample_weights)
    if weights is None:
        return per_position.mean()
    if mask is None:
        return (per_position * weights.to(per_position)).mean()
    weighted = torch.where(weights > 0, per_position * weights.to(per_position), 0.0)  # padding may be inf/nan
    return weighted.sum() / mask.reshape(-1).to(weighted.dtype).sum().clamp_min(1.0)


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    distill: torch.Tensor | None
    alpha: float


def total_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: Sequence[TeacherSignal] | None,
    cfg: LossConfig,
    step: int,
    sample_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> LossParts:
    """(1 - alpha) * CE + alpha * D_teachers, with alpha = 0 before `burn_in` or without teachers; both
    averaged over valid positions (`mask` and IGNORE_INDEX targets)."""
    ce, targets = cross_entropy(student_logits, labels, mask)
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
        mask=position_mask(labels, mask, targets),
    )
    return LossParts((1 - alpha) * ce + alpha * d, ce, d, alpha)


def cross_entropy(
    student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean cross-entropy over valid positions, the flattened targets with padding as IGNORE_INDEX)."""
    targets = flat_targets(labels, mask)
    return F.cross_entropy(_positions(student_logits.float()), targets, ignore_index=IGNORE_INDEX), targets


def flat_targets(labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) the targets of every position, padding (a false `mask`) as IGNORE_INDEX."""
    targets = labels.reshape(-1)
    if mask is not None:
        targets = torch.where(mask.reshape(-1).to(torch.bool), targets, IGNORE_INDEX)
    return targets


def position_mask(labels: torch.Tensor, mask: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor | None:
    """(N,) true where a position counts, or None when every one does (one label per example, no mask)."""
    return None if mask is None and labels.ndim < 2 else targets != IGNORE_INDEX
