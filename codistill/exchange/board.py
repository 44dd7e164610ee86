"""Boards: where teacher signals wait between their publisher and their consumers.

`BoardState` is all of a board's bookkeeping, with no locks and no I/O: which logit shards are held
and who took them, how far each peer's training is durable (a shard may go only when no consumer
can be sent back before it by a restart), which weight versions are kept, which is newest, which
publishers have finished. `InMemoryBoard` (one process: LocalEngine, tests) wraps it in a
condition variable; `codistill.exchange.ray_board` wraps the same state in an async Ray actor.
Entries are opaque to the state: shards and weights here, object references on Ray.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from codistill.exchange.wire import LogitShard, WireWeights

__all__ = ["Board", "BoardState", "InMemoryBoard", "TeacherUnavailable"]

E = TypeVar("E")  # what the board holds per shard or version


class TeacherUnavailable(RuntimeError):
    """A teacher's shard or checkpoint did not arrive within `exchange.timeout_s`."""


class BoardState(Generic[E]):
    """Bookkeeping of one board (see module docstring)."""

    def __init__(self, consumers: Mapping[int, list[int]], versions_kept: int):
        self.consumers = {j: list(c) for j, c in consumers.items()}
        self.versions_kept = versions_kept
        self.logits: dict[tuple[int, int], E] = {}  # (publisher, batch step) -> entry
        self.taken: dict[tuple[int, int], set[int]] = {}
        self.durable = {j: 0 for j in consumers}
        self.weights: dict[int, dict[int, E]] = {j: {} for j in consumers}  # publisher -> version -> entry
        self.finished: set[int] = set()
        self.passed: dict[int, int] = {}  # after a rebuild: the step each consumer had reached

    def restore_progress(self, peer: int, step: int) -> None:
        """After the board lost its state: `peer` is at `step`, so it took every shard before it (its
        takes were lost with the old board)."""
        self.passed[peer] = max(self.passed.get(peer, 0), step)
        self.collect()

    # -- logit shards --------------------------------------------------------------------------
    def put_logits(self, publisher: int, batch_step: int, entry: E) -> None:
        self.logits[(publisher, batch_step)] = entry

    def missing_logits(self, publishers: list[int], batch_step: int) -> list[int]:
        return [j for j in publishers if (j, batch_step) not in self.logits]

    def take_logits(self, publishers: list[int], batch_step: int, consumer: int) -> list[E]:
        """The entries (all present) in the order asked; marks them taken by `consumer`."""
        keys = [(j, batch_step) for j in publishers]
        entries = [self.logits[k] for k in keys]
        for k in keys:
            self.taken.setdefault(k, set()).add(consumer)
        self.collect()
        return entries

    def drop_logits(self, publisher: int, batch_step: int) -> None:
        """A consumer found this shard lost (its publisher died): forget it until it is published again."""
        self.logits.pop((publisher, batch_step), None)

    def mark_durable(self, peer: int, step: int) -> None:
        """`peer` saved a training checkpoint at `step`: it will never ask for shards before it again."""
        self.durable[peer] = max(self.durable[peer], step)
        self.collect()

    def collect(self) -> None:
        """Drop shards every consumer took and none can be sent back before by a restart (each
        consumer's last durable checkpoint is past the shard's step)."""
        for j, step in list(self.logits):
            consumers = self.consumers[j]
            taken = self.taken.get((j, step), set()) | {c for c in consumers if self.passed.get(c, -1) > step}
            if set(consumers) <= taken and all(self.durable[c] > step for c in consumers):
                del self.logits[(j, step)]
                self.taken.pop((j, step), None)

    # -- weight versions -----------------------------------------------------------------------
    def put_weights(self, publisher: int, version: int, entry: E) -> list[E]:
        """Keep `entry` as `version`; returns the entries dropped (the oldest beyond versions_kept)."""
        versions = self.weights[publisher]
        versions[version] = entry
        return [versions.pop(v) for v in sorted(versions)[: -self.versions_kept]]

    def newest_version(self, publisher: int) -> int:
        versions = self.weights[publisher]
        return max(versions) if versions else -1

    def newest_versions(self) -> dict[int, int]:
        return {j: max(v) for j, v in self.weights.items() if v}

    def mark_finished(self, publisher: int) -> None:
        """`publisher` trained its last step: it publishes nothing more, so nobody waits for it."""
        self.finished.add(publisher)

    def weights_ready(self, need: Mapping[int, int], exact: bool) -> bool:
        """Whether every publisher j in `need` has version need[j] (exact) or one at least as new,
        or has finished (then its newest is all there will be)."""
        for j, version in need.items():
            if j in self.finished:
                continue
            have = version in self.weights[j] if exact else self.newest_version(j) >= version
            if not have:
                return False
        return True

    def missing_weights(self, need: Mapping[int, int], exact: bool) -> list[int]:
        return [j for j, v in need.items() if not self.weights_ready({j: v}, exact)]

    def pick_weights(self, known: Mapping[int, int], need: Mapping[int, int], exact: bool) -> dict[int, tuple[int, E]]:
        """What to hand a consumer that holds `known[j]` of each teacher: for j in `need` under the exact
        schedule, version need[j] (else the newest); otherwise the newest. Only versions it lacks."""
        out: dict[int, tuple[int, E]] = {}
        for j in {*known, *need}:
            versions = self.weights[j]
            if not versions:
                continue
            version = need[j] if exact and j in need and need[j] in versions else max(versions)
            have = known.get(j, -1)
            if version != have and ((exact and j in need) or version > have):
                out[j] = (version, versions[version])
        return out

    def stats(self) -> dict[str, int]:
        return {
            "logit_shards_held": len(self.logits),
            "weight_versions_held": sum(len(v) for v in self.weights.values()),
        }


