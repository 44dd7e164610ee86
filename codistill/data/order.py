"""One peer's stream over a dataset: its shard, its batch order and its augmentation.

Batch order is a pure function of (order seed, step): epoch e uses randperm(n) seeded by
(seed, e). That makes resume exact and lets every peer of an exchange with a shared order draw the
same sample ids at step k without talking to each other. Augmentation randomness is seeded by
(peer seed, step). No ray, no mlflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codistill.data.dataset import Dataset, mix_seed

__all__ = ["random_crop_flip", "shard_sample_ids", "normalize"]


def normalize(ds: Dataset, x: torch.Tensor) -> torch.Tensor:
    """Raw images (N, C, H, W) of `ds` as the models see them: scaled, then standardised per channel."""
    mean = torch.tensor(ds.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, device=x.device).view(1, -1, 1, 1)
    return (x.float() * ds.scale - mean) / std


def shard_sample_ids(n: int, shard_seed: int, shard_index: int, num_shards: int) -> torch.Tensor:
    """The training-set ids of shard `shard_index` of `num_shards` (all ids when there is one shard).
    Every peer computes the same partition from the job's seed, so the shards are disjoint."""
    if num_shards <= 1:
        return torch.arange(n)
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(shard_seed, 7)))
    return ids[shard_index::num_shards].sort().values


def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """CIFAR augmentation on a batch: zero-pad by `pad`, random crop back, random horizontal flip.
    Random numbers come from CPU generator `g` so the result does not depend on the device."""
    b, c, h, w = x.shape
    di = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
    dj = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
    flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = di[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dj[:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
