"""A GPT-style decoder-only causal language model in plain PyTorch (Radford et al. 2019, "Language
Models are Unsupervised Multitask Learners"; the layout follows Karpathy's nanoGPT).

Token and learned position embeddings, `n_layer` pre-LayerNorm blocks (causal self-attention through
`F.scaled_dot_product_attention`, then a 4x GELU MLP), a final LayerNorm and an LM head tied to the
token embedding. Initialisation as GPT-2: normal(0, 0.02), the residual projections scaled by
1/sqrt(2 * n_layer).

A builder is `(input_shape, num_classes, **model_args) -> nn.Module` with `input_shape == (block_size,)`
and `num_classes == vocab_size`; `model_args` override the preset's sizes (`GPT_ARGS`). The registry is
`codistill.models.MODELS`. No ray, no mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from codistill.models.taps import Layers

__all__ = ["GPT", "GPT_ARGS", "GPT_PRESETS", "gpt_builder", "lm_block_size"]

GPT_ARGS = ("n_layer", "n_head", "n_embd", "dropout", "bias")
"""The `model_args` a GPT builder accepts."""

GPT_PRESETS: dict[str, dict[str, Any]] = {
    "gpt-tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64},
    "gpt-small": {"n_layer": 4, "n_head": 4, "n_embd": 128},
    "gpt-medium": {"n_layer": 6, "n_head": 6, "n_embd": 384},
}


class _CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)  # residual projection
        self.resid_drop = nn.Dropout(dropout)

    @property
    def draws_random_numbers(self) -> bool:  # attention dropout inside scaled_dot_product_attention
        return self.dropout > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q, k, v = self.qkv(x).split(c, dim=2)  # 3 x (B, T, C)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, H, T, C/H)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # (B, T, C)
        return self.resid_drop(self.proj(y))  # (B, T, C)


class _MLP(nn.Module):
    draws_random_numbers = False  # its forward is its layers' (codistill.models.randomness)

    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)  # residual projection
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class _Block(nn.Module):
    draws_random_numbers = False  # its forward is its layers' (codistill.models.randomness)

    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = _CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = _MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))  # (B, T, C)
        return x + self.mlp(self.ln2(x))  # (B, T, C)


class GPT(nn.Module):
    """Decoder-only causal LM: `forward(tokens)` maps int64 (B, T), T <= block_size, to logits (B, T, V)."""

    draws_random_numbers = False  # its forward is its layers' (codistill.models.randomness)

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPT: {name} must be a positive integer, got {value!r}")
        if not isinstance(n_head, int) or not isinstance(n_embd, int) or n_head < 1 or n_embd < 1:
            raise ValueError(
                f"GPT: n_head and n_embd must be positive integers, got n_head={n_head!r}, n_embd={n_embd!r}"
            )
        if n_embd % n_head != 0:
            raise ValueError(f"GPT: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GPT: dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying (Press & Wolf 2017), as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections (attn.proj, mlp.proj), GPT-2 scaling
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def distill_layers(self) -> Layers:
        """Hidden states: the embedding (after dropout), then each block's output, (B, T, C); attention: each
        block's fused q|k|v projection (B, T, 3C) (codistill.models.taps)."""
        n = len(self.blocks)
        return Layers(
            hidden=("drop", *(f"blocks.{i}" for i in range(n))),
            attention=tuple(f"blocks.{i}.attn.qkv" for i in range(n)),
            heads=tuple(int(b.attn.n_head) for b in self.blocks),  # type: ignore[union-attr, arg-type]
            causal=True,
        )

    def shard_units(self) -> list[nn.Module]:
        """FSDP units (codistill.models.units): the blocks; the tied embedding and head stay in the root."""
        return list(self.blocks)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, t = tokens.shape  # (B, T)
        if t > self.block_size:
            raise ValueError(f"GPT: sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=tokens.device)  # (T,)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.head(self.ln_f(x))  # (B, T, V)


def lm_block_size(input_shape: tuple[int, ...], who: str) -> int:
    """The block size of a language model's `input_shape == (block_size,)`; ValueError otherwise."""
    if len(input_shape) != 1 or not isinstance(input_shape[0], int) or input_shape[0] < 1:
        raise ValueError(f"{who}: a language model needs input_shape (block_size,), got {tuple(input_shape)}")
    return input_shape[0]


def gpt_builder(preset: str, name: str | None = None) -> Callable[..., nn.Module]:
    """The builder `(input_shape, num_classes, **model_args) -> GPT` of a preset of `GPT_PRESETS`
    (`name`, the registry name used in error messages, defaults to the preset's)."""
    sizes = GPT_PRESETS[preset]
    name = name or preset

    def build(input_shape: tuple[int, ...], num_classes: int, **model_args: Any) -> nn.Module:
        unknown = sorted(set(model_args) - set(GPT_ARGS))
        if unknown:
            raise ValueError(f"model_args: unknown key {unknown[0]!r} for {name}; allowed: {', '.join(GPT_ARGS)}")
        return GPT(num_classes, lm_block_size(input_shape, name), **{**sizes, **model_args})

    build.__name__ = build.__qualname__ = name.replace("-", "_")
    build.__doc__ = f"GPT {preset} ({sizes}); model_args override {', '.join(GPT_ARGS)}."
    return build
