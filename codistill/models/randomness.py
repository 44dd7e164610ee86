"""Whether a model's training forward draws random numbers: a model that does not needs no seeded
generator state around each step (Peer skips the save, seed and restore of torch's global generator)."""

from __future__ import annotations

from torch import nn

__all__ = ["draws_random_numbers"]

RANDOM_MODULES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd, nn.RReLU)


def draws_random_numbers(model: nn.Module) -> bool:
    """True when a train-mode forward may draw from torch's global generator: a dropout (p > 0) or RReLU
    anywhere, or a module whose forward we cannot vouch for (a class outside torch.nn that does not say
    `draws_random_numbers`: a user's or torchvision's model counts as random, which only costs time)."""
    for m in model.modules():
        if isinstance(m, RANDOM_MODULES):
            if getattr(m, "p", 1.0) > 0:  # RReLU has no p: always random
                return True
            continue
        said = getattr(m, "draws_random_numbers", None)
        if said is not None:
            if said:
                return True
            continue
        if not type(m).__module__.startswith("torch.nn."):
            return True
    return False
