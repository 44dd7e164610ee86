"""The distillation part of a peer's loss as weighted terms (`loss.terms`; registry LOSS_TERMS).

    loss = (1 - alpha) * CE + alpha * sum_k weight_k * D_k,     D_k = mean over teachers j of D_k(s, t_j)

Each term says which named tensors ("taps", codistill.models.taps) it reads from the student and from a
teacher (`plan`), which trainable projections the student needs for that teacher (`projections`), and its
value per example (`per_example`). A term's value is averaged over examples weighted by their valid
positions, so the logit term of a job without `loss.terms` is exactly `distillation_loss`. Per-sample
weights (influence, codistill.losses.weighting) scale each teacher's per-example values. A new term is one
class and one entry. No ray, no mlflow.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn as nn

from codistill.losses import hidden
from codistill.losses.distill import TeacherSignal, per_position_divergences
from codistill.models.taps import Layers, channels, layers_of, tap_shapes
from codistill.registry import Registry

if TYPE_CHECKING:
    from codistill.config import LossConfig, TermConfig

__all__ = [
    "LOSS_TERMS",
    "LossTerm",
    "ModelInfo",
    "StudentOutput",
    "TeacherOutput",
    "TermPlan",
    "TermValues",
    "distill_terms",
    "model_info",
    "per_example_objective",
]


@dataclass(frozen=True)
class ModelInfo:
    """A peer's model as the terms see it: where its layers are and each tap's channels."""

    layers: Layers
    channels: Mapping[str, int]
    name: str = "model"  # for error messages (`peers.1.model`)
    feature_maps: frozenset[str] = frozenset()  # taps that are (B, C, H, W) feature maps


def model_info(model: nn.Module, example_input: torch.Tensor, name: str = "model") -> ModelInfo:
    """The ModelInfo of a model built on the meta device (codistill.models.taps.tap_shapes)."""
    layers = layers_of(model, name)
    names = layers.hidden + layers.attention
    if layers.width is not None and not layers.attention:
        return ModelInfo(layers, {n: layers.width for n in names}, name)
    shapes = tap_shapes(model, example_input, names)
    return ModelInfo(
        layers,
        {n: channels(s) for n, s in shapes.items()},
        name,
        frozenset(n for n, s in shapes.items() if len(s) == 3),
    )


@dataclass(frozen=True)
class StudentOutput:
    logits: torch.Tensor  # (B, C) or (B, T, V), with its graph
    taps: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TeacherOutput:
    """One teacher's signal on the student's batch: logits (full or top-k) and the named tensors asked for."""

    index: int  # the teacher peer
    logits: TeacherSignal
    taps: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TermPlan:
    """What one term reads for one (student, teacher) pair."""

    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()  # (student tap, teacher tap) per matched layer
    projections: tuple[tuple[int, int, bool], ...] = ()  # (student channels, teacher channels, feature map)
    relation_heads: int = 0
    causal: bool = False


@dataclass(frozen=True)
class TermContext:
    cfg: TermConfig
    loss: LossConfig
    mask: torch.Tensor | None  # (B, P) valid positions, None: all


class LossTerm(ABC):
    options: ClassVar[tuple[str, ...]] = ()
    """The TermConfig fields besides name and weight this term takes."""

    def plan(self, cfg: TermConfig, student: ModelInfo, teacher: ModelInfo) -> TermPlan:
        """What the term reads for this pair; ValueError when the models cannot be paired this way."""
        return TermPlan()

    def projections(self, plan: TermPlan) -> nn.Module | None:
        """The student's trainable parameters for this teacher (one per matched layer), or None."""
        if not plan.projections:
            return None
        return nn.ModuleList(hidden.projection(s, t, fm) for s, t, fm in plan.projections)

    def per_teacher(
        self,
        ctx: TermContext,
        plans: Sequence[TermPlan],
        projections: Sequence[nn.Module | None],
        student: StudentOutput,
        teachers: Sequence[TeacherOutput],
    ) -> list[torch.Tensor]:
        """(B,) values per teacher (in `teachers` order)."""
        return [self.per_example(ctx, p, proj, student, t) for p, proj, t in zip(plans, projections, teachers)]

    @abstractmethod
    def per_example(
        self, ctx: TermContext, plan: TermPlan, proj: nn.Module | None, student: StudentOutput, teacher: TeacherOutput
    ) -> torch.Tensor: ...


