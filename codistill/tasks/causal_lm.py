"""Causal language modelling: a row is a window of block_size + 1 token ids; the model reads the first
block_size and predicts each next token. Losses and metrics count tokens (positions), not windows. A dataset
whose targets are (N, block_size) labels (a chat corpus, codistill.data.chat) gives them instead of the shifted
window, IGNORE_INDEX (-100) where no loss or metric counts (prompts, padding)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from codistill.tasks.base import IGNORE_INDEX, EvalResult, Task

if TYPE_CHECKING:
    from codistill.data import Dataset
    from codistill.peer.batches import PeerData

__all__ = ["CausalLM"]


class CausalLM(Task):
    name = "causal_lm"
    holds_out_the_tail = True

    def input_shape(self, ds: Dataset) -> tuple[int, ...]:
        return (int(ds.train_x.shape[1]) - 1,)  # (block_size,)

    def prepare(self, data: PeerData, x: torch.Tensor, y: torch.Tensor, step: int | None) -> tuple[torch.Tensor, ...]:
        if y.ndim == 2:  # (B, T) labels of their own (a chat corpus): IGNORE_INDEX where no loss counts
            return x[:, :-1], y
        return x[:, :-1], x[:, 1:]  # (B, T) inputs, (B, T) next tokens: the window shifted by one (y is zeros)

    def validation_rows(self, num_rows: int, fraction: float, seed: int) -> torch.Tensor:
        """The last windows of the training text: windows are consecutive, so a random subset would share
        text with its neighbours in training; a contiguous tail shares one token."""
        from codistill.tasks.base import held_out_rows

        return torch.arange(num_rows - held_out_rows(num_rows, fraction), num_rows)

    def positions_per_row(self, ds: Dataset) -> int:
        return int(ds.train_x.shape[1]) - 1

    def example_input(self, ds: Dataset) -> torch.Tensor:
        return ds.test_x[:2, :-1].contiguous()  # (2, block_size) token ids

    @staticmethod
    def valid(targets: torch.Tensor) -> torch.Tensor | None:
        return targets != IGNORE_INDEX

    def headline(self, metrics: dict[str, Any]) -> str:
        return (
            f"ensemble loss {metrics['ensemble_loss']:.4f} nats/token  mean peer loss {metrics['mean_peer_loss']:.4f}  "
            f"churn {metrics['churn']:.4f}  pairwise KL {metrics['mean_pairwise_kl']:.4f}"
        )

    def peer_line(self, ev: EvalResult) -> str:
        return f"val loss {ev.loss:.4f} (ppl {ev.perplexity:.2f})  next-token acc {ev.accuracy:.4f}"