class Board(ABC):
    """Transport of teacher signals, as an exchange sees it."""

    @abstractmethod
    def publish_logits(self, publisher: int, shard: LogitShard) -> None: ...

    @abstractmethod
    def fetch_logits(self, publishers: list[int], batch_step: int, consumer: int, timeout_s: float) -> list[LogitShard]:
        """The shards of `publishers` for `batch_step` (one request for all of a consumer's teachers),
        waiting up to timeout_s for all of them (TeacherUnavailable after)."""

    @abstractmethod
    def publish_weights(self, publisher: int, weights: WireWeights) -> None: ...

    @abstractmethod
    def pull_weights(
        self, consumer: int, known: Mapping[int, int], need: Mapping[int, int], exact: bool, timeout_s: float
    ) -> dict[int, WireWeights]:
        """Teachers' versions the consumer lacks (see BoardState.pick_weights), waiting up to timeout_s
        until every publisher in `need` has what is needed (TeacherUnavailable after). With an empty
        `need` it never waits."""

    def flush(self) -> None:
        """Send what is held back to ride on the next request (the end of every step calls it)."""

    def mark_durable(self, peer: int, step: int) -> None:
        """`peer` saved a training checkpoint at `step`."""

    def mark_finished(self, peer: int) -> None:
        """`peer` trained its last step."""


class InMemoryBoard(Board):
    """A board in one process (LocalEngine, tests): BoardState under a condition variable."""

    def __init__(self, state: BoardState[Any]):
        self.state = state
        self._cv = threading.Condition()

    def publish_logits(self, publisher: int, shard: LogitShard) -> None:
        with self._cv:
            self.state.put_logits(publisher, shard.batch_step, shard)
            self._cv.notify_all()

    def fetch_logits(self, publishers: list[int], batch_step: int, consumer: int, timeout_s: float) -> list[LogitShard]:
        with self._cv:
            if not self._cv.wait_for(lambda: not self.state.missing_logits(publishers, batch_step), timeout=timeout_s):
                missing = self.state.missing_logits(publishers, batch_step)
                raise TeacherUnavailable(f"no logits from peer(s) {missing} for step {batch_step} after {timeout_s}s")
            return self.state.take_logits(publishers, batch_step, consumer)

    def mark_durable(self, peer: int, step: int) -> None:
        with self._cv:
            self.state.mark_durable(peer, step)

    def mark_finished(self, peer: int) -> None:
        with self._cv:
            self.state.mark_finished(peer)
            self._cv.notify_all()

    def publish_weights(self, publisher: int, weights: WireWeights) -> None:
        with self._cv:
            self.state.put_weights(publisher, weights.version, weights)
            self._cv.notify_all()

    def pull_weights(
        self, consumer: int, known: Mapping[int, int], need: Mapping[int, int], exact: bool, timeout_s: float
    ) -> dict[int, WireWeights]:
        with self._cv:
            if not self._cv.wait_for(lambda: self.state.weights_ready(need, exact), timeout=timeout_s):
                missing = {j: need[j] for j in self.state.missing_weights(need, exact)}
                raise TeacherUnavailable(f"no checkpoint of peer(s) {missing} (peer: version) after {timeout_s}s")
            return {j: w for j, (_version, w) in self.state.pick_weights(known, need, exact).items()}
