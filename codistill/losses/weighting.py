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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

__all__ = ["distillation_influence", "normalized", "weight_stats"]


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
