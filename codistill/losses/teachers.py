"""How several teachers combine into the signals a student distills from (`loss.teacher_reduce`).

`each` keeps every teacher (DML, Zhang et al., CVPR 2018: the mean of the per-teacher divergences);
`probs` is one teacher with the mean of the teachers' probabilities (Anil et al., ICLR 2018);
`logits` is one teacher with the mean of their logits. No ray, no mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from codistill.registry import Registry

__all__ = ["TEACHER_REDUCERS", "TeacherReducer", "reduce_teachers"]

TeacherReducer = Callable[[Sequence[torch.Tensor], float], list[torch.Tensor]]


def _reduce_each(teachers: Sequence[torch.Tensor], temperature: float) -> list[torch.Tensor]:
    return list(teachers)


def _reduce_logits(teachers: Sequence[torch.Tensor], temperature: float) -> list[torch.Tensor]:
    return [torch.stack(list(teachers)).mean(0)]


def _reduce_probs(teachers: Sequence[torch.Tensor], temperature: float) -> list[torch.Tensor]:
    # One teacher whose softmax(./T) is the mean of the teachers' probabilities (Anil et al., ICLR 2018):
    # its logits are T * log(mean_j softmax(t_j / T)), computed in log space.
    log_probs = torch.stack([F.log_softmax(t / temperature, dim=-1) for t in teachers])
    return [temperature * (torch.logsumexp(log_probs, 0) - math.log(len(teachers)))]


TEACHER_REDUCERS: Registry[TeacherReducer] = Registry(
    "teacher reduction",
    {
        "each": _reduce_each,  # DML: mean over teachers of D(s, t_j)
        "probs": _reduce_probs,  # Anil: D(s, mean of teacher probabilities)
        "logits": _reduce_logits,  # D(s, mean of teacher logits)
    },
)


def reduce_teachers(
    teacher_logits: Sequence[torch.Tensor], teacher_reduce: str, temperature: float
) -> list[torch.Tensor]:
    return TEACHER_REDUCERS[teacher_reduce](teacher_logits, temperature)
