"""Hugging Face causal language models through `transformers` (imported inside the functions, so
`import codistill.models` does not import it).

- `hf`: `model_args` name a `model_type` (llama, gpt2, mistral, qwen2, ...) and the rest are that
  config's keyword arguments: `AutoConfig.for_model(model_type, vocab_size=num_classes, **rest)`, then
  `AutoModelForCausalLM.from_config`, freshly initialised; this needs no network.
- `hf:<hub id or local path>`: that model's config (`AutoConfig.from_pretrained`; `model_args` override
  its attributes) and, with `pretrained=True`, its weights (`AutoModelForCausalLM.from_pretrained`).
  Its vocabulary must be the job tokenizer's (`num_classes`).

Every model is wrapped in `HFCausalLM`, whose forward maps tokens (B, T) to logits (B, T, V) like the
other language models; the Hugging Face model is `.hf_model` (for `save_pretrained`). Parameters are
float32 whatever the checkpoint's dtype (mixed precision is the peer's autocast). No ray, no mlflow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from codistill.models.gpt import lm_block_size
from codistill.models.taps import Layers

__all__ = ["HFCausalLM", "check_hf_name", "hf", "hf_model"]

_POSITION_FIELDS = ("max_position_embeddings", "n_positions")


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM whose forward returns only the logits."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def distill_layers(self) -> Layers:
        """Hidden states: the input embeddings' output, then each decoder layer's (B, T, C). No attention taps:
        architectures project queries, keys and values each their own way (attention terms need `gpt` peers)."""
        hf_model: Any = self.hf_model
        text_config = hf_model.config.get_text_config()
        depth = getattr(text_config, "num_hidden_layers", None)
        names = {id(m): n for n, m in self.named_modules()}
        stacks = [
            n for n, m in self.named_modules() if isinstance(m, nn.ModuleList) and depth is not None and len(m) == depth
        ]
        embedding = hf_model.get_input_embeddings()
        if not stacks or id(embedding) not in names:
            raise ValueError(f"{type(self.hf_model).__name__}: cannot find its decoder layers for hidden-state terms")
        width = getattr(text_config, "hidden_size", None)
        hidden = (names[id(embedding)], *(f"{stacks[0]}.{i}" for i in range(depth or 0)))
        return Layers(hidden=hidden, causal=True, width=width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.hf_model(input_ids=tokens, use_cache=False, return_dict=True)  # tokens (B, T)
        return out.logits  # (B, T, V)


def _vocab_size(config: Any) -> int | None:
    return getattr(config.get_text_config(), "vocab_size", None)


def _positions(config: Any) -> tuple[str, int] | None:
    """(field, value) of the config's maximum sequence length, or None when it has no such field."""
    text = config.get_text_config()
    for field in _POSITION_FIELDS:
        value = getattr(text, field, None)
        if isinstance(value, int):
            return field, value
    return None


def _fit_positions(config: Any, block_size: int) -> None:
    """Raise the config's maximum sequence length to at least `block_size` (fresh weights only)."""
    found = _positions(config)
    if found is not None and found[1] < block_size:
        setattr(config.get_text_config(), found[0], block_size)


def _check_vocab(config: Any, num_classes: int, who: str) -> None:
    vocab = _vocab_size(config)
    if vocab != num_classes:
        raise ValueError(
            f"{who}: the model's vocabulary has {vocab} tokens but the job's tokenizer has {num_classes} "
            "(num_classes); use a tokenizer with the model's vocabulary"
        )


def _wrap(model: nn.Module, num_classes: int, who: str) -> HFCausalLM:
    _check_vocab(model.config, num_classes, who)
    return HFCausalLM(model)


def hf(input_shape: tuple[int, ...], num_classes: int, **model_args: Any) -> nn.Module:
    """`hf`: a freshly initialised causal LM of `model_args["model_type"]`, the other `model_args` its
    config's keyword arguments, with `vocab_size = num_classes` and room for `input_shape == (block_size,)`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    block_size = lm_block_size(input_shape, "hf")
    rest = dict(model_args)
    model_type = rest.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(
            "model_args: hf needs model_type, a transformers model type (llama, gpt2, mistral, qwen2, ...), "
            f"got {model_type!r}"
        )
    if "vocab_size" in rest:
        raise ValueError("model_args: hf sets vocab_size to the job tokenizer's vocabulary (num_classes); remove it")
    try:
        config = AutoConfig.for_model(model_type, vocab_size=num_classes, **rest)
    except ValueError as e:
        if "Unrecognized model identifier" in str(e):
            raise ValueError(
                f"model_args: unknown model_type {model_type!r}; allowed: a transformers model type "
                "(llama, gpt2, mistral, qwen2, ...)"
            ) from None
        raise
    _fit_positions(config, block_size)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return _wrap(model, num_classes, "hf")


def check_hf_name(name: str) -> None:
    """Any non-empty hub id or local path; nothing is looked up (configs are checked offline)."""
    if not name.strip():
        raise ValueError("a Hugging Face hub id or local path after 'hf:' (hf:<id or path>)")


def hf_model(name: str) -> Callable[..., nn.Module]:
    """`hf:<hub id or local path>`: the builder `(input_shape, num_classes, *, pretrained=False,
    **model_args)` of that model; `model_args` override attributes of its config."""

    who = f"hf:{name}"

    def build(
        input_shape: tuple[int, ...], num_classes: int, *, pretrained: bool = False, **model_args: Any
    ) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        check_hf_name(name)
        block_size = lm_block_size(input_shape, who)
        if "model_type" in model_args:
            raise ValueError(f"model_args: {who} takes its model_type from its config; remove model_type")
        config, unused = AutoConfig.from_pretrained(name, return_unused_kwargs=True, **model_args)
        if unused:
            key = sorted(unused)[0]
            raise ValueError(f"model_args: {key!r} is not an attribute of the config of {who}")
        _check_vocab(config, num_classes, who)
        if pretrained:
            found = _positions(config)
            if found is not None and found[1] < block_size:
                raise ValueError(
                    f"{who}: block_size {block_size} exceeds the pretrained model's {found[0]} ({found[1]})"
                )
            model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch.float32)
        else:
            _fit_positions(config, block_size)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return _wrap(model, num_classes, who)

    build.__name__ = build.__qualname__ = "hf_" + "".join(c if c.isalnum() else "_" for c in name)
    return build
