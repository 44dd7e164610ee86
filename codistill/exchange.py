"""The exchange protocol: how teacher signals travel between peers.

Two layers:

* A **Board** is the transport: it holds published logit shards and weight versions and hands
  them out. `InMemoryBoard` serves LocalEngine (one process); `RayBoardClient` talks to a named
  `RayBoard` actor that keeps object-store references for RayEngine (the bytes of checkpoints and
  of logit shards above `exchange.inline_max_bytes` never pass through it; a shard of a few KB
  travels by value, as Ray inlines small objects itself). Both move the same wire objects
  (`LogitShard`, `WireWeights`: numpy arrays, so a pull within a Ray node is zero-copy).
* An **exchange** (one per peer, chosen by `exchange.mode` through EXCHANGES) says what a step
  does with the board: `start_step` (forward, publish), `teacher_logits` (pull or compute the
  teachers' logits; may wait) and `end_step` (publish weights). Engines call these three in order
  and never branch on the mode. A peer that is itself a data-parallel group only needs its rank 0
  to make these calls.

Semantics (DESIGN.md, "Exchange semantics"):

* `logits` (Deep Mutual Learning, Zhang et al., CVPR 2018): every peer draws the same batch at each
  step. With `staleness: 0` a peer publishes the logits of its step-k forward pass (before its
  step-k update) and trains on the others' step-k logits: simultaneous DML, N forward passes.
  With `staleness: s > 0` a peer publishes at step k its logits for batch k + s (one extra
  no-grad forward, BatchNorm statistics untouched), so the others can use them at their step
  k + s: a peer waits only when it is more than s steps ahead of a teacher, and the signal it
  uses is exactly s steps stale, whatever the timing. That keeps runs reproducible.
* `checkpoint` (codistillation, Anil et al., ICLR 2018): every `period` steps a peer publishes its
  weights; before each step it picks up whatever newer versions of its teachers exist (never
  waiting) and runs them locally as frozen teachers on its own batch. `sync: true` instead waits
  at each multiple of `period` for the teachers' checkpoint of that step: a deterministic
  publish schedule, for tests and reproducible baselines.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from codistill.config import RunConfig

__all__ = ["LogitShard", "WireWeights", "Board", "InMemoryBoard", "RayBoardActor", "RayBoardClient", "ExchangeStats", "LogitExchange",
           "CheckpointExchange", "EXCHANGES", "make_exchange", "teachers_of", "consumers_of", "encode_tensor",
           "decode_array", "encode_weights", "decode_weights", "TeacherUnavailable"]


class TeacherUnavailable(RuntimeError):
    """A teacher's shard did not arrive within `exchange.timeout_s`."""


# ---------------------------------------------------------------------------------------------
# topology


def teachers_of(index: int, num_peers: int, topology: str) -> list[int]:
    """Whom peer `index` learns from: every other peer (`all`) or its ring predecessor (`ring`)."""
    if num_peers < 2:
        return []
    if topology == "ring":
        return [(index - 1) % num_peers]
    return [j for j in range(num_peers) if j != index]


def consumers_of(index: int, num_peers: int, topology: str) -> list[int]:
    return [i for i in range(num_peers) if index in teachers_of(i, num_peers, topology)]


# ---------------------------------------------------------------------------------------------
# wire format: numpy arrays (bf16 travels as its raw 16 bits: numpy has no bfloat16)


def encode_tensor(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A numpy copy in the wire dtype. Always a copy: a view of a live parameter would change under
    the consumer's feet while the publisher keeps training."""
    wire = torch.bfloat16 if dtype == "bfloat16" else getattr(torch, dtype)
    t = t.detach().to("cpu", dtype=wire, copy=True)
    return t.view(torch.int16).numpy() if dtype == "bfloat16" else t.numpy()


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # object-store arrays are read-only views; we never write to them
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(a)


def decode_array(a: np.ndarray, dtype: str, device: torch.device | str = "cpu") -> torch.Tensor:
    t = _from_numpy(a)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.to(device=device, dtype=torch.float32)


@dataclass
class LogitShard:
    """One peer's logits for one batch, keyed by the sample ids they cover."""

    batch_step: int  # the step whose batch these logits are for
    produced_step: int  # the publisher's step (weights) when it computed them
    sample_ids: np.ndarray  # int64 (B,)
    logits: np.ndarray  # (B, C) in the wire dtype
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(self.logits.nbytes + self.sample_ids.nbytes)


@dataclass
class WireWeights:
    """A published checkpoint: the model's state dict as numpy arrays (floats in the wire dtype)."""

    version: int  # the publisher's completed steps when these weights were taken
    dtype: str
    arrays: dict[str, np.ndarray]
    float_keys: frozenset[str]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))


