"""The board of RayEngine: `BoardState` in a named async Ray actor, and the client a peer uses.

The actor holds references to published objects, not their bytes (async: a wait costs nothing).
Logit shards are `ray.put` by their publisher and survive while it lives; a shard lost with its
publisher is published again by the restarted peer. Shards of at most `exchange.inline_max_bytes`
(64 x 100 float32 logits is 26 KB) are held by value: a `ray.put` and an owner lookup per pull would
double a lockstep step's exchange latency for a few KB. Checkpoints must outlive their publisher,
so the board *pulls* them: the peer announces a version and the board calls
`peer.take_weights(version)`; an actor method's return value is owned by its caller, so the
object stays usable after the peer dies (Ray 2.56 removed `ray.put(_owner=...)`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray

from codistill.config import build
from codistill.exchange import new_board_state
from codistill.exchange.board import Board, TeacherUnavailable
from codistill.exchange.wire import LogitShard, WireWeights

__all__ = ["RayBoardActor", "RayBoardClient"]


class RayBoardActor:
    """A job's board as a named async actor (see module docstring)."""

    def __init__(self, cfg_dict: dict, peer_names: list[str], namespace: str | None):
        self.state = new_board_state(build(cfg_dict))
        self._peer_names = peer_names
        self._namespace = namespace
        self._handles: dict[int, Any] = {}
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except asyncio.TimeoutError:
                return predicate()
        return True

    # -- logits --
    def publish_logits(self, publisher: int, batch_step: int, entry: list | LogitShard) -> None:
        """`entry`: `[ref]` (a reference in a list, so Ray passes it through unresolved) or, for a shard
        of at most `exchange.inline_max_bytes`, the small shard itself."""
        self.state.put_logits(publisher, batch_step, entry)
        self._notify()

    async def fetch_logits(self, publishers: list[int], batch_step: int, consumer: int, timeout_s: float) -> Any:
        """The entries of all `publishers` for `batch_step` at once, or {"missing": [...]} after timeout_s."""
        if not await self._wait_until(lambda: not self.state.missing_logits(publishers, batch_step), timeout_s):
            return {"missing": self.state.missing_logits(publishers, batch_step)}
        return self.state.take_logits(publishers, batch_step, consumer)

    def drop_logits(self, publisher: int, batch_step: int) -> None:
        self.state.drop_logits(publisher, batch_step)

    def mark_durable(self, peer: int, step: int) -> None:
        self.state.mark_durable(peer, step)

    def mark_finished(self, peer: int) -> None:
        self.state.mark_finished(peer)
        self._notify()

    # -- weights --
    def offer_weights(self, publisher: int, version: int) -> None:
        if publisher not in self._handles:
            self._handles[publisher] = ray.get_actor(self._peer_names[publisher], namespace=self._namespace)
        take = self._handles[publisher].take_weights.options(concurrency_group="exchange")
        self.state.put_weights(publisher, version, take.remote(version))
        self._notify()

    def versions(self) -> dict[int, int]:
        return self.state.newest_versions()

    async def pull_weights(self, known: dict[int, int], need: dict[int, int], exact: bool, timeout_s: float) -> Any:
        """{publisher: (version, [ref])} once `need` is met, or {"missing": {publisher: version}} after timeout_s."""
        if not await self._wait_until(lambda: self.state.weights_ready(need, exact), timeout_s):
            return {"missing": {j: need[j] for j in self.state.missing_weights(need, exact)}}
        return {j: (version, [ref]) for j, (version, ref) in self.state.pick_weights(known, need, exact).items()}

    # -- events --
    def note_restart(self, peer: int) -> int:
        return self.state.note_restart(peer)

    def stats(self) -> dict[str, int]:
        return self.state.stats()


