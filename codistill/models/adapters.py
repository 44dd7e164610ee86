"""LoRA adapters on a frozen base, through `peft` (`peers[i].adapter`; Hu et al., "LoRA: Low-Rank Adaptation of
Large Language Models", ICLR 2022): each adapted Linear computes W x + (alpha / r) B A x, W frozen, A (r, in)
and B (out, r) trained, B starting at zero so the adapted model starts as its base.

The adapters are injected into the model in place (`peft.inject_adapter_in_model`, any nn.Module: the built-in
GPT and Hugging Face models alike), so the peer's module keeps its forward, its taps and its state-dict keys for
everything that is not an adapter. What lives here:

- `add_adapter(model, cfg)`: inject, freeze everything else; `adapter_state` / `load_adapter_state`: the adapters
  only (what a checkpoint exchange publishes and a local teacher loads: a fraction of the weights);
- `share_base(model)`: a copy whose frozen base tensors *are* the original's (one base in memory for a peer and
  every local teacher with the same base and adapter layout);
- `merged(model)`: a plain copy with B A folded into W (export: no peft needed to load it).

No ray, no mlflow; peft is imported only when an adapter is added or merged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from codistill.models.gpt import GPT
from codistill.models.hf import HFCausalLM

if TYPE_CHECKING:
    from codistill.config import AdapterConfig

__all__ = [
    "GPT_TARGETS",
    "adapter_state",
    "add_adapter",
    "has_adapter",
    "is_adapter_key",
    "load_adapter_state",
    "merged",
    "share_base",
]

GPT_TARGETS = ("qkv", "proj", "fc")
"""The built-in GPT's Linear layers adapted by default: attention's q|k|v and output projections, the MLP's two."""

_ADAPTER_MARK = "lora_"  # peft names every LoRA tensor lora_A / lora_B / lora_embedding_* / lora_magnitude_*


def is_adapter_key(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to an adapter (peft's `lora_` names)."""
    return _ADAPTER_MARK in name


def has_adapter(model: nn.Module) -> bool:
    return any(is_adapter_key(name) for name, _ in model.named_parameters())


def default_targets(model: nn.Module) -> list[str]:
    """The Linear layers adapted when `target_modules` is null: GPT_TARGETS, or peft's table for a Hugging Face
    model's `model_type` (llama: q_proj, v_proj; gpt2: c_attn; ...)."""
    if isinstance(model, GPT):
        return list(GPT_TARGETS)
    if isinstance(model, HFCausalLM):
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

        model_type = getattr(getattr(model.hf_model, "config", None), "model_type", None)
        if model_type in TABLE:
            return list(TABLE[model_type])
        raise ValueError(
            f"adapter.target_modules: peft has no default for model_type {model_type!r}; name the Linear layers to "
            "adapt (e.g. [q_proj, v_proj])"
        )
    raise ValueError(f"adapter.target_modules: no default for {type(model).__name__}; name the Linear layers to adapt")


def add_adapter(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """`model` with LoRA adapters injected in place and only they trainable (A from torch's generator: seed it)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(cfg.target_modules) if cfg.target_modules else default_targets(model)
    alpha: Any = cfg.alpha  # peft types it int; it only divides it by r, and a float alpha is as valid
    config = LoraConfig(r=cfg.r, lora_alpha=alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none")
    try:
        model = inject_adapter_in_model(config, model)
    except ValueError as e:  # no module matched, or a module peft cannot adapt
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"adapter.target_modules: {targets} in {type(model).__name__}: {first[:300]}") from None
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_key(name))
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only, copied to the CPU (what is published, and what a teacher loads)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if is_adapter_key(k)}


def load_adapter_state(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load published adapters into a model with the same adapter layout (the base stays as it is)."""
    own = {k for k in model.state_dict() if is_adapter_key(k)}
    given = set(weights)
    if given != own:
        missing, extra = sorted(own - given), sorted(given - own)
        raise ValueError(
            f"adapter weights do not fit this model: missing {missing[:3]}, unexpected {extra[:3]} "
            "(the publisher's adapter.target_modules or r differ)"
        )
    model.load_state_dict(dict(weights), strict=False)


def share_base(model: nn.Module) -> nn.Module:
    """A copy of `model` whose frozen (non-adapter) parameters and buffers are the very tensors of `model`: its
    adapters are its own, its base costs no memory. For a frozen local teacher of the same base."""
    memo: dict[int, Any] = {}
    for name, p in model.named_parameters():
        if not is_adapter_key(name):
            memo[id(p)] = p
    for name, b in model.named_buffers():
        if not is_adapter_key(name):
            memo[id(b)] = b
    return copy.deepcopy(model, memo)


def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter folded into its base Linear (W + (alpha / r) B A) and the adapter
    layers replaced by those Linears: a plain model with the base's state-dict keys."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = plain.get_submodule(parent_name) if parent_name else plain
            setattr(parent, child, module.get_base_layer())
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain
