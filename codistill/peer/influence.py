"""A peer's influence weights (loss.weighting influence; LGTM, `codistill.losses.weighting`): its own, measured
on its pending batch, and, in checkpoint mode, each of its students', estimated on its local frozen copy of that
student. Both are normalised to mean |w| = 1 over the whole batch (all ranks of a data-parallel peer).

Part of the peer, in a file of its own: it runs the peer's pending forward pass again at moved weights, with the
peer's random-number, BatchNorm and autocast settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch.func import functional_call

from codistill.config import TermConfig
from codistill.losses.distill import cross_entropy
from codistill.losses.terms import StudentOutput, TeacherOutput, TermPlan, per_example_objective
from codistill.losses.weighting import distillation_influence, normalized
from codistill.peer.forward_context import norm_stats_kept
from codistill.peer.term_plan import example_positions

if TYPE_CHECKING:
    from codistill.peer.peer import Peer

__all__ = ["measure_influence", "teacher_influence", "validation_batch"]


def validation_batch(peer: Peer, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of the held-out validation batch of `step` (inputs, targets)."""
    x, y = peer.data.validation_batch(step)
    return (x, y) if peer.world_size == 1 else (x[peer.part], y[peer.part])


def measure_influence(peer: Peer, step: int, teachers: Sequence[TeacherOutput]) -> torch.Tensor:
    """(B_part,) the peer's distillation influence on each example of its pending batch, normalised."""
    assert peer._pending is not None, "call forward() first"
    pending, loss, plan = peer._pending, peer.cfg.loss, peer.loss_plan
    val_x, val_y = validation_batch(peer, step)
    valid = example_positions(pending.y, peer.task.valid(pending.y), pending.logits.shape[0])

    def validation_loss() -> torch.Tensor:
        with norm_stats_kept(peer.module), peer._step_rng(step, 2), peer._autocast():
            val_logits = peer.module(peer._input(val_x))
        return cross_entropy(val_logits, val_y, peer.task.valid(val_y))[0]

    def per_example(moved: Mapping[str, torch.Tensor]) -> torch.Tensor:
        kept, rng = norm_stats_kept(peer.module), peer._step_rng(step, 3)
        with kept, rng, peer._autocast(), peer._taps(plan.student_taps) as taps:
            out = functional_call(peer.module, dict(moved), (pending.x,))
        student = StudentOutput(out, dict(taps))
        return per_example_objective(loss, plan.plans, plan.projections, student, teachers, valid)

    peer.module.train()
    reduce = peer._all_reduce_mean if peer.world_size > 1 else None
    params = dict(peer.module.named_parameters())
    raw = distillation_influence(params, validation_loss, per_example, loss.influence_eps, reduce)
    return _normalized(raw, peer.world_size)


def teacher_influence(peer: Peer, j: int) -> torch.Tensor:
    """(B_part,) the influence of distilling from the peer on its student j, estimated on the peer's local frozen
    copy of j (checkpoint mode): j's validation gradient, and j's logit divergence toward the peer's pending
    logits at j's weights moved along it. Normalised as `measure_influence`."""
    assert peer._pending is not None, "call forward() first"
    pending, loss = peer._pending, peer.cfg.loss
    copy = peer.teachers[j].model
    val_x, val_y = validation_batch(peer, pending.step)
    valid = example_positions(pending.y, peer.task.valid(pending.y), pending.logits.shape[0])
    mine = [TeacherOutput(peer.index, pending.logits.detach().float())]
    logit_only = dataclasses.replace(loss, terms=(TermConfig(),), teacher_reduce="each")

    def validation_loss() -> torch.Tensor:
        with peer._autocast():
            return cross_entropy(copy(peer._input(val_x)), val_y, peer.task.valid(val_y))[0]

    def per_example(moved: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with peer._autocast():
            out = functional_call(copy, dict(moved), (pending.x,))
        return per_example_objective(
            logit_only, {"logits": [TermPlan()]}, {"logits": [None]}, StudentOutput(out), mine, valid
        )

    copy.requires_grad_(True)
    try:
        reduce = peer._all_reduce_mean if peer.world_size > 1 else None
        params = dict(copy.named_parameters())
        raw = distillation_influence(params, validation_loss, per_example, loss.influence_eps, reduce)
    finally:
        copy.requires_grad_(False)
    return _normalized(raw, peer.world_size)


def _normalized(raw: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return normalized(raw)
    import torch.distributed as dist

    total_abs = raw.abs().sum().reshape(1)
    dist.all_reduce(total_abs)
    return normalized(raw, total_abs[0], raw.numel() * world_size)
