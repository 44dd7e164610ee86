"""Board addresses beyond a rank's own slot (codistill.peer.topology.rank_slot): where influence weights go,
and which ranks' logit shards each rank of a data-parallel peer reads."""

from __future__ import annotations

from collections.abc import Sequence

from codistill.peer.topology import consumers_of, part_bounds, rank_slot

__all__ = ["influence_slot", "overlapping_ranks", "shard_consumers"]


def influence_slot(workers: Sequence[int], slot: int) -> int:
    """Where rank slot `slot` publishes its influence weights (loss.weighting influence, teacher side): after
    every rank slot, so logit shards and weights of one batch step never share an address."""
    return sum(workers) + slot


def overlapping_ranks(batch_size: int, teacher_workers: int, lo: int, hi: int) -> list[int]:
    """The teacher's ranks whose parts of the batch cover some of the examples [lo, hi)."""
    return [q for q in range(teacher_workers) if _overlap(part_bounds(batch_size, teacher_workers, q), (lo, hi))]


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def shard_consumers(workers: Sequence[int], batch_size: int, topology: str) -> dict[int, list[int]]:
    """For every rank slot, the rank slots that read its logit shards: each rank of each consumer peer
    reads the publisher's ranks whose parts overlap its own (shard by shard, never through rank 0)."""
    n = len(workers)
    out: dict[int, list[int]] = {}
    for j in range(n):
        for q in range(workers[j]):
            mine = part_bounds(batch_size, workers[j], q)
            out[rank_slot(workers, j, q)] = [
                rank_slot(workers, i, r)
                for i in consumers_of(j, n, topology)
                for r in range(workers[i])
                if _overlap(mine, part_bounds(batch_size, workers[i], r))
            ]
    return out
