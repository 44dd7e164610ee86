"""The units a sharded peer (`strategy: fsdp`) is split into: each one FSDP unit, gathered for its own
forward and backward and freed after, so a rank holds one unit's full parameters at a time.

A model names its units with a method `shard_units() -> list[nn.Module | list[nn.Module]]` (a list is one
unit of several modules, e.g. a ResNet stage of blocks): a GPT's blocks, a CIFAR ResNet's three stages. Two
families are found without one: a Hugging Face model's decoder layers (the classes its `_no_split_modules`
names, the unit Hugging Face itself never splits across devices) and torchvision ResNets' `layer1..layer4`.
What is left (embeddings, final norm, head) belongs to the root unit. No ray, no mlflow.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["shard_units"]

Unit = nn.Module | list[nn.Module]

_TORCHVISION_STAGES = ("layer1", "layer2", "layer3", "layer4")


def shard_units(model: nn.Module) -> list[Unit]:
    """The model's FSDP units (see module docstring); [] when it has none (it cannot be sharded by unit)."""
    own = getattr(model, "shard_units", None)
    if callable(own):
        return list(own())
    no_split: set[str] = set()
    for m in model.modules():
        no_split.update(getattr(m, "_no_split_modules", None) or ())
    if no_split:
        return [m for m in model.modules() if type(m).__name__ in no_split]
    stages = [getattr(model, name, None) for name in _TORCHVISION_STAGES]
    return [s for s in stages if isinstance(s, nn.Module)] if all(stages) else []
