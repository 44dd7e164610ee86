"""Codistillation with stale checkpoints as local frozen teachers (Anil et al., ICLR 2018),
`exchange.mode: checkpoint`.

Every `period` steps a peer publishes its weights; before each step it picks up newer versions of
its teachers and runs them locally, frozen, on its own batch (each peer has its own batch order).
The promise, in steps (docs/design.md, "Checkpoint exchange"):

* A teacher version trained for fewer than `burn_in` steps is never used (and the initial weights,
  version 0, are never published): `first_usable` is the first multiple of `period` >= max(burn_in, 1).
* Bounded staleness: at step k a peer distills only from versions >= k - max_staleness; when a
  teacher has none yet, the peer waits for it (up to `timeout_s`). Free-running peers otherwise
  never wait. A teacher that finished its last step is used as it is.
* `sync: true` is the limit: at step k exactly the version of the last multiple of `period`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from codistill.config import ExchangeConfig, RunConfig
from codistill.exchange.base import Exchange
from codistill.exchange.board import Board
from codistill.exchange.wire import WireWeights, decode_weights, encode_weights, wire_dtype
from codistill.peer.influence import teacher_influence

if TYPE_CHECKING:
    import torch

    from codistill.losses.terms import TeacherOutput
    from codistill.peer import Peer

__all__ = ["CheckpointExchange", "ceil_to", "published_dir"]


def published_dir(peer_name: str, version: int) -> str:
    """The run-relative folder of a large sharded peer's published weights of `version` (exchange.gather_max_mb)."""
    return f"published/{peer_name}/v{version}"


