"""Compact teacher signals: a position's top-k logits plus what keeps the loss exact on those k classes.

A top-k shard (`exchange.logits: topk`) holds, per position, the teacher's k largest logits (ids and
values, after z-scoring when `loss.zscore` is on) and two log-sum-exps at the job's temperature T: over
all classes (`lse`) and over the classes outside the top k (`lse_rest`). The teacher's distribution at T
is then known exactly on k + 1 buckets (the k classes, and the rest as one), and the student's full
distribution is folded into the same buckets; divergences are computed between the two bucket
distributions. With k equal to the vocabulary there is no rest bucket and the loss equals the full one.
No ray, no mlflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["TopKLogits", "bucket_log_probs", "topk_logits"]


@dataclass
class TopKLogits:
    """A teacher's compact logits for N positions (see module docstring)."""

    ids: torch.Tensor  # (N, k) int64
    values: torch.Tensor  # (N, k) float32: the teacher's logits of those classes
    lse: torch.Tensor  # (N,) float32: logsumexp(all logits / T)
    lse_rest: torch.Tensor  # (N,) float32: logsumexp(logits outside the top k / T); -inf when k = V
    num_classes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.ids.shape[0], self.num_classes)

    def select(self, keep: torch.Tensor) -> TopKLogits:
        """The positions where `keep` (N,) is true."""
        return TopKLogits(self.ids[keep], self.values[keep], self.lse[keep], self.lse_rest[keep], self.num_classes)


def topk_logits(logits: torch.Tensor, k: int, temperature: float) -> TopKLogits:
    """The compact form of full logits (..., V) at temperature T: positions flattened to N."""
    flat = logits.detach().float().reshape(-1, logits.shape[-1])  # (N, V)
    v = flat.shape[-1]
    k = min(k, v)
    values, ids = flat.topk(k, dim=-1)  # (N, k)
    scaled = flat / temperature
    lse = torch.logsumexp(scaled, dim=-1)  # (N,)
    if k == v:
        lse_rest = torch.full_like(lse, -torch.inf)
    else:
        lse_rest = torch.logsumexp(scaled.scatter(1, ids, -torch.inf), dim=-1)
    return TopKLogits(ids, values, lse, lse_rest, v)


def bucket_log_probs(
    student_logits: torch.Tensor, teacher: TopKLogits, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities at T over the teacher's buckets, (N, k + 1) each; the last bucket
    is "every other class". With k = V there is no other class and no last bucket: (N, V), the full ones."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    q_top = log_q.gather(1, teacher.ids)  # (N, k)
    p_top = teacher.values / temperature - teacher.lse[:, None]
    if teacher.ids.shape[1] == teacher.num_classes:
        return q_top, p_top
    q_rest = torch.logsumexp(log_q.scatter(1, teacher.ids, -torch.inf), dim=-1)  # (N,)
    p_rest = teacher.lse_rest - teacher.lse
    return torch.cat([q_top, q_rest[:, None]], 1), torch.cat([p_top, p_rest[:, None]], 1)
