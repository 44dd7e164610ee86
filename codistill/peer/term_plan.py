"""A peer's loss terms, planned once when it starts: what each term reads from this peer (`student_taps`) and
from each of its teachers (`teacher_taps`), what this peer's consumers read from it (`publish_taps`), the
trainable projections between them (`heads`: part of the peer's optimiser and training checkpoints) and the
per-step values besides total, ce and distill (`extra_names`); and the loss they add up to at a step.

A job whose loss is the logit divergence alone (`LossConfig.default_terms`) has the empty plan: the peer then
takes `codistill.losses.total_loss`, the loss exactly as before terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from codistill.config import LossConfig, RunConfig
from codistill.data import Dataset, mix_seed
from codistill.errors import ConfigError
from codistill.losses.distill import cross_entropy, flat_targets, position_mask
from codistill.losses.terms import (
    LOSS_TERMS,
    ModelInfo,
    StudentOutput,
    TeacherOutput,
    TermPlan,
    distill_terms,
    model_info,
)
from codistill.losses.weighting import WEIGHTINGS, weight_stats
from codistill.models import build_model
from codistill.tasks import Task

__all__ = ["LossPlan", "TermsLoss", "example_positions", "plan_loss"]


@dataclass(frozen=True)
class TermsLoss:
    """A step's loss under the plan: distill is None before burn-in or without teachers; extras are the values
    named by `LossPlan.extra_names` (NaN where a step has none)."""

    total: torch.Tensor
    ce: torch.Tensor
    distill: torch.Tensor | None
    alpha: float
    extras: list[torch.Tensor]


@dataclass(frozen=True)
class LossPlan:
    heads: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    plans: dict[str, list[TermPlan]] = field(default_factory=dict)
    projections: dict[str, list[nn.Module | None]] = field(default_factory=dict)
    student_taps: tuple[str, ...] = ()
    publish_taps: tuple[str, ...] = ()
    teacher_taps: dict[int, tuple[str, ...]] = field(default_factory=dict)
    extra_names: tuple[str, ...] = ()  # per-step values besides total, ce, distill

    def loss(
        self,
        loss: LossConfig,
        step: int,
        student: StudentOutput,
        y: torch.Tensor,
        mask: torch.Tensor | None,
        teachers: list[TeacherOutput] | None,
        sample_weights: torch.Tensor | Sequence[torch.Tensor] | None,
    ) -> TermsLoss:
        """The loss of a job with loss.terms or weighting (LossConfig) on the student's forward pass."""
        ce, targets = cross_entropy(student.logits, y, mask)
        nan = torch.full((), float("nan"), device=ce.device)
        alpha = loss.alpha if (teachers and step >= loss.burn_in) else 0.0
        stats = [nan] * len(WEIGHTINGS[loss.weighting].extra_names)  # weight_stats' values, where there are weights
        if alpha == 0.0 or not teachers:
            return TermsLoss(ce, ce, None, 0.0, [nan] * len(loss.terms) + stats)
        weights = None
        if sample_weights is not None:
            weights = (
                [sample_weights] * len(teachers) if isinstance(sample_weights, torch.Tensor) else list(sample_weights)
            )
            stats = list(weight_stats(torch.cat([w.reshape(-1) for w in weights])).unbind())
        values = distill_terms(
            loss,
            self.plans,
            self.projections,
            student,
            teachers,
            example_positions(y, mask, student.logits.shape[0], targets),
            weights,
        )
        total = (1 - alpha) * ce + alpha * values.total
        return TermsLoss(total, ce, values.total, alpha, [values.terms[t.name] for t in loss.terms] + stats)


def example_positions(
    y: torch.Tensor, mask: torch.Tensor | None, batch_size: int, targets: torch.Tensor | None = None
) -> torch.Tensor | None:
    """(B, P) the valid positions of each example of a batch, or None when all are valid."""
    targets = flat_targets(y, mask) if targets is None else targets
    valid = position_mask(y, mask, targets)
    return None if valid is None else valid.reshape(batch_size, -1)


def plan_loss(
    cfg: RunConfig,
    index: int,
    teachers: Sequence[int],
    consumers: Sequence[int],
    task: Task,
    dataset: Dataset,
    seed: int,
    device: torch.device,
) -> LossPlan:
    """The plan of peer `index` (learning from `teachers`, read by `consumers`); its projections are
    initialised from the peer's `seed` and placed on `device`."""
    if cfg.loss.default_terms:
        return LossPlan()
    extra_names = [f"term.{t.name}" for t in cfg.loss.terms] + list(WEIGHTINGS[cfg.loss.weighting].extra_names)
    infos = _model_infos(cfg, task, dataset)
    heads = nn.ModuleDict()
    plans: dict[str, list[TermPlan]] = {}
    projections: dict[str, list[nn.Module | None]] = {}
    student: list[str] = []
    publish: list[str] = []
    teacher: dict[int, list[str]] = {j: [] for j in teachers}
    for tc in cfg.loss.terms:
        term = LOSS_TERMS[tc.name]
        term_plans = [_plan(term, tc, infos, index, j) for j in teachers]
        plans[tc.name] = term_plans
        term_projections: list[nn.Module | None] = []
        for j, plan in zip(teachers, term_plans):
            with torch.random.fork_rng(devices=[]):  # initialised from the peer's seed, in any process
                torch.manual_seed(mix_seed(seed, 17, j, len(heads)))
                proj = term.projections(plan)
            if proj is not None:
                heads[f"{tc.name}_{j}"] = proj
            term_projections.append(proj)
            student += plan.student_taps
            teacher[j] += plan.teacher_taps
        projections[tc.name] = term_projections
        for c in consumers:
            publish += _plan(term, tc, infos, c, index).teacher_taps
    heads.to(device)
    return LossPlan(
        heads,
        plans,
        projections,
        student_taps=tuple(dict.fromkeys(student)),
        publish_taps=tuple(dict.fromkeys(publish)),
        teacher_taps={j: tuple(dict.fromkeys(names)) for j, names in teacher.items()},
        extra_names=tuple(extra_names),
    )


def _plan(term: Any, tc, infos: dict[int, ModelInfo | None], student: int, teacher: int) -> TermPlan:
    try:  # infos are None when only the logit term is used: it reads no taps
        return term.plan(tc, infos[student], infos[teacher])
    except ValueError as e:
        raise ConfigError("loss.terms", tc.name, f"terms these peers can pair: {e}") from None


def _model_infos(cfg: RunConfig, task: Task, dataset: Dataset) -> dict[int, ModelInfo | None]:
    """Every peer's ModelInfo (built on the meta device: shapes only), when a term reads taps."""
    if all(t.name == "logits" for t in cfg.loss.terms):
        return {i: None for i in range(cfg.num_peers)}
    example = task.example_input(dataset)
    out: dict[int, ModelInfo | None] = {}
    for i, pc in enumerate(cfg.peers):
        with torch.device("meta"):
            model = build_model(pc.model, task.input_shape(dataset), dataset.num_classes, model_args=pc.model_args)
        try:
            out[i] = model_info(model, example, f"peers.{i}.model")
        except ValueError as e:
            raise ConfigError(f"peers.{i}.model", pc.model, f"a model with named layers for loss.terms: {e}") from None
    return out
