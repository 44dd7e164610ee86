"""Evaluation metrics: a round's ensemble-level numbers from the peers' streamed evaluations
(`eval_round_metrics`, what the engines use), and the same quantities over whole logit tensors (the
reference the streamed ones are tested against).

Definitions (docs/design.md, "Evaluation"), per valid position (example or token) of the evaluation set:
- peer loss: mean -log p(true); perplexity exp(loss); accuracy: top-1 == true.
- ensemble loss: mean -log((1/N) sum_i p_i(true)): exact from each peer's probability of the true target.
- ensemble accuracy (classification): top-1 of the mean probabilities, from each peer's top-10
  probabilities (exact for up to 10 classes; a class outside a peer's top-10 counts as 0 for it).
- churn (Anil et al., ICLR 2018, sec. 4): the share of positions where two peers' top-1 differ, averaged
  over pairs.
- pairwise KL: mean over ordered pairs (i, j) of KL(p_i || p_j), on a fixed, evenly spaced subset of
  positions (`codistill.tasks.kl_subset_size`).
This module imports neither ray nor mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations, permutations
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from codistill.data.dataset import as_tensor

if TYPE_CHECKING:
    from codistill.tasks import EvalResult

__all__ = [
    "accuracy",
    "churn",
    "ensemble_accuracy",
    "eval_round_metrics",
    "mean_pairwise_churn",
    "mean_pairwise_kl",
]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def ensemble_accuracy(all_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> float:
    """Accuracy of the mean of the peers' probabilities."""
    probs = torch.stack([F.softmax(x.float(), -1) for x in all_logits]).mean(0)
    return accuracy(probs, labels)


def churn(a_logits: torch.Tensor, b_logits: torch.Tensor) -> float:
    return (a_logits.argmax(-1) != b_logits.argmax(-1)).float().mean().item()


def mean_pairwise_churn(all_logits: Sequence[torch.Tensor]) -> float:
    pairs = list(combinations(range(len(all_logits)), 2))
    return sum(churn(all_logits[i], all_logits[j]) for i, j in pairs) / len(pairs) if pairs else 0.0


def mean_pairwise_kl(all_logits: Sequence[torch.Tensor]) -> float:
    """Mean over ordered pairs (i, j), i != j, of batch-mean KL(p_i || p_j) at temperature 1."""
    logp = [F.log_softmax(x.float(), -1) for x in all_logits]
    pairs = list(permutations(range(len(all_logits)), 2))
    if not pairs:
        return 0.0
    return sum((logp[i].exp() * (logp[i] - logp[j])).sum(-1).mean().item() for i, j in pairs) / len(pairs)


def eval_round_metrics(
    evals: Sequence[EvalResult], num_classes: int, labels: torch.Tensor | None = None
) -> dict[str, float]:
    """A round's ensemble-level numbers from streamed evaluations (module docstring); `labels` (the
    evaluation set's targets, classification only) give the ensemble's accuracy."""
    n = len(evals)
    p_true = np.mean([e.p_true.astype(np.float64) for e in evals], axis=0)
    out = {
        "ensemble_loss": float(-np.log(np.maximum(p_true, 1e-30)).mean()) if len(p_true) else math.nan,
        "mean_peer_loss": sum(e.loss for e in evals) / n,
        "mean_peer_accuracy": sum(e.accuracy for e in evals) / n,
    }
    pairs = list(combinations(range(n), 2))
    out["churn"] = sum(float((evals[i].top1 != evals[j].top1).mean()) for i, j in pairs) / len(pairs) if pairs else 0.0
    subsets = [as_tensor(e.subset_log_probs) for e in evals]  # read-only arrays out of Ray's object store
    # log-probabilities are their own normalised logits: the whole-tensor definition applies as it is
    out["mean_pairwise_kl"] = mean_pairwise_kl(subsets) if len(subsets[0]) else 0.0
    if labels is not None and all(e.topk_ids is not None and e.topk_probs is not None for e in evals):
        mean_probs = torch.zeros(len(labels), num_classes, dtype=torch.float64)
        for e in evals:
            assert e.topk_ids is not None and e.topk_probs is not None
            mean_probs.scatter_add_(1, as_tensor(e.topk_ids).long(), as_tensor(e.topk_probs).double())
        out["ensemble_accuracy"] = accuracy(mean_probs, labels.cpu())
    return out
