"""Image classifiers: an MLP, a small CNN, CIFAR ResNets (He et al. 2016), a Wide ResNet
(Zagoruyko & Komodakis 2016), MobileNetV2 (Sandler et al. 2018) with CIFAR strides, and any
torchvision classification model. Each constructor is `(input_shape, num_classes) -> nn.Module`;
the registry is `codistill.models.MODELS`. No ray, no mlflow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from codistill.models.taps import Layers

__all__ = [
    "CifarResNet",
    "MobileNetV2Cifar",
    "Shape",
    "TappedSequential",
    "WideResNet",
    "check_torchvision_name",
    "cnn",
    "mlp",
    "torchvision_model",
]

Shape = tuple[int, ...]  # (C, H, W)


class TappedSequential(nn.Sequential):
    """An nn.Sequential that names its hidden layers (the outputs of the given indices) for hidden-state terms;
    its parameters and state dict are the plain Sequential's."""

    draws_random_numbers = False  # its forward is its layers' (codistill.models.randomness)

    def __init__(self, *modules: nn.Module, hidden: tuple[int, ...]):
        super().__init__(*modules)
        self.hidden_indices = hidden

    def distill_layers(self) -> Layers:
        return Layers(hidden=tuple(str(i) for i in self.hidden_indices))


def mlp(input_shape: Shape, num_classes: int, hidden: int = 256, dropout: float = 0.1) -> nn.Module:
    """Two hidden ReLU layers; their activations (B, hidden) are its layers."""
    c, h, w = input_shape
    return TappedSequential(
        nn.Flatten(),
        nn.Linear(c * h * w, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
        hidden=(2, 5),
    )


def cnn(input_shape: Shape, num_classes: int, width: int = 32) -> nn.Module:
    """Small conv net: two conv-BN-ReLU blocks per stage, two stages with max-pool, global pool; the stages'
    feature maps (B, width, H, W) and (B, 2 width, H/2, W/2) are its layers."""
    c, _, _ = input_shape

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return TappedSequential(
        *block(c, width),
        *block(width, width),
        nn.MaxPool2d(2),
        *block(width, 2 * width),
        *block(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
        hidden=(5, 12),
    )


class _BasicBlock(nn.Module):
    """He et al. 2016 basic block; the option-B (1x1 conv) shortcut when the shape changes."""

    draws_random_numbers = False  # its forward is its layers' (codistill.models.randomness)

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _stages(blocks: list[nn.Module], stage_ends: tuple[int, ...]) -> list[list[nn.Module]]:
    """`blocks` cut after each index of `stage_ends` (the last stage takes what is left)."""
    units, start = [], 0
    for end in stage_ends:
        units.append(blocks[start : end + 1])
        start = end + 1
    if start < len(blocks):
        units[-1] = units[-1] + blocks[start:]
    return [u for u in units if u]


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al., CVPR 2016, section 4.2): 16/32/64 channels."""

    draws_random_numbers = False  # its forward is its layers' (codistill.models.randomness)

    def __init__(self, depth: int, input_shape: Shape, num_classes: int):
        super().__init__()
        assert (depth - 2) % 6 == 0, depth
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.stage_ends = (n - 1, 2 * n - 1, 3 * n - 1)  # the last block of each stage (16/32/64 channels)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def distill_layers(self) -> Layers:
        """The feature map at the end of each of the three stages."""
        return Layers(hidden=tuple(f"layers.{i}" for i in self.stage_ends))

    def shard_units(self) -> list[list[nn.Module]]:
        """FSDP units (codistill.models.units): the three stages, each its blocks."""
        return _stages(list(self.layers), self.stage_ends)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _WideBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis, BMVC 2016)."""

    draws_random_numbers = False  # its forward is its layers' (codistill.models.randomness)

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.dropout(F.relu(self.bn2(y)), self.dropout, self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs (Zagoruyko & Komodakis, BMVC 2016)."""

    draws_random_numbers = False  # its forward is its layers' (codistill.models.randomness)

    def __init__(self, depth: int, k: int, input_shape: Shape, num_classes: int, dropout: float = 0.0):
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * k, 32 * k, 64 * k)
        self.conv = nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(_WideBlock(cin, cout, stride if i == 0 else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.stage_ends = (n - 1, 2 * n - 1, 3 * n - 1)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def distill_layers(self) -> Layers:
        """The feature map at the end of each of the three groups (pre-activation)."""
        return Layers(hidden=tuple(f"blocks.{i}" for i in self.stage_ends))

    def shard_units(self) -> list[list[nn.Module]]:
        """FSDP units (codistill.models.units): the three groups, each its blocks."""
        return _stages(list(self.blocks), self.stage_ends)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _InvertedResidual(nn.Module):
    draws_random_numbers = False  # its forward is its layers' (codistill.models.randomness)

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.use_res else self.body(x)


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 (Sandler et al., CVPR 2018) with CIFAR strides: stride-1 stem, first two downsamplings removed."""

    draws_random_numbers = False  # its forward is its layers' (codistill.models.randomness)

    # expand t, channels c, repeats n, stride s; strides of the (24, 2) and stem changed for 32x32 inputs
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, input_shape: Shape, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(input_shape[0], 32, 3, 1, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU6(inplace=True),
        ]
        cin = 32
        self.stage_ends: list[int] = []  # the last block before each downsampling, then the last conv's output
        for t, c, n, s in self.CFG:
            for i in range(n):
                if s == 2 and i == 0:
                    self.stage_ends.append(len(layers) - 1)
                layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)]
        self.stage_ends.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, num_classes)

    def distill_layers(self) -> Layers:
        """The feature map before each downsampling, and the last (1280 channels)."""
        return Layers(hidden=tuple(f"features.{i}" for i in self.stage_ends))

    def shard_units(self) -> list[list[nn.Module]]:
        """FSDP units (codistill.models.units): the layers between downsamplings, then the last ones."""
        return _stages(list(self.features), tuple(self.stage_ends))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def check_torchvision_name(name: str) -> None:
    if name not in _torchvision_names():
        raise ValueError(f"torchvision:<one of {', '.join(_torchvision_names())}>")


def torchvision_model(name: str) -> Callable[[Shape, int], nn.Module]:
    """`torchvision:<name>` (e.g. torchvision:resnet18) with `num_classes` outputs, untrained."""

    def build(input_shape: Shape, num_classes: int) -> nn.Module:
        import torchvision

        check_torchvision_name(name)
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if input_shape[0] != 3:  # grey images: repeat to 3 channels in front of the stem
            model = nn.Sequential(_RepeatChannels(3), model)
        return model

    return build


class _RepeatChannels(nn.Module):
    draws_random_numbers = False  # its forward is its layers' (codistill.models.randomness)

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x
