"""Influence-weighted distillation after LGTM ("Tailoring Instructions to Student's Learning Levels Boosts
Knowledge Distillation", Ren et al., ACL 2023).

The distillation influence of training example n on a student with parameters theta is the similarity of
the gradient of its distillation loss with the gradient of the student's validation loss,

    I_n = grad L_val(theta) . grad l_n(theta)        (LGTM, eq. 4)

positive when a step on l_n lowers the validation loss. LGTM estimates it without per-example gradients by
a central finite difference along the validation gradient g (eq. 7): with u = g / |g|,

    I_n ~= |g| (l_n(theta + eps u) - l_n(theta - eps u)) / (2 eps)

one backward pass (for g) and two forward passes (at theta +- eps u) per batch. `eps` is a distance in
parameter space, independent of the gradient's scale. `normalized` scales the weights so that their mean
absolute value is 1 (the distillation term keeps its size; signs are kept, as in LGTM). No ray, no mlflow.

`loss.weighting` names an entry of WEIGHTINGS: what the rest of the package asks of a weighting (when it
measures, what it logs, what it needs of the job, where its weights travel, how they combine per teacher), so
nothing outside this module branches on the name. `none` is the base: no weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from codistill.config import LossConfig, RunConfig, check
from codistill.registry import Registry

__all__ = ["WEIGHTINGS", "InfluenceWeighting", "Weighting", "distillation_influence", "normalized", "weight_stats"]


def distillation_influence(
    params: Mapping[str, torch.Tensor],
    validation_loss: Callable[[], torch.Tensor],
    per_example_loss: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    eps: float,
    reduce_gradient: Callable[[list[torch.Tensor]], None] | None = None,
) -> torch.Tensor:
    """(B,) I_n by LGTM's finite difference (module docstring).

    params: the student's parameters by name (those that require grad move); validation_loss(): L_val at
    them, with its graph; per_example_loss(moved): (B,) l_n at the parameters `moved` (e.g. through
    torch.func.functional_call), called without gradients at theta +- eps u. The parameters themselves are
    never modified (a training step's saved graph stays valid). `reduce_gradient` averages the validation
    gradient across the ranks of a data-parallel peer in place (all ranks then move alike)."""
    names = [n for n, p in params.items() if p.requires_grad]
    grads = torch.autograd.grad(validation_loss(), [params[n] for n in names], allow_unused=True)
    g = [torch.zeros_like(params[n]) if gr is None else gr.detach() for n, gr in zip(names, grads)]
    if reduce_gradient is not None:
        reduce_gradient(g)
    norm = torch.sqrt(sum((x.float() ** 2).sum() for x in g))  # type: ignore[arg-type]
    step = eps / norm.clamp_min(1e-12)  # theta +- step * g = theta +- eps * u
    with torch.no_grad():
        plus = per_example_loss({n: params[n] + step * x for n, x in zip(names, g)}).float()
        minus = per_example_loss({n: params[n] - step * x for n, x in zip(names, g)}).float()
    influence = (plus - minus) / (2 * step)
    return torch.where(norm > 0, influence, torch.zeros_like(influence))


def normalized(
    influence: torch.Tensor, total_abs: torch.Tensor | None = None, count: int | None = None
) -> torch.Tensor:
    """influence / mean |influence| (over `count` examples whose |influence| sums to `total_abs`, e.g. every rank's;
    default: these). All zeros stay zeros."""
    total_abs = influence.abs().sum() if total_abs is None else total_abs
    count = influence.numel() if count is None else count
    mean_abs = total_abs / max(count, 1)
    return torch.where(mean_abs > 0, influence / mean_abs.clamp_min(1e-30), torch.zeros_like(influence))


def weight_stats(weights: torch.Tensor) -> torch.Tensor:
    """(3,) [mean, standard deviation, fraction negative] of the weights applied."""
    w = weights.float().reshape(-1)
    return torch.stack([w.mean(), w.std(unbiased=False), (w < 0).float().mean()])


@dataclass(frozen=True)
class Weighting:
    """`loss.weighting: none`, and what every weighting answers: per-example weights on the distillation terms.

    A peer measures its own weights at the steps of `measures_at` (the exchange asks, and runs the peer's
    measurement), logs `extra_names` (the names of `weight_stats`' values) each step, and trains on
    `example_weights`; where `publishes_to_teachers`, its weights travel to its teachers (beside the logit
    shards), which weight their terms toward it with them."""

    weights_examples: ClassVar[bool] = False
    """False: no step is weighted (with the logit term alone, the loss as it was before terms)."""
    extra_names: ClassVar[tuple[str, ...]] = ()
    """Per-step values logged besides total, ce and distill (NaN at a step without weights)."""

    def check(self, cfg: RunConfig) -> None:
        """ConfigError where the job cannot use this weighting."""

    def measures_at(self, loss: LossConfig, step: int) -> bool:
        """Whether weights are measured at `step` (of a step that distills)."""
        return False

    def publishes_to_teachers(self, loss: LossConfig) -> bool:
        """Whether a student's weights go to its teachers (their terms toward it are weighted with them)."""
        return False

    def example_weights(
        self,
        loss: LossConfig,
        own: torch.Tensor,
        teacher_side: Callable[[], list[torch.Tensor]],
        num_teachers: int,
    ) -> list[torch.Tensor]:
        """Per teacher, the (B,) weights of a measuring step's distillation terms, from the peer's `own` weights and
        (called only where needed: it may wait or compute) `teacher_side()`, each teacher's weights as its student."""
        raise NotImplementedError(f"{type(self).__name__} measures no weights")


@dataclass(frozen=True)
class InfluenceWeighting(Weighting):
    """`loss.weighting: influence` (LGTM; module docstring): every `influence_every` steps, on the side
    `influence_side` says (the student's own weights, its teachers', or their mean)."""

    weights_examples: ClassVar[bool] = True
    extra_names: ClassVar[tuple[str, ...]] = ("influence_mean", "influence_std", "influence_negative")

    def check(self, cfg: RunConfig) -> None:
        for i, pc in enumerate(cfg.peers):
            check(
                pc.strategy == "ddp",
                f"peers.{i}.strategy",
                pc.strategy,
                "'ddp' with loss.weighting=influence (its parameter perturbations call the whole model "
                "functionally, which sharded FSDP parameters do not allow)",
            )
        check(
            cfg.data.validation_fraction > 0,
            "data.validation_fraction",
            cfg.data.validation_fraction,
            "a number in (0, 1) with loss.weighting=influence (the influence is measured on held-out data)",
        )
        if self.publishes_to_teachers(cfg.loss):
            check(
                cfg.exchange.topology == "all",
                "loss.influence_side",
                cfg.loss.influence_side,
                "student with exchange.topology=ring (the teacher side weights a peer's term toward its own "
                "student: every teacher must also be a student, topology all)",
            )
            check(
                cfg.loss.teacher_reduce == "each",
                "loss.influence_side",
                cfg.loss.influence_side,
                f"student with loss.teacher_reduce={cfg.loss.teacher_reduce} (the teacher side weights each "
                f"teacher's term by that teacher's weights: teacher_reduce each)",
            )

    def measures_at(self, loss: LossConfig, step: int) -> bool:
        return step % loss.influence_every == 0

    def publishes_to_teachers(self, loss: LossConfig) -> bool:
        return loss.influence_side != "student"

    def example_weights(
        self,
        loss: LossConfig,
        own: torch.Tensor,
        teacher_side: Callable[[], list[torch.Tensor]],
        num_teachers: int,
    ) -> list[torch.Tensor]:
        if loss.influence_side == "student":
            return [own] * num_teachers
        theirs = teacher_side()
        return theirs if loss.influence_side == "teacher" else [(own + w) / 2 for w in theirs]


WEIGHTINGS: Registry[Weighting] = Registry("weighting", {"none": Weighting(), "influence": InfluenceWeighting()})