class RayBoardClient(Board):
    """The Board interface over a RayBoardActor, used inside a peer actor."""

    def __init__(self, handle: Any, index: int, inline_max_bytes: int = 0):
        self.handle = handle
        self.index = index
        self.inline_max_bytes = inline_max_bytes
        self._keep: dict[tuple[int, int], Any] = {}  # our own published shards stay alive while referenced
        self._versions_ref: Any = None
        self.outbox: dict[int, WireWeights] = {}
        self._outbox_lock = threading.Lock()  # the training thread adds, the "exchange" thread takes

    def publish_logits(self, publisher: int, shard: LogitShard) -> None:
        if shard.nbytes <= self.inline_max_bytes:
            # Small: by value. A `ray.put` plus a reference resolved through its owner costs two more
            # round trips per step, which is most of a lockstep step's exchange time for small models.
            self.handle.publish_logits.remote(publisher, shard.batch_step, shard)
            return
        ref = ray.put(shard)
        self._keep[(publisher, shard.batch_step)] = ref
        for key in [k for k in self._keep if k[1] < shard.batch_step - 64]:  # the board holds what consumers need
            del self._keep[key]
        self.handle.publish_logits.remote(publisher, shard.batch_step, [ref])

    def fetch_logits(self, publishers: list[int], batch_step: int, consumer: int, timeout_s: float) -> list[LogitShard]:
        deadline = time.monotonic() + timeout_s
        got: dict[int, LogitShard] = {}
        pending = list(publishers)
        while pending:  # one board request for all teachers; again only for shards lost with their publisher
            left = deadline - time.monotonic()
            found = ray.get(self.handle.fetch_logits.remote(pending, batch_step, consumer, max(left, 0.0)))
            if isinstance(found, dict):
                raise TeacherUnavailable(
                    f"peer {consumer}: no logits from peer(s) {found['missing']} for step {batch_step} "
                    f"after {timeout_s}s (exchange.timeout_s)"
                )
            lost = []
            for j, entry in zip(pending, found):
                if isinstance(entry, LogitShard):
                    got[j] = entry
                    continue
                try:
                    got[j] = ray.get(entry[0])
                except ray.exceptions.ObjectLostError:  # publisher died: its restart publishes this step again
                    self.handle.drop_logits.remote(j, batch_step)
                    lost.append(j)
            pending = lost
            if lost:
                time.sleep(0.05)
        return [got[j] for j in publishers]

    def publish_weights(self, publisher: int, weights: WireWeights) -> None:
        # Keep it in the outbox and announce it; the board takes it with peer.take_weights(version),
        # so the board owns the object and it outlives this peer.
        with self._outbox_lock:
            self.outbox[weights.version] = weights
            for v in sorted(self.outbox)[:-3]:  # untaken versions the board has not asked for yet
                del self.outbox[v]
        self.handle.offer_weights.remote(publisher, weights.version)

    def take_weights(self, version: int) -> WireWeights | None:
        # The board takes versions in order (one caller, one thread): once it has taken this one, older
        # ones are never asked for again. Dropping them now lets the allocator reuse their memory for
        # the next snapshot instead of faulting in fresh pages (the returned object stays alive until
        # Ray has serialized it).
        with self._outbox_lock:
            for v in [v for v in self.outbox if v < version]:
                del self.outbox[v]
            return self.outbox.pop(version, None)

    def _news(self, known: Mapping[int, int]) -> bool:
        """Whether the board has a version newer than `known` (one versions() request stays in flight and
        is read once it is ready: never waits)."""
        if self._versions_ref is None:
            self._versions_ref = self.handle.versions.remote()
        ready, _ = ray.wait([self._versions_ref], timeout=0)
        if not ready:
            return False
        versions = ray.get(self._versions_ref)
        self._versions_ref = self.handle.versions.remote()
        return any(versions.get(j, -1) > have for j, have in known.items())

    def pull_weights(
        self, consumer: int, known: Mapping[int, int], need: Mapping[int, int], exact: bool, timeout_s: float
    ) -> dict[int, WireWeights]:
        if not need and not self._news(known):
            return {}
        found = ray.get(self.handle.pull_weights.remote(dict(known), dict(need), exact, timeout_s))
        if "missing" in found:
            raise TeacherUnavailable(
                f"peer {consumer}: no checkpoint of peer(s) {found['missing']} (peer: version) after {timeout_s}s "
                f"(exchange.timeout_s)"
            )
        out = {}
        for j, (_version, refs) in found.items():
            try:
                out[j] = ray.get(refs[0])
            except (ray.exceptions.ObjectLostError, ray.exceptions.RayActorError):
                continue  # gone with its node or publisher: no fresh teacher, keep the last one
            if out[j] is None:  # the publisher restarted before the board took it
                del out[j]
        return out

    def mark_durable(self, peer: int, step: int) -> None:
        self.handle.mark_durable.remote(peer, step)

    def mark_finished(self, peer: int) -> None:
        self.handle.mark_finished.remote(peer)
