"""Evaluation metrics over the peers' test-set logits: accuracy, ensemble accuracy, churn, pairwise KL.

Churn (Anil et al., ICLR 2018, sec. 4): the fraction of examples on which two models' top-1
predictions differ. This module imports neither ray nor mlflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations, permutations

import torch
import torch.nn.functional as F

__all__ = ["accuracy", "churn", "ensemble_accuracy", "mean_pairwise_churn", "mean_pairwise_kl", "round_metrics"]


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


def round_metrics(all_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """The ensemble-level numbers reported after each round."""
    return {
        "ensemble_accuracy": ensemble_accuracy(all_logits, labels),
        "churn": mean_pairwise_churn(all_logits),
        "mean_pairwise_kl": mean_pairwise_kl(all_logits),
        "mean_peer_accuracy": sum(accuracy(x, labels) for x in all_logits) / len(all_logits),
    }
