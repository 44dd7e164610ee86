"""The board of RayEngine: `BoardState` in a named async Ray actor, and the client a peer uses.

The actor holds references to published objects, not their bytes (async: a wait costs nothing).
Logit shards are `ray.put` by their publisher and survive while it lives; a shard lost with its
publisher is published again by the restarted peer. Shards of at most `exchange.inline_max_bytes`
(64 x 100 float32 logits is 26 KB) are held by value: a `ray.put` and an owner lookup per pull would
double a lockstep step's exchange latency for a few KB. Checkpoints must outlive their publisher,
so the board *pulls* them: the peer announces a version and the board calls
`peer.take_weights(version)`; an actor method's return value is owned by its caller, so the
object stays usable after the peer dies (Ray 2.56 removed `ray.put(_owner=...)`).

The board can die too (docs/design.md, "Failure rules"). Ray restarts it (it lives on the driver's
node, `max_restarts=-1`) and retries the calls in flight; every answer carries the board's *epoch*
(a fresh id per incarnation), and a client that sees a new epoch publishes again what the lost
state held of its own: its recent logit shards, its kept weight versions, its durable step, whether
it finished, and how far it has come. Waits are cut into short slices so that a client blocked on a
teacher notices a new epoch within seconds.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import ray

from codistill.exchange.board import Board, BoardState, TeacherUnavailable
from codistill.exchange.wire import LogitShard, WireWeights

__all__ = ["RayBoardActor", "RayBoardClient", "WAIT_SLICE_S", "WeightOutbox", "actor_restarts"]

WAIT_SLICE_S = 5.0
"""The longest one board call waits: a client checks the board's epoch at least this often."""


def actor_restarts() -> int:
    """How often Ray has restarted the current actor (0 for a fresh one)."""
    ctx = ray.get_runtime_context()
    try:  # the count lives in the GCS actor table; the public API only says whether it is > 0
        from ray._private.state import actors

        return int(actors(actor_id=ctx.get_actor_id())["NumRestarts"])
    except Exception:
        return int(bool(ctx.was_current_actor_reconstructed))


class RayBoardActor:
    """A job's board as a named async actor (see module docstring)."""

    def __init__(
        self, consumers: Mapping[int, list[int]], versions_kept: int, peer_names: list[str], namespace: str | None
    ):
        """`consumers`, `versions_kept`: the job's `BoardState` arguments (codistill.exchange.new_board_state),
        worked out by the driver: the board never builds the job, so its process needs neither torch nor the
        models and losses a user's program registered (0.7 s and 80 MB to start, against 2.9 s and 690 MB)."""
        # Set first: Ray calls __repr__ while reporting a constructor error, and a __repr__ that raises
        # turns that error into a worker crash, which Ray restarts forever under max_restarts=-1.
        self.epoch = uuid.uuid4().hex[:12]
        self.state: Any = None
        self.state = BoardState(consumers, versions_kept)
        self._peer_names = peer_names
        self._namespace = namespace
        self._handles: dict[int, Any] = {}
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        held = "starting" if self.state is None else self.state.stats()
        return f"RayBoardActor(epoch={self.epoch}, {held})"

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

    def pid(self) -> int:
        import os

        return os.getpid()

    def incarnation(self) -> dict:
        """{"epoch", "restarts"}: which board this is, and how often Ray has restarted the board (the driver
        reports a restart as an event of the run)."""
        return {"epoch": self.epoch, "restarts": actor_restarts()}

    # -- logits --
    def publish_logits(self, publisher: int, batch_step: int, entry: list | LogitShard) -> None:
        """`entry`: `[ref]` (a reference in a list, so Ray passes it through unresolved) or, for a shard
        of at most `exchange.inline_max_bytes`, the small shard itself."""
        self.state.put_logits(publisher, batch_step, entry)
        self._notify()

    async def fetch_logits(
        self, publishers: list[int], batch_step: int, consumer: int, timeout_s: float, publish: list | None = None
    ) -> dict:
        """{"epoch", "entries": [...]} for all `publishers` at `batch_step`, or {"epoch", "missing": [...]}.
        `publish`: (publisher, batch step, entry) the consumer publishes on the same call (one call per step)."""
        for publisher, step, entry in publish or ():
            self.state.put_logits(publisher, step, entry)
        if publish:
            self._notify()
        if not await self._wait_until(lambda: not self.state.missing_logits(publishers, batch_step), timeout_s):
            return {"epoch": self.epoch, "missing": self.state.missing_logits(publishers, batch_step)}
        return {"epoch": self.epoch, "entries": self.state.take_logits(publishers, batch_step, consumer)}

    def drop_logits(self, publisher: int, batch_step: int) -> None:
        self.state.drop_logits(publisher, batch_step)

    def mark_durable(self, peer: int, step: int) -> None:
        self.state.mark_durable(peer, step)

    def mark_finished(self, peer: int) -> None:
        self.state.mark_finished(peer)
        self._notify()

    def restore_progress(self, peer: int, step: int) -> None:
        self.state.restore_progress(peer, step)

    # -- weights --
    def offer_weights(self, publisher: int, version: int) -> None:
        if publisher not in self._handles:
            self._handles[publisher] = ray.get_actor(self._peer_names[publisher], namespace=self._namespace)
        take = self._handles[publisher].take_weights.options(concurrency_group="exchange")
        self.state.put_weights(publisher, version, take.remote(version))
        self._notify()

    def versions(self) -> dict:
        return {"epoch": self.epoch, "versions": self.state.newest_versions()}

    async def pull_weights(self, known: dict[int, int], need: dict[int, int], exact: bool, timeout_s: float) -> dict:
        """{"epoch", "weights": {publisher: (version, [ref])}} once `need` is met, or {"epoch", "missing"}."""
        if not await self._wait_until(lambda: self.state.weights_ready(need, exact), timeout_s):
            return {"epoch": self.epoch, "missing": {j: need[j] for j in self.state.missing_weights(need, exact)}}
        picked = self.state.pick_weights(known, need, exact)
        return {"epoch": self.epoch, "weights": {j: (version, [ref]) for j, (version, ref) in picked.items()}}

    def stats(self) -> dict[str, int]:
        return self.state.stats()


