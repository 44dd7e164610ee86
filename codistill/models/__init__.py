"""Model registry: `build_model(name, input_shape, num_classes, model_args=None, pretrained=False)`.

MODELS maps a name to a builder `(input_shape, num_classes, **model_args) -> nn.Module`.
Image classifiers (`codistill.models.vision`) take `input_shape == (C, H, W)` and mostly no
`model_args`; the family `torchvision:<name>` builds any torchvision classification model. Language
models take `input_shape == (block_size,)` and `num_classes == vocab_size` and map tokens (B, T) to
logits (B, T, V): `gpt`, `gpt-tiny`, `gpt-small`, `gpt-medium` (`codistill.models.gpt`, sizes
overridable through `model_args`), `hf` (any Hugging Face causal LM built from `model_args`, offline)
and the family `hf:<hub id or local path>` (`codistill.models.hf`; the only builder with a
`pretrained` keyword, which loads that model's weights). Adding a model is one function and one entry
here. This package imports neither ray nor mlflow, and transformers only when an `hf` model is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from codistill.models import gpt, hf, vision
from codistill.registry import Registry

__all__ = ["MODELS", "ModelBuilder", "build_model"]

ModelBuilder = Callable[..., nn.Module]
"""`(input_shape, num_classes, **model_args) -> nn.Module`; a builder that can load pretrained weights
also takes the keyword `pretrained: bool`."""

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
        "gpt": gpt.gpt_builder("gpt-small", "gpt"),
        "gpt-tiny": gpt.gpt_builder("gpt-tiny"),
        "gpt-small": gpt.gpt_builder("gpt-small"),
        "gpt-medium": gpt.gpt_builder("gpt-medium"),
        "hf": hf.hf,
    },
)
MODELS.family("torchvision", vision.torchvision_model, vision.check_torchvision_name)
MODELS.family("hf", hf.hf_model, hf.check_hf_name)


def _check_arguments(name: str, builder: ModelBuilder, kwargs: dict[str, Any], pretrained: bool) -> None:
    """ValueError unless `builder` takes these keyword arguments (builders we cannot inspect: no check)."""
    if "pretrained" in kwargs:
        raise ValueError("model_args: pretrained is the peer's field `pretrained`, not a model argument")
    try:
        params = list(inspect.signature(builder).parameters.values())[2:]  # after input_shape, num_classes
    except (TypeError, ValueError):
        return
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if pretrained and "pretrained" not in named:
        raise ValueError(f"pretrained: {name} has no pretrained weights (only hf:<hub id or path> has)")
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return  # the builder checks its own keys
    allowed = [n for n in named if n != "pretrained"]
    if kwargs and not allowed:
        raise ValueError(f"model_args: {name} takes no arguments")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"model_args: unknown key {unknown[0]!r} for {name}; allowed: {', '.join(allowed)}")


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    model_args: dict[str, Any] | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Build a registered model (or a family member such as torchvision:resnet18 or hf:<id>) with the
    keyword arguments `model_args`; `pretrained=True` (only `hf:<id>`) loads pretrained weights."""
    builder = MODELS.get_entry(name, "model")
    kwargs = dict(model_args or {})
    _check_arguments(name, builder, kwargs, pretrained)
    if pretrained:
        kwargs["pretrained"] = True
    return builder(input_shape, num_classes, **kwargs)