def encode_weights(state: Mapping[str, torch.Tensor], version: int, dtype: str) -> WireWeights:
    arrays, float_keys = {}, set()
    for k, v in state.items():
        if v.is_floating_point():
            arrays[k] = encode_tensor(v, dtype)
            float_keys.add(k)
        else:
            arrays[k] = v.detach().to("cpu", copy=True).numpy()
    return WireWeights(version, dtype, arrays, frozenset(float_keys))


def decode_weights(w: WireWeights) -> dict[str, torch.Tensor]:
    return {k: decode_array(a, w.dtype) if k in w.float_keys else _from_numpy(a) for k, a in w.arrays.items()}


# ---------------------------------------------------------------------------------------------
# boards


class Board(ABC):
    """Transport of teacher signals. Implementations: InMemoryBoard here, RayBoard for RayEngine."""

    @abstractmethod
    def publish_logits(self, publisher: int, shard: LogitShard) -> None: ...

    @abstractmethod
    def fetch_logits(self, publishers: list[int], batch_step: int, consumer: int, timeout_s: float) -> list[LogitShard]:
        """The shards of `publishers` for `batch_step` (one request for all of a consumer's teachers),
        waiting up to timeout_s for all of them (TeacherUnavailable after)."""

    @abstractmethod
    def publish_weights(self, publisher: int, weights: WireWeights) -> None: ...

    @abstractmethod
    def newest_weights(self, consumer: int, known: Mapping[int, int], want: Mapping[int, int],
                       timeout_s: float) -> dict[int, WireWeights]:
        """Versions newer than `known[j]` for each publisher j in `known`, without waiting, except that
        a publisher listed in `want` is waited for until its version `want[j]` exists (sync schedule)."""

    def mark_durable(self, peer: int, step: int) -> None:
        """`peer` saved a training checkpoint at `step`: shards it may need after a restart start there."""


class InMemoryBoard(Board):
    """A board in one process (LocalEngine, tests). Thread-safe; keeps what a restart may need."""

    def __init__(self, cfg: RunConfig):
        n, topo = cfg.num_peers, cfg.exchange.topology
        self._consumers = {j: consumers_of(j, n, topo) for j in range(n)}
        self._logits: dict[tuple[int, int], LogitShard] = {}
        self._taken: dict[tuple[int, int], set[int]] = {}
        self._weights: dict[int, dict[int, WireWeights]] = {j: {} for j in range(n)}
        self._durable = {j: 0 for j in range(n)}
        self._sync = cfg.exchange.mode == "checkpoint" and cfg.exchange.sync
        self._cv = threading.Condition()

    def publish_logits(self, publisher: int, shard: LogitShard) -> None:
        with self._cv:
            self._logits[(publisher, shard.batch_step)] = shard
            self._cv.notify_all()

    def fetch_logits(self, publishers: list[int], batch_step: int, consumer: int, timeout_s: float) -> list[LogitShard]:
        keys = [(j, batch_step) for j in publishers]
        with self._cv:
            if not self._cv.wait_for(lambda: all(k in self._logits for k in keys), timeout=timeout_s):
                missing = [j for j, k in zip(publishers, keys) if k not in self._logits]
                raise TeacherUnavailable(f"no logits from peer(s) {missing} for step {batch_step} after {timeout_s}s")
            shards = [self._logits[k] for k in keys]
            for k in keys:
                self._taken.setdefault(k, set()).add(consumer)
            self._collect()
            return shards

    def _collect(self) -> None:
        # A shard can go once all its consumers took it and none of them can be sent back before it
        # by a restart (each consumer's last durable checkpoint is past that step).
        for (j, step) in list(self._logits):
            consumers = self._consumers[j]
            if set(consumers) <= self._taken.get((j, step), set()) and all(self._durable[c] > step for c in consumers):
                del self._logits[(j, step)]
                self._taken.pop((j, step), None)

    def mark_durable(self, peer: int, step: int) -> None:
        with self._cv:
            self._durable[peer] = max(self._durable[peer], step)
            self._collect()

    def publish_weights(self, publisher: int, weights: WireWeights) -> None:
        with self._cv:
            versions = self._weights[publisher]
            versions[weights.version] = weights
            # Keep the newest version; under the sync schedule also the two before it (a consumer that
            # lags one period still finds its exact version).
            keep = sorted(versions)[-(3 if self._sync else 1):]
            for v in list(versions):
                if v not in keep:
                    del versions[v]
            self._cv.notify_all()

    def newest_weights(self, consumer: int, known: Mapping[int, int], want: Mapping[int, int],
                       timeout_s: float) -> dict[int, WireWeights]:
        out: dict[int, WireWeights] = {}
        with self._cv:
            for j, need in want.items():
                if known.get(j, -1) == need:
                    continue
                if not self._cv.wait_for(lambda: need in self._weights[j], timeout=timeout_s):
                    raise TeacherUnavailable(f"no checkpoint of peer {j} at step {need} after {timeout_s}s")
                out[j] = self._weights[j][need]
            for j, have in known.items():
                if j in want or not self._weights[j]:
                    continue
                newest = max(self._weights[j])
                if newest > have:
                    out[j] = self._weights[j][newest]
        return out


