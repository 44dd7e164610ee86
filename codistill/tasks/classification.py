"""Classification: one label per example (images). Inputs are normalised (and augmented in training)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from codistill.tasks.base import EvalResult, Task

if TYPE_CHECKING:
    from codistill.data import Dataset
    from codistill.peer.batches import PeerData

__all__ = ["Classification"]


class Classification(Task):
    name = "classification"
    topk_eval = 10  # the ensemble's accuracy is exact whenever the classes are at most 10
    default_train_eval = 512  # training accuracy at every evaluation (memorisation, label noise): cheap for images

    def input_shape(self, ds: Dataset) -> tuple[int, ...]:
        return tuple(ds.train_x.shape[1:])

    def prepare(self, data: PeerData, x: torch.Tensor, y: torch.Tensor, step: int | None) -> tuple[torch.Tensor, ...]:
        from codistill.data import mix_seed, random_crop_flip

        x = data.normalize(x)
        if step is not None and data.augment:
            x = random_crop_flip(x, torch.Generator().manual_seed(mix_seed(data.aug_seed, step)))
        return x, y

    def example_input(self, ds: Dataset) -> torch.Tensor:
        from codistill.data.order import normalize

        return normalize(ds, ds.test_x[:2])

    def headline(self, metrics: dict[str, Any]) -> str:
        return (
            f"ensemble acc {metrics['ensemble_accuracy']:.4f}  churn {metrics['churn']:.4f}  "
            f"pairwise KL {metrics['mean_pairwise_kl']:.4f}"
        )

    def peer_line(self, ev: EvalResult) -> str:
        return f"test acc {ev.accuracy:.4f}"
