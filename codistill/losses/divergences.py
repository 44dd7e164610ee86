"""Divergences between a student's and a teacher's logits, as pure tensor functions.

Each returns one value per position (summed over classes): `(student_logits, teacher_logits,
temperature) -> (N,)`; the reduction over positions is the caller's. Registry: DIVERGENCES of
`Divergence`s, callable that way, which also compute the same divergence against a top-k teacher
(`codistill.losses.topk`): the distribution-based ones on the k + 1 buckets, `mse` on the k logits; `kl` also
against a sampled teacher (`codistill.losses.sampled`: unbiased, in value and gradient). A new
divergence is one function and one entry. No ray, no mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codistill.losses.sampled import SampledLogits, sampled_kl
from codistill.losses.topk import TopKLogits, bucket_log_probs
from codistill.registry import Registry

__all__ = ["DIVERGENCES", "Divergence", "js", "kl", "mse", "reverse_kl", "zscore"]

LogProbDivergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (log_q student, log_p teacher) -> (N,)


def _weighted_log_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum over the last dim of a * (log a - log b) (log-probabilities: finite, log_softmax never gives -inf)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return _weighted_log_ratio(log_p, log_q)


def _reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return _weighted_log_ratio(log_q, log_p)


def _js(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * (_weighted_log_ratio(log_p, log_m) + _weighted_log_ratio(log_q, log_m))


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)): forward KL, teacher first (Hinton et al. 2015; Zhang et al.,
    DML, CVPR 2018)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * _kl(log_q, log_p)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(s/T) || softmax(t/T)): mode-seeking (Gu et al., MiniLLM, ICLR 2024)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * _reverse_kl(log_q, log_p)


def js(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * Jensen-Shannon divergence between softmax(s/T) and softmax(t/T): symmetric, at most T^2 log 2."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * _js(log_q, log_p)


def mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean over classes of (s - t)^2 on logits: the high-temperature limit of KD (Hinton et al. 2015, sec. 2.1).
    With zero-mean logits its gradient is 2x that of `kl` (T^2 KL -> (s - t) / N)."""
    del temperature  # logit matching has no temperature
    return (student_logits - teacher_logits).pow(2).mean(-1)


@dataclass(frozen=True)
class Divergence:
    """A registered divergence: `on_logits(s, t, T)` on full logits, and against a top-k teacher either
    `on_log_probs` on the k + 1 buckets (times T^2, as on full logits) or, for logit matching, `on_logits`
    on the k kept classes."""

    on_logits: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    on_log_probs: LogProbDivergence | None = None
    on_samples: Callable[[torch.Tensor, SampledLogits, float], torch.Tensor] | None = None
    """The unbiased estimate against a sampled teacher (`exchange.logits: sampled`); None: it has none."""

    def __call__(
        self, student_logits: torch.Tensor, teacher: torch.Tensor | TopKLogits | SampledLogits, temperature: float
    ):
        if isinstance(teacher, SampledLogits):
            if self.on_samples is None:
                raise ValueError("this divergence has no unbiased estimate from sampled teachers (only kl has)")
            return self.on_samples(student_logits, teacher, temperature)
        if not isinstance(teacher, TopKLogits):
            return self.on_logits(student_logits, teacher, temperature)
        if self.on_log_probs is not None:
            log_q, log_p = bucket_log_probs(student_logits, teacher, temperature)
            return temperature**2 * self.on_log_probs(log_q, log_p)
        return self.on_logits(student_logits.float().gather(1, teacher.ids), teacher.values, temperature)


DivergenceFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # full logits only

DIVERGENCES: Registry[Divergence | DivergenceFn] = Registry(
    "divergence",
    {
        "kl": Divergence(kl, _kl, sampled_kl),
        "reverse_kl": Divergence(reverse_kl, _reverse_kl),
        "js": Divergence(js, _js),
        "mse": Divergence(mse),  # logit matching: on a top-k teacher, the mean over its k classes
    },
)


def zscore(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Standardise each logit vector: (z - mean) / std (Sun et al., "Logit Standardization in KD", CVPR 2024)."""
    mean = logits.mean(-1, keepdim=True)
    std = logits.std(-1, keepdim=True)
    return (logits - mean) / (std + eps)
