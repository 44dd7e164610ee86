"""Named intermediate tensors of a model ("taps"): what hidden-state and attention loss terms read.

A model says which of its submodules produce its *layers* through a method `distill_layers() -> Layers`:
the hidden states (a GPT block's output (B, T, C); a CNN stage's feature map (B, C, H, W); an MLP's hidden
activations (B, D)), input side first, and, for attention, the modules whose output is a layer's fused
queries|keys|values (B, T, 3C) with its head count. A tap is named by the module's qualified name
(`blocks.2`, `blocks.2.attn.qkv`, `layers.8`), so one forward hook captures it and nothing in the model's
forward changes. `TapRecorder` captures the outputs of a set of names during forward passes; `tap_shapes`
finds their shapes on PyTorch's meta device (no memory, no compute). No ray, no mlflow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = ["Layers", "TapRecorder", "channels", "layers_of", "tap_shapes"]


@dataclass(frozen=True)
class Layers:
    """Where a model's layers can be read (module names; see module docstring)."""

    hidden: tuple[str, ...]
    """Modules whose outputs are the hidden states, input side first (a GPT: the embedding, then each block)."""
    attention: tuple[str, ...] = ()
    """Modules whose outputs are each attention layer's fused queries|keys|values (B, T, 3C)."""
    heads: tuple[int, ...] = ()
    """Attention heads of each layer of `attention`."""
    causal: bool = False
    """Whether attention is causal (relations between positions then only look back)."""
    width: int | None = None
    """Channels of every hidden state, for models that cannot run on the meta device (Hugging Face's check
    their masks on the host); None: found by `tap_shapes`."""


def layers_of(model: nn.Module, who: str = "model") -> Layers:
    """The model's `Layers`; ValueError naming `who` for a model that does not declare them."""
    declare = getattr(model, "distill_layers", None)
    if declare is None:
        raise ValueError(
            f"{who}: {type(model).__name__} declares no layers for hidden-state or attention terms "
            f"(models with them: gpt*, hf, mlp, cnn, resnet*, wrn16_4, mobilenetv2)"
        )
    return declare()


def _first(out: Any) -> torch.Tensor:
    """A module's output tensor (Hugging Face layers return tuples whose first item is the hidden state)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class TapRecorder:
    """`with TapRecorder(model, names) as taps: model(x)` fills `taps` (name -> output tensor, with its graph)."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.names = tuple(dict.fromkeys(names))
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise ValueError(f"{type(model).__name__} has no module {missing[0]!r} to read")
        self._modules = [(n, modules[n]) for n in self.names]
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> dict[str, torch.Tensor]:
        self.outputs = {}
        for name, module in self._modules:

            def hook(_m: nn.Module, _inputs: Any, out: Any, name: str = name) -> None:
                self.outputs[name] = _first(out)

            self._handles.append(module.register_forward_hook(hook))
        return self.outputs

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def tap_shapes(model: nn.Module, example_input: torch.Tensor, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """The shape (without the batch dimension) of each named tap, from one forward pass on the meta device
    (`model` built on the meta device: `with torch.device("meta"): build_model(...)`; `example_input`: one
    batch of real inputs, any size)."""
    names = tuple(names)
    if not names:
        return {}
    meta_input = torch.empty_like(example_input[:1], device="meta")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), TapRecorder(model, names) as taps:
            model(meta_input)
    finally:
        model.train(was_training)
    return {n: tuple(t.shape[1:]) for n, t in taps.items()}


def channels(shape: tuple[int, ...]) -> int:
    """The channels of a tap of this shape (no batch dimension): a feature map's (C, H, W) first, else the last."""
    return shape[0] if len(shape) == 3 else shape[-1]