def ceil_to(x: int, period: int) -> int:
    """The smallest multiple of `period` >= x."""
    return -(-x // period) * period


class CheckpointExchange(Exchange):
    """Anil-style codistillation (see module docstring)."""

    shared_batch_order = False

    @classmethod
    def versions_kept(cls, cfg: ExchangeConfig) -> int:
        # The exact schedule hands out a given version; a consumer a period behind still finds its own.
        return 3 if cfg.sync else 1

    @classmethod
    def describe(cls, cfg: ExchangeConfig) -> str:
        bound = "sync" if cfg.sync else f"max_staleness={cfg.staleness_bound}"
        return f"period={cfg.period}, {bound}"

    @classmethod
    def staleness_limit(cls, cfg: ExchangeConfig) -> int:
        return cfg.period - 1 if cfg.sync else cfg.staleness_bound

    def __init__(self, cfg: RunConfig, index: int, board: Board, rank: int = 0):
        super().__init__(cfg, index, board, rank)
        self.period = cfg.exchange.period
        self.first_usable = ceil_to(max(cfg.loss.burn_in, 1), self.period)

    def required_version(self, step: int) -> int | None:
        """The teacher version a peer must hold (at least, or exactly under sync) to distill at `step`;
        None when nothing can be required (before burn-in, or before the first usable version is due)."""
        if not self.distills_at(step):
            return None
        if self.cfg.exchange.sync:
            version = (step // self.period) * self.period
        else:
            version = ceil_to(max(step - self.cfg.exchange.staleness_bound, self.first_usable), self.period)
        return version if self.first_usable <= version <= step else None

    def start_step(self, peer: Peer, step: int) -> None:
        peer.forward(step)

    def _pull(self, peer: Peer, step: int) -> None:
        sync = self.cfg.exchange.sync
        required = self.required_version(step)
        held = peer.teacher_versions()
        if sync and required is None:
            return  # the exact schedule loads versions only when they are due
        need = {j: required for j in self.teachers if required is not None}
        if not sync:  # a teacher held at least as new as required needs no wait
            need = {j: v for j, v in need.items() if held.get(j, -1) < v}
        known = {j: max(held.get(j, -1), self.first_usable - 1) for j in self.teachers}
        t0 = time.perf_counter()
        pulled = {}
        if peer.rank == 0 or not peer.sharded:
            pulled = self.board.pull_weights(self.slot, known, need, sync, self.cfg.exchange.timeout_s)
        if peer.sharded:  # the ranks must load the same versions (each holds a slice): rank 0's pull, to all
            pulled = peer.broadcast(pulled)
        for j, w in pulled.items():
            if w.location is None:
                peer.set_teacher(j, w.version, decode_weights(w))
                self.stats.bytes_pulled += w.nbytes
            elif not self._read_shards(peer, j, w):
                continue  # deleted with a newer version out: keep the teacher held
            self.stats.teacher_updates += 1
        self.stats.exchange_s += time.perf_counter() - t0

    def teacher_signals(self, peer: Peer, step: int) -> list[TeacherOutput] | None:
        # Pull here, not in start_step: every peer has published what step k needs by the time any
        # peer asks (LocalEngine runs all start_steps first; on Ray it does not matter).
        if not self.teachers or self.cfg.loss.alpha == 0:
            return None
        self._pull(peer, step)
        if not self.distills_at(step) or not peer.teachers:
            return None
        for version in peer.teacher_versions().values():
            self.stats.see_staleness(step - version)
        t0 = time.perf_counter()
        signals = peer.local_teacher_signals()  # their taps too: the local copies produce them for free
        self.stats.teacher_forward_s += time.perf_counter() - t0
        self.stats.teacher_forwards += len(signals)
        return signals

    def teacher_side_weights(self, peer: Peer, step: int) -> list[torch.Tensor]:
        # No per-step traffic: this peer estimates each student's influence on its local copy of that student.
        return [teacher_influence(peer, j) for j in sorted(peer.teachers)]

    def _read_shards(self, peer: Peer, j: int, w: WireWeights) -> bool:
        """Teacher j's version from its publisher's DCP shards (gather_max_mb): a sharded peer's ranks each read
        their own slices together, any other process reads the whole. False when the folder is gone."""
        assert self.storage is not None and w.location is not None, "shards are published on Ray only"
        storage, location = self.storage, w.location
        try:
            peer.set_teacher_from(j, w.version, lambda state: storage.read_sharded(location, state, peer.sharded))
        except FileNotFoundError:
            return False
        self.stats.bytes_pulled += w.shard_bytes // (peer.world_size if peer.sharded else 1)
        return True

    def _publish_shards(self, peer: Peer, version: int) -> WireWeights:
        """Every rank writes its own shards of the weights (in the wire dtype) under published/<peer>/v<version>;
        rank 0's record of them is what the board gets. The folder of the version `versions_kept + 2` periods
        older is deleted: no consumer can still be told of it."""
        import torch

        assert self.storage is not None
        name, dtype = self.cfg.peer_name(self.index), self.cfg.exchange.dtype
        wire = wire_dtype(dtype)
        peer.check_losses()  # weights trained past a NaN are never published
        state = {k: v.detach().to(wire) if v.is_floating_point() else v for k, v in peer.module.state_dict().items()}
        self.storage.write_sharded(published_dir(name, version), {"model": state})
        old = version - (self.versions_kept(self.cfg.exchange) + 2) * self.period
        if peer.rank == 0 and old > 0:
            self.storage.delete_dir(published_dir(name, old))
        nbytes = peer.state_nbytes(torch.finfo(wire).bits // 8)
        return WireWeights(version, dtype, {}, frozenset(), published_dir(name, version), nbytes)

    def _shards_published(self, peer: Peer) -> bool:
        if not peer.sharded or self.storage is None:
            return False
        return peer.state_nbytes() > self.cfg.exchange.gather_max_mb * 2**20

    def end_step(self, peer: Peer, step: int) -> None:
        version = step + 1
        if not (self.publishes and version % self.period == 0 and version >= self.first_usable):
            return
        # Rank 0 alone publishes a data-parallel peer's weights: they are the same on every rank. A sharded peer's
        # ranks gather them onto rank 0 together, one parameter at a time.
        if peer.rank != 0 and not peer.sharded:
            return
        t0 = time.perf_counter()
        if self._shards_published(peer):  # large: nothing is gathered (docs/design.md, "Sharded peers")
            w = self._publish_shards(peer, version)
            if peer.rank == 0:
                self.board.publish_weights(self.index, w)
                self.stats.bytes_published += w.shard_bytes
                self.stats.publishes += 1
            self.stats.exchange_s += time.perf_counter() - t0
            return
        if peer.sharded:
            weights = peer.weights()  # every rank (it checks the losses first)
        else:
            weights = peer.published_weights()  # the model's weights, or an adapter peer's adapters only
        if peer.rank == 0:
            w = encode_weights(weights, version, self.cfg.exchange.dtype)
            self.board.publish_weights(self.index, w)
            self.stats.bytes_published += w.nbytes
            self.stats.publishes += 1
        self.stats.exchange_s += time.perf_counter() - t0