class LogitTerm(LossTerm):
    """`loss.divergence` between the logits, with `loss.teacher_reduce` and `loss.zscore` (codistill.losses.distill)."""

    def per_teacher(self, ctx, plans, projections, student, teachers):
        per_position = per_position_divergences(
            student.logits,
            [t.logits for t in teachers],
            divergence=ctx.loss.divergence,
            temperature=ctx.loss.temperature,
            teacher_reduce=ctx.loss.teacher_reduce,
            standardize=ctx.loss.zscore,
        )  # each (N,), N = B * P
        b = student.logits.shape[0]
        return [hidden.example_mean(v.reshape(b, -1), ctx.mask) for v in per_position]

    def per_example(self, ctx, plan, proj, student, teacher):
        raise AssertionError("the logit term works on all teachers at once")


def _layers(info: ModelInfo, attention: bool, term: str) -> tuple[str, ...]:
    names = info.layers.attention if attention else info.layers.hidden
    if not names:
        kind = "attention" if attention else "hidden"
        raise ValueError(f"{info.name}: {term} needs {kind} layers, and this model declares none")
    return names


class HiddenMSE(LossTerm):
    """TinyBERT's hidden-state loss MSE(h_s W, h_t) per matched layer (FitNets' 1x1 conv for feature maps);
    default layer map: uniform."""

    options = ("layers",)

    def plan(self, cfg, student, teacher):
        s_names, t_names = _layers(student, False, "hidden_mse"), _layers(teacher, False, "hidden_mse")
        pairs = [
            (s_names[a], t_names[b]) for a, b in hidden.layer_map(cfg.layers or "uniform", len(s_names), len(t_names))
        ]
        projections = tuple((student.channels[a], teacher.channels[b], a in student.feature_maps) for a, b in pairs)
        return TermPlan(
            tuple(dict.fromkeys(a for a, _ in pairs)),
            tuple(dict.fromkeys(b for _, b in pairs)),
            tuple(pairs),
            projections,
        )

    def per_example(self, ctx, plan, proj, student, teacher):
        assert isinstance(proj, nn.ModuleList)
        values = [
            hidden.hidden_mse(student.taps[a], teacher.taps[b], p, ctx.mask) for (a, b), p in zip(plan.pairs, proj)
        ]
        return torch.stack(values).mean(0)


