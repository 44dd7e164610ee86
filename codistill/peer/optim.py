"""Optimizers and learning-rate schedules of a peer (registries OPTIMIZERS and SCHEDULES). No ray, no mlflow."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from codistill.config import OptimConfig
from codistill.registry import Registry

__all__ = ["OPTIMIZERS", "SCHEDULES", "make_optimizer", "make_scheduler"]

ParamGroups = list[dict]


def _sgd(groups: ParamGroups, oc: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum, nesterov=oc.nesterov and oc.momentum > 0)


def _adamw(groups: ParamGroups, oc: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=oc.lr)


OPTIMIZERS: Registry[Callable[[ParamGroups, OptimConfig], torch.optim.Optimizer]] = Registry(
    "optimizer", {"sgd": _sgd, "adamw": _adamw}
)

# A schedule maps (config, fraction of the run done) to a multiplier of the base learning rate.
SCHEDULES: Registry[Callable[[OptimConfig, float], float]] = Registry(
    "schedule",
    {
        "constant": lambda oc, frac: 1.0,
        "cosine": lambda oc, frac: 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))),
        "step": lambda oc, frac: oc.gamma ** sum(frac >= m for m in oc.milestones),
    },
)


def _is_dtensor(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def make_optimizer(params: list[nn.Parameter], oc: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (1-D tensors), as usual for ResNets.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": oc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # A sharded peer's parameters are DTensors and its loss terms' projections plain tensors: CUDA's fused
    # (foreach) optimizer steps cannot mix the two in one group.
    if any(_is_dtensor(p) for p in params):
        groups = [
            {**g, "params": [p for p in g["params"] if _is_dtensor(p) == sharded]}
            for g in groups
            for sharded in (False, True)
            if any(_is_dtensor(p) == sharded for p in g["params"])
        ]
    return OPTIMIZERS[oc.name](groups, oc)


def make_scheduler(
    optimizer: torch.optim.Optimizer, oc: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = SCHEDULES[oc.schedule]

    def multiplier(step: int) -> float:
        warm = min(1.0, (step + 1) / oc.warmup_steps) if oc.warmup_steps else 1.0
        return warm * schedule(oc, step / max(1, total_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
