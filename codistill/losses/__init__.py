"""Distillation losses as pure tensor functions (no ray, no mlflow).

`divergences` (kl, reverse_kl, js, mse, zscore; registry DIVERGENCES), `teachers` (how several
teachers combine; registry TEACHER_REDUCERS) and `distill` (the objective a peer minimises).
"""

from codistill.losses.distill import LossParts, distillation_loss, total_loss
from codistill.losses.divergences import DIVERGENCES, js, kl, mse, reverse_kl, zscore
from codistill.losses.teachers import TEACHER_REDUCERS, reduce_teachers

__all__ = [
    "DIVERGENCES",
    "TEACHER_REDUCERS",
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
