"""Model registry: `build_model(name, input_shape, num_classes)`.

MODELS maps a name to a constructor `(input_shape, num_classes) -> nn.Module`; the family
`torchvision:<name>` builds any torchvision classification model. Adding a model is one function
and one entry here. This package imports neither ray nor mlflow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from codistill.models import vision
from codistill.registry import Registry

__all__ = ["MODELS", "ModelBuilder", "build_model"]

ModelBuilder = Callable[[vision.Shape, int], nn.Module]

MODELS: Registry[ModelBuilder] = Registry(
    "model",
    {
        "mlp": vision.mlp,
        "cnn": vision.cnn,
        "resnet20": lambda s, k: vision.CifarResNet(20, s, k),
        "resnet32": lambda s, k: vision.CifarResNet(32, s, k),
        "resnet56": lambda s, k: vision.CifarResNet(56, s, k),
        "wrn16_4": lambda s, k: vision.WideResNet(16, 4, s, k),
        "mobilenetv2": vision.MobileNetV2Cifar,
    },
)
MODELS.family("torchvision", vision.torchvision_model, vision.check_torchvision_name)


def build_model(name: str, input_shape: vision.Shape, num_classes: int) -> nn.Module:
    """Build a registered model (or a family member such as torchvision:resnet18)."""
    return MODELS.get_entry(name, "model")(input_shape, num_classes)
