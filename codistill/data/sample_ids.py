"""Sample-id maps computed on demand: a peer's shard, validation split and epoch order over a prepared data set
of any size, in O(1) memory.

The in-memory path keeps its id lists (`torch.randperm`: its results must not change). A prepared data set
can hold billions of windows, where one id list per peer would cost gigabytes, so its maps compose
`LazyPermutation`s instead: each is a pure function of the job's seeds, so every property of the id lists
holds at any size (lockstep peers draw the same ids at step k, disjoint shards stay disjoint, resume is
exact, paired seeds stay paired). No ray, no mlflow.
"""

from __future__ import annotations

import torch

from codistill.data.dataset import mix_seed
from codistill.data.permutation import LazyPermutation

__all__ = ["IdMap", "lazy_pool_and_validation", "lazy_shard"]


class IdMap:
    """Positions [0, len) -> sample ids: `ids = base[perm(offset + stride * k)]` style compositions."""

    def __init__(
        self,
        length: int,
        *,
        start: int = 0,
        stride: int = 1,
        perm: LazyPermutation | None = None,
        base: IdMap | None = None,
    ):
        self.length, self.start, self.stride, self.perm, self.base = length, start, stride, perm, base

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, positions: torch.Tensor) -> torch.Tensor:
        k = torch.as_tensor(positions, dtype=torch.int64)
        if k.numel() and (int(k.min()) < 0 or int(k.max()) >= self.length):
            raise IndexError(f"positions outside [0, {self.length})")
        inner = self.start + self.stride * k
        if self.perm is not None:
            inner = self.perm(inner)
        return inner if self.base is None else self.base[inner]


def lazy_pool_and_validation(n: int, held_out: int, seed: int, tail: bool) -> tuple[IdMap, IdMap]:
    """(the training pool, the validation split) of n rows with `held_out` rows held out: the last rows when
    `tail` (consecutive text windows, as the causal LM task holds out), else a random subset from `seed`."""
    if tail or held_out == 0:
        return IdMap(n - held_out), IdMap(held_out, start=n - held_out)
    perm = LazyPermutation(n, mix_seed(seed, 11))
    return IdMap(n - held_out, start=held_out, perm=perm), IdMap(held_out, perm=perm)


def lazy_shard(pool: IdMap, shard_seed: int, shard_index: int, num_shards: int) -> IdMap:
    """Shard `shard_index` of `num_shards` of `pool`: every num_shards-th position of a permutation seeded by the
    job's seed, so the shards are disjoint and cover the pool (all of it when there is one shard)."""
    if num_shards <= 1:
        return pool
    n = len(pool)
    perm = LazyPermutation(n, mix_seed(shard_seed, 7))
    size = len(range(shard_index, n, num_shards))
    return IdMap(size, start=shard_index, stride=num_shards, perm=perm, base=pool)