# ---------------------------------------------------------------------------------------------
# per-peer exchanges


@dataclass
class ExchangeStats:
    bytes_published: int = 0
    bytes_pulled: int = 0
    staleness_sum: float = 0.0
    staleness_count: int = 0
    staleness_max: int = 0
    teacher_lead_max: int = 0  # the most steps a teacher signal was ahead of the student
    exchange_s: float = 0.0  # wall time in publish + pull + wait
    teacher_forward_s: float = 0.0  # checkpoint mode: running the local teachers (compute, not exchange)
    teacher_updates: int = 0

    def see_staleness(self, staleness: int) -> None:
        """`staleness` = student step - the teacher step that produced the signal (DESIGN.md). A free-running
        teacher can be ahead (negative): that signal is not stale, so it counts as 0 and the lead is kept
        apart; otherwise a mean over a fast and a slow peer would average a lag with a lead."""
        self.staleness_sum += max(staleness, 0)
        self.staleness_count += 1
        self.staleness_max = max(self.staleness_max, staleness)
        self.teacher_lead_max = max(self.teacher_lead_max, -staleness)

    def merge(self, other: "ExchangeStats") -> None:
        for f in ("bytes_published", "bytes_pulled", "staleness_sum", "staleness_count", "exchange_s",
                  "teacher_forward_s", "teacher_updates"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.staleness_max = max(self.staleness_max, other.staleness_max)
        self.teacher_lead_max = max(self.teacher_lead_max, other.teacher_lead_max)

    def staleness(self) -> dict[str, float]:
        """The summary's `staleness` entry."""
        mean = self.staleness_sum / self.staleness_count if self.staleness_count else 0.0
        return {"mean": mean, "max": self.staleness_max, "teacher_lead_max": self.teacher_lead_max}

    def to_dict(self) -> dict[str, Any]:
        st = self.staleness()
        return {"bytes_published": self.bytes_published, "bytes_pulled": self.bytes_pulled,
                "staleness_mean": st["mean"], "staleness_max": st["max"],
                "teacher_lead_max": st["teacher_lead_max"], "exchange_s": self.exchange_s,
                "teacher_forward_s": self.teacher_forward_s, "teacher_updates": self.teacher_updates}


class _Exchange:
    def __init__(self, cfg: RunConfig, index: int, board: Board):
        self.cfg = cfg
        self.index = index
        self.board = board
        self.teachers = teachers_of(index, cfg.num_peers, cfg.exchange.topology)
        self.publishes = bool(consumers_of(index, cfg.num_peers, cfg.exchange.topology)) and cfg.loss.alpha > 0
        self.stats = ExchangeStats()

    def distills_at(self, step: int) -> bool:
        return bool(self.teachers) and self.cfg.loss.alpha > 0 and step >= self.cfg.loss.burn_in


class LogitExchange(_Exchange):
    """Deep Mutual Learning over logit shards, with bounded staleness (see module docstring)."""

    def start_step(self, peer, step: int) -> None:
        ids, logits = peer.forward(step)
        if not self.publishes:
            return
        s = self.cfg.exchange.staleness
        if s == 0:
            self._publish(peer.data, step, step, ids, logits)
            return
        # Publish the batch that consumers will train on s steps from now (at step 0 also the first s).
        first = step + s if step > 0 else 0
        for batch_step in range(first, min(step + s, peer.total_steps - 1) + 1):
            ids_b, logits_b = peer.lookahead_logits(batch_step)
            self._publish(peer.data, batch_step, step, ids_b, logits_b)

    def _publish(self, data, batch_step: int, produced_step: int, ids: torch.Tensor, logits: torch.Tensor) -> None:
        if batch_step < self.cfg.loss.burn_in:
            return
        t0 = time.perf_counter()
        shard = LogitShard(batch_step, produced_step, ids.numpy().astype(np.int64, copy=False),
                           encode_tensor(logits, self.cfg.exchange.dtype), self.cfg.exchange.dtype)
        self.board.publish_logits(self.index, shard)
        self.stats.bytes_published += shard.nbytes
        self.stats.exchange_s += time.perf_counter() - t0

    def teacher_logits(self, peer, step: int) -> list[torch.Tensor] | None:
        if not self.distills_at(step):
            return None
        t0 = time.perf_counter()
        expected_ids = peer.data.sample_ids[peer.data.positions(step)].numpy()
        out = []
        shards = self.board.fetch_logits(self.teachers, step, self.index, self.cfg.exchange.timeout_s)
        for j, shard in zip(self.teachers, shards):
            if not np.array_equal(shard.sample_ids, expected_ids):  # a shard is keyed by the samples it covers
                raise RuntimeError(f"peer {self.index}: logits of peer {j} for step {step} cover other samples; "
                                   f"the peers' batch orders disagree (job seed or data config differ)")
            out.append(decode_array(shard.logits, shard.dtype, peer.device))
            self.stats.bytes_pulled += shard.nbytes
            self.stats.see_staleness(step - shard.produced_step)
        self.stats.exchange_s += time.perf_counter() - t0
        return out

    def end_step(self, peer, step: int) -> None:
        pass


class CheckpointExchange(_Exchange):
    """Codistillation with stale checkpoints as local frozen teachers (Anil et al., ICLR 2018)."""

    def start_step(self, peer, step: int) -> None:
        if step == 0 and self.publishes:  # version 0 (the initial weights) so teachers exist from the start
            self._publish(peer, 0)
        peer.forward(step)

    def _pull(self, peer, step: int) -> None:
        t0 = time.perf_counter()
        period = self.cfg.exchange.period
        known = {j: peer.teacher_versions().get(j, -1) for j in self.teachers}
        want = {}
        if self.cfg.exchange.sync and self.distills_at(step):
            want = {j: (step // period) * period for j in self.teachers}
        for j, w in self.board.newest_weights(self.index, known, want, self.cfg.exchange.timeout_s).items():
            peer.set_teacher(j, w.version, decode_weights(w))
            self.stats.bytes_pulled += w.nbytes
            self.stats.teacher_updates += 1
        self.stats.exchange_s += time.perf_counter() - t0

    def teacher_logits(self, peer, step: int) -> list[torch.Tensor] | None:
        # Pull here, not in start_step: every peer has published what step k needs by the time any
        # peer asks (LocalEngine runs all start_steps first; on Ray it does not matter).
        if self.teachers and self.cfg.loss.alpha > 0:
            self._pull(peer, step)
        if not self.distills_at(step) or not peer.teachers:
            return None
        for version in peer.teacher_versions().values():
            self.stats.see_staleness(step - version)
        t0 = time.perf_counter()
        logits = peer.local_teacher_logits()
        self.stats.teacher_forward_s += time.perf_counter() - t0
        return logits

    def end_step(self, peer, step: int) -> None:
        if self.publishes and (step + 1) % self.cfg.exchange.period == 0:
            self._publish(peer, step + 1)

    def _publish(self, peer, version: int) -> None:
        t0 = time.perf_counter()
        w = encode_weights(peer.model.state_dict(), version, self.cfg.exchange.dtype)
        self.board.publish_weights(self.index, w)
        self.stats.bytes_published += w.nbytes
        self.stats.exchange_s += time.perf_counter() - t0


EXCHANGES: dict[str, type[_Exchange]] = {"logits": LogitExchange, "checkpoint": CheckpointExchange}


def make_exchange(cfg: RunConfig, index: int, board: Board) -> _Exchange:
    return EXCHANGES[cfg.exchange.mode](cfg, index, board)


# ---------------------------------------------------------------------------------------------
# Ray: a named board actor holding object-store references, and the client a peer actor uses


def _ray():
    import ray  # Ray is imported only when a Ray board is used (LocalEngine runs without it)

    return ray


class RayBoardActor:
    """Holds references to published objects, not their bytes (async actor: waits cost nothing).

    Logit shards are `ray.put` by their publisher and survive while it lives; a shard lost with its
    publisher is published again by the restarted peer. Shards of at most `exchange.inline_max_bytes`
    (64 x 100 float32 logits is 26 KB) are held by value: a `ray.put` and an owner lookup per pull
    would double a lockstep step's exchange latency for a few KB. Checkpoints must outlive their publisher,
    so the board *pulls* them: the peer announces a version and the board calls
    `peer.take_weights(version)`; an actor method's return value is owned by its caller, so the
    object stays usable after the peer dies (Ray 2.56 removed `ray.put(_owner=...)`).
    """

    def __init__(self, cfg_dict: dict, peer_names: list[str], namespace: str | None):
        from codistill.config import build

        cfg = build(cfg_dict)
        n, topo = cfg.num_peers, cfg.exchange.topology
        self._consumers = {j: consumers_of(j, n, topo) for j in range(n)}
        self._peer_names = peer_names
        self._namespace = namespace
        self._handles: dict[int, Any] = {}
        self._logits: dict[tuple[int, int], tuple[Any, int]] = {}  # (publisher, step) -> (ref, produced_step)
        self._taken: dict[tuple[int, int], set[int]] = {}
        self._durable = {j: 0 for j in range(n)}
        self._weights: dict[int, dict[int, Any]] = {j: {} for j in range(n)}  # publisher -> version -> ref
        self._keep = 3 if cfg.exchange.sync else 1
        self._restarts = {j: 0 for j in range(n)}
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, predicate, timeout_s: float) -> bool:
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
    def publish_logits(self, publisher: int, batch_step: int, entry: "list | LogitShard") -> None:
        """`entry`: `[ref]` (a reference in a list, so Ray passes it through unresolved) or, for a shard
        of at most `exchange.inline_max_bytes`, the small shard itself."""
        self._logits[(publisher, batch_step)] = entry
        self._notify()

    async def fetch_logits(self, publishers: list[int], batch_step: int, consumer: int, timeout_s: float):
        """The entries of all `publishers` for `batch_step` at once, or {"missing": [...]} after timeout_s."""
        keys = [(j, batch_step) for j in publishers]
        if not await self._wait_until(lambda: all(k in self._logits for k in keys), timeout_s):
            return {"missing": [j for j, k in zip(publishers, keys) if k not in self._logits]}
        for k in keys:
            self._taken.setdefault(k, set()).add(consumer)
        entries = [self._logits[k] for k in keys]
        self._collect()
        return entries

    def drop_logits(self, publisher: int, batch_step: int) -> None:
        """A consumer found this shard lost (publisher died): forget it until it is published again."""
        self._logits.pop((publisher, batch_step), None)

    def _collect(self) -> None:
        for (j, step) in list(self._logits):
            consumers = self._consumers[j]
            if set(consumers) <= self._taken.get((j, step), set()) and all(self._durable[c] > step for c in consumers):
                del self._logits[(j, step)]
                self._taken.pop((j, step), None)

    def mark_durable(self, peer: int, step: int) -> None:
        self._durable[peer] = max(self._durable[peer], step)
        self._collect()

    # -- weights --
    def offer_weights(self, publisher: int, version: int) -> None:
        ray = _ray()
        if publisher not in self._handles:
            self._handles[publisher] = ray.get_actor(self._peer_names[publisher], namespace=self._namespace)
        versions = self._weights[publisher]
        versions[version] = self._handles[publisher].take_weights.options(concurrency_group="exchange").remote(version)
        for v in sorted(versions)[:-self._keep]:
            del versions[v]
        self._notify()

    def versions(self) -> dict[int, int]:
        return {j: max(v) for j, v in self._weights.items() if v}

    def weights(self, publisher: int, version: int | None = None):
        versions = self._weights[publisher]
        if not versions:
            return None
        v = max(versions) if version is None else version
        return [versions[v]] if v in versions else None

    async def wait_weights(self, publisher: int, version: int, timeout_s: float):
        if not await self._wait_until(lambda: version in self._weights[publisher], timeout_s):
            return None
        return [self._weights[publisher][version]]

    # -- events --
    def note_restart(self, peer: int) -> int:
        self._restarts[peer] += 1
        return self._restarts[peer]

    def stats(self) -> dict[str, int]:
        return {"logit_shards_held": len(self._logits), "weight_versions_held": sum(len(v) for v in self._weights.values())}


class RayBoardClient(Board):
    """The Board interface over a RayBoardActor, used inside a peer actor."""

    def __init__(self, handle, index: int, inline_max_bytes: int = 0):
        self.handle = handle
        self.index = index
        self.inline_max_bytes = inline_max_bytes
        self._keep: dict[tuple[int, int], Any] = {}  # our own published shards stay alive while referenced
        self._versions_ref = None
        self.outbox: dict[int, WireWeights] = {}
        self._outbox_lock = threading.Lock()  # the training thread adds, the "exchange" thread takes

    def publish_logits(self, publisher: int, shard: LogitShard) -> None:
        ray = _ray()
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
        ray = _ray()
        deadline = time.monotonic() + timeout_s
        got: dict[int, LogitShard] = {}
        pending = list(publishers)
        while pending:  # one board request for all teachers; again only for shards lost with their publisher
            left = deadline - time.monotonic()
            found = ray.get(self.handle.fetch_logits.remote(pending, batch_step, consumer, max(left, 0.0)))
            if isinstance(found, dict):
                raise TeacherUnavailable(f"peer {consumer}: no logits from peer(s) {found['missing']} for step "
                                         f"{batch_step} after {timeout_s}s (exchange.timeout_s)")
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

    def newest_weights(self, consumer: int, known: Mapping[int, int], want: Mapping[int, int],
                       timeout_s: float) -> dict[int, WireWeights]:
        ray = _ray()
        out: dict[int, WireWeights] = {}
        for j, need in want.items():
            if known.get(j, -1) == need:
                continue
            found = ray.get(self.handle.wait_weights.remote(j, need, timeout_s))
            if found is None:
                raise TeacherUnavailable(f"peer {consumer}: no checkpoint of peer {j} at step {need} after {timeout_s}s")
            w = self._get(found[0])
            if w is not None:
                out[j] = w
        # Never wait for news: one versions() request stays in flight and is read once it is ready.
        if self._versions_ref is None:
            self._versions_ref = self.handle.versions.remote()
        ready, _ = ray.wait([self._versions_ref], timeout=0)
        if ready:
            versions = ray.get(self._versions_ref)
            self._versions_ref = self.handle.versions.remote()
            for j, have in known.items():
                if j in want or versions.get(j, -1) <= have:
                    continue
                found = ray.get(self.handle.weights.remote(j))
                w = self._get(found[0]) if found else None
                if w is not None and w.version > have:
                    out[j] = w
        return out

    @staticmethod
    def _get(ref) -> WireWeights | None:
        ray = _ray()
        try:
            return ray.get(ref)
        except (ray.exceptions.ObjectLostError, ray.exceptions.RayActorError):
            return None  # gone with its node or publisher: no fresh teacher, keep the last one

    def mark_durable(self, peer: int, step: int) -> None:
        self.handle.mark_durable.remote(peer, step)
