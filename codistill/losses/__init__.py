"""Distillation losses as pure tensor functions (no ray, no mlflow).

`divergences` (kl, reverse_kl, js, mse, zscore; registry DIVERGENCES), `teachers` (how several
teachers combine; registry TEACHER_REDUCERS), `distill` (the objective a peer minimises), `terms` (the
distillation part as weighted terms; registry LOSS_TERMS), `hidden` (hidden-state and attention matching)
and `weighting` (influence-weighted distillation, LGTM).
"""

from codistill.losses.distill import LossParts, distillation_loss, total_loss
from codistill.losses.divergences import DIVERGENCES, js, kl, mse, reverse_kl, zscore
from codistill.losses.teachers import TEACHER_REDUCERS, reduce_teachers
from codistill.losses.terms import LOSS_TERMS, StudentOutput, TeacherOutput

__all__ = [
    "DIVERGENCES",
    "LOSS_TERMS",
    "TEACHER_REDUCERS",
    "StudentOutput",
    "TeacherOutput",
    "LossParts",
    "distillation_loss",
    "js",
    "kl",
    "mse",
    "reduce_teachers",
    "reverse_kl",
    "total_loss",
    "zscore",
]
