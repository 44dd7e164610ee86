"""Who learns from whom (`exchange.topology`): registry TOPOLOGIES of `(index, num_peers) -> teachers`."""

from __future__ import annotations

from collections.abc import Callable

from codistill.registry import Registry

__all__ = ["TOPOLOGIES", "consumers_of", "teachers_of"]


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
