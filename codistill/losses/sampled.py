"""Sampled teacher signals: per position, k tokens drawn from the teacher's distribution, and the weights that
make the forward-KL distillation loss and its gradient unbiased (Anshumann et al., "Sparse Logit Sampling:
Accelerating Knowledge Distillation in LLMs", ACL 2025: Random-Sampling KD).

A top-k shard keeps the k most likely classes and is exact on them, but its gradient is biased: the student is
never pushed towards the mass in the tail. Sampling instead draws k ids v_1..v_k with replacement from the
proposal r = p_T (the teacher's own distribution at the job's temperature T) and weighs each draw by the
importance weight p_T(v) / (k r(v)) = 1 / k; a token drawn c times weighs c / k. Then for any f,
E[sum_j w_j f(v_j)] = sum_v p_T(v) f(v), so with f(v) = log p_T(v) - log q_T(v) (q the student at T):

    KL_hat = T^2 * sum_j w_j (log p_T(v_j) - log q_T(v_j))
    E[KL_hat] = T^2 * KL(p_T || q_T),   E[grad_s KL_hat] = T * (q_T - p_T) = grad_s T^2 KL(p_T || q_T)

(the gradient of -log q_T(v) is (q_T - onehot(v)) / T, whose mean under p_T is (q_T - p_T) / T). The shard holds
the distinct drawn ids (N, k), their counts (N, k) (0 for a slot that repeats an earlier id) and the teacher's
own term t = sum_j w_j log p_T(v_j) (N,): the loss's value needs nothing else of the teacher, and its gradient
only the ids and weights. Forward KL only: reverse KL and JS are expectations under the student (or a mixture),
which samples of the teacher cannot estimate without bias. No ray, no mlflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["SampledLogits", "sample_logits", "sampled_kl"]


@dataclass
class SampledLogits:
    """A teacher's sampled signal for N positions (see module docstring)."""

    ids: torch.Tensor  # (N, k) int64: the drawn ids, each distinct id once; a repeat's slot has count 0
    counts: torch.Tensor  # (N, k) int64: how often each id was drawn; sums to k per position
    teacher_term: torch.Tensor  # (N,) float32: sum_j (counts_j / k) log p_T(ids_j)
    num_classes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.ids.shape[0], self.num_classes)

    @property
    def weights(self) -> torch.Tensor:
        """(N, k) float32: counts / k, the importance weights of the draws (each 1 / k under proposal p_T)."""
        counts = self.counts.float()
        return counts / counts.sum(-1, keepdim=True)

    def select(self, keep: torch.Tensor) -> SampledLogits:
        """The positions where `keep` (N,) is true."""
        return SampledLogits(self.ids[keep], self.counts[keep], self.teacher_term[keep], self.num_classes)


def sample_logits(
    logits: torch.Tensor, k: int, temperature: float, generator: torch.Generator | None = None
) -> SampledLogits:
    """Draw k ids per position from softmax(logits / T) (..., V), positions flattened to N, with `generator`
    (seeded by the publisher: a run reproduces its draws)."""
    flat = logits.detach().float().reshape(-1, logits.shape[-1])  # (N, V)
    log_p = F.log_softmax(flat / temperature, dim=-1)  # (N, V)
    draws = torch.multinomial(log_p.exp(), k, replacement=True, generator=generator)  # (N, k)
    draws, _ = draws.sort(dim=-1)  # equal ids side by side
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]  # (N, k): the first slot of each distinct id
    # a distinct id's count is the length of its run of equal draws; a repeat's slot keeps the id with count 0
    run = first.cumsum(-1) - 1  # (N, k): which run (distinct id) each slot is in
    run_length = torch.zeros_like(draws).scatter_add_(1, run, torch.ones_like(draws))  # (N, k): run r's length at r
    counts = run_length.gather(1, run) * first  # (N, k)
    teacher_term = (counts.float() / k * log_p.gather(1, draws)).sum(-1)  # (N,)
    return SampledLogits(draws, counts, teacher_term, flat.shape[-1])


def sampled_kl(student_logits: torch.Tensor, teacher: SampledLogits, temperature: float) -> torch.Tensor:
    """(N,) the unbiased estimate T^2 * sum_j w_j (log p_T(v_j) - log q_T(v_j)) of T^2 KL(p_T || q_T) (module
    docstring); `student_logits` (N, V)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    student_term = (teacher.weights * log_q.gather(1, teacher.ids)).sum(-1)  # (N,)
    return temperature**2 * (teacher.teacher_term - student_term)