class _AttentionTerm(LossTerm):
    default_layers: ClassVar[str] = "uniform"

    def plan(self, cfg, student, teacher):
        s_names, t_names = _layers(student, True, cfg.name), _layers(teacher, True, cfg.name)
        pairs = hidden.layer_map(cfg.layers or self.default_layers, len(s_names), len(t_names))
        s_width = {student.channels[s_names[a]] // 3 for a, _ in pairs}
        t_width = {teacher.channels[t_names[b]] // 3 for _, b in pairs}
        heads = cfg.relation_heads
        if heads is None:
            heads = min(min(student.layers.heads[a] for a, _ in pairs), min(teacher.layers.heads[b] for _, b in pairs))
        if any(w % heads for w in s_width | t_width):
            raise ValueError(
                f"{cfg.name}: {heads} relation heads do not divide the widths {sorted(s_width | t_width)} of "
                f"{student.name} and {teacher.name}; set loss.terms.<i>.relation_heads to a common divisor "
                f"(e.g. {math.gcd(*sorted(s_width | t_width))})"
            )
        named = [(s_names[a], t_names[b]) for a, b in pairs]
        return TermPlan(
            tuple(dict.fromkeys(a for a, _ in named)),
            tuple(dict.fromkeys(b for _, b in named)),
            tuple(named),
            relation_heads=heads,
            causal=student.layers.causal,
        )


class AttentionKL(_AttentionTerm):
    """MiniLM's self-attention distribution (and value relation) transfer on relation heads (MiniLMv2);
    default layers: the last."""

    options = ("layers", "relation_heads", "relations")
    default_layers = "last"

    def per_example(self, ctx, plan, proj, student, teacher):
        values = [
            hidden.attention_kl(
                student.taps[a], teacher.taps[b], plan.relation_heads, ctx.cfg.relations, plan.causal, ctx.mask
            )
            for a, b in plan.pairs
        ]
        return torch.stack(values).mean(0)


class AttentionMSE(_AttentionTerm):
    """TinyBERT's attention loss: MSE of the attention scores on relation heads; default layer map: uniform."""

    options = ("layers", "relation_heads")

    def per_example(self, ctx, plan, proj, student, teacher):
        values = [
            hidden.attention_mse(student.taps[a], teacher.taps[b], plan.relation_heads, plan.causal, ctx.mask)
            for a, b in plan.pairs
        ]
        return torch.stack(values).mean(0)


LOSS_TERMS: Registry[LossTerm] = Registry(
    "loss term",
    {"logits": LogitTerm(), "hidden_mse": HiddenMSE(), "attention_kl": AttentionKL(), "attention_mse": AttentionMSE()},
)


@dataclass
class TermValues:
    """One step's distillation part: the total (weighted sum) and each term's value (before its weight)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def _evaluate(
    loss: LossConfig,
    plans: Mapping[str, Sequence[TermPlan]],
    projections: Mapping[str, Sequence[nn.Module | None]],
    student: StudentOutput,
    teachers: Sequence[TeacherOutput],
    mask: torch.Tensor | None,
) -> list[tuple[TermConfig, list[torch.Tensor]]]:
    """Each term with its (B,) values per teacher (or one for a combined logit teacher)."""
    return [
        (
            cfg,
            LOSS_TERMS[cfg.name].per_teacher(
                TermContext(cfg, loss, mask), plans[cfg.name], projections[cfg.name], student, teachers
            ),
        )
        for cfg in loss.terms
    ]


def distill_terms(
    loss: LossConfig,
    plans: Mapping[str, Sequence[TermPlan]],
    projections: Mapping[str, Sequence[nn.Module | None]],
    student: StudentOutput,
    teachers: Sequence[TeacherOutput],
    mask: torch.Tensor | None = None,
    teacher_weights: Sequence[torch.Tensor] | None = None,
) -> TermValues:
    """sum_k weight_k D_k, each D_k the mean over teachers of the position-weighted mean over examples.

    mask: (B, P) valid positions (None: all). teacher_weights: (B,) per teacher (influence), or None."""
    counts = None if mask is None else mask.to(torch.float32).sum(1)  # (B,) valid positions per example
    terms: dict[str, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for cfg, values in _evaluate(loss, plans, projections, student, teachers, mask):
        means = []
        for j, v in enumerate(values):
            w = v if teacher_weights is None else v * teacher_weights[min(j, len(teacher_weights) - 1)].to(v)
            means.append(w.mean() if counts is None else (w * counts).sum() / counts.sum().clamp_min(1.0))
        terms[cfg.name] = torch.stack(means).mean()
        part = terms[cfg.name] if cfg.weight == 1.0 else cfg.weight * terms[cfg.name]
        total = part if total is None else total + part
    assert total is not None
    return TermValues(total, terms)


def per_example_objective(
    loss: LossConfig,
    plans: Mapping[str, Sequence[TermPlan]],
    projections: Mapping[str, Sequence[nn.Module | None]],
    student: StudentOutput,
    teachers: Sequence[TeacherOutput],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) the distillation part of each example, sum_k weight_k mean_j D_k(example) (what influence
    differentiates)."""
    total = None
    for cfg, values in _evaluate(loss, plans, projections, student, teachers, mask):
        part = cfg.weight * torch.stack(values).mean(0)
        total = part if total is None else total + part
    assert total is not None
    return total
