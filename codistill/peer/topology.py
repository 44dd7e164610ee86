"""Who learns from whom (`exchange.topology`): registry TOPOLOGIES of `(index, num_peers) -> teachers`; and,
for data-parallel peers, the board address (*slot*) of each rank and the part of the batch each rank trains on.
Below the exchange: a peer plans its loss terms from its teachers and consumers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from codistill.registry import Registry

__all__ = ["TOPOLOGIES", "consumers_of", "part_bounds", "rank_slot", "teachers_of"]


def _all_others(index: int, num_peers: int) -> list[int]:
    """Every other peer (DML's form; Anil's teacher is the mean of all others)."""
    return [j for j in range(num_peers) if j != index]


def _ring_predecessor(index: int, num_peers: int) -> list[int]:
    """One neighbour: traffic and teacher memory per peer stay constant as peers are added."""
    return [(index - 1) % num_peers]


TOPOLOGIES: Registry[Callable[[int, int], list[int]]] = Registry(
    "topology", {"all": _all_others, "ring": _ring_predecessor}
)


def teachers_of(index: int, num_peers: int, topology: str) -> list[int]:
    """Whom peer `index` learns from."""
    if num_peers < 2:
        return []
    return TOPOLOGIES[topology](index, num_peers)


def consumers_of(index: int, num_peers: int, topology: str) -> list[int]:
    """Who learns from peer `index`."""
    return [i for i in range(num_peers) if index in teachers_of(i, num_peers, topology)]


# -- data-parallel peers: one board slot per rank ---------------------------------------------------


def rank_slot(workers: Sequence[int], peer: int, rank: int) -> int:
    """The board address of rank `rank` of peer `peer` (`workers[i]`: peer i's ranks). Rank 0 of peer i is i,
    so a job of one-worker peers addresses peers as before; further ranks are numbered after all peers."""
    if not 0 <= rank < workers[peer]:
        raise ValueError(f"peer {peer} has {workers[peer]} worker(s); no rank {rank}")
    return peer if rank == 0 else len(workers) + sum(w - 1 for w in workers[:peer]) + rank - 1


def part_bounds(batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """[lo, hi): the examples of the global batch that rank `rank` of `world_size` trains on (contiguous)."""
    part = batch_size // world_size
    return rank * part, (rank + 1) * part