class WeightOutbox:
    """Weight versions announced to the board and not taken yet: the board takes them with the publisher's
    `take_weights(version)`, so the board owns the object and it outlives the publisher. The training thread
    puts, the actor's "exchange" thread takes."""

    KEPT = 3  # untaken versions the board has not asked for yet

    def __init__(self) -> None:
        self._versions: dict[int, WireWeights] = {}
        self._lock = threading.Lock()

    def put(self, weights: WireWeights) -> None:
        with self._lock:
            self._versions[weights.version] = weights
            for v in sorted(self._versions)[: -self.KEPT]:
                del self._versions[v]

    def take(self, version: int) -> WireWeights | None:
        # The board takes versions in order (one caller, one thread): once it has taken this one, older
        # ones are never asked for again. Dropping them now lets the allocator reuse their memory for
        # the next snapshot (the returned object stays alive until Ray has serialized it).
        with self._lock:
            for v in [v for v in self._versions if v < version]:
                del self._versions[v]
            return self._versions.pop(version, None)


class RayBoardClient(Board):
    """The Board interface over a RayBoardActor, used inside a peer actor (or a rank of a worker group).

    `stash` puts a weight version where the board will take it from: by default this process's own outbox
    (a peer actor's `take_weights`); rank 0 of a data-parallel peer stashes into its group's host actor,
    which outlives the Train workers."""

    def __init__(
        self,
        handle: Any,
        index: int,
        inline_max_bytes: int = 0,
        versions_kept: int = 1,
        kept_shard_steps: int = 16,
        stash: Callable[[WireWeights], None] | None = None,
    ):
        self.handle = handle
        self.index = index
        self.inline_max_bytes = inline_max_bytes
        self.versions_kept = versions_kept
        self.kept_shard_steps = kept_shard_steps  # peers run at most `staleness` steps apart in logits mode
        self.epoch: str | None = None
        self.sent_logits: dict[tuple[int, int], Any] = {}  # what we published recently, as sent (keeps refs alive)
        self.sent_shards: dict[tuple[int, int], LogitShard] = {}  # the same shards by value (for checkpoints)
        self.held: list[tuple[int, int, Any]] = []  # published this step, not sent yet
        self._last_news = 0.0
        self.sent_weights: dict[int, WireWeights] = {}  # our newest versions, even once the board took them
        self.outbox = WeightOutbox()
        self._stash = stash or self.outbox.put
        self._versions_ref: Any = None
        self.durable_step = 0
        self.finished = False
        self.progress_step = 0  # the newest batch step we asked teachers for

    # -- what must outlive this process and its board --
    def durable_state(self, step: int) -> dict:
        """What a new board (after a driver resume) needs from us when we restart at `step`: the shards
        we published ahead of it (bounded staleness publishes batch k + s at step k) and our kept weight
        versions. Tensors only: part of the training checkpoint."""
        return {
            "shards": [s.state_dict() for (_j, b), s in sorted(self.sent_shards.items()) if b >= step],
            "weights": [w.state_dict() for _v, w in sorted(self.sent_weights.items())],
        }

    def restore(self, state: dict, step: int) -> None:
        """Publish again what `durable_state` kept (the peer restarts at `step`)."""
        self.progress_step = max(self.progress_step, step)
        for s in state.get("shards", []):
            self.publish_logits(self.index, LogitShard.from_state_dict(s))
        for w in state.get("weights", []):
            self.publish_weights(self.index, WireWeights.from_state_dict(w))

    # -- a board that restarted --
    def _see(self, epoch: str) -> None:
        if self.epoch is None:
            self.epoch = epoch
        elif epoch != self.epoch:
            self.epoch = epoch
            self.republish()

    def republish(self) -> None:
        """Give a new board what the old one held of ours."""
        self.flush()
        for (publisher, step), entry in sorted(self.sent_logits.items(), key=lambda kv: kv[0][1]):
            self.handle.publish_logits.remote(publisher, step, entry)
        for version in sorted(self.sent_weights):
            self._stash(self.sent_weights[version])
            self.handle.offer_weights.remote(self.index, version)
        self.handle.mark_durable.remote(self.index, self.durable_step)
        self.handle.restore_progress.remote(self.index, self.progress_step)
        if self.finished:
            self.handle.mark_finished.remote(self.index)

    # -- logits --
    def publish_logits(self, publisher: int, shard: LogitShard) -> None:
        entry: Any = shard
        if shard.nbytes > self.inline_max_bytes:
            # Large: by reference. Small: by value; a `ray.put` plus a reference resolved through its owner
            # costs two more round trips per step, most of a lockstep step's exchange time for small models.
            entry = [ray.put(shard)]
        self.sent_logits[(publisher, shard.batch_step)] = entry
        self.sent_shards[(publisher, shard.batch_step)] = shard
        for key in [k for k in self.sent_logits if k[1] < shard.batch_step - self.kept_shard_steps]:
            del self.sent_logits[key], self.sent_shards[key]
        self.held.append((publisher, shard.batch_step, entry))  # rides on this step's teacher request

    def flush(self) -> None:
        for publisher, step, entry in self.held:
            self.handle.publish_logits.remote(publisher, step, entry)
        self.held = []

    def fetch_logits(self, publishers: list[int], batch_step: int, consumer: int, timeout_s: float) -> list[LogitShard]:
        self.progress_step = max(self.progress_step, batch_step)
        deadline = time.monotonic() + timeout_s
        got: dict[int, LogitShard] = {}
        pending = list(publishers)
        while pending:  # one board request for all teachers; again for shards lost with their publisher
            left = deadline - time.monotonic()
            held, self.held = self.held, []  # what we published this step rides on the request
            wait = min(max(left, 0), WAIT_SLICE_S)
            found = ray.get(self.handle.fetch_logits.remote(pending, batch_step, consumer, wait, held))
            self._see(found["epoch"])
            if "missing" in found:
                if time.monotonic() < deadline:
                    continue
                raise TeacherUnavailable(
                    f"peer {consumer}: no logits from peer(s) {found['missing']} for step {batch_step} "
                    f"after {timeout_s}s (exchange.timeout_s)"
                )
            lost = []
            for j, entry in zip(pending, found["entries"]):
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

    # -- weights --
    def publish_weights(self, publisher: int, weights: WireWeights) -> None:
        # Keep it where the board takes it from, then announce it (WeightOutbox).
        self._stash(weights)
        self.sent_weights[weights.version] = weights
        for v in sorted(self.sent_weights)[: -self.versions_kept]:
            del self.sent_weights[v]
        self.handle.offer_weights.remote(publisher, weights.version)

    def take_weights(self, version: int) -> WireWeights | None:
        return self.outbox.take(version)

    NEWS_EVERY_S = 0.25

    def _news(self, known: Mapping[int, int]) -> bool:
        """Whether the board has a version newer than `known` (one versions() request stays in flight and
        is read once it is ready: never waits; asked at most every NEWS_EVERY_S, not every step)."""
        if time.monotonic() - self._last_news < self.NEWS_EVERY_S:
            return False
        self._last_news = time.monotonic()
        if self._versions_ref is None:
            self._versions_ref = self.handle.versions.remote()
        ready, _ = ray.wait([self._versions_ref], timeout=0)
        if not ready:
            return False
        answer = ray.get(self._versions_ref)
        self._versions_ref = self.handle.versions.remote()
        self._see(answer["epoch"])
        return any(answer["versions"].get(j, -1) > have for j, have in known.items())

    def pull_weights(
        self, consumer: int, known: Mapping[int, int], need: Mapping[int, int], exact: bool, timeout_s: float
    ) -> dict[int, WireWeights]:
        if not need and not self._news(known):
            return {}
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(deadline - time.monotonic(), 0)
            found = ray.get(self.handle.pull_weights.remote(dict(known), dict(need), exact, min(left, WAIT_SLICE_S)))
            self._see(found["epoch"])
            if "missing" not in found:
                break
            if time.monotonic() >= deadline:
                raise TeacherUnavailable(
                    f"peer {consumer}: no checkpoint of peer(s) {found['missing']} (peer: version) after "
                    f"{timeout_s}s (exchange.timeout_s)"
                )
        out = {}
        for j, (_version, refs) in found["weights"].items():
            try:
                w = ray.get(refs[0])
            except (ray.exceptions.ObjectLostError, ray.exceptions.RayActorError):
                continue  # gone with its node or publisher: no fresh teacher, keep the last one
            if w is not None:  # None: the publisher restarted before the board took it
                out[j] = w
        return out

    def mark_durable(self, peer: int, step: int) -> None:
        self.durable_step = max(self.durable_step, step)
        self.handle.mark_durable.remote(peer, step)

    def mark_finished(self, peer: int) -> None:
        self.finished = True
        self.handle.mark_finished.remote(peer)
