"""How the driver cuts a run into rounds and assembles them from the peers' reports: plain Python, tested without
Ray."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

__all__ = ["RoundAssembler", "round_ends"]

R = TypeVar("R")  # a peer's round report (PeerReport in RayEngine)


def round_ends(total_steps: int, eval_every: int) -> list[int]:
    """The step at which each round ends (the last may be short)."""
    return [min(e, total_steps) for e in range(eval_every, total_steps + eval_every, eval_every)]


class RoundAssembler(Generic[R]):
    """Turns per-peer reports, arriving in any order, into complete rounds in order.

    `rounds_per_peer[i]` is how many rounds peer i runs (peers with a shorter shard run fewer); once a
    peer has no round r, its last report stands for it. `first_round` skips rounds an earlier driver
    finished.
    """

    def __init__(self, rounds_per_peer: Sequence[int], first_round: int = 0):
        self.rounds_per_peer = list(rounds_per_peer)
        self.num_rounds = max(self.rounds_per_peer)
        self.next_round = first_round
        self._by_round: dict[int, dict[int, R]] = {}
        self._last: dict[int, R] = {}

    def add(self, peer: int, round_index: int, report: R) -> list[tuple[int, list[R]]]:
        """Record one report; returns the rounds it completed, in order, as (round, reports by peer)."""
        self._by_round.setdefault(round_index, {})[peer] = report
        done = []
        while self.next_round < self.num_rounds:
            got = self._by_round.get(self.next_round, {})
            owed = [i for i, n in enumerate(self.rounds_per_peer) if n > self.next_round and i not in got]
            if owed:
                break
            reports = dict(self._by_round.pop(self.next_round, {}))
            for i in range(len(self.rounds_per_peer)):
                if i not in reports:
                    reports[i] = self._last[i]
            self._last.update(reports)
            done.append((self.next_round, [reports[i] for i in sorted(reports)]))
            self.next_round += 1
        return done

    @property
    def complete(self) -> bool:
        return self.next_round >= self.num_rounds
