"""Hidden-state and attention matching, as pure tensor functions (each returns one value per example, (B,)).

- `hidden_mse`: MSE between the student's hidden state through a learned projection W and the teacher's,
  `MSE(h_s W, h_t)` (TinyBERT, Jiao et al., Findings of EMNLP 2020, eq. 8); for feature maps the projection
  is a 1x1 convolution (FitNets' regressor, Romero et al., ICLR 2015).
- `attention_kl`: KL between the teacher's and the student's self-attention relations, row by row (MiniLM,
  Wang et al., NeurIPS 2020: attention distributions `qk` and the value relation `vv`); queries, keys and
  values are first split into the same number of *relation heads* (MiniLMv2, Wang et al., Findings of ACL
  2021), so peers with different head counts and widths compare.
- `attention_mse`: MSE between the attention score matrices q k^T / sqrt(d) (TinyBERT, eq. 7: unnormalised
  scores, which the paper found to converge faster than probabilities), on relation heads as above.

Teacher tensors are detached here; the projection and the student get the gradient. For a causal model a
position relates only to positions at or before it. `mask` (B, T) weights positions out. No ray, no mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["attention_kl", "attention_mse", "example_mean", "hidden_mse", "layer_map", "projection", "relation_scores"]

_MASKED = -1e9  # a finite "minus infinity": log_softmax stays finite, and exp() of it is exactly 0


def layer_map(spec: str | Sequence[Sequence[int]], num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """[(student layer, teacher layer)] for a map spec: `uniform` (TinyBERT's g(m) = m N / M over the layers
    counted from 0, so first goes to first and last to last), `last`, or explicit index pairs (negative
    from the end). ValueError for an index out of range."""
    if spec == "last":
        return [(num_student - 1, num_teacher - 1)]
    if spec == "uniform":
        if num_student == 1:
            return [(0, num_teacher - 1)]
        return [(m, m * (num_teacher - 1) // (num_student - 1)) for m in range(num_student)]
    pairs = []
    for pair in spec:
        s, t = int(pair[0]), int(pair[1])
        if not (-num_student <= s < num_student and -num_teacher <= t < num_teacher):
            raise ValueError(
                f"layer pair [{s}, {t}] is out of range: the student has {num_student} layers, "
                f"the teacher {num_teacher}"
            )
        pairs.append((s % num_student, t % num_teacher))
    return pairs


def projection(student_channels: int, teacher_channels: int, feature_map: bool) -> nn.Module:
    """The learned map from the student's channels to the teacher's: a bias-free linear layer (TinyBERT's W_h)
    or a 1x1 convolution for feature maps (FitNets). Equal widths start as the identity (the student's own
    state is the first guess)."""
    module: nn.Module
    if feature_map:
        module = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
    else:
        module = nn.Linear(student_channels, teacher_channels, bias=False)
    if student_channels == teacher_channels:
        with torch.no_grad():
            module.weight.copy_(torch.eye(teacher_channels).view_as(module.weight))
    return module


def example_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) -> (B,): the mean over valid positions (all positions when `mask` is None)."""
    if mask is None:
        return values.mean(1)
    m = mask.to(values.dtype)
    return torch.where(m > 0, values, 0.0).sum(1) / m.sum(1).clamp_min(1.0)


def hidden_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, proj: nn.Module, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) mean squared error between proj(student_hidden) and teacher_hidden, per example.

    Sequences (B, T, C) average over channels then valid positions; feature maps (B, C, H, W) over channels
    and pixels, the larger map average-pooled to the smaller's size first; vectors (B, D) over D. A feature
    map facing a vector (a CNN and an MLP) is average-pooled to one (B, C) first."""
    teacher = teacher_hidden.detach().float()
    if teacher.ndim == 4 and student_hidden.ndim == 2:
        teacher = teacher.mean((2, 3))  # (B, C_t)
    if student_hidden.ndim == 4 and teacher.ndim == 2:
        return (proj(student_hidden.float()).mean((2, 3)) - teacher).pow(2).mean(1)
    if student_hidden.ndim == 4:
        mapped = proj(student_hidden.float())  # (B, C_t, H_s, W_s)
        size = (min(mapped.shape[2], teacher.shape[2]), min(mapped.shape[3], teacher.shape[3]))
        if tuple(mapped.shape[2:]) != size:
            mapped = F.adaptive_avg_pool2d(mapped, size)
        if tuple(teacher.shape[2:]) != size:
            teacher = F.adaptive_avg_pool2d(teacher, size)
        return (mapped - teacher).pow(2).flatten(1).mean(1)
    mapped = proj(student_hidden.float())  # (B, T, C_t) or (B, C_t)
    squared = (mapped - teacher).pow(2).mean(-1)  # (B, T) or (B,)
    return squared if squared.ndim == 1 else example_mean(squared, mask)


def _split(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, 3C) -> q, k, v each (B, R, T, C/R) on `heads` = R relation heads."""
    b, t, c3 = qkv.shape
    c = c3 // 3
    q, k, v = (x.reshape(b, t, heads, c // heads).transpose(1, 2) for x in qkv.float().split(c, dim=-1))
    return q, k, v


def relation_scores(qkv: torch.Tensor, heads: int, kind: str, causal: bool) -> torch.Tensor:
    """(B, R, T, T) scaled dot products a b^T / sqrt(d) of relation `kind` (`qk`, `qq`, `kk`, `vv`) on R relation
    heads; positions after the row's are set to a large negative number when `causal`."""
    q, k, v = _split(qkv, heads)
    named = {"q": q, "k": k, "v": v}
    a, b = named[kind[0]], named[kind[1]]
    scores = a @ b.transpose(-1, -2) / math.sqrt(a.shape[-1])  # (B, R, T, T)
    if causal:
        t = scores.shape[-1]
        future = torch.ones(t, t, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, _MASKED)
    return scores


def attention_kl(
    student_qkv: torch.Tensor,
    teacher_qkv: torch.Tensor,
    heads: int,
    relations: Sequence[str],
    causal: bool,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) KL(teacher relation || student relation) summed over each row's keys, averaged over relation heads,
    relations and valid rows (MiniLM / MiniLMv2)."""
    teacher_qkv = teacher_qkv.detach()
    per_row = []
    for kind in relations:
        log_p = F.log_softmax(relation_scores(teacher_qkv, heads, kind, causal), dim=-1)  # teacher (B, R, T, T)
        log_q = F.log_softmax(relation_scores(student_qkv, heads, kind, causal), dim=-1)  # student
        per_row.append((log_p.exp() * (log_p - log_q)).sum(-1).mean(1))  # (B, T)
    return example_mean(torch.stack(per_row).mean(0), mask)


def attention_mse(
    student_qkv: torch.Tensor, teacher_qkv: torch.Tensor, heads: int, causal: bool, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) mean squared difference of the attention scores q k^T / sqrt(d) over each row's visible keys,
    relation heads and valid rows (TinyBERT's attention loss)."""
    s = relation_scores(student_qkv, heads, "qk", causal=False)
    t = relation_scores(teacher_qkv.detach(), heads, "qk", causal=False)
    squared = (s - t).pow(2)  # (B, R, T, T)
    if causal:
        n = s.shape[-1]
        visible = torch.ones(n, n, dtype=torch.bool, device=s.device).tril().to(squared.dtype)
        per_row = (squared * visible).sum(-1) / visible.sum(-1)  # (B, R, T)
    else:
        per_row = squared.mean(-1)
    return example_mean(per_row.mean(1), mask)
