"""The task seam: what a batch is, which positions a loss counts, and what evaluation sends the driver.

A dataset names its task (`Dataset.task`, registry TASKS). A task turns stored rows into model inputs and
targets, says which target positions are valid, and evaluates a model *streaming*: batch by batch, keeping
per position only what the round's metrics need (top-1 id, probability of the true target, for small
label sets the top-k probabilities, and full log-probabilities on a fixed subset of at most a few hundred
positions) so no full test-set logits ever reach the driver (docs/design.md, "Evaluation").
No ray, no mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from codistill.data import Dataset
    from codistill.peer.batches import PeerData

from codistill.losses.distill import IGNORE_INDEX  # padding: no loss, no metric

__all__ = ["IGNORE_INDEX", "EvalResult", "Task", "kl_subset_size"]

KL_SUBSET_FLOATS = 1 << 18
"""Budget of the pairwise-KL subset, in floats per peer (1 MiB of float32)."""


def kl_subset_size(num_positions: int, num_classes: int) -> int:
    """Positions on which peers send full log-probabilities (pairwise KL): at most 256, at least 16,
    within KL_SUBSET_FLOATS at this vocabulary."""
    return min(num_positions, max(16, min(256, KL_SUBSET_FLOATS // num_classes)))


@dataclass
class EvalResult:
    """One peer's evaluation, in numpy (zero-copy through Ray's object store); per valid position of the
    evaluation set, in a fixed order every peer shares."""

    step: int
    loss: float  # mean cross-entropy in nats per position (example or token)
    accuracy: float  # top-1 accuracy (next-token accuracy for language models)
    count: int  # valid positions
    top1: np.ndarray  # (count,) int32
    p_true: np.ndarray  # (count,) float32: the probability given to the true target
    subset_log_probs: np.ndarray  # (M, V) float32 on the fixed subset (kl_subset_size)
    topk_ids: np.ndarray | None = None  # (count, k) int32: small label sets only (ensemble accuracy)
    topk_probs: np.ndarray | None = None  # (count, k) float32
    train: dict[str, float] = field(default_factory=dict)
    """Scores on the training rows data.train_eval picks (Task.score_training): train_set_loss, train_accuracy
    and, with noisy labels, train_accuracy_clean; empty when none are scored."""

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def nbytes(self) -> int:
        arrays = (self.top1, self.p_true, self.subset_log_probs, self.topk_ids, self.topk_probs)
        return int(sum(a.nbytes for a in arrays if a is not None))


def held_out_rows(num_rows: int, fraction: float) -> int:
    """How many of `num_rows` training rows `data.validation_fraction` holds out (0 when it is 0)."""
    if fraction <= 0:
        return 0
    return min(num_rows - 1, max(1, round(num_rows * fraction)))


class Task:
    """How one kind of data is trained and evaluated (see module docstring)."""

    name: ClassVar[str]
    topk_eval: ClassVar[int] = 0  # top-k probabilities kept per position for the ensemble's accuracy (0: none)
    holds_out_the_tail: ClassVar[bool] = False  # validation rows: the last ones (True) or a random subset
    default_train_eval: ClassVar[int] = 0  # training rows each evaluation scores when data.train_eval is null

    def input_shape(self, ds: Dataset) -> tuple[int, ...]:
        """What a model of this task is built for (`build_model`'s input_shape)."""
        raise NotImplementedError

    def prepare(self, data: PeerData, x: torch.Tensor, y: torch.Tensor, step: int | None) -> tuple[torch.Tensor, ...]:
        """Stored rows on the device -> (inputs, targets); `step` is None for evaluation (no augmentation)."""
        raise NotImplementedError

    def positions_per_row(self, ds: Dataset) -> int:
        return 1

    def validation_rows(self, num_rows: int, fraction: float, seed: int) -> torch.Tensor:
        """The training rows held out as the validation split (`data.validation_fraction`): a random subset
        from the job's seed, the same for every peer."""
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(num_rows, generator=g)[: held_out_rows(num_rows, fraction)].sort().values

    def example_input(self, ds: Dataset) -> torch.Tensor:
        """Two evaluation inputs as a model takes them (MLflow's input example and signature)."""
        raise NotImplementedError

    @staticmethod
    def valid(targets: torch.Tensor) -> torch.Tensor | None:
        """The mask of positions that count, or None when all do."""
        return None

    def evaluate(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        num_positions: int,
        step: int,
    ) -> EvalResult:
        """Stream the evaluation set through `forward` (inputs -> logits); `num_positions` is the number of
        target positions the batches hold (padding included), which fixes the KL subset for every peer."""
        loss_sum, correct, count = 0.0, 0, 0
        top1, p_true, topk_ids, topk_probs, subset = [], [], [], [], []
        seen = 0
        wanted: torch.Tensor | None = None
        for x, y in batches:
            logits = forward(x).float()
            v = logits.shape[-1]
            flat_logits = logits.reshape(-1, v)  # (N, V): every example or token is a position
            flat_y = y.reshape(-1)  # (N,)
            if wanted is None:
                m = kl_subset_size(num_positions, v)
                wanted = torch.linspace(0, num_positions - 1, m).round().long()
            in_batch = (wanted[(wanted >= seen) & (wanted < seen + len(flat_y))] - seen).to(flat_y.device)
            log_probs = F.log_softmax(flat_logits, dim=-1)  # (N, V)
            keep = flat_y != IGNORE_INDEX
            subset.append(log_probs[in_batch[keep[in_batch]]].cpu())  # padding is in no peer's subset
            seen += len(flat_y)
            log_probs, flat_y = log_probs[keep], flat_y[keep]
            lp_true = log_probs.gather(1, flat_y[:, None]).squeeze(1)  # (N,)
            pred = log_probs.argmax(-1)
            loss_sum += -lp_true.sum().item()
            correct += int((pred == flat_y).sum().item())
            count += len(flat_y)
            top1.append(pred.to(torch.int32).cpu())
            p_true.append(lp_true.exp().cpu())
            if self.topk_eval:
                k = min(self.topk_eval, v)
                values, ids = log_probs.topk(k, dim=-1)
                topk_ids.append(ids.to(torch.int32).cpu())
                topk_probs.append(values.exp().cpu())

        def cat(parts: list[torch.Tensor], empty: tuple[int, ...] = (0,)) -> np.ndarray:
            return torch.cat(parts).numpy() if parts else np.zeros(empty, dtype=np.float32)

        return EvalResult(
            step,
            loss_sum / max(1, count),
            correct / max(1, count),
            count,
            cat(top1),
            cat(p_true),
            cat(subset, (0, 0)),
            cat(topk_ids) if topk_ids else None,
            cat(topk_probs) if topk_probs else None,
        )

    @staticmethod
    def score_training(
        forward: Callable[[torch.Tensor], torch.Tensor],
        batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    ) -> dict[str, float]:
        """Loss and top-1 accuracy on training rows against the targets trained on and, where the batches carry
        them (data.label_noise), accuracy against the clean labels: a model that memorised the noise scores high
        on the first and low on the second. {} when there are no rows."""
        loss_sum, correct, correct_clean, count, has_clean = 0.0, 0, 0, 0, False
        for x, y, clean in batches:
            logits = forward(x).float()
            flat_logits, flat_y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)  # (N, V), (N,)
            keep = flat_y != IGNORE_INDEX
            log_probs, flat_y = F.log_softmax(flat_logits[keep], dim=-1), flat_y[keep]
            pred = log_probs.argmax(-1)
            loss_sum += -log_probs.gather(1, flat_y[:, None]).sum().item()
            correct += int((pred == flat_y).sum().item())
            count += len(flat_y)
            if clean is not None:
                has_clean = True
                correct_clean += int((pred == clean.reshape(-1)[keep]).sum().item())
        if count == 0:
            return {}
        out = {"train_set_loss": loss_sum / count, "train_accuracy": correct / count}
        return {**out, "train_accuracy_clean": correct_clean / count} if has_clean else out

    def headline(self, metrics: dict[str, Any]) -> str:
        """The round's progress line: what matters most for this task."""
        raise NotImplementedError

    def peer_line(self, ev: EvalResult) -> str:
        raise NotImplementedError
